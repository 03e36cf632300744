"""Fault hook for end-to-end tests: hold one host-tier restore in flight until the test acts.

Put this folder on PYTHONPATH and name a folder in SPLITSERVE_TEST_HOLD_RESTORE_DIR: every
process of the stack imports this file at start-up (Python's `sitecustomize`), and when a process
imports the host tier's copier, its `BlockCopier._copy` is wrapped. A restore (host -> device)
starts normally; if the test has created `<dir>/armed`, the first copier to rename it to
`<dir>/held-<pid>` (atomic: exactly one wins) stops before copying until `<dir>/released` exists
(or `HOLD_LIMIT_S` passed). So the test knows, without sleeping, that a restore is in flight in
process <pid> (an engine process), and can kill its worker there. Without the file, or without the
environment variable, nothing changes. The copy itself stays the real one.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time

HOLD_DIR_ENV = "SPLITSERVE_TEST_HOLD_RESTORE_DIR"
HOLD_LIMIT_S = 600.0
COPIER_MODULE = "splitserve.shared.offload.copier"


def hold_if_armed(hold_dir: str) -> None:
    try:
        os.rename(os.path.join(hold_dir, "armed"), os.path.join(hold_dir, f"held-{os.getpid()}"))
    except FileNotFoundError:  # not armed, or another copier took it
        return
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not os.path.exists(os.path.join(hold_dir, "released")) and time.monotonic() < deadline:
        time.sleep(0.05)


def patch_copier(module, hold_dir: str) -> None:
    copy = module.BlockCopier._copy

    def held_copy(self, job):
        if job.kind == "restore":
            hold_if_armed(hold_dir)
        copy(self, job)

    module.BlockCopier._copy = held_copy


class PatchCopierOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, hold_dir: str) -> None:
        self.hold_dir = hold_dir

    def find_spec(self, name, path, target=None):
        if name != COPIER_MODULE:
            return None
        sys.meta_path.remove(self)  # once, and so that the real finders answer the lookup below
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            patch_copier(module, self.hold_dir)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(HOLD_DIR_ENV):
    sys.meta_path.insert(0, PatchCopierOnImport(os.environ[HOLD_DIR_ENV]))
