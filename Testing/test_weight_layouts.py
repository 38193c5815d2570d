"""The loaders against the real checkpoint layouts, kept as key/shape fixtures (``Testing/fixtures/key_layouts``).

Every key the model needs must come from the checkpoint with the right shape, and nothing may be left over:
checked with the loaders' own strict check (``load_strict``) on the meta device, so that no real-size weights are
allocated. The fixtures name their sources; ``make_key_layouts.py`` there rewrites them. The InternVL2.5-4B layout
is reproduced (transformers' Qwen2 key names, shapes from the released config's ``llm_config``), not copied from
the published safetensors index.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.model.segmenter import build_sam2
from MedVLSAM2Lib.model.vision import VisionEncoder3D
from MedVLSAM2Lib.model.weights import _qwen2_arguments, load_language_model, load_strict

LAYOUTS = Path(__file__).resolve().parent / "fixtures" / "key_layouts"


def _layout(name: str) -> dict:
    layout = json.loads((LAYOUTS / name).read_text())
    assert layout["count"] == len(layout["tensors"])
    return layout


def _internvl_llm_config(layout: dict) -> dict:
    """The ``llm_config`` of the released InternVL2.5-4B config.json that the layout names."""
    return json.loads((LAYOUTS / layout["config"]).read_text())["llm_config"]


def _meta_state(tensors: dict[str, list[int]], prefix: str = "") -> dict[str, torch.Tensor]:
    """The fixture's tensors as meta tensors (shapes only), ``prefix`` stripped."""
    return {k[len(prefix) :]: torch.empty(shape, device="meta") for k, shape in tensors.items() if k.startswith(prefix)}


def test_m3d_clip_vit_layout_loads_strictly_into_the_paper_vision_encoder():
    layout = _layout("m3d_clip_vit.json")
    assert len(layout["tensors"]) == 138
    # BAAI-DCAI/M3D#24 quotes the first keys of a strict load into this ViT, in this order.
    assert list(layout["tensors"])[:4] == ["cls_token", "patch_embedding.position_embeddings",
                                           "patch_embedding.patch_embeddings.1.weight",
                                           "patch_embedding.patch_embeddings.1.bias"]  # fmt: skip
    with torch.device("meta"):
        encoder = VisionEncoder3D(preset("paper").vision)
    load_strict(encoder, _meta_state(layout["tensors"]), "m3d_clip_vit.json")
    assert sum(p.numel() for p in encoder.parameters()) == 87_389_184


@pytest.mark.parametrize(("variant", "preset_name"), [("tiny", "small"), ("large", "paper")])
def test_sam2_1_checkpoint_layout_loads_strictly_into_our_sam2_build(variant, preset_name):
    """Our SAM2 is built in Python, not from sam2's YAML; the layout holds at the small preset's 512 too."""
    layout = _layout(f"sam2.1_hiera_{variant}.json")
    config = preset(preset_name).segmenter
    assert config.variant == variant
    with torch.device("meta"):
        sam = build_sam2(config)
    load_strict(sam, _meta_state(layout["tensors"]), layout["layout"])


def test_reproduced_internvl2_5_4b_language_model_layout_matches_the_qwen2_the_loader_builds():
    """The layout is reproduced from transformers' Qwen2 names (not the published index): this checks the loader's
    Qwen2 against the shapes InternVL2.5-4B's ``llm_config`` implies, not against the released file."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    layout = _layout("internvl2_5_4b_language_model.json")
    llm = _internvl_llm_config(layout)
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(Qwen2Config(**_qwen2_arguments(llm, LAYOUTS / layout["config"])))
    load_strict(lm, _meta_state(layout["tensors"], "language_model."), layout["layout"])
    assert layout["tensors"]["language_model.lm_head.weight"] == [llm["vocab_size"], llm["hidden_size"]]
    paper = preset("paper").language  # the paper preset's LLM is InternVL2.5-4B's
    assert (paper.hidden_size, paper.intermediate_size, paper.num_layers, paper.num_heads, paper.num_kv_heads,
            paper.rope_theta, paper.rms_norm_eps, paper.max_position_embeddings) == (
        llm["hidden_size"], llm["intermediate_size"], llm["num_hidden_layers"], llm["num_attention_heads"],
        llm["num_key_value_heads"], llm["rope_theta"], llm["rms_norm_eps"], llm["max_position_embeddings"])  # fmt: skip


def test_internvl_folder_with_the_reproduced_key_names_loads_untied(tmp_path):
    """The real loader on a folder with every ``language_model.*`` key of the reproduced InternVL2.5-4B layout (36
    layers, untied ``lm_head``) and InternViT/mlp1 keys beside them, at a toy width so that it runs in a test."""
    layout = _layout("internvl2_5_4b_language_model.json")
    llm = _internvl_llm_config(layout)
    # head width 4 (dynamic RoPE divides by head width - 2); 256: the k/v width (2 KV heads)
    toy = {llm["hidden_size"]: 64, llm["intermediate_size"]: 48, llm["vocab_size"]: 64, 256: 8}
    generator = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn([toy[d] for d in shape], generator=generator) for k, shape in layout["tensors"].items()}
    save_file({**tensors, "vision_model.embeddings.class_embedding": torch.zeros(1, 1, 8),
               "mlp1.1.weight": torch.zeros(32, 8)}, str(tmp_path / "model.safetensors"))  # fmt: skip
    small = {**llm, "hidden_size": 64, "intermediate_size": 48, "vocab_size": 64}  # 16 heads of 4, 2 KV heads
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["InternVLChatModel"], "llm_config": small}))
    lm, _ = load_language_model(tmp_path)
    state = lm.state_dict()
    assert set(state) == {k.removeprefix("language_model.") for k in tensors}
    torch.testing.assert_close(state["lm_head.weight"], tensors["language_model.lm_head.weight"])
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
