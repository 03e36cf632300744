"""The requests of the vLLM differential suite: what `record.py` sent to a real vLLM.

Each case is a plain dict: `name`, `method`, `path`, and either `json` (a body) or `raw` (bytes
sent as they are, for malformed bodies), optionally `headers`. The string "$MODEL" anywhere in a
body or path stands for the served model name (vLLM serves `vllm serve DIR` as DIR; the replay
substitutes the name the server under test serves).

The checkpoint is the demo one (shared/demo.py) served with max-model-len 256, so that the
context-length cases stay cheap. Token 2999 ("Def") is a prompt after which the demo model's
greedy next token is EOS: the ignore_eos / min_tokens cases need an EOS to hold back.
"""

from __future__ import annotations

MAX_MODEL_LEN = 256
PROMPT = "def fibonacci(n):"
EOS_PROMPT_IDS = [2999]
"""The demo model's greedy continuation of this prompt is EOS at once."""
LONG_TEXT = "x = 1\n" * 200  # well over MAX_MODEL_LEN tokens
USER = [{"role": "user", "content": "Write a function that adds two numbers."}]


def _cmpl(name: str, headers: dict | None = None, **body) -> dict:
    return _case(name, "/v1/completions", headers, {"model": "$MODEL", **body})


def _chat(name: str, headers: dict | None = None, **body) -> dict:
    return _case(name, "/v1/chat/completions", headers, {"model": "$MODEL", **body})


def _case(name: str, path: str, headers: dict | None, body: dict) -> dict:
    case = {"name": name, "method": "POST", "path": path, "json": body}
    if headers:
        case["headers"] = headers
    return case


def _get(name: str, path: str) -> dict:
    return {"name": name, "method": "GET", "path": path}


GREEDY = {"temperature": 0.0}
TOP1 = {"temperature": 1.0, "top_k": 1}
"""Sampling that is deterministic all the same: vLLM refuses n > 1 with greedy sampling."""

