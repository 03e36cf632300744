"""Router: prefix affinity, load awareness, health; admission: bounded slots and queue."""

from __future__ import annotations

import asyncio
import random

import pytest

from splitserve.services.gateway.admission import AdmissionQueue, AdmissionRejected
from splitserve.services.gateway.router import NoHealthyWorker, Router
from splitserve.shared.protocol.convert import WorkerLoad

BLOCK = 4


def _router(num_prefill=4, num_decode=2, **kw) -> Router:
    router = Router([f"p{i}:1" for i in range(num_prefill)], [f"d{i}:1" for i in range(num_decode)],
                    affinity_blocks=2, overload_margin_tokens=100, **kw)
    for inst in router.instances:
        router.update_load(inst, WorkerLoad(inst.url, inst.role, "m", 1024, BLOCK,
                                            num_free_blocks=100, num_total_blocks=100))
    return router


def _load(router: Router, url: str, **fields) -> None:
    inst = next(i for i in router.instances if i.url == url)
    router.update_load(inst, WorkerLoad(url, inst.role, "m", 1024, BLOCK, **{
        "num_free_blocks": 100, "num_total_blocks": 100, **fields}))


def test_same_prefix_goes_to_the_same_prefill_instance():
    router = _router()
    rng = random.Random(0)
    for _ in range(20):
        prefix = [rng.randrange(1000) for _ in range(2 * BLOCK)]
        chosen = {router.route(prefix + [rng.randrange(1000) for _ in range(rng.randrange(10))]).prefill.url
                  for _ in range(5)}
        assert len(chosen) == 1


def test_different_prefixes_spread_over_instances():
    router = _router()
    rng = random.Random(1)
    chosen = {router.route([rng.randrange(1000) for _ in range(3 * BLOCK)]).prefill.url for _ in range(64)}
    assert len(chosen) == 4


def test_affinity_follows_the_first_blocks_only():
    router = _router()
    prefix = list(range(2 * BLOCK))
    assert router.route(prefix + [1, 2, 3]).prefill is router.route(prefix + [7] * 20).prefill
    # a different first block changes the key
    assert router.affinity_key([99] + prefix[1:]) != router.affinity_key(prefix)


def test_overloaded_affinity_instance_is_avoided_and_taken_back_when_it_recovers():
    router = _router()
    prompt = list(range(3 * BLOCK))
    home = router.route(prompt).prefill.url
    _load(router, home, num_waiting_tokens=10_000)
    assert router.route(prompt).prefill.url != home
    _load(router, home, num_waiting_tokens=50)  # within the margin of the others: affinity wins again
    assert router.route(prompt).prefill.url == home


def test_instance_short_of_kv_blocks_is_avoided():
    router = _router()
    prompt = list(range(3 * BLOCK))
    home = router.route(prompt).prefill.url
    _load(router, home, num_free_blocks=1)
    assert router.route(prompt).prefill.url != home


def test_inflight_requests_count_before_the_next_load_report():
    router = _router()
    prompt = list(range(3 * BLOCK))
    home = router.route(prompt).prefill
    with router.track(home, 500):  # this gateway just sent 500 prompt tokens there
        assert router.route(prompt).prefill is not home
    assert router.route(prompt).prefill is home


def test_short_prompts_and_decode_go_to_the_least_loaded():
    router = _router()
    for i in range(4):
        _load(router, f"p{i}:1", num_waiting_tokens=100 * (i + 1) % 400)
    assert router.route([1, 2]).prefill.url == "p3:1"  # 0 queued tokens
    _load(router, "d0:1", num_running=10)
    assert {router.route([1, 2]).decode.url for _ in range(4)} == {"d1:1"}


def test_unhealthy_instances_are_skipped_and_rejoin_on_a_good_report():
    router = _router(num_prefill=2, num_decode=1)
    prompt = list(range(3 * BLOCK))
    home = router.route(prompt).prefill
    router.mark_failed(home, "connection reset")
    assert router.route(prompt).prefill is not home
    assert router.is_ready()
    _load(router, home.url)
    assert router.route(prompt).prefill is home


def test_no_healthy_decode_means_not_ready_and_no_route():
    router = _router(num_prefill=1, num_decode=1)
    router.mark_failed(router.instances[1], "gone")
    assert not router.is_ready()
    with pytest.raises(NoHealthyWorker, match="no healthy decode worker.*gone"):
        router.route([1, 2, 3])


def test_worker_reporting_the_wrong_role_is_not_used():
    router = _router(num_prefill=1, num_decode=1)
    router.update_load(router.instances[0], WorkerLoad("x", "decode", "m", 1024, BLOCK))
    assert not router.instances[0].healthy and "reports role decode" in router.instances[0].last_error


def test_colocated_routing():
    router = Router(worker_urls=["w0:1", "w1:1"])
    with pytest.raises(NoHealthyWorker, match="colocated"):
        router.route([1])
    for inst in router.instances:
        router.update_load(inst, WorkerLoad(inst.url, "colocated", "m", 512, BLOCK))
    route = router.route(list(range(40)))
    assert route.worker is not None and route.prefill is None
    assert router.max_model_len() == 512


# ---- admission ----------------------------------------------------------------------------------

