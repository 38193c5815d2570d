"""MedVL-SAM2: 3D ViT → MLP-Mixer projector → Qwen2 + LoRA → ``[SEG]`` → SAM2 over slices.

Reads top-down: output/batch types, the ``[SEG]`` projector, the model (parts, trainable groups,
embedding of a conversation, losses, ``forward``), then inference (LoRA merging, ``generate``, ``segment``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn

from ..config import ModelConfig
from ..errors import InputError, raise_if_cancelled
from ..prompts import BoxPrompt, PointPrompt
from .decoding import GreedyDecoder, plain_greedy
from .language import IGNORE_INDEX, ChatTokens, apply_lora, build_causal_lm, build_tokenizer, encode_conversation
from .projector import build_projector
from .segmenter import SlicePrompts, VolumeSegmenter, prepare_slices
from .vision import VisionEncoder3D

__all__ = ["SegTarget", "Batch", "AnswerMasks", "MedVLSAM2Output", "SegTokenProjector", "GeneratedIds",
           "MedVLSAM2Model", "STAGE_PARTS"]  # fmt: skip

logger = logging.getLogger(__name__)

# Trainable parts per training stage (paper): 1 projector; 2 + ViT + LoRA (with the new token rows);
# 3 + the [SEG] projector and SAM2's mask decoder ("sam_memory", SAM2's memory path, is an option on top).
STAGE_PARTS: dict[int, frozenset[str]] = {
    1: frozenset({"projector"}),
    2: frozenset({"projector", "vision", "lora"}),
    3: frozenset({"projector", "vision", "lora", "seg_projector", "sam_decoder"}),
}
ALL_PARTS = frozenset(
    {"projector", "vision", "lora", "seg_projector", "sam_decoder", "sam_memory", "sam_image_encoder"}
)
SAM2_DECODER = ("sam_mask_decoder.", "sam_prompt_encoder.")
SAM2_MEMORY = ("memory_attention.", "memory_encoder.", "maskmem_tpos_enc", "no_mem_embed", "no_obj_ptr",
               "no_obj_embed_spatial", "obj_ptr_proj.", "obj_ptr_tpos_proj.")  # fmt: skip
# SAM2 parameters our pipeline never uses (mask-input prompts, the IoU head of multimask selection, the
# unused no-memory positional encoding). They stay frozen so that no trainable parameter lacks a gradient
# (distributed training requires that).
UNUSED_SAM2 = ("no_mem_pos_enc", "mask_downsample.", "sam_prompt_encoder.mask_downscaling.",
               "sam_mask_decoder.iou_prediction_head.")  # fmt: skip


@dataclass
class SegTarget:
    """One object to segment in a sample, matched in order to the sample's ``[SEG]`` tokens.

    Attributes:
        mask: ``(D, H, W)`` float {0, 1} on the model grid (``None`` at inference).
        points: point prompts in model coordinates ``(w, h, d)``.
        boxes: box prompts in model coordinates (one slice thick: ``min d == max d``).
        language: whether the ``[SEG]`` state prompts SAM2; ``False``: the points or box alone do (SAM2's
            interactive mode, what a user's clicks without text get), so they must be given.
    """

    mask: torch.Tensor | None = None
    points: tuple[PointPrompt, ...] = ()
    boxes: tuple[BoxPrompt, ...] = ()
    language: bool = True


@dataclass
class Batch:
    """A collated training batch.

    Attributes:
        image: ``(B, 1, D, H, W)`` float in [0, 1] (min-max, for the ViT).
        sam_image: ``(B, D, H, W)`` float in [0, 1] (CT window, for SAM2), same grid.
        input_ids, attention_mask, labels: ``(B, L)`` ChatML tokens, right-padded; labels -100 where unsupervised.
        targets: per sample, one :class:`SegTarget` per ``[SEG]`` token (empty for report/VQA samples).
    """

    image: torch.Tensor
    sam_image: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    targets: list[list[SegTarget]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor (target masks included) on ``device``."""
        targets = [[replace(t, mask=None if t.mask is None else t.mask.to(device)) for t in row]
                   for row in self.targets]  # fmt: skip
        return Batch(self.image.to(device), self.sam_image.to(device), self.input_ids.to(device),
                     self.attention_mask.to(device), self.labels.to(device), targets)  # fmt: skip


@dataclass
class AnswerMasks:
    """Masks of an answer's ``[SEG]`` tokens on the model grid: ``probabilities`` ``(n, D, H, W)`` and
    ``object_scores`` ``(n, D)`` (SAM2's per-slice probability that the object is present)."""

    probabilities: torch.Tensor
    object_scores: torch.Tensor


@dataclass
class MedVLSAM2Output:
    """Losses (scalars) of a batch and the mask decoder's logits ``(n_objects, D, H, W)`` on the model grid
    (before SAM2's object-score gate, as the mask loss sees them)."""

    loss: torch.Tensor
    text_loss: torch.Tensor
    bce_loss: torch.Tensor
    dice_loss: torch.Tensor
    object_loss: torch.Tensor
    mask_logits: torch.Tensor | None = None


class GeneratedIds(list[int]):
    """New token ids of a generation (a plain ``list[int]`` to every reader) and ``seg_states``: the last-layer
    hidden states ``(n, d_llm)`` of its ``[SEG]`` tokens read while decoding them, or ``None`` where the decoding
    path did not read them (sampling, beam search, transformers' generate)."""

    seg_states: torch.Tensor | None = None


class SegTokenProjector(nn.Module):
    """``[SEG]`` hidden state ``(n, d_llm)`` → SAM2 prompt token ``(n, d_sam)`` (Sa2VA's text_hidden_fcs).

    He-initialised (fan-in, ReLU): a unit-scale hidden state (the LLM's final RMSNorm output) gives a prompt
    token of about unit scale, like SAM2's own learned prompt embeddings (unit normal). PyTorch's default
    ``Linear`` init gives about a quarter of that, which SAM2's decoder starts out ignoring.
    """

    def __init__(self, d_llm: int, d_sam: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d_llm, d_llm), nn.ReLU(inplace=True), nn.Linear(d_llm, d_sam))
        for layer in (self.layers[0], self.layers[2]):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden)


