"""Gateway configuration: topology, limits and timeouts, in frozen dataclasses.

`RequestLimits` bounds what one HTTP request may ask for; each is a flag of `splitserve gateway`
and `splitserve up` (`--max-request-body-bytes` ...), and a request past one is answered 400 (413
for the body size) with a message naming the limit.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

API_KEY_ENV = "SPLITSERVE_API_KEY"


class GatewayConfigError(ValueError):
    """A gateway setting is invalid; the message names it."""


@dataclass(frozen=True)
class RequestLimits:
    max_request_body_bytes: int = 8 * 2**20
    """Largest request body; a larger one is refused (413) before it is read, let alone parsed."""
    max_prompts_per_request: int = 32
    """Prompts in one /v1/completions request (its prompt list); each becomes its own request on the
    workers, so one HTTP request cannot flood them."""
    max_n: int = 16
    """Largest `n` (completions per prompt) accepted."""
    max_stop_sequences: int = 16
    """Stop strings in one request."""
    max_stop_sequence_chars: int = 512
    """Characters of one stop string (the text held back while a stop may still match grows with it)."""
    max_stop_token_ids: int = 256
    """Token ids in `stop_token_ids`."""
    max_logit_bias_tokens: int = 300
    """Token ids in `logit_bias` (OpenAI's own limit)."""
    max_structured_outputs_bytes: int = 64 * 2**10
    """Size of the spec the workers compile: a JSON schema's canonical text (a forced tool call's:
    every tool's parameters together), a regex, a grammar, the choices, a structural tag. xgrammar's
    compile time grows faster than the size (88 KB of a wide schema: 0.4 s on a 4k vocabulary,
    350 KB: 5.7 s)."""
    max_structured_outputs_depth: int = 64
    """Nesting of a JSON schema or structural tag (objects and arrays inside each other, a forced
    tool call's wrapper included). xgrammar's compile time grows with its cube (arrays of arrays
    64 deep: 0.02 s, 400: 3.3 s, 900: 36 s on one core), and a compile cannot be stopped;
    llguidance refuses past about 128. OpenAI's structured outputs stop at 10 levels of schema
    nesting (about 20 of JSON)."""

    def validate(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise GatewayConfigError(f"{f.name} must be at least 1, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class AgentApiConfig:
    """Tool calling, reasoning output and the Responses API (vLLM's flag names)."""

    enable_auto_tool_choice: bool = False
    """Let the model decide to call tools (`tool_choice: "auto"`); needs --tool-call-parser."""
    tool_call_parser: str | None = None
    """How calls are read from the model's text: hermes (Qwen2.5/Qwen3/Hermes), llama3_json, mistral."""
    reasoning_parser: str | None = None
    """Move <think>...</think> into reasoning_content: qwen3, deepseek_r1."""
    response_store_size: int = 1024
    """Responses (/v1/responses) kept for previous_response_id; the oldest are dropped first."""
    response_store_ttl_s: float = 3600.0
    """A stored response older than this is forgotten."""
    response_store_dir: str | None = None
    """Directory of the stored responses' SQLite database, shared by the gateway processes that
    name it (one host). None: in this process's memory; `--processes N` then makes one for the run."""
    response_store_timeout_s: float = 2.0
    """Longest wait for one store access; a slower one counts as not found (logged)."""

    def validate(self) -> None:
        from splitserve.services.gateway.reasoning_parsers import REASONING_PARSERS
        from splitserve.services.gateway.tool_parsers import TOOL_PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_PARSERS:
            raise GatewayConfigError(f"unknown tool_call_parser {self.tool_call_parser!r}; "
                                     f"choose from {sorted(TOOL_PARSERS)}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise GatewayConfigError(f"unknown reasoning_parser {self.reasoning_parser!r}; "
                                     f"choose from {sorted(REASONING_PARSERS)}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise GatewayConfigError("enable_auto_tool_choice needs a tool_call_parser")
        if self.response_store_size < 0 or self.response_store_ttl_s <= 0 or self.response_store_timeout_s <= 0:
            raise GatewayConfigError("response_store_size must be >= 0, response_store_ttl_s and "
                                     "response_store_timeout_s positive")


@dataclass(frozen=True)
class GatewayConfig:
    model_dir: str
    """Checkpoint directory whose tokenizer (and chat template) the gateway uses."""
    served_model_name: str
    """The `model` name clients send, /v1/models lists first and every response names."""
    served_model_aliases: tuple[str, ...] = ()
    """Further names accepted for the model (vLLM's further --served-model-name values)."""
    prefill_urls: tuple[str, ...] = ()
    """Prefill workers (`host:port`, or `dns:///NAME:PORT` for every address NAME resolves to, kept
    up to date: see discovery.py); used together with `decode_urls`."""
    decode_urls: tuple[str, ...] = ()
    worker_urls: tuple[str, ...] = ()
    """Colocated workers (both phases in one process)."""
    max_model_len: int | None = None
    """Override the context length; None: the smallest the workers report (else the checkpoint's)."""
    max_inflight_requests: int = 256
    """HTTP requests generating at once; more wait in the admission queue."""
    max_queued_requests: int = 1024
    """Requests waiting for a slot; past this, 429 with Retry-After."""
    queue_timeout_s: float = 30.0
    """A queued request that gets no slot in this time is answered 429."""
    retry_after_s: int = 1
    limits: RequestLimits = field(default_factory=RequestLimits)
    """What one request may ask for (its own flags)."""
    load_poll_interval_s: float = 0.5
    """How often the router polls every worker's GetLoad."""
    load_rpc_timeout_s: float = 1.0
    stalled_after_polls: int = 3
    """A worker that misses this many load polls in a row is stalled: its open calls are ended
    (their requests fail over if nothing was streamed yet, else end with an error)."""
    discovery_interval_s: float = 5.0
    """How often `dns:` worker addresses are resolved again (pods come and go)."""
    discovery_timeout_s: float = 2.0
    """A DNS lookup that takes longer fails; the workers it found before are kept."""
    prefill_timeout_s: float = 600.0
    """Deadline of one Prefill call (queueing included)."""
    generate_timeout_s: float = 3600.0
    """Deadline of one Generate stream."""
    abort_timeout_s: float = 2.0
    affinity_blocks: int = 4
    """Full KV blocks at the start of a prompt that decide its prefix-affinity instance."""
    overload_margin_tokens: int = 8192
    """An instance this many queued tokens above the least loaded one loses its affinity requests."""
    default_block_size: int = 16
    """Block size for prefix hashing until a worker reports its own."""
    decode_prefill_max_new_tokens: int = 1024
    """Disaggregated: a keyed session's next turn runs whole on the decode instance holding its
    history when at most this many of its prompt tokens are new (0: never)."""
    session_window: int = 2
    """Session messages a worker may have in flight to this gateway (its credit); while none is
    granted the worker merges each request's new tokens. 0 turns the credit off (gRPC's own flow
    control only), which a one-run A/B on an H100 found 14% slower at full load."""
    agent_api: AgentApiConfig = field(default_factory=AgentApiConfig)
    """Tools, reasoning, Responses API (its own flags: see AgentApiConfig)."""
    chat_prompt_cache_mib: int = 256
    """Memory for keyed chat sessions' last prompts (text + token ids), so a next turn tokenizes only
    its new tail (chat_prompt_cache.py); 0 turns it off."""

    def validate(self) -> None:
        self.agent_api.validate()
        if bool(self.prefill_urls) != bool(self.decode_urls):
            raise GatewayConfigError("prefill_urls and decode_urls must be given together (a disaggregated pair)")
        if not (self.prefill_urls or self.worker_urls):
            raise GatewayConfigError("no workers: give prefill_urls + decode_urls, or worker_urls")
        self.limits.validate()
        self.dns_targets()  # raises on a malformed dns: address
        for name in ("max_inflight_requests", "affinity_blocks", "default_block_size",
                     "stalled_after_polls"):
            if getattr(self, name) < 1:
                raise GatewayConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_queued_requests", "session_window", "decode_prefill_max_new_tokens", "chat_prompt_cache_mib"):
            if getattr(self, name) < 0:
                raise GatewayConfigError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise GatewayConfigError(f"max_model_len must be at least 2, got {self.max_model_len}")
        for name in ("queue_timeout_s", "load_poll_interval_s", "load_rpc_timeout_s", "prefill_timeout_s",
                     "generate_timeout_s", "abort_timeout_s", "discovery_interval_s", "discovery_timeout_s"):
            if getattr(self, name) <= 0:
                raise GatewayConfigError(f"{name} must be positive, got {getattr(self, name)}")

    def dns_targets(self) -> list:
        """The `dns:` worker addresses, parsed (DnsTarget)."""
        from splitserve.services.gateway.discovery import DnsTarget, is_dns_url

        try:
            return [DnsTarget.parse(url, role) for role, urls in
                    (("prefill", self.prefill_urls), ("decode", self.decode_urls), ("colocated", self.worker_urls))
                    for url in urls if is_dns_url(url)]
        except ValueError as exc:
            raise GatewayConfigError(str(exc)) from None


def add_api_key_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", default=None,
                        help=f"require `Authorization: Bearer KEY` on every /v1 route (default: ${API_KEY_ENV}, "
                             "if set; else no key)")


def api_key_from_args(args: argparse.Namespace) -> str | None:
    """--api-key, else $SPLITSERVE_API_KEY (as vLLM reads VLLM_API_KEY); an empty key is no key."""
    return args.api_key or os.environ.get(API_KEY_ENV) or None
