"""Progress of long jobs that shows in a terminal and in a log.

On a terminal a ``tqdm`` bar redraws in place; off a terminal (CI logs, ``nohup``, ``make demo > log``) a bar
would stay hidden or flood the file with carriage returns, so :class:`StepProgress` prints one plain line about
every tenth of the job instead: step, metrics, elapsed time and the estimated time left.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

__all__ = ["StepProgress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``"42 s"`` or ``"3 min 05 s"``."""
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


class StepProgress:
    """Progress of ``total`` steps: a bar on a terminal, else a line at each tenth (``lines`` of them in all).

    Args:
        total: number of steps of the job.
        desc: what is running (first word of every line).
        stream: where to write (standard error by default).
        lines: how many progress lines a job prints off a terminal.
        clock: seconds since an arbitrary origin (tests pass a fake one).
    """

    def __init__(self, total: int, desc: str, stream: TextIO | None = None, lines: int = 10,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.total, self.desc, self.stream, self.clock = total, desc, stream or sys.stderr, clock
        self.start, self.bar = clock(), None
        self.marks = {round(total * k / lines) for k in range(1, lines + 1)} - {0}
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=self.stream, leave=False)

    def update(self, step: int, **metrics: float) -> None:
        """Report that ``step`` steps of ``total`` are done; ``metrics`` (e.g. ``loss``) are shown with it."""
        shown = {name: f"{value:.3f}" for name, value in metrics.items()}
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(shown)
            return
        if step not in self.marks:
            return
        elapsed = self.clock() - self.start
        left = elapsed / step * (self.total - step)
        values = "".join(f"  {name} {value}" for name, value in shown.items())
        print(f"{self.desc}  step {step}/{self.total}{values}  elapsed {format_seconds(elapsed)}, "
              f"about {format_seconds(left)} left", file=self.stream, flush=True)  # fmt: skip

    def write(self, message: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        """Remove the bar (the lines printed off a terminal stay)."""
        if self.bar is not None:
            self.bar.close()
