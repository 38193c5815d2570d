"""The HTTP server: one :class:`~MedVLSAM2Lib.engine.InferenceEngine` on one device, shared by remote clients.

::

    GET    /healthz                    liveness (no key needed)
    GET    /capabilities               versions, model, tasks, limits
    POST   /sessions                   upload a volume (a protocol frame) → {"session", "shape_kji", "new"}
    POST   /sessions/{id}/report       {"stream": bool} → report JSON, or NDJSON lines {"token"} … {"report"}
    POST   /sessions/{id}/ask          {"question", "history", "kind"} → answer JSON
    POST   /sessions/{id}/segment      {"text", "points", "boxes"} (IJK) → a frame of cropped masks
    DELETE /sessions/{id}              closes the session and drops the volume's encodings

Every error is JSON ``{"error": {"code", "message"}}`` with a fitting status; never a traceback (that goes to
the server log). :mod:`.guard` checks the key and reads the body under its limits before any route runs. The
model's work runs one job at a time (:class:`ModelJobs`): each job has a time limit, stops between tokens and
slices when its client leaves, and all stop once a shutdown's grace period has passed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from importlib import metadata
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..errors import (
    CapacityError,
    InputError,
    MedVLSAM2Error,
    ProtocolError,
    SessionExpiredError,
    TooLargeError,
    WeightsError,
    raise_if_cancelled,
)
from ..preprocess import INTENSITIES
from ..prompts import BoxPrompt, PointPrompt
from .guard import PROTOCOL_HEADER, UPLOAD_BODY, BodyRules, RequestGuard
from .protocol import FRAME_MEDIA_TYPE, PROTOCOL_VERSION, Limits, segment_result_to_frame, volume_from_frame
from .sessions import SessionStore
from .settings import ServerSettings

__all__ = ["ServerSettings", "ModelJobs", "create_app", "run_app", "serve", "PROTOCOL_HEADER"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
ERRORS: dict[type, tuple[int, str]] = {
    TooLargeError: (413, "too_large"),
    SessionExpiredError: (404, "session_not_found"),
    ProtocolError: (400, "bad_payload"),
    InputError: (400, "bad_input"),
    CapacityError: (503, "capacity"),
    WeightsError: (500, "weights"),
}
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "too_large"}
POLL_S = 0.1  # how often a waiting request looks at its deadline and its client


class ApiError(Exception):
    """An error answered with ``status`` and ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _status(err: MedVLSAM2Error) -> tuple[int, str]:
    return next((v for k, v in ERRORS.items() if isinstance(err, k)), (400, "bad_input"))


def _error(status: int, code: str, message: str) -> JSONResponse:
    # the protocol header is set here too: Starlette answers unexpected errors outside the middleware
    headers = {PROTOCOL_HEADER: str(PROTOCOL_VERSION)}
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class ModelJobs:
    """The model's work, one job at a time. A job waits for the model, runs with a ``cancel`` event of its own, and
    that event is set when the job's request gives up (time limit, client gone) or when :meth:`stop_all` is called
    (a shutdown's grace period is over); the engine stops at its next token or slice. Volumes whose sessions closed
    are dropped from the engine's cache before the next job (:meth:`forget`)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.stopping = threading.Event()
        self._model = threading.Lock()
        self._guard = threading.Lock()
        self._active: set[threading.Event] = set()
        self._forget: set[str] = set()

    def open(self) -> threading.Event:
        """A new job's cancel event (already set once the server stops)."""
        cancel = threading.Event()
        with self._guard:
            self._active.add(cancel)
        if self.stopping.is_set():
            cancel.set()
        return cancel

    def close(self, cancel: threading.Event) -> None:
        """The job of ``cancel`` is over."""
        with self._guard:
            self._active.discard(cancel)

    def run(self, work: Callable[[threading.Event], T], cancel: threading.Event, what: str) -> T:
        """Run ``work(cancel)`` holding the model; waiting for it ends as soon as ``cancel`` is set.

        Raises:
            Cancelled: ``cancel`` was set before or while ``work`` ran.
        """
        while not self._model.acquire(timeout=POLL_S / 2):
            raise_if_cancelled(cancel, what)
        try:
            self._drop_forgotten()
            raise_if_cancelled(cancel, what)
            return work(cancel)
        finally:
            self._model.release()

    def try_run(self, work: Callable[[], T], timeout_s: float) -> T | None:
        """``work()`` holding the model if it is free within ``timeout_s``, else ``None`` (never waits behind a job)."""
        if not self._model.acquire(timeout=timeout_s):
            return None
        try:
            return work()
        finally:
            self._model.release()

    def forget(self, key: str) -> None:
        """Drop the engine's encodings of volume ``key`` before the next job (or now, when the model is free)."""
        with self._guard:
            self._forget.add(key)
        self.try_run(self._drop_forgotten, 0)

    def _drop_forgotten(self) -> None:
        with self._guard:
            keys, self._forget = self._forget, set()
        for key in keys:
            if self.engine.forget(key):
                logger.info("dropped the encodings of closed session %s", key[:12])

    def stop_all(self) -> None:
        """Cancel every job, running or waiting, and every job that starts from now on."""
        self.stopping.set()
        with self._guard:
            for cancel in self._active:
                cancel.set()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReportRequest(_Strict):
    stream: bool = False
    max_new_tokens: int | None = Field(None, ge=1, le=4096)


