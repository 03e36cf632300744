"""A misbehaving prefill side in its own process, for failure tests.

Modes:
- "silent":  binds the control ROUTER, reads load requests, never answers.
- "no_data": answers `accepted` with its UCX worker address, connects an endpoint to the decode
             side's worker address (so the decode side posts its receives), then never sends a
             byte.
The load messages it saw are sent back over the pipe on request, so tests can inspect them.
"""

from __future__ import annotations

import multiprocessing as mp
import os


def _child(conn, mode: str, key: bytes | None) -> None:
    os.environ.setdefault("UCX_TLS", "tcp")
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    import asyncio

    import zmq
    import zmq.asyncio

    async def main():
        zctx = zmq.asyncio.Context()
        router = zctx.socket(zmq.ROUTER)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        conn.send(f"tcp://127.0.0.1:{port}")
        seen, endpoints = [], []
        if mode == "no_data":
            import ucxx
            ucxx.init(options={"TLS": "tcp"}, enable_python_future=True)

        async def serve():
            from splitserve.shared.transfer.control import decode, encode
            while True:
                peer, frame = await router.recv_multipart()
                msg = decode(key, frame)
                seen.append(msg)
                if mode == "no_data" and msg["type"] == "load":
                    address = {"backend": "ucx", "worker_address": bytes(ucxx.get_worker_address()).hex()}
                    reply = {"type": "accepted", "transfer_id": msg["transfer_id"], "num_runs": 1,
                             "data_address": address}
                    await router.send_multipart([peer, encode(key, reply)])
                    theirs = bytes.fromhex(msg["data_address"]["worker_address"])
                    ep = await ucxx.create_endpoint_from_worker_address(
                        ucxx.get_ucx_address_from_buffer(theirs))
                    endpoints.append(ep)  # keep it open, send nothing

        task = asyncio.ensure_future(serve())
        loop = asyncio.get_running_loop()
        while True:
            cmd = await loop.run_in_executor(None, conn.recv)
            if cmd == "seen":
                conn.send(list(seen))
            elif cmd == "close":
                task.cancel()
                router.close(linger=0)
                if mode == "no_data":  # the notifier thread would block interpreter exit
                    for ep in endpoints:
                        ep.abort()
                    endpoints.clear()
                    ucxx.stop_notifier_thread()
                conn.send("closed")
                return

    asyncio.run(main())


class FakePrefill:
    def __init__(self, mode: str, timeout_s: float = 60.0, key: bytes | None = None):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(child_conn, mode, key), daemon=True)
        self.process.start()
        self._timeout_s = timeout_s
        self.control_address = None

    def ready(self) -> "FakePrefill":
        if self.control_address is None:
            if not self._conn.poll(self._timeout_s):
                raise TimeoutError("fake prefill did not start")
            self.control_address = self._conn.recv()
        return self

    def seen(self) -> list[dict]:
        self._conn.send("seen")
        if not self._conn.poll(10):
            raise TimeoutError("fake prefill did not answer")
        return self._conn.recv()

    def close(self) -> None:
        try:
            self._conn.send("close")
            self._conn.poll(5)
        except OSError:
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
