"""SAM2 over the slices of a volume, prompted by the ``[SEG]`` embedding and optional points/boxes.

- SAM2 is built in Python from ``sam2``'s modules (no YAML files, no Hydra composition), with SAM2.1's
  settings, so the released ``sam2.1_hiera_*.pt`` checkpoints load strictly.
- The ``[SEG]`` embedding (``(B, 256)``, one per object) is appended after the point/box sparse
  embeddings on every slice (:class:`LanguagePromptEncoder`). Without it (``language=None``), points or a box
  alone prompt SAM2 as in SAM2's own interactive mode: the prompted slice conditions, memory tracks the rest;
  with ``prompt_object_token``, the prompted slice's object pointer also takes the ``[SEG]`` embedding's slot on
  the tracked slices.
- Slices run through what SAM2's ``_track_step`` computes, with memory attention: the prompted slices (or, with
  text only, the middle slice) are conditioning slices; tracking then goes outward in both
  directions. The same code runs in training (differentiable) and inference.
- Speed and memory: the image encoder runs a chunk of slices at a time; the per-slice step reads views of the
  cached features (no copies) and takes the mask decoder's logits before the object-score gate from the decoder's
  own output (no forward hook). On CUDA a bfloat16 engine runs SAM2 in bfloat16 (:func:`sam_dtype`).
- Object-score pitfall: SAM2 replaces the mask of a slice it scores as "no object" by a constant
  (−1024), which carries no gradient. The object-score logits are therefore returned for a loss of
  their own (``MedVLSAM2Model``), and randomly initialised models start with a positive score bias.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SegmenterConfig
from ..errors import raise_if_cancelled

__all__ = ["SlicePrompts", "VolumeSegmenter", "build_sam2", "prepare_slices", "sam_dtype"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_OBJECT_SCORE = -1024.0  # SAM2's mask logit of a slice scored as empty (sam2_base.NO_OBJ_SCORE)
ENCODE_CHUNK = 8  # slices per image-encoder batch: the paper's 32 slices in 4 batches


def build_sam2(config: SegmenterConfig) -> nn.Module:
    """A SAM2.1 model (``SAM2Base`` with a language-aware prompt encoder) of the configured geometry."""
    from sam2.modeling.backbones.hieradet import Hiera
    from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
    from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
    from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
    from sam2.modeling.position_encoding import PositionEmbeddingSine
    from sam2.modeling.sam.transformer import RoPEAttention
    from sam2.modeling.sam2_base import SAM2Base

    d, feat = config.d_model, config.image_size // 16
    target_device = torch.empty(0).device  # honours a `with torch.device("meta"):` around the build
    with torch.device("cpu"):  # Hiera calls .item() while building, which meta tensors cannot do
        trunk = Hiera(
            embed_dim=config.embed_dim,
            num_heads=config.num_heads,
            stages=config.stages,
            global_att_blocks=config.global_att_blocks,
            window_spec=config.window_spec,
            window_pos_embed_bkg_spatial_size=config.window_pos_embed_bkg,
        )
        _init_position_embedding(trunk)
    trunk = trunk.to(target_device)
    neck = FpnNeck(
        position_encoding=PositionEmbeddingSine(num_pos_feats=d, normalize=True, temperature=10000),
        d_model=d,
        backbone_channel_list=config.backbone_channels,
        fpn_top_down_levels=[2, 3],
        fpn_interp_model="nearest",
    )
    rope = {"rope_theta": 10000.0, "feat_sizes": (feat, feat), "embedding_dim": d, "num_heads": 1,
            "downsample_rate": 1, "dropout": 0.1}  # fmt: skip
    layer = MemoryAttentionLayer(
        activation="relu",
        self_attention=RoPEAttention(**rope),
        cross_attention=RoPEAttention(**rope, rope_k_repeat=True, kv_in_dim=config.mem_dim),
        d_model=d,
        dim_feedforward=8 * d,
        dropout=0.1,
        pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True,
        pos_enc_at_cross_attn_queries=False,
    )
    memory_encoder = MemoryEncoder(
        out_dim=config.mem_dim,
        mask_downsampler=MaskDownSampler(embed_dim=d, kernel_size=3, stride=2, padding=1),
        fuser=Fuser(CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1e-6, use_dwconv=True), 2),
        position_encoding=PositionEmbeddingSine(num_pos_feats=config.mem_dim, normalize=True, temperature=10000),
        in_dim=d,
    )
    sam = SAM2Base(
        image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=1),
        memory_attention=MemoryAttention(
            d_model=d, pos_enc_at_input=True, layer=layer, num_layers=config.memory_layers
        ),
        memory_encoder=memory_encoder,
        num_maskmem=config.num_maskmem,
        image_size=config.image_size,
        # SAM2.1 settings (sam2/configs/sam2.1/*.yaml) ...
        sigmoid_scale_for_mem_enc=20.0,
        sigmoid_bias_for_mem_enc=-10.0,
        use_mask_input_as_output_without_sam=True,
        directly_add_no_mem_embed=True,
        no_obj_embed_spatial=True,
        use_high_res_features_in_sam=True,
        iou_prediction_use_sigmoid=True,
        use_obj_ptrs_in_encoder=True,
        add_tpos_enc_to_obj_ptrs=True,
        proj_tpos_enc_in_obj_ptrs=True,
        use_signed_tpos_enc_to_obj_ptrs=True,
        only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True,
        pred_obj_scores_mlp=True,
        fixed_no_obj_ptr=True,
        use_mlp_for_obj_ptr_proj=True,
        use_multimask_token_for_obj_ptr=True,
        binarize_mask_from_pts_for_mem_enc=True,
        # ... except multimask output: the [SEG] token names one target, so one mask is asked for.
        multimask_output_in_sam=False,
        multimask_output_for_tracking=False,
        compile_image_encoder=False,
    )
    sam.sam_prompt_encoder.__class__ = language_prompt_encoder_class()  # adds behaviour only: same parameters, keys
    # A random model starts by scoring every slice "object present", so that masks get gradient from the first
    # step (loading a checkpoint overwrites this bias).
    with torch.no_grad():
        sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(2.0)
    return sam


def sam_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """SAM2's weight dtype in an inference engine on ``device`` that runs ``dtype``: bfloat16 on CUDA for a bfloat16
    engine, where SAM2 always runs under the engine's bfloat16 autocast (which SAM2's float32 position encodings
    need; it then casts no weights per call, and the cached features are bfloat16); float32 everywhere else (CPU,
    MPS, float16 and float32 engines), as in training."""
    return torch.bfloat16 if device.type == "cuda" and dtype == torch.bfloat16 else torch.float32


def _init_position_embedding(trunk: nn.Module) -> None:
    """A fixed unit-scale random draw for Hiera's absolute position embedding, which ``sam2`` starts at zero.

    With zeros, a randomly initialised trunk gives translation-equivariant features: mirror-image structures
    (the two lungs, the two kidneys) look alike to the mask decoder, which can then tell them apart only through
    its attention's positional encodings. Toy models learned that after a plateau of a few hundred steps whose
    length depended on the CPU's rounding (one CPU's kernels never left it). At the patch embedding's scale (~1 on
    CT slices) the features say where they are. Released SAM2.1 weights carry a learned embedding that replaces
    this one; a generator of its own keeps every other random weight as it was.
    """
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        trunk.pos_embed.copy_(torch.randn(trunk.pos_embed.shape, generator=generator))


@cache
def language_prompt_encoder_class() -> type:
    """SAM2's ``PromptEncoder`` subclass that appends ``language_tokens`` (``(B, k, d)``) to the sparse embeddings.

    Defined on first use so that importing this module does not import ``sam2`` (which initialises Hydra).
    ``language_tokens`` is set by :class:`VolumeSegmenter` for the duration of one volume pass.
    """
    from sam2.modeling.sam.prompt_encoder import PromptEncoder

    class LanguagePromptEncoder(PromptEncoder):
        language_tokens: torch.Tensor | None = None

        def forward(self, points, boxes, masks):  # noqa: ANN001, ANN201 (same contract as PromptEncoder.forward)
            sparse, dense = super().forward(points, boxes, masks)
            if self.language_tokens is not None:
                sparse = torch.cat([sparse, self.language_tokens.to(sparse.dtype)], dim=1)
            return sparse, dense

    return LanguagePromptEncoder


def prepare_slices(volume: torch.Tensor, image_size: int) -> torch.Tensor:
    """Model-grid volume → SAM2 input slices.

    Args:
        volume: ``(D, H, W)`` float in ``[0, 1]`` (CT already windowed).
        image_size: SAM2's input size.

    Returns:
        ``(D, 3, S, S)`` ImageNet-normalised slices.
    """
    slices = F.interpolate(volume[:, None].float(), size=(image_size, image_size), mode="bilinear", align_corners=False)
    # float32 on purpose: SAM2's position encodings are float32; run it under autocast for bf16 speed
    mean = torch.tensor(IMAGENET_MEAN, device=volume.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=volume.device).view(1, 3, 1, 1)
    return (slices.expand(-1, 3, -1, -1) - mean) / std


@dataclass
class SlicePrompts:
    """Point prompts of one slice for a batch of objects, in SAM2 pixel coordinates.

    Attributes:
        coords: ``(B, P, 2)`` float ``(x, y)`` in pixels of SAM2's ``image_size``.
        labels: ``(B, P)`` int: 1 positive, 0 negative, 2/3 box corners, -1 padding.
    """

    coords: torch.Tensor
    labels: torch.Tensor


@dataclass
class SegmenterOutput:
    """Per-slice results for ``B`` objects over ``D`` slices.

    Attributes:
        mask_logits: ``(B, D, s, s)`` low-resolution logits (``s = image_size / 4``); slices scored as
            empty hold SAM2's constant −1024.
        object_logits: ``(B, D)`` object-score logits (target present on the slice?).
        decoder_logits: ``(B, D, s, s)`` the mask decoder's logits before that hard gate: the mask loss uses
            them, so that every slice gives the decoder a gradient while the object score is still wrong.
    """

    mask_logits: torch.Tensor
    object_logits: torch.Tensor
    decoder_logits: torch.Tensor


@dataclass
class _Pass:
    """What the slices of one pass share: the volume's features, the object count and the mask decoder's dense
    positional encoding (which SAM2 would make again for every slice)."""

    features: dict
    batch: int
    image_pe: torch.Tensor


class VolumeSegmenter(nn.Module):
    """SAM2 run slice by slice with memory, conditioned on ``[SEG]`` embeddings.

    Attributes:
        encode_chunk: slices per image-encoder batch in :meth:`encode` (its activations set the memory peak).
    """

    def __init__(self, config: SegmenterConfig, memory: bool = True, encode_chunk: int = ENCODE_CHUNK) -> None:
        super().__init__()
        self.config = config
        self.memory = memory
        self.encode_chunk = encode_chunk
        self.sam = build_sam2(config)

    def encode(self, slices: torch.Tensor) -> dict:
        """Image-encoder features of all slices, ``encode_chunk`` slices per batch (cache them per volume).

        Each slice's features are stored contiguously (``feats[level][:, z : z + 1]`` is a contiguous view, what
        SAM2's per-slice step reads without a copy); the position encoding, the same for every slice, is stored once,
        for the lowest resolution only (the one level that memory attention reads).

        Args:
            slices: ``(D, 3, S, S)`` from :func:`prepare_slices`.

        Returns:
            ``feats``: per level ``(HW, D, C)``; ``pos``: ``[(HW, 1, C)]``; ``sizes``: per level ``(H, W)``;
            ``num_slices``: ``D``.
        """
        depth = slices.shape[0]
        levels: list[torch.Tensor] = []
        for start in range(0, depth, self.encode_chunk):
            _, feats, pos, sizes = self.sam._prepare_backbone_features(
                self.sam.forward_image(slices[start : start + self.encode_chunk])
            )
            if not levels:
                levels = [f.new_empty(depth, f.shape[0], f.shape[2]) for f in feats]  # slice-major
                top = pos[-1][:, :1].contiguous()
            for level, f in zip(levels, feats, strict=True):
                level[start : start + f.shape[1]] = f.transpose(0, 1)
        return {"feats": [level.transpose(0, 1) for level in levels], "pos": [top], "sizes": sizes,
                "num_slices": depth}  # fmt: skip

    def forward(
        self, features: dict, language: torch.Tensor | None, prompts: dict[int, SlicePrompts] | None = None, *,
        cancel: threading.Event | None = None,
    ) -> SegmenterOutput:  # fmt: skip
        """Segment ``B`` objects through all slices.

        Args:
            features: from :meth:`encode` (one volume).
            language: ``(B, d_model)`` projected ``[SEG]`` embeddings, one per object; ``None``: one object
                prompted by ``prompts`` alone.
            prompts: slice index → point/box prompts on that slice (conditioning slices).
            cancel: checked before every slice (anything with ``is_set()``).

        Returns:
            :class:`SegmenterOutput` with per-slice logits in slice order.

        Raises:
            Cancelled: ``cancel`` was set; the slices already run are dropped (nothing is kept between calls).
        """
        prompts = prompts or {}
        if language is None and not prompts:
            raise ValueError("an object without a [SEG] embedding needs point or box prompts.")
        depth, batch = features["num_slices"], 1 if language is None else language.shape[0]
        encoder = self.sam.sam_prompt_encoder
        encoder.language_tokens = None if language is None else language[:, None, :]
        object_token = language is None and self.config.prompt_object_token
        try:
            run = _Pass(features, batch, encoder.get_dense_pe())
            outputs = self._run(run, prompts, depth, object_token, cancel)
        finally:
            encoder.language_tokens = None
        masks = torch.stack([outputs[z]["pred_masks"][:, 0] for z in range(depth)], dim=1)
        scores = torch.stack([outputs[z]["object_score_logits"][:, 0] for z in range(depth)], dim=1)
        decoder = torch.stack([outputs[z]["decoder_masks"][:, 0] for z in range(depth)], dim=1)
        return SegmenterOutput(masks, scores, decoder)

    def _order(self, prompts: dict[int, SlicePrompts], depth: int) -> tuple[list[int], list[tuple[int, bool]]]:
        """Conditioning slices, then the tracking order as ``(slice, reverse)`` pairs."""
        cond = sorted(prompts) or [depth // 2]
        forward = [(z, False) for z in range(cond[0] + 1, depth) if z not in cond]
        backward = [(z, True) for z in range(cond[0] - 1, -1, -1)]
        return cond, forward + backward

    def _run(self, run: _Pass, prompts: dict[int, SlicePrompts], depth: int, object_token: bool = False,
             cancel: threading.Event | None = None) -> dict[int, dict]:  # fmt: skip
        """``object_token``: after the conditioning slices, their mean object pointer is the tracked slices' token.
        ``cancel`` is checked before each slice."""
        memory = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
        outputs: dict[int, dict] = {}
        cond, order = self._order(prompts, depth)
        if not self.memory:  # every slice on its own, as if each were the first
            cond, order = list(range(depth)), []
        for z in cond:
            raise_if_cancelled(cancel, f"the segmentation (after {len(outputs)} of {depth} slices)")
            outputs[z] = self._step(run, z, True, prompts.get(z), memory, reverse=False)
            memory["cond_frame_outputs"][z] = outputs[z]
        if object_token:
            pointer = torch.stack([outputs[z]["obj_ptr"] for z in cond]).mean(dim=0)
            self.sam.sam_prompt_encoder.language_tokens = pointer[:, None, :]
        backward = {"cond_frame_outputs": memory["cond_frame_outputs"], "non_cond_frame_outputs": {}}
        for z, reverse in order:
            # each direction keeps its own tracked memories (as MedSAM2 resets between directions): the
            # backward sweep must not read slices beyond the conditioning slice as if they were behind it
            bank = backward if reverse else memory
            raise_if_cancelled(cancel, f"the segmentation (after {len(outputs)} of {depth} slices)")
            outputs[z] = self._step(run, z, False, None, bank, reverse=reverse)
            bank["non_cond_frame_outputs"][z] = outputs[z]
        return outputs

    def _prompt_embeddings(self, run: _Pass, prompt: SlicePrompts | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse and dense prompt embeddings of one slice; a slice without points gets SAM2's padding point."""
        if prompt is None:
            device = run.image_pe.device
            points = (torch.zeros(run.batch, 1, 2, device=device),
                      -torch.ones(run.batch, 1, dtype=torch.int32, device=device))  # fmt: skip
        else:
            points = (prompt.coords, prompt.labels)
        return self.sam.sam_prompt_encoder(points=points, boxes=None, masks=None)

    def _step(
        self, run: _Pass, z: int, is_cond: bool, prompt: SlicePrompts | None, memory: dict, reverse: bool
    ) -> dict:
        """One slice: what ``SAM2Base._track_step`` + ``_encode_memory_in_output`` compute for SAM2.1's settings
        (single-mask output, hard object-score gate, fixed no-object pointer), on views of the cached features, and
        keeping the object score (which ``track_step`` drops in training mode) and the mask decoder's logits before
        the gate (:class:`SegmenterOutput`)."""
        sam, features, batch = self.sam, run.features, run.batch
        feats = [f[:, z : z + 1].expand(-1, batch, -1) for f in features["feats"]]
        pos = [features["pos"][-1].expand(-1, batch, -1)]
        sizes = features["sizes"]
        high_res = [x.permute(1, 2, 0).view(batch, x.size(2), *size)
                    for x, size in zip(feats[:-1], sizes[:-1], strict=True)]  # fmt: skip
        pix_feat = sam._prepare_memory_conditioned_features(
            z, is_cond, feats[-1:], pos, sizes[-1:], memory, features["num_slices"], reverse
        )
        sparse, dense = self._prompt_embeddings(run, prompt)
        decoded, _, tokens, object_logits = sam.sam_mask_decoder(
            image_embeddings=pix_feat, image_pe=run.image_pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=False, repeat_image=False, high_res_features=high_res,
        )  # fmt: skip
        shown = object_logits > 0
        low_res = torch.where(shown[:, None, None], decoded, NO_OBJECT_SCORE).float()
        high_res_masks = F.interpolate(low_res, size=(sam.image_size,) * 2, mode="bilinear", align_corners=False)
        appearing = shown.float()
        obj_ptr = appearing * sam.obj_ptr_proj(tokens[:, 0]) + (1 - appearing) * sam.no_obj_ptr
        maskmem, maskmem_pos = sam._encode_new_memory(feats, sizes, high_res_masks, object_logits, prompt is not None)
        return {"maskmem_features": maskmem, "maskmem_pos_enc": maskmem_pos, "obj_ptr": obj_ptr, "pred_masks": low_res,
                "object_score_logits": object_logits, "decoder_masks": decoded.float()}  # fmt: skip