class AskRequest(_Strict):
    question: str = Field(max_length=8000)
    history: list[tuple[str, str]] = Field(default_factory=list, max_length=64)
    kind: str = "short"


class PointIn(_Strict):
    ijk: tuple[float, float, float]
    label: int = 1


class BoxIn(_Strict):
    min_ijk: tuple[float, float, float]
    max_ijk: tuple[float, float, float]


class SegmentRequest(_Strict):
    text: str | None = Field(None, max_length=2000)
    points: list[PointIn] = Field(default_factory=list, max_length=256)
    boxes: list[BoxIn] = Field(default_factory=list, max_length=64)
    answer: str | None = Field(None, max_length=2000)


def _version() -> str:
    try:
        return metadata.version("MedVLSAM2Lib")
    except metadata.PackageNotFoundError:
        return "unknown"


def _limits_document(settings: ServerSettings) -> dict[str, Any]:
    names = ("max_upload_mb", "max_voxels", "max_json_kb", "max_uploads", "body_timeout_s", "request_timeout_s",
             "max_sessions", "idle_timeout_s", "cache_gb", "max_prompt_tokens", "shutdown_grace_s")  # fmt: skip
    return {name: getattr(settings, name) for name in names}


def create_app(engine: Any, settings: ServerSettings) -> FastAPI:  # noqa: C901 — the routes read best together
    """The FastAPI application serving ``engine`` (anything with the InferenceEngine methods). ``app.state.jobs`` is
    its :class:`ModelJobs` (a shutdown calls ``stop_all``)."""
    app = FastAPI(title="MedVLSAM2", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)
    jobs = ModelJobs(engine)
    app.state.jobs = jobs
    store = SessionStore(settings.max_sessions, settings.idle_timeout_s, on_drop=jobs.forget)
    limits = Limits(max_voxels=settings.max_voxels, max_arrays=1, max_bytes=4 * settings.max_voxels)
    decode_slots = threading.BoundedSemaphore(2)  # uploads decoded at once
    rules = BodyRules(protocol=PROTOCOL_VERSION, version=_version(), api_key=settings.api_key,
                      max_upload_bytes=int(settings.max_upload_mb * 2**20), max_json_bytes=settings.max_json_kb * 1024,
                      max_uploads=settings.max_uploads, body_timeout_s=settings.body_timeout_s,
                      upload_wait_s=settings.request_timeout_s)  # fmt: skip
    app.add_middleware(RequestGuard, rules=rules)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error(err.status, err.code, err.message)

    @app.exception_handler(MedVLSAM2Error)
    async def library_error(request: Request, err: MedVLSAM2Error) -> JSONResponse:
        return _error(*_status(err), str(err))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
        return _error(400, "bad_request", f"malformed request body ({problems}).")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path} (see GET /capabilities)."
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}."
        elif isinstance(err.__cause__, RecursionError):
            message = "the JSON body is nested too deeply."
        else:
            message = f"the request body could not be read ({err.detail})."
        return _error(err.status_code, HTTP_CODES.get(err.status_code, "bad_request"), message)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "the server failed on this request; its log has the details.")

    async def run_model(request: Request, work: Callable[[threading.Event], T], what: str) -> T:
        """``work(cancel)`` as a model job, answered 504 past ``--request-timeout``, 503 when the server stops;
        a client that left gets nothing (its job is stopped, one log line)."""
        cancel, reason = jobs.open(), ""
        deadline = time.monotonic() + settings.request_timeout_s
        future = asyncio.ensure_future(run_in_threadpool(jobs.run, work, cancel, what))
        try:
            while not future.done():
                await asyncio.wait({future}, timeout=POLL_S)
                if future.done() or cancel.is_set():
                    continue
                if time.monotonic() > deadline:
                    reason = "timeout"
                elif await request.is_disconnected():
                    reason = "gone"
                if reason:
                    cancel.set()
            return future.result()
        except MedVLSAM2Error as err:
            if not cancel.is_set():
                raise
            if jobs.stopping.is_set():
                raise ApiError(503, "shutting_down", f"the server is shutting down; {what} was stopped. Retry once "
                               "it is back.") from err  # fmt: skip
            if reason == "timeout":
                raise ApiError(504, "timeout", f"{what} ran past this server's limit of {settings.request_timeout_s:g} "
                               "s (--request-timeout) and was stopped.") from err  # fmt: skip
            logger.info("%s %s: the client left; %s was stopped", request.method, request.url.path, what)
            raise ApiError(499, "client_gone", "the client closed the connection.") from err
        finally:
            cancel.set()
            jobs.close(cancel)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "protocol": PROTOCOL_VERSION}

    described = {"model": engine.describe()}

    @app.get("/capabilities")
    def capabilities() -> dict:
        model = jobs.try_run(engine.describe, 0.2)  # never wait behind a running job: report the last known state
        described["model"] = model or described["model"]
        return {"protocol": PROTOCOL_VERSION, "version": _version(), "model": described["model"],
                "tasks": ["report", "ask", "segment"], "answer_kinds": ["short", "long", "choice"],
                "intensities": list(INTENSITIES), "sessions": len(store),
                "limits": _limits_document(settings)}  # fmt: skip

    def decode(body: bytearray) -> tuple[Any, str]:
        with decode_slots:
            return volume_from_frame(body, limits)

    @app.post("/sessions")
    async def create_session(request: Request) -> dict:
        volume, intensity = await run_in_threadpool(decode, request.scope.pop(UPLOAD_BODY))
        handle = await run_model(request, lambda cancel: engine.encode(volume, intensity, cancel=cancel),
                                 "encoding the volume")  # fmt: skip
        new = store.put(handle.key, handle)
        return {"session": handle.key, "shape_kji": list(handle.shape_kji), "new": new}

    @app.delete("/sessions/{session_id}")
    def delete_session(session_id: str) -> dict:
        store.remove(session_id)
        return {"deleted": session_id}

    def stream_error(err: MedVLSAM2Error, cancelled: bool, timed_out: bool) -> dict[str, str]:
        """The error line ending a report stream (a stream cancelled by its client reaches nobody: logged)."""
        if cancelled and jobs.stopping.is_set():
            return {"code": "shutting_down", "message": "the server is shutting down; the report was stopped."}
        if cancelled and timed_out:
            return {"code": "timeout", "message": f"the report ran past this server's limit of "
                    f"{settings.request_timeout_s:g} s (--request-timeout) and was stopped."}  # fmt: skip
        if cancelled:
            logger.info("report stream closed by the client; generation stopped")
        return {"code": _status(err)[1], "message": str(err)}

    def stream_report(handle: Any, max_new_tokens: int) -> Iterator[bytes]:
        lines: queue.Queue = queue.Queue()
        cancel = jobs.open()
        timer = threading.Timer(settings.request_timeout_s, cancel.set)

        def on_token(text: str) -> None:
            lines.put({"token": text})

        def work() -> None:
            try:
                report = jobs.run(lambda c: engine.report(handle, on_token=on_token, max_new_tokens=max_new_tokens,
                                                          cancel=c), cancel, "the report")  # fmt: skip
                lines.put({"report": asdict(report)})
            except MedVLSAM2Error as err:
                lines.put({"error": stream_error(err, cancel.is_set(), timed_out=not timer.is_alive())})
            except Exception:  # the stream has started: report the failure in it, details to the log
                logger.exception("internal error while streaming a report")
                lines.put({"error": {"code": "internal_error", "message": "the server failed; see its log."}})
            finally:
                timer.cancel()
                jobs.close(cancel)

        timer.start()
        threading.Thread(target=work, daemon=True, name="report-stream").start()
        try:
            while True:
                line = lines.get()
                yield (json.dumps(line) + "\n").encode()
                if "token" not in line:
                    return
        finally:  # also when the client disconnects: the generator is closed, generation stops at the next token
            cancel.set()

    @app.post("/sessions/{session_id}/report")
    async def report(session_id: str, body: ReportRequest, request: Request) -> Any:
        handle = store.get(session_id).handle
        max_new_tokens = body.max_new_tokens or 512
        if body.stream:
            return StreamingResponse(stream_report(handle, max_new_tokens), media_type="application/x-ndjson")
        result = await run_model(request, lambda cancel: engine.report(handle, max_new_tokens=max_new_tokens,
                                                                       cancel=cancel), "the report")  # fmt: skip
        return asdict(result)

    @app.post("/sessions/{session_id}/ask")
    async def ask(session_id: str, body: AskRequest, request: Request) -> dict:
        handle = store.get(session_id).handle
        answer = await run_model(request, lambda cancel: engine.ask(handle, body.question, history=body.history,
                                 kind=body.kind, cancel=cancel), "the answer")  # fmt: skip
        return asdict(answer)

    @app.post("/sessions/{session_id}/segment")
    async def segment(session_id: str, body: SegmentRequest, request: Request) -> Response:
        handle = store.get(session_id).handle
        points = [PointPrompt(p.ijk, p.label) for p in body.points]
        boxes = [BoxPrompt(b.min_ijk, b.max_ijk) for b in body.boxes]
        result = await run_model(request, lambda cancel: engine.segment(handle, text=body.text, points=points,
                                 boxes=boxes, answer=body.answer, cancel=cancel), "the segmentation")  # fmt: skip
        return Response(segment_result_to_frame(result), media_type=FRAME_MEDIA_TYPE)

    return app


