"""Build MedVL-SAM2 and load weights from local paths (never downloaded); save and load our checkpoints.

Real checkpoint layouts (DESIGN.md §3):
- M3D-CLIP ``pretrained_ViT.bin``: the ViT's own keys (``cls_token``, ``patch_embedding.*``, ``blocks.N.*``,
  ``norm.*``).
- InternVL2.5-4B folder: ``config.json`` with ``llm_config`` (a Qwen2 config) and safetensors whose LM keys
  start with ``language_model.`` (``language_model.model.*``, ``language_model.lm_head.*``); the tokenizer
  lives in the same folder. Any other local HF causal-LM folder loads through ``AutoModelForCausalLM``.
- SAM2.1 ``sam2.1_hiera_*.pt``: ``torch.load(...)["model"]``.

Our checkpoint folder: ``config.json`` (model config, base-weight references, format version),
``model.safetensors`` (the trained parts, plus every part that has no base reference), ``tokenizer/``. It loads
strictly: a model key may be absent from ``model.safetensors`` only when it was not trained and the recorded base
file holds it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import WeightsError, raise_if_cancelled
from .medvlsam2 import MedVLSAM2Model

__all__ = ["BaseWeights", "build_model", "load_strict", "save_checkpoint", "load_checkpoint", "parameter_table"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Where each base-weight component sits in our model's state dict (the LM inside peft's wrapper).
COMPONENT_PREFIXES = {"vision": "vision.", "language": "llm.base_model.model.", "sam2": "segmenter.sam."}
# peft inserts these into the keys of the layers it wraps (``q_proj.base_layer.weight``,
# ``embed_tokens.token_adapter.base_layer.weight``); the base file has the plain keys.
PEFT_WRAPPERS = re.compile(r"\.(?:token_adapter|base_layer)(?=\.)")
# Paper Table 8 (millions of parameters), for `medvlsam2 doctor --preset paper`.
PAPER_TABLE_M = {"vision": 198.05, "projector": 7.09, "language": 3390.0, "segmentation": 224.43}


class BaseWeights(dict):
    """Local paths of pretrained weights: keys ``vision`` (M3D-CLIP .bin), ``language`` (folder), ``sam2`` (.pt)."""


def _named(label: str, items: list[str]) -> str:
    """``"2 missing keys: a, b"`` (the first five names)."""
    return f"{len(items)} {label}: {', '.join(items[:5])}{' …' if len(items) > 5 else ''}"


def _key_problems(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], may_lack: frozenset[str] = frozenset()
) -> str:
    """Why ``state`` does not fit a module whose state dict is ``own`` (missing keys other than ``may_lack``,
    unexpected keys, wrong shapes), or ``""`` when it fits."""
    missing = sorted(set(own) - set(state) - may_lack)
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if tuple(own[k].shape) != tuple(state[k].shape)]  # fmt: skip
    labelled = (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes))
    return "; ".join(_named(label, items) for label, items in labelled if items)


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` requiring the same keys and shapes.

    Raises:
        WeightsError: naming missing keys, unexpected keys and shape mismatches (first few of each).
    """
    problems = _key_problems(module.state_dict(), state)
    if problems:
        raise WeightsError(f"{source}: does not match the model ({problems}). Check the file and the preset.")
    module.load_state_dict(state, strict=True)


def _torch_load(path: Path) -> Any:
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or pickled-code files
        raise WeightsError(f"{path}: cannot read as a torch checkpoint ({err}).") from err


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no .safetensors files.")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _qwen2_arguments(llm_config: dict[str, Any], source: Path) -> dict[str, Any]:
    """``Qwen2Config`` arguments from an InternVL ``llm_config``: remote-code entries dropped, and FlashAttention-2
    (InternVL2.5-4B's config asks for it as ``_attn_implementation``) replaced by sdpa. FlashAttention-2 runs only on
    CUDA in float16/bfloat16, while this loader builds the LM on the CPU and does not know where the engine will run
    it (CPU or float32 fail at the first forward), so sdpa is the one choice that runs everywhere.

    Raises:
        WeightsError: the LM is not a Qwen2 (InternVL2.5-2B/8B/26B carry InternLM2).
    """
    arguments = {k: v for k, v in llm_config.items() if k not in ("architectures", "auto_map")}
    if arguments.get("model_type", "qwen2") != "qwen2":
        raise WeightsError(
            f"{source}: llm_config.model_type is {arguments['model_type']!r}; MedVL-SAM2 needs a Qwen2 LM "
            "(InternVL2.5-1B, -4B, -38B or -78B)."
        )
    spellings = [arguments.pop(k) for k in ("_attn_implementation", "attn_implementation") if k in arguments]
    attention = next((a for a in spellings if a), None)
    if attention == "flash_attention_2":
        logger.info(
            "%s: llm_config asks for flash_attention_2, which runs only on CUDA in float16/bfloat16 and the LM is "
            "built on the CPU here; using sdpa.",
            source,
        )
        attention = "sdpa"
    if attention:
        arguments["attn_implementation"] = attention
    return arguments


