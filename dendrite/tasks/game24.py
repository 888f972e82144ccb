"""The Game of 24: puzzles, exact solver, step-line format and parser, answer verifier, split.

A puzzle is four numbers in 1..13 (a sorted multiset); the goal is an expression that uses each
number exactly once with ``+ - * /`` and equals 24. Arithmetic is exact (``fractions.Fraction``):
``1 5 5 5`` needs ``5*(5-1/5)``. One rule narrows the moves: a state's numbers stay
non-negative (``a-b`` only when ``a >= b``); this loses no puzzle, there are still exactly
1,362 solvable ones (the test checks it).

The text the model reads and writes is line-based, one reasoning step a line::

    puzzle: 4 4 10 10              <- prompt(puzzle)
    10*10=100 (left: 4 4 100)      <- step lines: operand op operand = result (left: state)
    100-4=96 (left: 4 96)
    96/4=24 (left: 24)
    answer: ((10*10)-4)/4 = 24     <- answer line (only when the last number is 24), else "fail"

Numbers are integers or reduced fractions ``24/5``; as operands a fraction is parenthesised
(``(24/5)*5=24``) so a step reads one way only. The left list is the sorted remaining multiset.
The model's own value judgement is a separate one-line document: ``eval: 4 4 10 -> sure`` or
``... -> impossible``; :func:`value_prompt` gives the part before the label.

The solver (:func:`solvable`, :func:`solve`) builds training data and checks results; the
proposal model and its value judgement never call it. The parser (:func:`parse_step`) and the
verifier (:func:`verify_answer`) need no solver: they check arithmetic and bookkeeping only.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Literal

from dendrite.errors import DendriteError
from dendrite.tasks.game24_expr import evaluate_expression

TARGET = 24
MIN_NUMBER, MAX_NUMBER = 1, 13
OPS = ("+", "-", "*", "/")
FAIL_LINE = "fail"
ANSWER_PREFIX = "answer: "
VALUE_SURE, VALUE_IMPOSSIBLE = " sure", " impossible"

Puzzle = tuple[int, ...]  # four sorted ints in 1..13
State = tuple[Fraction, ...]  # the numbers left, sorted ascending
Split = Literal["train", "validation", "test"]

_NUM = r"\d+(?:/\d+)?"
_OPERAND = r"\d+|\(\d+/\d+\)"
_STEP_RE = re.compile(
    rf"^(?P<a>{_OPERAND})(?P<op>[-+*/])(?P<b>{_OPERAND})=(?P<c>{_NUM}) "
    rf"\(left: (?P<left>{_NUM}(?: {_NUM})*)\)$"
)


# --- numbers and states ------------------------------------------------------------------------


def format_number(x: Fraction) -> str:
    """``12`` or ``24/5`` (always reduced; numbers are never negative)."""
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def format_operand(x: Fraction) -> str:
    """A number as it appears left of ``=``: fractions in parentheses, ``(24/5)``."""
    return format_number(x) if x.denominator == 1 else f"({format_number(x)})"


def format_state(state: Sequence[Fraction | int]) -> str:
    return " ".join(format_number(Fraction(x)) for x in sorted(state))


def parse_number(text: str) -> Fraction:
    """Inverse of :func:`format_number`; refuses non-canonical spellings (``4/2``, ``07``)."""
    text = text.strip()
    if text.startswith("(") and text.endswith(")") and "/" in text:
        text = text[1:-1]
    if not re.fullmatch(_NUM, text):
        raise DendriteError(f"{text!r} is not a number (write 12 or 24/5)")
    num, _, den = text.partition("/")
    if den and int(den) == 0:
        raise DendriteError(f"{text!r} has denominator 0")
    value = Fraction(int(num), int(den)) if den else Fraction(int(num))
    if format_number(value) != text:
        raise DendriteError(f"{text!r} is not in lowest terms; write {format_number(value)}")
    return value


def parse_state(text: str) -> State:
    """``"4 4 10"`` -> the sorted state."""
    return tuple(sorted(parse_number(t) for t in text.split()))


def as_state(numbers: Sequence[Fraction | int]) -> State:
    return tuple(sorted(Fraction(x) for x in numbers))


# --- steps -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One move: ``a op b = result``, leaving ``left`` (sorted, includes ``result``)."""

    a: Fraction
    op: str
    b: Fraction
    result: Fraction
    left: State

    @property
    def line(self) -> str:
        """The canonical step line, e.g. ``13-9=4 (left: 4 4 10)``."""
        return (
            f"{format_operand(self.a)}{self.op}{format_operand(self.b)}="
            f"{format_number(self.result)} (left: {format_state(self.left)})"
        )


