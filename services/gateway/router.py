"""Which workers serve a request: load-aware, with prefix affinity for the prompt phase.

Every worker's `GetLoad` is polled every ~0.5 s (`poll_loads`). Between polls the router also
counts what it has itself sent and not yet seen finish, so a burst does not all land on the
instance that looked idle half a second ago.

Prefill (and colocated) instances: requests whose first `affinity_blocks` KV blocks are equal get
the same instance by rendezvous hashing (highest hash of (prefix key, instance url) wins), so its
prefix cache is hit, unless that instance is overloaded: queued tokens more than
`overload_margin_tokens` above the least-loaded instance, or too few free KV blocks for the prompt.
Prompts shorter than one block go to the least-loaded instance.

Decode instances: the least loaded (running requests, then free blocks).

Keyed sessions (`prompt_cache_key`, see sessions.py): a turn goes back to the instance holding the
session's latest turn unless it is overloaded (same test as above). Disaggregated, that instance
is the decode worker, which computed the previous output's KV: when it holds all but at most
`decode_prefill_max_new_tokens` of the new prompt, the whole turn runs there (its prefill computes
only the new tokens; nothing crosses the transfer plane); otherwise the turn is split as usual and
its decode goes to that instance. Every route carries the reason it was chosen (trace attribute,
metric label).

An instance whose RPC fails is marked unhealthy and skipped; the poller keeps probing it and
marks it healthy again when GetLoad answers. An instance that misses `stalled_after_polls` polls
in a row (each bounded by its timeout) is taken to be stalled (frozen, SIGSTOPped, or cut off): the
calls still open on it are abandoned with UNAVAILABLE, so their requests fail over (nothing
streamed yet) or end with an error, instead of waiting for as long as it is frozen.
An instance that reports itself draining (SIGTERM) gets no new requests.

Instances are the configured `host:port` addresses plus those DNS discovery adds (discovery.py);
an instance discovery no longer finds is retired: it takes no new requests, and is removed once
the requests it has are done.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from splitserve.services.gateway.sessions import SessionDirectory
from splitserve.shared.kv.block_hash import hash_prompt_blocks
from splitserve.shared.protocol.convert import WorkerLoad

logger = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "colocated")


class NoHealthyWorker(Exception):
    """No healthy instance of a needed role. The message (for the log) names the instances."""

    def __init__(self, role: str, message: str) -> None:
        super().__init__(message)
        self.role = role


@dataclass
class Instance:
    url: str
    role: str
    name: str = ""
    """`role-index` in the order the urls were given: what /health and /metrics show (not the
    address, which is internal)."""
    load: WorkerLoad | None = None
    healthy: bool = False
    last_error: str | None = None
    inflight_requests: int = 0
    """Requests this gateway has on the instance right now."""
    inflight_tokens: int = 0
    """Prompt tokens of those requests (prefill cost)."""
    failed_polls: int = 0
    """Load polls in a row that failed or timed out."""
    source: str = ""
    """The `dns:` address that discovered it ("" for a configured address)."""
    retired: bool = False
    """Discovery no longer finds it: no new requests; removed when `inflight_requests` is 0."""

    def routable(self) -> bool:
        return self.healthy and not self.retired and not (self.load is not None and self.load.draining)

    def queued_tokens(self) -> int:
        """Best estimate of the tokens waiting here: the report, or our own count if that is larger."""
        reported = self.load.num_waiting_tokens if self.load else 0
        return max(reported, self.inflight_tokens)

    def running_requests(self) -> int:
        reported = self.load.num_running + self.load.num_waiting if self.load else 0
        return max(reported, self.inflight_requests)

    def lacks_blocks(self, num_blocks: int) -> bool:
        return self.load is not None and self.load.num_total_blocks > 0 and self.load.num_free_blocks < num_blocks


@dataclass
class Route:
    """A colocated `worker`, or a `prefill` + `decode` pair."""

    prefill: Instance | None = None
    decode: Instance | None = None
    worker: Instance | None = None
    reason: str = "load"
    """Why: 'load', 'prefix-affinity', 'session', 'session-on-decode' (a disaggregated session's
    turn run whole on the decode instance holding it), 'session-overloaded', 'session-moved'."""


def rendezvous_score(key: bytes, url: str) -> int:
    return int.from_bytes(hashlib.blake2b(key + url.encode(), digest_size=8).digest(), "little")


class Router:
    def __init__(self, prefill_urls: Sequence[str] = (), decode_urls: Sequence[str] = (),
                 worker_urls: Sequence[str] = (), *, affinity_blocks: int = 4,
                 overload_margin_tokens: int = 8192, default_block_size: int = 16,
                 decode_prefill_max_new_tokens: int = 1024) -> None:
        """Addresses starting `dns:` are left to discovery (they only say the role is configured)."""
        by_role = {"prefill": prefill_urls, "decode": decode_urls, "colocated": worker_urls}
        self.configured_roles = {role for role, urls in by_role.items() if urls}
        self.instances: list[Instance] = []
        self._names = {role: itertools.count() for role in ROLES}
        for role, urls in by_role.items():
            for url in urls:
                if not url.startswith("dns:") and self.add(url, role) is None:
                    raise ValueError(f"worker url {url} is listed twice")
        self.affinity_blocks = affinity_blocks
        self.overload_margin_tokens = overload_margin_tokens
        self.default_block_size = default_block_size
        self.decode_prefill_max_new_tokens = decode_prefill_max_new_tokens
        self.sessions = SessionDirectory()
        self._tie_breaker = itertools.count()

    # ---- membership --------------------------------------------------------------------

    def add(self, url: str, role: str, source: str = "") -> Instance | None:
        """A new instance named `role-N`; None if `url` is known already (a retired one is
        taken back into service)."""
        known = next((i for i in self.instances if i.url == url), None)
        if known is not None:
            if known.retired and known.source == source:
                known.retired = False
                logger.info("worker %s (%s) is back in %s", url, role, source)
            return None
        instance = Instance(url, role, f"{role}-{next(self._names[role])}", source=source)
        self.instances.append(instance)
        if source:
            logger.info("discovered worker %s (%s) through %s", url, role, source)
        return instance

    def from_source(self, source: str) -> list[Instance]:
        return [i for i in self.instances if i.source == source and not i.retired]

    def retire(self, url: str) -> None:
        for instance in self.instances:
            if instance.url == url and not instance.retired:
                instance.retired = True
                logger.info("worker %s (%s) left %s; retiring it", url, instance.role, instance.source)

    def idle_retired(self) -> list[Instance]:
        return [i for i in self.instances if i.retired and i.inflight_requests == 0]

    def remove(self, instance: Instance) -> None:
        self.instances.remove(instance)

    # ---- state -------------------------------------------------------------------------

    def healthy(self, role: str) -> list[Instance]:
        """The instances of `role` that new requests may go to."""
        return [i for i in self.instances if i.role == role and i.routable()]

    def is_ready(self) -> bool:
        """At least one colocated worker, or one prefill + decode pair, is healthy."""
        return bool(self.healthy("colocated")) or bool(self.healthy("prefill") and self.healthy("decode"))

    def update_load(self, instance: Instance, load: WorkerLoad) -> None:
        if load.role != instance.role:
            self.mark_failed(instance, f"configured as {instance.role} but reports role {load.role}")
            return
        if not instance.healthy:
            logger.info("worker %s (%s) is healthy", instance.url, instance.role)
        instance.load, instance.healthy, instance.last_error = load, True, None

    def mark_failed(self, instance: Instance, reason: str) -> None:
        if instance.healthy:
            logger.warning("worker %s (%s) marked unhealthy: %s", instance.url, instance.role, reason)
        instance.healthy, instance.last_error = False, reason

    def max_model_len(self) -> int | None:
        lens = [i.load.max_model_len for i in self.instances if i.healthy and i.load and i.load.max_model_len > 0]
        return min(lens) if lens else None

    def block_size(self) -> int:
        sizes = [i.load.block_size for i in self.instances if i.load and i.load.block_size > 0]
        return sizes[0] if sizes else self.default_block_size

    @contextlib.contextmanager
    def track(self, instance: Instance, num_tokens: int) -> Iterator[None]:
        """Count a request as on `instance` for the body of the `with`."""
        instance.inflight_requests += 1
        instance.inflight_tokens += num_tokens
        try:
            yield
        finally:
            instance.inflight_requests -= 1
            instance.inflight_tokens -= num_tokens

    # ---- choice ------------------------------------------------------------------------

    def route(self, prompt_token_ids: Sequence[int], session_key: str | None = None) -> Route:
        """Colocated workers when configured, else a prefill + decode pair; raises NoHealthyWorker."""
        colocated = "colocated" in self.configured_roles and self.healthy("colocated")
        if colocated or "prefill" not in self.configured_roles:
            held, _ = self._session_instance("colocated", session_key, prompt_token_ids)
            if isinstance(held, Instance):
                return Route(worker=held, reason="session")
            worker = self.pick_prompt_instance("colocated", prompt_token_ids)  # raises NoHealthyWorker
            return Route(worker=worker, reason=held or self._prompt_reason(prompt_token_ids))
        held, num_held = self._session_instance("decode", session_key, prompt_token_ids)
        if isinstance(held, Instance):
            if 0 < len(prompt_token_ids) - num_held <= self.decode_prefill_max_new_tokens:
                return Route(worker=held, reason="session-on-decode")
            return Route(prefill=self.pick_prompt_instance("prefill", prompt_token_ids), decode=held, reason="session")
        return Route(prefill=self.pick_prompt_instance("prefill", prompt_token_ids),
                     decode=self.pick_decode_instance(prompt_token_ids),
                     reason=held or self._prompt_reason(prompt_token_ids))

    def remember_session(self, key: str, instance: Instance, turn_token_ids: Sequence[int]) -> None:
        self.sessions.remember(key, instance.url, turn_token_ids, self.block_size())

    def _session_instance(self, role: str, key: str | None,
                          prompt_token_ids: Sequence[int]) -> tuple[Instance | str | None, int]:
        """The healthy, not overloaded `role` instance holding the session's blocks, or why not
        (None: no session, or this prompt does not extend its latest turn); and how many of the
        prompt's tokens it holds."""
        if key is None:
            return None, 0
        url, num_held = self.sessions.held_tokens(key, prompt_token_ids, self.block_size())
        if url is None or not num_held:
            return None, 0
        candidates = [i for i in self.healthy(role)]
        held = next((i for i in candidates if i.url == url), None)
        if held is None:
            return "session-moved", num_held
        least = min(i.queued_tokens() for i in candidates)
        num_blocks = -(-(len(prompt_token_ids) - num_held) // self.block_size())
        if held.queued_tokens() > least + self.overload_margin_tokens or held.lacks_blocks(num_blocks):
            return "session-overloaded", num_held
        return held, num_held

    def _prompt_reason(self, prompt_token_ids: Sequence[int]) -> str:
        return "prefix-affinity" if self.affinity_key(prompt_token_ids) is not None else "load"

    def affinity_key(self, prompt_token_ids: Sequence[int]) -> bytes | None:
        block_size = self.block_size()
        hashes = hash_prompt_blocks(prompt_token_ids[: self.affinity_blocks * block_size], block_size)
        return hashes[-1] if hashes else None

    def pick_prompt_instance(self, role: str, prompt_token_ids: Sequence[int]) -> Instance:
        candidates = self._candidates(role)
        num_blocks = -(-len(prompt_token_ids) // self.block_size())
        least = min(i.queued_tokens() for i in candidates)
        eligible = [i for i in candidates
                    if i.queued_tokens() <= least + self.overload_margin_tokens and not i.lacks_blocks(num_blocks)]
        if not eligible:  # everything is short of blocks: the least queued will preempt or queue
            return min(candidates, key=lambda i: (i.queued_tokens(), i.running_requests()))
        key = self.affinity_key(prompt_token_ids)
        if key is None:
            return self._least_loaded(eligible, lambda i: (i.queued_tokens(), i.running_requests()))
        return max(eligible, key=lambda i: rendezvous_score(key, i.url))

    def pick_decode_instance(self, prompt_token_ids: Sequence[int]) -> Instance:
        candidates = self._candidates("decode")
        num_blocks = -(-(len(prompt_token_ids) + 1) // self.block_size())
        return self._least_loaded(candidates, lambda i: (
            i.lacks_blocks(num_blocks), i.running_requests(), -(i.load.num_free_blocks if i.load else 0)))

    def _candidates(self, role: str) -> list[Instance]:
        candidates = self.healthy(role)
        if not candidates:
            known = [f"{i.url}: {i.last_error or 'no load report yet'}" for i in self.instances if i.role == role]
            raise NoHealthyWorker(role, f"no healthy {role} worker ({'; '.join(known) or 'none configured'})")
        return candidates

    def _least_loaded(self, candidates: list[Instance], cost) -> Instance:
        # Rotate the start so equal-cost instances share the work instead of the first taking all.
        shift = next(self._tie_breaker) % len(candidates)
        rotated = candidates[shift:] + candidates[:shift]
        return min(rotated, key=cost)


async def poll_loads(router: Router, clients: dict, interval_s: float, timeout_s: float,
                     stalled_after_polls: int = 3) -> None:
    """Forever: GetLoad on every instance at once, then sleep `interval_s`. Cancel to stop."""
    while True:
        await poll_once(router, clients, timeout_s, stalled_after_polls)
        await asyncio.sleep(interval_s)


async def poll_once(router: Router, clients: dict, timeout_s: float, stalled_after_polls: int = 3) -> None:
    async def probe(instance: Instance) -> None:
        client = clients.get(instance.url)
        if client is None:  # discovery removed it since this poll began
            return
        try:
            router.update_load(instance, await client.get_load(timeout_s))
            instance.failed_polls = 0
        except Exception as exc:  # any failure of the probe means: do not route here for now
            router.mark_failed(instance, str(exc))
            instance.failed_polls += 1
            if instance.failed_polls == stalled_after_polls:
                # A worker that never answered is most likely still starting (under compose or
                # Kubernetes the gateway may come up first): not worth a warning; its calls go too.
                level = logging.WARNING if instance.load is not None else logging.INFO
                logger.log(level, "worker %s missed %d load polls in a row; abandoning its open calls",
                           instance.url, stalled_after_polls)
                client.abandon_calls(f"worker missed {stalled_after_polls} load polls in a row")

    await asyncio.gather(*(probe(i) for i in router.instances))
