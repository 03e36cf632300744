"""A service started by the launcher does not outlive it (shared/lifetime.py), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from splitserve.services.launcher import Child
from splitserve.shared.lifetime import PARENT_PID_ENV

SERVICE = textwrap.dedent("""
    import os, sys, time
    from splitserve.shared.lifetime import PARENT_PID_ENV, die_with_launcher
    die_with_launcher()
    print(os.getpid(), PARENT_PID_ENV in os.environ, flush=True)
    time.sleep(600)
""")
LAUNCHER = textwrap.dedent(f"""
    import subprocess, sys, time
    from splitserve.shared.lifetime import launched_env
    subprocess.Popen([sys.executable, "-c", {SERVICE!r}], env=launched_env())
    time.sleep(600)
""")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)  # a zombie is dead
    except FileNotFoundError:
        return True


def test_a_service_dies_when_its_launcher_is_killed() -> None:
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdout=subprocess.PIPE, text=True)
    try:
        pid, passed_on = launcher.stdout.readline().split()
        assert passed_on == "False"  # not handed further down (an engine process has its own parent)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(30)
        deadline = time.monotonic() + 30
        while not _gone(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _gone(int(pid)), "the service outlived its SIGKILLed launcher"
    finally:
        launcher.kill()
        launcher.wait(30)


def test_the_launcher_names_itself_to_what_it_starts(tmp_path) -> None:
    out = tmp_path / "parent"
    child = Child("probe", [sys.executable, "-c", f"import os; open({str(out)!r}, 'w').write(os.environ[{PARENT_PID_ENV!r}])"])
    child.start()
    assert child.process.wait(60) == 0
    assert out.read_text() == str(os.getpid())
