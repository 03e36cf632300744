"""Fixtures shared by the gateway test modules of this directory."""

from __future__ import annotations

import pytest

from otlp_receiver import otlp_env, otlp_receiver
from scripted_tools import tool_stack
from stack import LocalStack


@pytest.fixture(scope="session")
def scripted_stack():
    """(gateway, scripted worker, tokenizer): the tool-calling stack of scripted_tools.py, one for
    test_gateway_tools.py and test_gateway_responses.py. Every test reads the worker's record right
    after its own requests (or counts from before them), so sharing it hides nothing. The response
    store holds 2 responses, as test_gateway_responses.py always had it."""
    with tool_stack(response_store_size=2) as parts:
        yield parts


@pytest.fixture(scope="session")
def agent_api_traces():
    """The OTLP receiver agent_api_stack exports its traces to (otlp_receiver.Receiver)."""
    with otlp_receiver() as receiver:
        yield receiver


@pytest.fixture(scope="session")
def agent_api_stack(agent_api_traces, tmp_path_factory):
    """One real disaggregated `splitserve up` (gateway, a prefill and a decode worker) with async
    scheduling, the hermes tool / qwen3 reasoning parsers and OTLP tracing to agent_api_traces, for
    test_stack_tools.py, test_structured_stack.py and test_tracing.py (the forced tool calls there
    are structured outputs too). No module stops, breaks or reconfigures it, the parsers leave
    output without tool-call or <think> markup untouched, and the tracing test picks its own
    request's trace, so each sees the stack it would have started itself."""
    args = ["--prefill", "1", "--decode", "1", "--async-scheduling", "--enable-auto-tool-choice",
            "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"]
    with LocalStack(args, str(tmp_path_factory.mktemp("agent-api-cache")), env=otlp_env(agent_api_traces.port)) as stack:
        yield stack


TWO_GATEWAY_ARGS = ["--colocated", "--gateway-processes", "2", "--session-window", "0", "--enable-auto-tool-choice",
                    "--tool-call-parser", "hermes"]


@pytest.fixture(scope="session")
def two_gateway_stack(tmp_path_factory):
    """`two_gateway_stack()`: one real colocated `splitserve up` with two gateway processes (the
    session credit off, the hermes tool parser on), for test_responses_store.py's conversation
    across processes and test_stack_e2e.py's shared port and summed metrics. A stack start costs
    seconds of both cores, so they share one; the e2e test stops it to check that every gateway
    process stops, so a call after that (another test order) gets a fresh stack."""
    started: list[LocalStack] = []

    def running() -> LocalStack:
        if not started or started[-1].process.poll() is not None:
            started.append(LocalStack(TWO_GATEWAY_ARGS, str(tmp_path_factory.mktemp("two-gateway-cache"))).__enter__())
        return started[-1]

    yield running
    for stack in started:
        stack.stop()