def _load_hugging_face_folder(folder: Path, dtype: torch.dtype) -> Any:
    """``AutoModelForCausalLM`` from a local folder, refusing weights that leave parameters uninitialised."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), local_files_only=True, trust_remote_code=False, dtype=dtype, output_loading_info=True
    )
    missing = sorted(info["missing_keys"])
    if missing:
        raise WeightsError(f"{folder}: {_named('missing keys', missing)}; its weights do not cover the model.")
    return model


def load_language_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A causal LM and its tokenizer from an InternVL2.5 folder (``llm_config`` + ``language_model.`` keys) or any
    local HF causal-LM folder. The LM is tied or untied as its config says (InternVL2.5-4B: untied).

    Raises:
        WeightsError: no config, no language tensors, a non-Qwen2 ``llm_config``, or keys that do not fit.
    """
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsError(f"{folder}: no config.json; give an InternVL2.5 or Hugging Face model folder.")
    config = json.loads(config_path.read_text())
    tokenizer = None
    if _has_tokenizer(folder):  # no remote code: InternVL's auto_map would otherwise make transformers ask on stdin
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    if "llm_config" not in config:
        return _load_hugging_face_folder(folder, dtype), tokenizer
    qwen = Qwen2Config(**_qwen2_arguments(config["llm_config"], config_path))
    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen)
    prefix = "language_model."
    state = {k[len(prefix) :]: v for k, v in _read_safetensors(folder).items() if k.startswith(prefix)}
    if not state:
        raise WeightsError(f"{folder}: no '{prefix}*' tensors; is this an InternVL2.5 checkpoint?")
    if qwen.tie_word_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    model = model.to_empty(device="cpu")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=qwen)  # its inv_freq buffer was left on meta
    load_strict(model, {k: v for k, v in state.items() if v is not None}, f"{folder} (language_model.*)")
    if qwen.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype), tokenizer


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _build(
    config: ModelConfig, base: dict, cancel: threading.Event | None = None
) -> tuple[MedVLSAM2Model, dict[str, set[str]]]:
    """The model, and per component loaded from ``base`` the keys its file provided (in the file's names).
    ``cancel`` is checked before each step (LM, model, ViT weights, SAM2 weights)."""
    config = ModelConfig.from_dict(config.to_dict())  # a copy: the caller's config is not modified
    tokenizer = language_model = None
    provided: dict[str, set[str]] = {}
    if base.get("language"):
        raise_if_cancelled(cancel, "loading the model")
        language_model, tokenizer = load_language_model(base["language"])
        provided["language"] = set(language_model.state_dict())
        config.language.tie_word_embeddings = bool(language_model.config.tie_word_embeddings)  # the folder decides
        if tokenizer is not None:
            from .language import build_tokenizer

            config.language.tokenizer = str(base["language"])
            tokenizer = build_tokenizer(config.language.tokenizer)
    raise_if_cancelled(cancel, "loading the model")
    model = MedVLSAM2Model(config, tokenizer=tokenizer, language_model=language_model)
    if base.get("vision"):
        raise_if_cancelled(cancel, "loading the model")
        state = _torch_load(Path(base["vision"]))
        load_strict(model.vision, state, str(base["vision"]))
        provided["vision"] = set(state)
    if base.get("sam2"):
        raise_if_cancelled(cancel, "loading the model")
        checkpoint = _torch_load(Path(base["sam2"]))
        if not isinstance(checkpoint, dict) or "model" not in checkpoint:
            raise WeightsError(f"{base['sam2']}: expected a SAM2 checkpoint with a 'model' entry.")
        load_strict(model.segmenter.sam, checkpoint["model"], str(base["sam2"]))
        provided["sam2"] = set(checkpoint["model"])
    return model, provided


def build_model(config: ModelConfig, base: BaseWeights | dict | None = None) -> MedVLSAM2Model:
    """Build the model; components named in ``base`` load their pretrained weights, the rest start random.

    Raises:
        WeightsError: a base file is missing, unreadable, or does not fit the configured geometry.
    """
    return _build(config, BaseWeights(base or {}))[0]


