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
    the least recently used makes room (its client re-uploads transparently)."""

    def __init__(self, max_sessions: int, idle_timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions, self.idle_timeout_s, self._clock = max_sessions, idle_timeout_s, clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]:
            del self._sessions[key]

    def put(self, key: str, handle: Any) -> bool:
        """Open (or touch) the session ``key``; returns whether it was new."""
        with self._lock:
            self._expire()
            new = key not in self._sessions
            self._sessions[key] = Session(key, handle, self._clock())
            self._sessions.move_to_end(key)
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return new

    def get(self, key: str) -> Session:
        """The session ``key``, touched.

        Raises:
            SessionExpiredError: no such session (never opened, expired, deleted or pushed out).
        """
        with self._lock:
            self._expire()
            session = self._sessions.get(key)
            if session is None:
                raise SessionExpiredError(f"no session {key[:12]}…: it expired or was closed; upload the volume again.")
            session.last_used = self._clock()
            self._sessions.move_to_end(key)
            return session

    def remove(self, key: str) -> None:
        """Close the session ``key``. Raises :class:`SessionExpiredError` if there is none."""
        with self._lock:
            if self._sessions.pop(key, None) is None:
                raise SessionExpiredError(f"no session {key[:12]}… to close.")

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._sessions)
