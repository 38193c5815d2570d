"""Progress of long jobs: a line about every tenth off a terminal (what a log shows), a bar on a terminal."""

from __future__ import annotations

import io
import re

from MedVLSAM2Lib.progress import StepProgress, format_seconds


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_one_line_per_tenth_with_step_loss_elapsed_and_time_left():
    stream, clock = io.StringIO(), _Clock()
    progress = StepProgress(600, "fine-tune", stream=stream, clock=clock)
    progress.write("fine-tune phase 1/3: text")
    for step in range(1, 601):
        clock.now += 0.5  # half a second a step
        progress.update(step, loss=1.0 / step)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "fine-tune phase 1/3: text"
    assert len(lines) == 11
    assert lines[1] == "fine-tune  step 60/600  loss 0.017  elapsed 30 s, about 4 min 30 s left"
    assert lines[-1] == "fine-tune  step 600/600  loss 0.002  elapsed 5 min 00 s, about 0 s left"
    steps = [int(re.search(r"step (\d+)/", line).group(1)) for line in lines[1:]]
    assert steps == list(range(60, 601, 60))


def test_short_jobs_print_each_step_at_most_once():
    stream = io.StringIO()
    progress = StepProgress(4, "train", stream=stream, clock=_Clock())
    for step in range(1, 5):
        progress.update(step)
    assert [line.split("  ")[1] for line in stream.getvalue().splitlines()] == [f"step {n}/4" for n in range(1, 5)]


def test_on_a_terminal_a_bar_and_no_log_lines():
    stream = _Terminal()
    progress = StepProgress(100, "fine-tune", stream=stream, clock=_Clock())
    for step in range(1, 101):
        progress.update(step, loss=0.5)
    progress.close()
    assert "step 10/100" not in stream.getvalue()
    assert "fine-tune" in stream.getvalue() and "100/100" in stream.getvalue()


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 60, 185)] == ["0 s", "59 s", "1 min 00 s", "3 min 05 s"]
