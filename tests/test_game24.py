"""The Game of 24 task: puzzle set, solver, step parser, verifier, split, documents, and the
shipped default model and tokenizer under ``data/models/dendrite-24``."""

from __future__ import annotations

import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite.errors import DendriteError
from dendrite.tasks import game24
from dendrite.tasks.game24 import as_state, parse_step
from dendrite.tasks.game24_check import _greedy_solved, search
from dendrite.tasks.game24_expr import evaluate_expression
from dendrite.tasks.game24_traces import TraceConfig, sample_document, trace_document
from dendrite.training.char_tokenizer import encode

MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"
F = Fraction


# --- puzzles and solver ----------------------------------------------------------------------


def test_there_are_1362_solvable_puzzles_and_458_unsolvable() -> None:
    puzzles = game24.all_puzzles()
    assert len(puzzles) == 1362
    assert len(set(puzzles)) == 1362
    assert all(list(p) == sorted(p) and p[0] >= 1 and p[-1] <= 13 for p in puzzles)
    assert len(game24.unsolvable_puzzles()) == 458
    assert not set(puzzles) & set(game24.unsolvable_puzzles())


@pytest.mark.parametrize(
    ("puzzle", "ok"),
    [
        ((1, 1, 1, 1), False),
        ((4, 4, 10, 10), True),
        ((1, 5, 5, 5), True),
        ((3, 3, 8, 8), True),
        ((1, 1, 1, 2), False),
        ((13, 13, 13, 13), False),
        ((4, 6, 1, 1), True),
    ],
)
def test_solver_on_known_cases(puzzle: tuple[int, ...], ok: bool) -> None:
    steps = game24.solve(puzzle)
    assert (steps is not None) == ok == game24.solvable(as_state(puzzle))
    if steps is not None:
        assert steps[-1].left == (24,)
        assert game24.verify_answer(puzzle, game24.expression_from_steps(puzzle, steps))


def test_4_4_10_10_is_solved_through_100_and_96() -> None:
    steps = game24.solve((4, 4, 10, 10))
    assert steps is not None
    assert [s.line for s in steps] == [
        "10*10=100 (left: 4 4 100)",
        "100-4=96 (left: 4 96)",
        "96/4=24 (left: 24)",
    ]
    assert game24.expression_from_steps((4, 4, 10, 10), steps) == "((10*10)-4)/4"


def test_fractions_are_exact_and_formatted_one_way() -> None:
    steps = game24.solve((1, 5, 5, 5))
    assert steps is not None
    assert any(s.result.denominator != 1 for s in steps)  # 1 5 5 5 needs 1/5
    assert game24.format_number(F(24, 5)) == "24/5"
    assert game24.format_operand(F(24, 5)) == "(24/5)"
    assert game24.parse_number("(24/5)") == F(24, 5)
    with pytest.raises(DendriteError, match="lowest terms"):
        game24.parse_number("48/10")


def test_solutions_the_solver_finds_verify() -> None:
    for p in game24.all_puzzles()[::4]:
        steps = game24.solve(p)
        assert steps is not None
        assert game24.verify_answer(p, game24.expression_from_steps(p, steps)), p


def _reachable(state: game24.State) -> bool:
    """24 by brute force over the move rules, for comparison with the solver's fast paths."""
    if len(state) == 1:
        return state[0] == 24
    return any(_reachable(s.left) for s in game24.legal_steps(state))


@settings(max_examples=120, deadline=None)
@given(
    st.lists(
        st.builds(F, st.integers(0, 30), st.sampled_from([1, 1, 2, 3, 5])), min_size=1, max_size=4
    )
)
def test_solver_agrees_with_brute_force_over_the_move_rules(numbers: list[Fraction]) -> None:
    state = as_state(numbers)
    assert game24.solvable(state) == _reachable(state)


# --- the step parser -------------------------------------------------------------------------


