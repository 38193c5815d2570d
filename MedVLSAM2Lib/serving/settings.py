"""How a server listens and what it accepts (:class:`ServerSettings`); light, so that the CLI can read the
defaults without importing the web stack."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..errors import InputError
from ..volume import DEFAULT_MAX_VOXELS

__all__ = ["ServerSettings", "MIN_KEY_LENGTH"]

MIN_KEY_LENGTH = 16  # shorter keys can be guessed by trying


@dataclass
class ServerSettings:
    """How the server listens, what it accepts, and how long it works for one request (README: server limits)."""

    host: str = "127.0.0.1"
    port: int = 8765
    api_key: str | None = None
    max_sessions: int = 8
    idle_timeout_s: float = 1800.0
    max_upload_mb: float = 1024.0
    max_voxels: int = DEFAULT_MAX_VOXELS
    max_json_kb: int = 1024
    max_uploads: int = 4
    body_timeout_s: float = 30.0
    request_timeout_s: float = 300.0
    shutdown_grace_s: float = 10.0
    cache_gb: float = 4.0
    max_prompt_tokens: int = 8192

    def check(self) -> None:
        """Raises :class:`InputError` for settings a server must not start with (no key beyond loopback)."""
        if not self.api_key and not _is_loopback(self.host):
            raise InputError(f"refusing to listen on {self.host} without an API key: anyone on the network could "
                             "use the model and read uploaded scans. Pass --api-key (or set MEDVLSAM2_API_KEY), "
                             "or listen on 127.0.0.1.")  # fmt: skip
        if self.api_key is not None and len(self.api_key) < MIN_KEY_LENGTH:
            raise InputError(f"the API key has {len(self.api_key)} characters; use at least {MIN_KEY_LENGTH}, random, "
                             "so it cannot be guessed: python3 -c \"import secrets; "
                             "print(secrets.token_urlsafe(24))\".")  # fmt: skip
        for name in ("max_sessions", "idle_timeout_s", "max_upload_mb", "max_voxels", "max_json_kb", "max_uploads",
                     "body_timeout_s", "request_timeout_s", "cache_gb", "max_prompt_tokens"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.shutdown_grace_s < 0:
            raise InputError(f"shutdown_grace_s must be >= 0, got {self.shutdown_grace_s}.")
        if not 0 <= self.port < 65536:
            raise InputError(f"port must be 0..65535, got {self.port}.")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
