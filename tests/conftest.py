"""Shared pytest fixtures: tiny random checkpoints and the demo checkpoint.

Fixtures (all session-scoped, built once per test run):
- `checkpoint_factory(arch, **overrides) -> dir`: cached `checkpoints.build_checkpoint`.
- `tiny_checkpoint`: parametrized over LLAMA_FAMILY; a test using it runs once per arch and
  gets `(arch, dir)`. `family_checkpoint`: the same over NEW_FAMILIES.
- `demo_checkpoint_dir`: the session's one demo checkpoint (demo_cache.py), which every stack's
  cache links to instead of building its own.

torch and transformers are imported inside the fixtures only, so test modules that need
neither (the gateway's) do not pay for them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # make `checkpoints` importable from any test dir

from checkpoints import LLAMA_FAMILY, NEW_FAMILIES  # noqa: E402
from demo_cache import SHARED_CACHE_ENV, shared_demo_dir  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _shared_demo_cache(tmp_path_factory):
    """Name the session's demo cache (built on first use) for this process and its subprocesses."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SHARED_CACHE_ENV, str(tmp_path_factory.mktemp("shared-demo-cache")))
        yield


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory) -> Callable[..., str]:
    """`checkpoint_factory(arch, **overrides)`: build (once per distinct arguments) and return the dir."""
    from checkpoints import build_checkpoint

    built: dict[str, str] = {}

    def make(arch: str, **overrides) -> str:
        key = repr((arch, sorted(overrides.items())))
        if key not in built:
            built[key] = build_checkpoint(str(tmp_path_factory.mktemp(f"ckpt-{arch}")), arch, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session", params=LLAMA_FAMILY)
def tiny_checkpoint(request, checkpoint_factory) -> tuple[str, str]:
    """(arch, checkpoint dir) for each of the Llama-family architectures."""
    return request.param, checkpoint_factory(request.param)


@pytest.fixture(scope="session", params=NEW_FAMILIES)
def family_checkpoint(request, checkpoint_factory) -> tuple[str, str]:
    """(arch, checkpoint dir) for each of the other families and the sliding-window variants."""
    return request.param, checkpoint_factory(request.param)


@pytest.fixture(scope="session")
def demo_checkpoint_dir() -> str:
    return shared_demo_dir()
