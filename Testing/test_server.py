"""The real server (uvicorn on 127.0.0.1, tiny preset) driven over HTTP through ``client.py``: remote equals local
bit for bit, sessions are reused and recreated, 8 concurrent clients never cross, bad input and bad keys are
answered by status and code while the server stays healthy, and a killed server never yields a wrong mask."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import select
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from serving_fixtures import CLI, KEY, free_port, in_process_server, start_server, stop_server

from MedVLSAM2Lib.demo import default_inputs
from MedVLSAM2Lib.engine import InferenceEngine
from MedVLSAM2Lib.errors import InputError, ServerError
from MedVLSAM2Lib.prompts import BoxPrompt, PointPrompt
from MedVLSAM2Lib.segmentation import read_segmentation
from MedVLSAM2Lib.serving.client import ServerClient
from MedVLSAM2Lib.serving.protocol import MAGIC, pack, volume_to_frame
from MedVLSAM2Lib.volume import Volume, read_volume

pytestmark = [pytest.mark.realdata, pytest.mark.server]

BOX = BoxPrompt((30, 40, 10), (80, 90, 20))
POINTS = [PointPrompt((60, 70, 15), 1), PointPrompt((20, 20, 5), 0)]


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:  # noqa: ANN001
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="module")
def server(server_log):  # noqa: ANN001, ANN201
    port = free_port()
    process = start_server(port, "--max-upload-mb", "4", "--max-sessions", "16", "--cache-gb", "0.5",
                           "--max-prompt-tokens", "4096", log=server_log)  # fmt: skip
    yield f"http://127.0.0.1:{port}"
    stop_server(process)


@pytest.fixture(scope="module")
def engine() -> InferenceEngine:
    return InferenceEngine.load("tiny")


@pytest.fixture(scope="module")
def volumes(data_dir) -> dict[str, Volume]:  # noqa: ANN001
    return {"nrrd": read_volume(default_inputs()[0]),
            "nifti": read_volume(data_dir / "totalsegmentator" / "subjectA_abdomen_pelvis_native" /
                                 "example_ct_sm.nii.gz")}  # fmt: skip


def _same_segmentation(remote, local) -> None:  # noqa: ANN001
    assert remote.answer == local.answer and remote.question == local.question
    assert (remote.from_prompts, remote.message) == (local.from_prompts, local.message)
    assert np.array_equal(remote.ijk_to_ras, local.ijk_to_ras)
    assert [o.label for o in remote.objects] == [o.label for o in local.objects]
    for r, o in zip(remote.objects, local.objects, strict=True):
        assert r.mask.dtype == o.mask.dtype and np.array_equal(r.mask, o.mask) and r.score == o.score


def test_remote_results_equal_local_bit_for_bit(server, engine, volumes):
    client = ServerClient(server, KEY)
    capabilities = client.capabilities()
    assert capabilities["model"]["preset"] == "tiny"
    assert (capabilities["model"]["cache_limit_bytes"], capabilities["limits"]["cache_gb"]) == (2**29, 0.5)
    assert (capabilities["model"]["max_prompt_tokens"], capabilities["limits"]["max_prompt_tokens"]) == (4096, 4096)
    for volume in volumes.values():
        remote, local = client.encode(volume), engine.encode(volume)
        assert remote.key == local.key and remote.shape_kji == local.shape_kji
        _same_segmentation(client.segment(remote, text="liver"), engine.segment(local, text="liver"))
        _same_segmentation(client.segment(remote, text="spleen", boxes=[BOX], points=POINTS),
                           engine.segment(local, text="spleen", boxes=[BOX], points=POINTS))  # fmt: skip
        _same_segmentation(client.segment(remote, points=POINTS), engine.segment(local, points=POINTS))
        question = "Which organ is enlarged? (a) liver (b) spleen"
        for kind in ("short", "choice"):
            r, o = client.ask(remote, question, kind=kind), engine.ask(local, question, kind=kind)
            assert (r.text, r.kind, r.choice) == (o.text, o.kind, o.choice)
        history = [("Is this a CT?", "Yes.")]
        assert client.ask(remote, "Any effusion?", history).text == engine.ask(local, "Any effusion?", history).text
        tokens: list[str] = []
        streamed = client.report(remote, on_token=tokens.append, max_new_tokens=24)
        plain, expected = client.report(remote, max_new_tokens=24), engine.report(local, max_new_tokens=24)
        assert streamed.text == plain.text == expected.text and streamed.tokens == expected.tokens
        assert len(tokens) >= 2 and "".join(tokens).strip() == expected.text
    # the same volume uploaded again finds its session
    sessions = client.capabilities(refresh=True)["sessions"]
    again = client.encode(volumes["nrrd"])
    assert again.key == engine.encode(volumes["nrrd"]).key
    assert client.capabilities(refresh=True)["sessions"] == sessions


def test_a_closed_session_is_recreated_transparently(server, engine, volumes):
    client = ServerClient(server, KEY)
    handle = client.encode(volumes["nifti"])
    client.close(handle)
    uploads = []
    original = client.encode
    client.encode = lambda *a, **k: uploads.append(1) or original(*a, **k)  # count re-uploads
    remote = client.segment(handle, text="liver", boxes=[BOX])
    assert uploads == [1]
    _same_segmentation(remote, engine.segment(engine.encode(volumes["nifti"]), text="liver", boxes=[BOX]))


@pytest.mark.slow
def test_eight_concurrent_clients_never_cross(server, engine, volumes):
    base = volumes["nrrd"]
    mine = [Volume(base.array[:, :, n * 4 : n * 4 + 100].copy(), base.ijk_to_ras) for n in range(8)]
    asks = ["Is there a liver lesion?", "Is the spleen enlarged?"]
    expected = []
    for volume in mine:
        handle = engine.encode(volume)
        expected.append({"liver": engine.segment(handle, text="liver"),
                         "box": engine.segment(handle, boxes=[BOX]),
                         **{q: engine.ask(handle, q).text for q in asks}})  # fmt: skip

    def work(n: int) -> int:
        client, done = ServerClient(server, KEY), 0
        handle = client.encode(mine[n])
        for step in range(20):
            kind = step % 5
            if kind == 0:
                _same_segmentation(client.segment(handle, text="liver"), expected[n]["liver"])
            elif kind == 1:
                _same_segmentation(client.segment(handle, boxes=[BOX]), expected[n]["box"])
            elif kind in (2, 3):
                assert client.ask(handle, asks[kind - 2]).text == expected[n][asks[kind - 2]]
            else:
                assert client.encode(mine[n]).key == handle.key
            done += 1
        return done

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(work, range(8))) == [20] * 8
    assert requests.get(f"{server}/healthz", timeout=5).json()["status"] == "ok"


def _error(response: requests.Response) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status_code, error["code"], error["message"]


def test_bad_requests_get_status_code_and_message_and_the_server_stays_healthy(server, server_log, volumes):
    auth = {"Authorization": f"Bearer {KEY}"}
    client = ServerClient(server, KEY)
    handle = client.encode(volumes["nifti"])
    segment_url = f"{server}/sessions/{handle.key}/segment"
    assert requests.get(f"{server}/healthz", timeout=5).status_code == 200  # liveness needs no key
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": KEY}):
        status, code, message = _error(requests.get(f"{server}/capabilities", headers=headers, timeout=5))
        assert (status, code) == (401, "unauthorized") and "Authorization: Bearer" in message and KEY not in message
        assert _error(requests.post(f"{server}/sessions", data=b"x", headers=headers, timeout=5))[:2] == (
            401, "unauthorized")  # fmt: skip
    with pytest.raises(ServerError, match="missing or wrong API key"):
        ServerClient(server, "wrong-key").capabilities()

    def upload(body: bytes) -> tuple[int, str, str]:
        return _error(requests.post(f"{server}/sessions", data=body, headers=auth, timeout=30))

    good = volume_to_frame(Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 10, np.eye(4)))
    array = {"dtype": "float32", "shape": [8, 8, 8], "order": "C", "codec": "raw", "nbytes": 100,
             "ijk_to_ras": np.eye(4).tolist()}  # fmt: skip
    header = {"protocol": 1, "meta": {}, "arrays": [array]}
    raw = json.dumps(header).encode()
    assert upload(MAGIC + struct.pack("<I", len(raw)) + raw + bytes(100)) == (
        400, "bad_payload", "array 0: 100 bytes do not match shape [8, 8, 8] of float32 (2048 bytes).")  # fmt: skip
    header["arrays"][0].update(dtype="complex128", nbytes=8192)
    raw = json.dumps(header).encode()
    status, code, message = upload(MAGIC + struct.pack("<I", len(raw)) + raw + bytes(8192))
    assert (status, code) == (400, "bad_payload") and "dtype 'complex128' is not allowed" in message
    status, code, message = upload(good[:-7])
    assert (status, code) == (400, "bad_payload") and "truncated" in message
    status, code, message = upload(b"<html>not a frame</html>")
    assert (status, code) == (400, "bad_payload") and "not a MedVLSAM2 frame" in message
    status, code, message = upload(pack({}, [(np.zeros((4, 4, 4), np.float32), {"ijk_to_ras": np.eye(4).tolist()})]))
    assert (status, code) == (400, "bad_input") and "constant" not in message and "HU" in message
    # malformed JSON, unknown fields, unknown session, a point outside the volume
    response = requests.post(segment_url, data=b"{not json", headers={**auth, "Content-Type": "application/json"},
                             timeout=30)  # fmt: skip
    assert _error(response)[:2] == (400, "bad_request")
    status, code, message = _error(requests.post(segment_url, json={"txt": "liver"}, headers=auth, timeout=30))
    assert (status, code) == (400, "bad_request") and "txt" in message
    status, code, message = _error(requests.post(f"{server}/sessions/{'0' * 64}/ask", json={"question": "Why?"},
                                                 headers=auth, timeout=30))  # fmt: skip
    assert (status, code) == (404, "session_not_found") and "upload the volume again" in message
    assert _error(requests.delete(f"{server}/sessions/nope", headers=auth, timeout=30))[:2] == (
        404,
        "session_not_found",
    )
    body = {"points": [{"ijk": [5000, 10, 10], "label": 1}]}
    status, code, message = _error(requests.post(segment_url, json=body, headers=auth, timeout=30))
    assert (status, code) == (400, "bad_input") and "is outside the volume" in message
    with pytest.raises(InputError, match="is outside the volume"):
        client.segment(handle, points=[PointPrompt((5000, 10, 10))])
    body = {"question": "Why?", "kind": "essay"}
    response = requests.post(f"{server}/sessions/{handle.key}/ask", json=body, headers=auth, timeout=30)
    status, code, message = _error(response)
    assert (status, code) == (400, "bad_input") and "unknown answer kind 'essay'" in message
    # a client of another protocol version is told so
    response = requests.get(f"{server}/capabilities", headers={**auth, "X-MedVLSAM2-Protocol": "2"}, timeout=5)
    status, code, message = _error(response)
    assert (status, code) == (400, "protocol_mismatch") and "client speaks protocol 2, this server 1" in message
    # the server is still healthy and correct
    assert requests.get(f"{server}/healthz", timeout=5).ok
    assert client.segment(handle, boxes=[BOX]).objects[0].mask.shape == handle.shape_kji
    log = server_log.read_text()
    assert "POST /sessions" in log and KEY not in log and "wrong-key" not in log and "Traceback" not in log


def test_an_upload_over_the_limit_is_refused_before_it_is_read(server):
    host, port = server.removeprefix("http://").split(":")
    # declared too large: refused from the headers, after 64 KiB of 100 MiB were sent
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/sessions")
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.putheader("Content-Length", str(100 << 20))
    connection.endheaders()
    connection.send(bytes(64 << 10))
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "too_large"
    connection.close()
    # streamed without a length: answered 413 once past the limit (4 MiB) while the body is still unfinished
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.putrequest("POST", "/sessions")
    connection.putheader("Authorization", f"Bearer {KEY}")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    chunk = bytes(1 << 20)
    for _ in range(6):
        connection.send(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    readable, _, _ = select.select([connection.sock], [], [], 30)
    assert readable, "no answer while the upload was still open"
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "too_large"
    connection.close()
    assert requests.get(f"{server}/healthz", timeout=5).ok


def test_the_client_names_what_it_reached(server, monkeypatch, tmp_path):
    class NotOurs(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 — the http.server API
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>corporate proxy</html>")

        def log_message(self, *args) -> None:  # noqa: ANN002
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), NotOurs)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{other.server_port}")
    with pytest.raises(ServerError, match=r"answered HTTP 200 \(text/html\) but is not a MedVLSAM2 server\. A proxy "
                                          r"\(HTTP_PROXY is set\) may be answering instead: add the server's host to "
                                          r"NO_PROXY"):  # fmt: skip
        ServerClient(f"http://127.0.0.1:{other.server_port}", KEY).capabilities()
    other.shutdown()
    # with HTTP_PROXY still set, the client reaches the server on this machine directly
    assert ServerClient(server.replace("127.0.0.1", "localhost"), KEY).capabilities()["protocol"] == 1
    newer = ServerClient(server, KEY)
    newer._http.headers["X-MedVLSAM2-Protocol"] = "2"  # what a client of a later release sends
    with pytest.raises(ServerError, match=r"client speaks protocol 2, this server 1 .*install the same version"):
        newer.capabilities()
    with pytest.raises(ServerError, match="cannot reach the MedVLSAM2 server at http://127.0.0.1:"):
        ServerClient(f"http://127.0.0.1:{free_port()}", KEY, retries=1, backoff_s=0.01).capabilities()


def test_binding_beyond_loopback_without_a_key_is_refused_atstart_server():
    env = {k: v for k, v in os.environ.items() if k != "MEDVLSAM2_API_KEY"}
    result = subprocess.run([*CLI, "serve", "--preset", "tiny", "--host", "0.0.0.0", "--port", str(free_port())],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "refusing to listen on 0.0.0.0 without an API key" in result.stderr
    short = subprocess.run([*CLI, "serve", "--preset", "tiny", "--api-key", "short-key-12345", "--port",
                            str(free_port())], env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert short.returncode == 2 and "Traceback" not in short.stderr
    assert "the API key has 15 characters; use at least 16" in short.stderr


@pytest.mark.slow
def test_expired_and_restarted_servers_never_give_a_wrong_mask(engine, volumes, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    process = start_server(port, "--idle-timeout", "2", log=log)
    try:
        client = ServerClient(f"http://127.0.0.1:{port}", KEY, retries=0)
        uploads = []
        original = client.encode
        client.encode = lambda *a, **k: uploads.append(1) or original(*a, **k)
        expected = engine.segment(engine.encode(volumes["nifti"]), text="liver", boxes=[BOX])  # before the 2 s start
        handle = client.encode(volumes["nifti"])
        _same_segmentation(client.segment(handle, text="liver", boxes=[BOX]), expected)
        time.sleep(3)  # idle past the timeout: the session expires and is uploaded again
        _same_segmentation(client.segment(handle, text="liver", boxes=[BOX]), expected)
        assert len(uploads) == 2
        process.kill()
        process.wait(timeout=20)
        with pytest.raises(ServerError, match="cannot reach the MedVLSAM2 server"):
            client.segment(handle, text="liver", boxes=[BOX])
        process = start_server(port, "--idle-timeout", "2", log=log)
        _same_segmentation(client.segment(handle, text="liver", boxes=[BOX]), expected)
        assert len(uploads) == 3
    finally:
        stop_server(process)


@pytest.mark.slow
def test_cli_with_server_gives_the_local_result(server, tmp_path):
    ct = str(default_inputs()[0])
    env = {**os.environ, "MEDVLSAM2_API_KEY": KEY}
    outputs = {}
    for where, flags in (("local", ["--preset", "tiny"]), ("remote", ["--server", server])):
        out = tmp_path / f"{where}.seg.nrrd"
        command = [*CLI, "segment", ct, "--text", "liver", "--box", "30,40,10,80,90,20", "--json", "-o", str(out),
                   "--answer", "It is [SEG]."]  # fmt: skip
        result = subprocess.run(command + flags, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[where] = (json.loads(result.stdout), read_segmentation(out))
    (local, local_seg), (remote, remote_seg) = outputs["local"], outputs["remote"]
    assert local["answer"] == remote["answer"] and local["objects"] == remote["objects"]
    for a, b in zip(local_seg.segments, remote_seg.segments, strict=True):
        assert a.name == b.name and np.array_equal(a.mask, b.mask)
    answers = []
    for flags in (["--preset", "tiny"], ["--server", server]):
        result = subprocess.run([*CLI, "ask", ct, "Is the liver normal?", "--json", *flags], env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        answers.append(json.loads(result.stdout)["answer"])
    assert answers[0] == answers[1]
    command = [*CLI, "ask", ct, "Is the liver normal?", "--server", server.replace("http://", ""), "--json"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "lacks its scheme: write http://127.0.0.1:" in result.stderr


def test_an_unexpected_server_failure_is_named_as_one(volumes):
    class BrokenEngine:
        def describe(self) -> dict:
            return {"preset": "broken"}

        def encode(self, volume, intensity="hu", cancel=None):  # noqa: ANN001, ANN201
            raise RuntimeError("a bug deep inside")

    with in_process_server(BrokenEngine()) as url:
        client = ServerClient(url, KEY)
        with pytest.raises(ServerError, match=r"the server failed on this request; its log has the details") as err:
            client.encode(volumes["nifti"])
        assert "not a MedVLSAM2 server" not in str(err.value) and "a bug deep inside" not in str(err.value)
