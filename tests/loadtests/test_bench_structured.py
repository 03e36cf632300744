"""The structured-output benchmark runs end to end on a CPU at a tiny size."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "loadtests"))

import bench_structured  # noqa: E402


def test_tiny_run_reports_both_workloads(tmp_path) -> None:
    out = tmp_path / "result.json"
    result = bench_structured.main(["--shape", "tiny", "--device", "cpu", "--num-prompts", "3", "--input-len", "8",
                                    "--output-len", "6", "--max-num-seqs", "4", "--result-json", str(out)])
    assert [r["workload"] for r in result["rows"]] == ["unconstrained", "json schema"]
    assert all(r["output_tok_s"] > 0 and r["num_steps"] >= 6 for r in result["rows"])
    assert json.loads(out.read_text())["throughput_loss"] == result["throughput_loss"]


def test_the_tokenizer_has_the_requested_vocabulary(tmp_path) -> None:
    from splitserve.shared.tokenizer import load_tokenizer

    bench_structured.write_tokenizer(str(tmp_path), 1000)
    tokenizer = load_tokenizer(str(tmp_path))
    assert len(tokenizer) == 1000 and tokenizer.convert_tokens_to_ids("</s>") == 1
    assert tokenizer.decode([tokenizer.convert_tokens_to_ids("Ġself")]) == " self"
