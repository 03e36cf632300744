"""A worker SIGKILLed while a host-tier restore is in flight, on a real disaggregated stack
(`splitserve up`, the `openai` client), once on each side:

- the decode worker, restoring a keyed session's history for a next turn it runs whole
  (route 'session-on-decode'; when the gateway splits that turn instead, the prefill worker
  restoring its prefix is the one killed);
- the prefill worker, restoring an anonymous prompt's prefix for a split request.

The restore is held in flight by the fault hook in fault_hooks/sitecustomize.py (the copy waits
for the test; the test waits for the hook's file, never a sleep). Each time: the client gets an
OpenAI-format error (no hang, no traceback), the launcher restarts the worker and the next request
succeeds, and the surviving worker's device pool and host tier get every block back.
"""

from __future__ import annotations

import os
import signal
import threading

import openai
import pytest

from stack import LocalStack, process_running, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HOOKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fault_hooks")
BLOCK = 16
POOL = ["--num-blocks", "16", "--block-size", str(BLOCK), "--kv-offload-gib", "0.01"]
BOUND_S = 180.0  # a worker restart on a loaded 2-core box


@pytest.fixture(scope="module")
def hold_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("hold-restore"))


@pytest.fixture(scope="module")
def stack(tmp_path_factory, hold_dir):
    path = os.pathsep.join(p for p in (HOOKS, os.environ.get("PYTHONPATH")) if p)
    env = {"PYTHONPATH": path, "SPLITSERVE_TEST_HOLD_RESTORE_DIR": hold_dir}
    with LocalStack(["--prefill", "1", "--decode", "1", *POOL], str(tmp_path_factory.mktemp("death-cache")), env=env) as s:
        yield s


def tokens(seed: int, n: int) -> list[int]:
    return [(seed * 37 + i * 11) % 700 + 20 for i in range(n)]


def complete(client, prompt: list[int], max_tokens: int = 8, key: str | None = None):
    extra = {"ignore_eos": True, "return_token_ids": True, **({"prompt_cache_key": key} if key else {})}
    return client.completions.create(model="splitserve-demo", prompt=prompt, max_tokens=max_tokens,
                                     temperature=0, extra_body=extra)


def evict_everything(client, seed: int) -> None:
    """One anonymous request that needs 15 of the 16 blocks on either worker: whatever they had
    cached goes (its copies stay on the host tier)."""
    assert complete(client, tokens(seed, 15 * BLOCK - 8)).usage.completion_tokens == 8


def kill_mid_restore(stack: LocalStack, hold_dir: str, send) -> tuple[str, Exception]:
    """Arm the hook, `send()` a request in a thread, wait until a restore is held in an engine
    process, SIGKILL that engine's worker; returns its role and what `send()` raised."""
    open(os.path.join(hold_dir, "armed"), "w").close()
    raised: list[Exception] = []
    thread = threading.Thread(target=lambda: _catch(send, raised), daemon=True)
    thread.start()
    held = wait_until(lambda: [f for f in os.listdir(hold_dir) if f.startswith("held-")], 120,
                      message="a restore held in flight")
    engine_pid = int(held[0].split("-", 1)[1])
    os.rename(os.path.join(hold_dir, held[0]), os.path.join(hold_dir, f"done-{engine_pid}"))
    roles = {stack.worker_pid(role): role for role in ("prefill", "decode")}
    role = roles.get(_parent(engine_pid))
    assert role is not None, "the held restore is in no worker's engine process"
    worker_pid = stack.worker_pid(role)
    wait_until(lambda: stack.load(role).counters["host_blocks_pinned"] > 0, 60,  # (the stats the engine last sent)
               message="the held restore's host slots pinned")
    os.kill(worker_pid, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive(), "the request hangs after its worker died"
    wait_until(lambda: not process_running(engine_pid), 60, message="the engine process gone with its worker")
    assert len(raised) == 1, "the request succeeded although its worker was killed mid-restore"
    return role, raised[0]


def assert_openai_error(exc: Exception, role: str) -> None:
    """(The gateway routes a request whose worker failed before streaming once more; with the
    only `role` worker down, that ends in a 503 naming it.)"""
    assert isinstance(exc, openai.APIStatusError), repr(exc)
    assert exc.status_code in (502, 503), (exc.status_code, exc.response.text)
    error = exc.response.json()["error"]
    assert role in error["message"] and error["type"] and "Traceback" not in exc.response.text


def wait_served_again(stack: LocalStack, role: str, old_pid: int) -> None:
    client = stack.openai(timeout=60)

    def succeeds():
        try:
            return complete(client, tokens(99, 8), max_tokens=3).usage.completion_tokens == 3
        except openai.APIError:
            return False

    wait_until(succeeds, BOUND_S, interval_s=1.0, message=f"a request served after the {role} restart")
    assert stack.worker_pid(role) != old_pid


def assert_pools_whole(stack: LocalStack, role: str) -> None:
    """Every device block free or evictable-cached, no host slot pinned, nothing running."""
    def whole():
        load = stack.load(role)
        return (load.num_running == 0 and load.num_free_blocks == load.num_total_blocks
                and load.counters["host_blocks_pinned"] == 0)

    wait_until(whole, 60, message=f"the {role} worker's pools whole")


def test_decode_killed_while_restoring_a_session_turn(stack, hold_dir):
    client = stack.openai(timeout=150)
    first = tokens(1, 4 * BLOCK)
    turn1 = complete(client, first, key="agent-a")
    evict_everything(client, 2)
    turn2 = first + turn1.choices[0].token_ids + tokens(3, 12)
    pids = {role: stack.worker_pid(role) for role in ("prefill", "decode")}
    # The gateway runs this turn whole on the decode worker that holds the session (the restore is
    # there), unless it judged that worker too loaded and split it (the prefill restores the
    # prefix): either way a worker dies mid-restore, and the other must come out whole.
    role, exc = kill_mid_restore(stack, hold_dir, lambda: complete(client, turn2, key="agent-a"))
    survivor = "prefill" if role == "decode" else "decode"
    assert_openai_error(exc, role)
    wait_served_again(stack, role, pids[role])
    assert_pools_whole(stack, survivor)  # also after the gateway's retry, if any
    retried = complete(client, turn2, key="agent-a")  # the session goes on, on the new decode
    assert retried.usage.completion_tokens == 8
    assert_pools_whole(stack, "decode")
    assert_pools_whole(stack, "prefill")


def test_prefill_killed_while_restoring_a_prefix(stack, hold_dir):
    client = stack.openai(timeout=150)
    prompt = tokens(4, 4 * BLOCK)
    assert complete(client, prompt, max_tokens=2).usage.completion_tokens == 2
    evict_everything(client, 5)
    prefill_pid = stack.worker_pid("prefill")
    role, exc = kill_mid_restore(stack, hold_dir, lambda: complete(client, prompt + tokens(6, 20)))
    assert role == "prefill", "an anonymous split request's prefix is restored on the prefill worker"
    assert_openai_error(exc, "prefill")
    wait_served_again(stack, "prefill", prefill_pid)
    assert_pools_whole(stack, "decode")
    assert complete(client, prompt + tokens(6, 20)).usage.completion_tokens == 8
    assert_pools_whole(stack, "prefill")
    assert_pools_whole(stack, "decode")


def _catch(send, raised: list[Exception]) -> None:
    try:
        send()
    except Exception as exc:  # handed to the test thread
        raised.append(exc)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])
