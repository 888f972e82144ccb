"""Training documents for the Game of 24 model: step traces and value judgements.

Two kinds of document, each a prompt (no loss) and a completion (the loss):

- **trace**: ``puzzle: 4 4 10 10\\n`` then step lines until one number is left, then
  ``answer: <expr> = 24`` if it is 24, else ``fail``. From each state the next move is a
  uniformly random *solution* move (one that keeps the state solvable) with probability
  ``1 - random_move_p``, and a uniformly random *legal* move otherwise (always, once the state
  is unsolvable). The model so learns a proposal distribution that puts real mass on good
  steps but also on plausible bad ones: greedy decoding often goes wrong, sampling several
  children and searching finds the good ones. Traces continue to the end either way, so the
  model also learns to finish (and fail) from any state.
- **value**: ``eval: 4 4 10 ->`` then `` sure`` or `` impossible`` (exact, from the solver), for
  states reached by the same move policy after 0 to 3 moves, so the judgement is trained on the
  states a search over the model's own proposals meets.

The solver labels data here and only here. Every document is drawn from a ``random.Random``
passed in, so a batch is a pure function of its seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from dendrite.errors import ConfigError
from dendrite.tasks.game24 import (
    FAIL_LINE,
    TARGET,
    VALUE_IMPOSSIBLE,
    VALUE_SURE,
    Puzzle,
    State,
    Step,
    answer_line,
    as_state,
    expression_from_steps,
    legal_steps,
    prompt,
    solution_steps,
    solvable,
    value_prompt,
)


@dataclass(frozen=True)
class TraceConfig:
    """How documents are mixed. ``depth_weights[d]``: weight of value states after d moves."""

    random_move_p: float = 0.55
    value_fraction: float = 0.5
    depth_weights: tuple[float, float, float, float] = (0.1, 0.45, 0.35, 0.1)

    def __post_init__(self) -> None:
        if not 0.0 <= self.random_move_p <= 1.0:
            raise ConfigError(f"random_move_p must be in [0, 1], got {self.random_move_p}")
        if not 0.0 <= self.value_fraction <= 1.0:
            raise ConfigError(f"value_fraction must be in [0, 1], got {self.value_fraction}")
        if (
            len(self.depth_weights) != 4
            or min(self.depth_weights) < 0
            or sum(self.depth_weights) <= 0
        ):
            raise ConfigError("depth_weights must be four non-negative weights, not all zero")


class Document(NamedTuple):
    """A training document: ``prompt`` is context only, ``completion`` carries the loss."""

    prompt: str
    completion: str


def next_step(state: State, rng: random.Random, random_move_p: float) -> Step:
    """The move policy of the traces (see the module docstring)."""
    if rng.random() >= random_move_p:
        good = solution_steps(state)
        if good:
            return rng.choice(good)
    return rng.choice(legal_steps(state))


def trace_document(puzzle: Puzzle, rng: random.Random, random_move_p: float) -> Document:
    """A full trace from ``puzzle`` down to one number, ending with the answer or ``fail``."""
    state, steps = as_state(puzzle), []
    while len(state) > 1:
        step = next_step(state, rng, random_move_p)
        steps.append(step)
        state = step.left
    lines = [s.line for s in steps]
    end = answer_line(expression_from_steps(puzzle, steps)) if state[0] == TARGET else FAIL_LINE
    return Document(prompt(puzzle), "\n".join([*lines, end]) + "\n")


def value_document(state: State) -> Document:
    """``eval: <state> ->`` with the exact label."""
    return Document(value_prompt(state), VALUE_SURE if solvable(state) else VALUE_IMPOSSIBLE)


def walk(puzzle: Puzzle, depth: int, rng: random.Random, random_move_p: float) -> State:
    """The state after ``depth`` moves of the trace policy."""
    state = as_state(puzzle)
    for _ in range(depth):
        state = next_step(state, rng, random_move_p).left
    return state


def sample_document(
    puzzles: Sequence[Puzzle],
    negatives: Sequence[Puzzle],
    rng: random.Random,
    config: TraceConfig,
) -> Document:
    """One document of the training mix.

    ``puzzles`` are the (solvable) puzzles to draw from; ``negatives`` are unsolvable
    four-number sets, used only as ``impossible`` examples for the four-number judgement.
    """
    if rng.random() >= config.value_fraction:
        return trace_document(rng.choice(puzzles), rng, config.random_move_p)
    depth = rng.choices(range(4), weights=config.depth_weights)[0]
    if depth == 0 and negatives and rng.random() < 0.5:
        return value_document(as_state(rng.choice(negatives)))
    return value_document(walk(rng.choice(puzzles), depth, rng, config.random_move_p))


__all__ = [
    "Document",
    "TraceConfig",
    "next_step",
    "sample_document",
    "trace_document",
    "value_document",
    "walk",
]
