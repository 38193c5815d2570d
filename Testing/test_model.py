"""The unified model on the tiny preset: mixed batches, gradients, stage freezing, generation."""

from __future__ import annotations

import pytest
import torch

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.data.mixture import Sample, collate
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.model.language import encode_conversation
from MedVLSAM2Lib.model.medvlsam2 import STAGE_PARTS, MedVLSAM2Model, SegTarget
from MedVLSAM2Lib.prompts import BoxPrompt, PointPrompt


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MedVLSAM2Model(preset("tiny"))


def _batch(model, conversations, targets):
    config = model.config
    torch.manual_seed(1)
    images = torch.rand(len(conversations), 1, *config.vision.img_size)
    samples = []
    for image, turns, objects in zip(images, conversations, targets, strict=True):
        ids, labels = encode_conversation(model.tokenizer, config.system_prompt, turns, config.projector.out_tokens)
        samples.append(Sample(image, image[0].clone(), ids, labels, objects))
    return collate(samples, model.tokens.pad)


def _mixed_batch(model):
    depth, height, width = model.config.vision.img_size
    truth = torch.zeros(depth, height, width)
    truth[5:11, 20:40, 24:44] = 1
    points = (PointPrompt((30.0, 28.0, 7.0)), PointPrompt((5.0, 5.0, 7.0), label=0))
    return _batch(
        model,
        [
            [("Describe the findings of the medical image you see.", "Findings: no acute abnormality.")],
            [("Can you segment the liver in this image?", "It is [SEG].")],
            [("Segment the spleen here, please.", "Sure, [SEG].")],
        ],
        [[], [SegTarget(truth)], [SegTarget(truth, points=points, boxes=(BoxPrompt((20, 18, 6), (45, 42, 6)),))]],
    )


def _grad_norm(parameters):
    return sum(float(p.grad.abs().sum()) for p in parameters if p.grad is not None)


def test_mixed_batch_gives_finite_losses_and_gradients_everywhere_trained(tiny_model):
    model = tiny_model
    model.set_trainable(STAGE_PARTS[3])
    model.zero_grad()
    out = model(_mixed_batch(model))
    for name in ("loss", "text_loss", "bce_loss", "dice_loss", "object_loss"):
        assert torch.isfinite(getattr(out, name)), name
    weights = model.config.loss
    expected = weights.text_weight * out.text_loss + weights.mask_weight * (
        out.bce_loss + weights.dice_weight * out.dice_loss + out.object_loss
    )
    torch.testing.assert_close(out.loss, expected)
    assert out.mask_logits.shape == (2, *model.config.vision.img_size)
    out.loss.backward()
    assert _grad_norm(model.projector.parameters()) > 0
    assert _grad_norm(p for n, p in model.llm.named_parameters() if "lora_" in n) > 0
    assert _grad_norm(model.seg_projector.parameters()) > 0
    assert _grad_norm(model.segmenter.sam.sam_mask_decoder.parameters()) > 0
    delta = next(p for n, p in model.llm.named_parameters() if "trainable_tokens_delta" in n)
    adapter = model.llm.base_model.model.model.embed_tokens.token_adapter
    seg_row = adapter.token_indices["default"].index(model.tokens.seg)
    assert delta.grad[seg_row].abs().sum() > 0  # the [SEG] embedding row learns
    frozen_base = [p for n, p in model.llm.named_parameters() if "lora_" not in n and "trainable_tokens" not in n]
    assert all(not p.requires_grad and p.grad is None for p in frozen_base)


def test_stage_one_trains_the_projector_only(tiny_model):
    model = tiny_model
    model.set_trainable(STAGE_PARTS[1])
    model.zero_grad()
    model(_mixed_batch(model)).loss.backward()
    assert _grad_norm(model.projector.parameters()) > 0
    for module in (model.vision, model.llm, model.seg_projector, model.segmenter):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    model.set_trainable(STAGE_PARTS[3])


def test_batch_without_masks_keeps_every_trainable_parameter_in_the_graph(tiny_model):
    model = tiny_model
    model.set_trainable(STAGE_PARTS[3] | {"sam_memory", "sam_image_encoder"})
    model.zero_grad()
    batch = _batch(model, [[("Describe the findings.", "Findings: normal.")]], [[]])
    model(batch).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # what DDP needs; the mask part of the loss is zero-weighted
    model.set_trainable(STAGE_PARTS[3])


