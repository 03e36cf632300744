"""CLI flags generated from the config dataclasses: one config system, no hand-written duplicates.

Every field of `ModelConfig`, `CacheConfig`, `SchedulerConfig` and `ParallelConfig` becomes
`--field-name` (plus vLLM's short `-tp` for `--tensor-parallel-size`), with the field's docstring as
help (read from the source), and `engine_config_from_args` builds the
frozen `EngineConfig` back from the parsed namespace.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import types
import typing
from dataclasses import MISSING, fields

from splitserve.shared.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig

_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "parallel": ParallelConfig}

SHORT_FLAGS = {"--tensor-parallel-size": "-tp"}
"""vLLM's short spellings of a few engine flags."""


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
    """`int | None` -> int; other annotations (including `tuple[str, ...]`) as they are."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)][0]
    return annotation


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, prefix: str = "",
                        skip: tuple[str, ...] = ()) -> None:
    """One `--<prefix>field-name` flag per dataclass field; tuples of str are given comma-separated."""
    group = parser.add_argument_group(title)
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        dest = prefix + f.name
        flag = "--" + dest.replace("_", "-")
        names = [flag, *([SHORT_FLAGS[flag]] if flag in SHORT_FLAGS else [])]
        kind = _parse_type(hints[f.name])
        default = f.default if f.default is not MISSING else None
        if kind is bool:
            group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                               help=docs.get(f.name))
        elif typing.get_origin(kind) is tuple:
            group.add_argument(flag, dest=dest, type=_comma_list, default=default, help=docs.get(f.name))
        else:
            group.add_argument(*names, dest=dest, type=kind, default=default, help=docs.get(f.name))


def dataclass_from_args(cls, args: argparse.Namespace, prefix: str = "", **overrides):
    values = {f.name: getattr(args, prefix + f.name) for f in fields(cls) if hasattr(args, prefix + f.name)}
    values.update(overrides)
    return cls(**values)


def dataclass_flags_to_argv(cls, args: argparse.Namespace, prefix: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """The flags that reproduce `args`' non-default values of `cls` (to pass them to a child process)."""
    argv = []
    for f in fields(cls):
        if f.name in skip:
            continue
        value = getattr(args, prefix + f.name, None)
        if f.default is not MISSING and value == f.default:
            continue
        flag = "--" + (prefix + f.name).replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple):
            argv += [flag, ",".join(value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    for section, cls in _SECTIONS.items():
        add_dataclass_flags(parser, cls, f"{section} options")


def engine_flags_to_argv(args: argparse.Namespace) -> list[str]:
    return [flag for cls in _SECTIONS.values() for flag in dataclass_flags_to_argv(cls, args)]


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    config = EngineConfig(**{section: dataclass_from_args(cls, args) for section, cls in _SECTIONS.items()})
    config.validate()
    return config
