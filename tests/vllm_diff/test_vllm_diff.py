"""Differential test: splitserve answers vLLM 0.32's recorded requests as vLLM did.

`recordings.json` holds each request of cases.py and the answer of a real `vllm serve` on the
demo checkpoint (record.py made it; vLLM is not needed here). Each case is replayed over HTTP
against the real stack serving the same checkpoint (`splitserve up --model DIR`, so the served
name is DIR, as vLLM's): the default topology, a prefill and a decode worker with KV over UCX
(a colocated worker gives the same tokens: test_stack_e2e.py; one stack keeps this suite's time
to its start-up and ~140 requests). compare.py says what must agree and lists the documented
differences.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "services"))

from compare import diff, documented, merge_stream, strip_nulls  # noqa: E402
from record import parse_sse, substitute  # noqa: E402
from stack import LocalStack  # noqa: E402

RECORDINGS = json.loads((HERE / "recordings.json").read_text())
BY_NAME = {r["case"]["name"]: r for r in RECORDINGS["recorded"]}

pytestmark = pytest.mark.slow

PENDING: dict[str, str] = {}
"""Cases known to differ until work in flight lands; strict, so each must be removed once it passes."""


def _cases(names: list[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.xfail(reason=PENDING[n], strict=True)) if n in PENDING else n
            for n in names]


@pytest.fixture(scope="module")
def model_dir(demo_checkpoint_dir) -> str:
    directory = demo_checkpoint_dir
    for name, digest in RECORDINGS["checkpoint_sha256"].items():
        actual = hashlib.sha256((Path(directory) / name).read_bytes()).hexdigest()
        assert actual == digest, (f"the demo checkpoint's {name} is not the one vLLM answered for: the builder's "
                                  f"output changed, so re-record (tests/vllm_diff/record.py)")
    return directory


def _stack(args: list[str], model_dir: str, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("vllm-diff-stack"))
    return LocalStack(["--model", model_dir, "--max-model-len", str(RECORDINGS["max_model_len"]), *args], cache)


@pytest.fixture(scope="module")
def disaggregated(model_dir, tmp_path_factory):
    with _stack(["--prefill", "1", "--decode", "1"], model_dir, tmp_path_factory) as stack:
        yield stack


def replay(url: str, case: dict, model: str) -> dict:
    request = substitute({k: v for k, v in case.items() if k != "name"}, "$MODEL", model)
    kwargs = {"headers": request.get("headers")}
    if "json" in request:
        kwargs["json"] = request["json"]
    elif "raw" in request:
        kwargs["content"] = request["raw"].encode()
    with httpx.Client(base_url=url, timeout=120) as client:
        response = client.request(request["method"], request["path"], **kwargs)
    answer: dict = {"status": response.status_code, "media_type": response.headers.get("content-type", "").split(";")[0]}
    if answer["media_type"] == "text/event-stream":
        answer["events"] = parse_sse(response.text)
    else:
        answer["body"] = response.json() if response.content else None
    return substitute(answer, model, "$MODEL")


def problems_of(name: str, answer: dict) -> list[str]:
    recorded = BY_NAME[name]
    problems = []
    if answer["status"] != recorded["status"] and documented(name, "status") is None:
        problems.append(f"status: vLLM {recorded['status']}, splitserve {answer['status']}")
    media_type = recorded["headers"].get("content-type", "").split(";")[0]
    if answer["media_type"] != media_type and recorded.get("body") is not None:
        problems.append(f"content-type: vLLM {media_type}, splitserve {answer['media_type']}")
    if "events" in recorded:
        expected, actual = merge_stream(recorded["events"]), merge_stream(answer.get("events", []))
        problems += diff(name, expected, actual)
        problems += _role_chunks(actual)
    elif documented(name, "*") is None:
        problems += diff(name, strip_nulls(recorded.get("body")), strip_nulls(answer.get("body")))
    return problems


def _role_chunks(merged: dict) -> list[str]:
    """vLLM opens each chat choice with exactly one {"role": "assistant", "content": ""} chunk."""
    return [f"choice {i}: role chunks {c['role_chunks']}" for i, c in merged.get("choices", {}).items()
            if "role_chunks" in c and c["role_chunks"] != [{"role": "assistant", "content": ""}]]


@pytest.mark.parametrize("name", _cases(list(BY_NAME)))
def test_splitserve_answers_like_vllm(disaggregated, model_dir, name):
    problems = problems_of(name, replay(disaggregated.url, BY_NAME[name]["case"], model_dir))
    assert not problems, "\n".join([f"{name} differs from vLLM:", *problems])


def test_every_documented_difference_is_still_needed():
    """A difference listed for cases that no longer exist is stale."""
    from compare import DIFFERENCES
    import fnmatch

    for case_pattern, path, reason in DIFFERENCES:
        assert any(fnmatch.fnmatchcase(name, case_pattern) for name in BY_NAME), (case_pattern, path, reason)
