"""The server's limits, one by one (issue 20): the key is checked before any body byte, every body is bounded
while it streams and timed out when it stalls, uploads are capped, model work has a time limit and stops when its
client leaves, closed sessions drop their encodings, errors have one format, and SIGTERM drains then exits."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from serving_fixtures import KEY, free_port, in_process_server

from MedVLSAM2Lib.engine import MAX_SEG_OBJECTS, InferenceEngine
from MedVLSAM2Lib.errors import TooLargeError, raise_if_cancelled
from MedVLSAM2Lib.serving.client import ServerClient
from MedVLSAM2Lib.serving.protocol import MAGIC, pack, volume_to_frame
from MedVLSAM2Lib.templates import SEG_TOKEN
from MedVLSAM2Lib.volume import Volume

pytestmark = pytest.mark.server

AUTH = {"Authorization": f"Bearer {KEY}"}
CT = Volume(np.where(np.arange(8 * 16 * 16).reshape(8, 16, 16) % 7 == 0, -1000, 40).astype(np.int16), np.eye(4))


class Handle:
    def __init__(self, key: str) -> None:
        self.key, self.shape_kji = key, (8, 16, 16)


class SlowEngine:
    """Answers questions only when cancelled (or after ``seconds``): the server's limits are what ends its work."""

    def __init__(self, seconds: float = 60.0) -> None:
        self.seconds, self.cancels, self.forgotten = seconds, [], []
        self.started = threading.Event()

    def describe(self) -> dict:
        return {"preset": "slow"}

    def encode(self, volume, intensity="hu", cancel=None):  # noqa: ANN001, ANN201
        return Handle("a" * 64)

    def forget(self, key: str) -> bool:
        self.forgotten.append(key)
        return True

    def ask(self, handle, question, history=(), kind="short", cancel=None):  # noqa: ANN001, ANN201
        self.started.set()
        deadline = time.monotonic() + self.seconds
        while time.monotonic() < deadline:
            if cancel.is_set():
                self.cancels.append(time.monotonic())
            raise_if_cancelled(cancel, "the answer")
            time.sleep(0.01)
        raise AssertionError("the server never cancelled the answer")

    def report(self, handle, on_token=None, max_new_tokens=512, cancel=None):  # noqa: ANN001, ANN201
        on_token("Findings:")
        return self.ask(handle, "report", cancel=cancel)


def _error(response: requests.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


def _raw_request(url: str, head: str, body: bytes = b"") -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return sock


def _answer(sock: socket.socket, within_s: float) -> tuple[int, dict]:
    readable, _, _ = select.select([sock], [], [], within_s)
    assert readable, f"no answer within {within_s} s"
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
        data.lower().partition(b"content-length: ")[2].split(b"\r\n")[0] or 0
    ):  # fmt: skip
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_the_key_is_checked_before_any_body_byte_is_read():
    with in_process_server(SlowEngine()) as url:
        for path in ("/sessions", "/sessions/x/ask"):
            head = f"POST {path} HTTP/1.1\nHost: x\nContent-Type: application/json\nContent-Length: {100 << 20}\n"
            sock = _raw_request(url, head)  # the headers only: not one byte of the 100 MB body
            status, body = _answer(sock, within_s=5)
            assert (status, body["error"]["code"]) == (401, "unauthorized")
            sock.close()


def test_every_route_bounds_its_body_while_it_streams_and_answers_a_stalled_body_408():
    with in_process_server(SlowEngine(), max_json_kb=64, body_timeout_s=1.0) as url:
        declared = f"POST /sessions/x/ask HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\nContent-Length: {1 << 20}\n"
        status, body = _answer(_raw_request(url, declared), within_s=5)
        assert (status, body["error"]["code"]) == (413, "too_large") and "--max-json-kb" in body["error"]["message"]
        chunked = f"POST /sessions/x/ask HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\nTransfer-Encoding: chunked\n"
        sock = _raw_request(url, chunked)
        chunk = b"x" * 16384
        for _ in range(5):  # 80 KiB of an endless body: answered once past 64 KiB
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        status, body = _answer(sock, within_s=5)
        assert (status, body["error"]["code"]) == (413, "too_large")
        stalled = f"POST /sessions HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\nContent-Length: 1000\n"
        start = time.monotonic()
        status, body = _answer(_raw_request(url, stalled, b"x" * 10), within_s=10)
        assert (status, body["error"]["code"]) == (408, "body_timeout") and "--body-timeout" in body["error"]["message"]
        assert 0.9 < time.monotonic() - start < 5


