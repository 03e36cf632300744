"""A TransferConnector in its own process, driven over a multiprocessing pipe (spawn context).

The test process sends commands; the child runs them on its own TransferConnector and answers. Every
answer is awaited with a timeout, so a hung child fails the test instead of hanging it.

The child's kv_cache is filled deterministically from `seed`
(torch.randn(generator=manual_seed(seed))), so the test can rebuild the expected contents. With
`split=True` it is a pool split by KV layer group (`GROUP_SHAPES`: a full-attention layer and a
sliding layer of window `WINDOW`, each its own tensor), and block lists are one list per group.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing as mp
import os
import time
import traceback

KV_SHAPE = (64, 2, 2, 16, 2, 8)  # [num_blocks, num_layers, 2, block_size, Hkv, D]
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 4
WINDOW = 20
GROUP_SHAPES = ((64, 1, 2, 16, 2, 8), (24, 1, 2, 16, 2, 8))  # full group, sliding group
LAYER_BLOCK_BYTES = 2 * 16 * 2 * 8 * 4


def make_cache(seed: int, split: bool = False):
    """The pool (or, split, one pool per group) a peer of `seed` starts with."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    if split:
        return [torch.randn(shape, generator=generator) for shape in GROUP_SHAPES]
    return torch.randn(KV_SHAPE, generator=generator)


def _split_layout(model_id: str):
    from splitserve.shared.transfer import KvLayout
    return KvLayout(model_id, "float32", 16, 2, 2, 8, tensor_parallel_size=1, kv_heads_per_rank=2,
                    kv_groups=((None, (1,)), (WINDOW, (0,))), group_num_blocks=tuple(s[0] for s in GROUP_SHAPES))


def _clone(kv_cache):
    return [pool.clone() for pool in kv_cache] if isinstance(kv_cache, list) else kv_cache.clone()


def _child(conn, config_kwargs: dict, seed: int) -> None:
    os.environ.setdefault("UCX_TLS", "tcp")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from splitserve.shared.transfer import KvHandle, TransferConfig
    from splitserve.shared.transfer.connector import TransferConnector

    torch.set_num_threads(1)
    split = config_kwargs.pop("split", False)
    kv_cache = make_cache(seed, split)
    try:
        secret = config_kwargs.pop("secret", None)
        layout = _split_layout(config_kwargs["model_id"]) if split else None
        connector = TransferConnector(kv_cache, TransferConfig(**config_kwargs), secret=secret, layout=layout)
        conn.send(("ok", {"instance_id": connector.instance_id, "layout_hash": connector.layout_hash,
                          "control_address": getattr(connector, "_server", None)
                          and connector.control_address}))
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
        return
    seen = {"loaded": [], "load_failed": [], "released": [], "loaded_bytes": {}, "sent_bytes": {}}

    def drain():
        ev = connector.poll()
        seen["loaded"] += ev.loaded
        seen["load_failed"] += [list(x) for x in ev.load_failed]
        seen["released"] += ev.released
        seen["loaded_bytes"].update(ev.loaded_bytes)
        seen["sent_bytes"].update(ev.sent_bytes)

    record = _Recorder(connector)

    while True:
        cmd, args = conn.recv()
        try:
            if cmd == "close":
                connector.close()
                conn.send(("ok", None))
                return
            if cmd == "hold":
                result = connector.hold(*args).to_dict()
            elif cmd == "start_load":
                rid, handle, dst = args
                result = connector.start_load(rid, KvHandle.from_dict(handle), dst)
            elif cmd == "abort":
                result = connector.abort(*args)
            elif cmd == "start_then_abort":  # one loop callback: the abort lands before the load's task begins
                rid, handle, dst = args
                loaded = KvHandle.from_dict(handle)
                dst = dst if split else [dst]  # one list per pool
                connector._call(lambda: (connector._start_load(rid, loaded, dst, time.monotonic()),
                                         connector._abort(rid)))
                result = None
            elif cmd == "record":  # what this side's loop did so far, in order (and forget it)
                result = record.take()
            elif cmd == "stats":
                result = connector.stats()
            elif cmd == "failure":
                result = connector.failure()
            elif cmd == "break_control":  # a failpoint: the task serving the control socket dies
                import asyncio

                async def die():
                    raise RuntimeError("injected control task failure")
                connector._tasks[0].cancel()
                connector._tasks[0] = asyncio.run_coroutine_threadsafe(die(), connector._loop)
                result = None
            elif cmd == "blocks":
                result = kv_cache[list(args[0])].clone()
            elif cmd == "cache":
                result = _clone(kv_cache)
            elif cmd == "wait_events":  # until every id in `ids` appears in `kind`, or timeout
                kind, ids, timeout_s = args
                deadline = time.monotonic() + timeout_s
                while True:
                    drain()
                    got = {x[0] if isinstance(x, list) else x for x in seen[kind]}
                    if set(ids) <= got or time.monotonic() > deadline:
                        break
                    time.sleep(0.005)
                result = dict(seen)
            elif cmd == "events":
                drain()
                result = dict(seen)
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", result))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class _Recorder:
    """Logs, on the connector's loop thread and in order, each control message this side sends,
    each event it queues for the engine (type, request or transfer id) and each engine wake-up."""

    def __init__(self, connector) -> None:
        self.entries: list[tuple] = []
        self._connector = connector
        connector.set_wakeup(lambda: self.entries.append(("wake",)))
        self._wrap(connector._events, "loaded", lambda request_id, *_: request_id)
        self._wrap(connector._events, "released", lambda request_id, *_: request_id)
        for name, method in (("_client", "send"), ("_server", "reply")):
            if getattr(connector, name, None) is not None:
                self._wrap(getattr(connector, name), method,
                           lambda to, msg: msg.get("request_id") or msg.get("transfer_id"), by_type=True)

    def take(self) -> list[tuple]:
        """The entries so far, read on the loop after the callback running now has ended (an event
        and the wake-up and messages that follow it run in one callback), and forgotten."""
        taken = concurrent.futures.Future()

        def swap() -> None:
            entries, self.entries = self.entries, []
            taken.set_result(entries)
        self._connector._loop.call_soon_threadsafe(swap)
        return taken.result(timeout=30)

    def _wrap(self, owner, method: str, key, by_type: bool = False) -> None:
        real = getattr(owner, method)

        def recorded(*args):
            self.entries.append((args[1]["type"] if by_type else method, key(*args)))
            return real(*args)
        setattr(owner, method, recorded)


class Peer:
    """Handle on a child process running one TransferConnector."""

    def __init__(self, seed: int, start_timeout_s: float = 60.0, **config_kwargs):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(child_conn, config_kwargs, seed), daemon=True)
        self.process.start()
        self.seed = seed
        self._start_timeout_s = start_timeout_s
        self.info = None

    def ready(self) -> "Peer":
        """Waits for the child's connector to start (spawn several peers, then call ready())."""
        if self.info is None:
            self.info = self._answer(self._start_timeout_s)
        return self

    def _answer(self, timeout_s: float):
        if not self._conn.poll(timeout_s):
            raise TimeoutError(f"peer process gave no answer within {timeout_s} s")
        status, result = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"peer process failed:\n{result}")
        return result

    def call(self, cmd: str, *args, timeout_s: float = 30.0):
        self._conn.send((cmd, args))
        return self._answer(timeout_s)

    def wait_events(self, kind: str, ids, timeout_s: float) -> dict:
        return self.call("wait_events", kind, list(ids), timeout_s, timeout_s=timeout_s + 30)

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.call("close", timeout_s=30)
            except Exception:  # noqa: BLE001
                pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
