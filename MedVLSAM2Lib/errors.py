"""Typed errors shared by the library, the CLI, the server and the Slicer module.

Only the CLI, the server and the Slicer Widget turn these into exit codes, status codes or
dialogs; library code raises them with a sentence the user can act on.
"""

from __future__ import annotations

import threading

__all__ = [
    "MedVLSAM2Error",
    "InputError",
    "IntensityScaleError",
    "WeightsError",
    "CapacityError",
    "ProtocolError",
    "SessionExpiredError",
    "TooLargeError",
    "ServerError",
    "Cancelled",
    "raise_if_cancelled",
]


class MedVLSAM2Error(Exception):
    """Base class of every error this library raises on purpose."""


class InputError(MedVLSAM2Error, ValueError):
    """Bad user input: a missing or unreadable file, a wrong shape, a prompt outside the volume."""


class IntensityScaleError(InputError):
    """A normalised volume (M3D-Seg) whose HU scale cannot be estimated, so SAM2 gets no input image from it."""


class WeightsError(MedVLSAM2Error):
    """A checkpoint is missing, has missing/unexpected keys or wrong shapes."""


class CapacityError(MedVLSAM2Error):
    """Not enough memory, or a server at its session limit; retry later or use a smaller preset."""


class ProtocolError(MedVLSAM2Error):
    """A malformed request or response on the server/client wire format."""


class TooLargeError(ProtocolError, InputError):
    """A request, frame or file declares more than a configured limit allows (voxels, bytes, tokens, objects); it is
    refused from what it declares, before the memory or the model time is spent. The message names the limit and
    the flag or argument that sets it."""


class SessionExpiredError(MedVLSAM2Error):
    """A server session no longer exists (expired or deleted); upload the volume again."""


class ServerError(MedVLSAM2Error):
    """The server cannot be reached, refused the request (key, version), or did not answer as a MedVLSAM2 server."""


class Cancelled(MedVLSAM2Error):
    """The caller set the ``cancel`` event of a long job (load, encode, report, ask, segment; local or remote), which
    stopped at its next check (between tokens, slices or steps) and returned nothing. Nothing half-done is kept: the
    engine or client that ran it stays usable. A GUI shows it as a status, not as an error."""


def raise_if_cancelled(cancel: threading.Event | None, what: str) -> None:
    """Raise :class:`Cancelled` when ``cancel`` (a ``threading.Event``, or anything with ``is_set()``) is set.

    Args:
        cancel: the caller's cancel flag; ``None``: the job cannot be cancelled.
        what: the job, for the message (e.g. ``"the report"``).

    Raises:
        Cancelled: the flag is set.
    """
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{what} was cancelled.")
