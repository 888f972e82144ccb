"""Game of 24 on the engine: every method, one puzzle at a time, with its compute.

``python -m dendrite game24 --method mcts --split test`` prints one row per puzzle (solved,
answer, tokens the model processed, forks, seconds) and, last, one JSON line
``{"method", "solved", "total", "rate", "tokens", "forks", "seconds"}``.

Methods (the proposal model is the shipped default; nothing here calls the solver):

- ``greedy``: one greedy trace; ``sample``: one trace at temperature 1.
- ``best-of-n``: ``n`` traces (budget) in one batch; solved when any answer verifies.
- ``beam``: token-level beam search of width ``budget``; solved when a returned beam's answer
  verifies (the verifier picks among the beams).
- ``tot``: tree-of-thought BFS over step lines, ``k`` proposals per node, the best ``budget``
  kept per level by the model's own judgement.
- ``mcts``: PUCT over step lines, ``budget`` simulations at most, stopping at the first verified
  answer; values from the model's own judgement.

A node's value (:class:`Game24Value`): 0 for an illegal step (the parser checks arithmetic and
bookkeeping), 1 or 0 for a single number left (is it 24?), else the model's judgement
``P(" sure") / (P(" sure") + P(" impossible"))`` after ``eval: <numbers left> ->``. Terminal
answer lines are scored by the exact verifier only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from fractions import Fraction
from typing import Any, NamedTuple

from dendrite.engine import Engine
from dendrite.errors import DendriteError, SearchError
from dendrite.sampling import SamplingParams
from dendrite.search.mcts import MCTSConfig, mcts
from dendrite.search.tot import tot_bfs
from dendrite.search.tree import Node, SearchTree, StepConfig
from dendrite.search.value import JudgeValue
from dendrite.tasks import game24 as g24

METHODS = ("greedy", "sample", "best-of-n", "beam", "tot", "mcts")
DEFAULT_BUDGET = {"greedy": 1, "sample": 1, "best-of-n": 16, "beam": 8, "tot": 5, "mcts": 64}
MAX_TRACE_TOKENS = 160  # 3 step lines and an answer line fit in well under this
STEP_TOKENS = 40


class PuzzleResult(NamedTuple):
    puzzle: tuple[int, ...]
    solved: bool
    answer: str | None
    tokens: int  # tokens the model processed (prompts, proposals, judgements)
    forks: int
    seconds: float


def answer_of(puzzle: Sequence[int], text: str) -> tuple[bool, str | None]:
    """(verified, expression) of the first answer line in ``text``; unverified if none."""
    for line in text.splitlines():
        if line.startswith(g24.ANSWER_PREFIX):
            try:
                expr = g24.parse_answer_line(line)
            except DendriteError:
                return False, None
            return g24.verify_answer(puzzle, expr), expr
    return False, None


class Game24Task:
    """Terminal rules, verifier and value of one puzzle (no solver)."""

    def __init__(self, puzzle: Sequence[int]) -> None:
        self.puzzle = tuple(sorted(puzzle))

    def verifier(self, path_text: str) -> float:
        return 1.0 if answer_of(self.puzzle, path_text)[0] else 0.0

    def state(self, tree: SearchTree, node: Node) -> tuple[Fraction, ...] | None:
        """Numbers left after the node's step lines; None if a line is not a legal step."""
        lines = [n.text.strip() for n in tree.path(node)[1:]]
        try:
            return g24.state_after(self.puzzle, lines)
        except DendriteError:
            return None

    def classify(self, tree: SearchTree, nodes: list[Node]) -> None:
        """Answer and fail lines end a path; an illegal step (the parser says) is pruned."""
        for n in nodes:
            line = n.text.strip()
            if line.startswith(g24.ANSWER_PREFIX) or line == g24.FAIL_LINE:
                n.terminal = True
            elif self.state(tree, n) is None:
                tree.release(n)


class Game24Value:
    """Illegal: 0; one number: is it 24; else the model's own judgement (batched)."""

    def __init__(self, task: Game24Task) -> None:
        self.task = task
        self.judge = JudgeValue(self._prompt, g24.VALUE_SURE, g24.VALUE_IMPOSSIBLE)

    def _prompt(self, tree: SearchTree, node: Node) -> str:
        state = self.task.state(tree, node)
        assert state is not None
        return g24.value_prompt(state)

    def evaluate(self, tree: SearchTree, nodes: Sequence[Node]) -> list[float]:
        out: list[float | None] = []
        ask: list[Node] = []
        for n in nodes:
            state = self.task.state(tree, n)
            if state is None:
                out.append(0.0)
            elif len(state) == 1:
                out.append(1.0 if state[0] == g24.TARGET else 0.0)
            else:
                out.append(None)
                ask.append(n)
        judged = iter(self.judge.evaluate(tree, ask) if ask else [])
        return [next(judged) if v is None else v for v in out]


