"""Keep Python's cyclic garbage collector away from the objects that live as long as the engine.

A full (generation-2) collection walks every tracked object in the process: the model's modules and
parameters, Triton's and torch's caches, the CUDA graphs' bookkeeping. None of them ever becomes
garbage, yet on an H200 one such walk stalled a 1.1 s offline run for 263 ms (loadtests/stall_probe.py,
docs/benchmarks.md), and the young collections cost about a millisecond per decode step more.
`gc.freeze()` after start-up moves everything alive then into the permanent generation, which no
collection visits; vLLM's engine does the same once it has started.

The serving processes freeze theirs too, once they listen: the gateway (its app, tokenizer and
libraries: 111k tracked objects, a full collection 43-55 ms on the 2-core CPU machine, which stalls
every stream of its event loop) and a worker's gRPC process. In a burst of 256 requests a gateway
process ran one 91 ms full collection without the freeze and none with it (docs/benchmarks.md,
section 24).
"""

from __future__ import annotations

import atexit
import gc

_unfreeze_registered = False


def freeze_startup_heap() -> None:
    """Collect what start-up left behind, then exempt every surviving object from later collections.

    Objects frozen here are still freed by reference counting; only reference cycles among them wait
    for `release_startup_heap()` (called at exit, so extension types see their objects finalised)."""
    global _unfreeze_registered
    gc.collect()
    gc.freeze()
    if not _unfreeze_registered:
        atexit.register(release_startup_heap)
        _unfreeze_registered = True


def release_startup_heap() -> None:
    """Make frozen objects collectable again: before dropping an engine whose cycles must be freed
    (a benchmark that builds several engines in turn), and at exit."""
    gc.unfreeze()
