"""loadtests/cpu_sample.py: a real busy child process shows up with its CPU on its main thread.

The child burns a fixed amount of CPU time (not of wall time), so what is asserted holds however
loaded the machine is: the sampler sees the child, attributes the CPU it used to it, and finds
it all on the main thread (the child has no other thread). No assertion depends on speed.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import cpu_sample  # noqa: E402

CPU_S = 1.0
BUSY = f"import time\nwhile time.process_time() < {CPU_S}: pass\nraise SystemExit(3)"


def test_a_busy_python_child_is_seen_using_its_cpu_on_its_main_thread():
    code, series = cpu_sample.sample([sys.executable, "-c", BUSY], interval_s=0.2)
    assert code == 3  # the command's exit status comes back
    busy = [values for (pid, cmdline), values in series.items() if "time.process_time()" in cmdline]
    assert len(busy) == 1
    total = sum(total for total, _ in busy[0])
    main = sum(main for _, main in busy[0])
    # It needs a whole CPU second, so it lives through several samples however slow it runs; each
    # sample holds the ticks it used since the previous one, all of them on its only thread (the
    # process's and the thread's counters are read a moment apart: a tick or two may differ).
    assert total > 0, busy[0]
    assert main >= 0.8 * total, busy[0]


def test_the_report_lists_busy_processes_with_their_main_thread_peak():
    series = {(11, "python busy.py"): [(0.9, 0.8), (1.0, 0.7)], (12, "python idle.py"): [(0.1, 0.1)]}
    text = cpu_sample.report(series)
    assert "peak  1.00" in text and "main-thread peak  0.80" in text and "python busy.py" in text
    assert "0.9/0.8 1.0/0.7" in text and "idle.py" not in text
