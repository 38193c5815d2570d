"""The Slicer module's Qt-free machinery: the persistent worker that runs every long job (cancel between tokens
and slices, results after Cancel dropped, one thread for all jobs) and the prompt watcher behind "update on each
prompt" (real markups nodes of the slicer-core wheel)."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from conftest import REPO

from MedVLSAM2Lib.engine import InferenceEngine
from MedVLSAM2Lib.volume import read_volume

sys.path.insert(0, str(REPO / "MedVLSAM2"))
from MedVLSAM2Core.jobs import JobRunner  # noqa: E402

POLL_WAIT_S = 0.02  # what the Widget's timer tick waits


def _finish(job, timeout: float = 120.0, on_progress=None) -> tuple[list, object]:  # noqa: ANN001
    """Poll as the Widget does until the job ends: (progress texts, last event)."""
    texts, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in job.events(wait=POLL_WAIT_S):
            if event.kind != "progress":
                return texts, event
            texts.append(event.value)
            if on_progress is not None:
                on_progress(texts)
    raise AssertionError(f"{job.title} did not finish within {timeout} s")


def test_jobs_run_in_order_on_one_persistent_thread_and_report_errors_as_one_event():
    runner, threads = JobRunner(), []

    def work(job):  # noqa: ANN001, ANN202
        threads.append(threading.get_ident())
        for n in range(3):
            job.progress(f"step {n}")
        return 42

    texts, last = _finish(runner.submit("Counting", work))
    assert texts == ["step 0", "step 1", "step 2"] and (last.kind, last.value) == ("done", 42)
    _, failed = _finish(runner.submit("Failing", lambda job: 1 / 0))
    assert failed.kind == "error" and isinstance(failed.value, ZeroDivisionError)
    _finish(runner.submit("Again", work))
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()  # the same warm worker, not the caller
    assert runner.close() and not runner.busy


def test_a_second_job_is_refused_while_one_runs_and_a_late_result_is_dropped():
    runner, release = JobRunner(), threading.Event()
    job = runner.submit("Waiting", lambda job: release.wait(10) and "result")
    with pytest.raises(RuntimeError, match="still busy with waiting"):
        runner.submit("Other", lambda job: None)
    job.cancel.set()  # the work ignores the flag and returns anyway: its result must not be written
    release.set()
    _, last = _finish(job)
    assert last.kind == "cancelled" and last.value is None
    assert runner.close()


@pytest.fixture(scope="module")
def engine_and_volume(subject_a):  # noqa: ANN001, ANN201
    engine = InferenceEngine.load("tiny")
    return engine, read_volume(subject_a / "example_ct_sm.nii.gz")


def test_cancel_stops_a_report_between_tokens_and_the_engine_stays_usable(engine_and_volume):
    engine, volume = engine_and_volume
    runner = JobRunner()

    def report(job):  # noqa: ANN001, ANN202
        return engine.report(engine.encode(volume, cancel=job.cancel), on_token=job.progress, cancel=job.cancel,
                             max_new_tokens=64)  # fmt: skip

    full_texts, full = _finish(runner.submit("Report", report))
    assert full.kind == "done" and full.value.tokens > 3
    job = runner.submit("Report", report)
    texts, last = _finish(job, on_progress=lambda texts: len(texts) == 3 and job.cancel.set())
    assert last.kind == "cancelled" and 3 <= len(texts) < len(full_texts)
    assert texts == full_texts[: len(texts)]  # what streamed before Cancel is what the full run streamed
    _, again = _finish(runner.submit("Report", report))
    assert again.kind == "done" and again.value.text == full.value.text
    assert runner.close()


def test_a_cancelled_segmentation_leaves_the_engine_giving_a_fresh_engines_mask(engine_and_volume):
    engine, volume = engine_and_volume
    runner = JobRunner()

    def segment(job, press_cancel: bool = False):  # noqa: ANN001, ANN202
        handle = engine.encode(volume, cancel=job.cancel)
        if press_cancel:  # Cancel pressed once the volume is encoded: the engine stops before SAM2's slices
            job.cancel.set()
        return engine.segment(handle, text="liver", answer="It is [SEG].", cancel=job.cancel)

    engine._cache.clear()
    _, last = _finish(runner.submit("Segmenting", lambda job: segment(job, press_cancel=True)))
    assert last.kind == "cancelled"
    expected = InferenceEngine.load("tiny").segment(engine.encode(volume), text="liver", answer="It is [SEG].")
    _, done = _finish(runner.submit("Segmenting", segment))
    assert done.kind == "done" and np.array_equal(done.value.objects[0].mask, expected.objects[0].mask)
    assert runner.close()


@pytest.mark.slicer
def test_the_prompt_watcher_sees_placed_moved_and_removed_prompts_once_each():
    import slicer
    import vtk
    from MedVLSAM2Core.prompt_watch import PromptWatcher

    scene = slicer.vtkMRMLScene()
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "R")
    other = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "O")
    seen = []
    watcher = PromptWatcher(lambda node: seen.append(node.GetName()))
    watcher.watch([points, None, roi])
    points.AddControlPointWorld(vtk.vtkVector3d(1, 2, 3))  # placed
    points.SetNthControlPointPositionWorld(0, 2, 2, 3)  # moved while dragging: not yet
    assert seen == ["P"]
    points.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)  # the drag ended
    roi.SetSize(10, 10, 10)  # the box is placed
    roi.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)  # a handle drag ended
    points.RemoveNthControlPoint(0)
    other.AddControlPointWorld(vtk.vtkVector3d(0, 0, 0))  # not watched
    assert seen == ["P", "P", "R", "R", "P"]
    watcher.watch([other])
    points.AddControlPointWorld(vtk.vtkVector3d(1, 2, 3))
    other.AddControlPointWorld(vtk.vtkVector3d(1, 1, 1))
    watcher.stop()
    other.AddControlPointWorld(vtk.vtkVector3d(2, 2, 2))
    assert seen == ["P", "P", "R", "R", "P", "O"]
