"""`splitserve up` restarts a crashing child after a back-off that doubles with each crash in a
row, up to a ceiling, and starts over once the child ran stably: a client that crashes a service
on purpose gets it restarted ever more slowly, not every half second."""

from __future__ import annotations

import sys

from splitserve.services import launcher
from splitserve.services.launcher import RESTART_MAX_S, RESTART_MIN_S, STABLE_S, Child, _supervise


def test_backoff_doubles_with_crashes_in_a_row_and_resets_after_a_stable_run():
    child = Child("w", [])
    delays = [child.schedule_restart(now=float(i)) for i in range(12)]
    assert delays[:3] == [RESTART_MIN_S, 2 * RESTART_MIN_S, 4 * RESTART_MIN_S]
    assert delays == sorted(delays) and delays[-1] == RESTART_MAX_S
    child.started_at = 100.0
    assert child.schedule_restart(now=100.0 + STABLE_S) == RESTART_MIN_S


def test_supervisor_restarts_a_dead_child_only_when_its_backoff_is_over(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(launcher.time, "monotonic", lambda: clock[0])
    child = Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
    child.start()
    child.process.wait(30)
    _supervise([child])  # notices the crash, schedules the restart
    assert child.restart_at == clock[0] + RESTART_MIN_S and child.restarts == 0
    _supervise([child])
    assert child.restarts == 0  # not yet
    clock[0] += RESTART_MIN_S
    _supervise([child])
    assert child.restarts == 1
    child.process.wait(30)
    _supervise([child])
    assert child.restart_at == clock[0] + 2 * RESTART_MIN_S  # second crash in a row: twice as long