def apply_op(a: Fraction, op: str, b: Fraction) -> Fraction:
    """``a op b`` under the task's rules; raises :class:`DendriteError` for an illegal move."""
    if op == "+":
        return a + b
    if op == "-":
        if a < b:
            raise DendriteError(
                f"{format_number(a)}-{format_number(b)} would be negative; "
                f"numbers stay non-negative, write {format_number(b)}-"
                f"{format_number(a)}"
            )
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        if b == 0:
            raise DendriteError(f"{format_number(a)}/0: division by zero")
        return a / b
    raise DendriteError(f"unknown operator {op!r} (use one of {' '.join(OPS)})")


def _remove(state: Sequence[Fraction], *values: Fraction) -> list[Fraction]:
    rest = list(state)
    for v in values:
        if v not in rest:
            raise DendriteError(
                f"{format_number(v)} is not among the numbers left ({format_state(state)})"
            )
        rest.remove(v)
    return rest


def make_step(state: Sequence[Fraction], a: Fraction, op: str, b: Fraction) -> Step:
    """The step ``a op b`` from ``state``; raises :class:`DendriteError` if it is illegal."""
    rest = _remove(state, a, b)
    result = apply_op(a, op, b)
    return Step(a, op, b, result, as_state([*rest, result]))


@lru_cache(maxsize=1 << 20)  # a pure memo: states are immutable tuples
def legal_steps(state: State) -> tuple[Step, ...]:
    """Every distinct legal move from ``state`` in canonical form (larger operand first for
    ``+ * -``; both orders for ``/``), in a fixed order."""
    steps: dict[tuple[Fraction, str, Fraction], Step] = {}
    for i, j in itertools.combinations(range(len(state)), 2):
        hi, lo = max(state[i], state[j]), min(state[i], state[j])
        moves = [(hi, "+", lo), (hi, "-", lo), (hi, "*", lo)]
        if lo != 0:
            moves.append((hi, "/", lo))
        if hi != 0 and hi != lo:
            moves.append((lo, "/", hi))
        for a, op, b in moves:
            if (a, op, b) not in steps:
                steps[a, op, b] = make_step(state, a, op, b)
    return tuple(steps.values())


def parse_step(state: Sequence[Fraction | int], line: str) -> Step:
    """Check one step line against the numbers left and return the move.

    Raises :class:`DendriteError` saying what is wrong: the line's shape, an operand not among
    the numbers left, wrong arithmetic, or a wrong left list. Commutative operands may come in
    either order; the left list may come in any order (the returned state is sorted).
    """
    current = as_state(state)
    text = line.strip()
    m = _STEP_RE.match(text)
    if m is None:
        raise DendriteError(
            f"{text!r} is not a step line; expected e.g. '13-9=4 (left: 4 4 10)' "
            "(fractions as operands in parentheses: '(24/5)*5=24 (left: 24)')"
        )
    a, b = parse_number(m["a"]), parse_number(m["b"])
    claimed = parse_number(m["c"])
    for text_op, value in ((m["a"], a), (m["b"], b)):
        if value.denominator != 1 and not text_op.startswith("("):
            raise DendriteError(f"operand {text_op} must be written ({text_op})")
    step = make_step(current, a, m["op"], b)
    if claimed != step.result:
        raise DendriteError(
            f"arithmetic: {format_operand(a)}{m['op']}{format_operand(b)} is "
            f"{format_number(step.result)}, not {format_number(claimed)}"
        )
    left = parse_state(m["left"])
    if left != step.left:
        raise DendriteError(
            f"left list ({format_state(left)}) is wrong: it should be ({format_state(step.left)})"
        )
    return step


