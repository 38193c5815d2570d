"""Starting and stopping a real ``medvlsam2 serve`` (tiny preset) on 127.0.0.1 for the server and Slicer tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

KEY = "test-key-0123456789"
CLI = [str(Path(sys.executable).parent / "medvlsam2")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, *args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "MEDVLSAM2_API_KEY": KEY}
    command = [*CLI, "serve", "--preset", "tiny", "--port", str(port), *args]
    process = subprocess.Popen(command, env=env, stdout=log.open("a"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return process
        except requests.ConnectionError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(f"server did not start in 180 s: {log.read_text()[-2000:]}")


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@contextlib.contextmanager
def in_process_server(engine, **settings) -> Iterator[str]:  # noqa: ANN001, ANN003
    """The server app over ``engine`` with ``settings`` (:class:`ServerSettings` fields) on uvicorn in this process
    (a test can watch or break the engine); yields its URL and stops it after."""
    import uvicorn

    from MedVLSAM2Lib.serving.server import ServerSettings, create_app

    port = free_port()
    app = create_app(engine, ServerSettings(api_key=KEY, **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
