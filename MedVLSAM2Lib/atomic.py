"""Atomic file output: write to a temporary sibling, rename into place only when writing succeeded."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "remove_stale_partials"]

logger = logging.getLogger(__name__)


def _partial_parts(path: Path) -> tuple[str, str]:
    """The name of the temporary sibling that a process writes ``path`` through, before and after its PID."""
    return f".{path.name.split('.')[0]}.partial-", "".join(path.suffixes)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (one of another user counts: it cannot be signalled)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: alive, another user's; overflow: not a PID to judge
        return True
    return True


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary siblings of ``path`` that a process killed while writing it left behind (SIGKILL, a power
    cut): only names of exactly :func:`atomic_path`'s pattern for this ``path``, and only those whose writer's PID is
    not alive on this machine (a writer on another machine sharing the folder would lose its file, as it would race
    for ``path`` anyway). Returns the removed paths."""
    path = Path(path)
    before, after = _partial_parts(path)
    pattern = re.compile(re.escape(before) + r"(\d+)" + re.escape(after) + r"\Z")
    try:
        names = os.listdir(path.parent)
    except OSError:  # a folder that is missing or cannot be listed has nothing to clean
        return []
    removed = []
    for name in names:
        match = pattern.match(name)
        pid = int(match.group(1)) if match else 0
        if pid <= 0 or pid == os.getpid() or _alive(pid):  # never os.kill(0, …): that signals the process group
            continue
        try:
            (path.parent / name).unlink()
        except OSError:  # gone already (another writer cleaned it), or not ours to remove
            continue
        removed.append(path.parent / name)
        logger.info("removed %s, left by process %d that no longer runs", path.parent / name, pid)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` with the same suffixes (writers pick the format by suffix).

    When the block ends normally the temporary file replaces ``path``; on any error (and on ``KeyboardInterrupt``,
    which the CLI also raises for SIGTERM) it is removed, so ``path`` holds the old content or the complete new one,
    never a partial file. Temporary files of ``path`` that dead processes left are removed first
    (:func:`remove_stale_partials`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    before, after = _partial_parts(path)
    tmp = path.with_name(f"{before}{os.getpid()}{after}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
