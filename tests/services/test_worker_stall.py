"""A worker that stops answering (frozen: its calls never return) is abandoned by the gateway's
client: once the router has seen it miss its polls, the open Prefill calls and session streams on
it end with UNAVAILABLE at once, which the dispatcher treats as a worker failure (fail over if
nothing was streamed). A real gRPC server whose handlers hang stands in for the frozen process."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from splitserve.services.gateway.router import Router, poll_once
from splitserve.services.gateway.worker_client import WorkerClient, WorkerError, WorkerRequest
from splitserve.shared.grpc_channel import add_port, aio_server
from splitserve.shared.protocol import worker_pb2_grpc as pb_grpc
from splitserve.shared.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(60)


class Frozen(pb_grpc.WorkerServicer):
    """Every call waits forever, like a SIGSTOPped process behind an open TCP connection."""

    async def Prefill(self, request, context):
        await asyncio.Event().wait()

    async def GetLoad(self, request, context):
        await asyncio.Event().wait()

    async def Session(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        yield  # pragma: no cover


async def _stalled_calls_end_when_polls_fail():
    server = aio_server()
    pb_grpc.add_WorkerServicer_to_server(Frozen(), server)
    port = add_port(server, "127.0.0.1:0")
    await server.start()
    url = f"127.0.0.1:{port}"
    client = WorkerClient(url)
    router = Router(prefill_urls=[url], decode_urls=["127.0.0.1:1"])
    req = WorkerRequest("r1", [1, 2, 3], SamplingParams(max_tokens=2))
    try:
        prefill = asyncio.ensure_future(client.prefill(req, timeout_s=600))
        stream = client.generate(WorkerRequest("r2", [4, 5], SamplingParams(max_tokens=2)), timeout_s=600)
        generate = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.2)
        assert not prefill.done() and not generate.done()  # frozen: nothing comes back
        instance = router.instances[0]
        for _ in range(3):  # three polls in a row time out
            await poll_once(router, {url: client, "127.0.0.1:1": client}, timeout_s=0.2, stalled_after_polls=3)
        assert instance.failed_polls >= 3 and not instance.healthy
        for task in (prefill, generate):
            with pytest.raises(WorkerError) as failure:
                await asyncio.wait_for(task, 10)
            assert failure.value.code == grpc.StatusCode.UNAVAILABLE and failure.value.worker_failed
            assert "missed 3 load polls" in failure.value.details
    finally:
        await stream.aclose()
        await client.close()
        await server.stop(None)


def test_calls_on_a_stalled_worker_end_with_unavailable():
    asyncio.run(_stalled_calls_end_when_polls_fail())


async def _three_missed_polls(router: Router, client: WorkerClient) -> None:
    for _ in range(3):
        await poll_once(router, {i.url: client for i in router.instances}, timeout_s=0.2, stalled_after_polls=3)


def test_a_worker_that_never_answered_is_not_warned_about(caplog) -> None:
    """A gateway that comes up before its workers (compose, Kubernetes) sees them miss polls while
    they start: logged at INFO; one that had answered and then stops is a WARNING."""
    import logging

    from splitserve.shared.protocol.convert import WorkerLoad

    async def run() -> list[int]:
        client = WorkerClient("127.0.0.1:1")  # nothing listens there
        router = Router(prefill_urls=["127.0.0.1:1"], decode_urls=["127.0.0.1:2"])
        levels = []
        try:
            for answered in (False, True):
                for instance in router.instances:
                    instance.failed_polls = 0
                    instance.load = WorkerLoad("w", instance.role, "m", 64, 16) if answered else None
                caplog.clear()
                await _three_missed_polls(router, client)
                levels.append(max(r.levelno for r in caplog.records if "missed 3 load polls" in r.getMessage()))
        finally:
            await client.close()
        return levels

    with caplog.at_level(logging.INFO, logger="splitserve.services.gateway.router"):
        assert asyncio.run(run()) == [logging.INFO, logging.WARNING]
