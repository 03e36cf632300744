"""Run a command and sample the CPU use of every Python process on the machine while it runs.

    python loadtests/cpu_sample.py [--interval-s 0.25] -- python loadtests/serve_compare.py ...

Every interval it reads /proc for each Python process: total CPU, and the CPU of its main thread
(the event loop in the gateway and the workers; the engine runs on its own thread). At the end it
prints, per process that used at least half a core at some point, its peak and mean in cores and
the last samples as `total/main` pairs, so a saturated event loop (main ≈ 1.0) stands out. This is
how docs/benchmarks.md section 6 tells a CPU-bound gateway from a GPU-bound engine. Linux only.
The exit status is the command's.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(stat_path: str) -> int:
    fields = open(stat_path).read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def snapshot() -> dict[int, tuple[str, int, int]]:
    """pid -> (command line, CPU ticks of the process, CPU ticks of its main thread)."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            if "python" not in cmdline:
                continue
            out[pid] = (cmdline.strip(), _cpu_ticks(f"/proc/{pid}/stat"), _cpu_ticks(f"/proc/{pid}/task/{pid}/stat"))
        except OSError:  # the process ended between listing and reading
            continue
    return out


def sample(command: list[str], interval_s: float) -> tuple[int, dict[tuple[int, str], list[tuple[float, float]]]]:
    """Run `command`; return its exit status and, per (pid, command line), (total, main) cores per interval."""
    process = subprocess.Popen(command)
    series: dict[tuple[int, str], list[tuple[float, float]]] = {}
    previous, previous_t = snapshot(), time.monotonic()
    while process.poll() is None:
        time.sleep(interval_s)
        current, now = snapshot(), time.monotonic()
        ticks = TICKS_PER_S * (now - previous_t)
        for pid, (cmdline, total, main) in current.items():
            if pid in previous and pid != os.getpid():
                series.setdefault((pid, cmdline), []).append(
                    ((total - previous[pid][1]) / ticks, (main - previous[pid][2]) / ticks))
        previous, previous_t = current, now
    return process.returncode, series


def report(series: dict[tuple[int, str], list[tuple[float, float]]], last: int = 48) -> str:
    lines = ["CPU per Python process, in cores (processes that reached 0.5):"]
    for (pid, cmdline), values in sorted(series.items(), key=lambda kv: -max(v[0] for v in kv[1])):
        if max(v[0] for v in values) < 0.5:
            continue
        busy = [v for v in values if v[0] >= 0.2]
        lines.append(f"pid {pid:7d} peak {max(v[0] for v in values):5.2f} mean(busy) "
                     f"{sum(v[0] for v in busy) / len(busy):5.2f} main-thread peak {max(v[1] for v in values):5.2f}  "
                     f"{cmdline[:140]}")
        lines.append("    " + " ".join(f"{total:.1f}/{main:.1f}" for total, main in values[-last:]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval-s", type=float, default=0.25)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    code, series = sample(command, args.interval_s)
    print(report(series), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
