"""The one place that converts protobuf messages <-> splitserve's plain dataclasses.

Workers convert at their gRPC edge (`SamplingParams`, `KvHandle`, the first token, engine
outputs -> chunks, load stats -> `LoadReport`); the gateway converts chunks and load reports into
the torch-free `TokenChunk` and `WorkerLoad`. Engine-side types (`SampledToken`) are imported
inside the functions that build them, so the gateway never imports the engine's modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from splitserve.shared.protocol import worker_pb2 as pb
from splitserve.shared.sampling_params import SamplingParams, sampling_fields
from splitserve.shared.structured_outputs import KINDS, StructuredOutputsParams

ROLE_TO_PROTO = {
    "prefill": pb.WORKER_ROLE_PREFILL,
    "decode": pb.WORKER_ROLE_DECODE,
    "colocated": pb.WORKER_ROLE_COLOCATED,
}
ROLE_FROM_PROTO = {v: k for k, v in ROLE_TO_PROTO.items()}


# ---- sampling params ----------------------------------------------------------------------

def sampling_params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """Every `wire` field of the dataclass, by name; None leaves an optional field absent."""
    msg = pb.SamplingParams()
    for name, _ in sampling_fields(wire=True):
        value = getattr(params, name)
        if isinstance(value, StructuredOutputsParams):  # the one message-typed field
            getattr(msg, name).CopyFrom(structured_outputs_to_proto(value))
        elif isinstance(value, dict):
            getattr(msg, name).update(value)
        elif isinstance(value, (list, tuple)):
            getattr(msg, name).extend(value)
        elif value is not None:
            setattr(msg, name, value)
    return msg


def sampling_params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (naming the field) if the message holds invalid values."""
    values: dict[str, Any] = {}
    for name, _ in sampling_fields(wire=True):
        descriptor = msg.DESCRIPTOR.fields_by_name[name]
        if descriptor.message_type is pb.StructuredOutputs.DESCRIPTOR:
            values[name] = structured_outputs_from_proto(getattr(msg, name)) if msg.HasField(name) else None
        elif descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            values[name] = dict(getattr(msg, name))
        elif descriptor.is_repeated:
            values[name] = list(getattr(msg, name))
        elif descriptor.has_presence and not msg.HasField(name):
            values[name] = None
        else:
            values[name] = getattr(msg, name)
    return SamplingParams(n=1, **values)


def structured_outputs_to_proto(spec: StructuredOutputsParams) -> pb.StructuredOutputs:
    kind = spec.kind
    if kind == "json":
        return pb.StructuredOutputs(json=spec.json_text())
    if kind == "choice":
        return pb.StructuredOutputs(choice=pb.ChoiceList(choices=list(spec.choice)))
    return pb.StructuredOutputs(**{kind: getattr(spec, kind)})


def structured_outputs_from_proto(msg: pb.StructuredOutputs) -> StructuredOutputsParams:
    """Raises ValueError if no kind (or an empty one) is set."""
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}")
    value = list(msg.choice.choices) if kind == "choice" else getattr(msg, kind)
    return StructuredOutputsParams(**{kind: value})


# ---- KV handle ----------------------------------------------------------------------------

_KV_HANDLE_FIELDS = ("version", "instance_id", "request_id", "block_ids", "num_tokens", "layout_hash", "groups",
                     "control_address", "block_hashes")


def kv_handle_to_proto(handle: Any) -> pb.KvHandle:
    """`handle` is a `splitserve.shared.transfer.handle.KvHandle`."""
    return pb.KvHandle(
        version=handle.version, instance_id=handle.instance_id, request_id=handle.request_id,
        block_ids=list(handle.block_ids), num_tokens=handle.num_tokens, layout_hash=str(handle.layout_hash),
        control_address=handle.control_address,
        groups=[pb.KvGroupBlocks(block_ids=list(ids)) for ids in handle.groups],
        block_hashes=list(handle.block_hashes),
    )


def kv_handle_from_proto(msg: pb.KvHandle) -> Any:
    """A validated `KvHandle` (raises KvHandleError naming a bad field)."""
    from splitserve.shared.transfer.handle import KvHandle  # torch-free, but only workers need it

    return KvHandle.from_dict({
        "version": msg.version, "instance_id": msg.instance_id, "request_id": msg.request_id,
        "block_ids": list(msg.block_ids), "num_tokens": msg.num_tokens, "layout_hash": msg.layout_hash,
        "control_address": msg.control_address, "groups": [list(g.block_ids) for g in msg.groups],
        "block_hashes": list(msg.block_hashes)})