def state_after(puzzle: Sequence[int], lines: Sequence[str]) -> State:
    """The state after a sequence of step lines from ``puzzle`` (each checked)."""
    state = as_state(puzzle)
    for line in lines:
        state = parse_step(state, line).left
    return state


# --- the solver (training data and checks only) ------------------------------------------------


def _results(a: Fraction, b: Fraction) -> set[Fraction]:
    """Every value one legal move makes of ``a`` and ``b`` (the rules of :func:`legal_steps`)."""
    hi, lo = max(a, b), min(a, b)
    out = {hi + lo, hi - lo, hi * lo}
    if lo != 0:
        out.add(hi / lo)
    if hi != 0:
        out.add(lo / hi)
    return out


@lru_cache(maxsize=1 << 20)  # a pure memo: states are immutable tuples
def solvable(state: State) -> bool:
    """Whether 24 can be reached from ``state`` (exact, exhaustive)."""
    if len(state) == 1:
        return state[0] == TARGET
    if len(state) == 2:  # the hot case: no tuples, no recursion (sorted, so a <= b)
        a, b = state
        return TARGET in (a + b, b - a, a * b) or (a != 0 and a * TARGET == b)
    for i, j in itertools.combinations(range(len(state)), 2):
        rest = [x for k, x in enumerate(state) if k != i and k != j]
        if any(solvable(as_state([*rest, r])) for r in _results(state[i], state[j])):
            return True
    return False


def solution_steps(state: State) -> tuple[Step, ...]:
    """The legal moves from ``state`` that keep it solvable (empty if it is not)."""
    return tuple(s for s in legal_steps(state) if solvable(s.left))


def solve(puzzle: Sequence[int]) -> tuple[Step, ...] | None:
    """One solution as steps (the first in :func:`legal_steps` order), or None."""
    state, steps = as_state(puzzle), []
    while len(state) > 1:
        good = solution_steps(state)
        if not good:
            return None
        steps.append(good[0])
        state = good[0].left
    return tuple(steps) if state[0] == TARGET else None


@lru_cache(maxsize=1)
def all_puzzles() -> tuple[Puzzle, ...]:
    """Every solvable puzzle of four numbers in 1..13, sorted; there are 1,362."""
    numbers = range(MIN_NUMBER, MAX_NUMBER + 1)
    return tuple(
        p for p in itertools.combinations_with_replacement(numbers, 4) if solvable(as_state(p))
    )


def unsolvable_puzzles() -> tuple[Puzzle, ...]:
    """The 458 multisets of four numbers in 1..13 with no solution (value-training negatives)."""
    solved = set(all_puzzles())
    numbers = range(MIN_NUMBER, MAX_NUMBER + 1)
    return tuple(p for p in itertools.combinations_with_replacement(numbers, 4) if p not in solved)


# --- the split -----------------------------------------------------------------------------------

SPLIT_SALT = "dendrite-game24-v1"


def split_of(puzzle: Sequence[int]) -> Split:
    """Which split a puzzle belongs to, by a fixed hash of its sorted numbers.

    ``h = int(sha256("dendrite-game24-v1:a b c d").hexdigest()[:8], 16) % 100``; ``h < 9`` is
    test, ``9 <= h < 18`` validation, the rest train. Whole puzzles are held out, and the
    rule does not depend on the list it is applied to.
    """
    key = f"{SPLIT_SALT}:{' '.join(str(x) for x in sorted(puzzle))}"
    h = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "test" if h < 9 else "validation" if h < 18 else "train"


