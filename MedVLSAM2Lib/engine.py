"""``InferenceEngine``: the one runtime API that the CLI, the server and the Slicer module use.

::

    engine = InferenceEngine.load("path/to/checkpoint" or "tiny", device="cpu", dtype="float32")
    handle = engine.encode(volume)                       # cached per volume content
    engine.report(handle, on_token=print)                # Report(text, findings, impression)
    engine.ask(handle, "Is there a pleural effusion?")   # Answer(text, kind, choice)
    engine.segment(handle, text="liver", boxes=[box])    # SegmentResult(answer, objects, timings)

Everything is in the volume's own voxel grid (IJK prompts, KJI masks); the engine maps to the model grid
and back with :mod:`MedVLSAM2Lib.preprocess`. Per volume it caches the model-grid tensors, the projected
visual tokens and (on the first segmentation) SAM2's input image and its features of every slice, in an LRU bounded
in bytes, so further questions and prompts on the same volume skip both encoders.

Every long call (``load``, ``encode``, ``report``, ``ask``, ``segment``) takes a keyword-only ``cancel`` (a
``threading.Event``, or anything with ``is_set()``) that another thread may set: the call then raises
:class:`~MedVLSAM2Lib.errors.Cancelled` at its next check (between load steps, encoding steps, generated tokens and
SAM2 slices), and the engine stays usable: entries enter the cache only whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .config import PRESETS, preset
from .errors import Cancelled, CapacityError, InputError, TooLargeError, WeightsError, raise_if_cancelled
from .evaluation.choice import parse_choice, question_options
from .model.medvlsam2 import AnswerMasks, MedVLSAM2Model, SegTarget
from .model.segmenter import sam_dtype
from .preprocess import GridConfig, GridRecord, mask_from_probabilities, sam_input, to_model
from .prompts import BoxPrompt, PointPrompt
from .results import Answer, ObjectMask, Report, SegmentResult
from .templates import SEG_TOKEN, load_templates, vqa_question
from .volume import Volume, check_ct

__all__ = [
    "InferenceEngine",
    "VolumeHandle",
    "Report",
    "Answer",
    "ObjectMask",
    "SegmentResult",
    "prompt_answer",
    "slice_presence",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BYTES = 4 << 30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ANSWER_TOKENS = {"short": 48, "long": 384, "choice": 24}
REPORT_TOKENS = 512
PRESET_SEED = 0
SEGMENT_TOKENS = 48
# Prompt tokens (system, history, question and the image tokens) one generation accepts: a chat far longer than any
# report conversation, and a bound on the model time a single request can take (the LLM's context is 32k).
DEFAULT_MAX_PROMPT_TOKENS = 8192
# Masks one answer may ask for: each [SEG] runs SAM2 over every slice of the volume.
MAX_SEG_OBJECTS = 16
# Report tokens that InferenceEngine.warmup generates (through the decode step: enough for a compiled step to be
# captured as a CUDA graph and replayed), and its synthetic CT's slices per model-grid slice.
WARMUP_TOKENS = 8
WARMUP_SLICES_PER_MODEL_SLICE = 2


@dataclass(frozen=True)
class VolumeHandle:
    """A volume the engine has encoded: ``key`` is a digest of its voxels and geometry. The handle keeps a
    reference to the volume, so an entry evicted from the cache is re-encoded on its next use."""

    key: str
    shape_kji: tuple[int, int, int]
    volume: Volume = field(repr=False, compare=False)
    intensity: str = "hu"


@dataclass
class _Encoded:
    """What the engine keeps per volume."""

    record: GridRecord
    image: torch.Tensor  # (1, 1, D, H, W) ViT input
    visual: torch.Tensor  # (1, out_tokens, d_llm)
    sam_image: torch.Tensor | None = None  # (1, D, H, W) SAM2 input (preprocess.sam_input), on first segmentation
    features: dict | None = None  # SAM2 image features, filled on the first segmentation

    @property
    def nbytes(self) -> int:
        tensors = [self.image, self.visual] + ([self.sam_image] if self.sam_image is not None else [])
        if self.features is not None:
            tensors += [*self.features["feats"], *self.features["pos"]]
        return sum(t.numel() * t.element_size() for t in tensors)


def _volume_key(volume: Volume, intensity: str) -> str:
    digest = hashlib.sha256(intensity.encode())
    digest.update(str((volume.array.dtype.str, volume.array.shape)).encode())
    array = volume.array  # hashed in place; a non-contiguous one slice by slice: the same bytes, so the same key
    for part in [array] if array.flags.c_contiguous else array:
        digest.update(np.ascontiguousarray(part))
    digest.update(np.ascontiguousarray(volume.ijk_to_ras).tobytes())
    return digest.hexdigest()


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA GPU here; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError("device 'mps' requested but this torch build or machine has no MPS; use --device cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unknown device {str(device)!r}; choose cpu, cuda (cuda:N) or mps.")
    return device


def _resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}.")
        dtype = DTYPES[dtype]
    if device.type == "cpu" and dtype == torch.float16:
        raise InputError("float16 is not supported on the CPU; use float32 or bfloat16.")
    return dtype


def load_model(source: str | Path, *, cancel: threading.Event | None = None) -> MedVLSAM2Model:
    """A preset name (random weights, seeded: identical in every process) or a checkpoint folder written by
    training or ``save_checkpoint``; ``cancel`` is checked before building and between the load steps.

    Raises:
        Cancelled: ``cancel`` was set.
    """
    from .model.weights import load_checkpoint

    raise_if_cancelled(cancel, "loading the model")
    if str(source) in PRESETS:
        with torch.random.fork_rng(devices=[]):  # the same random weights in every process (sharded evaluation)
            torch.manual_seed(PRESET_SEED)
            return MedVLSAM2Model(preset(str(source)))
    path = Path(source)
    if not path.exists():
        raise InputError(f"{source}: neither a preset ({', '.join(sorted(PRESETS))}) nor an existing weights folder.")
    if not path.is_dir():
        raise WeightsError(f"{source}: a weights folder is expected (config.json + model.safetensors), got a file.")
    return load_checkpoint(path, cancel=cancel)


def slice_presence(presence_model: np.ndarray, record: GridRecord) -> np.ndarray | None:
    """SAM2's per-slice object probability ``(D,)`` of the model grid, on the slices of the volume's own k axis.

    Rule: volume slice ``k`` takes the value of the model slice that :func:`~MedVLSAM2Lib.preprocess.mask_from_model`
    samples for it, the model slice nearest to it along the slice axis (nearest-exact: ``d = floor((k_crop + 0.5) ·
    D / n_crop)`` with ``k_crop`` its index in the foreground crop of ``n_crop`` slices); slices outside the crop get
    0, as their mask voxels do. So every value is one of the model's, and ``max(presence) == max(presence_model)``
    (the object's score) whenever the crop holds at least ``D`` slices, each model slice then being some volume
    slice's nearest; with fewer (a thin volume, upsampled), ``max(presence) <= max(presence_model)``.

    Args:
        presence_model: ``(D,)`` float in [0, 1], model slices in order (``AnswerMasks.object_scores`` row).
        record: the volume's :class:`~MedVLSAM2Lib.preprocess.GridRecord`.

    Returns:
        ``(K,)`` float32 in [0, 1], or ``None`` when the volume's k axis is not the model's slice axis (a volume
        stored in sagittal or coronal slices): SAM2's slices then cut across the volume's own.
    """
    target, flip = np.asarray(record.orientation)[2]  # where the volume's k axis goes in the canonical (S-up) grid
    if int(target) != 2:
        return None
    depth, (start, stop) = record.spatial_size[0], (record.crop_start[0], record.crop_stop[0])
    slices = torch.arange(depth, dtype=torch.float32)[None, None]  # the same sampling as mask_from_model's resize
    nearest = torch.nn.functional.interpolate(slices, size=stop - start, mode="nearest-exact")[0, 0].long().numpy()
    canonical = np.zeros(record.canonical_shape[0], dtype=np.float32)
    canonical[start:stop] = np.asarray(presence_model, dtype=np.float32)[nearest]
    return canonical[::-1].copy() if flip < 0 else canonical


def _split_report(text: str) -> tuple[str, str]:
    """Findings and impression of a CT-RATE style report ("Findings: … Impression: …")."""
    match = re.search(r"impressions?\s*:", text, flags=re.IGNORECASE)
    findings, impression = (text[: match.start()], text[match.end() :]) if match else (text, "")
    findings = re.sub(r"^\s*findings\s*:", "", findings, flags=re.IGNORECASE)
    return findings.strip(), impression.strip()


def segmentation_question(text: str) -> str:
    """The question the engine asks for ``text``: an instruction containing "segment" as given; a
    description (a sentence, or more than five words) as a referring question; otherwise a class name in the
    first semantic template."""
    templates = load_templates()
    text = text.strip()
    if not text:
        raise InputError("the segmentation text is empty; give a structure name or a description.")
    if "segment" in text.lower():
        return text
    if text.endswith((".", "?", "!")) or len(text.split()) > 5:
        return templates.referring_questions[0].format(text)
    return templates.semantic_questions[0].format(text)


def prompt_answer() -> str:
    """The answer that evaluation's ``--forced-answer`` gives in place of a generated one: the first semantic answer
    template (Figure 6's "It is [SEG].")."""
    return load_templates().semantic_answers[0]


def _no_seg_message(answer: str, from_prompts: bool) -> str:
    """What the user is told when the generated ``answer`` has no ``[SEG]``."""
    if from_prompts:
        return f"The model's answer has no {SEG_TOKEN} ({answer!r}); the mask comes from your points or box alone."
    return f"The model's answer has no {SEG_TOKEN} ({answer!r}), so it made no mask."


def _labels(text: str | None, answer: str, count: int) -> list[str]:
    """Segment names: the class a referring answer names, else the user's text, else "prompted structure"."""
    named = re.findall(r"(?:target|category) is (.+?)(?:,| and)|It is ([^,]+?), \[SEG\]", answer)
    names = [next(n for n in pair if n).strip() for pair in named]
    base = text.strip() if text and len(text.split()) <= 5 and "segment" not in text.lower() else "prompted structure"
    labels = []
    for n in range(count):
        label = names[n] if n < len(names) else base
        labels.append(label if n == 0 or label != base else f"{base} {n + 1}")
    return labels


class InferenceEngine:
    """Runs a :class:`MedVLSAM2Model` on volumes; see the module docstring."""

    load_seconds: float | None = None  # set by load(): checkpoint (or preset) to ready
    warmup_seconds: float | None = None  # set by warmup(): its total

    def __init__(self, model: MedVLSAM2Model, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float32", cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS, *, fast: bool = True,
                 compile_decoding: bool = False) -> None:  # fmt: skip
        """Put ``model`` in eval mode on ``device`` in ``dtype`` (SAM2: see ``sam_dtype``).

        ``fast`` (the default): LoRA merged into the base weights (:meth:`MedVLSAM2Model.merge_lora`; the model's
        ``train()`` unmerges it again, so a caller who goes on training the model trains it unmerged), greedy
        decoding on a static KV cache, and the ``[SEG]`` states read while decoding instead of a second pass over the
        answer. ``False``: the reference path (LoRA unmerged, transformers' ``generate``, the second pass).
        ``compile_decoding`` (CUDA only): capture the decode step with ``torch.compile(mode="reduce-overhead")``.
        """
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        if cache_bytes < 0:
            raise InputError(f"cache_bytes must be >= 0, got {cache_bytes}.")
        if max_prompt_tokens < 1:
            raise InputError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}.")
        self.cache_bytes = cache_bytes
        self.max_prompt_tokens = max_prompt_tokens
        model.eval().to(self.device)
        for part in (model.vision, model.projector, model.llm, model.seg_projector):
            part.to(self.dtype)
        model.segmenter.sam.to(sam_dtype(self.device, self.dtype))  # bfloat16 on CUDA only, else float32
        self.fast = fast
        if fast:
            model.merge_lora()  # after the cast: the merged weights are those of the dtype that runs
            model.greedy_decoder().compile = compile_decoding and self.device.type == "cuda"
        else:
            model.unmerge_lora()
        self.model = model
        self._cache: OrderedDict[str, _Encoded] = OrderedDict()

    @classmethod
    def load(
        cls, source: str | Path = "tiny", device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
        cache_bytes: int = DEFAULT_CACHE_BYTES, *, max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS,
        cancel: threading.Event | None = None,
    ) -> InferenceEngine:  # fmt: skip
        """An engine over a preset (random weights) or a checkpoint folder. ``cancel`` is checked before any work,
        between the load steps (language model, model, ViT, SAM2 and trained weights) and before the move to
        ``device``. The engine keeps the seconds it took in ``load_seconds``; :meth:`warmup` is the next step.

        Raises:
            InputError: unknown preset/device/dtype. WeightsError: an unreadable or incomplete weights folder.
            Cancelled: ``cancel`` was set (the half-loaded model is dropped).
        """
        start = time.perf_counter()
        device = _resolve_device(device)
        _resolve_dtype(dtype, device)
        model = load_model(source, cancel=cancel)
        raise_if_cancelled(cancel, "loading the model")
        engine = cls(model, device, dtype, cache_bytes, max_prompt_tokens)
        engine.load_seconds = time.perf_counter() - start
        return engine

    # ------------------------------------------------------------------ cache

    @property
    def cached_bytes(self) -> int:
        return sum(entry.nbytes for entry in self._cache.values())

    def forget(self, key: str) -> bool:
        """Drop the cached encodings (model grid, visual tokens, SAM2 features) of the volume ``key``; returns
        whether there were any. A handle of it stays usable: its next use encodes again."""
        return self._cache.pop(key, None) is not None

    def _evict(self) -> None:
        while len(self._cache) > 1 and self.cached_bytes > self.cache_bytes:
            key, _ = self._cache.popitem(last=False)
            logger.info("evicted volume %s from the engine cache", key[:12])

    @contextlib.contextmanager
    def _capacity(self, what: str) -> Iterator[None]:
        """Turn an out-of-memory error into a :class:`CapacityError` that says what to change."""
        try:
            yield
        except torch.OutOfMemoryError as err:
            self._cache.clear()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise CapacityError(
                f"out of memory on {self.device} while {what} ({self.dtype}); try dtype bfloat16, a smaller "
                f"cache (cache_bytes), fewer concurrent volumes, or device cpu."
            ) from err

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ encoding

    def encode(self, volume: Volume, intensity: str = "hu", *, cancel: threading.Event | None = None) -> VolumeHandle:
        """Map ``volume`` to the model grid and encode it (cached by content: encoding the same voxels and
        geometry again is free). ``intensity`` is ``"hu"`` or ``"normalized"`` (see ``INTENSITIES``). ``cancel`` is
        checked before any work and between the steps (content key, model grid, ViT).

        Raises:
            InputError: not a 3D CT volume (see :func:`check_ct`).
            Cancelled: ``cancel`` was set; nothing of this volume is cached.
        """
        raise_if_cancelled(cancel, "encoding the volume")
        check_ct(volume, intensity)
        key = _volume_key(volume, intensity)
        handle = VolumeHandle(key, tuple(volume.array.shape), volume, intensity)
        self._entry(handle, cancel)
        return handle

    def _entry(self, handle: VolumeHandle, cancel: threading.Event | None = None) -> _Encoded:
        """The cached encoding of ``handle``, made now when absent (evicted, or first use); an entry enters the
        cache only whole, so a cancelled encoding leaves none."""
        if handle.key in self._cache:
            self._cache.move_to_end(handle.key)
            return self._cache[handle.key]
        raise_if_cancelled(cancel, "encoding the volume")
        config = self.model.config
        grid = GridConfig(spatial_size=config.vision.img_size)
        image, record = to_model(handle.volume, grid, device=self.device)
        raise_if_cancelled(cancel, "encoding the volume")
        image_t = torch.from_numpy(image)[None, None].to(self.device)
        with self._capacity("encoding the volume"), torch.inference_mode(), self._autocast():
            visual = self.model.visual_tokens(image_t.to(self.dtype))
        entry = _Encoded(record, image_t, visual)
        self._cache[handle.key] = entry
        self._evict()
        return entry

    def _sam_image(self, handle: VolumeHandle, entry: _Encoded) -> torch.Tensor:
        """SAM2's input image of ``entry``, made on the first segmentation only: for ``intensity="normalized"``
        it needs an HU estimate (:func:`~MedVLSAM2Lib.preprocess.hu_from_normalized`) that can fail, and that
        must not block reports and questions, which never use SAM2.

        Raises:
            IntensityScaleError: the HU scale of a normalised volume cannot be estimated.
        """
        if entry.sam_image is None:
            config = self.model.config
            grid = GridConfig(spatial_size=config.vision.img_size)
            sam_image = sam_input(handle.volume, grid, config.segmenter.window, handle.intensity, device=self.device)
            entry.sam_image = torch.from_numpy(sam_image)[None].to(self.device)
            self._evict()
        return entry.sam_image

    def _features(self, handle: VolumeHandle, entry: _Encoded, cancel: threading.Event | None = None) -> dict:
        """SAM2's features of every slice of ``entry``, made on the first segmentation and stored only whole."""
        if entry.features is None:
            raise_if_cancelled(cancel, "the segmentation")
            sam_image = self._sam_image(handle, entry)
            raise_if_cancelled(cancel, "the segmentation")
            with self._capacity("encoding the slices with SAM2"), torch.inference_mode(), self._autocast():
                entry.features = self.model.sam_features(sam_image[0])
            self._evict()
        return entry.features

    # ------------------------------------------------------------------ tasks

    def _generate(self, entry: _Encoded, question: str, history: Sequence[tuple[str, str]], max_new_tokens: int,
                  on_token: Callable[[str], None] | None,
                  cancel: threading.Event | None = None) -> tuple[list[int], list[int]]:  # fmt: skip
        prompt = self.model.prompt_ids(question, tuple(tuple(turn) for turn in history))
        if len(prompt) > self.max_prompt_tokens:
            raise TooLargeError(f"the prompt has {len(prompt)} tokens (question, {len(history)} earlier turns and "
                                f"{self.model.config.projector.out_tokens} image tokens); at most "
                                f"{self.max_prompt_tokens} are accepted (max_prompt_tokens, the server's "
                                "--max-prompt-tokens). Shorten the history.")  # fmt: skip
        with self._capacity("generating text"), self._autocast():
            answer = self.model.generate(None, prompt, max_new_tokens=max_new_tokens, on_token=on_token,
                                         visual=entry.visual, cancel=cancel, fast=self.fast)  # fmt: skip
        return prompt, answer  # on the fast path it carries its [SEG] states (GeneratedIds) to _objects

    def _decode(self, ids: list[int]) -> str:
        return self.model.tokenizer.decode(ids, skip_special_tokens=False).replace("<|im_end|>", "").strip()

    def report(self, handle: VolumeHandle, on_token: Callable[[str], None] | None = None,
               max_new_tokens: int = REPORT_TOKENS, *, cancel: threading.Event | None = None) -> Report:  # fmt: skip
        """Generate a radiology report; ``on_token`` receives the text as it is generated. ``cancel`` is checked
        after every token (right after ``on_token``, so a callback may set it) and before the first.

        Raises:
            Cancelled: ``cancel`` was set.
        """
        start = time.perf_counter()
        entry = self._entry(handle, cancel)
        question = load_templates().report_questions[0]
        _, answer = self._generate(entry, question, (), max_new_tokens, on_token, cancel)
        text = self._decode(answer)
        findings, impression = _split_report(text)
        return Report(text, findings, impression, len(answer), time.perf_counter() - start)

    def ask(self, handle: VolumeHandle, question: str, history: Sequence[tuple[str, str]] = (),
            kind: str = "short", on_token: Callable[[str], None] | None = None, *,
            cancel: threading.Event | None = None) -> Answer:  # fmt: skip
        """Answer a question about the volume; ``history`` holds earlier (question, answer) turns of the chat,
        ``kind`` is ``short``, ``long`` or ``choice`` (options written in the question, e.g. "(a) … (b) …").
        ``cancel`` is checked as in :meth:`report`.

        Raises:
            InputError: an empty question or an unknown kind. Cancelled: ``cancel`` was set.
        """
        if not question or not question.strip():
            raise InputError("the question is empty.")
        if kind not in ANSWER_TOKENS:
            raise InputError(f"unknown answer kind {kind!r}; choose one of {sorted(ANSWER_TOKENS)}.")
        start = time.perf_counter()
        entry = self._entry(handle, cancel)
        asked = vqa_question(question, kind)
        _, answer = self._generate(entry, asked, history, ANSWER_TOKENS[kind], on_token, cancel)
        text = self._decode(answer)
        choice = parse_choice(text, question_options(question)) if kind == "choice" else None
        return Answer(text, kind, choice, time.perf_counter() - start)

    def segment(self, handle: VolumeHandle, text: str | None = None, points: Sequence[PointPrompt] = (),
                boxes: Sequence[BoxPrompt] = (), *, answer: str | None = None, probabilities: bool = False,
                cancel: threading.Event | None = None) -> SegmentResult:  # fmt: skip
        """Segment from text, point/box prompts (IJK of the volume), or both.

        With ``text``, the model answers the question built from it (:func:`segmentation_question`); each
        ``[SEG]`` in its answer gives one mask, the prompts steer the first. Points or a box without text
        segment alone, as in SAM2's interactive mode: no question is asked (``question`` and ``answer`` are
        empty) and the mask does not depend on the language model. They also give the mask, alone, when the
        answer to a text has no ``[SEG]``; the result then says so (``from_prompts``, ``message``). ``answer``
        replaces generation by a given answer (evaluating the mask path alone); it must contain ``[SEG]``.
        ``probabilities`` also returns each mask's probabilities (for soft Dice). Each mask carries SAM2's object
        score and its per-slice ``presence`` (:func:`slice_presence`). ``cancel`` is checked before any work, after
        every generated token, before SAM2's image encoder, before every SAM2 slice and between objects mapped back.

        Raises:
            InputError: no text and no prompts, a prompt outside the volume, an ``answer`` without ``[SEG]`` or
                without ``text``;
                :class:`~MedVLSAM2Lib.errors.IntensityScaleError` (an ``InputError``): a normalised volume whose
                HU scale cannot be estimated, so SAM2 has no input (:func:`~MedVLSAM2Lib.preprocess.sam_input`).
            Cancelled: ``cancel`` was set; SAM2's features stay cached only if they were whole.
        """
        raise_if_cancelled(cancel, "the segmentation")
        if text is None and not points and not boxes:
            raise InputError("nothing to segment: give a text, point prompts or box prompts.")
        if answer is not None and SEG_TOKEN not in answer:
            raise InputError(f"a given answer must contain {SEG_TOKEN}, got {answer!r}.")
        if answer is not None and text is None:
            raise InputError("a given answer needs a text: points or a box alone ask no question.")
        if answer is not None and answer.count(SEG_TOKEN) > MAX_SEG_OBJECTS:
            raise TooLargeError(f"the given answer has {answer.count(SEG_TOKEN)} {SEG_TOKEN} tokens; one answer "
                                f"segments at most {MAX_SEG_OBJECTS} objects.")  # fmt: skip
        question = segmentation_question(text) if text is not None else ""
        timings: dict[str, float] = {}
        start = time.perf_counter()
        entry = self._entry(handle, cancel)
        points_model, boxes_model = entry.record.prompts_to_model(tuple(points), tuple(boxes))
        prompted = SegTarget(None, tuple(points_model), tuple(boxes_model))
        timings["encode"] = time.perf_counter() - start
        if text is None:
            objects = self._prompted_object(handle, entry, prompted, probabilities, timings, cancel=cancel)
            timings["total"] = time.perf_counter() - start
            return SegmentResult("", "", objects, handle.volume.ijk_to_ras.copy(), timings, from_prompts=True)
        if answer is None:
            prompt, answer_ids = self._generate(entry, question, (), SEGMENT_TOKENS, None, cancel)
        else:
            prompt, answer_ids = self.model.prompt_ids(question), self._token_ids(answer)
        timings["generate"] = time.perf_counter() - start - timings["encode"]
        answer_text = self._decode(answer_ids)
        has_seg = self.model.tokens.seg in answer_ids
        from_prompts = not has_seg and bool(points or boxes)
        message = "" if has_seg else _no_seg_message(answer_text, from_prompts)
        if message:
            logger.info(message)
        if from_prompts:
            objects = self._prompted_object(handle, entry, prompted, probabilities, timings, text, cancel)
        else:
            objects = self._objects(handle, entry, prompt, answer_ids, prompted, text, probabilities, timings, cancel)
        timings["total"] = time.perf_counter() - start
        return SegmentResult(question, answer_text, objects, handle.volume.ijk_to_ras.copy(), timings,
                             from_prompts=from_prompts, message=message)  # fmt: skip

    def _token_ids(self, text: str) -> list[int]:
        return self.model.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _objects(self, handle: VolumeHandle, entry: _Encoded, prompt: list[int], answer_ids: list[int],
                 prompted: SegTarget, text: str | None, probabilities: bool, timings: dict[str, float],
                 cancel: threading.Event | None = None) -> list[ObjectMask]:  # fmt: skip
        """One mask on the volume's grid per ``[SEG]`` of ``answer_ids``: ``prompted`` (the user's points and
        boxes) steers the first, the others have no prompts. Adds ``sam_encode`` and ``masks`` to ``timings``."""
        count = answer_ids.count(self.model.tokens.seg)
        if not count:
            return []
        seg_states = getattr(answer_ids, "seg_states", None)  # read while decoding: no second pass over the answer
        if count > MAX_SEG_OBJECTS:  # a generated answer: the masks of its first MAX_SEG_OBJECTS [SEG] only
            logger.warning("the answer has %d %s tokens; masks for the first %d only", count, SEG_TOKEN,
                           MAX_SEG_OBJECTS)  # fmt: skip
            seg_positions = [n for n, token in enumerate(answer_ids) if token == self.model.tokens.seg]
            answer_ids, count = answer_ids[: seg_positions[MAX_SEG_OBJECTS - 1] + 1], MAX_SEG_OBJECTS
            seg_states = None if seg_states is None else seg_states[:MAX_SEG_OBJECTS]
        features = self._timed_features(handle, entry, timings, cancel)
        targets = [prompted] + [SegTarget()] * (count - 1)
        mark = time.perf_counter()
        with self._capacity("decoding masks"), self._autocast():
            masks = self.model.segment_answer(None, self._sam_image(handle, entry), prompt, answer_ids, targets,
                                              visual=entry.visual, features=features, cancel=cancel,
                                              seg_states=seg_states)  # fmt: skip
        labels = _labels(text, self._decode(answer_ids), count)
        objects = self._object_masks(masks, labels, entry, probabilities, cancel)
        timings["masks"] = time.perf_counter() - mark
        return objects

    def _prompted_object(self, handle: VolumeHandle, entry: _Encoded, prompted: SegTarget, probabilities: bool,
                         timings: dict[str, float], text: str | None = None,
                         cancel: threading.Event | None = None) -> list[ObjectMask]:  # fmt: skip
        """The one mask of the user's points or box alone (no ``[SEG]`` state); named after a short ``text``."""
        features = self._timed_features(handle, entry, timings, cancel)
        mark = time.perf_counter()
        with self._capacity("decoding masks"), self._autocast():
            masks = self.model.segment_prompts(self._sam_image(handle, entry), prompted, features, cancel=cancel)
        objects = self._object_masks(masks, _labels(text, "", 1), entry, probabilities, cancel)
        timings["masks"] = time.perf_counter() - mark
        return objects

    def _timed_features(self, handle: VolumeHandle, entry: _Encoded, timings: dict[str, float],
                        cancel: threading.Event | None = None) -> dict:  # fmt: skip
        mark = time.perf_counter()
        features = self._features(handle, entry, cancel)
        timings["sam_encode"] = time.perf_counter() - mark
        return features

    def _object_masks(self, masks: AnswerMasks, labels: list[str], entry: _Encoded, probabilities: bool,
                      cancel: threading.Event | None = None) -> list[ObjectMask]:  # fmt: skip
        """Model-grid masks → :class:`ObjectMask` per label on the volume's grid, with score and per-slice presence;
        resampled on the engine's device, from which only the uint8 mask (and float16 probabilities) come back."""
        model_presence = masks.object_scores.float().cpu().numpy()  # (n, D)
        objects = []
        for label, prob, present in zip(labels, masks.probabilities, model_presence, strict=True):
            raise_if_cancelled(cancel, "the segmentation")
            mask, kept = mask_from_probabilities(prob, entry.record, keep=probabilities)
            presence = slice_presence(present, entry.record)
            objects.append(ObjectMask(label, mask, float(present.max()), kept, presence))
        return objects

    def describe(self) -> dict[str, Any]:
        """Model, device and cache facts (for ``--json`` output and the server's capabilities)."""
        config = self.model.config
        return {"preset": config.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "grid": list(config.vision.img_size), "cached_volumes": len(self._cache),
                "cached_bytes": self.cached_bytes, "cache_limit_bytes": self.cache_bytes,
                "max_prompt_tokens": self.max_prompt_tokens}  # fmt: skip

    # ------------------------------------------------------------------ warmup

    def warmup(self, *, cancel: threading.Event | None = None) -> dict[str, float]:
        """Run the whole pipeline once on a small synthetic CT, so that the first user request finds it warm (CUDA
        kernels loaded, cuDNN's algorithm choices made, a compiled decode step captured, SAM2 in its dtype, the KV
        cache as large as a report needs), then drop that volume from the cache: the engine keeps no state of it.
        Call it once, right after :meth:`load`: its volume passes through the cache like any other, so an engine
        whose cache is full evicts its oldest volume for it.

        The steps: encode the volume, a report of :data:`WARMUP_TOKENS` tokens (on a KV cache sized for a whole
        report), a text segmentation with a given answer (SAM2's image encoder, the ``[SEG]`` path) and a box alone
        (SAM2's interactive path). ``cancel`` is checked between and inside the steps, as each task checks it.

        Returns:
            Seconds per step (``encode``, ``report``, ``segment``, ``refine``) and their ``total``, also kept in
            ``warmup_seconds``.

        Raises:
            Cancelled: ``cancel`` was set (the synthetic volume is dropped all the same).
        """
        volume = self._warmup_volume(self.model.config.vision.img_size)
        shape_i, shape_j, shape_k = volume.shape_ijk
        box = BoxPrompt((shape_i * 0.25, shape_j * 0.3, shape_k // 2), (shape_i * 0.45, shape_j * 0.6, shape_k // 2))
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        handle = None
        try:
            handle = self.encode(volume, cancel=cancel)
            seconds["encode"] = self._synchronized_since(start)
            steps = {
                "report": lambda: self._warmup_report(handle, cancel),
                "segment": lambda: self.segment(handle, text="liver", answer=prompt_answer(), cancel=cancel),
                "refine": lambda: self.segment(handle, boxes=[box], cancel=cancel),
            }
            for name, step in steps.items():
                mark = time.perf_counter()
                step()
                seconds[name] = self._synchronized_since(mark)
        finally:
            if handle is not None:
                self.forget(handle.key)
        seconds["total"] = time.perf_counter() - start
        self.warmup_seconds = seconds["total"]
        logger.info("warm in %.1f s (%s)", seconds["total"], ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
        return seconds

    def _synchronized_since(self, start: float) -> float:
        """Seconds since ``start`` once the device has finished the work queued on it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _warmup_report(self, handle: VolumeHandle, cancel: threading.Event | None) -> None:
        """A report asked for with the default length (so the KV cache is sized for one) and stopped after
        :data:`WARMUP_TOKENS` streamed pieces, through the report's own cancel check after each token."""
        pieces: list[str] = []
        enough = threading.Event()

        def on_token(text: str) -> None:
            pieces.append(text)
            if len(pieces) >= WARMUP_TOKENS:
                enough.set()

        stop = SimpleNamespace(is_set=lambda: enough.is_set() or (cancel is not None and cancel.is_set()))
        try:
            self.report(handle, on_token, cancel=stop)  # the engine takes anything with is_set() as cancel
        except Cancelled:
            if not enough.is_set() or (cancel is not None and cancel.is_set()):
                raise

    @staticmethod
    def _warmup_volume(img_size: tuple[int, int, int]) -> Volume:
        """A CT-like volume in HU (int16, KJI) with :data:`WARMUP_SLICES_PER_MODEL_SLICE` slices per model-grid
        slice and the grid's rows and columns: air around an elliptic body of soft tissue, two lungs in its upper
        part, a vertebra and noise, on a 1.5 mm × 1.5 mm × 5 mm grid stored as DICOM series are (LPS axes)."""
        depth, rows, cols = img_size
        slices = depth * WARMUP_SLICES_PER_MODEL_SLICE
        k, j, i = np.ogrid[:slices, :rows, :cols]
        x, y = (i - cols / 2) / (cols / 2), (j - rows / 2) / (rows / 2)  # (1, 1, cols), (1, rows, 1)
        array = np.full((slices, rows, cols), -1000, dtype=np.int16)
        array[:, ((x / 0.9) ** 2 + (y / 0.7) ** 2 < 1)[0]] = 40
        lungs = (((np.abs(x) - 0.42) / 0.3) ** 2 + (y / 0.45) ** 2 < 1) & (k >= slices * 0.4)
        array[lungs] = -850
        array[:, (x**2 + (y - 0.5) ** 2 < 0.1**2)[0]] = 700
        array += np.random.default_rng(0).normal(0, 15, array.shape).astype(np.int16)
        ijk_to_ras = np.diag([-1.5, -1.5, 5.0, 1.0])
        return Volume(array, ijk_to_ras, {"source_path": "warmup volume (synthetic)"})
