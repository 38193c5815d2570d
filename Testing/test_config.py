"""Model configs: presets, JSON round trip, validation."""

from __future__ import annotations

import json

import pytest

from MedVLSAM2Lib.config import ModelConfig, ProjectorConfig, SegmenterConfig, VisionConfig, preset
from MedVLSAM2Lib.errors import InputError


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_presets_round_trip_through_json(name):
    config = preset(name)
    again = ModelConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.to_dict() == config.to_dict()


def test_paper_preset_has_the_papers_geometry():
    config = preset("paper")
    assert config.vision.num_tokens == 2048 and config.projector.out_tokens == 512
    lm = config.language
    assert (lm.hidden_size, lm.num_layers, lm.num_heads, lm.num_kv_heads, lm.intermediate_size) == (
        2048,
        36,
        16,
        2,
        11008,
    )
    assert lm.tie_word_embeddings is False  # InternVL2.5-4B's LM has an output matrix of its own
    assert config.segmenter.variant == "large" and config.segmenter.image_size == 1024
    assert config.segmenter.stages == (2, 6, 36, 4)
    assert (config.loss.text_weight, config.loss.mask_weight, config.loss.dice_weight) == (0.5, 2.0, 1.0)


def test_paper_preset_uses_one_mixer_layer_and_tiny_small_keep_two():
    assert preset("paper").projector.mixer_layers == 1  # Eq. (2), Table 8's 7.09M
    assert preset("tiny").projector.mixer_layers == preset("small").projector.mixer_layers == 2
    with pytest.raises(InputError, match="mixer_layers must be 1"):
        ProjectorConfig(mixer_layers=3)
    with pytest.raises(InputError, match="hidden_tokens/hidden_channels need mixer_layers=2"):
        ProjectorConfig(hidden_tokens=1024)


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_small_presets_tie_their_embeddings_like_qwen2_5_releases(name):
    assert preset(name).language.tie_word_embeddings is True


def test_bad_configs_are_rejected_with_the_field_named():
    with pytest.raises(InputError, match="unknown key"):
        ModelConfig.from_dict({**preset("tiny").to_dict(), "learning_rate": 1})
    with pytest.raises(InputError, match=r"config\.vision: unknown key\(s\) \['depth'\]"):
        ModelConfig.from_dict({"vision": {"depth": 3}})
    with pytest.raises(InputError, match="divisible by patch_size"):
        VisionConfig(img_size=(30, 256, 256))
    with pytest.raises(InputError, match="multiple of 32"):
        SegmenterConfig(variant="tiny", image_size=500)
    with pytest.raises(InputError, match="unknown preset"):
        preset("huge")
