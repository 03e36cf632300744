"""`ExternalKV`: the engine's side of its `KVConnector` (shared/kv/connector.py), with the state it
keeps for KV that lives outside the device pool.

    poll()              top of each step: unpin saved blocks, free released holds and ended aborted
                        loads, move landed (or failed) loads on in the scheduler
    start_loads()       after scheduling: fill the allocated blocks from their source
    save_new_blocks()   after a step's booking: newly computed full blocks go to the host tier
    hold(req)           a finished prefill: its prompt blocks wait for the decode side
    retain_session(req) a keyed request's blocks outlive it, on both tiers
    abort_load(req)     an aborted request whose load may still write: its blocks wait for the end

Single-threaded: called by the engine's step thread only. `build_host_tier` makes the host tier
(one of the connector's parts) from the config.
"""

from __future__ import annotations

import logging
import time

from splitserve.shared.config import ConfigError, EngineConfig
from splitserve.shared.engine_parts import EngineParts
from splitserve.shared.kv import KVCacheManager
from splitserve.shared.kv.connector import CompositeConnector
from splitserve.shared.request import Request
from splitserve.shared.scheduler import Scheduler

logger = logging.getLogger(__name__)


class ExternalKV:
    def __init__(self, connector: CompositeConnector | None, kv: KVCacheManager, scheduler: Scheduler,
                 block_size: int) -> None:
        self.connector = connector
        self.kv = kv
        self.scheduler = scheduler
        self.block_size = block_size
        self.held: dict[str, Request] = {}
        """Prefill side: finished requests whose blocks wait for the decode side to copy them."""
        self.aborting: dict[str, Request] = {}
        """Decode side: aborted requests whose blocks wait for their cancelled transfer to end."""
        self.kv_bytes: dict[str, int] = {}
        """Bytes of remote KV each loaded request received (its final output reports them)."""
        self.kv_windows: dict[str, tuple[int, int, bool]] = {}
        """(start, end, ok) wall-clock ns of each remote KV load, for the transfer span."""

    def poll(self) -> None:
        if self.connector is None:
            return
        events = self.connector.poll()
        if events.saved_block_ids:
            self.kv.unpin(events.saved_block_ids)
        for request_id in events.released:
            if self.held.pop(request_id, None) is not None:
                self.kv.free(request_id)
        ended = [*events.loaded, *(request_id for request_id, _ in events.load_failed)]
        for request_id in ended:
            if self.aborting.pop(request_id, None) is not None:
                self.kv.free(request_id)
                self.kv_windows.pop(request_id, None)
        for request_id in events.loaded:
            req = self.scheduler.finish_kv_load(request_id, ok=True)
            if req is not None:
                self._register_loaded(req)
                if request_id in self.kv_windows:  # remote KV (a host-tier restore moved no KV between engines)
                    self.kv_bytes[request_id] = events.loaded_bytes.get(request_id, 0)
                self._end_window(request_id, ok=True)
        for request_id, reason in events.load_failed:
            if self.scheduler.finish_kv_load(request_id, ok=False) is not None:
                self._end_window(request_id, ok=False)
                logger.warning("KV load for %s failed (%s); recomputing it here", request_id, reason)

    def _register_loaded(self, req: Request) -> None:
        """The loaded blocks join the prefix cache: under the hashes the prefill sent with its
        handle when they check out, else (an older peer, or a refusal) hashed here."""
        hashes = getattr(getattr(req.kv_transfer, "handle", None), "block_hashes", ())
        if hashes and not self.kv.adopt_block_hashes(req.request_id, req.all_token_ids, req.num_computed_tokens, hashes):
            logger.warning("the handle's block hashes for %s do not match its prompt; hashing it here", req.request_id)
        self.kv.cache_computed_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)

    def _end_window(self, request_id: str, ok: bool) -> None:
        if request_id in self.kv_windows:
            self.kv_windows[request_id] = (self.kv_windows[request_id][0], time.time_ns(), ok)

    def start_loads(self, kv_loads: list) -> None:
        """The scheduler's (request, source, dst block ids): a load from another engine (the
        request's own handle) opens its transfer window."""
        for req, source, block_ids in kv_loads:
            if source is getattr(req.kv_transfer, "handle", None):
                self.kv_windows[req.request_id] = (time.time_ns(), 0, False)
            self.connector.start_load(req.request_id, source, block_ids)

    def save_new_blocks(self) -> None:
        """Hand newly computed full blocks to the connector (the host tier copies them out); the
        ones it reads stay pinned until poll() says their copy ended."""
        if not self.kv.track_newly_cached:
            return
        pairs = self.kv.take_newly_cached()
        if pairs:
            self.kv.pin(self.connector.save_blocks([b for b, _ in pairs], [h for _, h in pairs]))

    def hold(self, req: Request):
        """Keep the prompt's KV blocks past the request until the decode side has copied them."""
        block_ids = self.kv.prompt_block_ids(req.request_id, req.num_prompt_tokens)  # one list per group if split
        self.held[req.request_id] = req
        self.retain_session(req)
        hashes = self.kv.block_hashes(req.request_id)[: req.num_prompt_tokens // self.block_size]
        return self.connector.hold(req.request_id, block_ids, req.num_prompt_tokens, hashes)

    def retain_session(self, req: Request) -> None:
        """A keyed request's blocks (prompt + output) outlive it at a higher priority, on both tiers."""
        if req.session is None:
            return
        hashes = self.kv.block_hashes(req.request_id)
        until_s = time.monotonic() + req.session.retention_s
        self.kv.retain_session(req.session.key, hashes, until_s)
        if self.connector is not None:
            self.connector.retain(req.session.key, hashes, until_s)

    def abort_load(self, req: Request) -> None:
        """A transfer may still be writing into the request's blocks: free them only once the
        connector reports the load ended (load_failed "aborted", or loaded)."""
        self.connector.abort(req.request_id)
        self.aborting[req.request_id] = req

    def forget(self, request_id: str) -> None:
        """A request that ends without a final output drops its transfer figures."""
        self.kv_bytes.pop(request_id, None)
        self.kv_windows.pop(request_id, None)

    def close(self) -> None:
        if self.connector is not None:
            self.connector.close()


def build_host_tier(config: EngineConfig, parts: EngineParts, window: int | None):
    """The host-memory KV tier of `--kv-offload-gib`, or None when it is off."""
    gib = config.cache.kv_offload_gib
    if not gib:
        return None
    if window:
        raise ConfigError("kv_offload_gib is not supported yet for models whose every layer slides a window")
    from splitserve.shared.offload.host_tier import HostTier

    block_bytes = parts.kv_cache[0].numel() * parts.kv_cache.element_size()
    num_host_blocks = int(gib * 2**30) // block_bytes
    if num_host_blocks < 1:
        raise ConfigError(f"kv_offload_gib {gib} holds no block of {block_bytes} bytes")
    logger.info("host KV tier: %d blocks (%.2f GiB)%s", num_host_blocks, num_host_blocks * block_bytes / 2**30,
                ", pinned" if parts.device.type == "cuda" else "")
    return HostTier(parts.kv_cache, num_host_blocks)