def test_uploads_over_the_cap_wait_for_a_slot_and_are_refused_503_when_none_frees_in_time():
    frame = volume_to_frame(CT)
    with in_process_server(SlowEngine(), max_uploads=1, body_timeout_s=1.5, request_timeout_s=3.0) as url:
        stalled = f"POST /sessions HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\nContent-Length: 1000\n"
        first = _raw_request(url, stalled, b"x")
        time.sleep(0.3)
        start = time.monotonic()  # waits for the stalled upload's 408, then goes through
        response = requests.post(f"{url}/sessions", data=frame, headers=AUTH, timeout=30)
        assert response.ok and 1.0 < time.monotonic() - start < 4
        assert _answer(first, within_s=1)[0] == 408
        holders = [_raw_request(url, stalled, b"x") for _ in range(3)]  # one holds the slot, 2 wait behind it
        start = time.monotonic()
        status, code, message = _error(requests.post(f"{url}/sessions", data=frame, headers=AUTH, timeout=30))
        assert (status, code) == (503, "busy") and "--max-uploads" in message and time.monotonic() - start < 4.5
        for sock in holders:
            sock.close()


def test_model_work_past_the_request_timeout_is_stopped_and_answered_504():
    engine = SlowEngine()
    with in_process_server(engine, request_timeout_s=1.0) as url:
        session = requests.post(f"{url}/sessions", data=volume_to_frame(CT), headers=AUTH, timeout=30).json()
        start = time.monotonic()
        response = requests.post(f"{url}/sessions/{session['session']}/ask", json={"question": "Why?"}, headers=AUTH,
                                 timeout=30)  # fmt: skip
        status, code, message = _error(response)
        assert (status, code) == (504, "timeout") and "--request-timeout" in message
        assert engine.cancels and 0.9 < engine.cancels[0] - start < 2.0
        response = requests.post(f"{url}/sessions/{session['session']}/report", json={"stream": True}, headers=AUTH,
                                 timeout=30)  # fmt: skip
        lines = [json.loads(line) for line in response.iter_lines()]
        assert lines[0] == {"token": "Findings:"} and lines[-1]["error"]["code"] == "timeout"


def test_a_client_that_leaves_stops_its_model_work(caplog):
    engine = SlowEngine()
    with caplog.at_level(logging.INFO), in_process_server(engine) as url:
        session = requests.post(f"{url}/sessions", data=volume_to_frame(CT), headers=AUTH, timeout=30).json()
        body = json.dumps({"question": "Why?"}).encode()
        head = (f"POST /sessions/{session['session']}/ask HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\n"
                f"Content-Type: application/json\nContent-Length: {len(body)}\n")  # fmt: skip
        sock = _raw_request(url, head, body)
        assert engine.started.wait(10)
        sock.close()
        left = time.monotonic()
        deadline = left + 10
        while not engine.cancels and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.cancels and engine.cancels[0] - left < 1.0
    assert any("the client left; the answer was stopped" in r.getMessage() for r in caplog.records)


def test_an_aborted_upload_is_one_log_line(caplog):
    with caplog.at_level(logging.INFO), in_process_server(SlowEngine()) as url:
        head = f"POST /sessions HTTP/1.1\nHost: x\nAuthorization: Bearer {KEY}\nContent-Length: {1 << 20}\n"
        sock = _raw_request(url, head, bytes(10000))
        time.sleep(0.3)
        sock.close()
        time.sleep(0.5)
        assert requests.get(f"{url}/healthz", timeout=5).ok
    records = [r for r in caplog.records if r.name.startswith(("MedVLSAM2Lib", "uvicorn"))]
    left = [r for r in records if "the client left during the upload" in r.getMessage()]
    assert len(left) == 1 and "after 10000 bytes" in left[0].getMessage()
    assert not any(r.exc_info for r in records) and all(r.levelno < logging.ERROR for r in records)


