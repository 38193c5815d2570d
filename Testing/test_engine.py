"""InferenceEngine on real CTs with the tiny preset: masks on the input's own grid (NIfTI, NRRD, DICOM), box
prompts on the right model-grid slice, encoders run once per volume, bad input named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from MedVLSAM2Lib.config import preset
from MedVLSAM2Lib.demo import default_inputs
from MedVLSAM2Lib.engine import InferenceEngine, _labels, _split_report, segmentation_question
from MedVLSAM2Lib.errors import CapacityError, InputError, IntensityScaleError
from MedVLSAM2Lib.model.medvlsam2 import MedVLSAM2Model
from MedVLSAM2Lib.preprocess import GridConfig, mask_to_model, sam_input
from MedVLSAM2Lib.prompts import BoxPrompt, PointPrompt
from MedVLSAM2Lib.volume import Volume, read_volume

pytestmark = pytest.mark.realdata

SEG = "It is [SEG]."


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    torch.manual_seed(0)
    return InferenceEngine(MedVLSAM2Model(preset("tiny")))


@pytest.fixture(scope="module")
def ct_files(data_dir):  # noqa: ANN201
    return {
        "nifti": data_dir / "totalsegmentator" / "subjectA_abdomen_pelvis_native" / "example_ct_sm.nii.gz",
        "nrrd": default_inputs()[0],
        "dicom": data_dir / "totalsegmentator" / "subjectC_petct_dicom" / "dicom",
    }


class _Counter:
    """Counts calls of a bound method it replaces."""

    def __init__(self, monkeypatch, owner, name: str) -> None:  # noqa: ANN001
        self.calls, original = 0, getattr(owner, name)

        def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)


@pytest.mark.parametrize("kind", ["nifti", "nrrd", "dicom"])
def test_masks_come_back_on_the_inputs_own_grid(engine, ct_files, kind):
    volume = read_volume(ct_files[kind])
    result = engine.segment(engine.encode(volume), text="liver", answer=SEG)
    (obj,) = result.objects
    assert obj.mask.shape == volume.array.shape and obj.mask.dtype == np.uint8
    assert np.array_equal(result.ijk_to_ras, volume.ijk_to_ras)
    assert set(np.unique(obj.mask)) <= {0, 1} and 0.0 <= obj.score <= 1.0
    assert result.answer == SEG and result.question == "Can you segment the liver in this image?"


@pytest.mark.parametrize("kind", ["nifti", "dicom"])
def test_a_box_in_the_inputs_ijk_prompts_the_model_grid_slice_that_holds_it(engine, ct_files, kind, monkeypatch):
    volume = read_volume(ct_files[kind])
    shape_i, shape_j, shape_k = volume.shape_ijk
    k = shape_k // 3
    box = BoxPrompt((shape_i * 0.3, shape_j * 0.4, k), (shape_i * 0.6, shape_j * 0.7, k))
    seen = []
    segmenter = engine.model.segmenter
    original = segmenter.forward

    def recording(features, language, prompts=None, **options):  # noqa: ANN001, ANN003, ANN202
        seen.append(prompts)
        return original(features, language, prompts, **options)

    monkeypatch.setattr(segmenter, "forward", recording)
    engine.segment(engine.encode(volume), boxes=[box])
    (prompts,) = seen
    (z,) = prompts
    # geometry, independently of the prompt mapping: the box's voxels carried to the model grid as a mask
    region = np.zeros(volume.array.shape, np.uint8)
    (i0, j0, _), (i1, j1, _) = box.min_ijk, box.max_ijk
    region[k, int(np.ceil(j0)) : int(j1) + 1, int(np.ceil(i0)) : int(i1) + 1] = 1
    entry = engine._entry(engine.encode(volume))
    on_grid = mask_to_model(region, entry.record, soft=True)  # occupancy, so a thin slab still shows
    assert on_grid[z].sum() == pytest.approx(on_grid.sum(axis=(1, 2)).max())
    depth, height, width = on_grid.shape
    size = engine.model.config.segmenter.image_size
    corners = (prompts[z].coords[0].numpy() + 0.5) * np.array([width / size, height / size]) - 0.5  # model (w, h)
    rows, cols = np.nonzero(on_grid[z] > 0.5 * on_grid[z].max())
    assert corners[0] == pytest.approx([cols.min(), rows.min()], abs=1.0)
    assert corners[1] == pytest.approx([cols.max(), rows.max()], abs=1.0)
    assert prompts[z].labels.tolist() == [[2, 3]]


def test_sam2_sees_preprocess_sam_input_for_hu_and_normalized_volumes(engine, ct_files):
    volume = read_volume(ct_files["nifti"])
    # as M3D-Seg stores it (SegVol: clip to the foreground's 0.05..99.95 percentiles, z-score with the foreground);
    # a plain z-score keeps the air above the floor, whose peak then passes for fat (an implausible estimate)
    foreground = volume.array[volume.array > volume.array.mean()]
    low, high = np.percentile(foreground, [0.05, 99.95])
    foreground = np.clip(foreground, low, high)
    z_scored = volume.with_array(
        ((np.clip(volume.array, low, high) - foreground.mean()) / foreground.std()).astype(np.float32)
    )
    grid = GridConfig(spatial_size=engine.model.config.vision.img_size)
    for given, intensity in ((volume, "hu"), (z_scored, "normalized")):
        engine._cache.clear()  # earlier tests may have segmented this volume already
        handle = engine.encode(given, intensity)
        entry = engine._entry(handle)
        assert entry.sam_image is None  # made on the first segmentation only
        expected = sam_input(given, grid, engine.model.config.segmenter.window, intensity)
        assert engine._sam_image(handle, entry)[0].cpu().numpy().tobytes() == expected.tobytes()


def test_a_normalized_volume_without_an_hu_estimate_still_gets_reports_and_answers(engine):
    array = np.full((4, 8, 8), -1.0, dtype=np.float32)
    array[1:3, 2:6, 2:6] = 0.5  # one tissue above the floor: no HU scale, so no SAM2 input
    handle = engine.encode(Volume(array, np.eye(4)), "normalized")
    assert engine.report(handle, max_new_tokens=2).text is not None
    assert engine.ask(handle, "Is there a pleural effusion?").text is not None
    with pytest.raises(IntensityScaleError, match="no separate fat and soft-tissue peaks"):
        engine.segment(handle, text="liver", answer=SEG)


PROMPTS = {"points": {"points": [PointPrompt((30, 30, 10)), PointPrompt((34, 30, 10))]},
           "box": {"boxes": [BoxPrompt((20, 20, 10), (40, 40, 10))]}}  # fmt: skip


@pytest.mark.parametrize("prompt", ["points", "box"])
def test_prompts_alone_segment_without_asking_the_language_model(engine, ct_files, prompt, monkeypatch):
    handle = engine.encode(read_volume(ct_files["nifti"]))
    monkeypatch.setattr(engine.model, "generate", _fail)
    monkeypatch.setattr(engine.model, "hidden_states", _fail)
    result = engine.segment(handle, **PROMPTS[prompt])
    assert (result.question, result.answer, result.from_prompts, result.message) == ("", "", True, "")
    (obj,) = result.objects
    assert obj.label == "prompted structure" and obj.mask.shape == handle.volume.array.shape
    assert "generate" not in result.timings and result.timings["masks"] > 0
    with pytest.raises(InputError, match="a given answer needs a text"):
        engine.segment(handle, **PROMPTS[prompt], answer=SEG)


def _fail(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise AssertionError("the language model ran")


@pytest.mark.parametrize("prompt", ["points", "box"])
def test_prompts_segment_alone_when_the_answer_to_a_text_has_no_seg(engine, ct_files, answer_without_seg, prompt):
    handle = engine.encode(read_volume(ct_files["nifti"]))
    alone = engine.segment(handle, **PROMPTS[prompt])
    result = engine.segment(handle, "liver", **PROMPTS[prompt])
    assert result.answer == answer_without_seg and result.from_prompts
    assert result.message == "The model's answer has no [SEG] ('No.'); the mask comes from your points or box alone."
    (obj,) = result.objects  # the mask of the prompts alone, named after the text
    assert np.array_equal(obj.mask, alone.objects[0].mask) and obj.label == "liver"


def test_text_alone_without_seg_says_there_is_no_mask(engine, ct_files, answer_without_seg):
    handle = engine.encode(read_volume(ct_files["nifti"]))
    result = engine.segment(handle, "liver")
    assert result.objects == [] and not result.from_prompts
    assert result.message == "The model's answer has no [SEG] ('No.'), so it made no mask."


def test_the_encoders_run_once_per_volume(engine, ct_files, monkeypatch):
    vision = _Counter(monkeypatch, engine.model.vision, "forward")
    sam = _Counter(monkeypatch, engine.model.segmenter, "encode")
    volume = read_volume(ct_files["nifti"])
    engine._cache.clear()
    handle = engine.encode(volume)
    first = engine.segment(handle, text="liver", answer=SEG)
    box = BoxPrompt((20, 20, 10), (40, 40, 10))
    second = engine.segment(handle, text="liver", boxes=[box], answer=SEG)
    engine.ask(handle, "Is the liver enlarged?")
    assert 1 <= engine.report(handle, max_new_tokens=4).tokens <= 4
    assert engine.encode(read_volume(ct_files["nifti"])) == handle  # same content, same handle
    assert (vision.calls, sam.calls) == (1, 1)
    assert "sam_encode" in first.timings and second.timings["sam_encode"] < first.timings["sam_encode"]


def test_the_cache_is_bounded_and_an_evicted_volume_is_encoded_again(ct_files, monkeypatch):
    torch.manual_seed(0)
    small = InferenceEngine(MedVLSAM2Model(preset("tiny")), cache_bytes=0)
    vision = _Counter(monkeypatch, small.model.vision, "forward")
    first = small.encode(read_volume(ct_files["nifti"]))
    small.encode(read_volume(ct_files["nrrd"]))
    assert len(small._cache) == 1  # the newest entry stays even when it alone exceeds the bound
    small.ask(first, "Is there a lesion?")
    assert vision.calls == 3


def test_several_seg_tokens_give_several_masks(engine, ct_files):
    volume = read_volume(ct_files["nifti"])
    result = engine.segment(engine.encode(volume), text="kidney", answer="Sure, [SEG] and [SEG].")
    assert [o.label for o in result.objects] == ["kidney", "kidney 2"]
    assert all(o.mask.shape == volume.array.shape for o in result.objects)


def test_report_and_answer_parsing():
    assert _split_report("Findings: No nodule. Impression: Normal chest.") == ("No nodule.", "Normal chest.")
    assert _split_report("free text only") == ("free text only", "")
    assert segmentation_question("right lung") == "Can you segment the right lung in this image?"
    described = "Air-filled organ of respiration in the right half of the chest."
    assert segmentation_question(described) == f"{described} Please answer and segment."
    assert segmentation_question("Please segment the aorta.") == "Please segment the aorta."
    assert _labels(described, "The target is right lung and the segmentation mask is [SEG].", 1) == ["right lung"]
    assert _labels(None, "It is [SEG].", 1) == ["prompted structure"]


def test_bad_input_is_named(engine, ct_files, monkeypatch):
    volume = read_volume(ct_files["nifti"])
    with pytest.raises(InputError, match="span only 0..0"):
        engine.encode(volume.with_array(np.zeros_like(volume.array)))
    with pytest.raises(InputError, match="2D"):
        engine.encode(Volume(np.zeros((1, 8, 8)), np.eye(4)))
    handle = engine.encode(volume)
    with pytest.raises(InputError, match="outside"):
        engine.segment(handle, points=[PointPrompt((1e4, 1, 1))])
    with pytest.raises(InputError, match="question is empty"):
        engine.ask(handle, "  ")
    with pytest.raises(InputError, match="nothing to segment"):
        engine.segment(handle)
    with pytest.raises(InputError, match="unknown answer kind"):
        engine.ask(handle, "Why?", kind="essay")
    with pytest.raises(InputError, match="neither a preset"):
        InferenceEngine.load("huge")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            InferenceEngine.load("tiny", device="cuda")

    def out_of_memory(image):  # noqa: ANN001, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine.model, "visual_tokens", out_of_memory)
    with pytest.raises(CapacityError, match="out of memory on cpu while encoding the volume.*bfloat16"):
        engine.encode(volume.with_array(volume.array + 1))
