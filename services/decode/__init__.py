"""The decode service: receives a request's KV blocks from a prefill instance and decodes.

Lifecycle of a request here: Generate RPC with a KvHandle -> WAITING_FOR_KV (blocks allocated,
transfer started) -> RUNNING at the first step after the KV landed (or WAITING and recomputed
if the transfer failed) -> tokens streamed back -> blocks freed.
The server is `services/worker` with role "decode"; this package only names the entry point.
"""


def run(args) -> int:
    from splitserve.services.worker.main import run_worker

    return run_worker(args, "decode")
