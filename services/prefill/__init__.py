"""The prefill service: runs prompts, samples the first token, holds and sends KV blocks.

Lifecycle of a request here: Prefill RPC -> WAITING -> RUNNING (chunked prefill, prefix cache)
-> first token sampled -> KV held (lease) -> decode side pulls the blocks -> released.
The server is `services/worker` with role "prefill"; this package only names the entry point.
"""


def run(args) -> int:
    from splitserve.services.worker.main import run_worker

    return run_worker(args, "prefill")
