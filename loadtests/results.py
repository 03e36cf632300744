"""A bench script's result, written as JSON where `--result-json` says (the GPU suite collects them)."""

from __future__ import annotations

import argparse
import json


def add_result_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--result-json", default=None, help="write the result to this file as JSON")


def write_result_json(path: str | None, result: dict) -> None:
    """Write `result` to `path` (nothing when no path was given)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