# ---- tokens -------------------------------------------------------------------------------

def _top_to_proto(top: list[tuple[int, float]]) -> list[pb.TopLogprob]:
    return [pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top]


def _top_from_proto(entries: Any) -> list[tuple[int, float]]:
    return [(e.token_id, e.logprob) for e in entries]


def _prompt_logprobs_to_proto(entries: Any) -> list[pb.PromptLogprob]:
    """The engine's `SampledToken`s of prompt tokens -> messages."""
    return [pb.PromptLogprob(token_id=e.token_id, logprob=e.logprob, rank=e.rank, top_logprobs=_top_to_proto(e.top_logprobs))
            for e in entries]


def _prompt_logprobs_from_proto(entries: Any) -> list[tuple[int, float, int, list[tuple[int, float]]]]:
    return [(e.token_id, e.logprob, e.rank, _top_from_proto(e.top_logprobs)) for e in entries]


def first_token_to_proto(token_id: int, logprob: float, rank: int, top_logprobs: list[tuple[int, float]]) -> pb.FirstToken:
    return pb.FirstToken(token_id=token_id, logprob=logprob, rank=rank, top_logprobs=_top_to_proto(top_logprobs))


def first_token_from_proto(msg: pb.FirstToken) -> Any:
    """The engine's `SampledToken` (worker side only)."""
    from splitserve.shared.engine_output import SampledToken

    return SampledToken(msg.token_id, msg.logprob, msg.rank, _top_from_proto(msg.top_logprobs))


def engine_output_to_chunk(out: Any) -> pb.GenerateChunk:
    """One `EngineOutput` (deltas of one step) -> one `GenerateChunk`; stats on the final one."""
    # Runs for every request every step: the optional fields are only built when present.
    chunk = pb.GenerateChunk(request_id=out.request_id, token_ids=out.new_token_ids, logprobs=out.new_logprobs)
    if ranks := getattr(out, "new_ranks", None):
        chunk.ranks.extend(ranks)
    if out.new_top_logprobs:
        chunk.top_logprobs.extend(pb.TopLogprobs(entries=_top_to_proto(top)) for top in out.new_top_logprobs)
    if prompt_logprobs := getattr(out, "new_prompt_logprobs", None):
        chunk.prompt_logprobs.extend(_prompt_logprobs_to_proto(prompt_logprobs))
    if out.finished:
        chunk.finish_reason = out.finish_reason or "stop"
        if isinstance(out.stop_reason, int):
            chunk.stop_token_id = out.stop_reason
        chunk.stats.CopyFrom(pb.GenerateStats(
            num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
            kv_bytes_received=out.kv_bytes_received, num_recomputed_tokens=out.num_recomputed_tokens))
    return chunk


def engine_output_to_prefill_response(out: Any) -> pb.PrefillResponse:
    """The prefill engine's only output: the first token and either a KV handle or, when that
    token already ended the request, its finish reason (the worker drops the handle then)."""
    if len(out.new_token_ids) != 1:
        raise ValueError(f"a prefill output carries exactly one token, got {len(out.new_token_ids)}")
    ranks = getattr(out, "new_ranks", None) or [0]
    resp = pb.PrefillResponse(
        request_id=out.request_id,
        first_token=first_token_to_proto(out.new_token_ids[0], out.new_logprobs[0], ranks[0], out.new_top_logprobs[0]),
        num_prompt_tokens=out.num_prompt_tokens, num_cached_tokens=out.num_cached_tokens,
        prompt_logprobs=_prompt_logprobs_to_proto(getattr(out, "new_prompt_logprobs", ())),
    )
    if out.kv_handle is not None:
        resp.kv_handle.CopyFrom(kv_handle_to_proto(out.kv_handle))
    elif out.finished:
        resp.finish_reason = out.finish_reason or "stop"
        if isinstance(out.stop_reason, int):
            resp.stop_token_id = out.stop_reason
    else:
        raise ValueError(f"prefill of {out.request_id!r} neither finished nor returned a KV handle")
    return resp


@dataclass
class TokenChunk:
    """The gateway's view of new tokens from a worker (a `GenerateChunk` or a prefill's first token)."""

    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_token_id: int | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    kv_bytes_received: int = 0
    num_recomputed_tokens: int = 0
    prompt_logprobs: list[tuple[int, float, int, list[tuple[int, float]]]] = field(default_factory=list)
    """(token id, logprob, rank, top alternatives) of prompt tokens 1.., on the first token's chunk."""
    num_cache_hit_tokens: int = 0
    """Prompt tokens served from a cache (prefix cache, host tier) by the worker that ran the
    prompt phase: OpenAI's usage.prompt_tokens_details.cached_tokens. On a decode instance that
    loaded a prefill's KV it is the prefill's count, set by the gateway."""


