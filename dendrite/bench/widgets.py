"""``bench widgets``: how fast the tree explorer redraws a growing tree, and draws a big one.

Two figures, each the median of repeated runs in this process (targets in brackets):

- **update** [< 200 ms]: one :meth:`TreeExplorer.refresh` of a 1,000-node tree, the call the
  explorer makes after every MCTS simulation: ``tree.to_frame()``, :func:`layout_frame`, and
  the in-place replacement of every trace array (``fig.batch_update``), plus the engine stats
  line. The tree is grown by real MCTS (PUCT, 4 children per expansion, steps of up to 3
  tokens, :class:`LogprobValue`) on a tiny random Llama, so every node pins a live branch.
- **first render** [< 2 s]: building a :class:`TreeExplorer` on a 5,000-node tree (the
  ``FigureWidget``, the widgets, the layout and the first fill of the traces), once with the
  default collapsing (the 2,000 most visited nodes drawn) and once drawing all 5,000. Above
  1,000 drawn nodes the traces are ``Scattergl``. The 5,000-node tree is synthetic: an
  MCTS-shaped tree (each simulation walks down choosing children in proportion to their
  visits and expands a leaf 3 ways) loaded with ``SearchTree.from_json``, so only its root
  pins a branch; the layout and the figure do not depend on the engine.

These are Python-side costs (what the kernel spends); the browser's own drawing is not
included. Prints a table; ``main`` ends with one JSON line.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dendrite.bench.common import emit_json, environment, print_table
from dendrite.engine import Engine
from dendrite.model.random_init import make_random_checkpoint
from dendrite.search.mcts import MCTSConfig, mcts
from dendrite.search.tree import Node, SearchTree, StepConfig
from dendrite.search.value import LogprobValue

PROMPT = [1, 17, 42, 99, 7]


def tiny_engine(tmp: Path) -> Engine:
    path = make_random_checkpoint(tmp / "tiny", "llama", preset="tiny")
    return Engine.from_pretrained(path)


def mcts_tree(engine: Engine, nodes: int, seed: int = 0) -> SearchTree:
    """A search tree of at least ``nodes`` nodes grown by MCTS on ``engine``."""
    step = StepConfig(delimiter=None, max_step_tokens=3, temperature=1.0)
    tree = SearchTree(engine, PROMPT, step, seed=seed)
    cfg = MCTSConfig(simulations=25, children=4, max_depth=16, snapshots=False)
    value = LogprobValue()
    while len(tree) < nodes:
        mcts(tree, cfg, value)
    return tree


def synthetic_tree_json(nodes: int, k: int = 3, seed: int = 0) -> str:
    """An MCTS-shaped tree of ``nodes`` nodes in ``SearchTree.to_json`` format (no engine).

    Each simulation walks from the root choosing a child in proportion to its visits + 1,
    expands the leaf it reaches ``k`` ways, and backs a random value up the path.
    """
    rng = random.Random(seed)
    tree = [Node(id=0, parent=None, depth=0)]
    while len(tree) < nodes:
        path = [tree[0]]
        while path[-1].children:
            kids = [tree[c] for c in path[-1].children]
            path.append(rng.choices(kids, weights=[c.visits + 1 for c in kids])[0])
        leaf = path[-1]
        for _ in range(min(k, nodes - len(tree))):
            child = Node(
                id=len(tree), parent=leaf.id, depth=leaf.depth + 1,
                text=f"step {len(tree)} ", token_ids=[3, 4, 5], logprob=-rng.random() * 3,
                prior=1 / k, estimate=rng.random(),
            )  # fmt: skip
            leaf.children.append(child.id)
            tree.append(child)
        v = rng.random()
        for n in path:
            n.visits += 1
            n.value_sum += v
    data = {
        "prompt_ids": PROMPT,
        "seed": seed,
        "root": 0,
        "nodes": [n.to_dict() for n in tree],
        "snapshots": [],
    }
    return json.dumps(data)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def run(update_nodes: int = 1000, render_nodes: int = 5000, repeats: int = 15) -> dict[str, Any]:
    from widgets.explorer import TreeExplorer
    from widgets.layout import layout_frame

    with tempfile.TemporaryDirectory() as tmp:
        engine = tiny_engine(Path(tmp))
    t0 = time.perf_counter()
    tree = mcts_tree(engine, update_nodes)
    grow_s = time.perf_counter() - t0
    explorer = TreeExplorer(tree)
    frame = tree.to_frame()
    update_ms = _median_ms(explorer.refresh, repeats)
    to_frame_ms = _median_ms(tree.to_frame, repeats)
    layout_ms = _median_ms(lambda: layout_frame(frame), repeats)
    live = engine.stats().live_branches
    tree.close()

    big = SearchTree.from_json(synthetic_tree_json(render_nodes), engine)
    render_ms = _median_ms(lambda: TreeExplorer(big), max(3, repeats // 5))
    render_all_ms = _median_ms(
        lambda: TreeExplorer(big, max_nodes=render_nodes), max(3, repeats // 5)
    )
    drawn = len(TreeExplorer(big).layout)
    big.close()

    rows = [
        ("update (refresh)", len(tree), len(tree), update_ms, 200.0),
        ("  of which to_frame", len(tree), len(tree), to_frame_ms, float("nan")),
        ("  of which layout_frame", len(tree), len(tree), layout_ms, float("nan")),
        ("first render, collapsed", len(big), drawn, render_ms, 2000.0),
        ("first render, all drawn", len(big), len(big), render_all_ms, 2000.0),
    ]
    print(
        f"tree explorer, median ms (update: {repeats} refreshes; MCTS tree grown in {grow_s:.1f} s)"
    )
    print_table(("what", "nodes", "drawn", "ms", "target ms"), rows)
    return {
        "update_ms": update_ms,
        "update_nodes": len(tree),
        "update_live_branches": live,
        "to_frame_ms": to_frame_ms,
        "layout_ms": layout_ms,
        "first_render_ms": render_ms,
        "first_render_drawn": drawn,
        "first_render_all_ms": render_all_ms,
        "render_nodes": len(big),
        "targets_ms": {"update": 200.0, "first_render": 2000.0},
        "meets_targets": update_ms < 200.0 and max(render_ms, render_all_ms) < 2000.0,
        "env": environment(),
    }


def main(args: Any) -> None:
    emit_json(run())