def test_parser_accepts_legal_steps() -> None:
    step = parse_step((4, 9, 10, 13), "13-9=4 (left: 4 4 10)")
    assert (step.a, step.op, step.b, step.result) == (13, "-", 9, 4)
    assert step.left == (4, 4, 10)
    assert parse_step((4, 9, 10, 13), "9+13=22 (left: 4 10 22)").left == (4, 10, 22)  # commuted
    assert parse_step((4, 9, 10, 13), "13-9=4 (left: 10 4 4)").left == (4, 4, 10)  # any order
    assert parse_step((F(24, 5), 5), "(24/5)*5=24 (left: 24)").left == (24,)
    assert parse_step((1, 5, 5, 5), "1/5=1/5 (left: 1/5 5 5)").result == F(1, 5)


@pytest.mark.parametrize(
    ("state", "line", "message"),
    [
        ((4, 9, 10, 13), "12-9=3 (left: 3 4 10)", "not among the numbers left"),
        ((4, 9, 10, 13), "13-9=5 (left: 4 5 10)", "arithmetic"),
        ((4, 9, 10, 13), "13-9=4 (left: 4 10)", "left list"),
        ((4, 9, 10, 13), "13-9=4 (left: 4 4 13)", "left list"),
        ((4, 9, 10, 13), "9-13=4 (left: 4 4 10)", "negative"),
        ((0, 4, 6), "6/0=6 (left: 4 6)", "division by zero"),
        ((4, 9, 10, 13), "13 - 9 = 4", "not a step line"),
        ((4, 9, 10, 13), "answer: (13-9)*(10-4) = 24", "not a step line"),
        ((F(24, 5), 5), "24/5*5=24 (left: 24)", "not a step line"),
        ((4, 4, 10), "4*4=16 (left: 10 16 16)", "left list"),
        ((4, 10, 10), "4*4=16 (left: 10 10 16)", "not among the numbers left"),
    ],
)
def test_parser_rejects_illegal_steps_with_a_reason(
    state: tuple[int | Fraction, ...], line: str, message: str
) -> None:
    with pytest.raises(DendriteError, match=message):
        parse_step(state, line)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(game24.all_puzzles()), st.integers(0, 2**32 - 1))
def test_every_legal_step_line_parses_back_to_itself(puzzle: game24.Puzzle, seed: int) -> None:
    rng, state = random.Random(seed), as_state(puzzle)
    while len(state) > 1:
        steps = game24.legal_steps(state)
        assert len({s.line for s in steps}) == len(steps)
        for s in steps:
            assert parse_step(state, s.line) == s
        state = rng.choice(steps).left


def test_state_after_follows_the_lines() -> None:
    lines = ["10*10=100 (left: 4 4 100)", "100-4=96 (left: 4 96)"]
    assert game24.state_after((4, 4, 10, 10), lines) == (4, 96)


# --- the verifier ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("puzzle", "expression", "ok"),
    [
        ((4, 4, 10, 10), "(10*10-4)/4", True),
        ((4, 4, 10, 10), "((10*10)-4)/4", True),
        ((4, 9, 10, 13), "(13-9)*(10-4)", True),
        ((1, 5, 5, 5), "5*(5-1/5)", True),
        ((4, 9, 10, 13), "13-9*10-4", False),  # precedence: not 24
        ((4, 4, 10, 10), "10*10/4-1", False),  # wrong numbers
        ((4, 4, 10, 10), "(10*10-4)/4+0", False),  # an extra number
        ((4, 4, 10, 10), "4*4+10-10+8", False),
        ((3, 3, 8, 8), "8/(3-8/3)", True),
        ((3, 3, 8, 8), "8/(3-3)+8*3", False),  # division by zero
        ((4, 9, 10, 13), "-(9-13)*(10-4)", False),  # no unary minus
        ((4, 9, 10, 13), "(13-9)*(10-4", False),
        ((4, 9, 10, 13), "import os", False),
    ],
)
def test_verifier(puzzle: tuple[int, ...], expression: str, ok: bool) -> None:
    assert game24.verify_answer(puzzle, expression) is ok