COMPLETIONS = [
    _cmpl("cmpl_greedy", prompt=PROMPT, max_tokens=8, **GREEDY),
    _cmpl("cmpl_default_max_tokens", prompt=PROMPT, **GREEDY),
    _case("cmpl_no_model", "/v1/completions", None, {"prompt": PROMPT, "max_tokens": 4, **GREEDY}),
    _cmpl("cmpl_stream", prompt=PROMPT, max_tokens=6, stream=True, **GREEDY),
    _cmpl("cmpl_stream_usage", prompt=PROMPT, max_tokens=4, stream=True, stream_options={"include_usage": True},
          **GREEDY),
    _cmpl("cmpl_prompt_list", prompt=[PROMPT, "import os"], max_tokens=4, **GREEDY),
    _cmpl("cmpl_token_ids", prompt=[286, 81, 367, 3773, 473], max_tokens=4, **GREEDY),
    _cmpl("cmpl_token_ids_batch", prompt=[[286, 81, 367], [3773, 473]], max_tokens=3, **GREEDY),
    _cmpl("cmpl_logprobs", prompt=PROMPT, max_tokens=4, logprobs=2, **GREEDY),
    _cmpl("cmpl_logprobs_0", prompt=PROMPT, max_tokens=3, logprobs=0, **GREEDY),
    _cmpl("cmpl_stream_logprobs", prompt=PROMPT, max_tokens=3, logprobs=1, stream=True, **GREEDY),
    _cmpl("cmpl_echo", prompt=PROMPT, max_tokens=4, echo=True, **GREEDY),
    _cmpl("cmpl_echo_logprobs", prompt=PROMPT, max_tokens=3, echo=True, logprobs=1, **GREEDY),
    _cmpl("cmpl_echo_stream", prompt=PROMPT, max_tokens=3, echo=True, stream=True, **GREEDY),
    _cmpl("cmpl_echo_list", prompt=[PROMPT, "import os"], max_tokens=2, echo=True, **GREEDY),
    _cmpl("cmpl_echo_max_tokens_0", prompt=PROMPT, max_tokens=0, echo=True, logprobs=0, **GREEDY),
    _cmpl("cmpl_prompt_logprobs", prompt=PROMPT, max_tokens=2, prompt_logprobs=2, **GREEDY),
    _cmpl("cmpl_stop", prompt=PROMPT, max_tokens=16, stop=[" ", "e", "t", "("], **GREEDY),
    _cmpl("cmpl_stop_include", prompt=PROMPT, max_tokens=16, stop=[" ", "e", "t", "("],
          include_stop_str_in_output=True, **GREEDY),
    _cmpl("cmpl_stop_stream", prompt=PROMPT, max_tokens=16, stop=[" ", "e", "t", "("], stream=True, **GREEDY),
    _cmpl("cmpl_stop_include_stream", prompt=PROMPT, max_tokens=16, stop=[" ", "e", "t", "("],
          include_stop_str_in_output=True, stream=True, **GREEDY),
    _cmpl("cmpl_eos", prompt=EOS_PROMPT_IDS, max_tokens=6, **GREEDY),
    _cmpl("cmpl_min_tokens", prompt=EOS_PROMPT_IDS, max_tokens=8, min_tokens=3, **GREEDY),
    _cmpl("cmpl_ignore_eos", prompt=EOS_PROMPT_IDS, max_tokens=5, ignore_eos=True, **GREEDY),
    _cmpl("cmpl_ignore_eos_min_tokens", prompt=EOS_PROMPT_IDS, max_tokens=5, min_tokens=5, ignore_eos=True,
          **GREEDY),
    _cmpl("cmpl_ignore_eos_special", prompt=EOS_PROMPT_IDS, max_tokens=3, ignore_eos=True,
          skip_special_tokens=False, **GREEDY),
    _cmpl("cmpl_best_of", prompt=PROMPT, max_tokens=4, best_of=2, **GREEDY),
    _cmpl("cmpl_best_of_1", prompt=PROMPT, max_tokens=4, best_of=1, **GREEDY),
    _cmpl("cmpl_best_of_lt_n", prompt=PROMPT, max_tokens=4, n=2, best_of=1, **GREEDY),
    _cmpl("cmpl_x_request_id", headers={"X-Request-Id": "my-request-42"}, prompt=PROMPT, max_tokens=2, **GREEDY),
    _cmpl("cmpl_x_request_id_stream", headers={"X-Request-Id": "my-request-43"}, prompt=PROMPT, max_tokens=2,
          stream=True, **GREEDY),
    _cmpl("cmpl_n2_greedy", prompt=PROMPT, max_tokens=3, n=2, **GREEDY),
    _cmpl("cmpl_n2", prompt=PROMPT, max_tokens=3, n=2, **TOP1),
    _cmpl("cmpl_n2_stream", prompt=[PROMPT, "import os"], max_tokens=2, n=2, stream=True, **TOP1),
    _cmpl("cmpl_best_of_stream", prompt=PROMPT, max_tokens=2, best_of=3, stream=True, **TOP1),
    _cmpl("cmpl_best_of_n2", prompt=PROMPT, max_tokens=2, best_of=3, n=2, **TOP1),
    _cmpl("cmpl_best_of_below_n", prompt=PROMPT, max_tokens=2, best_of=1, n=2, **TOP1),
    _cmpl("cmpl_max_tokens_above_context", prompt=PROMPT, max_tokens=MAX_MODEL_LEN + 1, **GREEDY),
    _cmpl("cmpl_echo_logprobs_stream", prompt=PROMPT, max_tokens=2, echo=True, logprobs=1, stream=True, **GREEDY),
    _cmpl("cmpl_prompt_logprobs_0", prompt=PROMPT, max_tokens=1, prompt_logprobs=0, **GREEDY),
    _cmpl("cmpl_prompt_logprobs_stream", prompt=PROMPT, max_tokens=2, prompt_logprobs=1, stream=True, **GREEDY),
    _cmpl("err_prompt_logprobs_21", prompt=PROMPT, max_tokens=1, prompt_logprobs=21, **GREEDY),
    _cmpl("cmpl_default_max_tokens_stream", prompt=PROMPT, stream=True, **GREEDY),
    _cmpl("cmpl_top_k_1", prompt=PROMPT, max_tokens=6, temperature=1.0, top_k=1),
    _cmpl("cmpl_seed", prompt=PROMPT, max_tokens=6, temperature=0.8, seed=7),
    _cmpl("cmpl_penalties", prompt=PROMPT, max_tokens=8, repetition_penalty=1.3, frequency_penalty=0.5,
          presence_penalty=0.5, **GREEDY),
    _cmpl("cmpl_top_p_min_p", prompt=PROMPT, max_tokens=4, top_p=0.5, min_p=0.1, **GREEDY),
    _cmpl("cmpl_stop_token_ids", prompt=PROMPT, max_tokens=8, stop_token_ids=[2, 3], **GREEDY),
    _cmpl("cmpl_user", prompt=PROMPT, max_tokens=2, user="someone", **GREEDY),
    _cmpl("cmpl_logit_bias", prompt=PROMPT, max_tokens=3, logit_bias={"50": 100}, **GREEDY),
    _cmpl("cmpl_suffix", prompt=PROMPT, max_tokens=2, suffix="tail", **GREEDY),
    _cmpl("cmpl_unknown_field", prompt=PROMPT, max_tokens=2, no_such_field=1, **GREEDY),
    _cmpl("cmpl_max_tokens_over_context", prompt="x = 1\n" * 40, max_tokens=250, **GREEDY),
    _cmpl("cmpl_prompt_too_long", prompt=LONG_TEXT, max_tokens=4, **GREEDY),
    _cmpl("cmpl_prompt_fills_context", prompt=[473] * MAX_MODEL_LEN, max_tokens=1, **GREEDY),
    _cmpl("cmpl_prompt_one_below_context", prompt=[473] * (MAX_MODEL_LEN - 1), max_tokens=1, **GREEDY),
]

