"""Value functions: how good is a node? One protocol, four kinds, all batched.

- :class:`VerifierValue`: the task's exact verdict on terminal nodes (a reward), a constant
  elsewhere. It is the ground truth MCTS backs up when it reaches an answer.
- :class:`RolloutValue`: finish the reasoning from the node with the model (``n`` rollouts per
  node, all nodes' rollouts in one batched generation) and average the verifier's rewards.
- :class:`JudgeValue`: the model's own judgement, by :meth:`Engine.score_many`: for each
  node a judge prompt is built from its path, and the value is
  ``P(yes) / (P(yes) + P(no))`` of two continuations (``" sure"`` vs ``" impossible"``, say).
  No solver, no verifier: what the model believes.
- :class:`LogprobValue`: the path's mean token probability, a task-free default.

Values are in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from dendrite.engine import Branch
from dendrite.sampling import SamplingParams

if TYPE_CHECKING:
    from dendrite.search.tree import Node, SearchTree


class ValueFunction(Protocol):
    def evaluate(self, tree: SearchTree, nodes: Sequence[Node]) -> list[float]:
        """A value in [0, 1] for each node, computed together."""
        ...


class VerifierValue:
    def __init__(self, verifier: Callable[[str], float | None], default: float = 0.0) -> None:
        self.verifier = verifier
        self.default = default

    def evaluate(self, tree: SearchTree, nodes: Sequence[Node]) -> list[float]:
        out = []
        for n in nodes:
            r = self.verifier(tree.path_text(n)) if n.terminal else None
            out.append(self.default if r is None else float(r))
        return out


class RolloutValue:
    def __init__(
        self,
        verifier: Callable[[str], float | None],
        rollouts: int = 1,
        max_tokens: int = 128,
        temperature: float = 1.0,
    ) -> None:
        self.verifier = verifier
        self.rollouts = rollouts
        self.params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature)

    def evaluate(self, tree: SearchTree, nodes: Sequence[Node]) -> list[float]:
        engine = tree.engine
        runs: list[tuple[int, Branch]] = []
        try:
            for i, n in enumerate(nodes):
                base = tree.ensure_branch(n)
                for _ in range(self.rollouts):
                    b = engine.fork(base, self.params)
                    b.num_generated, b.finish_reason = 0, None
                    runs.append((i, b))
            engine.run([b for _, b in runs])
            totals = [0.0] * len(nodes)
            for i, b in runs:
                text = tree.path_text(nodes[i]) + tree._step_text(b)
                totals[i] += float(self.verifier(text) or 0.0)
            return [t / self.rollouts for t in totals]
        finally:
            for _, b in runs:
                if b.alive:
                    engine.free(b)


class JudgeValue:
    def __init__(
        self,
        judge_prompt: Callable[[SearchTree, Node], str],
        yes: str = " sure",
        no: str = " impossible",
    ) -> None:
        self.judge_prompt = judge_prompt
        self.yes = yes
        self.no = no

    def evaluate(self, tree: SearchTree, nodes: Sequence[Node]) -> list[float]:
        engine = tree.engine
        judges: list[Branch] = []
        try:
            for n in nodes:
                judges.append(engine.add(self.judge_prompt(tree, n)))
            engine.prefill(judges)
            reqs: list[tuple[Branch, str]] = []
            for b in judges:
                reqs += [(b, self.yes), (b, self.no)]
            scores = engine.score_many(reqs)
        finally:
            for b in judges:
                if b.alive:
                    engine.free(b)
        out = []
        for i in range(len(nodes)):
            ly, ln = scores[2 * i].logprob, scores[2 * i + 1].logprob
            m = max(ly, ln)
            out.append(math.exp(ly - m) / (math.exp(ly - m) + math.exp(ln - m)))
        return out


class LogprobValue:
    def evaluate(self, tree: SearchTree, nodes: Sequence[Node]) -> list[float]:
        out = []
        for n in nodes:
            path = tree.path(n)[1:]
            toks = sum(len(p.token_ids) for p in path)
            lp = sum(p.logprob for p in path)
            out.append(math.exp(lp / toks) if toks else 0.0)
        return out