def test_expression_evaluator_reports_literals_and_errors() -> None:
    assert evaluate_expression("(13-9)*(10-4)") == (F(24), [13, 9, 10, 4])
    assert evaluate_expression("8/(3-8/3)")[0] == 24
    with pytest.raises(DendriteError):
        evaluate_expression("2**5")
    assert game24.parse_answer_line("answer: (13-9)*(10-4) = 24") == "(13-9)*(10-4)"
    with pytest.raises(DendriteError):
        game24.parse_answer_line("(13-9)*(10-4) = 24")


# --- the split ---------------------------------------------------------------------------------


def test_split_is_disjoint_complete_deterministic_and_sized() -> None:
    splits = {s: game24.split_puzzles(s) for s in ("train", "validation", "test")}
    sets = {s: set(p) for s, p in splits.items()}
    assert sum(len(p) for p in splits.values()) == 1362
    assert sets["train"] | sets["validation"] | sets["test"] == set(game24.all_puzzles())
    assert not (sets["train"] & sets["test"] or sets["train"] & sets["validation"])
    assert not sets["validation"] & sets["test"]
    assert {s: len(p) for s, p in splits.items()} == {"train": 1120, "validation": 114, "test": 128}
    assert game24.split_of((13, 10, 4, 4)) == game24.split_of((4, 4, 10, 13))  # order-free
    with pytest.raises(DendriteError):
        game24.split_puzzles("dev")  # type: ignore[arg-type]


# --- prompts and documents ---------------------------------------------------------------------


def test_prompt_formats() -> None:
    assert game24.prompt((10, 4, 10, 4)) == "puzzle: 4 4 10 10\n"
    assert game24.value_prompt((10, 4, 4)) == "eval: 4 4 10 ->"
    assert game24.value_line((F(24, 5), 5), True) == "eval: 24/5 5 -> sure"
    assert game24.value_line((1, 1), False) == "eval: 1 1 -> impossible"


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.5, 1.0]))
def test_trace_documents_are_legal_and_end_right(seed: int, p: float) -> None:
    rng = random.Random(seed)
    puzzle = rng.choice(game24.split_puzzles("train"))
    doc = trace_document(puzzle, rng, p)
    assert doc.prompt == game24.prompt(puzzle)
    lines = doc.completion.rstrip("\n").split("\n")
    state = game24.state_after(puzzle, lines[:-1])
    assert len(state) == 1 and len(lines) == 4
    if state == (24,):
        assert game24.verify_answer(puzzle, game24.parse_answer_line(lines[-1]))
    else:
        assert lines[-1] == game24.FAIL_LINE
    if p == 0.0:
        assert state == (24,)  # only solution moves


def test_value_documents_carry_the_exact_label() -> None:
    rng, cfg = random.Random(0), TraceConfig(value_fraction=1.0)
    train, negatives = game24.split_puzzles("train"), game24.unsolvable_puzzles()
    labels = set()
    for _ in range(200):
        doc = sample_document(train, negatives, rng, cfg)
        state = game24.parse_state(doc.prompt.removeprefix("eval: ").removesuffix(" ->"))
        assert doc.completion == (game24.VALUE_SURE if game24.solvable(state) else " impossible")
        labels.add(doc.completion)
    assert labels == {game24.VALUE_SURE, game24.VALUE_IMPOSSIBLE}


# --- the search sanity check, with a scripted model ------------------------------------------


class _ScriptedModel:
    """Proposes one solution move, one legal bad move and one garbage line per expansion;
    judges states with the solver (only to test the search loop itself)."""

    def __init__(self) -> None:
        self.rng = random.Random(0)

    def generate(self, texts: list[str], **_: object) -> list[str]:
        out = []
        for text in texts:
            head, *lines = text.rstrip("\n").split("\n")
            puzzle = tuple(int(x) for x in head.removeprefix("puzzle: ").split())
            state = game24.state_after(puzzle, lines)
            if state == (24,):
                steps = [
                    parse_step(game24.state_after(puzzle, lines[:i]), ln)
                    for i, ln in enumerate(lines)
                ]
                out.append(game24.answer_line(game24.expression_from_steps(puzzle, steps)))
                continue
            good, legal = game24.solution_steps(state), game24.legal_steps(state)
            choice = self.rng.random()
            out.append(
                self.rng.choice(good).line
                if good and choice < 0.4
                else "1+1=3 (left: 3)"
                if choice > 0.9
                else self.rng.choice(legal).line
            )
        return out

    def p_sure(self, states: list[game24.State]) -> list[float]:
        return [0.9 if game24.solvable(s) else 0.1 for s in states]