COMPLETION_ERRORS = [
    _cmpl("err_unknown_model", prompt=PROMPT, max_tokens=2) | {"json": {"model": "no-such-model", "prompt": PROMPT}},
    _cmpl("err_max_tokens_type", prompt=PROMPT, max_tokens="many"),
    _cmpl("err_max_tokens_negative", prompt=PROMPT, max_tokens=-1),
    _cmpl("err_temperature_negative", prompt=PROMPT, max_tokens=2, temperature=-1.0),
    _cmpl("err_top_p_zero", prompt=PROMPT, max_tokens=2, top_p=0.0),
    _cmpl("err_top_p_above_one", prompt=PROMPT, max_tokens=2, top_p=1.5),
    _cmpl("err_top_k_minus_two", prompt=PROMPT, max_tokens=2, top_k=-2),
    _cmpl("err_min_p_above_one", prompt=PROMPT, max_tokens=2, min_p=1.5),
    _cmpl("err_n_zero", prompt=PROMPT, max_tokens=2, n=0),
    _cmpl("err_logprobs_21", prompt=PROMPT, max_tokens=2, logprobs=21),
    _cmpl("err_logprobs_negative", prompt=PROMPT, max_tokens=2, logprobs=-1),
    _cmpl("err_presence_penalty", prompt=PROMPT, max_tokens=2, presence_penalty=3.0),
    _cmpl("err_frequency_penalty", prompt=PROMPT, max_tokens=2, frequency_penalty=-3.0),
    _cmpl("err_repetition_penalty_zero", prompt=PROMPT, max_tokens=2, repetition_penalty=0.0),
    _cmpl("err_min_tokens_above_max", prompt=PROMPT, max_tokens=2, min_tokens=5),
    _cmpl("err_seed_type", prompt=PROMPT, max_tokens=2, seed="abc"),
    _cmpl("err_stop_type", prompt=PROMPT, max_tokens=2, stop=5),
    _cmpl("err_stream_options_without_stream", prompt=PROMPT, max_tokens=2, stream_options={"include_usage": True}),
    _cmpl("err_prompt_type", prompt=5, max_tokens=2),
    _cmpl("err_empty_prompt", prompt="", max_tokens=2),
    _cmpl("err_empty_prompt_list", prompt=[], max_tokens=2),
    _cmpl("err_token_outside_vocab", prompt=[99999], max_tokens=2),
    _case("err_missing_prompt", "/v1/completions", None, {"model": "$MODEL", "max_tokens": 2}),
    {"name": "err_invalid_json", "method": "POST", "path": "/v1/completions", "raw": "{not json",
     "headers": {"Content-Type": "application/json"}},
    {"name": "err_body_array", "method": "POST", "path": "/v1/completions", "raw": "[1, 2]",
     "headers": {"Content-Type": "application/json"}},
    _cmpl("err_stream_prompt_too_long", prompt=LONG_TEXT, max_tokens=4, stream=True),
]

