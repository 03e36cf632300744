"""The chat prompt probe, run for real at a small size: both tokenizers keep the cache on, and the
probe's own check (the cached path's ids equal the full path's, every repeat) passes."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "loadtests"))

import chat_prompt_probe  # noqa: E402


def test_probe_times_render_tokenize_and_the_cached_tail(capsys):
    assert chat_prompt_probe.main(["--history-lens", "300", "--repeats", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["demo", "qwen-style"]
    assert all(len(row) == 9 and int(row[1]) >= 300 for row in rows)  # no "cache off" note