def solve_one(
    engine: Engine,
    puzzle: Sequence[int],
    method: str,
    budget: int,
    seed: int,
    children: int = 4,
    c: float = 1.0,
    widen: int = 3,
) -> PuzzleResult:
    if method not in METHODS:
        raise SearchError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if budget < 1:
        raise SearchError(f"budget must be >= 1, got {budget}")
    task = Game24Task(puzzle)
    prompt = g24.prompt(task.puzzle)
    tel = engine.telemetry
    tok0 = sum(s[2] for s in tel.steps)
    fork0 = len(tel.forks)
    t0 = time.perf_counter()
    solved, answer = False, None
    if method in ("greedy", "sample"):
        params = SamplingParams(
            max_new_tokens=MAX_TRACE_TOKENS, temperature=0.0 if method == "greedy" else 1.0
        )
        gen = engine.generate(prompt, params, seed=seed)[0]
        solved, answer = answer_of(task.puzzle, gen.text or "")
    elif method == "best-of-n":
        step = StepConfig(delimiter=None, max_step_tokens=MAX_TRACE_TOKENS, temperature=1.0)
        with SearchTree(engine, prompt, step, seed=seed) as tree:
            kids = tree.expand(tree.root, budget)
            for k in kids:
                ok, expr = answer_of(task.puzzle, k.text)
                if ok or answer is None:
                    solved, answer = ok, expr
                if ok:
                    break
    elif method == "beam":
        from dendrite.search.beam import beam_search

        res = beam_search(engine, prompt, num_beams=budget, max_new_tokens=MAX_TRACE_TOKENS)
        assert engine.tokenizer is not None
        for beam in res.beams:
            ok, expr = answer_of(task.puzzle, engine.tokenizer.decode(beam.output_ids))
            if ok or answer is None:
                solved, answer = ok, expr
            if ok:
                break
    else:
        step = StepConfig(delimiter="\n", max_step_tokens=STEP_TOKENS, temperature=1.0)
        with SearchTree(engine, prompt, step, seed=seed) as tree:
            value = Game24Value(task)
            if method == "mcts":
                cfg = MCTSConfig(
                    simulations=budget, children=children, c=c, max_depth=5, stop_when_solved=True,
                    snapshots=False, widen=widen,
                )  # fmt: skip
                r = mcts(tree, cfg, value, verifier=task.verifier, classify=task.classify)
            else:
                r = tot_bfs(
                    tree, value, breadth=budget, k=children, max_depth=5, verifier=task.verifier,
                    classify=task.classify,
                )  # fmt: skip
            if r.solved:
                solved, answer = answer_of(task.puzzle, tree.path_text(tree[r.best_path[-1]]))
    return PuzzleResult(
        task.puzzle, solved, answer, sum(s[2] for s in tel.steps) - tok0,
        len(tel.forks) - fork0, time.perf_counter() - t0,
    )  # fmt: skip


def parse_puzzles(text: str) -> list[tuple[int, ...]]:
    """``"1 2 7 7;3 3 8 8"`` -> puzzles; each four numbers in 1..13."""
    out: list[tuple[int, ...]] = []
    for chunk in text.split(";"):
        if not chunk.strip():
            continue
        try:
            nums = tuple(sorted(int(x) for x in chunk.split()))
        except ValueError:
            raise DendriteError(f"puzzle {chunk.strip()!r} is not four integers") from None
        if len(nums) != 4 or not all(1 <= x <= 13 for x in nums):
            raise DendriteError(f"puzzle {chunk.strip()!r} must be four numbers in 1..13")
        out.append(nums)
    if not out:
        raise DendriteError("no puzzles given")
    return out


def evaluate(
    engine: Engine,
    puzzles: Sequence[Sequence[int]],
    method: str,
    budget: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[PuzzleResult], dict[str, Any]]:
    """Run ``method`` on every puzzle; per-puzzle results and the summary dict."""
    budget = DEFAULT_BUDGET.get(method, 1) if budget is None else budget
    results = []
    from tqdm import tqdm

    for i, p in enumerate(tqdm(puzzles, desc=method, disable=not progress, leave=False)):
        results.append(solve_one(engine, p, method, budget, seed + i))
    solved = sum(r.solved for r in results)
    summary = {
        "method": method,
        "budget": budget,
        "solved": solved,
        "total": len(results),
        "rate": solved / len(results) if results else 0.0,
        "tokens": sum(r.tokens for r in results),
        "forks": sum(r.forks for r in results),
        "seconds": sum(r.seconds for r in results),
    }
    return results, summary
