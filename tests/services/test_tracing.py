"""OpenTelemetry across processes: with the stack's OTLP endpoint pointed at a real OTLP/gRPC
receiver started by the tests (otlp_receiver.py, conftest.py), one request yields one trace with
spans from the gateway, the prefill service, the KV transfer and the decode service."""

from __future__ import annotations

import pytest

from stack import wait_until

pytestmark = pytest.mark.slow


def test_one_trace_spans_gateway_prefill_transfer_decode(agent_api_stack, agent_api_traces):
    stack, servicer = agent_api_stack, agent_api_traces
    r = stack.openai().completions.create(model="splitserve-demo", prompt="trace me " * 8, max_tokens=5,
                                          temperature=0)
    assert r.usage.completion_tokens == 5

    def our_full_trace():
        """This request's trace (its prefill span names the request), once every part of it is in."""
        with servicer.lock:
            spans = list(servicer.spans)
        ours = {trace for _, name, trace, attrs in spans
                if name == "prefill" and attrs["splitserve.request_id"].string_value.startswith(r.id)}
        for trace_id in ours:
            parts = {(service, name) for service, name, trace, _ in spans if trace == trace_id}
            if {"splitserve-gateway", "splitserve-prefill", "splitserve-decode"} <= {s for s, _ in parts} and \
                    {"prefill", "decode", "kv_transfer"} <= {n for _, n in parts}:
                return trace_id
        return None

    trace_id = wait_until(our_full_trace, timeout_s=20, interval_s=0.5, message="one full trace")
    spans = [s for s in servicer.spans if s[2] == trace_id]
    transfer = [attrs for service, name, _, attrs in spans if name == "kv_transfer"]
    assert transfer and transfer[0]["splitserve.kv_bytes"].int_value > 0
    assert transfer[0]["splitserve.ok"].bool_value


def test_the_handoff_phases_come_out_of_one_streamed_request(agent_api_stack, agent_api_traces):
    """loadtests/handoff_probe.py's breakdown, on one request: every mark it reads is in the spans
    (the gateway's prefill_returned / decode_first_chunk events, the decode span's first_output,
    kv_transfer) and they come in causal order, so no phase is negative."""
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))
    from handoff_probe import PHASES, phases_of, request_spans, stream_one

    client = agent_api_stack.openai()
    completion_id, times = stream_one(client, "splitserve-demo", "hand me off " * 6, 4)
    assert len(times) >= 2
    phases = wait_until(lambda: phases_of(request_spans(agent_api_traces, completion_id), times), timeout_s=20,
                        interval_s=0.5, message="the request's hand-off spans")
    assert set(phases) == set(PHASES)
    assert all(value >= 0 for value in phases.values()), phases
