"""The offline API: `LLM(model=DIR).generate(prompts, SamplingParams(...))`, as in vLLM.

Runs one `EngineCore` in this process, feeds it all prompts at once (continuous batching does
the rest), detokenizes incrementally and applies stop strings.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from splitserve.shared.engine import EngineCore
from splitserve.shared.engine_output import EngineOutput
from splitserve.shared.engine_parts import apply_cpu_threads
from splitserve.shared.engine_process import GIL_SWITCH_INTERVAL_S
from splitserve.shared.outputs import CompletionOutput, Logprob, RequestOutput
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.tokenizer import IncrementalDetokenizer, apply_chat_template, load_tokenizer

PromptInput = str | list[int] | dict


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", device: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, load_format: str = "auto",
                 block_size: int = 16, num_blocks: int | None = None, gpu_memory_utilization: float = 0.9,
                 cpu_kv_cache_gib: float = 0.5, enable_prefix_caching: bool = True,
                 max_num_seqs: int = 128, max_num_batched_tokens: int = 2048,
                 enable_chunked_prefill: bool = True, scheduling_policy: str = "fcfs",
                 skip_tokenizer_init: bool = False, enforce_eager: bool = False,
                 async_scheduling: bool | None = None, structured_outputs_threads: int | None = None,
                 structured_outputs_backend: str = "xgrammar",
                 step_trace: str | None = None, tensor_parallel_size: int = 1, cpu_threads: int | None = None) -> None:
        config = EngineConfig(
            model=ModelConfig(model, dtype, device, max_model_len, load_format, seed, enforce_eager),
            cache=CacheConfig(block_size, num_blocks, gpu_memory_utilization, cpu_kv_cache_gib, enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, scheduling_policy,
                                      async_scheduling, structured_outputs_threads=structured_outputs_threads,
                                      structured_outputs_backend=structured_outputs_backend,
                                      step_trace=step_trace),
            parallel=ParallelConfig(tensor_parallel_size, cpu_threads),
        )
        self._setup(config, skip_tokenizer_init)

    @classmethod
    def from_engine_config(cls, config: EngineConfig, skip_tokenizer_init: bool = False) -> "LLM":
        llm = cls.__new__(cls)
        llm._setup(config, skip_tokenizer_init)
        return llm

    def _setup(self, config: EngineConfig, skip_tokenizer_init: bool) -> None:
        apply_cpu_threads(config, beside_server=False)
        self.engine = EngineCore(config)
        if self.engine.runner.device.type == "cuda":
            # The engine's helper threads (the grammar pool, KV connectors) need the interpreter
            # lock between their calls while this thread runs the step loop: as in the engine
            # process, the short switch interval bounds each such wait (docs/benchmarks.md, 16).
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # Without a tokenizer (benchmarks on config-only checkpoints) prompts must be token ids
        # and outputs carry token ids only, as with vLLM's skip_tokenizer_init.
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(self.engine.model_dir)
        self._next_id = 0

    def close(self) -> None:
        """Stop the engine: its tensor-parallel ranks (if any) exit and the process group goes."""
        self.engine.close()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: PromptInput | Sequence[PromptInput],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        prompt_list = [prompts] if isinstance(prompts, (str, dict)) or _is_token_list(prompts) else list(prompts)
        params_list = _broadcast(sampling_params or SamplingParams(), len(prompt_list))
        results: list[RequestOutput] = []
        streams: dict[str, tuple[CompletionOutput, IncrementalDetokenizer]] = {}
        for i, (prompt, params) in enumerate(zip(prompt_list, params_list)):
            text, token_ids = self._tokenize(prompt)
            result = RequestOutput(str(self._next_id), text, token_ids)
            self._next_id += 1
            for k in range(params.n):
                child = params if params.n == 1 else params.for_choice(k)
                child_id = f"{result.request_id}-{k}"
                self.engine.add_request(child_id, token_ids, child, priority=priority[i] if priority else 0)
                out = CompletionOutput(k, "", [], 0.0 if params.logprobs is not None else None,
                                       [] if params.logprobs is not None else None)
                result.outputs.append(out)
                detok = None if self.tokenizer is None else IncrementalDetokenizer(
                    self.tokenizer, token_ids, params.skip_special_tokens, params.stop)
                streams[child_id] = (result, out, detok)
            results.append(result)
        while self.engine.has_unfinished_requests():
            for step_out in self.engine.step():
                self._apply(step_out, streams)
        for result in results:
            result.finished = True
        return results

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": apply_chat_template(self.tokenizer, m)} for m in conversations]
        return self.generate(prompts, sampling_params)

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if self.tokenizer is None and (isinstance(prompt, str) or (isinstance(prompt, dict) and "prompt_token_ids" not in prompt)):
            raise ValueError("this LLM was created with skip_tokenizer_init=True: pass prompts as token ids")
        if isinstance(prompt, str):
            return prompt, list(self.tokenizer.encode(prompt))
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return prompt["prompt"], list(self.tokenizer.encode(prompt["prompt"]))
        return None, list(prompt)

    def _apply(self, step: EngineOutput, streams: dict) -> None:
        if step.error is not None:  # e.g. a structured-output spec that does not compile
            for request_id in streams:
                self.engine.abort_request(request_id)
            raise ValueError(step.error)
        result, out, detok = streams[step.request_id]
        if step.new_prompt_logprobs and result.prompt_logprobs is None:  # the same for every child of n
            result.prompt_logprobs = [None, *(self._prompt_entry(e) for e in step.new_prompt_logprobs)]
        if detok is not None and detok.stopped is not None:
            return
        # Without stop strings nothing needs the text before the end: it is decoded once, when the
        # request finishes, off the per-step path (the detokenizer's text does not depend on how the
        # tokens are split into additions; the gateway's merged chunks rely on the same).
        per_token = detok is not None and detok.watches_stop_strings
        for j, token_id in enumerate(step.new_token_ids):
            out.token_ids.append(token_id)
            if out.logprobs is not None:
                out.cumulative_logprob += step.new_logprobs[j]
                out.logprobs.append(self._logprob_entry(step, j, token_id))
            if not per_token:
                continue
            out.text += detok.add([token_id])
            if detok.stopped is not None:
                self.engine.abort_request(step.request_id)
                out.finish_reason, out.stop_reason = "stop", detok.stopped
                return
        if step.finished:
            result.num_cached_tokens = max(result.num_cached_tokens, step.num_cached_tokens)
            if detok is not None:
                out.text += ("" if per_token else detok.add(out.token_ids)) + detok.finish()
            out.finish_reason, out.stop_reason = step.finish_reason, step.stop_reason

    def _text(self, token_id: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([token_id])

    def _prompt_entry(self, scored) -> dict[int, Logprob]:
        entry = {scored.token_id: Logprob(scored.logprob, scored.rank, self._text(scored.token_id))}
        for rank, (tid, lp) in enumerate(scored.top_logprobs, start=1):
            entry.setdefault(tid, Logprob(lp, rank, self._text(tid)))
        return entry

    def _logprob_entry(self, step: EngineOutput, j: int, token_id: int) -> dict[int, Logprob]:
        text = self._text

        entry = {token_id: Logprob(step.new_logprobs[j], step.new_ranks[j], text(token_id))}
        for rank, (tid, lp) in enumerate(step.new_top_logprobs[j], start=1):
            entry.setdefault(tid, Logprob(lp, rank, text(tid)))
        return entry


def _is_token_list(x) -> bool:
    return isinstance(x, list) and bool(x) and isinstance(x[0], int)


def _broadcast(params, n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params

