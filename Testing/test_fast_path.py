"""The fast inference path (issue 17) on the tiny preset, CPU, a real CT: LoRA merged into the base weights, greedy
decoding on a static KV cache, and the ``[SEG]`` states read while decoding. It must give what the reference path
(LoRA unmerged, transformers' ``generate``, a second forward pass over the answer) gives.

The LoRA B matrices and the new token rows are made non-zero: with peft's initialisation (B = 0) a merge that did
nothing, or did it wrong, could not be seen. Tolerances (float32 on the CPU): merging adds ``B·A·scale`` into ``W``,
which moves each product by rounding only, about 1e-7 relative per layer; the static cache attends over a padded
buffer with an explicit mask where one full pass uses the causal kernel, another rounding-level difference. Logits
are compared to 1e-5 of their largest magnitude (measured: 2e-6) and ``[SEG]`` states (RMS-normalised, of order 1)
to 1e-4 absolute (measured: 5e-6): margins for other CPUs' kernels, and far below any real error (the LoRA moves
these logits by 4.6, a missing token row or delta by whole units). Mask probabilities travel as float16 (1e-3).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.demo import default_inputs
from MedVLSAM2Lib.engine import ANSWER_TOKENS, SEGMENT_TOKENS, InferenceEngine, segmentation_question
from MedVLSAM2Lib.errors import Cancelled, InputError
from MedVLSAM2Lib.metrics import dice
from MedVLSAM2Lib.model.medvlsam2 import MedVLSAM2Model
from MedVLSAM2Lib.templates import load_templates, vqa_question
from MedVLSAM2Lib.volume import Volume, read_volume

REPORT_TOKENS = 96
QUESTIONS = {  # (question, history, max_new_tokens): what the engine asks for a report, the answer kinds, a mask
    "report": (load_templates().report_questions[0], (), REPORT_TOKENS),
    "short": (vqa_question("Is there a pleural effusion?", "short"), (), ANSWER_TOKENS["short"]),
    "long": (vqa_question("Describe the lungs.", "long"), (), ANSWER_TOKENS["long"]),
    "choice": (vqa_question("Which lung is larger? (a) left (b) right", "choice"), (), ANSWER_TOKENS["choice"]),
    "segment": (segmentation_question("liver"), (), SEGMENT_TOKENS),
    "chat": ("And the heart?", (("Is the liver enlarged?", "No."),), ANSWER_TOKENS["short"]),
}
LOGIT_RTOL = 1e-5  # of the largest |logit|
STATE_ATOL = 1e-4


def _trained_lora_model() -> MedVLSAM2Model:
    """The tiny preset (seeded) with random LoRA B matrices and moved [SEG]/<image> rows: a LoRA that does something."""
    torch.manual_seed(0)
    model = MedVLSAM2Model(preset("tiny"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.llm.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
            if "trainable_tokens_delta" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


class _ForcedHead(nn.Module):
    """The output head, with chosen tokens forced at chosen calls (call n gives the n-th new token, prefill or step)."""

    def __init__(self, head: nn.Module, forced: dict[int, int]) -> None:
        super().__init__()
        self.head, self.forced, self.calls = head, forced, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        if self.calls in self.forced:
            logits[..., self.forced[self.calls]] = logits.max() + 10.0
        self.calls += 1
        return logits


def _force(model: MedVLSAM2Model, forced: dict[int, int]) -> _ForcedHead:
    base = model.llm.get_base_model()
    base.lm_head = _ForcedHead(base.lm_head, forced)
    return base.lm_head


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[int]:
    """A list that grows by one at every call of ``owner.name``."""
    calls: list[int] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


@pytest.fixture(scope="module")
def volume() -> Volume:
    return read_volume(default_inputs()[0])


@pytest.fixture(scope="module")
def engines(volume) -> dict[str, tuple[InferenceEngine, object]]:  # noqa: ANN001
    """The fast and the reference engine over the same weights, each with the CT encoded."""
    out = {}
    for name, fast in (("fast", True), ("plain", False)):
        engine = InferenceEngine(_trained_lora_model(), fast=fast)
        out[name] = (engine, engine._entry(engine.encode(volume)))
    return out


@pytest.mark.parametrize("task", QUESTIONS)
def test_the_fast_path_gives_the_reference_paths_greedy_tokens_and_streamed_pieces(engines, task):
    question, history, max_new_tokens = QUESTIONS[task]
    (fast, fast_entry), (plain, plain_entry) = engines["fast"], engines["plain"]
    assert fast.model.lora_merged and not plain.model.lora_merged
    assert torch.equal(fast_entry.visual, plain_entry.visual)
    pieces: dict[str, list[str]] = {"fast": [], "plain": []}
    _, fast_ids = fast._generate(fast_entry, question, history, max_new_tokens, pieces["fast"].append)
    _, plain_ids = plain._generate(plain_entry, question, history, max_new_tokens, pieces["plain"].append)
    assert list(fast_ids) == list(plain_ids) and len(fast_ids) >= min(max_new_tokens, 8)
    assert fast_ids.seg_states is not None and plain_ids.seg_states is None  # only the fast path read them
    assert pieces["fast"] == pieces["plain"] and "".join(pieces["fast"]) == fast.model.tokenizer.decode(fast_ids)


def test_merged_lora_gives_the_unmerged_logits_and_the_trained_token_rows(volume):
    model = _trained_lora_model().eval()
    engine = InferenceEngine(model, fast=False)
    entry = engine._entry(engine.encode(volume))
    prompt = model.prompt_ids(segmentation_question("liver"))
    ids = torch.tensor([prompt + model.tokenizer("It is [SEG].", add_special_tokens=False)["input_ids"]])
    weights = {name: p.detach().clone() for name, p in model.llm.named_parameters()}
    with torch.inference_mode():
        unmerged = model.llm(inputs_embeds=model.embed(None, ids, entry.visual)).logits
        model.merge_lora()
        assert model.lora_merged
        merged = model.llm(inputs_embeds=model.embed(None, ids, entry.visual)).logits
        seg_row = model.llm.get_base_model().model.embed_tokens.token_adapter.base_layer.weight[model.tokens.seg]
    scale = unmerged.abs().max().item()
    assert (merged - unmerged).abs().max().item() <= LOGIT_RTOL * scale
    delta = model.llm.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert torch.equal(seg_row, delta[0])  # peft's trained [SEG] row is what the merged embedding (and tied head) hold
    model.unmerge_lora()
    for name, parameter in model.llm.named_parameters():  # back to the weights, up to one float32 rounding
        torch.testing.assert_close(parameter, weights[name], rtol=0, atol=1e-6 * max(weights[name].abs().max(), 1))


def test_a_merged_model_never_trains_merged_and_refuses_to_save_merged_weights():
    model = _trained_lora_model()
    with pytest.raises(InputError, match="training mode"):
        model.merge_lora()
    engine = InferenceEngine(model)
    assert engine.model.lora_merged and not model.training
    with pytest.raises(InputError, match=r"unmerge_lora\(\)"):
        model.state_dict()
    model.train()
    assert not model.lora_merged and model.training
    assert model.state_dict().keys()


@pytest.mark.parametrize(
    ("forced", "max_new_tokens", "extra_forward"),
    [
        ({1: "seg", 4: "seg"}, 7, False),  # two [SEG] inside the answer
        ({2: "seg", 5: "seg"}, 6, True),  # the last token is [SEG]: one more forward reads its state
        ({3: "seg", 4: "end"}, 9, False),  # [SEG] then <|im_end|>: its state comes from the step that ended
    ],
)
def test_seg_states_read_while_decoding_equal_a_full_forward_pass(volume, forced, max_new_tokens, extra_forward):
    model = _trained_lora_model().eval()
    engine = InferenceEngine(model)
    entry = engine._entry(engine.encode(volume))
    tokens = {"seg": model.tokens.seg, "end": model.tokens.im_end}
    _force(model, {step: tokens[name] for step, name in forced.items()})
    prompt = model.prompt_ids(segmentation_question("liver"))
    forwards = []
    hook = model._decoder().register_forward_hook(lambda *_: forwards.append(1))
    try:
        answer = model.generate(None, prompt, max_new_tokens=max_new_tokens, visual=entry.visual)
    finally:
        hook.remove()
    positions = [n for n, token in enumerate(answer) if token == model.tokens.seg]
    assert {step for step, name in forced.items() if name == "seg"} <= set(positions)  # and any the model chose
    assert (answer[-1] == model.tokens.seg and len(answer) == max_new_tokens) == extra_forward
    assert len(forwards) == len(answer) + extra_forward  # one per token, and one for a trailing [SEG]
    model.unmerge_lora()  # the reference: the unmerged model's full pass, as segment_answer runs it without states
    ids = torch.tensor([prompt + list(answer)])
    with torch.inference_mode():
        hidden = model.hidden_states(model.embed(None, ids, entry.visual), torch.ones_like(ids))[0]
    expected = hidden[[len(prompt) + n for n in positions]]
    assert answer.seg_states.shape == expected.shape
    torch.testing.assert_close(answer.seg_states, expected, rtol=0, atol=STATE_ATOL)


def test_text_segmentation_gives_the_reference_paths_masks_without_a_second_pass(volume, monkeypatch):
    results = {}
    for name, fast in (("fast", True), ("plain", False)):
        model = _trained_lora_model()
        head = _force(model, {2: model.tokens.seg, 4: model.tokens.seg, 5: model.tokens.im_end})
        engine = InferenceEngine(model, fast=fast)
        handle = engine.encode(volume)
        passes = _count_calls(monkeypatch, model, "hidden_states")
        head.calls = 0
        results[name] = engine.segment(handle, text="liver", probabilities=True)
        assert len(passes) == (0 if fast else 1)  # the fast path reads the [SEG] states while decoding
    fast, plain = results["fast"], results["plain"]
    assert fast.answer == plain.answer and fast.answer.count("[SEG]") == len(fast.objects) >= 2
    for ours, theirs in zip(fast.objects, plain.objects, strict=True):
        assert ours.label == theirs.label
        assert dice(ours.mask, theirs.mask) >= 0.999
        np.testing.assert_allclose(ours.probabilities.astype(np.float32), theirs.probabilities, atol=1e-3)
        assert ours.score == pytest.approx(theirs.score, abs=1e-4)


def test_the_fast_path_checks_cancel_before_the_first_forward_and_after_every_token(engines):
    engine, entry = engines["fast"]
    forwards = []
    hook = engine.model._decoder().register_forward_hook(lambda *_: forwards.append(1))
    cancel = threading.Event()
    cancel.set()
    try:
        with pytest.raises(Cancelled):
            engine._generate(entry, "Is there a pleural effusion?", (), 8, None, cancel)
        assert forwards == []
        cancel.clear()
        with pytest.raises(Cancelled):
            engine._generate(entry, "Is there a pleural effusion?", (), 8, lambda _: cancel.set(), cancel)
        assert len(forwards) == 1  # the callback of the first token set it: no second token was computed
    finally:
        hook.remove()
    _, again = engine._generate(entry, "Is there a pleural effusion?", (), 8, None)  # the engine still generates
    assert 1 <= len(again) <= 8
