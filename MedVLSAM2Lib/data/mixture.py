"""Training samples drawn from the prepared caches with the paper's templates, and their collation.

Sample ``i`` of an epoch is a pure function of ``(seed, epoch, i)``: the same index always gives the same
task, volume, template and prompts, which is what makes resumed runs continue on the same loss curve.
Tasks: ``report`` (CT-RATE report generation), ``vqa`` (one CT-CHAT turn), ``semantic`` (class name),
``referring`` (a term-dictionary description instead of the name), ``interactive`` (synthesised points, with odds
``point_share``, or a box on the model grid, plus the text of semantic or, with odds ``interactive_referring_share``,
referring segmentation, as the paper's interactive protocol gives both; with odds ``prompt_only_share`` the prompts
segment alone instead, as a user's clicks without text do: their target has ``language`` off, so SAM2 gets no
``[SEG]`` state, and a generic question only carries the target in the one-``[SEG]``-per-target format).
Semantic and referring samples ask about up to ``objects_per_sample`` structures of one volume in consecutive turns,
one ``[SEG]`` each (LISA's and Sa2VA's ``num_classes_per_sample``); interactive samples about up to
``interactive_objects``, each with prompts of its own. Every step then contrasts structures of the same image (for
prompts alone, only the prompts tell them apart), and the volume's SAM2 image features are computed once for all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from ..model.language import IGNORE_INDEX, encode_conversation
from ..model.medvlsam2 import Batch, SegTarget
from ..prompts import BoxPrompt, PointPrompt, synthesize_box, synthesize_points
from ..templates import TermDictionary, prompt_only_prompt, report_prompt, segmentation_prompt
from .augment import augment
from .cache import VolumeCache

__all__ = ["TASKS", "Sample", "TaskMixture", "collate"]

TASKS = ("report", "vqa", "semantic", "referring", "interactive")


@dataclass
class Sample:
    """One training sample before collation (tensors on CPU)."""

    image: torch.Tensor  # (1, D, H, W)
    sam_image: torch.Tensor  # (D, H, W)
    input_ids: list[int]
    labels: list[int]
    targets: list[SegTarget] = field(default_factory=list)


class TaskMixture(torch.utils.data.Dataset):
    """A map-style dataset of ``samples_per_epoch`` samples mixing tasks with the given weights."""

    def __init__(
        self,
        model_config,  # noqa: ANN001  (ModelConfig: system prompt, number of image tokens)
        tokenizer,  # noqa: ANN001
        task_weights: dict[str, float],
        samples_per_epoch: int,
        *,
        seed: int = 0,
        text_cache: VolumeCache | None = None,
        reports: dict[str, str] | None = None,
        vqa: dict[str, list[tuple[str, str]]] | None = None,
        seg_cache: VolumeCache | None = None,
        terms: TermDictionary | None = None,
        augmentation: bool = False,
        objects_per_sample: int = 1,
        phrasings: int = 0,
        slice_window: int = 0,
        prompt_only_share: float = 0.0,
        point_share: float = 0.5,
        interactive_objects: int = 1,
        interactive_referring_share: float = 0.5,
    ) -> None:
        unknown = set(task_weights) - set(TASKS)
        if unknown:
            raise InputError(f"unknown task(s) {sorted(unknown)}; tasks are {list(TASKS)}.")
        self.model_config, self.tokenizer = model_config, tokenizer
        self.tasks = [t for t, w in task_weights.items() if w > 0]
        if not self.tasks:
            raise InputError("task_weights gives no task a positive weight.")
        weights = np.array([task_weights[t] for t in self.tasks], dtype=float)
        self.probabilities = weights / weights.sum()
        self.samples_per_epoch, self.seed, self.epoch = samples_per_epoch, seed, 0
        self.text_cache, self.seg_cache, self.terms = text_cache, seg_cache, terms
        self.augmentation = augmentation
        for name, count in (("objects_per_sample", objects_per_sample), ("interactive_objects", interactive_objects)):
            if count < 1:
                raise InputError(f"{name} must be >= 1, got {count}.")
        self.objects_per_sample, self.interactive_objects = objects_per_sample, interactive_objects
        if phrasings < 0:
            raise InputError(f"phrasings must be >= 0 (0 = every template), got {phrasings}.")
        self.phrasings = phrasings
        if slice_window < 0:
            raise InputError(f"slice_window must be >= 0 (0 = every slice), got {slice_window}.")
        self.slice_window = slice_window
        shares = {"prompt_only_share": prompt_only_share, "point_share": point_share,
                  "interactive_referring_share": interactive_referring_share}  # fmt: skip
        for name, share in shares.items():
            if not 0.0 <= share <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {share}.")
        self.prompt_only_share, self.point_share = prompt_only_share, point_share
        self.interactive_referring_share = interactive_referring_share
        self.reports = {k: v for k, v in (reports or {}).items() if text_cache and k in text_cache.entries}
        self.vqa = {k: v for k, v in (vqa or {}).items() if text_cache and k in text_cache.entries}
        self.seg_volumes = [n for n, e in (seg_cache.entries.items() if seg_cache else []) if e["present"]]
        self._check_sources()

    def _check_sources(self) -> None:
        needs = {"report": self.reports, "vqa": self.vqa}
        for task in self.tasks:
            if task in needs and not needs[task]:
                raise InputError(f"task {task!r} has no volumes: no cached CT-RATE volume has a {task} text.")
            if task in ("semantic", "referring", "interactive") and not self.seg_volumes:
                raise InputError(f"task {task!r} needs a segmentation cache with at least one labelled structure.")
        if "referring" in self.tasks and self.terms is None:
            raise InputError("task 'referring' needs the term dictionary (term_dictionary.json).")

    def set_epoch(self, epoch: int) -> None:
        """Draw another set of samples (as DistributedSampler.set_epoch does for ordering)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        task = self.tasks[int(rng.choice(len(self.tasks), p=self.probabilities))]
        if task in ("report", "vqa"):
            return self._text_sample(task, rng)
        return self._segmentation_sample(task, rng)

    def _encode(self, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
        config = self.model_config
        return encode_conversation(self.tokenizer, config.system_prompt, turns, config.projector.out_tokens)

    def _text_sample(self, task: str, rng: np.random.Generator) -> Sample:
        names = sorted(self.reports if task == "report" else self.vqa)
        name = names[int(rng.integers(len(names)))]
        cached = self.text_cache.load(name)
        if task == "report":
            turns = [(report_prompt(rng, phrasings=self.phrasings), self.reports[name])]
        else:
            pairs = self.vqa[name]
            turns = [pairs[int(rng.integers(len(pairs)))]]
        ids, labels = self._encode(turns)
        image, sam_image, _ = self._augment(cached.image, cached.sam_image, None, rng)
        return Sample(torch.from_numpy(image)[None], torch.from_numpy(sam_image), ids, labels)

    def _augment(
        self, image: np.ndarray, sam_image: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return augment(image, sam_image, masks, rng) if self.augmentation else (image, sam_image, masks)

    def _segmentation_sample(self, task: str, rng: np.random.Generator) -> Sample:
        name = self.seg_volumes[int(rng.integers(len(self.seg_volumes)))]
        cached = self.seg_cache.load(name)
        cached.image, cached.sam_image, cached.masks = self._augment(cached.image, cached.sam_image, cached.masks, rng)
        cached.sam_image, cached.masks = self._slice_window(cached.sam_image, cached.masks, rng)
        # structures still visible on the model grid (a tiny one can vanish when the volume is shrunk)
        present = [c for c in self.seg_cache.entries[name]["present"] if cached.masks[cached.categories.index(c)].any()]
        if task == "referring":
            present = [c for c in present if c.replace("_", " ") in self.terms] or present
        if not present:
            raise InputError(f"{name}: no labelled structure is left on the model grid; drop it from the cache.")
        count = min(self.interactive_objects if task == "interactive" else self.objects_per_sample, len(present))
        turns, targets = [], []
        for index in rng.choice(len(present), size=count, replace=False):
            category = present[int(index)]
            mask = cached.masks[cached.categories.index(category)]
            spoken = category.replace("_", " ")  # TotalSegmentator names use underscores, the term dictionary spaces
            spoken_to = True
            if task == "interactive":
                turn, spoken_to = self._interactive_turn(spoken, rng)
                turns.append(turn)
            else:
                terms = self.terms if task == "referring" and spoken in self.terms else None
                turns.append(segmentation_prompt(spoken, rng, terms=terms, phrasings=self.phrasings))
            prompts = self._prompts(mask, rng) if task == "interactive" else ((), ())
            mask_t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
            targets.append(SegTarget(mask_t, *prompts, language=spoken_to))
        ids, labels = self._encode(turns)
        image = torch.from_numpy(np.ascontiguousarray(cached.image))[None]
        return Sample(image, torch.from_numpy(np.ascontiguousarray(cached.sam_image)), ids, labels, targets)

    def _interactive_turn(self, spoken: str, rng: np.random.Generator) -> tuple[tuple[str, str], bool]:
        """The (question, answer) of an interactive target and whether its ``[SEG]`` state prompts SAM2: the
        semantic or referring text that goes with its prompts (referring only where the term dictionary
        describes it), or a prompt-only target, whose points or box segment alone (the generic question only
        carries its mask in the batch's one-``[SEG]``-per-target format)."""
        if rng.random() < self.prompt_only_share:
            return prompt_only_prompt(rng, phrasings=self.phrasings), False
        share = self.interactive_referring_share
        # no draw at share 0: configurations without referring text sample exactly as before it existed
        described = share > 0 and self.terms is not None and spoken in self.terms
        terms = self.terms if described and rng.random() < share else None
        return segmentation_prompt(spoken, rng, terms=terms, phrasings=self.phrasings), True

    def _slice_window(self, sam_image: np.ndarray, masks: np.ndarray,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """SAM2's input and the masks cut to ``slice_window`` consecutive slices at a random depth where some
        structure shows (SAM2 trains on 8-frame clips the same way); the ViT keeps the whole volume."""
        depth = sam_image.shape[0]
        if not self.slice_window or self.slice_window >= depth:
            return sam_image, masks
        starts = [z for z in range(depth - self.slice_window + 1) if masks[:, z : z + self.slice_window].any()]
        start = int(rng.choice(starts)) if starts else 0
        window = slice(start, start + self.slice_window)
        return sam_image[window], masks[:, window]

    def _prompts(
        self, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[tuple[PointPrompt, ...], tuple[BoxPrompt, ...]]:
        """Points (with odds ``point_share``) or a box on the model grid, as the paper's evaluation synthesises them."""
        if rng.random() < self.point_share:
            return tuple(synthesize_points(mask, rng)), ()
        return (), (synthesize_box(mask, rng),)


def collate(samples: list[Sample], pad_id: int) -> Batch:
    """Right-pad token rows and stack images into a :class:`Batch`."""
    length = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), length), dtype=torch.long)
    for row, s in enumerate(samples):
        ids[row, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[row, : len(s.labels)] = torch.tensor(s.labels)
        mask[row, : len(s.input_ids)] = 1
    image = torch.stack([s.image for s in samples])
    sam_image = torch.stack([s.sam_image for s in samples])
    return Batch(image, sam_image, ids, mask, labels, [s.targets for s in samples])
