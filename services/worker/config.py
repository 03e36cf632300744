"""Worker serving options that are not engine options (those live in shared/config.py)."""

from __future__ import annotations

from dataclasses import dataclass

from splitserve.shared.config import ConfigError


@dataclass(frozen=True)
class SessionConfig:
    """Bounds on the Session's credit merging (services/worker/session.py). While the client has
    granted no credit, each request's new tokens are merged into the chunk already waiting; these
    bound how long and how far, so the gateway's cadence cannot stretch inter-token latency
    without limit."""

    max_hold_ms: float = 20.0
    """Longest a waiting chunk is held for credit; then it is sent anyway. 0: no time bound."""
    max_merged_tokens: int = 16
    """Most tokens one request's waiting chunk gathers; a chunk this full is sent anyway. 0: no bound."""

    def validate(self) -> None:
        if self.max_hold_ms < 0:
            raise ConfigError(f"session max_hold_ms must be >= 0, got {self.max_hold_ms}")
        if self.max_merged_tokens < 0:
            raise ConfigError(f"session max_merged_tokens must be >= 0, got {self.max_merged_tokens}")
