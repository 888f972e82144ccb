"""Grammar-constrained generation through the real engine, tokenizer and llguidance.

The model is llama2.c's stories260K (a real byte-fallback SentencePiece tokenizer of 512
tokens, so any text is reachable); sampled at temperature 1, every output must still be valid.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from dendrite.engine import Branch, Engine
from dendrite.errors import GrammarError
from dendrite.grammar import Grammar, GrammarMatcher, fill_masks, grammar_timings
from dendrite.grammar_base import BranchConstraint
from dendrite.sampling import SamplingParams

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "data" / "schemas" / "character.schema.json"
DASH_CODE = r"[0-9]{3}-[a-z]{2,4}"
ARITHMETIC = r"""
start: term OP term "=" NUMBER
term: NUMBER | "(" NUMBER OP NUMBER ")"
OP: "+" | "-" | "*" | "/"
NUMBER: /[1-9][0-9]?/
"""
_N = r"[1-9][0-9]?"
_TERM = rf"(?:{_N}|\({_N}[-+*/]{_N}\))"
ARITHMETIC_RE = re.compile(rf"{_TERM}[-+*/]{_TERM}={_N}")
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=160)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: the model is tiny, and on a busy shared CPU torch's threads stall
    each other for milliseconds per op (a 25-branch JSON batch: 1.5 s vs 37 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return dict(json.loads(SCHEMA_PATH.read_text()))


@pytest.fixture
def engine(stories: Path) -> Engine:
    return Engine.from_pretrained(stories)


def _run(engine: Engine, grammar: Grammar, n: int, seed: int = 0) -> list[Branch]:
    branches = [
        engine.add("", SAMPLED, seed=seed + i, constraint=grammar.matcher()) for i in range(n)
    ]
    engine.run(branches)
    return branches


def _ids(engine: Engine, pieces: str) -> list[int]:
    """One token per character (the stories vocabulary has every digit and letter)."""
    assert engine.tokenizer is not None
    ids = [int(engine.tokenizer.hf.convert_tokens_to_ids(c)) for c in pieces]
    assert 0 not in ids  # no <unk>
    return ids


def _mask(m: BranchConstraint | None, vocab: int = 512) -> torch.Tensor:
    return fill_masks([m], vocab)[0]


def test_json_schema_100_sampled_generations_are_valid(
    engine: Engine, schema: dict[str, Any]
) -> None:
    assert engine.tokenizer is not None
    grammar = Grammar.json_schema(schema, engine.tokenizer)
    texts: list[str] = []
    for batch in range(4):
        branches = _run(engine, grammar, 25, seed=100 * batch)
        for b in branches:
            assert b.finish_reason in ("grammar", "eos"), engine.result(b)
            assert b.constraint is not None and b.constraint.is_accepting()
            text = engine.text(b)
            assert text is not None
            # the text the grammar saw is the text the tokenizer decodes
            eos = set(engine.eos_token_ids)
            seen = grammar.llg_tokenizer.decode_str(
                [t for t in engine.output_ids(b) if t not in eos]
            )
            assert text == seen
            jsonschema.validate(json.loads(text), schema)
            texts.append(text)
            engine.free(b)
        engine.check_integrity()
    assert len(texts) == 100
    assert len(set(texts)) > 90  # the seeds really sample different outputs
    assert engine.stats().used_pages == 0
    assert grammar.stats.mask_calls > 0 and grammar.stats.tokens >= 100


def test_regex_generations_match(engine: Engine) -> None:
    assert engine.tokenizer is not None
    grammar = Grammar.regex(DASH_CODE, engine.tokenizer)
    branches = _run(engine, grammar, 20)
    for b in branches:
        text = engine.text(b)
        assert text is not None and re.fullmatch(DASH_CODE, text), text
        assert b.finish_reason in ("grammar", "eos")
    engine.check_integrity()


def test_lark_generations_match(engine: Engine) -> None:
    assert engine.tokenizer is not None
    grammar = Grammar.lark(ARITHMETIC, engine.tokenizer)
    branches = _run(engine, grammar, 20)
    texts = [engine.text(b) for b in branches]
    for b, text in zip(branches, texts, strict=True):
        assert text is not None and ARITHMETIC_RE.fullmatch(text), text
        assert b.finish_reason in ("grammar", "eos")
    assert any("(" in t for t in texts if t)  # both kinds of term occur
    engine.check_integrity()


def test_forked_branches_continue_validly_and_independently(
    engine: Engine, schema: dict[str, Any]
) -> None:
    assert engine.tokenizer is not None
    grammar = Grammar.json_schema(schema, engine.tokenizer)
    root = engine.add("", SAMPLED, seed=7, constraint=grammar.matcher())
    for _ in range(12):
        engine.step([root])
    assert not root.finished
    prefix = engine.output_ids(root)
    forks_before = grammar.stats.forks
    children = [engine.fork(root) for _ in range(4)]
    assert grammar.stats.forks == forks_before + 4
    matchers = [root.constraint, *(c.constraint for c in children)]
    assert all(isinstance(m, GrammarMatcher) for m in matchers)
    assert len({id(m) for m in matchers}) == 5
    assert len({id(m.ll) for m in matchers if isinstance(m, GrammarMatcher)}) == 5

    # advancing the parent leaves every child's matcher where it was
    child_masks = [_mask(c.constraint) for c in children]
    for _ in range(5):
        engine.step([root])
    assert engine.output_ids(root)[:12] == prefix
    for c, before in zip(children, child_masks, strict=True):
        assert torch.equal(_mask(c.constraint), before)
        assert engine.output_ids(c) == prefix

    engine.run([root, *children])
    outputs = []
    for b in [root, *children]:
        assert b.finish_reason in ("grammar", "eos")
        assert engine.output_ids(b)[:12] == prefix
        text = engine.text(b)
        assert text is not None
        jsonschema.validate(json.loads(text), schema)
        outputs.append(text)
    assert len(set(outputs)) > 1  # derived seeds: the forks really diverge
    engine.check_integrity()


def test_matcher_fork_is_a_separate_copy(engine: Engine) -> None:
    assert engine.tokenizer is not None
    grammar = Grammar.regex(DASH_CODE, engine.tokenizer)
    m = grammar.matcher()
    fresh = _mask(m)
    child = m.fork()
    m.consume(_ids(engine, "12"))
    assert torch.equal(_mask(child), fresh)
    child.consume(_ids(engine, "987-"))
    assert not torch.equal(_mask(child), _mask(m))
    m.consume(_ids(engine, "3-xy"))
    assert m.is_accepting() and not child.is_accepting()


@pytest.mark.parametrize(
    ("kind", "source", "message"),
    [
        ("regex", "[0-9", "unclosed character class"),
        ("regex", "(ab", "unclosed group"),
        ("json_schema", {"type": "nope"}, "nope"),
        ("json_schema", {"type": "integer", "minimum": "one"}, "'minimum'"),
        ("json_schema", "{not json", "not a JSON object"),
        ("lark", "start: foo", "unknown name"),
        ("lark", 'start: "a" (', "Expected token"),
    ],
)
def test_bad_grammar_raises_before_generation(
    engine: Engine, kind: str, source: Any, message: str
) -> None:
    assert engine.tokenizer is not None
    live = engine.add("Once", SamplingParams(max_new_tokens=3))
    stats, steps, branches = engine.stats(), engine.num_steps, dict(engine.branches)
    with pytest.raises(GrammarError, match=re.escape(message)):
        getattr(Grammar, kind)(source, engine.tokenizer)
    assert engine.stats() == stats and engine.num_steps == steps
    assert engine.branches == branches and live.pending == tuple(engine.encode("Once"))
    engine.check_integrity()


def test_extend_with_forbidden_tokens_changes_nothing(engine: Engine) -> None:
    assert engine.tokenizer is not None
    grammar = Grammar.regex(DASH_CODE, engine.tokenizer)
    b = engine.add("", SAMPLED, seed=3, constraint=grammar.matcher())
    pending, start = b.pending, _mask(b.constraint)
    eos = engine.eos_token_ids[0]
    for bad in (_ids(engine, "12a"), _ids(engine, "x"), [eos], _ids(engine, "123-ab5")):
        with pytest.raises(GrammarError, match="does not allow token"):
            engine.extend(b, bad)
        assert b.pending == pending and b.finish_reason is None
        assert torch.equal(_mask(b.constraint), start)
    # nothing of "12a" was consumed: "123" is still a valid start
    engine.extend(b, _ids(engine, "123"))
    assert b.pending == (*pending, *_ids(engine, "123"))
    engine.run([b])
    text = engine.text(b)
    assert text is not None and text.startswith("123-") and re.fullmatch(DASH_CODE, text)
    engine.check_integrity()


def test_eos_ends_an_accepted_match_and_finished_matchers_allow_only_eos(
    engine: Engine,
) -> None:
    assert engine.tokenizer is not None
    grammar = Grammar.regex(DASH_CODE, engine.tokenizer)
    eos = engine.eos_token_ids[0]
    m = grammar.matcher()
    with pytest.raises(GrammarError):
        m.consume([eos])  # not a match yet
    m.consume(_ids(engine, "123-ab"))
    assert m.is_accepting() and not m.is_finished()
    assert bool(_mask(m)[eos]) and bool(_mask(m)[_ids(engine, "c")[0]])
    m.consume([eos])
    assert m.is_finished() and m.is_accepting()
    m.consume([eos])  # more EOS after the end: nothing happens
    assert m.is_finished() and m.is_accepting() and not m.error
    with pytest.raises(GrammarError, match="stopped"):
        m.consume(_ids(engine, "c"))
    full = grammar.matcher()
    full.consume(_ids(engine, "123-abcd"))  # nothing can follow: finished without EOS
    assert full.is_finished() and full.is_accepting()
    assert _mask(full).nonzero().flatten().tolist() == [eos]
    full.consume([eos])
    assert full.is_finished()

    # rollback undoes exactly what consume took, the ignored EOS included, or nothing at all
    m.rollback(2)  # the second EOS, then the first
    assert m.is_accepting() and not m.is_finished()
    m.rollback(3)  # "-ab"
    m.consume(_ids(engine, "-zz"))
    assert m.is_accepting()
    with pytest.raises(GrammarError, match="roll back"):
        m.rollback(100)
    assert m.is_accepting() and not m.error


def test_fill_masks_matches_llguidance_token_by_token(engine: Engine) -> None:
    """Bit order, padding to a larger model vocabulary, and unconstrained rows."""
    assert engine.tokenizer is not None
    grammar = Grammar.lark(ARITHMETIC, engine.tokenizer)
    a, b = grammar.matcher(), grammar.matcher()
    b.consume(_ids(engine, "(12+"))
    masks = fill_masks([a, None, b], 600)
    assert masks.shape == (3, 600) and masks.dtype == torch.bool
    assert bool(masks[1].all())
    for row, m in ((0, a), (2, b)):
        assert not masks[row, 512:].any()
        expected = [m.ll.validate_tokens([t]) == 1 for t in range(512)]
        assert masks[row, :512].tolist() == expected
        assert 0 < sum(expected) < 512
    assert torch.equal(fill_masks([None, None], 7), torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(GrammarError, match="GrammarMatcher"):
        fill_masks([object()], 512)  # type: ignore[list-item]


def test_grammar_timings_reports_fork_and_mask_costs(
    engine: Engine, schema: dict[str, Any]
) -> None:
    assert engine.tokenizer is not None
    grammar = Grammar.json_schema(schema, engine.tokenizer)
    t = grammar_timings(engine, grammar, 20)
    print(
        f"\nmatcher fork {t['fork_us']:.2f} us; mask fill {t['mask_us_b1']:.1f} us (batch 1), "
        f"{t['mask_us_b25']:.1f} us (batch 25, {t['mask_us_per_row_b25']:.1f} us/row)"
    )
    for key in ("fork_us", "mask_us_b1", "mask_us_b25", "mask_us_per_row_b25"):
        assert 0 < t[key] < 1e6
    assert not engine.branches  # it frees what it made
    engine.check_integrity()
