"""The grammar pool (shared/grammar_fill.py) against the sequential inline path, with real xgrammar
matchers on the demo tokenizer: every pool size, uneven slices, rows that end or refuse their token
mid-step, empty steps, close() while slices run, and a failing slice surfacing on the step loop."""

from __future__ import annotations

import random

import pytest
import torch
import xgrammar as xgr

from splitserve.shared.grammar import GrammarCompiler, RequestGrammar, apply_bitmask, bitmask_width
from splitserve.shared.grammar_fill import BitmaskFiller, accept_tokens, live_rows
from splitserve.shared.structured_outputs import StructuredOutputsParams as Spec

VOCAB = 4096  # the demo checkpoint's
EOS = 1
SPECS = [Spec(json={"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
                    "required": ["name", "n"], "additionalProperties": False}),
         Spec(regex="[0-9]{1,3}-[a-z]{1,2}"), Spec(choice=["alpha", "beta", "gamma"]), Spec(json_object=True)]


@pytest.fixture(scope="module")
def compiled(demo_checkpoint_dir):
    compiler = GrammarCompiler(demo_checkpoint_dir, VOCAB)
    yield [compiler.submit(spec).result(timeout=120) for spec in SPECS]
    compiler.close()


def _mask_of(grammar: RequestGrammar) -> torch.Tensor:
    bitmask = torch.zeros(1, bitmask_width(VOCAB), dtype=torch.int32)
    grammar.fill(bitmask, 0)
    return bitmask


def _allowed(grammar: RequestGrammar, rng: random.Random, allowed: bool = True) -> int:
    """A token the grammar's mask allows (or forbids), drawn with `rng`."""
    bits = ((_mask_of(grammar)[0].unsqueeze(1) >> torch.arange(32)) & 1).flatten()[:VOCAB]
    return rng.choice((bits == int(allowed)).nonzero().flatten().tolist())


def _history(compiled, rng: random.Random) -> tuple[int, list[int], list[int]]:
    """(grammar kind, stop tokens, tokens so far): a grammar part-way through, drawn under its mask."""
    kind, stops = rng.randrange(len(compiled)), [EOS] if rng.random() < 0.8 else []
    grammar, tokens = RequestGrammar(compiled[kind], stops), []
    for _ in range(rng.randrange(4)):
        if grammar.terminated:
            break
        token = _allowed(grammar, rng)
        if token == EOS:
            break
        assert grammar.accept(token)
        tokens.append(token)
    return kind, stops, tokens


def _step_tokens(grammar: RequestGrammar, rng: random.Random) -> int:
    """The token a step gives a row: mostly allowed ones, the stop token where allowed (the row
    ends mid-step), sometimes forbidden ones and refused stop tokens (masking bugs)."""
    draw = rng.random()
    if draw < 0.1:
        return _allowed(grammar, rng, allowed=False)
    if draw < 0.3 and grammar.stop_token_ids:
        return EOS  # accepted where the grammar may end, refused otherwise
    return _allowed(grammar, rng)


def _case(compiled, seed: int, num_rows: int = 23):
    """Two identical sets of rows (pool, inline): grammars in varied states, rows without one,
    terminated rows, grammars that take a token but have no row this step; and the step's tokens."""
    rng = random.Random(seed)
    histories = [None if rng.random() < 0.15 else _history(compiled, rng) for _ in range(num_rows + 3)]

    def build():
        return [None if h is None else RequestGrammar(compiled[h[0]], h[1], h[2]) for h in histories]
    pool_side, inline_side = build(), build()
    done = RequestGrammar(compiled[2], [EOS], [*_alpha_tokens(compiled[2]), EOS])  # terminated already
    pool_side[1], inline_side[1] = done, RequestGrammar(compiled[2], [EOS], [*_alpha_tokens(compiled[2]), EOS])
    token_rows = [i for i, g in enumerate(inline_side) if g is not None and not g.terminated and rng.random() < 0.85]
    tokens = {i: _step_tokens(inline_side[i], rng) for i in token_rows}
    # the last three take a token only: their requests have no row in this step
    return pool_side, inline_side, tokens, num_rows


def _alpha_tokens(compiled_choice) -> list[int]:
    grammar, tokens, rng = RequestGrammar(compiled_choice, [EOS]), [], random.Random(7)
    while True:
        bits = _mask_of(grammar)[0]
        if (int(bits[0]) >> EOS) & 1:
            return tokens
        token = _allowed(grammar, rng)
        assert grammar.accept(token)
        tokens.append(token)


def _inline_step(grammars, tokens: dict[int, int], num_rows: int):
    """The sequential reference: accept each token, then fill each live row alone."""
    accepted = accept_tokens([(grammars[i], t) for i, t in tokens.items()])
    rows = live_rows(grammars[:num_rows])
    bitmask = torch.zeros(num_rows, bitmask_width(VOCAB), dtype=torch.int32)
    for i in rows:
        grammars[i].fill(bitmask, i)
    return accepted, rows, bitmask


