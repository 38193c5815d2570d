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

Cancel: ``encode``, ``report``, ``ask`` and ``segment`` take a keyword-only ``cancel`` (a ``threading.Event``, or
anything with ``is_set()``). A blocking HTTP call cannot be interrupted from another thread, so such a call runs its
requests on a helper thread while the calling thread waits for their outcome or the event, looking every
:data:`POLL_S`. Once the event is set, the sockets of the helper's requests are shut down, which ends the helper's
blocked read at once and tells the server the client is gone, and :class:`~MedVLSAM2Lib.errors.Cancelled` is raised;
a streamed report also stops between chunks. The client stays usable (its next request takes another connection).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ReadTimeoutError

from ..errors import CapacityError, InputError, ProtocolError, ServerError, SessionExpiredError, raise_if_cancelled
from ..prompts import BoxPrompt, PointPrompt
from ..results import Answer, Report, SegmentResult
from ..volume import Volume
from .protocol import FRAME_MEDIA_TYPE, PROTOCOL_VERSION, segment_result_from_frame, volume_to_frame

__all__ = ["ServerClient", "RemoteHandle", "check_server_url", "API_KEY_ENV"]

API_KEY_ENV = "MEDVLSAM2_API_KEY"
POLL_S = 0.1  # how often a cancellable call waiting for the server looks at its cancel event
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


def _causes(err: BaseException) -> list[BaseException]:
    """A transport error and its causes, outermost first, through the wrappers of requests, urllib3 and the socket."""
    chain = [err]
    while True:
        inner = err.reason if isinstance(err, MaxRetryError) else None
        inner = inner or next((a for a in reversed(err.args) if isinstance(a, BaseException)), None) or err.__cause__
        if inner is None or any(inner is seen for seen in chain):
            return chain
        chain.append(inner)
        err = inner


def _reason(err: BaseException) -> str:
    """Why a request failed, in a few words: the innermost cause (refused, reset, unknown host, cut short)."""
    inner = _causes(err)[-1]
    if isinstance(inner, http.client.RemoteDisconnected):
        return "the server closed the connection without answering"
    if isinstance(inner, OSError) and inner.strerror:
        return inner.strerror
    text = str(inner).strip() or type(inner).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _connected(err: Exception) -> bool:
    """Whether a failed request had its connection (it broke or timed out later) rather than never getting one:
    urllib3 gives up on refused connections, unknown hosts, connect timeouts, proxy and TLS failures with a
    ``MaxRetryError``, and raises what breaks an established connection as it is."""
    return not isinstance(err.args[0] if err.args else None, MaxRetryError)


class _Abort:
    """The connections that the requests of one cancellable call hold (from taking one out of its pool until putting
    it back), so that another thread can shut their sockets down."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set = set()
        self.aborted = False

    def hold(self, connection: Any) -> None:
        with self._lock:
            connection.abort = self
            self._held.add(connection)
            if self.aborted:  # aborted while this connection was being taken or connected
                _shut_down(connection)

    def release(self, connection: Any) -> None:
        with self._lock:
            self._held.discard(connection)
            connection.abort = None

    def __call__(self) -> None:
        with self._lock:
            self.aborted = True
            for connection in self._held:
                _shut_down(connection)


def _shut_down(connection: Any) -> None:
    """Shut a connection's socket down (not close: a read blocked on it in another thread returns at once)."""
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _abortable_pool(pool: type, running: threading.local) -> type:
    """A urllib3 connection-pool class whose connections, while a request of a cancellable call uses one (that
    call's :class:`_Abort` is ``running.abort`` in the thread that makes the request), are held by that call."""

    class Connection(pool.ConnectionCls):
        abort: _Abort | None = None

        def connect(self) -> None:
            super().connect()
            if self.abort is not None:
                self.abort.hold(self)  # now with a socket

    class Pool(pool):
        ConnectionCls = Connection

        def _get_conn(self, timeout: float | None = None) -> Any:
            connection = super()._get_conn(timeout)
            abort = getattr(running, "abort", None)
            if abort is not None:
                abort.hold(connection)
            return connection

        def _put_conn(self, connection: Any) -> None:
            if getattr(connection, "abort", None) is not None:
                connection.abort.release(connection)
            super()._put_conn(connection)

    return Pool


