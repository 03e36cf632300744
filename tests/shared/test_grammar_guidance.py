"""The llguidance backend (`--structured-outputs-backend guidance`, shared/grammar_guidance.py) with
real llguidance matchers on the demo tokenizer: its masks against xgrammar's, its step filler
against accepting and filling each matcher alone, the gateway's tool-call tag, and refusals."""

from __future__ import annotations

import json
import random

import pytest
import torch

from splitserve.shared.config import ConfigError, SchedulerConfig
from splitserve.shared.config_flags import add_engine_flags, engine_config_from_args
from splitserve.shared.grammar import GrammarCompiler, GrammarError, bitmask_width
from splitserve.shared.grammar_fill import live_rows, make_filler
from splitserve.shared.grammar_guidance import GuidanceFiller
from splitserve.shared.structured_outputs import StructuredOutputsParams as Spec

VOCAB = 4096  # the demo checkpoint's
EOS = 1
SPECS = [Spec(json={"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                    "required": ["name", "n"], "additionalProperties": False}),
         Spec(regex="[0-9]{1,3}-[a-z]{1,2}"), Spec(choice=["alpha", "beta", "gamma"]), Spec(json_object=True),
         Spec(grammar='root ::= "x" [0-9]+ ("," [0-9]+)*')]


@pytest.fixture(scope="module")
def compilers(demo_checkpoint_dir):
    made = {name: GrammarCompiler(demo_checkpoint_dir, VOCAB, backend=name, eos_token_ids=[EOS])
            for name in ("guidance", "xgrammar")}
    yield made
    for compiler in made.values():
        compiler.close()


def _grammar(compilers, spec: Spec, stops=(EOS,), tokens=(), backend: str = "guidance"):
    compiler = compilers[backend]
    return compiler.request_grammar(compiler.submit(spec).result(timeout=120), list(stops), list(tokens))


def _allowed(grammar) -> list[int]:
    bitmask = torch.zeros(1, bitmask_width(VOCAB), dtype=torch.int32)
    grammar.fill(bitmask, 0)
    bits = ((bitmask[0].unsqueeze(1) >> torch.arange(32)) & 1).flatten()[:VOCAB]
    return bits.nonzero().flatten().tolist()


@pytest.mark.parametrize("spec", SPECS[:3], ids=["json", "regex", "choice"])
def test_the_mask_has_xgrammars_bit_layout(compilers, spec) -> None:
    """Along a walk, every token llguidance's mask allows is one xgrammar's allows (llguidance
    may leave out some non-canonical splits of a literal): the sampler's one mask kernel reads
    either. The first masks are equal."""
    pair, rng = [_grammar(compilers, spec, backend=b) for b in ("guidance", "xgrammar")], random.Random(3)
    assert _allowed(pair[0]) == _allowed(pair[1])
    for _ in range(12):
        ours, theirs = (_allowed(g) for g in pair)
        assert ours and set(ours) <= set(theirs)
        if ours == [EOS]:
            break
        token = rng.choice([t for t in ours if t != EOS])
        assert all(g.accept(token) for g in pair)


def _walk(grammar, rng: random.Random, steps: int) -> list[int]:
    tokens = []
    for _ in range(steps):
        allowed = _allowed(grammar)
        if grammar.terminated or allowed == [EOS]:
            break
        token = rng.choice([t for t in allowed if t != EOS] or allowed)
        assert grammar.accept(token)
        tokens.append(token)
    return tokens


@pytest.mark.parametrize("num_threads", [1, 2])
def test_the_filler_gives_the_accepts_and_masks_of_each_matcher_alone(compilers, num_threads) -> None:
    """Rows in varied states (some without a grammar, some ending on their stop token, some
    ignore_eos); the filler's accepts, `terminated` and bitmask equal the one-at-a-time path."""
    rng, filler = random.Random(num_threads), make_filler("guidance", VOCAB, torch.device("cpu"), num_threads)
    assert isinstance(filler, GuidanceFiller)
    for _ in range(3):
        specs = [None if rng.random() < 0.15 else SPECS[rng.randrange(len(SPECS))] for _ in range(12)]
        stops = [[] if rng.random() < 0.2 else [EOS] for _ in specs]
        histories = [None if s is None else _walk(_grammar(compilers, s, st), rng, rng.randrange(4))
                     for s, st in zip(specs, stops)]

        def build():
            return [None if s is None else _grammar(compilers, s, st, h) for s, st, h in zip(specs, stops, histories)]
        ours, alone = build(), build()
        live = [i for i in live_rows(alone) if rng.random() < 0.9]
        tokens = {i: EOS if EOS in _allowed(alone[i]) and rng.random() < 0.5 else rng.choice(_allowed(alone[i]))
                  for i in live}
        expected = [alone[i].accept(t) for i, t in tokens.items()]
        rows = live_rows(alone)
        mask = torch.zeros(len(alone), bitmask_width(VOCAB), dtype=torch.int32)
        for i in rows:
            alone[i].fill(mask, i)
        fill = filler.start([(ours[i], t) for i, t in tokens.items()], ours)
        assert fill.wait_accepted() == expected
        bitmask, got_rows = fill.result()
        assert [g is not None and g.terminated for g in ours] == [g is not None and g.terminated for g in alone]
        assert got_rows.tolist() == rows and torch.equal(bitmask[rows], mask[rows])
    filler.close()


def test_the_gateways_tool_call_tag_compiles_and_other_forms_are_refused(compilers) -> None:
    from splitserve.services.gateway.chat_tools import strict_calls_spec
    from splitserve.services.gateway.tool_parsers import TOOL_PARSERS

    tools = [{"type": "function", "function": {"name": "add", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}}}]
    spec = strict_calls_spec(tools, TOOL_PARSERS["hermes"], None)
    grammar = _grammar(compilers, spec)
    assert len(_allowed(grammar)) > VOCAB // 2  # free text before the trigger
    single = json.loads(spec.structural_tag)
    single["format"]["stop_after_first"] = True
    with pytest.raises(GrammarError, match="needs --structured-outputs-backend xgrammar"):
        compilers["guidance"].submit(Spec(structural_tag=json.dumps(single))).result(timeout=120)


@pytest.mark.parametrize("spec, message", [
    (Spec(json={"type": "nope"}), "invalid structured_outputs.json"),
    (Spec(regex="(unclosed"), "invalid structured_outputs.regex"),
    (Spec(grammar="root ::= ("), "invalid structured_outputs.grammar")])
def test_a_spec_that_does_not_compile_names_the_problem(compilers, spec, message) -> None:
    with pytest.raises(GrammarError, match=message):
        compilers["guidance"].submit(spec).result(timeout=120)


def test_backend_flag_and_its_values() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    args = parser.parse_args(["--model", "demo", "--structured-outputs-backend", "guidance"])
    assert engine_config_from_args(args).scheduler.structured_outputs_backend == "guidance"
    with pytest.raises(ConfigError, match="structured_outputs_backend must be one of xgrammar, guidance"):
        SchedulerConfig(structured_outputs_backend="outlines").validate()
