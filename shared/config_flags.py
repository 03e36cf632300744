"""CLI flags generated from the config dataclasses: one config system, no hand-written duplicates.

Every field of `ModelConfig`, `CacheConfig` and `SchedulerConfig` becomes `--field-name`, with the
field's docstring as help (read from the source), and `engine_config_from_args` builds the
frozen `EngineConfig` back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import typing
from dataclasses import MISSING, fields

from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}


def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal after each field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _parse_type(annotation):
    hints = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return hints[0]


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    for section, cls in _SECTIONS.items():
        group = parser.add_argument_group(f"{section} options")
        docs = _field_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = _parse_type(hints[f.name])
            default = f.default if f.default is not MISSING else None
            if kind is bool:
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                   help=docs.get(f.name))
            else:
                group.add_argument(flag, dest=f.name, type=kind, default=default, help=docs.get(f.name))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    parts = {section: cls(**{f.name: getattr(args, f.name) for f in fields(cls)}) for section, cls in _SECTIONS.items()}
    config = EngineConfig(**parts)
    config.validate()
    return config
