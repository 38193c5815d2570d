"""The parts of MedVL-SAM2 on tiny geometry: ViT, projectors, tokenizers and chat format, SAM2 over slices."""

from __future__ import annotations

import pytest
import torch

from MedVLSAM2Lib.config import ProjectorConfig, preset
from MedVLSAM2Lib.model.language import (
    IGNORE_INDEX,
    ChatTokens,
    apply_lora,
    build_causal_lm,
    build_tokenizer,
    encode_conversation,
)
from MedVLSAM2Lib.model.medvlsam2 import SegTokenProjector
from MedVLSAM2Lib.model.projector import build_projector
from MedVLSAM2Lib.model.segmenter import SlicePrompts, VolumeSegmenter, prepare_slices
from MedVLSAM2Lib.model.vision import VisionEncoder3D


def test_vision_encoder_drops_cls_and_keeps_m3d_clip_keys():
    config = preset("tiny").vision
    encoder = VisionEncoder3D(config)
    tokens = encoder(torch.rand(2, 1, *config.img_size))
    assert tokens.shape == (2, config.num_tokens, config.hidden_size)
    keys = set(encoder.state_dict())
    assert {"cls_token", "patch_embedding.position_embeddings", "patch_embedding.patch_embeddings.1.weight",
            "blocks.0.attn.qkv.weight", "blocks.1.mlp.linear2.bias", "norm.weight"} <= keys  # fmt: skip
    assert len(keys) == 4 + 11 * config.num_layers + 2  # exactly M3D-CLIP's layout (138 tensors for ViT-B)


def test_gradient_checkpointing_gives_the_same_gradients():
    config = preset("tiny").vision
    torch.manual_seed(0)
    plain = VisionEncoder3D(config)
    config.gradient_checkpointing = True
    checkpointed = VisionEncoder3D(config)
    checkpointed.load_state_dict(plain.state_dict())
    image = torch.rand(1, 1, *config.img_size)
    for model in (plain, checkpointed):
        model(image).square().sum().backward()
    torch.testing.assert_close(plain.blocks[0].attn.qkv.weight.grad, checkpointed.blocks[0].attn.qkv.weight.grad)


@pytest.mark.parametrize("kind", ["mixer", "mlp", "linear"])
def test_projectors_map_vision_tokens_to_llm_tokens(kind):
    projector = build_projector(
        ProjectorConfig(kind=kind, out_tokens=16), tokens_in=64, channels_in=32, channels_out=48
    )
    assert projector(torch.rand(2, 64, 32)).shape == (2, 16, 48)


def test_paper_projector_is_eq2_with_table8_parameter_count(paper_facts):
    """One mixer layer: LN(768) → channel MLP 768→2048→2048 → LN(2048) → token MLP 2048→512→512."""
    config = preset("paper")
    with torch.device("meta"):
        projector = build_projector(config.projector, 2048, 768, config.language.hidden_size)
        tokens = projector(torch.empty(1, 2048, 768))
    assert tokens.shape == (1, 512, 2048)
    (layer,) = projector.layers
    assert [tuple(p.shape) for p in layer.parameters()] == [
        (768,), (768,), (2048, 768), (2048,), (2048, 2048), (2048,),  # channel mixing
        (2048,), (2048,), (512, 2048), (512,), (512, 512), (512,),  # token mixing
    ]  # fmt: skip
    count = sum(p.numel() for p in projector.parameters())
    assert count == 7_088_640
    table8 = paper_facts["tables"]["8_module_sizes"]["rows"]["Projection Layer"]
    assert [f"{count / 1e6:.2f}M", f"{count * 2 / 2**20:.2f} MB"] == table8  # bf16 MiB


