"""Structured-output parts without a model: the spec, the proto round trip, xgrammar compiling
against the demo tokenizer, and the batched bitmask in the sampler (mixed rows) against a
direct computation."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from splitserve.shared.grammar import (
    BitmaskBuilder, GrammarCompiler, GrammarError, RequestGrammar, apply_bitmask, bitmask_width)
from splitserve.shared.protocol import convert
from splitserve.shared.sampler import Sampler, SamplingInput
from splitserve.shared.sampling_params import SamplingParams
from splitserve.shared.structured_outputs import StructuredOutputsParams as Spec

VOCAB = 4096  # the demo checkpoint's


@pytest.fixture(scope="module")
def compiler(demo_checkpoint_dir):
    c = GrammarCompiler(demo_checkpoint_dir, VOCAB)
    yield c
    c.close()


def test_spec_needs_exactly_one_kind_of_the_right_type() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Spec()
    with pytest.raises(ValueError, match="exactly one.*json, regex"):
        Spec(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="not valid JSON"):
        Spec(json="{nope")
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        Spec(choice=[])
    with pytest.raises(ValueError, match="json_object must be true"):
        Spec(json_object="yes")
    assert Spec(json='{"b": 1, "a": 2}').key() == Spec(json={"a": 2, "b": 1}).key()


@pytest.mark.parametrize("spec", [Spec(json={"type": "object", "properties": {"a": {"type": "integer"}}}),
                                  Spec(regex="[a-z]+"), Spec(choice=["yes", 'no "way"']),
                                  Spec(grammar='root ::= "x" | "y"'), Spec(json_object=True)])
def test_spec_crosses_the_proto_unchanged(spec: Spec) -> None:
    msg = convert.sampling_params_to_proto(SamplingParams(structured_outputs=spec))
    back = convert.sampling_params_from_proto(msg).structured_outputs
    assert back.kind == spec.kind and back.key() == spec.key()
    assert convert.sampling_params_from_proto(convert.sampling_params_to_proto(SamplingParams())).structured_outputs is None


@pytest.mark.parametrize("spec, message", [
    (Spec(json={"type": "foo"}), 'invalid structured_outputs.json: Unsupported type "foo"'),
    (Spec(regex="(ab"), "invalid structured_outputs.regex: Regex parsing error at position 4: The parenthesis is not closed"),
    (Spec(grammar="root ::= missing"), 'invalid structured_outputs.grammar: EBNF parser error at line 1, column 10: Rule "missing"'),
])
def test_a_spec_that_does_not_compile_names_the_problem(compiler, spec, message) -> None:
    with pytest.raises(GrammarError) as err:
        compiler.submit(spec).result(timeout=60)
    assert str(err.value).startswith(message), str(err.value)
    assert "/project/" not in str(err.value)  # xgrammar's source location is dropped


def test_compiled_once_per_spec(compiler) -> None:
    first = compiler.submit(Spec(regex="[0-9]+"))
    assert compiler.submit(Spec(regex="[0-9]+")) is first
    assert compiler.submit(Spec(regex="[0-9]*")) is not first


def test_compiling_runs_off_the_calling_thread(compiler) -> None:
    release = threading.Event()
    blocker = compiler._pool.submit(release.wait)  # occupy the compile thread with real work
    future = compiler.submit(Spec(regex="never-before-seen-[0-9]+"))
    assert not future.done()  # submit returned without compiling
    release.set()
    blocker.result(timeout=10)
    assert future.result(timeout=60) is not None


def _text_tokens(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_choice_matcher_accepts_exactly_the_choices(compiler, demo_checkpoint_dir) -> None:
    from splitserve.shared.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(demo_checkpoint_dir)
    compiled = compiler.submit(Spec(choice=["yes", 'no "way"'])).result(timeout=60)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    grammar = RequestGrammar(compiled, [eos], _text_tokens(tokenizer, 'no "way"'))
    assert not grammar.terminated and grammar.accept(eos) and grammar.terminated
    with pytest.raises(GrammarError):
        RequestGrammar(compiled, [eos], _text_tokens(tokenizer, "maybe"))
    without_stop = RequestGrammar(compiled, [], _text_tokens(tokenizer, "yes"))
    assert without_stop.terminated  # no stop token (ignore_eos): complete means done


def _direct_mask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Bit t of row i clear -> token t forbidden, in the listed rows only; computed token by token."""
    out = logits.clone()
    for i in rows:
        for t in range(logits.shape[1]):
            if not (int(bitmask[i, t // 32]) >> (t % 32)) & 1:
                out[i, t] = float("-inf")
    return out


def test_apply_bitmask_masks_only_the_rows_with_a_grammar() -> None:
    torch.manual_seed(0)
    num_rows, vocab = 5, 70  # not a multiple of 32: the last word is partly past the vocabulary
    logits = torch.randn(num_rows, vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (num_rows, bitmask_width(vocab)), dtype=torch.int32)
    rows = [0, 2, 3]
    expected = _direct_mask(logits, bitmask, rows)
    apply_bitmask(logits, bitmask, rows)
    assert torch.equal(logits, expected)


def test_sampler_with_mixed_rows(compiler, demo_checkpoint_dir) -> None:
    """Grammar rows only ever sample allowed tokens; rows without one sample as if alone."""
    torch.manual_seed(1)
    compiled = compiler.submit(Spec(regex="[0-9]{2}")).result(timeout=60)
    grammars = [RequestGrammar(compiled, [1]), None, RequestGrammar(compiled, [1]), None]
    built = BitmaskBuilder(VOCAB, pin_memory=False).build(grammars)
    assert built is not None and built[1] == [0, 2]
    bitmask, rows = built
    assert (bitmask[[1, 3]] == -1).all()  # rows without a grammar stay all-allowed
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0, seed=7)]
    inputs = [SamplingInput(p, [0], [], torch.Generator().manual_seed(p.seed) if p.seed else None) for p in params]
    unconstrained = Sampler()(logits.clone(), inputs).token_ids
    inputs = [SamplingInput(p, [0], [], torch.Generator().manual_seed(p.seed) if p.seed else None) for p in params]
    constrained = Sampler()(logits.clone(), inputs, built).token_ids
    allowed = _direct_mask(logits, bitmask, rows)
    for i in rows:
        assert allowed[i, constrained[i]] > float("-inf")
    assert constrained[0] == int(allowed[0].argmax())
    assert [constrained[1], constrained[3]] == [unconstrained[1], unconstrained[3]]
    assert BitmaskBuilder(VOCAB, pin_memory=False).build([None, None]) is None


def test_min_tokens_does_not_fight_the_grammar(compiler) -> None:
    """With a grammar, min_tokens does not ban EOS: the grammar decides where the output ends."""
    compiled = compiler.submit(Spec(choice=["a"])).result(timeout=60)
    grammar = RequestGrammar(compiled, [1])
    tokens = []
    logits = torch.zeros(1, VOCAB)
    params = SamplingParams(temperature=0.0, min_tokens=5, structured_outputs=Spec(choice=["a"]))
    for _ in range(4):
        built = BitmaskBuilder(VOCAB, pin_memory=False).build([grammar])
        if built is None:
            break
        token = Sampler()(logits.clone(), [SamplingInput(params, [0], tokens, None, frozenset({1}))], built).token_ids[0]
        assert grammar.accept(token)
        tokens.append(token)
    assert tokens[-1] == 1 and grammar.terminated and len(tokens) < 5


def test_error_text_has_no_timestamp() -> None:
    from splitserve.shared.grammar import _clean

    assert _clean(RuntimeError("[09:34:29] /project/cpp/x.cc:94: Regex parsing error")) == "Regex parsing error"
    assert re.match("Failed", _clean(RuntimeError("[1:2:3] /a/b.cc:1: Check failed: (e) is false: Failed to parse")))


def test_length_bounded_json_strings_reject_control_characters(compiler, demo_checkpoint_dir) -> None:
    """xgrammar 0.2.9 lets raw control characters into strings with maxLength; JSON does not."""
    import xgrammar as xgr

    compiled = compiler.submit(Spec(json={"type": "string", "maxLength": 4})).result(timeout=60)
    for text, ok in [('"ab"', True), ('"a\x06"', False), ('"abcde"', False)]:
        matcher = xgr.GrammarMatcher(compiled)
        assert (matcher.accept_string(text) and matcher.is_completed()) is ok, text
