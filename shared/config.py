"""Engine configuration: one place for every default.

Frozen dataclasses, one per concern, each with `validate()`. Field names follow vLLM's
where vLLM has one (`max_num_seqs`, `max_num_batched_tokens`, `block_size`,
`gpu_memory_utilization`) so its users feel at home. CLI flags are generated from these
fields by `splitserve.cli`; nothing else reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

STRUCTURED_OUTPUTS_BACKENDS = ("xgrammar", "guidance")
"""The grammar engines a worker can run (`--structured-outputs-backend`; shared/grammar.py)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """Hugging Face checkpoint directory. None serves the built-in demo checkpoint."""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on CPU), 'float32', 'bfloat16' or 'float16'."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:N]'."""
    max_model_len: int | None = None
    """Longest prompt + output in tokens; defaults to the checkpoint's max_position_embeddings."""
    load_format: str = "auto"
    """'auto' reads *.safetensors; 'dummy' builds random weights from config.json alone (benchmarks)."""
    seed: int = 0
    """Seed of the global sampling generator and of dummy weights."""
    enforce_eager: bool = False
    """On CUDA, run decode steps eagerly instead of replaying captured CUDA graphs."""

    def validate(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """Fix the KV pool size in blocks; None sizes it from memory (see below). A pool split by KV
    layer group (interleaved sliding windows) gets the memory of that many one-pool blocks."""
    gpu_memory_utilization: float = 0.9
    """On CUDA: fraction of total device memory the engine may use (weights + activations + KV)."""
    cpu_kv_cache_gib: float = 0.5
    """On CPU: memory given to the KV pool."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes (chained block hashes, LRU eviction)."""
    kv_offload_gib: float = 0.0
    """Host-memory KV tier (CPU RAM, pinned on CUDA) in GiB: blocks the device pool evicts stay
    there and are restored on a later prefix hit instead of recomputed. 0 turns it off."""
    split_kv_by_layer_group: bool = True
    """Interleaved sliding-window models (Gemma 2/3, Qwen2/3 with max_window_layers): one KV pool
    per layer group, so the sliding layers keep only their window's blocks. Off (and always with
    kv_offload_gib or tensor parallelism): one pool of every block. A P/D pair must agree;
    `splitserve up` turns it off on both roles when either has tensor parallelism."""

    def validate(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {self.num_blocks}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.cpu_kv_cache_gib <= 0:
            raise ConfigError(f"cpu_kv_cache_gib must be positive, got {self.cpu_kv_cache_gib}")
        if self.kv_offload_gib < 0:
            raise ConfigError(f"kv_offload_gib must be >= 0, got {self.kv_offload_gib}")
        if self.kv_offload_gib and not self.enable_prefix_caching:
            raise ConfigError("kv_offload_gib needs enable_prefix_caching: host blocks are found by their hashes")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    """Most requests running at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks + decodes)."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several steps so decodes keep flowing."""
    policy: str = "fcfs"
    """'fcfs' or 'priority' (lower value first, then arrival)."""
    async_scheduling: bool | None = None
    """Schedule and launch step N+1 before step N's tokens reach the host, overlapping host work
    with the GPU; tokens are identical either way. Unset (None): on for CUDA, off on CPU, where the
    forward runs on the same cores and there is nothing to overlap."""
    grammar_compile_timeout_s: float = 30.0
    """A grammar still compiling this long after its compile began fails its requests (a 400: the
    spec is too complex); a request whose compile has not begun this long after it came (the
    compile threads busy with others) fails as busy (429: try again)."""
    structured_outputs_threads: int | None = None
    """Threads of the engine's grammar pool: each takes a slice of a step's structured-output
    rows, advances their matchers by the new tokens and fills their token masks (two xgrammar
    calls, GIL released), beside the step loop, which books the previous step's outputs
    meanwhile (shared/grammar_fill.py). Unset: half the cores, at most 4 (the step loop and the
    device's host work keep the rest; 4 lost less than 8 on a 16-core H200 host, benchmarks 19)."""
    structured_outputs_backend: str = "xgrammar"
    """The grammar engine of structured outputs (vLLM's names): `xgrammar`, or `guidance`
    (llguidance: masks computed in its own threads, faster per row on large vocabularies;
    xgrammar's structural tags only as the triggered tags the gateway builds for tool calls)."""
    step_trace: str | None = None
    """Write one CSV line per engine step (start, duration, requests, tokens, outputs) to this
    file: a diagnostic for where a run's time goes (shared/step_trace.py)."""

    def validate(self) -> None:
        if self.max_num_seqs <= 0:
            raise ConfigError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ConfigError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.policy not in ("fcfs", "priority"):
            raise ConfigError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")
        if self.grammar_compile_timeout_s <= 0:
            raise ConfigError(f"grammar_compile_timeout_s must be positive, got {self.grammar_compile_timeout_s}")
        if self.structured_outputs_backend not in STRUCTURED_OUTPUTS_BACKENDS:
            raise ConfigError(f"structured_outputs_backend must be one of {', '.join(STRUCTURED_OUTPUTS_BACKENDS)}, "
                              f"got {self.structured_outputs_backend!r}")
        if self.structured_outputs_threads is not None and self.structured_outputs_threads < 1:
            raise ConfigError(f"structured_outputs_threads must be at least 1, got {self.structured_outputs_threads}")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks the model is sharded over inside this worker (vLLM's `-tp`): one process per device,
    cuda:i .. cuda:i+N-1 from the configured device on GPUs, gloo processes on CPU."""
    cpu_threads: int | None = None
    """Torch's intra-op threads in the engine (`torch.set_num_threads`; rank 0's under tensor
    parallelism, whose other ranks split the cores). Unset: torch's default (every core) for
    `LLM(...)`, which has the machine to itself; on CPU, one core fewer (at least 1) for a served
    worker's engine process, whose serving process and the gateway run beside it: an OpenMP thread
    that loses its core to them stalls every parallel region of the step."""

    def validate(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads must be >= 1, got {self.cpu_threads}")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> None:
        for f in fields(self):
            getattr(self, f.name).validate()
