"""Monte Carlo tree search over reasoning steps (UCT or PUCT), one batched expansion a time.

One simulation: select from the root by UCT or PUCT down to a leaf (or, with progressive
widening, to a node visited ``widen`` times per expansion so far); if it is terminal, its
value is the verifier's reward; otherwise expand it ``k`` ways in one batched generation
(:meth:`SearchTree.expand_many`), evaluate all ``k`` children in one batched call of the
value function, step into the best of them by the selection rule, and back its value up the
path. Every simulation adds exactly one visit to the root. Priors (PUCT) come from the
children's log-probs; unvisited children are scored by their value estimate.

Deterministic for a seed: children's seeds are derived from their parent's and their index,
and ties break by child order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from dendrite.errors import SearchError
from dendrite.search.tree import Node, SearchTree
from dendrite.search.value import ValueFunction


@dataclass(frozen=True)
class MCTSConfig:
    simulations: int = 32
    children: int = 3  # k: children per expansion
    c: float = 1.0  # exploration constant
    rule: str = "puct"  # "uct" or "puct"
    max_depth: int = 8
    solved_reward: float = 1.0  # a terminal node with at least this reward is a solution
    stop_when_solved: bool = False
    snapshots: bool = True
    widen: int = 0  # > 0: expand a node again once its visits reach widen x its expansions

    def __post_init__(self) -> None:
        if not isinstance(self.simulations, int) or self.simulations < 0:
            raise SearchError(f"simulations must be an int >= 0, got {self.simulations!r}")
        if not isinstance(self.children, int) or self.children < 1:
            raise SearchError(f"children per expansion must be >= 1, got {self.children!r}")
        if self.rule not in ("uct", "puct"):
            raise SearchError(f"rule must be 'uct' or 'puct', got {self.rule!r}")
        if self.max_depth < 1:
            raise SearchError(f"max_depth must be >= 1, got {self.max_depth}")
        if self.c < 0:
            raise SearchError(f"the exploration constant c must be >= 0, got {self.c}")


class SearchResult(NamedTuple):
    best_path: list[int]  # node ids, root first
    solved: bool
    best_reward: float | None
    iterations: int
    engine_steps: int


def _score(parent: Node, child: Node, cfg: MCTSConfig) -> float:
    q = child.value if child.visits else (child.estimate or 0.0)
    if cfg.rule == "puct":
        return q + cfg.c * child.prior * math.sqrt(max(parent.visits, 1)) / (1 + child.visits)
    if child.visits == 0:
        return math.inf if child.estimate is None else 1e6 + child.estimate
    return q + cfg.c * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)


def _widen(node: Node, cfg: MCTSConfig) -> bool:
    """Progressive widening: sample more children once a node has been visited enough."""
    return cfg.widen > 0 and node.visits >= cfg.widen * node.expansions


def select_child(tree: SearchTree, node: Node, cfg: MCTSConfig) -> Node:
    kids = tree.children(node)
    return max(kids, key=lambda ch: _score(node, ch, cfg))  # first maximum: stable ties


def evaluate(
    tree: SearchTree,
    nodes: list[Node],
    value: ValueFunction,
    verifier: Callable[[str], float | None] | None,
) -> None:
    """Set ``estimate`` (and ``reward`` for terminal nodes) on fresh nodes, batched."""
    open_nodes = []
    for n in nodes:
        if n.terminal and verifier is not None:
            r = verifier(tree.path_text(n))
            n.reward = 0.0 if r is None else float(r)
            n.estimate = n.reward
        else:
            open_nodes.append(n)
    if open_nodes:
        for n, v in zip(open_nodes, value.evaluate(tree, open_nodes), strict=True):
            n.estimate = float(v)
            if n.terminal:
                n.reward = n.estimate


def best_path(tree: SearchTree, cfg: MCTSConfig) -> tuple[list[int], bool, float | None]:
    """The best solution found if any (highest reward, then visits), else most-visited path."""
    rewarded = [n for n in tree.nodes.values() if n.terminal and n.reward is not None]
    if rewarded:
        top = max(rewarded, key=lambda n: (n.reward or 0.0, n.visits, -n.id))
        if (top.reward or 0.0) >= cfg.solved_reward:
            return [n.id for n in tree.path(top)], True, top.reward
    node = tree.root
    path = [node.id]
    while node.children:
        node = max(tree.children(node), key=lambda ch: (ch.visits, ch.value, -ch.id))
        path.append(node.id)
    best = max((n.reward for n in rewarded if n.reward is not None), default=None)
    return path, False, best


Classifier = Callable[[SearchTree, list[Node]], None]


def mcts(
    tree: SearchTree,
    cfg: MCTSConfig,
    value: ValueFunction,
    verifier: Callable[[str], float | None] | None = None,
    on_iteration: Callable[[int, SearchTree], None] | None = None,
    classify: Classifier | None = None,
) -> SearchResult:
    """Run ``cfg.simulations`` simulations from ``tree.root`` (which may already be grown).

    ``classify`` (a task hook) sees every batch of new children before they are evaluated
    and may mark them terminal (an answer line) or prune them (an illegal move).
    """
    steps0 = tree.engine.num_steps
    done = 0
    for it in range(cfg.simulations):
        node = tree.root
        path = [node]
        while node.children and not node.terminal and not _widen(node, cfg):
            node = select_child(tree, node, cfg)
            path.append(node)
        if not node.terminal and node.depth < cfg.max_depth and node.branch is not None:
            kids = tree.expand(node, cfg.children)
            for kid in kids:
                kid.terminal = kid.terminal or kid.depth >= cfg.max_depth
            if classify is not None:
                classify(tree, kids)
                kids = [k for k in kids if k.id in tree.nodes]  # the hook may prune some
            if kids:
                evaluate(tree, kids, value, verifier)
            if node.children:  # step into the best child, new or (after widening) old
                node = select_child(tree, node, cfg)
                path.append(node)
            else:  # every proposal was pruned: a dead end
                node.terminal, node.estimate, node.reward = True, 0.0, 0.0
        elif node.estimate is None:
            evaluate(tree, [node], value, verifier)
        v = node.estimate or 0.0
        for n in path:
            n.visits += 1
            n.value_sum += v
        done = it + 1
        if cfg.snapshots:
            tree.snapshot(done)
        if on_iteration is not None:
            on_iteration(done, tree)
        if cfg.stop_when_solved and node.terminal and (node.reward or 0.0) >= cfg.solved_reward:
            break
    path_ids, solved, reward = best_path(tree, cfg)
    return SearchResult(path_ids, solved, reward, done, tree.engine.num_steps - steps0)
