"""The retained-turn probe, run for real on CPU at a tiny size: the gateway's functions and the
engine alone on a keyed turn whose history is cached, beside a fresh prompt of its new tokens.
The served part (a colocated stack) runs in the GPU command; here the in-process parts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "loadtests"))

import retained_probe  # noqa: E402


def test_probe_splits_a_retained_turn_beside_its_fresh_twin(tmp_path, capsys):
    out = tmp_path / "probe.json"
    assert retained_probe.main(["--device", "cpu", "--history-lens", "64,128", "--new-len", "24", "--pairs", "2",
                                "--gateway-repeats", "2", "--num-blocks", "64", "--kv-offload-gib", "0.01",
                                "--parts", "gateway,engine", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["history_len"] for r in rows] == [64, 128]
    for row in rows:
        retained, fresh = row["engine"]["retained"], row["engine"]["fresh"]
        assert retained["cached_tokens"] == row["history_len"]  # the history was on the device
        assert retained["ttft"] > 0 and fresh["ttft"] > 0 and retained["forward"] > 0
        assert row["gateway"]["retained"]["route"] > 0 and "remember" not in row["gateway"]["fresh"]
        assert row["attention_gflop"] > 0
    assert "engine forward" in capsys.readouterr().out


def test_attention_flops_grow_with_the_history():
    one = retained_probe.attention_gflop("llama-3.1-8b", 5000, 528)
    assert abs(one - 4 * 528 * 5000 * 32 * 128 * 32 / 1e9) < 1e-6
    assert retained_probe.attention_gflop("llama-3.1-8b", 10000, 528) == 2 * one
