"""Loaders for the real checkpoint layouts (built here at tiny size) and our checkpoint round trip."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.data.mixture import Sample, collate
from MedVLSAM2Lib.errors import WeightsError
from MedVLSAM2Lib.model.language import build_tokenizer, encode_conversation
from MedVLSAM2Lib.model.medvlsam2 import STAGE_PARTS, MedVLSAM2Model
from MedVLSAM2Lib.model.segmenter import build_sam2
from MedVLSAM2Lib.model.vision import VisionEncoder3D
from MedVLSAM2Lib.model.weights import build_model, load_checkpoint, load_language_model, save_checkpoint


def _m3d_clip_checkpoint(path, config):
    """A file with M3D-CLIP's key layout (what `torch.save(vit.state_dict())` wrote for pretrained_ViT.bin)."""
    from monai.networks.nets import ViT

    vit = ViT(1, config.img_size, config.patch_size, config.hidden_size, config.mlp_dim, config.num_layers,
              config.num_heads, proj_type="perceptron", classification=True)  # fmt: skip
    state = {k: v for k, v in vit.state_dict().items() if "classification_head" not in k and "norm_cross_attn" not in k}
    torch.save(state, path)
    return state


def test_m3d_clip_layout_loads_strictly_and_errors_name_the_key(tmp_path):
    config = preset("tiny")
    state = _m3d_clip_checkpoint(tmp_path / "pretrained_ViT.bin", config.vision)
    model = build_model(config, {"vision": tmp_path / "pretrained_ViT.bin"})
    torch.testing.assert_close(model.vision.state_dict()["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])
    broken = dict(state)
    broken.pop("norm.bias")
    broken["cls_token"] = torch.zeros(1, 1, 7)
    torch.save(broken, tmp_path / "broken.bin")
    encoder = VisionEncoder3D(config.vision)
    from MedVLSAM2Lib.model.weights import _torch_load, load_strict

    with pytest.raises(WeightsError, match=r"1 missing keys: norm\.bias.*cls_token: checkpoint \(1, 1, 7\)"):
        load_strict(encoder, _torch_load(tmp_path / "broken.bin"), "broken.bin")
    with pytest.raises(WeightsError, match="no such checkpoint file"):
        build_model(config, {"vision": tmp_path / "absent.bin"})


def test_sam2_checkpoint_layout_loads_strictly(tmp_path):
    config = preset("tiny")
    torch.manual_seed(3)
    reference = build_sam2(config.segmenter)
    torch.save({"model": reference.state_dict()}, tmp_path / "sam2.1_hiera_tiny.pt")
    model = build_model(config, {"sam2": tmp_path / "sam2.1_hiera_tiny.pt"})
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.segmenter.sam.state_dict()[key], value)
    torch.save(reference.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(WeightsError, match="expected a SAM2 checkpoint with a 'model' entry"):
        build_model(config, {"sam2": tmp_path / "bare.pt"})


def _internvl_folder(folder, config):
    """A folder with InternVL2.5's layout: llm_config in config.json, language_model.* tensors, tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer("tiny")
    qwen = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(5)
    lm = Qwen2ForCausalLM(qwen)
    folder.mkdir()
    tensors = {f"language_model.{k}": v.clone() for k, v in lm.state_dict().items() if k != "lm_head.weight"}
    tensors["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)  # InternViT: ignored
    tensors["mlp1.0.weight"] = torch.zeros(4)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"],
                                                    "llm_config": qwen.to_dict(), "vision_config": {}}))  # fmt: skip
    tokenizer.save_pretrained(str(folder))
    return lm


def test_internvl_folder_loads_its_language_model(tmp_path):
    reference = _internvl_folder(tmp_path / "InternVL2_5-4B", preset("tiny"))
    lm, tokenizer = load_language_model(tmp_path / "InternVL2_5-4B")
    assert tokenizer is not None
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(lm.state_dict()[key], value)
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(lm(ids).logits, reference(ids).logits)  # rotary buffers rebuilt, tied head
    model = build_model(preset("tiny"), {"language": tmp_path / "InternVL2_5-4B"})
    assert model.llm.get_base_model().config.hidden_size == 64


def test_internvl_folder_without_language_tensors_is_refused(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    save_file({"vision_model.x": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"llm_config": {"hidden_size": 64}}))
    with pytest.raises(WeightsError, match=r"no 'language_model\.\*' tensors"):
        load_language_model(folder)


def test_checkpoint_round_trips_bit_exactly(tmp_path):
    torch.manual_seed(0)
    model = MedVLSAM2Model(preset("tiny"))
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    folder = save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    torch.manual_seed(99)  # a different random init underneath
    loaded = load_checkpoint(folder)
    reference = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    expected = model.config.to_dict()
    expected["language"]["tokenizer"] = str(folder / "tokenizer")  # the saved tokenizer is used on reload
    assert loaded.config.to_dict() == expected
    with pytest.raises(WeightsError, match="exists"):
        save_checkpoint(model, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors is missing"):
        load_checkpoint(folder)


def test_checkpoint_saved_before_mixer_layers_and_tying_were_fields_loads_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = MedVLSAM2Model(preset("tiny"))  # two mixer layers, tied: what every preset built then
    folder = save_checkpoint(model, tmp_path / "ckpt")
    meta = json.loads((folder / "config.json").read_text())
    del meta["config"]["projector"]["mixer_layers"], meta["config"]["language"]["tie_word_embeddings"]
    (folder / "config.json").write_text(json.dumps(meta))
    loaded = load_checkpoint(folder)
    assert loaded.config.projector.mixer_layers == 2 and loaded.config.language.tie_word_embeddings is True
    reference = model.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key


@pytest.mark.parametrize("variant,yaml", [("tiny", "sam2.1_hiera_t.yaml"), ("large", "sam2.1_hiera_l.yaml")])
def test_our_sam2_build_has_the_official_checkpoint_layout(variant, yaml):
    """Same keys and shapes as sam2's own Hydra build from its packaged SAM2.1 config: released checkpoints load."""
    from sam2.build_sam import build_sam2 as official_build

    from MedVLSAM2Lib.config import SegmenterConfig

    official = official_build(f"configs/sam2.1/{yaml}", ckpt_path=None, device="cpu", mode="eval").state_dict()
    ours = build_sam2(SegmenterConfig(variant=variant, image_size=1024)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in official.items()}


def test_plain_hugging_face_folder_loads_with_its_tokenizer(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer("tiny")
    qwen = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    reference = Qwen2ForCausalLM(qwen)
    reference.save_pretrained(str(tmp_path / "lm"))
    tokenizer.save_pretrained(str(tmp_path / "lm"))
    lm, loaded_tokenizer = load_language_model(tmp_path / "lm")
    assert loaded_tokenizer is not None and len(loaded_tokenizer) == len(tokenizer)
    ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(lm(ids).logits, reference(ids).logits)


def test_stage_one_checkpoint_with_base_weights_reloads(tmp_path, monkeypatch):
    from MedVLSAM2Lib.model.medvlsam2 import STAGE_PARTS

    config = preset("tiny")
    _m3d_clip_checkpoint(tmp_path / "vit.bin", config.vision)
    torch.save({"model": build_sam2(config.segmenter).state_dict()}, tmp_path / "sam2.pt")
    monkeypatch.chdir(tmp_path)  # relative base paths are stored absolute
    base = {"vision": "vit.bin", "sam2": "sam2.pt"}
    model = build_model(config, base)
    model.set_trainable(STAGE_PARTS[1])
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(1.0)
    folder = save_checkpoint(model, tmp_path / "stage1", base)
    meta = json.loads((folder / "config.json").read_text())
    assert all(not k.startswith(("vision.", "segmenter.sam.")) for k in meta["tensors"])  # base parts by reference
    monkeypatch.chdir("/")
    loaded = load_checkpoint(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# InternVL2.5-4B's config.json as released (the llm_config's field set, incl. transformers' generic fields and
# "_attn_implementation"); _internvl2_5_4b_folder shrinks its LM to test size. test_weight_layouts reads the same file.
INTERNVL2_5_4B_CONFIG = Path(__file__).resolve().parent / "fixtures" / "key_layouts" / "internvl2_5_4b_config.json"


def _internvl2_5_4b_folder(folder):
    """An InternVL2.5-4B-style folder at test size: the real config.json with a tiny LM geometry, untied
    ``language_model.lm_head.weight``, InternViT/MLP tensors the loader skips, and the tokenizer. The LM has no
    rows for [SEG] and <image> yet, as InternVL2.5-4B's 151,674 rows have none."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer("tiny")
    config = json.loads(INTERNVL2_5_4B_CONFIG.read_text())
    geometry = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": len(tokenizer) - 2,
                "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}  # fmt: skip
    config["llm_config"].update(geometry)
    torch.manual_seed(6)
    reference = Qwen2ForCausalLM(Qwen2Config(**{**config["llm_config"], "_attn_implementation": "sdpa"}))
    folder.mkdir()
    tensors = {f"language_model.{k}": v.clone() for k, v in reference.state_dict().items()}
    tensors["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    tensors["mlp1.1.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(str(folder))
    return reference


def test_internvl2_5_4b_config_loads_untied_with_sdpa_when_flash_attn_is_missing(tmp_path, caplog, capsys,
                                                                                  monkeypatch):  # fmt: skip
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: False)  # as on any CPU machine
    reference = _internvl2_5_4b_folder(tmp_path / "InternVL2_5-4B")
    with caplog.at_level(logging.INFO, logger="MedVLSAM2Lib.model.weights"):
        lm, tokenizer = load_language_model(tmp_path / "InternVL2_5-4B")
    assert "custom code" not in capsys.readouterr().out  # the auto_map never makes transformers ask on stdin
    notes = [r.getMessage() for r in caplog.records if "flash_attention_2" in r.getMessage()]
    assert len(notes) == 1 and "using sdpa" in notes[0]
    assert lm.config._attn_implementation == "sdpa" and tokenizer is not None
    assert lm.config.tie_word_embeddings is False and lm.lm_head.weight is not lm.model.embed_tokens.weight
    for key, value in reference.state_dict().items():
        assert torch.equal(lm.state_dict()[key], value), key  # the output head is the file's own matrix
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(lm(ids).logits, reference(ids).logits)


def test_internvl2_5_4b_config_uses_sdpa_even_where_flash_attn_imports(tmp_path, monkeypatch):
    monkeypatch.setattr("transformers.utils.is_flash_attn_2_available", lambda: True)  # a CUDA machine's install
    reference = _internvl2_5_4b_folder(tmp_path / "InternVL2_5-4B")
    lm, _ = load_language_model(tmp_path / "InternVL2_5-4B")  # float32 on the CPU: FA2 would fail at the forward
    assert lm.config._attn_implementation == "sdpa"
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(lm(ids).logits, reference(ids).logits)


def test_internvl_folder_with_an_internlm2_llm_is_refused(tmp_path):
    folder = tmp_path / "InternVL2_5-8B"
    folder.mkdir()
    llm_config = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
                  "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps({"llm_config": llm_config}))
    with pytest.raises(WeightsError, match="model_type is 'internlm2'; MedVL-SAM2 needs a Qwen2 LM"):
        load_language_model(folder)


def test_hugging_face_folder_that_lacks_a_tensor_is_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    qwen = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)  # fmt: skip
    Qwen2ForCausalLM(qwen).save_pretrained(str(tmp_path / "lm"))
    state = load_file(str(tmp_path / "lm" / "model.safetensors"))
    del state["model.norm.weight"]
    save_file(state, str(tmp_path / "lm" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"1 missing keys: model\.norm\.weight"):
        load_language_model(tmp_path / "lm")


def _output_head(model):
    """The output matrix the forward pass uses (peft's trained rows merged in)."""
    return model.llm.get_base_model().lm_head.weight.detach()


def _train_a_few_steps(model, steps=3):
    """AdamW on one report sample (every trainable part gets a gradient: the mask loss runs at zero weight);
    returns the output head's rows of [SEG] and <image> before."""
    config = model.config
    new_rows = [model.tokens.seg, model.tokens.image]
    before = _output_head(model)[new_rows].clone()
    torch.manual_seed(1)
    image = torch.rand(1, *config.vision.img_size)
    turns = [("Describe the findings of the medical image you see.", "Findings: no acute abnormality.")]
    ids, labels = encode_conversation(model.tokenizer, config.system_prompt, turns, config.projector.out_tokens)
    batch = collate([Sample(image, image[0].clone(), ids, labels)], model.tokens.pad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    return before


HEAD_ROWS = "llm.base_model.model.lm_head.token_adapter.trainable_tokens_delta.default"


@pytest.mark.parametrize("tied", [True, False])
def test_trained_tied_and_untied_models_reload_bit_identically(tmp_path, tied):
    config = preset("tiny")
    config.language.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = MedVLSAM2Model(config)
    new_rows = [model.tokens.seg, model.tokens.image]
    head_before = _train_a_few_steps(model)
    head = _output_head(model)[new_rows]
    assert not torch.equal(head, head_before)  # the output head's rows of the new tokens were trained
    embedding = model.llm.get_input_embeddings().weight[new_rows].detach()
    assert torch.equal(head, embedding) is tied
    folder = save_checkpoint(model, tmp_path / "ckpt")
    torch.manual_seed(99)  # a different random init underneath
    loaded = load_checkpoint(folder)
    reference = model.state_dict()
    assert set(loaded.state_dict()) == set(reference)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, reference[key]), key
    assert torch.equal(_output_head(loaded), _output_head(model))
    assert loaded.config.language.tie_word_embeddings is tied


@pytest.mark.parametrize("also_unlisted", [False, True])
def test_checkpoint_without_one_trained_tensor_fails_naming_it(tmp_path, also_unlisted):
    _internvl2_5_4b_folder(tmp_path / "InternVL2_5-4B")
    base = {"language": tmp_path / "InternVL2_5-4B"}  # an untied LM base, which lacks the new tokens' head rows
    torch.manual_seed(0)
    folder = save_checkpoint(build_model(preset("tiny"), base), tmp_path / "ckpt", base)
    state = load_file(str(folder / "model.safetensors"))
    del state[HEAD_ROWS]
    save_file(state, str(folder / "model.safetensors"))
    if also_unlisted:  # not recorded as trained: only the base could excuse it, and the base does not hold it
        meta = json.loads((folder / "config.json").read_text())
        meta["tensors"].remove(HEAD_ROWS)
        (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(WeightsError, match=rf"1 missing keys: {re.escape(HEAD_ROWS)}\)"):
        load_checkpoint(folder)


def test_untied_internvl_base_checkpoint_reloads_bit_identically(tmp_path):
    _internvl2_5_4b_folder(tmp_path / "InternVL2_5-4B")
    base = {"language": tmp_path / "InternVL2_5-4B"}
    torch.manual_seed(0)
    model = build_model(preset("tiny"), base)
    assert model.config.language.tie_word_embeddings is False  # the folder decides
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert HEAD_ROWS in trainable
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    folder = save_checkpoint(model, tmp_path / "ckpt", base)
    meta = json.loads((folder / "config.json").read_text())
    assert "llm.base_model.model.lm_head.token_adapter.base_layer.weight" not in meta["tensors"]  # from the base
    torch.manual_seed(99)
    loaded = load_checkpoint(folder)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key  # new-token rows added from the base identically


def test_trained_tensor_that_the_base_also_holds_must_be_in_the_checkpoint(tmp_path):
    config = preset("tiny")
    _m3d_clip_checkpoint(tmp_path / "vit.bin", config.vision)
    base = {"vision": tmp_path / "vit.bin"}
    model = build_model(config, base)
    model.set_trainable(STAGE_PARTS[2])  # the ViT is trained: the checkpoint must carry it, not the base file
    folder = save_checkpoint(model, tmp_path / "stage2", base)
    state = load_file(str(folder / "model.safetensors"))
    del state["vision.blocks.0.attn.qkv.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"1 missing keys: vision\.blocks\.0\.attn\.qkv\.weight"):
        load_checkpoint(folder)