def test_admission_queues_then_rejects_with_retry_after():
    async def scenario():
        gate = AdmissionQueue(max_inflight=2, max_queued=1, queue_timeout_s=5.0, retry_after_s=3)
        release = asyncio.Event()
        admitted = []

        async def hold(i):
            async with gate.admit():
                admitted.append(i)
                await release.wait()

        holders = [asyncio.create_task(hold(i)) for i in range(3)]  # 2 run, 1 queues
        for _ in range(1000):  # wait on the state, not on time: let the three tasks run
            if len(admitted) == 2 and gate.num_queued == 1:
                break
            await asyncio.sleep(0)
        assert admitted == [0, 1] and gate.num_queued == 1
        with pytest.raises(AdmissionRejected) as info:
            async with gate.admit():
                pass
        assert info.value.retry_after_s == 3
        release.set()
        await asyncio.wait_for(asyncio.gather(*holders), timeout=5)
        assert admitted == [0, 1, 2] and gate.num_inflight == 0 and gate.num_queued == 0

    asyncio.run(scenario())


def test_admission_queue_timeout_rejects():
    async def scenario():
        gate = AdmissionQueue(max_inflight=1, max_queued=5, queue_timeout_s=0.05)
        async with gate.admit():
            with pytest.raises(AdmissionRejected, match="within"):
                async with gate.admit():
                    pass
        assert gate.num_queued == 0
        async with gate.admit():  # the slot is free again
            pass

    asyncio.run(scenario())


def test_a_session_returns_to_the_colocated_worker_that_holds_it_unless_overloaded():
    router = Router(worker_urls=["w0:1", "w1:1", "w2:1"], affinity_blocks=2, overload_margin_tokens=100)
    for inst in router.instances:
        router.update_load(inst, WorkerLoad(inst.url, inst.role, "m", 1024, BLOCK, num_free_blocks=100,
                                            num_total_blocks=100))
    turn = list(range(100, 100 + 5 * BLOCK + 2))
    first = router.route(turn, "agent")
    assert first.reason == "prefix-affinity"
    holder = next(i for i in router.instances if i.url != first.worker.url)  # say another one ran it
    router.remember_session("agent", holder, turn)
    follow_up = turn + [7, 8, 9]
    assert (router.route(follow_up, "agent").worker, router.route(follow_up, "agent").reason) == (holder, "session")
    assert router.route([5] + follow_up, "agent").reason != "session"
    _load(router, holder.url, num_waiting_tokens=500)
    moved = router.route(follow_up, "agent")
    assert moved.worker is not holder and moved.reason == "session-overloaded"
    router.mark_failed(holder, "gone")
    assert router.route(follow_up, "agent").reason == "session-moved"


def test_a_mostly_cached_disaggregated_turn_runs_on_the_decode_instance_that_holds_it():
    router = _router(decode_prefill_max_new_tokens=8)
    turn = list(range(200, 200 + 6 * BLOCK + 1))
    decode = router.instances[-1]
    router.remember_session("agent", decode, turn)
    short = router.route(turn + [1, 2, 3], "agent")
    assert short.worker is decode and short.prefill is None and short.reason == "session-on-decode"
    long = router.route(turn + list(range(20)), "agent")  # too many new tokens: split, decode stays
    assert long.prefill is not None and long.decode is decode and long.reason == "session"
    assert router.route(turn + [1, 2, 3]).reason != "session-on-decode"  # no key: no session


def test_a_draining_worker_gets_no_new_requests():
    router = _router(num_prefill=2, num_decode=1)
    _load(router, "p0:1", draining=True)
    prompts = [[i] * (3 * BLOCK) for i in range(20)]
    assert {router.route(p).prefill.url for p in prompts} == {"p1:1"}
    _load(router, "p1:1", draining=True)
    with pytest.raises(NoHealthyWorker):
        router.route(prompts[0])
    _load(router, "p0:1")  # a worker that reports serving again (it was restarted) is used again
    assert router.route(prompts[0]).prefill.url == "p0:1"


def test_retired_instances_take_no_requests_and_go_once_idle():
    router = _router(num_prefill=2, num_decode=1)
    p0 = next(i for i in router.instances if i.url == "p0:1")
    with router.track(p0, 10):
        router.retire("p0:1")
        assert {router.route([i] * (3 * BLOCK)).prefill.url for i in range(20)} == {"p1:1"}
        assert router.idle_retired() == []
    assert router.idle_retired() == [p0]


def test_the_session_directory_holds_a_turn_s_full_blocks_and_tells_a_changed_history_apart():
    from splitserve.services.gateway.sessions import SessionDirectory

    sessions = SessionDirectory()
    turn = list(range(300, 300 + 3 * BLOCK + 1))  # the last token sampled has no KV yet
    sessions.remember("agent", "w0:1", turn, BLOCK)
    assert sessions.held_tokens("agent", turn + [1, 2], BLOCK) == ("w0:1", 3 * BLOCK)
    edited = list(turn)
    edited[-3] += 1  # one token of the held history differs: nothing is held
    assert sessions.held_tokens("agent", edited + [1, 2], BLOCK) == ("w0:1", 0)
    assert sessions.held_tokens("agent", turn[: 2 * BLOCK], BLOCK) == (None, 0)  # shorter than the held turn
    sessions.remember("agent", "w0:1", turn[:BLOCK], BLOCK)  # no full block before its last token
    assert sessions.held_tokens("agent", turn, BLOCK) == (None, 0)
