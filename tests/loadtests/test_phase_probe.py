"""The phase probe times an async structured run's phases on a CPU and leaves the classes as it found them."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import bench_structured  # noqa: E402
from phase_probe import PhaseProbe  # noqa: E402


def test_an_async_structured_run_reports_every_phase(tmp_path) -> None:
    from splitserve.shared.grammar_fill import StepFill
    from splitserve.shared.llm import LLM
    from splitserve.shared.sampling_params import SamplingParams
    from splitserve.shared.structured_outputs import StructuredOutputsParams

    model_dir, _ = bench_structured.write_model("tiny", str(tmp_path))
    llm = LLM(model_dir, load_format="dummy", device="cpu", skip_tokenizer_init=True, async_scheduling=True, max_num_seqs=4)
    original = StepFill.result
    probe = PhaseProbe(llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json=bench_structured.schema(6)))
    outs = llm.generate([{"prompt_token_ids": [300 + i, 301, 302]} for i in range(3)], params)
    assert all(len(o.outputs[0].token_ids) == 6 for o in outs)
    decode = [s for s in probe.steps if s["requests"] and s["tokens"] == s["requests"]]
    assert len(decode) >= 5 and all(s["step"] > 0 for s in decode)
    assert all(s["resolve"] >= s["tokens_wait"] for s in decode if "resolve" in s)
    table = probe.table()
    for phase in ("schedule", "stage", "sample_deferred", "fill_wait", "launch", "resolve", "accept_wait", "between",
                  "emit", "start_fill", "plan_slices", "rejected"):
        assert f" {phase} " in table, table
    probe.close()
    import splitserve.shared.engine as engine_module
    assert StepFill.result is original and engine_module.start_fill.__name__ == "start_fill"