def test_search_loop_finds_answers_and_counts_expansions() -> None:
    puzzles = game24.split_puzzles("test")[:10]
    found = search(_ScriptedModel(), puzzles, k=4, budget=64)  # type: ignore[arg-type]
    assert all(x is not None and 1 <= x <= 64 for x in found)
    assert search(_ScriptedModel(), puzzles, k=4, budget=1) == [None] * 10  # 3 steps + answer


def test_greedy_scoring_needs_legal_steps_and_a_verified_answer() -> None:
    good = "10*10=100 (left: 4 4 100)\n100-4=96 (left: 4 96)\n96/4=24 (left: 24)\n"
    assert _greedy_solved((4, 4, 10, 10), good + "answer: ((10*10)-4)/4 = 24\n")
    assert not _greedy_solved((4, 4, 10, 10), good + "answer: ((10*10)-4)/2 = 24\n")
    assert not _greedy_solved((4, 4, 10, 10), "answer: ((10*10)-4)/4 = 24\n")  # no steps
    assert not _greedy_solved((4, 4, 10, 10), good.replace("96/4", "96/5"))


# --- the shipped tokenizer and model -----------------------------------------------------------


def test_auto_tokenizer_loads_the_shipped_tokenizer_and_round_trips() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    text = "puzzle: 4 4 10 10\n10*10=100 (left: 4 4 100)\n(24/5)*5=24\neval: 4 96 -> sure"
    ids = tok(text).input_ids
    assert ids[0] == 1 and ids[1:] == encode(text)  # BOS prepended, like LLaMA; one id a char
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == 100


def test_shipped_model_loads_with_hf_and_has_the_promised_shape() -> None:
    from transformers import GenerationConfig, LlamaForCausalLM

    weights = MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 30 * 1024 * 1024
    model = LlamaForCausalLM.from_pretrained(str(MODEL_DIR))
    cfg = model.config
    assert cfg.head_dim == 64 == cfg.hidden_size // cfg.num_attention_heads
    assert 2_000_000 <= sum(p.numel() for p in model.parameters()) <= 10_000_000
    gen = GenerationConfig.from_pretrained(str(MODEL_DIR))
    assert (gen.bos_token_id, gen.eos_token_id) == (1, 2)
    assert (MODEL_DIR / "MODEL.md").is_file()


def test_shipped_model_judges_easy_states_and_proposes_legal_steps() -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = LlamaForCausalLM.from_pretrained(str(MODEL_DIR)).eval()

    def p_sure(state: tuple[int, ...]) -> float:
        ids = tok(game24.value_prompt(state), return_tensors="pt").input_ids
        with torch.no_grad():
            probs = model(ids).logits[0, -1].softmax(-1)
        # both labels start with " ", then "s" vs "i" decides
        ids_space = tok(" ").input_ids[1]
        with torch.no_grad():
            nxt = model(torch.cat([ids, torch.tensor([[ids_space]])], 1)).logits[0, -1].softmax(-1)
        s, i = nxt[tok("s").input_ids[1]], nxt[tok("i").input_ids[1]]
        assert probs[ids_space] > 0.9
        return float(s / (s + i))

    assert p_sure((4, 6)) > 0.5 and p_sure((24,)) > 0.5
    assert p_sure((1, 1)) < 0.5 and p_sure((2, 3, 4)) > 0.5 and p_sure((1, 1, 2)) < 0.5
    assert game24.solvable(as_state((2, 3, 4))) and not game24.solvable(as_state((1, 1, 2)))
    puzzle = (4, 4, 10, 10)
    ids = tok(game24.prompt(puzzle), return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=40, pad_token_id=3)
    first_line = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
    parse_step(puzzle, first_line)  # raises if the greedy first step is not legal