def test_prompt_only_targets_segment_without_their_seg_state_and_keep_it_in_the_graph(tiny_model):
    model = tiny_model
    model.set_trainable(STAGE_PARTS[3] | {"sam_memory"})
    depth, height, width = model.config.vision.img_size
    truth = torch.zeros(depth, height, width)
    truth[5:11, 20:40, 24:44] = 1
    points = (PointPrompt((30.0, 28.0, 7.0)),)
    conversation = [[("Segment the marked structure in this image.", "It is [SEG].")]]
    model.zero_grad()
    out = model(_batch(model, conversation, [[SegTarget(truth, points=points, language=False)]]))
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [] and torch.isfinite(out.loss)  # DDP needs every parameter's gradient, zero or not
    assert _grad_norm(model.seg_projector.parameters()) == 0  # the [SEG] state does not reach SAM2
    assert _grad_norm(model.segmenter.sam.sam_prompt_encoder.parameters()) > 0
    model.eval()
    sam_image, target = torch.rand(1, depth, height, width), SegTarget(points=points)
    alone = model.segment_prompts(sam_image, target)
    states = torch.randn(2, 1, model.config.language.hidden_size)
    with torch.inference_mode():  # whatever the [SEG] state, an object with language off gets the same mask
        off = [model._segment_objects(sam_image[0], s, [SegTarget(points=points, language=False)])[0] for s in states]
        on = [model._segment_objects(sam_image[0], s, [target])[0] for s in states]
    assert torch.equal(off[0], off[1]) and torch.allclose(torch.sigmoid(off[0]), alone.probabilities)
    assert not torch.equal(on[0], on[1])
    with pytest.raises(InputError, match="needs point or box prompts"):
        model.segment_prompts(sam_image, SegTarget())
    model.train()
    model.set_trainable(STAGE_PARTS[3])


def test_sam2_parts_cover_every_used_parameter_once(tiny_model):
    from MedVLSAM2Lib.model.medvlsam2 import UNUSED_SAM2

    groups = [tiny_model.part_parameters(p) for p in ("sam_decoder", "sam_memory", "sam_image_encoder")]
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids))  # disjoint
    used = {id(p) for n, p in tiny_model.segmenter.sam.named_parameters() if not n.startswith(UNUSED_SAM2)}
    assert set(ids) == used


def test_seg_token_count_must_match_targets(tiny_model):
    batch = _batch(tiny_model, [[("Segment the liver.", "It is [SEG].")]], [[]])
    with pytest.raises(InputError, match=r"1 \[SEG\] tokens but 0 targets"):
        tiny_model(batch)


def test_streamed_pieces_join_to_the_answer_when_a_character_spans_tokens(tiny_model):
    from MedVLSAM2Lib.model.medvlsam2 import _CallbackStreamer

    tokenizer = tiny_model.tokenizer
    ids = tokenizer("a\u0769b \u65e0.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids[1:2]) == "\ufffd"  # the tiny tokenizer splits these characters into bytes
    pieces: list[str] = []
    streamer = _CallbackStreamer(tokenizer, pieces.append)
    streamer.put(torch.tensor([]))  # the prompt
    for token in ids:
        streamer.put(torch.tensor([token]))
    streamer.end()
    assert "".join(pieces) == tokenizer.decode(ids) == "a\u0769b \u65e0." and "\ufffd" not in "".join(pieces)


def test_generation_streams_and_segments_from_seg_tokens(tiny_model):
    model = tiny_model.eval()
    image = torch.rand(1, 1, *model.config.vision.img_size)
    prompt = model.prompt_ids("Can you segment the liver in this image?")
    pieces = []
    answer = model.generate(image, prompt, max_new_tokens=6, on_token=pieces.append)
    assert 1 <= len(answer) <= 6 and "".join(pieces) == model.tokenizer.decode(answer)
    forced = model.tokenizer("It is [SEG].", add_special_tokens=False)["input_ids"]
    masks = model.segment_answer(image, image[:, 0], prompt, forced)
    probs = masks.probabilities
    assert probs.shape == (1, *model.config.vision.img_size) and 0 <= probs.min() and probs.max() <= 1
    assert masks.object_scores.shape == (1, model.config.vision.img_size[0])
    visual, features = model.visual_tokens(image), model.sam_features(image[0, 0])
    cached = model.segment_answer(None, image[:, 0], prompt, forced, visual=visual, features=features)
    assert torch.allclose(cached.probabilities, probs, atol=1e-6)  # cached encodings give the same masks
    assert model.segment_answer(image, image[:, 0], prompt, model.tokenizer("No.")["input_ids"]) is None
    beams = model.generate(image, prompt, max_new_tokens=4, num_beams=2)
    assert 1 <= len(beams) <= 4
    torch.manual_seed(0)
    first = model.generate(image, prompt, max_new_tokens=5, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    assert model.generate(image, prompt, max_new_tokens=5, do_sample=True, temperature=1.5) == first
    model.train()


def test_only_the_new_answer_seg_tokens_are_segmented_and_typed_seg_is_text(tiny_model):
    model = tiny_model.eval()
    image = torch.rand(1, 1, *model.config.vision.img_size)
    history = (("Can you segment the liver in this image?", "It is [SEG]."),)
    prompt = model.prompt_ids("And the spleen?", history)
    assert prompt.count(model.tokens.seg) == 1  # the earlier answer's
    answer = model.tokenizer("Sure, [SEG].", add_special_tokens=False)["input_ids"]
    assert model.segment_answer(image, image[:, 0], prompt, answer).probabilities.shape[0] == 1
    typed = model.prompt_ids("What does [SEG] mean?")
    assert model.tokens.seg not in typed  # a user typing "[SEG]" does not trigger segmentation
    model.train()