def _add_token_rows(lm: nn.Module, vocab_size: int) -> None:
    """Grow a pretrained LM's input embeddings (and an untied output head) to ``vocab_size`` rows. Each new row is
    the mean of the old ones rather than a random draw, so that rebuilding from the same base gives the same rows."""
    old = lm.get_input_embeddings().num_embeddings
    lm.resize_token_embeddings(vocab_size, mean_resizing=False)
    matrices = {id(m.weight): m.weight for m in (lm.get_input_embeddings(), lm.get_output_embeddings())}
    with torch.no_grad():
        for weight in matrices.values():
            weight[old:] = weight[:old].mean(dim=0)


class MedVLSAM2Model(nn.Module):
    """The unified model. Build with :func:`MedVLSAM2Lib.model.weights.build_model` to load real weights."""

    def __init__(self, config: ModelConfig, tokenizer=None, language_model=None) -> None:  # noqa: ANN001
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(config.language.tokenizer)
        self.tokens = ChatTokens.of(self.tokenizer)
        self.vision = VisionEncoder3D(config.vision)
        base = (
            language_model
            if language_model is not None
            else build_causal_lm(config.language, len(self.tokenizer), self.tokens)
        )
        if base.get_input_embeddings().num_embeddings < len(self.tokenizer):
            _add_token_rows(base, len(self.tokenizer))
        d_llm = base.config.hidden_size
        self.projector = build_projector(config.projector, config.vision.num_tokens, config.vision.hidden_size, d_llm)
        self.llm = apply_lora(base, config.language, [self.tokens.seg, self.tokens.image])
        self.seg_projector = SegTokenProjector(d_llm, config.segmenter.d_model)
        self.segmenter = VolumeSegmenter(config.segmenter, memory=config.memory)
        self.dice_loss = DiceLoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)  # soft Dice on logits, per object
        self.set_trainable(STAGE_PARTS[3])

    # ------------------------------------------------------------------ parts

    def _decoder(self) -> nn.Module:
        return self.llm.get_base_model().model  # Qwen2Model, LoRA layers injected in place

    def _lm_head(self) -> nn.Module:
        return self.llm.get_base_model().lm_head

    def part_parameters(self, part: str) -> list[nn.Parameter]:
        """Parameters of one trainable group (see ``ALL_PARTS``)."""
        sam = self.segmenter.sam
        if part == "vision":
            return list(self.vision.parameters())
        if part == "projector":
            return list(self.projector.parameters())
        if part == "seg_projector":
            return list(self.seg_projector.parameters())
        if part == "lora":
            return [p for n, p in self.llm.named_parameters() if "lora_" in n or "trainable_tokens_delta" in n]
        if part == "sam_image_encoder":
            return list(sam.image_encoder.parameters())
        if part in ("sam_decoder", "sam_memory"):
            prefixes = SAM2_DECODER if part == "sam_decoder" else SAM2_MEMORY
            return [p for n, p in sam.named_parameters() if n.startswith(prefixes) and not n.startswith(UNUSED_SAM2)]
        raise InputError(f"unknown trainable part {part!r}; parts are {sorted(ALL_PARTS)}.")

    def set_trainable(self, parts: frozenset[str] | set[str]) -> None:
        """Freeze everything, then unfreeze the named parts (``STAGE_PARTS[stage]`` or any subset of ``ALL_PARTS``)."""
        unknown = set(parts) - ALL_PARTS
        if unknown:
            raise InputError(f"unknown trainable part(s) {sorted(unknown)}; parts are {sorted(ALL_PARTS)}.")
        for p in self.parameters():
            p.requires_grad_(False)
        for part in parts:
            for p in self.part_parameters(part):
                p.requires_grad_(True)

    # ------------------------------------------------------------------ embedding

    def visual_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """Projected visual tokens ``(B, out_tokens, d_llm)`` of ``(B, 1, D, H, W)`` images in [0, 1]."""
        return self.projector(self.vision(image.to(self.vision.cls_token.dtype)))

    def sam_features(self, sam_image: torch.Tensor) -> dict:
        """SAM2 image-encoder features of every slice of one ``(D, H, W)`` volume (cache them per volume)."""
        return self.segmenter.encode(prepare_slices(sam_image, self.config.segmenter.image_size))

    def embed(
        self, image: torch.Tensor | None, input_ids: torch.Tensor, visual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Token embeddings with the ``<image>`` positions replaced by projected visual tokens.

        Args:
            image: ``(B, 1, D, H, W)`` in [0, 1] (unused when ``visual`` is given).
            input_ids: ``(B, L)``; each row holds exactly ``projector.out_tokens`` ``<image>`` tokens.
            visual: precomputed :meth:`visual_tokens` of the images, to skip the encoders.

        Returns:
            ``(B, L, d_llm)``.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        is_image = input_ids == self.tokens.image
        expected = self.config.projector.out_tokens
        counts = is_image.sum(dim=1)
        if torch.any(counts != expected):
            raise InputError(f"every sample needs {expected} <image> tokens, got {counts.tolist()}.")
        visual = self.visual_tokens(image) if visual is None else visual
        return embeds.masked_scatter(is_image[..., None], visual.to(embeds.dtype))

    def hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states ``(B, L, d_llm)`` (no logits are computed here)."""
        return self._decoder()(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    # ------------------------------------------------------------------ losses

    def _text_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy on supervised positions only: full-vocabulary logits are never formed
        for the other positions."""
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        if not supervised.any():
            return hidden.sum() * 0.0
        logits = self._lm_head()(hidden[:, :-1][supervised]).float()  # (n_supervised, vocab)
        return F.cross_entropy(logits, targets[supervised])

    def _slice_prompts(self, target: SegTarget, grid: tuple[int, int, int]) -> dict[int, SlicePrompts]:
        """Model-grid prompts of one object → SAM2 pixel prompts per slice (boxes first, as SAM2 wants)."""
        depth, height, width = grid
        size = self.config.segmenter.image_size
        scale = torch.tensor([size / width, size / height])
        by_slice: dict[int, list[tuple[list[float], int]]] = {}

        def pixel(w: float, h: float) -> list[float]:
            return ((torch.tensor([w, h]) + 0.5) * scale - 0.5).tolist()

        for box in target.boxes:  # a box spanning slices prompts its middle slice
            z = min(max(round((box.min_ijk[2] + box.max_ijk[2]) / 2), 0), depth - 1)
            by_slice.setdefault(z, []).extend([(pixel(*box.min_ijk[:2]), 2), (pixel(*box.max_ijk[:2]), 3)])
        for point in target.points:
            z = min(max(round(point.ijk[2]), 0), depth - 1)
            by_slice.setdefault(z, []).append((pixel(*point.ijk[:2]), point.label))
        return {
            z: SlicePrompts(torch.tensor([[c for c, _ in items]]), torch.tensor([[label for _, label in items]]))
            for z, items in by_slice.items()
        }

    def _segment_objects(
        self, sam_image: torch.Tensor, seg_tokens: torch.Tensor | None, targets: list[SegTarget],
        features: dict | None = None, cancel: threading.Event | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """For one volume: mask logits ``(n, D, H, W)`` on the model grid, object logits ``(n, D)``, and the
        decoder's logits before SAM2's object-score gate ``(n, D, H, W)`` (what the mask loss trains).

        Objects without point/box prompts share one batched pass; prompted objects run one by one, without
        their ``[SEG]`` state where ``language`` is off (``seg_tokens`` may then be ``None``). ``features`` are
        the volume's cached :meth:`sam_features` (computed here when not given). ``cancel`` is checked before
        every slice (:class:`~MedVLSAM2Lib.errors.Cancelled`).
        """
        grid = tuple(sam_image.shape)
        device = sam_image.device
        plain = [n for n, t in enumerate(targets) if not (t.points or t.boxes)]
        if any(not targets[n].language for n in plain):
            raise InputError("an object segmented without its [SEG] state needs point or box prompts.")
        if seg_tokens is None and any(t.language for t in targets):
            raise InputError("objects segmented through their [SEG] state need [SEG] hidden states.")
        features = self.sam_features(sam_image) if features is None else features
        # SAM2 runs in float32, or bfloat16 on CUDA (segmenter.sam_dtype).
        language = None if seg_tokens is None else self.seg_projector(seg_tokens).float()  # (n, d_sam)
        masks: list[torch.Tensor | None] = [None] * len(targets)
        objects: list[torch.Tensor | None] = [None] * len(targets)
        decoded: list[torch.Tensor | None] = [None] * len(targets)
        groups = ([plain] if plain else []) + [[n] for n, t in enumerate(targets) if t.points or t.boxes]
        for group in groups:
            prompts = {} if group is plain else self._slice_prompts(targets[group[0]], grid)
            prompts = {z: SlicePrompts(p.coords.to(device), p.labels.to(device)) for z, p in prompts.items()}
            spoken = targets[group[0]].language
            out = self.segmenter(features, language[group] if spoken else None, prompts, cancel=cancel)
            logits = F.interpolate(out.mask_logits, size=grid[1:], mode="bilinear", align_corners=False)
            raw = F.interpolate(out.decoder_logits, size=grid[1:], mode="bilinear", align_corners=False)
            if not spoken and language is not None:  # keeps the unused [SEG] state in the graph (DDP needs that)
                raw = raw + language[group].sum() * 0.0
            for k, n in enumerate(group):
                masks[n], objects[n], decoded[n] = logits[k], out.object_logits[k], raw[k]
        return torch.stack(masks), torch.stack(objects), torch.stack(decoded)

    def _mask_losses(
        self, logits: torch.Tensor, objects: torch.Tensor, truth: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """BCE and soft Dice (MONAI) on ``(n, D, H, W)`` logits, and the per-slice object-score BCE."""
        bce = F.binary_cross_entropy_with_logits(logits, truth)
        dice = self.dice_loss(logits[:, None], truth[:, None])
        present = (truth.flatten(2).amax(dim=2) > 0).float()
        return bce, dice, F.binary_cross_entropy_with_logits(objects, present)

    def _placeholder_mask_loss(self, hidden: torch.Tensor, sam_image: torch.Tensor) -> torch.Tensor:
        """Zero-valued loss through the whole segmentation path (two slices, so memory is used too): keeps
        every trainable parameter in the graph for batches without masks (DDP/ZeRO need that)."""
        _, objects, logits = self._segment_objects(sam_image[:2], hidden[:1], [SegTarget()])
        return (logits.mean() + objects.mean()) * 0.0

    def forward(self, batch: Batch) -> MedVLSAM2Output:
        """Losses of a mixed batch (reports, VQA, segmentation).

        ``loss = text · L_text + mask · (L_BCE + dice · L_Dice + L_obj)`` with ``config.loss`` weights.
        """
        embeds = self.embed(batch.image, batch.input_ids)
        hidden = self.hidden_states(embeds, batch.attention_mask)
        text = self._text_loss(hidden, batch.labels)
        weights = self.config.loss
        seg_logits, zero = [], hidden.sum() * 0.0
        bce = dice = objectness = zero
        pairs = []
        for b, targets in enumerate(batch.targets or [[] for _ in range(hidden.shape[0])]):
            positions = (batch.input_ids[b] == self.tokens.seg).nonzero().flatten()
            if len(positions) != len(targets):
                raise InputError(f"sample {b}: {len(positions)} [SEG] tokens but {len(targets)} targets.")
            if targets:
                _, objects, logits = self._segment_objects(batch.sam_image[b], hidden[b, positions], targets)
                truth = torch.stack([t.mask.to(logits) for t in targets])
                pairs.append(self._mask_losses(logits, objects, truth))
                seg_logits.append(logits)
        if pairs:
            bce, dice, objectness = (torch.stack(values).mean() for values in zip(*pairs, strict=True))
            mask_part = bce + weights.dice_weight * dice + objectness
        else:
            mask_part = self._placeholder_mask_loss(hidden[0], batch.sam_image[0])
        loss = weights.text_weight * text + weights.mask_weight * mask_part
        return MedVLSAM2Output(loss, text, bce, dice, objectness, torch.cat(seg_logits) if seg_logits else None)

    # ------------------------------------------------------------------ inference

    @property
    def lora_merged(self) -> bool:
        """Whether the LoRA deltas (and the new token rows) are merged into the base weights (:meth:`merge_lora`)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(m.merged for m in self.llm.modules() if isinstance(m, BaseTunerLayer))

    def merge_lora(self) -> None:
        """Merge LoRA into the base weights for inference (peft ``merge_adapter``: ``W += B·A·scale`` per target,
        the trained token rows written into the embedding and head). The wrapper stays: the merged layers skip their
        LoRA branch, the trainable-token layers their per-call copy of the embedding matrix, and :meth:`unmerge_lora`
        (or :meth:`train`) takes the deltas out again. Refused in training mode: a merged LoRA gets no gradient."""
        if self.training or self.llm.training:
            raise InputError("a model in training mode cannot merge its LoRA (it would train nothing); call eval().")
        if not self.lora_merged:
            self.llm.merge_adapter()

    def unmerge_lora(self) -> None:
        """Take the merged LoRA deltas out of the base weights again (``W -= B·A·scale``: the original weights up to
        one rounding in their dtype; the token rows are restored exactly)."""
        if self.lora_merged:
            self.llm.unmerge_adapter()

    def train(self, mode: bool = True) -> MedVLSAM2Model:
        """``nn.Module.train``; a merged LoRA is unmerged first, so that a model never trains merged."""
        if mode and self.lora_merged:
            logger.info("unmerging LoRA from the base weights for training")
            self.unmerge_lora()
        return super().train(mode)

    def state_dict(self, *args: object, **kwargs: object) -> dict:
        """``nn.Module.state_dict``, refused while LoRA is merged: the base weights then hold the deltas, and a
        checkpoint of them with the LoRA tensors would apply them twice when loaded."""
        self._refuse_merged("save or read the weights")
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, *args: object, **kwargs: object) -> object:
        """``nn.Module.load_state_dict``, refused while LoRA is merged (the loaded LoRA would not reach the base)."""
        self._refuse_merged("load weights")
        return super().load_state_dict(*args, **kwargs)

    def _refuse_merged(self, what: str) -> None:
        if self.lora_merged:
            raise InputError(f"the model's LoRA is merged for inference; call unmerge_lora() before you {what}.")

    def greedy_decoder(self) -> GreedyDecoder:
        """The model's static-cache greedy decoder, made on first use; its cache is reused across generations."""
        if getattr(self, "_greedy", None) is None:
            self._greedy = GreedyDecoder(self.llm)
        return self._greedy

    def prompt_ids(self, question: str, history: tuple[tuple[str, str], ...] = ()) -> list[int]:
        """ChatML ids of a generation prompt (ends with the assistant header)."""
        ids, _ = encode_conversation(
            self.tokenizer, self.config.system_prompt, [*history, (question, None)], self.config.projector.out_tokens
        )
        return ids

    @torch.inference_mode()
    def generate(
        self,
        image: torch.Tensor | None,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        num_beams: int = 1,
        temperature: float = 1.0,
        on_token: Callable[[str], None] | None = None,
        visual: torch.Tensor | None = None,
        cancel: threading.Event | None = None,
        fast: bool = True,
    ) -> GeneratedIds:
        """Generate an answer for one volume.

        Args:
            image: ``(1, 1, D, H, W)`` in [0, 1].
            prompt_ids: from :meth:`prompt_ids`.
            max_new_tokens, do_sample, num_beams, temperature: decoding (greedy by default).
            on_token: called with each new piece of decoded text (greedy/sampling only).
            visual: the volume's cached :meth:`visual_tokens` (skips the encoders).
            cancel: checked before the first forward pass and after every token (anything with ``is_set()``);
                with ``on_token``, right after the callback, so that a callback setting it stops before the next
                token is computed.
            fast: greedy decoding runs on :meth:`greedy_decoder` (static KV cache, ``[SEG]`` states read on the
                way) when the LM's generation config adds nothing to the argmax; ``False``, sampling and beam search
                go through transformers' ``generate``.

        Returns:
            The new token ids, ending at ``<|im_end|>`` when generation stopped there; their ``seg_states`` are
            set on the fast path.

        Raises:
            Cancelled: ``cancel`` was set.
        """
        raise_if_cancelled(cancel, "the generation")
        ids = torch.tensor([prompt_ids], device=self.vision.cls_token.device)
        embeds = self.embed(image, ids, visual)
        if fast and not do_sample and num_beams == 1 and plain_greedy(self.llm.generation_config):
            streamer = _CallbackStreamer(self.tokenizer, on_token, cancel, skip_prompt=False) if on_token else None
            decoded = self.greedy_decoder().decode(embeds, max_new_tokens=max_new_tokens, streamer=streamer,
                                                   end_id=self.tokens.im_end, seg_id=self.tokens.seg,
                                                   cancel=cancel)  # fmt: skip
            answer = GeneratedIds(decoded.ids)
            answer.seg_states = decoded.seg_states
            return answer
        streamer = _CallbackStreamer(self.tokenizer, on_token, cancel) if on_token and num_beams == 1 else None
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            num_beams=num_beams,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            eos_token_id=self.tokens.im_end,
            pad_token_id=self.tokens.pad,
            streamer=streamer,
            stopping_criteria=None if cancel is None else _cancel_criteria(cancel),
        )
        return GeneratedIds(out[0].tolist())

    @torch.inference_mode()
    def segment_answer(
        self, image: torch.Tensor | None, sam_image: torch.Tensor, prompt_ids: list[int], answer_ids: list[int],
        targets: list[SegTarget] | None = None, visual: torch.Tensor | None = None, features: dict | None = None,
        cancel: threading.Event | None = None, seg_states: torch.Tensor | None = None,
    ) -> AnswerMasks | None:  # fmt: skip
        """Masks for the ``[SEG]`` tokens of a generated answer, or ``None`` when it has none.

        The ``[SEG]`` hidden states are those at the positions where ``[SEG]`` is the input token — the rule used in
        training: ``seg_states`` ``(n, d_llm)`` when given (read while decoding, :class:`GeneratedIds`), else from a
        forward pass over prompt + answer. ``targets`` carry point/box prompts (model coordinates) per ``[SEG]``;
        ``visual`` and ``features`` are the volume's cached encodings. ``cancel`` is checked before that pass and
        before every slice (:class:`~MedVLSAM2Lib.errors.Cancelled`).
        """
        ids = torch.tensor([prompt_ids + answer_ids], device=self.vision.cls_token.device)
        positions = (ids[0] == self.tokens.seg).nonzero().flatten()
        positions = positions[positions >= len(prompt_ids)]  # [SEG] of earlier turns belong to earlier answers
        if len(positions) == 0:
            return None
        raise_if_cancelled(cancel, "the segmentation")
        if seg_states is not None and len(seg_states) != len(positions):
            raise InputError(f"the answer has {len(positions)} [SEG] tokens but {len(seg_states)} [SEG] states.")
        if seg_states is None:
            seg_states = self.hidden_states(self.embed(image, ids, visual), torch.ones_like(ids))[0, positions]
        targets = targets or [SegTarget() for _ in positions]
        if len(targets) != len(positions):
            raise InputError(f"the answer has {len(positions)} [SEG] tokens but {len(targets)} prompt sets were given.")
        logits, objects, _ = self._segment_objects(sam_image[0], seg_states, targets, features, cancel)
        return AnswerMasks(torch.sigmoid(logits), torch.sigmoid(objects))

    @torch.inference_mode()
    def segment_prompts(self, sam_image: torch.Tensor, target: SegTarget, features: dict | None = None,
                        cancel: threading.Event | None = None) -> AnswerMasks:  # fmt: skip
        """The mask of one object from its points or box alone (no language model, no ``[SEG]``): SAM2's
        interactive mode, as trained by samples whose target has ``language`` off. ``cancel`` is checked before
        every slice."""
        target = replace(target, language=False)
        logits, objects, _ = self._segment_objects(sam_image[0], None, [target], features, cancel)
        return AnswerMasks(torch.sigmoid(logits), torch.sigmoid(objects))


def _cancel_criteria(cancel: threading.Event) -> list:
    """A transformers stopping-criteria list that raises :class:`~MedVLSAM2Lib.errors.Cancelled` once ``cancel`` is
    set: transformers calls it after every generated token, streamer or not, greedy or beam search."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class CancelCriterion(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
            raise_if_cancelled(cancel, "the generation")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([CancelCriterion()])


class _CallbackStreamer:
    """Minimal transformers streamer: decodes new tokens and passes the new text to a callback.

    A character whose UTF-8 bytes span several tokens decodes as U+FFFD until its last byte arrives, so trailing
    U+FFFD is held back until then (or the end): the pieces then join to exactly the decoded answer. ``cancel`` is
    checked after every token: transformers hands a token to the streamer after its stopping criteria, so a callback
    that sets it would otherwise see one more token computed. ``skip_prompt``: the first ``put`` carries the prompt
    (transformers' ``generate``); :class:`~MedVLSAM2Lib.model.decoding.GreedyDecoder` puts new tokens only."""

    def __init__(
        self,
        tokenizer,  # noqa: ANN001
        callback: Callable[[str], None],
        cancel: threading.Event | None = None,
        skip_prompt: bool = True,
    ) -> None:
        self.tokenizer, self.callback, self.cancel = tokenizer, callback, cancel
        self.ids: list[int] = []
        self.text = ""
        self.prompt_seen = not skip_prompt

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt (empty with inputs_embeds)
            self.prompt_seen = True
            return
        self.ids.extend(value.flatten().tolist())
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=False).rstrip("\ufffd"))
        raise_if_cancelled(self.cancel, "the generation")

    def end(self) -> None:
        self._emit(self.tokenizer.decode(self.ids, skip_special_tokens=False))

    def _emit(self, text: str) -> None:
        if len(text) > len(self.text):
            self.callback(text[len(self.text) :])
            self.text = text
