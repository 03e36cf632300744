"""Processes that must not outlive the process that started them.

A worker started by `splitserve up`, an engine process, a tensor-parallel follower: each asks Linux
to SIGKILL it when its parent goes (PR_SET_PDEATHSIG), so a launcher or a worker killed with
SIGKILL leaves no orphan holding a port, a GPU or KV memory. Elsewhere (not Linux) the idle loops'
parent-pid checks end them instead.
"""

from __future__ import annotations

import ctypes
import os
import signal

PARENT_PID_ENV = "SPLITSERVE_PARENT_PID"
"""Set by the launcher for the services it starts: the pid each of them must not outlive."""
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent goes; exit now if it is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the idle parent-pid checks end the loops
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


def die_with_launcher() -> None:
    """A service started by the launcher dies with it (the variable is not passed further down)."""
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent:
        die_with_parent(int(parent))


def launched_env() -> dict[str, str]:
    """The environment for a service this process starts and must not outlive."""
    return {**os.environ, PARENT_PID_ENV: str(os.getpid())}
