"""An engine worker process serving the `Worker` gRPC API; `splitserve worker` runs it colocated."""


def run(args) -> int:
    from splitserve.services.worker.main import run_worker

    return run_worker(args, "colocated")
