"""The engine process's entry point, importable without torch.

A spawned process's target is pickled by name, so the serving process must import the module that
defines it. `engine_process` imports torch and the whole engine (4 s of a loaded core, and the
interpreter's teardown of torch at exit cost another second): the gRPC process itself needs none
of it, so the target it names lives here and imports the engine only in the child.
"""

from __future__ import annotations


def run_engine_process(*args) -> None:
    """`engine_process.run_engine_process(*args)`, in the spawned process."""
    from splitserve.shared.engine_process import run_engine_process as run

    run(*args)
