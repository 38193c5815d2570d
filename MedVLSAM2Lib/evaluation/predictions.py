"""Predictions streamed to JSON Lines as they are produced, so that an evaluation resumes where it stopped.

Line 1 is a header naming the task, the model (a fingerprint of its weights) and the settings; every other
line is one case ``{"id": …, …}``. Reopening a file continues it: finished cases are skipped, a last line
cut off by a kill is dropped, and a header that does not match (another checkpoint, task or setting) is
refused rather than mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError

__all__ = ["model_fingerprint", "PredictionLog", "read_predictions"]

FORMAT = 1


def model_fingerprint(source: str | os.PathLike) -> str:
    """``preset:<name>`` for a preset, else a SHA-256 over a checkpoint folder's ``config.json`` and weights."""
    path = Path(source)
    if not path.exists():
        return f"preset:{source}"
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        file = path / name
        if not file.is_file():
            raise InputError(f"{path}: not a MedVLSAM2 checkpoint ({name} is missing).")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def read_predictions(path: str | os.PathLike, header: dict[str, Any]) -> tuple[dict[str, dict], int]:
    """The finished cases of a prediction file (by id) and the byte length of its complete lines; never writes
    (a last line without its newline, cut off or still being written, is left out).

    Raises:
        InputError: the header differs from ``header`` (another checkpoint, task or setting), or a line is
            unreadable.
    """
    path = Path(path)
    header = {"format": FORMAT, **header}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    lines = complete.decode("utf-8").splitlines()
    try:
        found = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: the first line is not a prediction header ({err}).") from err
    if lines and found != header:
        differ = sorted(k for k in set(found) | set(header) if found.get(k) != header.get(k))
        raise InputError(
            f"{path}: written for another run (differs in {differ}: {[found.get(k) for k in differ]}); "
            "predictions of different checkpoints or settings are never mixed: choose another output folder."
        )
    done: dict[str, dict] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: unreadable prediction line ({err}).") from err
        done[str(record["id"])] = record
    return done, len(complete)


class PredictionLog:
    """An append-only prediction file for one task and model."""

    def __init__(self, path: str | os.PathLike, header: dict[str, Any]) -> None:
        self.path = Path(path)
        self.header = {"format": FORMAT, **header}
        self.done: dict[str, dict] = {}
        if self.path.exists() and self.path.stat().st_size > 0:
            self._resume()
        if not self.path.exists() or self.path.stat().st_size == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.header) + "\n")

    def _resume(self) -> None:
        self.done, complete = read_predictions(self.path, self.header)
        if complete != self.path.stat().st_size:
            with self.path.open("r+b") as handle:
                handle.truncate(complete)

    def append(self, record: dict[str, Any]) -> None:
        """Write one finished case (flushed and synced before returning)."""
        if "id" not in record:
            raise InputError("a prediction record needs an 'id'.")
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[str(record["id"])] = record

    def __contains__(self, case_id: str) -> bool:
        return str(case_id) in self.done

    def __iter__(self) -> Iterator[dict]:
        return iter(self.done.values())

    def __len__(self) -> int:
        return len(self.done)
