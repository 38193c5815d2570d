"""Server sessions: one uploaded volume each, bounded in number, expired when idle (thread-safe)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SessionExpiredError

__all__ = ["Session", "SessionStore"]


@dataclass
class Session:
    """An uploaded volume: ``id`` is the engine's content key, so the same upload finds the same session."""

    id: str
    handle: Any
    last_used: float


class SessionStore:
    """At most ``max_sessions`` sessions; one idle for ``idle_timeout_s`` is dropped, and when the store is full
    the least recently used makes room (its client re-uploads transparently). ``on_drop(key)`` is called, outside
    the store's lock, for every session that ends (closed, expired or pushed out), e.g. to free its encodings."""

    def __init__(self, max_sessions: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 on_drop: Callable[[str], None] = lambda key: None) -> None:  # fmt: skip
        self.max_sessions, self.idle_timeout_s = max_sessions, idle_timeout_s
        self._clock, self._on_drop = clock, on_drop
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self) -> list[str]:
        now = self._clock()
        ended = [k for k, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]
        for key in ended:
            del self._sessions[key]
        return ended

    def _dropped(self, keys: list[str]) -> None:
        for key in keys:
            self._on_drop(key)

    def put(self, key: str, handle: Any) -> bool:
        """Open (or touch) the session ``key``; returns whether it was new."""
        with self._lock:
            ended = self._expire()
            new = key not in self._sessions
            self._sessions[key] = Session(key, handle, self._clock())
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_sessions:
                ended.append(self._sessions.popitem(last=False)[0])
        self._dropped(ended)
        return new

    def get(self, key: str) -> Session:
        """The session ``key``, touched.

        Raises:
            SessionExpiredError: no such session (never opened, expired, deleted or pushed out).
        """
        with self._lock:
            ended = self._expire()
            session = self._sessions.get(key)
            if session is not None:
                session.last_used = self._clock()
                self._sessions.move_to_end(key)
        self._dropped(ended)
        if session is None:
            raise SessionExpiredError(f"no session {key[:12]}…: it expired or was closed; upload the volume again.")
        return session

    def remove(self, key: str) -> None:
        """Close the session ``key``. Raises :class:`SessionExpiredError` if there is none."""
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is None:
            raise SessionExpiredError(f"no session {key[:12]}… to close.")
        self._dropped([key])

    def __len__(self) -> int:
        with self._lock:
            ended = self._expire()
            count = len(self._sessions)
        self._dropped(ended)
        return count