def run_app(app: FastAPI, settings: ServerSettings) -> None:
    """Serve ``app`` (from :func:`create_app`) until SIGINT or SIGTERM: then no new connections are taken, running
    and waiting requests get ``shutdown_grace_s`` to finish, the ones still running after it are cancelled (they
    stop at their next token or slice and are answered 503), and the process exits."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not self.should_exit:
                logger.info("stopping: requests in progress get %g s to finish (--shutdown-grace)",
                            settings.shutdown_grace_s)  # fmt: skip
                timer = threading.Timer(settings.shutdown_grace_s, app.state.jobs.stop_all)
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info", timeout_keep_alive=30,
                            timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s + 5)))  # fmt: skip
    DrainingServer(config).run()


def serve(source: str, settings: ServerSettings, device: str = "auto", dtype: str = "float32") -> None:
    """Load ``source`` (checkpoint folder or preset), warm it up (:meth:`InferenceEngine.warmup`, so that the first
    request is as fast as the next) and serve it until interrupted; the log says how long loading and warming took.

    Raises:
        InputError: unsafe or invalid settings (checked before the model loads).
    """
    import torch

    from ..engine import InferenceEngine

    settings.check()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = InferenceEngine.load(source, device=device, dtype=dtype, cache_bytes=int(settings.cache_gb * 2**30),
                                  max_prompt_tokens=settings.max_prompt_tokens)  # fmt: skip
    warm = engine.warmup()["total"]  # before listening: the first request finds the pipeline warm
    logger.info("loaded in %.1f s, warm in %.1f s", engine.load_seconds, warm)
    logger.info("serving %s on %s (%s)", source, device, dtype)
    run_app(create_app(engine, settings), settings)