def split_puzzles(split: Split) -> tuple[Puzzle, ...]:
    """The solvable puzzles of one split, sorted."""
    if split not in ("train", "validation", "test"):
        raise DendriteError(f"unknown split {split!r}; use train, validation or test")
    return tuple(p for p in all_puzzles() if split_of(p) == split)


# --- answers -------------------------------------------------------------------------------------


def expression_from_steps(puzzle: Sequence[int], steps: Sequence[Step]) -> str:
    """The fully parenthesised expression a sequence of steps builds, e.g. ``((10*10)-4)/4``.

    Bookkeeping only, no search: each number carries its expression; an operand takes the
    earliest-made number of that value still left (puzzle numbers first, then step results).
    """
    items: list[tuple[Fraction, str]] = [(Fraction(x), str(x)) for x in sorted(puzzle)]
    for step in steps:
        exprs = []
        for value in (step.a, step.b):
            k = next((k for k, (v, _) in enumerate(items) if v == value), None)
            if k is None:
                raise DendriteError(f"{format_number(value)} is not left before {step.line!r}")
            exprs.append(items.pop(k)[1])
        items.append((step.result, f"({exprs[0]}{step.op}{exprs[1]})"))
    if len(items) != 1:
        raise DendriteError(f"{len(items)} numbers are left; an answer needs exactly one")
    expr = items[0][1]
    return expr[1:-1] if expr.startswith("(") else expr


def answer_line(expression: str) -> str:
    return f"{ANSWER_PREFIX}{expression} = {TARGET}"


def parse_answer_line(line: str) -> str:
    """The expression of ``answer: <expr> = 24``; raises :class:`DendriteError` otherwise."""
    text = line.strip()
    suffix = f" = {TARGET}"
    if not (text.startswith(ANSWER_PREFIX) and text.endswith(suffix)):
        raise DendriteError(f"{text!r} is not an answer line ('answer: <expression> = 24')")
    return text[len(ANSWER_PREFIX) : -len(suffix)]


def verify_answer(puzzle: Sequence[int], expression: str) -> bool:
    """Exact check: ``expression`` uses exactly the puzzle's four numbers and equals 24."""
    try:
        value, literals = evaluate_expression(expression)
    except DendriteError:
        return False
    return sorted(literals) == sorted(puzzle) and value == TARGET


# --- prompts -------------------------------------------------------------------------------------


def prompt(puzzle: Sequence[int]) -> str:
    """The proposal prompt; the model continues with step lines. ``puzzle: 4 4 10 10\\n``."""
    return f"puzzle: {' '.join(str(x) for x in sorted(puzzle))}\n"


def value_prompt(state: Sequence[Fraction | int]) -> str:
    """The value-judgement prompt, ``eval: 4 4 10 ->``; score :data:`VALUE_SURE` against
    :data:`VALUE_IMPOSSIBLE` after it (a separate document, after BOS)."""
    return f"eval: {format_state(state)} ->"


def value_line(state: Sequence[Fraction | int], sure: bool) -> str:
    return value_prompt(state) + (VALUE_SURE if sure else VALUE_IMPOSSIBLE)


__all__ = [
    "ANSWER_PREFIX",
    "FAIL_LINE",
    "OPS",
    "TARGET",
    "VALUE_IMPOSSIBLE",
    "VALUE_SURE",
    "Puzzle",
    "Split",
    "State",
    "Step",
    "all_puzzles",
    "answer_line",
    "apply_op",
    "as_state",
    "expression_from_steps",
    "format_number",
    "format_operand",
    "format_state",
    "legal_steps",
    "make_step",
    "parse_answer_line",
    "parse_number",
    "parse_state",
    "parse_step",
    "prompt",
    "solution_steps",
    "solvable",
    "solve",
    "split_of",
    "split_puzzles",
    "state_after",
    "unsolvable_puzzles",
    "value_line",
    "value_prompt",
    "verify_answer",
]