CHAT = [
    _chat("chat_greedy", messages=USER, max_tokens=8, **GREEDY),
    _chat("chat_default_max_tokens", messages=USER, **GREEDY),
    _case("chat_no_model", "/v1/chat/completions", None, {"messages": USER, "max_tokens": 4, **GREEDY}),
    _chat("chat_stream", messages=USER, max_tokens=5, stream=True, **GREEDY),
    _chat("chat_stream_usage", messages=USER, max_tokens=3, stream=True, stream_options={"include_usage": True},
          **GREEDY),
    _chat("chat_logprobs", messages=USER, max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY),
    _chat("chat_logprobs_no_top", messages=USER, max_tokens=2, logprobs=True, **GREEDY),
    _chat("chat_stream_logprobs", messages=USER, max_tokens=2, logprobs=True, top_logprobs=1, stream=True, **GREEDY),
    _chat("chat_max_completion_tokens", messages=USER, max_completion_tokens=3, **GREEDY),
    _chat("chat_n2", messages=USER, max_tokens=3, n=2, **GREEDY),
    _chat("chat_n2_stream", messages=USER, max_tokens=2, n=2, stream=True, **GREEDY),
    _chat("chat_n2_top_k_1", messages=USER, max_tokens=3, n=2, **TOP1),
    _chat("chat_n2_top_k_1_stream", messages=USER, max_tokens=2, n=2, stream=True,
          stream_options={"include_usage": True}, **TOP1),
    _chat("chat_stream_stop", messages=USER, max_tokens=16, stop=["e", "t"], stream=True, **GREEDY),
    _chat("chat_max_tokens_trimmed", messages=USER, max_tokens=250, **GREEDY),
    _chat("chat_stop", messages=USER, max_tokens=16, stop=[" ", "e", "t"], **GREEDY),
    _chat("chat_stop_include", messages=USER, max_tokens=16, stop=[" ", "e", "t"], include_stop_str_in_output=True,
          **GREEDY),
    _chat("chat_content_parts", messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                                        {"type": "text", "text": " there"}]}],
          max_tokens=3, **GREEDY),
    _chat("chat_multi_turn", messages=[{"role": "system", "content": "Be brief."}, *USER,
                                       {"role": "assistant", "content": "def add(a, b):"},
                                       {"role": "user", "content": "And subtract?"}], max_tokens=4, **GREEDY),
    _chat("chat_x_request_id", headers={"X-Request-Id": "chat-request-7"}, messages=USER, max_tokens=2, **GREEDY),
    _chat("chat_no_generation_prompt", messages=USER, max_tokens=3, add_generation_prompt=False, **GREEDY),
    _chat("chat_min_tokens_ignore_eos", messages=USER, max_tokens=4, min_tokens=4, ignore_eos=True, **GREEDY),
    _chat("chat_max_tokens_over_context", messages=USER, max_tokens=500, **GREEDY),
    _chat("chat_unknown_field", messages=USER, max_tokens=2, no_such_field=True, **GREEDY),
]

CHAT_ERRORS = [
    _chat("err_chat_unknown_model", messages=USER) | {"json": {"model": "no-such-model", "messages": USER}},
    _chat("err_chat_empty_messages", messages=[], max_tokens=2),
    _case("err_chat_missing_messages", "/v1/chat/completions", None, {"model": "$MODEL", "max_tokens": 2}),
    _chat("err_chat_message_without_role", messages=[{"content": "hi"}], max_tokens=2),
    _chat("err_chat_top_logprobs_without_logprobs", messages=USER, max_tokens=2, top_logprobs=2),
    _chat("err_chat_top_logprobs_21", messages=USER, max_tokens=2, logprobs=True, top_logprobs=21),
    _chat("err_chat_prompt_too_long", messages=[{"role": "user", "content": LONG_TEXT}], max_tokens=2),
    _chat("err_chat_temperature_type", messages=USER, temperature="hot"),
    _chat("err_chat_max_tokens_zero", messages=USER, max_tokens=0),
]

OTHER = [
    _get("models", "/v1/models"),
    _get("model_by_id", "/v1/models/$MODEL"),
    _get("model_by_unknown_id", "/v1/models/no-such-model"),
    _get("ping_get", "/ping"),
    {"name": "ping_post", "method": "POST", "path": "/ping"},
    _get("version", "/version"),
    _get("health", "/health"),
    _case("tokenize_prompt", "/tokenize", None, {"model": "$MODEL", "prompt": PROMPT}),
    _case("tokenize_no_model", "/tokenize", None, {"prompt": PROMPT}),
    _case("tokenize_no_special", "/tokenize", None, {"prompt": PROMPT, "add_special_tokens": False}),
    _case("tokenize_token_strs", "/tokenize", None, {"prompt": PROMPT, "return_token_strs": True}),
    _case("tokenize_messages", "/tokenize", None, {"model": "$MODEL", "messages": USER}),
    _case("tokenize_messages_no_generation_prompt", "/tokenize", None,
          {"messages": USER, "add_generation_prompt": False}),
    _case("err_tokenize_unknown_model", "/tokenize", None, {"model": "no-such-model", "prompt": PROMPT}),
    _case("err_tokenize_missing_prompt", "/tokenize", None, {"model": "$MODEL"}),
    _case("detokenize", "/detokenize", None, {"model": "$MODEL", "tokens": [286, 81, 367, 3773, 473]}),
    _case("detokenize_no_model", "/detokenize", None, {"tokens": [1, 286, 2]}),
    _case("err_detokenize_unknown_model", "/detokenize", None, {"model": "no-such-model", "tokens": [286]}),
    _case("err_detokenize_missing_tokens", "/detokenize", None, {"model": "$MODEL"}),
    _case("err_detokenize_outside_vocab", "/detokenize", None, {"tokens": [99999]}),
    _get("err_unknown_path", "/v1/no-such-endpoint"),
    _get("err_wrong_method", "/v1/completions"),
]

CASES = [*COMPLETIONS, *COMPLETION_ERRORS, *CHAT, *CHAT_ERRORS, *OTHER]
assert len({c["name"] for c in CASES}) == len(CASES), "case names must be unique"