@pytest.mark.parametrize("tied", [True, False])
def test_lm_is_tied_as_configured_and_trains_the_new_token_rows_of_its_output_head(tied):
    config = preset("tiny").language
    config.tie_word_embeddings = tied
    tokenizer = build_tokenizer("tiny")
    tokens = ChatTokens.of(tokenizer)
    torch.manual_seed(0)
    lm = build_causal_lm(config, len(tokenizer), tokens)
    assert (lm.lm_head.weight is lm.model.embed_tokens.weight) is tied
    new_rows = sorted([tokens.seg, tokens.image])
    lm = apply_lora(lm, config, new_rows)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad and "lora_" not in n}
    rows = "base_model.model.{}.token_adapter.trainable_tokens_delta.default"
    assert trainable == {rows.format("model.embed_tokens")} | (set() if tied else {rows.format("lm_head")})
    head = lm.get_base_model().lm_head
    before = head.weight.detach().clone()  # the merged matrix the forward pass uses
    ids = torch.tensor([[tokens.im_start, 5, 6, tokens.seg, tokens.im_end]])
    lm(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=1.0).step()
    changed = (head.weight.detach() != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == new_rows  # only the new tokens' rows of the output head learn, tied or not


def test_real_qwen2_tokenizer_round_trips_and_keeps_qwen_ids():
    tokenizer = build_tokenizer("qwen")
    tokens = ChatTokens.of(tokenizer)
    assert (tokens.pad, tokens.im_start, tokens.im_end) == (151643, 151644, 151645)
    assert tokens.seg == 151646 and tokens.image == 151647
    text = "Findings: 3 mm nodule in the right lower lobe. 无 [SEG] <|im_end|>\n  indented"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer("[SEG]", add_special_tokens=False)["input_ids"] == [tokens.seg]
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]  # Qwen2 BPE ranks


def test_conversation_supervises_answers_only():
    tokenizer = build_tokenizer("tiny")
    ids, labels = encode_conversation(tokenizer, "sys", [("Segment the liver.", "It is [SEG]."), ("And?", "Done.")], 4)
    tokens = ChatTokens.of(tokenizer)
    assert ids.count(tokens.image) == 4 and len(ids) == len(labels)
    supervised = tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX])
    assert supervised == "It is [SEG].<|im_end|>Done.<|im_end|>"
    prompt, _ = encode_conversation(tokenizer, "sys", [("Segment the liver.", None)], 4)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def _segment(segmenter, volume, language):
    segmenter.eval()
    with torch.no_grad():
        return torch.sigmoid(segmenter(segmenter.encode(prepare_slices(volume, 128)), language).mask_logits)


@pytest.mark.parametrize("memory", [True, False])
def test_memory_carries_information_to_the_next_slice(memory):
    """Changing slice k changes slice k+1's mask only when memory attention is on."""
    torch.manual_seed(0)
    segmenter = VolumeSegmenter(preset("tiny").segmenter, memory=memory)
    volume = torch.rand(8, 64, 64)
    language = torch.randn(1, 64)
    k = 8 // 2  # the conditioning slice when no point/box prompt is given; slice k + 1 is tracked from it
    changed = volume.clone()
    changed[k] = torch.rand(64, 64)
    before, after = _segment(segmenter, volume, language), _segment(segmenter, changed, language)
    difference = (before[0, k + 1] - after[0, k + 1]).abs().max().item()
    assert (difference > 1e-4) if memory else (difference == 0.0)
    assert (before[0, k] - after[0, k]).abs().max().item() > 1e-4  # the changed slice itself always changes


def test_segmenter_gradients_reach_the_language_token():
    torch.manual_seed(0)
    segmenter = VolumeSegmenter(preset("tiny").segmenter)
    language = torch.randn(2, 64, requires_grad=True)
    out = segmenter(segmenter.encode(prepare_slices(torch.rand(4, 64, 64), 128)), language)
    assert out.mask_logits.shape == (2, 4, 32, 32) and out.object_logits.shape == (2, 4)
    (out.mask_logits.clamp(-30, 30).mean() + out.object_logits.mean()).backward()
    assert language.grad.abs().sum() > 0


def test_backward_sweep_does_not_read_slices_beyond_the_conditioning_slice():
    torch.manual_seed(0)
    segmenter = VolumeSegmenter(preset("tiny").segmenter)
    volume = torch.rand(8, 64, 64)
    language = torch.randn(1, 64)
    c = 8 // 2
    changed = volume.clone()
    changed[c + 2] = torch.rand(64, 64)
    before, after = _segment(segmenter, volume, language), _segment(segmenter, changed, language)
    assert torch.equal(before[0, : c + 1], after[0, : c + 1])  # slices <= c never see slice c + 2
    assert not torch.equal(before[0, c + 3], after[0, c + 3])  # but slice c + 3 does, through memory


