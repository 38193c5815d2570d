"""The client of ``medvlsam2 serve``: what the Slicer module and ``medvlsam2 … --server URL`` use.

::

    client = ServerClient("http://gpu-box:8765", api_key=key)
    handle = client.encode(volume)                   # uploads once; the same content reuses the session
    client.segment(handle, text="liver", boxes=[box])  # SegmentResult, masks on the volume's own grid

It has the methods of :class:`~MedVLSAM2Lib.engine.InferenceEngine` and returns the same result types. Every
call has connect and read timeouts; only idempotent calls (capabilities, uploads — sessions are keyed by
content — and closing) are retried, on connection failures; a session the server no longer has is uploaded
again once, transparently. Errors come back as the library's typed errors with the server's message.
requests and numpy only (no torch).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import requests

from ..errors import CapacityError, InputError, ProtocolError, ServerError, SessionExpiredError
from ..prompts import BoxPrompt, PointPrompt
from ..results import Answer, Report, SegmentResult
from ..volume import Volume
from .protocol import FRAME_MEDIA_TYPE, PROTOCOL_VERSION, segment_result_from_frame, volume_to_frame

__all__ = ["ServerClient", "RemoteHandle", "check_server_url", "API_KEY_ENV"]

API_KEY_ENV = "MEDVLSAM2_API_KEY"
PROTOCOL_HEADER = "X-MedVLSAM2-Protocol"
LOOPBACK = ("localhost", "127.0.0.1", "::1")
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
ERRORS: dict[str, type[Exception]] = {
    "session_not_found": SessionExpiredError,
    "bad_input": InputError,
    "too_large": InputError,
    "bad_payload": ProtocolError,
    "bad_request": ProtocolError,
    "capacity": CapacityError,
}


def check_server_url(url: str) -> str:
    """The server URL without a trailing slash.

    Raises:
        InputError: a missing ``http://``, another scheme, no host, or ``0.0.0.0`` (a listening address).
    """
    url = url.strip()
    parsed = urlparse(url)
    if "://" not in url:
        raise InputError(f"server URL {url!r} lacks its scheme: write http://{url} (or https://).")
    if parsed.scheme not in ("http", "https"):
        raise InputError(f"server URL {url!r}: only http:// and https:// are supported.")
    if not parsed.hostname:
        raise InputError(f"server URL {url!r} names no host.")
    if parsed.hostname in ("0.0.0.0", "::"):
        raise InputError(f"server URL {url!r}: {parsed.hostname} is where a server listens (every interface), "
                         "not an address to connect to; use 127.0.0.1 for this machine, or the server's name or "
                         "IP.")  # fmt: skip
    return url.rstrip("/")


@dataclass(frozen=True)
class RemoteHandle:
    """A volume uploaded to the server; keeps the volume so an expired session can be recreated."""

    key: str
    shape_kji: tuple[int, int, int]
    volume: Volume = field(repr=False, compare=False)
    intensity: str = "hu"


class ServerClient:
    """A MedVLSAM2 server at ``url``; ``api_key`` defaults to ``$MEDVLSAM2_API_KEY``."""

    def __init__(self, url: str, api_key: str | None = None, *, connect_timeout: float = 5.0,
                 read_timeout: float = 900.0, retries: int = 2, backoff_s: float = 0.5) -> None:  # fmt: skip
        self.url = check_server_url(url)
        self.timeout = (connect_timeout, read_timeout)
        self.retries, self.backoff_s = retries, backoff_s
        self._http = requests.Session()
        if urlparse(self.url).hostname in LOOPBACK:
            self._http.trust_env = False  # a proxy from the environment must not intercept this machine's server
        self._http.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
        api_key = api_key or os.environ.get(API_KEY_ENV)
        if api_key:
            self._http.headers["Authorization"] = f"Bearer {api_key}"
        self._capabilities: dict | None = None

    # ------------------------------------------------------------------ transport

    def _send(self, method: str, path: str, idempotent: bool, **kwargs: Any) -> requests.Response:
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            try:
                response = self._http.request(method, self.url + path, timeout=self.timeout, **kwargs)
                break
            except requests.exceptions.ReadTimeout as err:
                raise ServerError(f"{self.url} gave no answer within {self.timeout[1]:g} s ({method} {path}); "
                                  "the server may be overloaded.") from err  # fmt: skip
            except requests.exceptions.ConnectionError as err:
                if attempt + 1 < attempts:
                    time.sleep(self.backoff_s * 2**attempt)
                    continue
                raise ServerError(f"cannot reach the MedVLSAM2 server at {self.url} ({type(err).__name__}). Is "
                                  "`medvlsam2 serve` running there and the port open?") from err  # fmt: skip
        self._check(response)
        return response

    def _check(self, response: requests.Response) -> None:
        if PROTOCOL_HEADER not in response.headers or not response.ok:
            try:
                self._raise_for(response)
            finally:
                response.close()

    def _raise_for(self, response: requests.Response) -> None:
        if PROTOCOL_HEADER not in response.headers:
            proxies = [name for name in PROXY_VARIABLES if os.environ.get(name)]
            hint = (f" A proxy ({', '.join(proxies)} is set) may be answering instead: add the server's host to "
                    "NO_PROXY.") if proxies else " Check the URL and port."  # fmt: skip
            raise ServerError(f"{self.url} answered HTTP {response.status_code} "
                              f"({response.headers.get('content-type', 'no content type')}) but is not a MedVLSAM2 "
                              f"server.{hint}")  # fmt: skip
        if response.ok:
            return
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "unknown", response.text[:300]
        raise ERRORS.get(code, ServerError)(f"server {self.url}: {message}" if code not in ERRORS else message)

    def _with_session(self, handle: RemoteHandle, call: Callable[[str], Any]) -> Any:
        try:
            return call(handle.key)
        except SessionExpiredError:
            return call(self.encode(handle.volume, handle.intensity).key)

    # ------------------------------------------------------------------ the engine's methods

    def capabilities(self, refresh: bool = False) -> dict:
        """The server's versions, model, tasks and limits (fetched once)."""
        if self._capabilities is None or refresh:
            capabilities = self._send("GET", "/capabilities", idempotent=True).json()
            if capabilities.get("protocol") != PROTOCOL_VERSION:
                raise ServerError(f"{self.url} speaks protocol {capabilities.get('protocol')}, this client "
                                  f"{PROTOCOL_VERSION}; install the same MedVLSAM2Lib version on both "
                                  "sides.")  # fmt: skip
            self._capabilities = capabilities
        return self._capabilities

    def describe(self) -> dict:
        """The served model's facts, with the server URL."""
        return {**self.capabilities(refresh=True)["model"], "server": self.url}

    def encode(self, volume: Volume, intensity: str = "hu") -> RemoteHandle:
        """Upload ``volume`` (once: the server keys sessions by content).

        Raises:
            InputError: larger than the server accepts, or not a CT (the server's check).
        """
        frame = volume_to_frame(volume, intensity)
        limit_mb = self.capabilities()["limits"]["max_upload_mb"]
        if len(frame) > limit_mb * 2**20:
            raise InputError(f"this volume is {len(frame) / 2**20:.1f} MB compressed; the server at {self.url} "
                             f"accepts at most {limit_mb:g} MB (its --max-upload-mb).")  # fmt: skip
        reply = self._send("POST", "/sessions", idempotent=True, data=frame,
                           headers={"Content-Type": FRAME_MEDIA_TYPE}).json()  # fmt: skip
        return RemoteHandle(reply["session"], tuple(reply["shape_kji"]), volume, intensity)

    def close(self, handle: RemoteHandle) -> None:
        """Close the session of ``handle`` on the server (a session already gone is fine)."""
        try:
            self._send("DELETE", f"/sessions/{handle.key}", idempotent=True)
        except SessionExpiredError:
            pass

    def report(self, handle: RemoteHandle, on_token: Callable[[str], None] | None = None,
               max_new_tokens: int | None = None) -> Report:  # fmt: skip
        """A radiology report; with ``on_token`` the text streams in as the server generates it."""
        body = {"stream": on_token is not None, "max_new_tokens": max_new_tokens}
        if on_token is None:
            return self._with_session(handle, lambda key: Report(**self._post_json(f"/sessions/{key}/report", body)))
        return self._with_session(handle, lambda key: self._stream_report(key, body, on_token))

    def _post_json(self, path: str, body: dict) -> dict:
        response = self._send("POST", path, idempotent=False, json=body)
        try:
            return response.json()
        except ValueError as err:
            raise ServerError(f"{self.url} answered {path} with something that is not JSON.") from err

    def _stream_report(self, key: str, body: dict, on_token: Callable[[str], None]) -> Report:
        response = self._send("POST", f"/sessions/{key}/report", idempotent=False, json=body, stream=True)
        try:
            for line in response.iter_lines():
                if not line:
                    continue
                try:
                    message = json.loads(line)
                except ValueError as err:
                    raise ServerError(f"{self.url} sent a broken line in the report stream.") from err
                if "token" in message:
                    on_token(message["token"])
                elif "report" in message:
                    return Report(**message["report"])
                else:
                    error = message.get("error", {})
                    raise ERRORS.get(error.get("code"), ServerError)(str(error.get("message")))
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
            raise ServerError(f"the connection to {self.url} broke while the report was streaming.") from err
        finally:
            response.close()
        raise ServerError(f"{self.url} ended the report stream without the report.")

    def ask(self, handle: RemoteHandle, question: str, history: Sequence[tuple[str, str]] = (),
            kind: str = "short") -> Answer:  # fmt: skip
        """Answer a question about the volume (see :meth:`InferenceEngine.ask`)."""
        body = {"question": question, "history": [list(turn) for turn in history], "kind": kind}
        return self._with_session(handle, lambda key: Answer(**self._post_json(f"/sessions/{key}/ask", body)))

    def segment(self, handle: RemoteHandle, text: str | None = None, points: Sequence[PointPrompt] = (),
                boxes: Sequence[BoxPrompt] = (), *, answer: str | None = None) -> SegmentResult:  # fmt: skip
        """Segment from text and/or IJK prompts; masks come back on the volume's own grid."""
        body = {"text": text, "answer": answer, "points": [{"ijk": list(p.ijk), "label": p.label} for p in points],
                "boxes": [{"min_ijk": list(b.min_ijk), "max_ijk": list(b.max_ijk)} for b in boxes]}  # fmt: skip

        def call(key: str) -> SegmentResult:
            response = self._send("POST", f"/sessions/{key}/segment", idempotent=False, json=body)
            if response.headers.get("content-type") != FRAME_MEDIA_TYPE:
                raise ProtocolError(f"{self.url} answered a segmentation with {response.headers.get('content-type')}.")
            return segment_result_from_frame(response.content, handle.shape_kji)

        return self._with_session(handle, call)
