"""One demo checkpoint per test session, linked into every stack's cache instead of built there.

`splitserve up` and each worker it starts build the demo checkpoint into `$SPLITSERVE_CACHE` on
first use (seconds of CPU per process, three processes at once for a disaggregated stack). The
tests give every stack a fresh cache, so without this every stack paid for its own builds.

    conftest: os.environ[SHARED_CACHE_ENV] = <a session tmp dir>   (nothing is built yet)
    seed_demo(cache_dir)     # builds the session's demo once, links <cache_dir>/demo-v2 to it
    shared_demo_dir()        # the session's demo checkpoint directory

The environment variable reaches the load-test scripts the tests run as subprocesses, so their
stacks (tests/services/stack.py) are seeded too; unset (outside pytest), `seed_demo` does nothing.
Tests of the first-use build itself (tests/shared/test_model_loader.py, the `generate` CLI test)
use caches of their own on purpose.
"""

from __future__ import annotations

import os

SHARED_CACHE_ENV = "SPLITSERVE_TEST_SHARED_CACHE"


def shared_demo_dir() -> str:
    """The session's demo checkpoint (built on the first call of any process of the session)."""
    from splitserve.shared.demo import ensure_demo_checkpoint

    return ensure_demo_checkpoint(os.environ[SHARED_CACHE_ENV])  # atomic: concurrent first calls agree on one directory


def seed_demo(cache_dir: str) -> None:
    """Link the session's demo checkpoint into `cache_dir`, where `ensure_demo_checkpoint` finds it.
    A no-op outside a test session (no SHARED_CACHE_ENV): the stack then builds its own."""
    if not os.environ.get(SHARED_CACHE_ENV):
        return
    demo = shared_demo_dir()
    link = os.path.join(cache_dir, os.path.basename(demo))
    os.makedirs(cache_dir, exist_ok=True)
    if not os.path.lexists(link):
        os.symlink(demo, link)
