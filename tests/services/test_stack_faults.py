"""The local stack (2 prefill + 1 decode) attacked and broken on purpose, with real processes:

- nothing listens beyond 127.0.0.1, the secret is on no command line, and a caller without the
  stack's token is refused by every worker RPC but Health;
- a SIGSTOPped prefill is detected by the gateway's polls: requests in flight on it fail over to
  the other prefill and complete; a SIGSTOPped decode ends its streams with an error, not a hang;
  both serve again after SIGCONT, with every KV block back in the pool;
- a gateway killed with SIGKILL is restarted by `splitserve up` and serves again;
- last, Ctrl-C (SIGINT) to `splitserve up` stops every process it started, the restarted gateway
  included, and the launcher exits 0 (the stack is this module's: a stack of its own would cost a
  whole start-up to check its stop).

No timed assertions: every wait is on a condition, with generous bounds (a loaded 2-core box).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import grpc
import pytest

from splitserve.shared.listening import listening_sockets
from stack import LocalStack, process_running, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BOUND_S = 90.0  # stall detection (3 polls) + a failover + a loaded box


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(["--prefill", "2", "--decode", "1", "--max-model-len", "256"],
                    str(tmp_path_factory.mktemp("faults"))) as s:
        yield s


def _stack_pids(stack) -> dict[str, int]:
    return {"gateway": stack.gateway_pid(), "prefill-0": stack.worker_pid("prefill", 0),
            "prefill-1": stack.worker_pid("prefill", 1), "decode": stack.worker_pid("decode")}


def test_everything_listens_on_the_configured_host_only(stack):
    for name, pid in _stack_pids(stack).items():
        sockets = listening_sockets(pid)
        assert sockets, f"{name} listens on nothing?"
        assert {ip for ip, _ in sockets} == {"127.0.0.1"}, (name, sockets)
    secret = open(stack.secret_file).read().strip()
    for pid in _stack_pids(stack).values():
        assert secret not in open(f"/proc/{pid}/cmdline").read()


def test_workers_refuse_callers_without_the_token(stack):
    from splitserve.shared.grpc_channel import sync_channel
    from splitserve.shared.protocol import worker_pb2 as pb
    from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc

    for role, index in (("prefill", 0), ("decode", 0)):
        with sync_channel(stack.worker_address(role, index)) as channel:
            stub = pb_grpc.WorkerStub(channel)
            assert stub.Health(pb.HealthRequest(), timeout=10).ready  # probes stay open
            for call in (lambda: stub.Abort(pb.AbortRequest(request_id="someone-else"), timeout=10),
                         lambda: stub.GetLoad(pb.LoadRequest(), timeout=10),
                         lambda: list(stub.Generate(pb.GenerateRequest(request_id="x", prompt_token_ids=[1]),
                                                    timeout=10)),
                         lambda: stub.Prefill(pb.PrefillRequest(request_id="x", prompt_token_ids=[1]), timeout=10)):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stack.load(role, index).instance_id  # the stack's own token works


async def _requests(stack, n: int, max_tokens: int) -> list:
    """n streamed completions at once; each ends as its text or the exception it raised."""
    client = stack.async_openai(timeout=BOUND_S * 2)

    async def one(i: int):
        try:
            stream = await client.completions.create(model="splitserve-demo", prompt=f"request {i} " * 6,
                                                     max_tokens=max_tokens, stream=True,
                                                     extra_body={"ignore_eos": True})
            return "".join([c.choices[0].text async for c in stream if c.choices])
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            return exc

    try:
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), BOUND_S * 2)
    finally:
        await client.close()


def _pools_full(stack) -> bool:
    loads = [stack.load("prefill", 0), stack.load("prefill", 1), stack.load("decode")]
    return all(load.num_free_blocks == load.num_total_blocks for load in loads)


def _freeze_during(stack, pid: int, n: int, max_tokens: int) -> list:
    """Run n requests and SIGSTOP `pid` half a second in (they are mid-stream), until they end."""
    async def run():
        task = asyncio.ensure_future(_requests(stack, n, max_tokens))
        await asyncio.sleep(0.5)
        os.kill(pid, signal.SIGSTOP)
        try:
            return await task
        finally:
            os.kill(pid, signal.SIGCONT)
    return asyncio.run(run())


def test_a_frozen_prefill_fails_over_and_a_frozen_decode_ends_with_errors(stack):
    frozen = stack.worker_pid("prefill", 0)
    os.kill(frozen, signal.SIGSTOP)
    try:
        results = asyncio.run(_requests(stack, 8, 4))
        # Still frozen: its missed load polls must be noticed, whether or not a request was routed
        # to it before they were (requests that finish on the other prefill end the run sooner).
        wait_until(lambda: any("abandoning its open calls" in line for line in stack.lines), BOUND_S,
                   message="the frozen prefill detected as stalled")
    finally:
        os.kill(frozen, signal.SIGCONT)
    failed = [r for r in results if isinstance(r, Exception)]
    # Each ended, and completed: on the other prefill, routed there or failed over to it (whether
    # any reached the frozen one first depends on timing; test_worker_stall.py pins that path).
    assert not failed, failed
    results = _freeze_during(stack, stack.worker_pid("decode"), n=4, max_tokens=200)
    assert all(isinstance(r, (str, Exception)) for r in results)  # every request ended
    wait_until(lambda: _pools_full(stack), BOUND_S, interval_s=1.0, message="every pool full after SIGCONT")
    wait_until(lambda: _all_healthy(stack), BOUND_S, interval_s=0.5, message="the gateway sees every worker")
    after = asyncio.run(_requests(stack, 2, 4))
    assert all(isinstance(r, str) for r in after), after


def _all_healthy(stack) -> bool:
    import httpx

    try:
        workers = httpx.get(f"{stack.url}/health", timeout=10).json()["workers"]
    except (httpx.HTTPError, ValueError, KeyError):
        return False
    return all(w["healthy"] for w in workers)


def test_a_killed_gateway_is_restarted(stack):
    old = stack.gateway_pid()
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: _gateway_other_than(stack, old), BOUND_S, interval_s=0.5, message="a new gateway")

    def serves() -> bool:
        try:
            return stack.openai(timeout=30).completions.create(
                model="splitserve-demo", prompt="after the crash", max_tokens=3).choices[0].text is not None
        except Exception:  # noqa: BLE001 - still starting
            return False

    wait_until(serves, BOUND_S * 2, interval_s=1.0, message="the restarted gateway serves")
    wait_until(lambda: _all_healthy(stack), BOUND_S, interval_s=0.5, message="the gateway sees every worker")
    assert any("gateway exited" in line and "restarting it" in line for line in stack.lines)
    wait_until(lambda: _pools_full(stack), BOUND_S, interval_s=1.0, message="every pool full")


def test_ctrl_c_stops_everything(stack):
    pids = _stack_pids(stack)
    assert all(process_running(pid) for pid in pids.values())
    stack.stop()  # SIGINT, as Ctrl-C sends (the fixture's stop then finds it stopped)
    assert stack.process.returncode == 0
    wait_until(lambda: not any(process_running(pid) for pid in pids.values()), 10, message="every process gone")
    assert any("stopping" in line or "Shutting down" in line for line in stack.lines)


def _gateway_other_than(stack, old: int) -> bool:
    try:
        return stack.gateway_pid() != old
    except RuntimeError:
        return False