def session_to_proto(session: Any) -> pb.SessionHint:
    return pb.SessionHint(key=session.key, retention_s=session.retention_s)


def session_from_proto(msg: pb.SessionHint) -> Any:
    from splitserve.shared.request import SessionHint

    if not msg.key or msg.retention_s <= 0:
        raise ValueError("a session needs a key and a positive retention_s")
    return SessionHint(msg.key, msg.retention_s)


def chunk_from_proto(msg: pb.GenerateChunk) -> TokenChunk:
    if not msg.logprobs and not msg.HasField("finish_reason") and not msg.prompt_logprobs:  # the common chunk: tokens only
        return TokenChunk(list(msg.token_ids))
    return TokenChunk(
        token_ids=list(msg.token_ids), logprobs=list(msg.logprobs),
        top_logprobs=[_top_from_proto(t.entries) for t in msg.top_logprobs],
        finish_reason=msg.finish_reason if msg.HasField("finish_reason") else None,
        stop_token_id=msg.stop_token_id if msg.HasField("stop_token_id") else None,
        num_prompt_tokens=msg.stats.num_prompt_tokens, num_cached_tokens=msg.stats.num_cached_tokens,
        kv_bytes_received=msg.stats.kv_bytes_received, num_recomputed_tokens=msg.stats.num_recomputed_tokens,
        num_cache_hit_tokens=msg.stats.num_cached_tokens,
        prompt_logprobs=_prompt_logprobs_from_proto(msg.prompt_logprobs),
    )


def chunk_from_prefill_response(msg: pb.PrefillResponse) -> TokenChunk:
    first = msg.first_token
    return TokenChunk(
        token_ids=[first.token_id], logprobs=[first.logprob], top_logprobs=[_top_from_proto(first.top_logprobs)],
        finish_reason=msg.finish_reason if msg.HasField("finish_reason") else None,
        stop_token_id=msg.stop_token_id if msg.HasField("stop_token_id") else None,
        num_prompt_tokens=msg.num_prompt_tokens, num_cached_tokens=msg.num_cached_tokens,
        num_cache_hit_tokens=msg.num_cached_tokens,
        prompt_logprobs=_prompt_logprobs_from_proto(msg.prompt_logprobs),
    )


# ---- load ---------------------------------------------------------------------------------

@dataclass
class WorkerLoad:
    """What a worker reports about itself (GetLoad); the router ranks instances by it."""

    instance_id: str
    role: str
    """'prefill', 'decode' or 'colocated'."""
    model_name: str
    max_model_len: int
    block_size: int
    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)
    draining: bool = False
    """Shutting down: no new requests should go to it (those it has run to their end)."""


def load_to_proto(load: WorkerLoad) -> pb.LoadReport:
    if load.role not in ROLE_TO_PROTO:
        raise ValueError(f"role must be one of {sorted(ROLE_TO_PROTO)}, got {load.role!r}")
    return pb.LoadReport(
        instance_id=load.instance_id, role=ROLE_TO_PROTO[load.role], model_name=load.model_name,
        max_model_len=load.max_model_len, num_running=load.num_running, num_waiting=load.num_waiting,
        num_waiting_tokens=load.num_waiting_tokens, num_free_blocks=load.num_free_blocks,
        num_total_blocks=load.num_total_blocks, kv_usage=load.kv_usage, prefix_hit_rate=load.prefix_hit_rate,
        block_size=load.block_size, counters=dict(load.counters), draining=load.draining,
    )


def load_from_proto(msg: pb.LoadReport) -> WorkerLoad:
    if msg.role not in ROLE_FROM_PROTO:
        raise ValueError(f"worker {msg.instance_id!r} reported no valid role ({msg.role})")
    return WorkerLoad(
        instance_id=msg.instance_id, role=ROLE_FROM_PROTO[msg.role], model_name=msg.model_name,
        max_model_len=msg.max_model_len, block_size=msg.block_size, num_running=msg.num_running,
        num_waiting=msg.num_waiting, num_waiting_tokens=msg.num_waiting_tokens,
        num_free_blocks=msg.num_free_blocks, num_total_blocks=msg.num_total_blocks, kv_usage=msg.kv_usage,
        prefix_hit_rate=msg.prefix_hit_rate, counters=dict(msg.counters), draining=msg.draining,
    )