@pytest.mark.parametrize("num_threads", [1, 2, 3])
def test_pool_gives_the_inline_accepts_and_bitmask(compiled, num_threads) -> None:
    """Over several steps of varied rows, the pool's accept results, `terminated` flags, rows and
    bitmask equal accepting and filling each matcher alone, in order, on one thread."""
    filler = BitmaskFiller(VOCAB, torch.device("cpu"), num_threads)
    ended = ended_unseen = refused = 0
    for seed in range(4):
        pool_side, inline_side, tokens, num_rows = _case(compiled, 100 * num_threads + seed)
        expected_accepted, expected_rows, expected = _inline_step(inline_side, tokens, num_rows)
        fill = filler.start([(pool_side[i], t) for i, t in tokens.items()], pool_side[:num_rows])
        assert fill.wait_accepted() == expected_accepted
        ended_flags = [[g is not None and g.terminated for g in side] for side in (pool_side, inline_side)]
        assert ended_flags[0] == ended_flags[1]
        bitmask, rows = fill.result()
        assert rows.tolist() == expected_rows and torch.equal(bitmask[expected_rows], expected[expected_rows])
        ended += sum(inline_side[i].terminated for i in tokens)
        ended_unseen += sum(inline_side[i].terminated and not inline_side[i].stop_token_ids for i in tokens)
        refused += expected_accepted.count(False)
    filler.close()
    assert ended and ended_unseen and refused  # the cases did cover rows ending and refusing mid-step


def test_uneven_slices_split_the_rows_by_count(compiled) -> None:
    """7 live rows over 3 threads: slices of 3, 2 and 2 contiguous rows, each grammar's accept in
    the slice that fills it; a token without a row joins a slice of its own turn."""
    grammars = [RequestGrammar(compiled[1], [EOS]) for _ in range(8)]
    filler = BitmaskFiller(VOCAB, torch.device("cpu"), 3)
    digit = _allowed(grammars[0], random.Random(1))
    fill = filler.start([(g, digit) for g in grammars], grammars[:7])
    assert [part.fill_rows for part in fill.slices] == [[0, 1, 2], [3, 4], [5, 6]]
    assert [part.token_positions for part in fill.slices] == [[0, 1, 2], [3, 4, 7], [5, 6]]
    assert fill.wait_accepted() == [True] * 8 and fill.result()[1].tolist() == list(range(7))
    filler.close()


def test_empty_steps(compiled) -> None:
    """No token and no row; tokens only; rows that all ended: nothing to mask, nothing hangs."""
    filler = BitmaskFiller(VOCAB, torch.device("cpu"), 2)
    fill = filler.start([], [])
    assert fill.wait_accepted() == [] and fill.result() is None and fill.slices == []
    fill = filler.start([], [None, None])
    assert fill.result() is None and filler.build([None]) is None
    assert filler._pool == []  # no thread started for steps without a grammar
    grammar = RequestGrammar(compiled[2], [EOS], _alpha_tokens(compiled[2]))
    fill = filler.start([(grammar, EOS)], [grammar, None])
    assert fill.wait_accepted() == [True] and grammar.terminated and fill.result() is None
    assert filler.build([grammar]) is None
    filler.close()


def test_close_with_slices_in_flight_then_start_again(compiled) -> None:
    """close() right after start: each thread ends the slice it holds, then stops; the step's
    result is still whole, and the next start brings a new pool up."""
    grammars = [RequestGrammar(compiled[0], [EOS]) for _ in range(12)]
    reference = BitmaskFiller(VOCAB, torch.device("cpu"), 1)
    expected, rows = (t.clone() for t in reference.build(grammars))
    reference.close()
    filler = BitmaskFiller(VOCAB, torch.device("cpu"), 3)
    fill = filler.start([], grammars)
    threads = list(filler._pool)
    filler.close()
    assert not any(thread.is_alive() for thread in threads)
    bitmask, filled = fill.result()
    assert torch.equal(bitmask, expected) and torch.equal(filled, rows)
    bitmask, filled = filler.start([], grammars).result()
    assert torch.equal(bitmask, expected) and filler._pool and filler._pool[0] is not threads[0]
    filler.close()


