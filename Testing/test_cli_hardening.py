"""The CLI and the client, hardened (issue 20 items 8, 10, 11, 13, 14): arguments, outputs and the CT are checked
before the model loads; SIGTERM cleans up like Ctrl-C and dead writers' partial files go on the next write;
``--intensity`` and ``--series``; model text cannot drive the terminal; the client tells a connection that broke from
a server it cannot reach."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from MedVLSAM2Lib.atomic import atomic_path
from MedVLSAM2Lib.cli import main
from MedVLSAM2Lib.demo import default_inputs
from MedVLSAM2Lib.errors import InputError, ServerError
from MedVLSAM2Lib.results import Answer, ObjectMask, Report, SegmentResult
from MedVLSAM2Lib.serving.client import RemoteHandle, ServerClient
from MedVLSAM2Lib.volume import read_volume, write_volume

CT = default_inputs()[0]
EVIL = "liver\x1b[2J\x07\r\x9b]0;owned\x07"  # clear screen, bell, carriage return, CSI, set-title: as a model may emit
CONTROL_BYTES = ("\x1b", "\x07", "\r", "\x9b")


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every model load, which fails (so a test that should never load cannot go on)."""
    from MedVLSAM2Lib.engine import InferenceEngine

    calls: list = []

    def load(cls, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(args)
        raise InputError("the model was loaded")

    monkeypatch.setattr(InferenceEngine, "load", classmethod(load))
    return calls


def _one_error_line(capsys: pytest.CaptureFixture, command: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"medvlsam2 {command}: error: "), lines
    return lines[0]


def _make_read_only_folder(tmp_path: Path) -> None:
    """``tmp_path/read-only``, or a skip where permissions do not stop writes."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return
    pytest.skip("chmod does not stop writes here (root); the targets below a file cover the check")


@pytest.mark.parametrize(
    ("target", "flags", "message"),
    [
        ("file.txt/mask.nii.gz", [], "-o {tmp}/file.txt: is a file, not a folder."),
        ("file.txt/sub/mask.seg.nrrd", [], "is below the file {tmp}/file.txt, not a folder."),
        ("folder.nii.gz", ["--overwrite"], "{tmp}/folder.nii.gz: is a folder; -o takes a file name"),
        ("folder.nii.gz", [], "{tmp}/folder.nii.gz: is a folder"),
        ("read-only/mask.nii.gz", [], "-o {tmp}/read-only: cannot write in {tmp}/read-only (Permission denied)"),
    ],
)
def test_an_output_that_cannot_be_written_fails_before_the_model_loads(tmp_path, loads, capsys, target, flags,
                                                                       message):  # fmt: skip
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "folder.nii.gz").mkdir()
    if target.startswith("read-only"):
        _make_read_only_folder(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    code = main(["segment", str(CT), "--text", "liver", "--preset", "tiny", "-o", str(tmp_path / target), *flags])
    line = _one_error_line(capsys, "segment")
    assert code == 2 and message.format(tmp=tmp_path) in line and loads == []
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, no probe file left


def test_a_bad_ct_fails_before_the_model_loads(tmp_path, loads, capsys):
    ct = read_volume(CT)
    write_volume(ct.with_array(np.zeros_like(ct.array)), tmp_path / "zeros.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.int16), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    for name, message in (("zeros.nii.gz", "Is this a CT"), ("slice.nii.gz", "2D"),
                          ("broken.nii.gz", "cannot read NIfTI"), ("missing.nrrd", "no such file")):  # fmt: skip
        assert main(["ask", str(tmp_path / name), "Is there a lung?", "--preset", "tiny"]) == 2
        assert message in _one_error_line(capsys, "ask"), name
    assert loads == []


def test_a_ct_outside_the_hu_range_fails_before_torch_is_imported(tmp_path):
    """The HU check runs before the engine module (torch, seconds to import) is loaded: here torch cannot be."""
    ct = read_volume(CT)
    write_volume(ct.with_array(np.zeros_like(ct.array)), tmp_path / "zeros.nii.gz")
    code = ("import sys\nsys.modules['torch'] = None\nfrom MedVLSAM2Lib.cli import main\n"
            "sys.exit(main(['ask', sys.argv[1], 'Is there a lung?', '--preset', 'tiny']))")  # fmt: skip
    command = [sys.executable, "-c", code, str(tmp_path / "zeros.nii.gz")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Is this a CT" in run.stderr, run.stderr[-2000:]


def test_a_prompt_outside_the_ct_fails_before_the_model_loads(loads, capsys):
    assert main(["segment", str(CT), "--point", "500,10,10", "--preset", "tiny"]) == 2
    assert "is outside the volume" in _one_error_line(capsys, "segment")
    assert main(["segment", str(CT), "--box", "10,10,10,20,20,99", "--preset", "tiny"]) == 2
    assert "outside the volume" in _one_error_line(capsys, "segment")
    assert loads == []


def test_choices_are_checked_before_anything_runs(loads, capsys):
    from MedVLSAM2Lib.cli import KINDS
    from MedVLSAM2Lib.engine import ANSWER_TOKENS

    assert set(KINDS) == set(ANSWER_TOKENS)
    for flags in (["--kind", "essay"], ["--intensity", "hounsfield"]):
        with pytest.raises(SystemExit) as info:
            main(["ask", str(CT), "Is there a lung?", "--preset", "tiny", *flags])
        assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
    assert loads == []


def test_other_output_folders_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """demo --output, evaluate --out, prepare's destination: a file in the way fails at once, in one line."""
    import MedVLSAM2Lib.demo
    import MedVLSAM2Lib.evaluation.evaluate

    ran: list = []
    monkeypatch.setattr(MedVLSAM2Lib.demo, "run_demo", lambda *a, **k: ran.append("demo"))
    monkeypatch.setattr(MedVLSAM2Lib.evaluation.evaluate, "evaluate", lambda *a, **k: ran.append("evaluate"))
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(["demo", "--output", str(blocker)]) == 2
    assert f"--output {blocker}: is a file, not a folder." in _one_error_line(capsys, "demo")
    assert main(["demo", "--output", str(blocker / "demo-output")]) == 2
    assert f"--output {blocker}: is a file, not a folder." in _one_error_line(capsys, "demo")
    assert main(["evaluate", "vqa", "--preset", "tiny", "--data", str(tmp_path), "--out", str(blocker / "out")]) == 2
    assert f"is below the file {blocker}, not a folder." in _one_error_line(capsys, "evaluate")
    assert main(["prepare", "m3dseg", str(tmp_path), str(blocker), "--code", "0011", "--preset", "tiny"]) == 2
    assert f"destination {blocker}: is a file, not a folder." in _one_error_line(capsys, "prepare")
    assert ran == [] and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_series_reaches_the_reader(monkeypatch, loads, capsys):
    import MedVLSAM2Lib.volume

    asked: list = []

    def read(path, *, series_uid=None):  # noqa: ANN001, ANN202
        asked.append(series_uid)
        raise InputError(f"{path}: no series with UID {series_uid!r}")

    monkeypatch.setattr(MedVLSAM2Lib.volume, "read_volume", read)
    assert main(["report", str(CT), "--series", "1.2.840.1", "--preset", "tiny"]) == 2
    assert "no series with UID '1.2.840.1'" in _one_error_line(capsys, "report")
    assert asked == ["1.2.840.1"] and loads == []


def test_a_z_scored_ct_needs_intensity_normalized(tmp_path, capsys):
    """The HU-range error suggests intensity='normalized': the CLI can now set it."""
    ct = read_volume(CT)
    values = ct.array.astype(np.float32)
    write_volume(ct.with_array((values - values.mean()) / values.std()), tmp_path / "z.nii.gz")
    ask = ["ask", str(tmp_path / "z.nii.gz"), "Is there a lung?", "--preset", "tiny", "--json"]
    assert main(ask) == 2
    assert "intensity='normalized'" in _one_error_line(capsys, "ask")
    assert main([*ask, "--intensity", "normalized"]) == 0
    assert '"kind": "short"' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- SIGTERM

SLOW_WRITER = """
import sys, time
from MedVLSAM2Lib import cli
from MedVLSAM2Lib.atomic import atomic_path

def slow_report(args):  # a command stopped while it writes its output
    with atomic_path(sys.argv[2]) as tmp:
        tmp.write_text("half a file")
        print("writing", flush=True)
        time.sleep(120)
    return 0

cli._report = slow_report
sys.exit(cli.main(["report", sys.argv[1], "--preset", "tiny"]))
"""


@pytest.mark.parametrize(("signum", "code", "said"), [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                                      (signal.SIGINT, 130, "interrupted")])  # fmt: skip
def test_a_signal_while_writing_leaves_no_partial_file(tmp_path, signum, code, said):
    target = tmp_path / "mask.nii.gz"
    process = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(CT), str(target)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert process.stdout.readline() == "writing\n"
        assert [p.name for p in tmp_path.iterdir()] == [f".mask.partial-{process.pid}.nii.gz"]
        process.send_signal(signum)
        assert process.wait(timeout=30) == code
    finally:
        process.kill()
        process.wait()
    assert process.stderr.read().strip().splitlines() == [f"medvlsam2 report: {said}"]
    assert list(tmp_path.iterdir()) == []


def test_main_restores_the_sigterm_handler_it_found(capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(["report", "missing.nii.gz", "--preset", "tiny"]) == 2
    assert signal.getsignal(signal.SIGTERM) is before
    capsys.readouterr()


def test_stale_partial_files_of_dead_writers_go_on_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = tmp_path / f".mask.partial-{dead.pid}.nii.gz"
        kept = [
            tmp_path / f".mask.partial-{alive.pid}.nii.gz",  # a writer at work
            tmp_path / f".mask.partial-{dead.pid}.seg.nrrd",  # another target's
            tmp_path / f".other.partial-{dead.pid}.nii.gz",
            tmp_path / f".mask.partial-{dead.pid}x.nii.gz",  # not the exact pattern
            tmp_path / f"mask.partial-{dead.pid}.nii.gz",
            tmp_path / ".mask.partial-0.nii.gz",  # never os.kill(0, ...)
        ]
        for path in (stale, *kept):
            path.write_text("left behind")
        with atomic_path(tmp_path / "mask.nii.gz") as tmp:
            tmp.write_text("new")
        assert not stale.exists() and all(path.exists() for path in kept)
        assert (tmp_path / "mask.nii.gz").read_text() == "new"
    finally:
        alive.kill()
        alive.wait()


# ---------------------------------------------------------------------------------------------------- control bytes


class FakeEngine:
    """Answers, reports and labels full of control characters, as a model's text may be."""

    def encode(self, volume, intensity="hu"):  # noqa: ANN001, ANN201
        return SimpleNamespace(volume=volume)

    def ask(self, handle, question, history=(), kind="short"):  # noqa: ANN001, ANN201
        return Answer(EVIL, kind, None, 0.0)

    def report(self, handle, on_token=None):  # noqa: ANN001, ANN201
        if on_token:
            on_token(EVIL)
        return Report(EVIL, EVIL, "", 3, 0.0)

    def segment(self, handle, text=None, points=(), boxes=(), answer=None):  # noqa: ANN001, ANN201
        mask = np.zeros(handle.volume.array.shape, np.uint8)
        mask[10, 60:70, 60:70] = 1
        objects = [] if text == "nothing" else [ObjectMask(EVIL, mask, 0.5)]
        return SegmentResult("q", EVIL, objects, handle.volume.ijk_to_ras, {"total": 0.0}, message=EVIL)


@pytest.fixture
def fake_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    from MedVLSAM2Lib.engine import InferenceEngine

    monkeypatch.setattr(InferenceEngine, "load", classmethod(lambda cls, *a, **k: FakeEngine()))


@pytest.mark.parametrize(
    "args",
    [
        ["ask", str(CT), "Is there a liver?"],
        ["report", str(CT)],
        ["segment", str(CT), "--text", "liver"],
        ["segment", str(CT), "--text", "nothing"],  # the answer, then the error with the model's message
    ],
)
def test_model_text_cannot_drive_the_terminal(fake_engine, capsys, args):
    code = main([*args, "--preset", "tiny"])
    printed = capsys.readouterr()
    assert code == (2 if "nothing" in args else 0)
    assert "liver\\x1b[2J\\x07\\x0d\\x9b]0;owned\\x07" in printed.out
    assert not any(byte in printed.out + printed.err for byte in CONTROL_BYTES)


def test_json_output_escapes_control_characters(fake_engine, capsys):
    import json

    assert main(["ask", str(CT), "Is there a liver?", "--preset", "tiny", "--json"]) == 0
    printed = capsys.readouterr().out
    assert not any(byte in printed for byte in CONTROL_BYTES) and json.loads(printed)["answer"] == EVIL


# ---------------------------------------------------------------------------------------------------- the client


@pytest.fixture
def bad_server() -> Iterator[Callable[[Callable[[socket.socket, bytes], None]], str]]:
    """Start a socket server on 127.0.0.1 that reads each request head and hands the connection to ``answer``
    (which closes it early); returns its URL."""
    listeners: list[socket.socket] = []

    def start(answer: Callable[[socket.socket, bytes], None]) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def run() -> None:
            while True:
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                with connection:
                    head = b""
                    while b"\r\n\r\n" not in head and (chunk := connection.recv(65536)):
                        head += chunk
                    answer(connection, head)

        threading.Thread(target=run, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in listeners:
        listener.close()


def _hang_up(connection: socket.socket, head: bytes) -> None:
    pass


def _half_chunked(connection: socket.socket, head: bytes) -> None:
    kind = b"application/x-ndjson" if b"/report" in head else b"application/json"
    body = b'{"token": "The "}\n' if b"/report" in head else b'{"protocol'
    connection.sendall(b"HTTP/1.1 200 OK\r\nX-MedVLSAM2-Protocol: 1\r\nContent-Type: " + kind +
                       b"\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n")  # fmt: skip


@pytest.mark.parametrize("answer", [_hang_up, _half_chunked])
def test_a_connection_that_broke_is_not_an_unreachable_server(bad_server, answer):
    url = bad_server(answer)
    client = ServerClient(url, retries=1, backoff_s=0.01)
    handle = RemoteHandle("key", (2, 2, 2), volume=None)
    calls = [client.capabilities, lambda: client.ask(handle, "Is there a liver?"),
             lambda: client.report(handle, on_token=lambda piece: None)]  # fmt: skip
    for call in calls:
        with pytest.raises(ServerError) as info:
            call()
        message = str(info.value)
        assert message.startswith(f"the connection to {url} broke during ") and "cannot reach" not in message
        assert "; the server may have restarted or hit a limit; retry." in message


def test_an_unreachable_server_and_a_silent_one_are_told_apart(bad_server):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once closed
    with pytest.raises(ServerError, match=r"cannot reach the MedVLSAM2 server at http://127\.0\.0\.1:\d+ \(Connection "
                                          r"refused\)\. Is `medvlsam2 serve` running"):  # fmt: skip
        ServerClient(f"http://127.0.0.1:{port}", retries=0).capabilities()
    release = threading.Event()
    url = bad_server(lambda connection, head: release.wait(10))
    try:
        with pytest.raises(ServerError, match=r"did not answer GET /capabilities within 0\.5 s"):
            ServerClient(url, read_timeout=0.5).capabilities()
    finally:
        release.set()


def test_a_write_that_fails_after_the_model_ran_is_one_line(fake_engine, monkeypatch, tmp_path, capsys):
    import errno

    import MedVLSAM2Lib.segmentation

    def full(segmentation, path):  # noqa: ANN001, ANN202
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MedVLSAM2Lib.segmentation, "write_segmentation", full)
    assert main(["segment", str(CT), "--text", "liver", "--preset", "tiny", "-o", str(tmp_path / "m.seg.nrrd")]) == 2
    assert "m.seg.nrrd: cannot write (No space left on device); nothing written." in _one_error_line(capsys, "segment")
    assert list(tmp_path.iterdir()) == []


def test_every_command_that_reads_a_ct_has_intensity_and_series(capsys):
    for command in ("report", "ask", "chat", "segment"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        help_text = capsys.readouterr().out
        assert "--intensity {hu,normalized}" in help_text and "--series SERIES" in help_text
