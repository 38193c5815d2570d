"""Freeze plans per stage: exactly the paper's modules receive gradients and optimiser state."""

from __future__ import annotations

import pytest
import torch
from test_model import _mixed_batch

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.errors import InputError
from MedVLSAM2Lib.model.medvlsam2 import MedVLSAM2Model
from MedVLSAM2Lib.training.config import TrainConfig
from MedVLSAM2Lib.training.stages import stage_plan, trainable_report
from MedVLSAM2Lib.training.trainer import _build_model

EXPECTED = {
    1: {"projector"},
    2: {"projector", "vision", "lora"},
    3: {"projector", "vision", "lora", "seg_projector", "sam_decoder"},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MedVLSAM2Model(preset("tiny"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_only_the_stage_modules_get_gradients_and_optimiser_state(model, stage):
    plan = stage_plan(stage)
    model.set_trainable(plan.parts)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.zero_grad(set_to_none=True)
    model(_mixed_batch(model)).loss.backward()
    optimizer.step()
    rows = {name: trainable for name, trainable, _ in trainable_report(model)}
    assert {name for name, count in rows.items() if count} == EXPECTED[stage]
    stateful = {id(p) for p in optimizer.state}
    for part in ("vision", "projector", "lora", "seg_projector", "sam_decoder", "sam_memory", "sam_image_encoder"):
        parameters = model.part_parameters(part)
        if part in EXPECTED[stage]:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters), part
            assert all(id(p) in stateful for p in parameters), part
        else:
            assert all(p.grad is None and id(p) not in stateful for p in parameters), part
    base = [p for n, p in model.llm.named_parameters() if "lora_" not in n and "trainable_tokens" not in n]
    assert all(p.grad is None for p in base)  # the LLM's own weights never train


def test_stage_three_can_add_sam2_memory():
    assert "sam_memory" in stage_plan(3, train_sam_memory=True).parts
    assert "sam_memory" not in stage_plan(2, train_sam_memory=True).parts
    with pytest.raises(InputError, match="stage must be 1, 2 or 3"):
        stage_plan(4)


@pytest.mark.parametrize(
    "stage,epochs,batch,accum",
    [(1, 3, 16, 1), (2, 5, 16, 1), (3, 1, 1, 8)],
)
def test_shipped_stage_configs_hold_the_papers_settings(stage, epochs, batch, accum):
    import yaml
    from conftest import REPO

    from MedVLSAM2Lib.training.config import TrainConfig

    config = TrainConfig(**yaml.safe_load((REPO / "Training" / f"stage{stage}.yaml").read_text()))
    assert (config.stage, config.epochs, config.batch_size, config.grad_accum) == (stage, epochs, batch, accum)
    if stage < 3:
        assert config.batch_size * 8 * config.grad_accum == 128  # global batch 128 on 8 GPUs
    assert set(config.task_weights) == set(stage_plan(stage).tasks)


def test_frozen_parts_keep_parts_of_the_stage_plan_frozen():
    language_side = ["vision", "projector", "lora", "seg_projector"]
    model = _build_model(TrainConfig(stage=3, preset="tiny", train_sam_memory=True, frozen_parts=language_side))
    trained = {name for name, trainable, _ in trainable_report(model) if trainable}
    assert trained == {"sam_decoder", "sam_memory"}
    with pytest.raises(InputError, match=r"frozen_parts \['projector'\] leave stage 1 nothing to train"):
        TrainConfig(stage=1, preset="tiny", frozen_parts=["projector"])  # refused before any model is built
    with pytest.raises(InputError, match=r"unknown part\(s\) \['decoder'\]"):
        TrainConfig(stage=3, preset="tiny", frozen_parts=["decoder"])
