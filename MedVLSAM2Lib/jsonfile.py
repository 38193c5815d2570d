"""Reading JSON files with errors a user can act on (missing file, not UTF-8, invalid JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import InputError

__all__ = ["read_json"]


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; ``what`` names the file's role in messages (e.g. "term dictionary").

    Raises:
        InputError: the file is missing, not UTF-8 or not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: the {what} is not UTF-8 text ({err}).") from err
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: the {what} is not valid JSON ({err}).") from err
