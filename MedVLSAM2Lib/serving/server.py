"""The HTTP server: one :class:`~MedVLSAM2Lib.engine.InferenceEngine` on one device, shared by remote clients.

::

    GET    /healthz                    liveness (no key needed)
    GET    /capabilities               versions, model, tasks, limits
    POST   /sessions                   upload a volume (a protocol frame) → {"session", "shape_kji", "new"}
    POST   /sessions/{id}/report       {"stream": bool} → report JSON, or NDJSON lines {"token"} … {"report"}
    POST   /sessions/{id}/ask          {"question", "history", "kind"} → answer JSON
    POST   /sessions/{id}/segment      {"text", "points", "boxes"} (IJK) → a frame of cropped masks
    DELETE /sessions/{id}

Every error is JSON ``{"error": {"code", "message"}}`` with a fitting status; never a traceback (that goes to
the server log). A bearer API key is required whenever the server listens beyond loopback; uploads are
counted while they stream in and refused past ``max_upload_mb``; one lock serialises the model's work.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import CapacityError, InputError, MedVLSAM2Error, ProtocolError, SessionExpiredError, WeightsError
from ..preprocess import INTENSITIES
from ..prompts import BoxPrompt, PointPrompt
from .protocol import FRAME_MEDIA_TYPE, PROTOCOL_VERSION, Limits, segment_result_to_frame, volume_from_frame
from .sessions import SessionStore

__all__ = ["ServerSettings", "create_app", "serve", "PROTOCOL_HEADER"]

logger = logging.getLogger(__name__)

PROTOCOL_HEADER = "X-MedVLSAM2-Protocol"
ERRORS: dict[type, tuple[int, str]] = {
    SessionExpiredError: (404, "session_not_found"),
    ProtocolError: (400, "bad_payload"),
    InputError: (400, "bad_input"),
    CapacityError: (503, "capacity"),
    WeightsError: (500, "weights"),
}


MIN_KEY_LENGTH = 16  # shorter keys can be guessed by trying


@dataclass
class ServerSettings:
    """How the server listens and what it accepts."""

    host: str = "127.0.0.1"
    port: int = 8765
    api_key: str | None = None
    max_sessions: int = 8
    idle_timeout_s: float = 1800.0
    max_upload_mb: float = 1024.0
    max_voxels: int = 1024 * 1024 * 1024

    def check(self) -> None:
        """Raises :class:`InputError` for settings a server must not start with (no key beyond loopback)."""
        if not self.api_key and not _is_loopback(self.host):
            raise InputError(f"refusing to listen on {self.host} without an API key: anyone on the network could "
                             "use the model and read uploaded scans. Pass --api-key (or set MEDVLSAM2_API_KEY), "
                             "or listen on 127.0.0.1.")  # fmt: skip
        if self.api_key is not None and len(self.api_key) < MIN_KEY_LENGTH:
            raise InputError(f"the API key has {len(self.api_key)} characters; use at least {MIN_KEY_LENGTH}, random, "
                             "so it cannot be guessed: python3 -c \"import secrets; "
                             "print(secrets.token_urlsafe(24))\".")  # fmt: skip
        for name in ("max_sessions", "idle_timeout_s", "max_upload_mb", "max_voxels"):
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}.")
        if not 0 <= self.port < 65536:
            raise InputError(f"port must be 0..65535, got {self.port}.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClientGone(Exception):
    """The client closed a streamed report; raised inside generation to stop it."""


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


def create_app(engine: Any, settings: ServerSettings) -> FastAPI:  # noqa: C901 — the routes read best together
    """The FastAPI application serving ``engine`` (anything with the InferenceEngine methods)."""
    app = FastAPI(title="MedVLSAM2", version=_version(), docs_url=None, redoc_url=None, openapi_url=None)
    store = SessionStore(settings.max_sessions, settings.idle_timeout_s)
    model_lock = threading.Lock()
    upload_limit = int(settings.max_upload_mb * 2**20)
    limits = Limits(max_voxels=settings.max_voxels, max_arrays=1, max_bytes=4 * settings.max_voxels)
    decode_slots = threading.BoundedSemaphore(2)  # uploads decoded at once (each may take GiBs)

    @app.middleware("http")
    async def protocol_header(request: Request, call_next):  # noqa: ANN001, ANN202
        spoken = request.headers.get(PROTOCOL_HEADER)
        if spoken is not None and spoken != str(PROTOCOL_VERSION):
            message = (f"the client speaks protocol {spoken}, this server {PROTOCOL_VERSION} (MedVLSAM2Lib "
                       f"{_version()}); install the same version on both sides.")  # fmt: skip
            response = _error(400, "protocol_mismatch", message)
        else:
            response = await call_next(request)
        response.headers[PROTOCOL_HEADER] = str(PROTOCOL_VERSION)
        return response

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

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "the server failed on this request; its log has the details.")

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.api_key.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>' "
                           "(medvlsam2 --api-key, or MEDVLSAM2_API_KEY).")  # fmt: skip

    guarded = [Depends(authorize)]

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "protocol": PROTOCOL_VERSION}

    described = {"model": engine.describe()}

    @app.get("/capabilities", dependencies=guarded)
    def capabilities() -> dict:
        if model_lock.acquire(timeout=0.2):  # never wait behind a running job: report the last known state
            try:
                described["model"] = engine.describe()
            finally:
                model_lock.release()
        model = described["model"]
        return {"protocol": PROTOCOL_VERSION, "version": _version(), "model": model,
                "tasks": ["report", "ask", "segment"], "answer_kinds": ["short", "long", "choice"],
                "intensities": list(INTENSITIES), "sessions": len(store),
                "limits": {"max_upload_mb": settings.max_upload_mb, "max_sessions": settings.max_sessions,
                           "idle_timeout_s": settings.idle_timeout_s, "max_voxels": settings.max_voxels}}  # fmt: skip

    def open_session(data: bytes) -> dict:
        with decode_slots:
            volume, intensity = volume_from_frame(data, limits)
        with model_lock:
            handle = engine.encode(volume, intensity)
        new = store.put(handle.key, handle)
        return {"session": handle.key, "shape_kji": list(handle.shape_kji), "new": new}

    @app.post("/sessions", dependencies=guarded)
    async def create_session(request: Request) -> dict:
        declared = request.headers.get("content-length")
        too_large = f"the upload exceeds this server's limit of {settings.max_upload_mb:g} MB (--max-upload-mb)."
        if declared is not None and (not declared.isdigit() or int(declared) > upload_limit):
            raise ApiError(413, "too_large", too_large)
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > upload_limit:
                raise ApiError(413, "too_large", too_large)
        return await run_in_threadpool(open_session, bytes(body))

    @app.delete("/sessions/{session_id}", dependencies=guarded)
    def delete_session(session_id: str) -> dict:
        store.remove(session_id)
        return {"deleted": session_id}

    def stream_report(handle: Any, max_new_tokens: int) -> Iterator[bytes]:
        lines: queue.Queue = queue.Queue()
        gone = threading.Event()

        def on_token(text: str) -> None:
            if gone.is_set():
                raise ClientGone()
            lines.put({"token": text})

        def work() -> None:
            try:
                with model_lock:
                    report = engine.report(handle, on_token=on_token, max_new_tokens=max_new_tokens)
                lines.put({"report": asdict(report)})
            except ClientGone:
                logger.info("report stream closed by the client; generation stopped")
            except MedVLSAM2Error as err:
                lines.put({"error": {"code": _status(err)[1], "message": str(err)}})
            except Exception:  # the stream has started: report the failure in it, details to the log
                logger.exception("internal error while streaming a report")
                lines.put({"error": {"code": "internal_error", "message": "the server failed; see its log."}})

        threading.Thread(target=work, daemon=True, name="report-stream").start()
        try:
            while True:
                line = lines.get()
                yield (json.dumps(line) + "\n").encode()
                if "token" not in line:
                    return
        finally:  # also when the client disconnects: the generator is closed, generation stops at the next token
            gone.set()

    @app.post("/sessions/{session_id}/report", dependencies=guarded)
    def report(session_id: str, body: ReportRequest) -> Any:
        handle = store.get(session_id).handle
        max_new_tokens = body.max_new_tokens or 512
        if body.stream:
            return StreamingResponse(stream_report(handle, max_new_tokens), media_type="application/x-ndjson")
        with model_lock:
            return asdict(engine.report(handle, max_new_tokens=max_new_tokens))

    @app.post("/sessions/{session_id}/ask", dependencies=guarded)
    def ask(session_id: str, body: AskRequest) -> dict:
        handle = store.get(session_id).handle
        with model_lock:
            return asdict(engine.ask(handle, body.question, history=body.history, kind=body.kind))

    @app.post("/sessions/{session_id}/segment", dependencies=guarded)
    def segment(session_id: str, body: SegmentRequest) -> Response:
        handle = store.get(session_id).handle
        points = [PointPrompt(p.ijk, p.label) for p in body.points]
        boxes = [BoxPrompt(b.min_ijk, b.max_ijk) for b in body.boxes]
        with model_lock:
            result = engine.segment(handle, text=body.text, points=points, boxes=boxes, answer=body.answer)
        return Response(segment_result_to_frame(result), media_type=FRAME_MEDIA_TYPE)

    return app


def serve(source: str, settings: ServerSettings, device: str = "auto", dtype: str = "float32") -> None:
    """Load ``source`` (checkpoint folder or preset) and serve it until interrupted.

    Raises:
        InputError: unsafe or invalid settings (checked before the model loads).
    """
    import torch
    import uvicorn

    from ..engine import InferenceEngine

    settings.check()
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = InferenceEngine.load(source, device=device, dtype=dtype)
    logger.info("serving %s on %s (%s)", source, device, dtype)
    uvicorn.run(create_app(engine, settings), host=settings.host, port=settings.port, log_level="info",
                timeout_keep_alive=30)  # fmt: skip
