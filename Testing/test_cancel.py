"""Cancelling long jobs (tiny preset, CPU): a ``threading.Event`` stops report and ask between tokens, segment between
SAM2 slices, encode and load between their steps, and the remote client mid-report and mid-segment; each raises
``Cancelled`` and leaves the engine, its cache and the client usable, with the same results as a fresh engine."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from serving_fixtures import KEY, free_port, in_process_server, start_server, stop_server

import MedVLSAM2Lib.engine as engine_module
from MedVLSAM2Lib.demo import default_inputs
from MedVLSAM2Lib.engine import InferenceEngine
from MedVLSAM2Lib.errors import Cancelled, MedVLSAM2Error
from MedVLSAM2Lib.prompts import BoxPrompt
from MedVLSAM2Lib.serving.client import POLL_S, RemoteHandle, ServerClient
from MedVLSAM2Lib.volume import Volume, read_volume

SEG = "It is [SEG]."
BOX = BoxPrompt((30, 40, 10), (80, 90, 20))
PROMPT_BOUND_S = 1.0  # a remote call must raise within this long after its cancel event is set (it polls every 0.1 s)


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine.load("tiny")


@pytest.fixture(scope="module")
def volume() -> Volume:
    return read_volume(default_inputs()[0])


@pytest.fixture(scope="module")
def expected(volume) -> dict:  # noqa: ANN001
    """Masks of a fresh engine that was never cancelled: text with a box, and the box alone."""
    fresh = InferenceEngine.load("tiny")
    handle = fresh.encode(volume)
    return {"text": fresh.segment(handle, text="liver", answer=SEG, boxes=[BOX]).objects[0],
            "box": fresh.segment(handle, boxes=[BOX]).objects[0]}  # fmt: skip


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, after: int = 0,
                 then: threading.Event | None = None) -> list[float]:  # fmt: skip
    """The moments at which calls of ``owner.name`` returned; with ``then``, set that event once the ``after``-th
    has."""
    calls: list[float] = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        result = original(*args, **kwargs)
        calls.append(time.monotonic())
        if then is not None and len(calls) == after:
            then.set()
        return result

    monkeypatch.setattr(owner, name, counted)
    return calls


class _SetAfterForwards:
    """A cancel flag that reads as set once the language model has run ``count`` forward passes (one per token)."""

    def __init__(self, engine: InferenceEngine, count: int) -> None:
        self.forwards, self.count = 0, count
        self.hook = engine.model._decoder().register_forward_hook(lambda *_: self._forward())

    def _forward(self) -> None:
        self.forwards += 1

    def is_set(self) -> bool:
        return self.forwards >= self.count


def test_cancelled_is_a_library_error_so_the_cli_and_server_print_it_as_one_line():
    assert issubclass(Cancelled, MedVLSAM2Error)


def test_a_callback_that_cancels_after_three_pieces_stops_the_report_before_another_token(engine, volume):
    handle = engine.encode(volume)
    cancel, pieces, forwards = threading.Event(), [], []
    hook = engine.model._decoder().register_forward_hook(lambda *_: forwards.append(1))
    at_cancel: list[int] = []

    def on_token(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            at_cancel.append(len(forwards))
            cancel.set()

    try:
        with pytest.raises(Cancelled, match="the generation was cancelled"):
            engine.report(handle, on_token=on_token, cancel=cancel)
    finally:
        hook.remove()
    # one forward pass per token: none after the token whose piece set the event (the tiny tokenizer holds back a
    # piece that ends inside a UTF-8 character, so 3 pieces take 3 or a few more tokens)
    assert len(pieces) == 3 and len(forwards) == at_cancel[0] and 3 <= len(forwards) <= 6


def test_ask_without_a_callback_stops_after_exactly_three_tokens(engine, volume):
    handle = engine.encode(volume)
    flag = _SetAfterForwards(engine, 3)
    try:
        with pytest.raises(Cancelled):
            engine.ask(handle, "Is there a pleural effusion?", kind="long", cancel=flag)
    finally:
        flag.hook.remove()
    assert flag.forwards == 3
    assert engine.report(handle, max_new_tokens=3).tokens == 3  # the engine still generates


@pytest.mark.parametrize("slices", [1, 5])
def test_a_segmentation_cancelled_after_n_slices_runs_no_further_slice_and_a_fresh_engine_agrees_after(
    engine, volume, expected, monkeypatch, slices
):
    handle = engine.encode(volume)
    cancel = threading.Event()
    steps = _count_calls(monkeypatch, engine.model.segmenter, "_step", after=slices, then=cancel)
    with pytest.raises(Cancelled, match=rf"after {slices} of 16 slices"):
        engine.segment(handle, text="liver", answer=SEG, boxes=[BOX], cancel=cancel)
    assert len(steps) == slices
    monkeypatch.undo()
    (again,) = engine.segment(engine.encode(volume), text="liver", answer=SEG, boxes=[BOX]).objects
    assert np.array_equal(again.mask, expected["text"].mask) and again.score == expected["text"].score


def test_a_cancel_during_sams_image_encoder_keeps_only_whole_features(volume, expected, monkeypatch):
    engine = InferenceEngine.load("tiny")
    handle = engine.encode(volume)
    cancel = threading.Event()
    _count_calls(monkeypatch, engine.model, "sam_features", after=1, then=cancel)
    steps = _count_calls(monkeypatch, engine.model.segmenter, "_step")
    with pytest.raises(Cancelled):
        engine.segment(handle, points=[], boxes=[BOX], cancel=cancel)
    entry = engine._cache[handle.key]
    assert steps == [] and entry.features is not None and entry.features["num_slices"] == 16
    monkeypatch.undo()
    (again,) = engine.segment(handle, boxes=[BOX]).objects
    assert np.array_equal(again.mask, expected["box"].mask) and again.score == expected["box"].score


def test_an_encoding_cancelled_between_its_steps_caches_nothing(volume, monkeypatch):
    engine = InferenceEngine.load("tiny")
    cancel = threading.Event()
    _count_calls(monkeypatch, engine_module, "to_model", after=1, then=cancel)  # the model grid is made, then cancel
    vit = _count_calls(monkeypatch, engine.model, "visual_tokens")
    with pytest.raises(Cancelled, match="encoding the volume was cancelled"):
        engine.encode(volume, cancel=cancel)
    assert vit == [] and len(engine._cache) == 0 and engine.cached_bytes == 0
    handle = engine.encode(volume, cancel=threading.Event())
    assert len(vit) == 1 and list(engine._cache) == [handle.key]


def test_an_event_already_set_stops_load_encode_and_every_task_before_any_work(engine, volume, monkeypatch):
    cancel = threading.Event()
    cancel.set()
    built = _count_calls(monkeypatch, engine_module, "MedVLSAM2Model")
    with pytest.raises(Cancelled, match="loading the model was cancelled"):
        InferenceEngine.load("tiny", cancel=cancel)
    assert built == []
    other = Volume(volume.array[::-1].copy(), volume.ijk_to_ras)  # content the engine has not encoded
    before = dict(engine._cache)
    keys = _count_calls(monkeypatch, engine_module, "_volume_key")
    with pytest.raises(Cancelled):
        engine.encode(other, cancel=cancel)
    assert keys == [] and dict(engine._cache) == before
    handle = engine.encode(volume)
    forwards: list[int] = []
    hook = engine.model._decoder().register_forward_hook(lambda *_: forwards.append(1))
    try:
        for task in (lambda: engine.report(handle, cancel=cancel), lambda: engine.ask(handle, "Why?", cancel=cancel),
                     lambda: engine.segment(handle, text="liver", cancel=cancel)):  # fmt: skip
            with pytest.raises(Cancelled):
                task()
    finally:
        hook.remove()
    assert forwards == []


def test_a_checkpoint_load_cancelled_after_building_the_model_reads_no_weights(tmp_path, monkeypatch):
    import safetensors.torch

    from MedVLSAM2Lib.model import weights

    folder = weights.save_checkpoint(engine_module.load_model("tiny"), tmp_path / "checkpoint")
    cancel = threading.Event()
    _count_calls(monkeypatch, weights, "MedVLSAM2Model", after=1, then=cancel)
    reads = _count_calls(monkeypatch, safetensors.torch, "load_file")
    with pytest.raises(Cancelled, match="loading the model was cancelled"):
        InferenceEngine.load(folder, cancel=cancel)
    assert reads == []
    monkeypatch.undo()
    assert InferenceEngine.load(folder, cancel=threading.Event()).describe()["preset"] == "tiny"


# ---------------------------------------------------------------- remote


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # noqa: ANN001, ANN201
    port = free_port()
    process = start_server(port, log=tmp_path_factory.mktemp("server") / "server.log")
    yield f"http://127.0.0.1:{port}"
    stop_server(process)


def _set_later(event: threading.Event, seconds: float) -> list[float]:
    """Set ``event`` after ``seconds`` on a timer thread; the list receives the moment it was set."""
    moment: list[float] = []

    def fire() -> None:
        moment.append(time.monotonic())
        event.set()

    threading.Timer(seconds, fire).start()
    return moment


@pytest.mark.server
def test_a_remote_streamed_report_cancelled_by_its_callback_stops_at_once_and_the_client_still_works(
    server, engine, volume
):
    client = ServerClient(server, KEY)
    handle = client.encode(volume, cancel=threading.Event())
    cancel, pieces, moment = threading.Event(), [], []

    def on_token(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 3:
            moment.append(time.monotonic())
            cancel.set()

    with pytest.raises(Cancelled, match="the report was cancelled"):
        client.report(handle, on_token=on_token, cancel=cancel)
    assert len(pieces) == 3 and time.monotonic() - moment[0] < PROMPT_BOUND_S
    # the client works on (and the server's streaming endpoint stopped generating at its next token, once the stream
    # closed, so this does not wait behind 512 tokens)
    streamed = client.report(handle, on_token=lambda _: None, max_new_tokens=12, cancel=threading.Event())
    assert streamed.text == engine.report(engine.encode(volume), max_new_tokens=12).text


@pytest.fixture(scope="module")
def app_server():  # noqa: ANN201
    """The server app with an engine of its own, on uvicorn in this process: a test can watch the server's engine
    work (count its SAM2 slices, its tokens) and cancel the client at an exact point of it."""
    served = InferenceEngine.load("tiny")
    with in_process_server(served) as url:
        yield url, served


@pytest.mark.server
def test_a_remote_segmentation_cancelled_after_three_server_slices_raises_within_the_bound_and_the_client_works_on(
    app_server, engine, volume, monkeypatch
):
    url, served = app_server
    client = ServerClient(url, KEY)
    handle = client.encode(volume, cancel=threading.Event())
    cancel = threading.Event()
    steps = _count_calls(monkeypatch, served.model.segmenter, "_step", after=3, then=cancel)  # the server's slices
    with pytest.raises(Cancelled, match="the request to http://127.0.0.1:.* was cancelled"):
        client.segment(handle, text="liver", answer=SEG, boxes=[BOX], cancel=cancel)
    assert time.monotonic() - steps[2] < PROMPT_BOUND_S
    remote = client.segment(handle, text="liver", answer=SEG, boxes=[BOX], cancel=threading.Event())
    local = engine.segment(engine.encode(volume), text="liver", answer=SEG, boxes=[BOX])
    assert np.array_equal(remote.objects[0].mask, local.objects[0].mask)
    assert remote.objects[0].score == pytest.approx(local.objects[0].score, abs=1e-6)


@pytest.mark.server
def test_a_remote_answer_cancelled_after_three_server_tokens_raises_within_the_bound_and_the_client_works_on(
    app_server, engine, volume
):
    url, served = app_server
    client = ServerClient(url, KEY)
    handle = client.encode(volume)
    cancel, forwards, moment = threading.Event(), [], []

    def counted(*_: object) -> None:
        forwards.append(1)
        if len(forwards) == 3:
            moment.append(time.monotonic())
            cancel.set()

    hook = served.model._decoder().register_forward_hook(counted)
    try:
        with pytest.raises(Cancelled):
            client.ask(handle, "Is there a pleural effusion?", cancel=cancel)
        assert time.monotonic() - moment[0] < PROMPT_BOUND_S
    finally:
        hook.remove()
    remote = client.ask(handle, "Is there a pleural effusion?", cancel=threading.Event())
    assert remote.text == engine.ask(engine.encode(volume), "Is there a pleural effusion?").text


def test_a_cancelled_remote_call_shuts_its_connection_so_the_server_sees_the_client_go():
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, float] = {}

    def never_answer() -> None:  # reads the request, never answers, and notes when the client's side closes
        connection, _ = listener.accept()
        with connection:
            while connection.recv(65536):
                pass
            seen["closed"] = time.monotonic()

    threading.Thread(target=never_answer, daemon=True).start()
    client = ServerClient(f"http://127.0.0.1:{listener.getsockname()[1]}", KEY)
    handle = RemoteHandle("0" * 64, (4, 4, 4), Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)))  # no upload
    cancel = threading.Event()
    moment = _set_later(cancel, 0.2)
    try:
        with pytest.raises(Cancelled, match="the request to http://127.0.0.1:.* was cancelled"):
            client.ask(handle, "Is there a lung?", cancel=cancel)
        assert time.monotonic() - moment[0] < 2 * POLL_S + 0.1
        deadline = time.monotonic() + PROMPT_BOUND_S
        while "closed" not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "closed" in seen and seen["closed"] - moment[0] < PROMPT_BOUND_S
    finally:
        listener.close()