class _AbortableAdapter(HTTPAdapter):
    """requests' HTTP adapter over :func:`_abortable_pool` pools; ``running.abort`` is per thread."""

    def __init__(self) -> None:
        self.running = threading.local()
        super().__init__()

    def _track(self, manager: Any) -> Any:
        manager.pool_classes_by_scheme = {scheme: _abortable_pool(pool, self.running)
                                          for scheme, pool in manager.pool_classes_by_scheme.items()}  # fmt: skip
        return manager

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self._track(self.poolmanager)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        known = proxy in self.proxy_manager
        manager = super().proxy_manager_for(proxy, **kwargs)
        return manager if known else self._track(manager)


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
        self._adapter = _AbortableAdapter()
        for scheme in ("http://", "https://"):
            self._http.mount(scheme, self._adapter)
        if urlparse(self.url).hostname in LOOPBACK:
            self._http.trust_env = False  # a proxy from the environment must not intercept this machine's server
        self._http.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
        api_key = api_key or os.environ.get(API_KEY_ENV)
        if api_key:
            self._http.headers["Authorization"] = f"Bearer {api_key}"
        self._capabilities: dict | None = None

    # ------------------------------------------------------------------ transport

    def _failure(self, err: requests.exceptions.RequestException, what: str, started: float) -> ServerError:
        """The error to raise for a transport failure of ``what`` that began at ``started`` (``time.monotonic()``):
        the server could not be reached, did not answer in time, or the connection broke while in use."""
        if any(isinstance(cause, ReadTimeoutError) for cause in _causes(err)):  # also one while reading the body
            return ServerError(f"the server at {self.url} did not answer {what} within {self.timeout[1]:g} s (the "
                               "client's read timeout); it may be overloaded.")  # fmt: skip
        if _connected(err):
            return ServerError(f"the connection to {self.url} broke during {what} after "
                               f"{time.monotonic() - started:.1f} s ({_reason(err)}); the server may have restarted "
                               "or hit a limit; retry.")  # fmt: skip
        connect_timeout = isinstance(err, requests.exceptions.ConnectTimeout)
        reason = f"no connection within {self.timeout[0]:g} s" if connect_timeout else _reason(err)
        return ServerError(f"cannot reach the MedVLSAM2 server at {self.url} ({reason}). Is `medvlsam2 serve` running "
                           "there and the port open?")  # fmt: skip

    def _send(self, method: str, path: str, idempotent: bool, cancel: threading.Event | None = None,
              **kwargs: Any) -> requests.Response:  # fmt: skip
        """``method path`` with timeouts; an idempotent call is retried after a connection failure (backing off).

        Raises:
            ServerError: the server cannot be reached, did not answer in time, the connection broke during the call,
                or what answered is not a MedVLSAM2 server; the library's typed errors for the server's own errors.
        """
        attempts = 1 + (self.retries if idempotent else 0)
        for attempt in range(attempts):
            started = time.monotonic()
            try:
                response = self._request(method, self.url + path, cancel, timeout=self.timeout, **kwargs)
                break
            except requests.exceptions.ReadTimeout as err:
                raise self._failure(err, f"{method} {path}", started) from err
            except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
                if attempt + 1 < attempts:
                    pause = self.backoff_s * 2**attempt
                    if cancel is None:
                        time.sleep(pause)
                    else:
                        cancel.wait(pause)  # a cancel ends the pause, and the next attempt raises Cancelled
                    continue
                raise self._failure(err, f"{method} {path}", started) from err
        self._check(response)
        return response

    def _request(self, method: str, url: str, cancel: threading.Event | None, **kwargs: Any) -> requests.Response:
        """``requests``' call; with ``cancel``, abortable (see :meth:`_abortable`)."""
        if cancel is None:
            return self._http.request(method, url, **kwargs)
        (response,) = self._abortable(lambda emit: emit(self._http.request(method, url, **kwargs)), cancel)
        return response

    def _abortable(self, work: Callable[[Callable[[Any], None]], None], cancel: threading.Event) -> Iterator[Any]:
        """Run ``work(emit)`` on a helper thread and yield, in this thread, what it emits until it returns (an error
        it raises is raised here). While waiting, look at ``cancel`` every :data:`POLL_S`; once it is set, or when the
        caller stops early, shut down the sockets of the helper's requests (its blocked read ends at once and the
        server sees the client go) and raise :class:`~MedVLSAM2Lib.errors.Cancelled`.

        Raises:
            Cancelled: ``cancel`` was set before the call returned (an outcome that arrives after it is dropped).
        """
        raise_if_cancelled(cancel, f"the request to {self.url}")
        abort, outcomes = _Abort(), queue.SimpleQueue()

        def run() -> None:
            self._adapter.running.abort = abort
            try:
                work(lambda item: outcomes.put(("item", item)))
                outcomes.put(("done", None))
            except BaseException as err:  # handed to the waiting thread, which raises it
                outcomes.put(("error", err))

        threading.Thread(target=run, daemon=True, name="medvlsam2-request").start()
        finished = False
        try:
            while True:
                try:
                    kind, value = outcomes.get(timeout=POLL_S)
                except queue.Empty:
                    raise_if_cancelled(cancel, f"the request to {self.url}")
                    continue
                raise_if_cancelled(cancel, f"the request to {self.url}")  # an outcome after Cancel is dropped
                if kind == "item":
                    yield value
                    continue
                finished = True
                if kind == "error":
                    raise value
                return
        finally:
            if not finished:
                abort()

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

    def _with_session(self, handle: RemoteHandle, call: Callable[[str], Any],
                      cancel: threading.Event | None = None) -> Any:  # fmt: skip
        try:
            return call(handle.key)
        except SessionExpiredError:
            return call(self.encode(handle.volume, handle.intensity, cancel=cancel).key)

    # ------------------------------------------------------------------ the engine's methods

    def capabilities(self, refresh: bool = False, *, cancel: threading.Event | None = None) -> dict:
        """The server's versions, model, tasks and limits (fetched once)."""
        if self._capabilities is None or refresh:
            capabilities = self._send("GET", "/capabilities", idempotent=True, cancel=cancel).json()
            if capabilities.get("protocol") != PROTOCOL_VERSION:
                raise ServerError(f"{self.url} speaks protocol {capabilities.get('protocol')}, this client "
                                  f"{PROTOCOL_VERSION}; install the same MedVLSAM2Lib version on both "
                                  "sides.")  # fmt: skip
            self._capabilities = capabilities
        return self._capabilities

    def describe(self) -> dict:
        """The served model's facts, with the server URL."""
        return {**self.capabilities(refresh=True)["model"], "server": self.url}

    def encode(self, volume: Volume, intensity: str = "hu", *, cancel: threading.Event | None = None) -> RemoteHandle:
        """Upload ``volume`` (once: the server keys sessions by content). ``cancel`` is checked before compressing the
        volume and while the upload and the server's encoding run.

        Raises:
            InputError: larger than the server accepts, or not a CT (the server's check).
            Cancelled: ``cancel`` was set.
        """
        raise_if_cancelled(cancel, "the upload")
        frame = volume_to_frame(volume, intensity)
        limit_mb = self.capabilities(cancel=cancel)["limits"]["max_upload_mb"]
        if len(frame) > limit_mb * 2**20:
            raise InputError(f"this volume is {len(frame) / 2**20:.1f} MB compressed; the server at {self.url} "
                             f"accepts at most {limit_mb:g} MB (its --max-upload-mb).")  # fmt: skip
        reply = self._send("POST", "/sessions", idempotent=True, cancel=cancel, data=frame,
                           headers={"Content-Type": FRAME_MEDIA_TYPE}).json()  # fmt: skip
        return RemoteHandle(reply["session"], tuple(reply["shape_kji"]), volume, intensity)

    def close(self, handle: RemoteHandle) -> None:
        """Close the session of ``handle`` on the server (a session already gone is fine)."""
        try:
            self._send("DELETE", f"/sessions/{handle.key}", idempotent=True)
        except SessionExpiredError:
            pass

    def report(self, handle: RemoteHandle, on_token: Callable[[str], None] | None = None,
               max_new_tokens: int | None = None, *, cancel: threading.Event | None = None) -> Report:  # fmt: skip
        """A radiology report; with ``on_token`` the text streams in as the server generates it (``on_token`` is
        called on this thread). ``cancel`` is checked while waiting and after every streamed piece.

        Raises:
            Cancelled: ``cancel`` was set; the connection is shut down (a streaming server stops generating).
        """
        body = {"stream": on_token is not None, "max_new_tokens": max_new_tokens}
        if on_token is None:
            path = "/sessions/{}/report"
            return self._with_session(handle, lambda key: Report(**self._post_json(path.format(key), body, cancel)),
                                      cancel)  # fmt: skip
        return self._with_session(handle, lambda key: self._stream_report(key, body, on_token, cancel), cancel)

    def _post_json(self, path: str, body: dict, cancel: threading.Event | None = None) -> dict:
        response = self._send("POST", path, idempotent=False, cancel=cancel, json=body)
        try:
            return response.json()
        except ValueError as err:
            raise ServerError(f"{self.url} answered {path} with something that is not JSON.") from err

    def _stream_report(self, key: str, body: dict, on_token: Callable[[str], None],
                       cancel: threading.Event | None = None) -> Report:  # fmt: skip
        """Read the NDJSON report stream: here, or (with ``cancel``) on a helper thread, abortable."""

        def stream() -> Iterator[dict]:
            started = time.monotonic()
            response = self._send("POST", f"/sessions/{key}/report", idempotent=False, json=body, stream=True)
            return self._report_messages(response, started)

        messages = stream() if cancel is None else self._abortable(lambda emit: [*map(emit, stream())], cancel)
        report = None
        with contextlib.closing(messages):  # an error in on_token or a cancel ends the stream (and the helper) now
            for message in messages:
                if "token" in message:
                    on_token(message["token"])
                    raise_if_cancelled(cancel, "the report")
                elif "report" in message:
                    report = Report(**message["report"])  # the server's last line: the stream ends here
                else:
                    error = message.get("error", {})
                    raise ERRORS.get(error.get("code"), ServerError)(str(error.get("message")))
        if report is None:
            raise ServerError(f"{self.url} ended the report stream without the report.")
        return report

    def _report_messages(self, response: requests.Response, started: float) -> Iterator[dict]:
        """The JSON messages of a report stream (requested at ``started``, ``time.monotonic()``), one per line."""
        try:
            for line in response.iter_lines():
                if not line:
                    continue
                try:
                    yield json.loads(line)
                except ValueError as err:
                    raise ServerError(f"{self.url} sent a broken line in the report stream.") from err
        except (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
            raise self._failure(err, "the streamed report", started) from err
        finally:
            response.close()

    def ask(self, handle: RemoteHandle, question: str, history: Sequence[tuple[str, str]] = (),
            kind: str = "short", *, cancel: threading.Event | None = None) -> Answer:  # fmt: skip
        """Answer a question about the volume (see :meth:`InferenceEngine.ask`).

        Raises:
            Cancelled: ``cancel`` was set before the answer arrived (the connection is shut down).
        """
        body = {"question": question, "history": [list(turn) for turn in history], "kind": kind}
        path = "/sessions/{}/ask"
        return self._with_session(handle, lambda key: Answer(**self._post_json(path.format(key), body, cancel)),
                                  cancel)  # fmt: skip

    def segment(self, handle: RemoteHandle, text: str | None = None, points: Sequence[PointPrompt] = (),
                boxes: Sequence[BoxPrompt] = (), *, answer: str | None = None,
                cancel: threading.Event | None = None) -> SegmentResult:  # fmt: skip
        """Segment from text and/or IJK prompts; masks come back on the volume's own grid.

        Raises:
            Cancelled: ``cancel`` was set before the masks arrived (the connection is shut down).
        """
        body = {"text": text, "answer": answer, "points": [{"ijk": list(p.ijk), "label": p.label} for p in points],
                "boxes": [{"min_ijk": list(b.min_ijk), "max_ijk": list(b.max_ijk)} for b in boxes]}  # fmt: skip

        def call(key: str) -> SegmentResult:
            response = self._send("POST", f"/sessions/{key}/segment", idempotent=False, cancel=cancel, json=body)
            if response.headers.get("content-type") != FRAME_MEDIA_TYPE:
                raise ProtocolError(f"{self.url} answered a segmentation with {response.headers.get('content-type')}.")
            return segment_result_from_frame(response.content, handle.shape_kji)

        return self._with_session(handle, call, cancel)
