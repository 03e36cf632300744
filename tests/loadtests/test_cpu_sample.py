"""loadtests/cpu_sample.py: a real busy child process shows up as about one core on its main thread."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import cpu_sample  # noqa: E402

BUSY = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass\nraise SystemExit(3)"


def test_a_busy_python_child_is_seen_saturating_its_main_thread():
    code, series = cpu_sample.sample([sys.executable, "-c", BUSY], interval_s=0.2)
    assert code == 3  # the command's exit status comes back
    busy = [values for (pid, cmdline), values in series.items() if "time.monotonic() + 1.5" in cmdline]
    assert len(busy) == 1
    middle = busy[0][1:-1] or busy[0]
    assert max(total for total, _ in middle) > 0.6 and max(main for _, main in middle) > 0.6
    text = cpu_sample.report(series)
    assert "main-thread peak" in text and "time.monotonic() + 1.5" in text