def test_a_failing_slice_raises_on_the_step_loop_and_the_pool_goes_on(compiled) -> None:
    """A fill that fails in one slice (a matcher of a larger vocabulary than the bitmask) comes
    back from result(); a failing accept (a token that is not an int) from wait_accepted; the
    other slices end, and the next step runs on the same threads."""
    wide = xgr.TokenizerInfo([f"t{i}" for i in range(VOCAB + 64)])
    alien = RequestGrammar(xgr.GrammarCompiler(wide).compile_regex("t1+"), [])
    grammars = [RequestGrammar(compiled[1], [EOS]) for _ in range(5)]
    filler = BitmaskFiller(VOCAB, torch.device("cpu"), 3)
    with pytest.raises(RuntimeError, match="bitmask"):
        filler.start([], [*grammars, alien]).result()
    threads = list(filler._pool)
    with pytest.raises(TypeError):
        filler.start([(grammars[0], "not a token")], grammars).wait_accepted()
    digit = _allowed(grammars[0], random.Random(2))
    fill = filler.start([(g, digit) for g in grammars], grammars)
    bitmask, rows = fill.result()
    assert fill.wait_accepted() == [True] * 5 and rows.tolist() == list(range(5)) and filler._pool == threads
    logits = torch.zeros(5, VOCAB)
    apply_bitmask(logits, bitmask, rows)
    assert all(grammars[i].accept(int(logits[i].argmax())) for i in range(5))
    filler.close()


def _repeat_step(filler, pool_side, inline_side, tokens: dict[int, int]):
    """One step on both sides, compared: accepts, `terminated` flags, rows and bitmask."""
    expected_accepted, expected_rows, expected = _inline_step(inline_side, tokens, len(inline_side))
    fill = filler.start([(pool_side[i], t) for i, t in tokens.items()], pool_side)
    assert fill.wait_accepted() == expected_accepted
    assert [g.terminated for g in pool_side] == [g.terminated for g in inline_side]
    result = fill.result()
    if not expected_rows:
        assert result is None
        return fill
    bitmask, rows = result
    assert rows.tolist() == expected_rows
    assert torch.equal(bitmask[expected_rows], expected[expected_rows])
    return fill


@pytest.mark.parametrize("num_threads", [1, 3])
def test_a_repeating_batch_reuses_its_plan_and_still_gives_the_inline_results(compiled, num_threads) -> None:
    """Steady decode: the same grammars step after step reuse one StepPlan; a step holding a stop
    token, a refused token, a grammar that ends unseen (no stop tokens) or a changed batch is still
    exactly the inline path, and only a repeat of the plan's batch without stop tokens reuses it."""
    rng = random.Random(num_threads)
    kinds = [rng.randrange(len(compiled)) for _ in range(11)]
    stops = [[] if i == 4 else [EOS] for i in range(11)]  # row 4 ends unseen when complete
    pool_side = [RequestGrammar(compiled[k], s) for k, s in zip(kinds, stops)]
    inline_side = [RequestGrammar(compiled[k], s) for k, s in zip(kinds, stops)]
    filler = BitmaskFiller(VOCAB, torch.device("cpu"), num_threads)
    reused = planless = 0
    previous = None
    for step in range(12):
        live = [i for i, g in enumerate(inline_side) if not g.terminated]
        tokens = {i: _allowed(inline_side[i], rng) for i in live}
        if step == 5:
            tokens[live[0]] = _allowed(inline_side[live[0]], rng, allowed=False)  # refused: no stop token
        fill = _repeat_step(filler, pool_side, inline_side, tokens)
        stopped = any(t == EOS for t in tokens.values())
        if stopped:
            assert fill.plan is None
            planless += 1
        elif previous is not None and previous is fill.plan:
            reused += 1
        previous = fill.plan
    assert reused >= 3 and filler._plan is not None
    swapped = list(pool_side)
    swapped[0] = RequestGrammar(compiled[kinds[0]], [EOS])  # a new matcher in the same row: a new plan
    inline_side[0] = RequestGrammar(compiled[kinds[0]], [EOS])
    before = filler._plan
    fill = _repeat_step(filler, swapped, inline_side, {0: _allowed(inline_side[0], rng)})
    assert fill.plan is not before
    filler.close()


def test_synchronous_steps_replan_when_a_grammar_ends_unseen(compiled) -> None:
    """Synchronous steps accept on the step loop and then build the bitmask of the same grammars: a
    grammar without stop tokens that completes between two builds (its request goes on, ignore_eos)
    must leave the rows though the batch is the same, so the plan is keyed on liveness too."""
    choice = compiled[2]
    grammars = [RequestGrammar(choice, []), RequestGrammar(compiled[0], [EOS])]
    filler = BitmaskFiller(VOCAB, torch.device("cpu"), 1)
    assert filler.build(grammars)[1].tolist() == [0, 1]
    alpha = _alpha_tokens(choice)
    for token in alpha:  # the choice grammar completes: terminated, no stop token needed
        assert filler.accept([(grammars[0], token)]) == [True]
    assert grammars[0].terminated
    assert filler.build(grammars)[1].tolist() == [1]
    filler.close()