def _base_key(key: str) -> tuple[str | None, str]:
    """``(component, key in the component's base file)`` of a model state-dict key; component ``None`` for keys
    outside the vision encoder, the LM and SAM2."""
    for component, prefix in COMPONENT_PREFIXES.items():
        if key.startswith(prefix):
            return component, PEFT_WRAPPERS.sub("", key[len(prefix) :])
    return None, key


def _held_by_base(key: str, provided: dict[str, set[str]]) -> bool:
    """Whether a base file that :func:`_build` loaded holds this model key."""
    component, name = _base_key(key)
    return component is not None and name in provided.get(component, set())


def _saved_keys(model: MedVLSAM2Model, base: dict[str, str]) -> list[str]:
    """Keys stored in our checkpoint: trainable tensors, and every tensor of a component without a base file."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    keys = []
    for key in model.state_dict():
        component, _ = _base_key(key)
        adapter = "lora_" in key or "trainable_tokens" in key
        if component is None or not base.get(component) or key in trainable or adapter:
            keys.append(key)
    return keys


def save_checkpoint(model: MedVLSAM2Model, folder: str | os.PathLike, base: dict | None = None, *,
                    overwrite: bool = False) -> Path:  # fmt: skip
    """Write our checkpoint folder atomically (temporary folder, then rename).

    Raises:
        WeightsError: the folder exists and ``overwrite`` is false.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise WeightsError(f"{folder}: exists; choose a new folder or pass overwrite=True.")
    base = {k: str(Path(v).resolve()) for k, v in (base or {}).items() if v}  # loadable from any directory
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        state = model.state_dict()
        keys = _saved_keys(model, base)
        tensors = {k: state[k].detach().cpu().clone().contiguous() for k in keys}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": str(CHECKPOINT_FORMAT)})
        model.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": CHECKPOINT_FORMAT, "config": model.config.to_dict(), "base_weights": base, "tensors": keys}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def load_checkpoint(folder: str | os.PathLike, *, cancel: threading.Event | None = None) -> MedVLSAM2Model:
    """Rebuild a model saved by :func:`save_checkpoint` (base files are read from their recorded paths), strictly:
    every key comes from ``model.safetensors`` unless it was not saved and a recorded base file holds it.

    ``cancel`` (anything with ``is_set()``) is checked between the load steps: the language model, building the
    model, the ViT weights, the SAM2 weights, our trained tensors.

    Raises:
        WeightsError: missing files, an unknown format, or tensors that do not fit the rebuilt model (naming the
            missing, unexpected and misshapen keys).
        Cancelled: ``cancel`` was set; nothing is returned (the half-built model is dropped).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise WeightsError(f"{folder}: not a MedVLSAM2 checkpoint ({path.name} is missing).")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(
            f"{folder}: checkpoint format {meta.get('format')!r}, this version reads {CHECKPOINT_FORMAT}."
        )
    # Saved before these fields existed: every preset then built two mixer layers and tied the LM's embeddings.
    meta["config"].setdefault("projector", {}).setdefault("mixer_layers", 2)
    meta["config"].setdefault("language", {}).setdefault("tie_word_embeddings", True)
    config = ModelConfig.from_dict(meta["config"])
    if (folder / "tokenizer").is_dir():
        config.language.tokenizer = str(folder / "tokenizer")
    base = BaseWeights(meta.get("base_weights") or {})
    model, provided = _build(config, base, cancel)
    raise_if_cancelled(cancel, "loading the model")
    saved = load_file(str(weights_path))
    own = model.state_dict()
    listed = set(meta.get("tensors", []))  # what was saved, the trained tensors among them: the base's are stale
    from_base = frozenset(k for k in own if k not in listed and _held_by_base(k, provided))
    problems = _key_problems(own, saved, may_lack=from_base)
    if problems:
        raise WeightsError(
            f"{weights_path}: does not fit the model its config.json describes ({problems}); only keys that the "
            f"base weights {sorted(base)} hold and that were not trained may be left out."
        )
    model.load_state_dict(saved, strict=False)
    return model


def parameter_table(model: MedVLSAM2Model) -> list[tuple[str, int, float]]:
    """``(module, parameters, paper Table 8 in millions)`` for vision, projector, language and segmentation."""

    def count(parameters: Any) -> int:
        return sum(p.numel() for p in parameters)

    lm = model.llm.get_base_model()
    language = count(p for n, p in lm.named_parameters())
    segmentation = count(model.seg_projector.parameters()) + count(model.segmenter.parameters())
    return [
        ("vision", count(model.vision.parameters()), PAPER_TABLE_M["vision"]),
        ("projector", count(model.projector.parameters()), PAPER_TABLE_M["projector"]),
        ("language", language, PAPER_TABLE_M["language"]),
        ("segmentation", segmentation, PAPER_TABLE_M["segmentation"]),
    ]