def test_unknown_routes_methods_and_deeply_nested_json_get_the_documented_error_format():
    with in_process_server(SlowEngine()) as url:
        status, code, message = _error(requests.get(f"{url}/nope", headers=AUTH, timeout=5))
        assert (status, code) == (404, "not_found") and "GET /nope" in message
        status, code, message = _error(requests.get(f"{url}/sessions", headers=AUTH, timeout=5))
        assert (status, code) == (405, "method_not_allowed") and "GET is not allowed on /sessions" in message
        nested = b'{"question": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        response = requests.post(f"{url}/sessions/x/ask", data=nested, timeout=10,
                                 headers={**AUTH, "Content-Type": "application/json"})  # fmt: skip
        status, code, message = _error(response)
        assert (status, code) == (400, "bad_request") and "nested too deeply" in message
        header = b'{"protocol": 1, "meta": {"x": ' + b"[" * 100000 + b"]" * 100000 + b'}, "arrays": []}'
        frame = MAGIC + struct.pack("<I", len(header)) + header
        status, code, message = _error(requests.post(f"{url}/sessions", data=frame, headers=AUTH, timeout=10))
        assert (status, code) == (400, "bad_payload") and "nested too deeply" in message
        for matrix in (np.diag([1e300, 1e300, 1e300, 1.0]), np.diag([1e-200, 1e200, 1.0, 1.0])):
            frame = pack({}, [(CT.array, {"ijk_to_ras": matrix.tolist()})])
            status, code, message = _error(requests.post(f"{url}/sessions", data=frame, headers=AUTH, timeout=10))
            assert (status, code) == (400, "bad_input") and "voxel spacing" in message and "\n" not in message
        assert requests.get(f"{url}/healthz", timeout=5).ok


def test_closing_a_session_drops_the_volumes_encodings():
    engine = InferenceEngine.load("tiny")
    with in_process_server(engine) as url:
        client = ServerClient(url, KEY)
        handle = client.encode(CT)
        assert engine.describe()["cached_volumes"] == 1
        requests.delete(f"{url}/sessions/{handle.key}", headers=AUTH, timeout=30).raise_for_status()
        assert engine.describe()["cached_volumes"] == 0


def test_a_prompt_over_the_token_limit_is_refused_413_before_the_model_runs(monkeypatch):
    engine = InferenceEngine.load("tiny", max_prompt_tokens=1024)
    handle = engine.encode(CT)
    monkeypatch.setattr(engine.model, "generate", lambda *a, **k: pytest.fail("the model ran"))
    history = [("What is seen in the chest? " * 40, "Nothing abnormal is seen in the chest. " * 40)] * 3
    with pytest.raises(TooLargeError, match=r"the prompt has \d+ tokens .* at most 1024 are accepted"):
        engine.ask(handle, "And the liver?", history=history)
    with in_process_server(engine) as url:
        session = requests.post(f"{url}/sessions", data=volume_to_frame(CT), headers=AUTH, timeout=30).json()
        response = requests.post(f"{url}/sessions/{session['session']}/ask", headers=AUTH, timeout=30,
                                 json={"question": "And the liver?", "history": history})  # fmt: skip
        status, code, message = _error(response)
        assert (status, code) == (413, "too_large") and "--max-prompt-tokens" in message


def test_a_given_answer_with_too_many_seg_tokens_is_refused():
    engine = InferenceEngine.load("tiny")
    handle = engine.encode(CT)
    with pytest.raises(TooLargeError, match=f"at most {MAX_SEG_OBJECTS} objects"):
        engine.segment(handle, text="liver", answer=f"It is {SEG_TOKEN}." * (MAX_SEG_OBJECTS + 1))


DRAIN_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    sys.path.insert(0, {testing!r})
    from test_server_limits import SlowEngine
    from MedVLSAM2Lib.serving.server import ServerSettings, create_app, run_app

    settings = ServerSettings(port={port}, api_key={key!r}, shutdown_grace_s=1.0)
    run_app(create_app(SlowEngine(), settings), settings)
    """
)


def test_sigterm_drains_running_work_within_the_grace_period_then_exits(tmp_path):
    port = free_port()
    script = DRAIN_SCRIPT.format(testing=str(Path(__file__).parent), port=port, key=KEY)
    log = tmp_path / "server.log"
    process = subprocess.Popen([sys.executable, "-c", script], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{url}/healthz", timeout=1).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        session = requests.post(f"{url}/sessions", data=volume_to_frame(CT), headers=AUTH, timeout=30).json()
        answers: list[requests.Response] = []
        ask_url = f"{url}/sessions/{session['session']}/ask"
        asking = threading.Thread(target=lambda: answers.append(requests.post(ask_url, json={"question": "Why?"},
                                                                              headers=AUTH, timeout=60)))  # fmt: skip
        asking.start()
        time.sleep(0.5)
        sent = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=15) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
        asking.join(timeout=5)
        assert time.monotonic() - sent < 1.0 + 5
        status, code, message = _error(answers[0])
        assert (status, code) == (503, "shutting_down") and "Retry once it is back" in message
        assert "Traceback" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
