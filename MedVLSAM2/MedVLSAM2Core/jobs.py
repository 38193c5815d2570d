"""Long work off Slicer's main thread, cancellable, without Qt: one persistent worker thread runs every job.

Why a thread and not a process: the model stays loaded in Slicer's Python between requests (a process would load
it again, 30 s for the paper preset, or need the server; the remote backend is that process). Why one persistent
thread: CUDA and cuDNN keep per-thread state, so the warm thread that loaded the model stays fast (as in
SlicerNNInteractive's session executor). Why it is not starved of the GIL: the main thread polls with
:meth:`Job.events`, which *waits* on the job (releasing the GIL) for a slice of each timer tick, so the worker
runs whether or not the host application releases the GIL while Qt is idle.

Cancel: :attr:`Job.cancel` is the ``threading.Event`` handed to the backend (``cancel=``), which checks it between
generated tokens, between slices and between load steps; :meth:`Job.progress` checks it too.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from MedVLSAM2Lib.errors import Cancelled

__all__ = ["Job", "JobEvent", "JobRunner"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobEvent:
    """``kind``: ``progress`` (``value`` is text), ``done`` (the result), ``cancelled`` or ``error`` (the error)."""

    kind: str
    value: Any = None


class Job:
    """One submitted piece of work: its cancel flag, its progress messages and its outcome."""

    def __init__(self, title: str, work: Callable[[Job], Any]) -> None:
        self.title = title
        self.work = work
        self.cancel = threading.Event()
        self.finished = threading.Event()
        self._events: queue.Queue[JobEvent] = queue.Queue()

    def progress(self, text: str) -> None:
        """Report progress text (worker side); raises :class:`Cancelled` once Cancel was pressed."""
        if self.cancel.is_set():
            raise Cancelled(f"{self.title}: cancelled.")
        self._events.put(JobEvent("progress", text))

    def events(self, wait: float = 0.0) -> list[JobEvent]:
        """What happened since the last call (main thread), after waiting up to ``wait`` seconds for the job to
        finish. The last event of a job is ``done``, ``cancelled`` or ``error``; a result that arrives after
        Cancel is reported as ``cancelled`` and dropped."""
        self.finished.wait(wait)
        drained = []
        while not self._events.empty():
            event = self._events.get()
            if event.kind == "done" and self.cancel.is_set():
                event = JobEvent("cancelled")
            drained.append(event)
        return drained

    def _run(self) -> None:
        try:
            if self.cancel.is_set():
                raise Cancelled(f"{self.title}: cancelled.")
            self._events.put(JobEvent("done", self.work(self)))
        except Cancelled:
            self._events.put(JobEvent("cancelled"))
        except Exception as err:  # reported to the user as one message; the traceback goes to the log
            logger.exception("MedVLSAM2: %s failed", self.title)
            self._events.put(JobEvent("error", err))
        finally:
            self.finished.set()


class JobRunner:
    """Runs one :class:`Job` at a time on a persistent daemon thread (started on the first job)."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.current: Job | None = None

    @property
    def busy(self) -> bool:
        """Whether a submitted job has not finished yet."""
        return self.current is not None and not self.current.finished.is_set()

    def submit(self, title: str, work: Callable[[Job], Any]) -> Job:
        """Queue ``work(job)`` on the worker thread; refuses while another job runs (one model, one job)."""
        if self.busy:
            raise RuntimeError(f"MedVLSAM2 is still busy with {self.current.title.lower()}; wait or press Cancel.")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, daemon=True, name="MedVLSAM2 worker")
            self._thread.start()
        self.current = Job(title, work)
        self._jobs.put(self.current)
        return self.current

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            job._run()

    def close(self, timeout: float = 2.0) -> bool:
        """Cancel the running job and stop the thread; returns whether it stopped within ``timeout`` seconds (a
        daemon thread still inside a long uninterruptible call ends with Slicer)."""
        if self.current is not None:
            self.current.cancel.set()
        if self._thread is None:
            return True
        self._jobs.put(None)
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        self._thread = None
        return stopped
