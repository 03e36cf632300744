"""What the connector reports to the engine (`ConnectorEvents`) and its counters.

Written by the connector's loop thread, drained by the engine thread through `poll()`; one lock
guards both sides, and `take()` hands each event out exactly once. Every event calls the wake-up
the engine set (`set_wakeup`) once it is queued, so an engine with nothing else to do sleeps until
then instead of polling on a timer.
"""

from __future__ import annotations

import threading

from splitserve.shared.kv.connector import KVConnectorEvents


# The engine-facing event record of every connector (decode side: loaded, load_failed; prefill
# side: released), defined with the interface in shared/kv/connector.py.
ConnectorEvents = KVConnectorEvents


class EventQueue:
    def __init__(self):
        self._lock = threading.Lock()
        self._events = ConnectorEvents()
        self._stats = {"bytes_sent": 0, "bytes_received": 0, "transfers_ok": 0,
                       "transfers_failed": 0, "sends_ok": 0, "sends_failed": 0,
                       "runs_received": 0, "blocks_received": 0, "runs_sent": 0, "blocks_sent": 0,
                       "last_gbps": 0.0}
        self._wake = _no_wakeup

    def set_wakeup(self, wake) -> None:
        """`wake()` runs on the thread that queued an event, after it is queued (never under the lock)."""
        self._wake = wake

    def loaded(self, request_id: str, nbytes: int, num_runs: int, num_blocks: int, seconds: float) -> None:
        with self._lock:
            self._events.loaded.append(request_id)
            self._events.loaded_bytes[request_id] = nbytes
            s = self._stats
            s["bytes_received"] += nbytes
            s["transfers_ok"] += 1
            s["runs_received"] += num_runs
            s["blocks_received"] += num_blocks
            s["last_gbps"] = nbytes / max(seconds, 1e-9) / 1e9
        self._wake()

    def load_failed(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._events.load_failed.append((request_id, reason))
            self._stats["transfers_failed"] += 1
        self._wake()

    def retract_loaded(self, request_id: str) -> bool:
        """An abort that arrives after the load completed but before the engine polled it: the
        request is reported as failed ('aborted') instead, never both."""
        with self._lock:
            if request_id not in self._events.loaded:
                return False
            self._events.loaded.remove(request_id)
            self._events.loaded_bytes.pop(request_id, None)
            self._stats["transfers_ok"] -= 1
            self._stats["transfers_failed"] += 1
            self._events.load_failed.append((request_id, "aborted"))
        self._wake()
        return True

    def sent(self, nbytes: int, num_runs: int, num_blocks: int, ok: bool) -> None:
        with self._lock:
            s = self._stats
            s["sends_ok" if ok else "sends_failed"] += 1
            if ok:
                s["bytes_sent"] += nbytes
                s["runs_sent"] += num_runs
                s["blocks_sent"] += num_blocks

    def released(self, request_id: str, sent_bytes: int) -> None:
        with self._lock:
            self._events.released.append(request_id)
            self._events.sent_bytes[request_id] = sent_bytes
        self._wake()

    def take(self) -> ConnectorEvents:
        with self._lock:
            events, self._events = self._events, ConnectorEvents()
            return events

    def stats(self) -> dict:
        with self._lock:
            return dict(self._stats)


def _no_wakeup() -> None:
    """No engine waits on a wake-up (it polls every step)."""