def test_prompts_alone_give_the_tracked_slices_the_prompted_slices_object_pointer():
    """Without a [SEG] embedding, tracked slices get the conditioning slice's object pointer as their object token
    (``prompt_object_token``, the tiny preset) or nothing (SAM2's own mode); the prompted slice is the same."""
    torch.manual_seed(0)
    config = preset("tiny").segmenter
    segmenter = VolumeSegmenter(config).eval()
    features = segmenter.encode(prepare_slices(torch.rand(6, 64, 64), 128))
    prompts = {2: SlicePrompts(torch.tensor([[[40.0, 50.0], [44.0, 52.0]]]), torch.tensor([[1, 1]]))}
    seen = []
    encoder = segmenter.sam.sam_prompt_encoder
    hook = encoder.register_forward_hook(lambda m, i, out: seen.append(m.language_tokens))
    with torch.no_grad():
        with_token = segmenter(features, None, prompts).mask_logits
        config.prompt_object_token = False
        without = segmenter(features, None, prompts).mask_logits
    hook.remove()
    assert seen[0] is None and all(t is not None and t.shape == (1, 1, 64) for t in seen[1:6])
    assert all(t is None for t in seen[6:]) and encoder.language_tokens is None
    assert torch.equal(with_token[:, 2], without[:, 2]) and not torch.equal(with_token[:, 3], without[:, 3])
    with pytest.raises(ValueError, match="needs point or box prompts"):
        segmenter(features, None, {})


def test_decoder_logits_are_the_mask_logits_before_the_object_score_gate():
    torch.manual_seed(1)
    segmenter = VolumeSegmenter(preset("tiny").segmenter).eval()
    features, language = segmenter.encode(prepare_slices(torch.rand(6, 64, 64), 128)), torch.randn(3, 64)
    with torch.no_grad():
        # a fresh head scores every slice as showing the object; shift it so that the gate closes on some
        median = segmenter(features, language).object_logits.median()
        segmenter.sam.sam_mask_decoder.pred_obj_score_head.layers[-1].bias -= median
        out = segmenter(features, language)
    shown = out.object_logits > 0
    assert shown.any() and (~shown).any()
    torch.testing.assert_close(out.mask_logits[shown], out.decoder_logits[shown])
    assert (out.mask_logits[~shown] == -1024.0).all()
    assert (out.decoder_logits[~shown] != -1024.0).all()  # the loss still sees the decoder on gated slices


def test_seg_token_projector_gives_prompts_on_the_scale_of_sam2_prompt_embeddings():
    torch.manual_seed(0)
    segmenter = VolumeSegmenter(preset("tiny").segmenter)
    sam_prompt = segmenter.sam.sam_prompt_encoder.point_embeddings[0].weight  # unit normal, SAM2's init
    hidden = torch.nn.functional.rms_norm(torch.randn(256, 128), (128,))  # the LLM's final-norm output scale
    prompt = SegTokenProjector(128, sam_prompt.shape[1])(hidden)
    rms = prompt.pow(2).mean().sqrt().item()
    assert 0.5 < rms < 3.0, rms  # PyTorch's default Linear init gives ~0.25, which SAM2's decoder ignores at first


def test_random_sam2_features_say_where_they_are():
    """A uniform slice gives spatially varying features once Hiera's position embedding is not zero (as ``sam2``
    leaves it); a fixed draw, so two builds with the same seed agree."""
    torch.manual_seed(0)
    segmenter = VolumeSegmenter(preset("tiny").segmenter).eval()
    trunk = segmenter.sam.image_encoder.trunk
    assert 0.8 < float(trunk.pos_embed.detach().std()) < 1.2
    torch.manual_seed(0)
    again = VolumeSegmenter(preset("tiny").segmenter)
    pairs = zip(segmenter.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    uniform = prepare_slices(torch.full((1, 64, 64), 0.5), 128)

    def spatial_spread() -> float:
        with torch.no_grad():
            top = segmenter.encode(uniform)["feats"][-1]  # (HW, 1, C) of the lowest resolution
            inner = top.reshape(8, 8, -1)[2:6, 2:6]  # away from the zero-padded border
        return float(inner.std(dim=(0, 1)).mean() / inner.abs().mean())

    positional = spatial_spread()
    with torch.no_grad():
        trunk.pos_embed.zero_()
    assert positional > 5 * spatial_spread()
