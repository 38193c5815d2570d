"""The server's front door, an ASGI middleware that runs before any route: protocol version, API key, and the
request body, read whole under limits before the application sees it.

Order, per request: the protocol header; the key (``401`` before a single body byte is read); the declared
``Content-Length`` against the route's limit (``413``); a cap on concurrent uploads: an upload holds one of
``max_uploads`` slots from its first body byte until it is answered (its body, decoded volume and encoding are the
server's big allocations), and one that finds none free waits, unread, up to ``upload_wait_s`` (then ``503``); then
the body, with a limit enforced while it streams in (``413``) and a timeout on each wait for the next chunk
(``408``). A client
that leaves mid-upload costs one log line. The route then gets the body: JSON routes through ``receive`` as usual,
the upload route as the ``bytearray`` in ``scope["medvlsam2.body"]`` (no second copy of a large upload).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BodyRules", "RequestGuard", "UPLOAD_BODY", "error_body", "PROTOCOL_HEADER"]

logger = logging.getLogger(__name__)

PROTOCOL_HEADER = "X-MedVLSAM2-Protocol"
UPLOAD_BODY = "medvlsam2.body"
OPEN_PATHS = ("/healthz",)  # answered without a key (liveness probes)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class BodyRules:
    """What the guard accepts: ``api_key`` (``None``: none needed), bodies up to ``max_upload_bytes`` on the
    upload route and ``max_json_bytes`` elsewhere, at most ``max_uploads`` uploads at once (others wait up to
    ``upload_wait_s``), and at most ``body_timeout_s`` seconds of silence while a body streams in."""

    protocol: int
    version: str
    api_key: str | None
    max_upload_bytes: int
    max_json_bytes: int
    max_uploads: int
    body_timeout_s: float
    upload_wait_s: float


def error_body(code: str, message: str) -> bytes:
    """The documented error document ``{"error": {"code", "message"}}``, encoded."""
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class _Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class _ClientLeft(Exception):
    pass


def _is_upload(scope: Scope) -> bool:
    return scope["method"] == "POST" and scope["path"].rstrip("/") == "/sessions"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestGuard:
    """ASGI middleware enforcing :class:`BodyRules` (see the module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], rules: BodyRules) -> None:
        self.app, self.rules = app, rules
        self._upload_slots = asyncio.Semaphore(rules.max_uploads)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = _is_upload(scope)
        try:
            self._check_headers(scope, upload)
            if upload:
                await self._take_upload_slot()
        except _Refused as refused:
            await self._answer(send, refused)
            return
        try:
            body = await self._read_body(scope, receive, upload)
            await self.app(scope, self._replay(body, receive, upload, scope), self._stamp(send))
        except _Refused as refused:
            await self._answer(send, refused)
        except _ClientLeft:
            pass
        finally:
            if upload:
                self._upload_slots.release()

    async def _take_upload_slot(self) -> None:
        try:
            await asyncio.wait_for(self._upload_slots.acquire(), self.rules.upload_wait_s)
        except asyncio.TimeoutError:
            raise _Refused(503, "busy", f"{self.rules.max_uploads} uploads were in progress for "
                           f"{self.rules.upload_wait_s:g} s, the most this server takes at once (--max-uploads); "
                           "retry later.") from None  # fmt: skip

    def _check_headers(self, scope: Scope, upload: bool) -> None:
        rules = self.rules
        spoken = _header(scope, PROTOCOL_HEADER.lower().encode())
        if spoken is not None and spoken != str(rules.protocol):
            raise _Refused(400, "protocol_mismatch", f"the client speaks protocol {spoken}, this server "
                           f"{rules.protocol} (MedVLSAM2Lib {rules.version}); install the same version on both "
                           "sides.")  # fmt: skip
        if rules.api_key and scope["path"] not in OPEN_PATHS:
            scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), rules.api_key.encode()):
                raise _Refused(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>' "
                               "(medvlsam2 --api-key, or MEDVLSAM2_API_KEY).")  # fmt: skip
        declared = _header(scope, b"content-length")
        limit = self._limit(upload)
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            raise _Refused(413, "too_large", self._too_large(upload))

    def _limit(self, upload: bool) -> int:
        return self.rules.max_upload_bytes if upload else self.rules.max_json_bytes

    def _too_large(self, upload: bool) -> str:
        if upload:
            return (f"the upload exceeds this server's limit of {self.rules.max_upload_bytes / 2**20:g} MB "
                    "(--max-upload-mb).")  # fmt: skip
        return f"the body exceeds this server's limit of {self.rules.max_json_bytes // 1024} KB (--max-json-kb)."

    async def _read_body(self, scope: Scope, receive: Receive, upload: bool) -> bytearray:
        """The whole body, refused past the route's limit or after ``body_timeout_s`` without a byte."""
        body, limit = bytearray(), self._limit(upload)
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.rules.body_timeout_s)
            except asyncio.TimeoutError:
                logger.info("%s %s: no body bytes for %g s after %d bytes; answered 408", scope["method"],
                            scope["path"], self.rules.body_timeout_s, len(body))  # fmt: skip
                raise _Refused(408, "body_timeout", f"the request body stalled: no data for "
                               f"{self.rules.body_timeout_s:g} s (--body-timeout).") from None  # fmt: skip
            if message["type"] == "http.disconnect":
                logger.info("%s %s: the client left during the upload, after %d bytes", scope["method"],
                            scope["path"], len(body))  # fmt: skip
                raise _ClientLeft()
            body.extend(message.get("body", b""))
            if len(body) > limit:
                raise _Refused(413, "too_large", self._too_large(upload))
            if not message.get("more_body", False):
                return body

    def _replay(self, body: bytearray, receive: Receive, upload: bool, scope: Scope) -> Receive:
        """``receive`` for the application: the body once (for an upload: empty, the body is in the scope), then
        the server's own ``receive`` (which reports a disconnect)."""
        if upload:
            scope[UPLOAD_BODY] = body
        pending = [{"type": "http.request", "body": b"" if upload else bytes(body), "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        return replay

    def _stamp(self, send: Send) -> Send:
        """``send`` that adds the protocol header to every response."""
        name, value = PROTOCOL_HEADER.encode(), str(self.rules.protocol).encode()

        async def stamped(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != name.lower()]
                message = {**message, "headers": [*headers, (name, value)]}
            await send(message)

        return stamped

    async def _answer(self, send: Send, refused: _Refused) -> None:
        body = error_body(refused.code, refused.message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (PROTOCOL_HEADER.encode(), str(self.rules.protocol).encode())]  # fmt: skip
        if refused.status == 408:  # a stalled client's connection ends here; others are drained (a client still
            headers.append((b"connection", b"close"))  # sending could lose the answer to a reset)
        await send({"type": "http.response.start", "status": refused.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
