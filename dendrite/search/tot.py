"""Tree-of-thought breadth-first search and best-of-N / self-consistency.

ToT BFS (Yao et al. 2023): level by level, every frontier node proposes ``k`` next steps
(all ``|frontier| * k`` proposals in one batched generation), the value function scores them
together, the best ``breadth`` survive and the rest are released (their pages go back to the
pool). It stops at the first verified solution or at ``max_depth``.

Best-of-N: ``n`` complete samples from one shared prompt in one batch; self-consistency
takes the majority answer (``answer`` extracts it from a sample's text), and a verifier, when
given, picks a verified sample.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

from dendrite.errors import SearchError
from dendrite.search.mcts import Classifier, MCTSConfig, SearchResult, best_path, evaluate
from dendrite.search.tree import Node, SearchTree
from dendrite.search.value import ValueFunction


def tot_bfs(
    tree: SearchTree,
    value: ValueFunction,
    *,
    breadth: int = 3,
    k: int = 3,
    max_depth: int = 4,
    verifier: Callable[[str], float | None] | None = None,
    solved_reward: float = 1.0,
    prune: bool = True,
    classify: Classifier | None = None,
) -> SearchResult:
    if breadth < 1 or k < 1 or max_depth < 1:
        raise SearchError(f"breadth, k and max_depth must be >= 1, got {breadth}, {k}, {max_depth}")
    steps0 = tree.engine.num_steps
    frontier: list[Node] = [tree.root]
    depth = 0
    for depth in range(1, max_depth + 1):
        expandable = [n for n in frontier if not n.terminal and n.branch is not None]
        if not expandable:
            break
        kids = [c for row in tree.expand_many(expandable, k) for c in row]
        for c in kids:
            c.terminal = c.terminal or c.depth >= max_depth
        if classify is not None:
            classify(tree, kids)
            kids = [c for c in kids if c.id in tree.nodes]
        evaluate(tree, kids, value, verifier)
        for c in kids:
            c.visits = 1
            c.value_sum = c.estimate or 0.0
        tree.snapshot(depth)
        if any(c.terminal and (c.reward or 0.0) >= solved_reward for c in kids):
            break
        ranked = sorted(kids, key=lambda c: -(c.estimate or 0.0))  # stable: ties by order
        frontier = [c for c in ranked if not c.terminal][:breadth]
        if prune:
            keep = {c.id for c in frontier}
            for c in kids:
                if c.id not in keep and not c.terminal:
                    tree.release(c, remove=False)
    path, solved, reward = best_path(tree, MCTSConfig(solved_reward=solved_reward))
    return SearchResult(path, solved, reward, depth, tree.engine.num_steps - steps0)


class BestOfN(NamedTuple):
    answer: str | None  # the majority answer (self-consistency)
    votes: dict[str, int]
    verified_node: int | None  # a node whose sample the verifier accepted, if any
    samples: list[int]  # node ids of the n samples
    engine_steps: int


def best_of_n(
    tree: SearchTree,
    n: int,
    answer: Callable[[str], str | None],
    verifier: Callable[[str], float | None] | None = None,
    solved_reward: float = 1.0,
) -> BestOfN:
    """``n`` samples from the root in one batch; majority answer and a verified one if any.

    The tree's step config decides how long a sample runs (use ``delimiter=None`` and a budget
    that covers a whole answer).
    """
    if n < 1:
        raise SearchError(f"best-of-n needs n >= 1, got {n}")
    steps0 = tree.engine.num_steps
    kids = tree.expand(tree.root, n)
    votes: Counter[str] = Counter()
    verified = None
    for c in kids:
        text = tree.path_text(c)
        a = answer(text)
        if a is not None:
            votes[a] += c.multiplicity
        if verifier is not None:
            c.reward = float(verifier(text) or 0.0)
            if verified is None and c.reward >= solved_reward:
                verified = c.id
    top = votes.most_common(1)[0][0] if votes else None
    return BestOfN(top, dict(votes), verified, [c.id for c in kids], tree.engine.num_steps - steps0)
