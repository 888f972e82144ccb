"""Widgets without a browser: the layout function, the explorer's state changes through its
Python API (on the shipped default model), and dashboards drawn from real engine data."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from plotly.callbacks import Points

from dendrite.bench.widgets import synthetic_tree_json
from dendrite.engine import Engine
from dendrite.errors import DendriteError
from dendrite.search.mcts import MCTSConfig, mcts
from dendrite.search.tot import tot_bfs
from dendrite.search.tree import SearchTree, StepConfig
from dendrite.tasks import game24 as g24
from dendrite.tasks.game24_eval import Game24Task, Game24Value
from widgets import dashboards as D
from widgets.explorer import NODES, TreeExplorer
from widgets.frames import refcount_frame, sharing_frame, tree_branches
from widgets.layout import edge_coords, layout_frame
from widgets.panel import node_html, node_info

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "data" / "models" / "dendrite-24"
PUZZLE = (1, 2, 2, 6)
STEP = StepConfig(delimiter="\n", max_step_tokens=40)


def _frame(rows: list[tuple[int, int | None, int, int]]) -> pd.DataFrame:
    """A to_frame()-shaped frame from (id, parent, depth, visits) in depth-first order."""
    kids: dict[int, int] = {}
    for _, p, _, _ in rows:
        if p is not None:
            kids[p] = kids.get(p, 0) + 1
    return pd.DataFrame(
        {
            "id": [r[0] for r in rows],
            "parent": [np.nan if r[1] is None else float(r[1]) for r in rows],
            "depth": [r[2] for r in rows],
            "text": [f"s{r[0]}\n" for r in rows],
            "visits": [r[3] for r in rows],
            "value": [0.5 if r[3] else 0.0 for r in rows],
            "estimate": [0.25] * len(rows),
            "terminal": [False] * len(rows),
            "reward": [None] * len(rows),
            "order": list(range(len(rows))),
            "num_children": [kids.get(r[0], 0) for r in rows],
        }
    )


# root(0) -> a(1) -> c(3), d(4);  root -> b(2)     (depth-first: 0 1 3 4 2)
SMALL = [(0, None, 0, 9), (1, 0, 1, 6), (3, 1, 2, 4), (4, 1, 2, 0), (2, 0, 1, 2)]


# ---------------------------------------------------------------- layout (no engine)


def test_layout_tidy_positions_and_edges() -> None:
    lay = layout_frame(_frame(SMALL)).set_index("id")
    assert lay.loc[[3, 4, 2], "y"].tolist() == [0.0, 1.0, 2.0]  # leaves in depth-first order
    assert lay.loc[1, "y"] == 0.5  # centred over its children
    assert lay.loc[0, "y"] == 1.25  # over its first (0.5) and last (2) child
    assert lay["x"].tolist() == lay["depth"].tolist()
    xs, ys = edge_coords(layout_frame(_frame(SMALL)))
    assert len(xs) == 3 * 4 and xs[2::3] == [None] * 4  # one segment per non-root node
    assert (xs[0], ys[0], xs[1], ys[1]) == (0.0, 1.25, 1.0, 0.5)  # root -> a


def test_layout_vertical_and_style() -> None:
    frame = _frame(SMALL)
    frame.loc[frame["id"] == 2, ["terminal", "reward"]] = [True, 1.0]
    frame.loc[frame["id"] == 4, ["terminal", "reward"]] = [True, 0.0]
    lay = layout_frame(frame, orientation="v").set_index("id")
    assert lay.loc[3, "x"] == 0.0 and lay.loc[3, "y"] == -2.0
    assert lay.loc[2, "symbol"] == "star" and bool(lay.loc[2, "solved"])
    assert lay.loc[4, "symbol"] == "square" and not bool(lay.loc[4, "solved"])
    assert lay.loc[4, "colour"] == 0.25  # unvisited: the value estimate
    assert lay.loc[1, "colour"] == 0.5  # visited: the mean value
    assert lay.loc[0, "size"] > lay.loc[1, "size"] > lay.loc[4, "size"] == 6.0
    with pytest.raises(ValueError):
        layout_frame(frame, orientation="diagonal")


def test_layout_collapses_by_depth_and_visits() -> None:
    lay = layout_frame(_frame(SMALL), max_depth=1).set_index("id")
    assert sorted(lay.index) == [0, 1, 2]
    assert lay.loc[1, "hidden_children"] == 2 and lay.loc[1, "symbol"] == "diamond"
    assert lay.loc[1, "y"] == 0.0  # now a leaf itself
    top = layout_frame(_frame(SMALL), max_nodes=2)
    assert top["id"].tolist() == [0, 1]  # the two most visited, depth-first order kept
    deep = _frame(SMALL)
    deep.loc[deep["id"] == 3, "visits"] = 99  # a deep node wins: its ancestors come along
    assert layout_frame(deep, max_nodes=1)["id"].tolist() == [0, 1, 3]
    assert len(layout_frame(_frame(SMALL).iloc[:0])) == 0


def test_layout_of_5000_nodes_is_a_tree() -> None:
    data = json.loads(synthetic_tree_json(5000))
    rows, by_id = [], {n["id"]: n for n in data["nodes"]}
    stack = [0]
    while stack:  # depth-first, as SearchTree.to_frame
        n = by_id[stack.pop()]
        rows.append((n["id"], n["parent"], n["depth"], n["visits"]))
        stack.extend(reversed(n["children"]))
    lay = layout_frame(_frame(rows), max_nodes=2000)
    assert 2000 <= len(lay) <= 2100
    assert lay["parent"].dropna().isin(lay["id"]).all()  # every drawn node's parent is drawn
    assert len(edge_coords(lay)[0]) == 3 * (len(lay) - 1)


# ---------------------------------------------------------------- explorer (default model)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine.from_pretrained(DEFAULT_MODEL)


@pytest.fixture
def explorer(engine: Engine) -> Iterator[TreeExplorer]:
    tree = SearchTree(engine, g24.prompt(PUZZLE), STEP, seed=0)
    ex = TreeExplorer(tree, Game24Task(PUZZLE), config=MCTSConfig(children=3, max_depth=5))
    yield ex
    tree.close()
    engine.check_integrity()
    assert engine.stats().used_pages == 0


def _drawn(ex: TreeExplorer) -> int:
    return len(ex.fig.data[NODES].x)


def test_explorer_expand_fork_prune_reset(explorer: TreeExplorer) -> None:
    tree, engine = explorer.tree, explorer.tree.engine
    assert _drawn(explorer) == 1 and explorer.selected == tree.root.id
    kids = explorer.expand(3)
    assert len(tree) == 1 + len(kids) and _drawn(explorer) == len(tree)
    assert all(k.estimate is not None for k in kids)  # evaluated, so coloured
    child = explorer.fork_here(kids[0].id)
    assert child.parent == kids[0].id and explorer.selected == child.id
    assert _drawn(explorer) == len(tree)
    before = engine.stats().live_branches
    explorer.prune(kids[0].id)  # takes the forked child with it
    assert kids[0].id not in tree.nodes and child.id not in tree.nodes
    assert engine.stats().live_branches == before - 2
    assert explorer.selected == tree.root.id  # the pruned node's parent
    with pytest.raises(DendriteError):
        explorer.prune(tree.root.id)
    explorer.reset()
    assert len(tree) == 1 and _drawn(explorer) == 1
    assert engine.stats().live_branches == 1 and tree.snapshots == []
    engine.check_integrity()


def test_explorer_runs_mcts_in_place(explorer: TreeExplorer) -> None:
    fig, nodes, edges = explorer.fig, explorer.fig.data[NODES], explorer.fig.data[0]
    res = explorer.run_mcts(4)
    assert res.iterations == 4 and explorer.progress.value == 4
    assert explorer.fig is fig and explorer.fig.data[NODES] is nodes  # same traces, new arrays
    assert explorer.fig.data[0] is edges
    assert _drawn(explorer) == len(explorer.tree) > 1
    assert list(nodes.customdata) == explorer.layout["id"].tolist()
    assert sorted(explorer.tree.snapshots_frame()["iteration"].unique()) == [1, 2, 3, 4]
    explorer.run_mcts(2)  # snapshots keep counting across runs
    assert explorer.tree.snapshots_frame()["iteration"].max() == 6
    assert f"{len(explorer.tree)} nodes" in explorer.fig.layout.title.text


def test_explorer_updates_one_trace_per_message(explorer: TreeExplorer) -> None:
    """A restyle spanning traces sends "undefined" for what one trace did not change, and the
    front end then drops those properties (the selection ring lost its colour that way)."""
    sent: list[dict[str, Any]] = []
    send = explorer.fig._send_update_msg
    explorer.fig._send_update_msg = lambda *a, **k: (sent.append(k), send(*a, **k))[1]  # type: ignore[method-assign]
    explorer.expand(2)
    explorer.select(int(explorer.layout["id"].iloc[-1]))
    assert sent and all(len(m["trace_indexes"]) <= 1 for m in sent)
    ring = explorer.fig.data[2].marker
    assert ring.color == "rgba(0,0,0,0)" and ring.line.width == 3


def test_explorer_click_opens_panel(explorer: TreeExplorer) -> None:
    explorer.expand(3)
    i = len(explorer.layout) - 1
    node_id = int(explorer.layout["id"].iloc[i])
    trace = explorer.fig.data[NODES]
    points = Points(point_inds=[i], xs=[trace.x[i]], ys=[trace.y[i]], trace_name="nodes",
                    trace_index=NODES)  # fmt: skip
    trace._dispatch_on_click(points, None)  # what the front end's click message triggers
    assert explorer.selected == node_id
    node = explorer.tree[node_id]
    html = explorer.panel.value
    assert f"data-node='{node_id}'" in html
    assert node.text.strip().replace("*", "") in html.replace("*", "")
    assert list(explorer.fig.data[2].x) == [trace.x[i]]  # the ring moved there


def test_panel_tokens_and_pages_are_the_engines(explorer: TreeExplorer) -> None:
    tree, engine = explorer.tree, explorer.tree.engine
    kid = explorer.expand(2)[0]
    info = node_info(tree, kid)
    assert kid.branch is not None
    assert [t.logprob for t in info.tokens] == pytest.approx(engine.output_logprobs(kid.branch))
    assert sum(t.logprob for t in info.tokens) == pytest.approx(kid.logprob, abs=1e-4)
    refs = engine.tree.page_refcounts()
    assert info.pages == [(p, refs[p]) for p in engine.tree.page_list(kid.branch.kv)]
    assert info.pages[0][1] == engine.stats().live_branches  # the prompt page: everyone's
    tree.release(kid, remove=False)
    gone = node_info(tree, kid)
    assert gone.pages == [] and gone.branch is None and not any(t.exact for t in gone.tokens)
    assert "branch released" in node_html(gone)
    assert "<script>" not in node_html(info._replace(steps=["<script>"]))


def test_explorer_export_round_trips(explorer: TreeExplorer, engine: Engine) -> None:
    explorer.expand(2)
    out = explorer.export()
    assert len(out.frame) == len(explorer.tree)
    again = SearchTree.from_json(out.json, engine, STEP)
    try:
        assert again.to_frame()["text"].tolist() == out.frame["text"].tolist()
    finally:
        again.close()


def test_big_tree_is_collapsed_and_webgl(engine: Engine) -> None:
    big = SearchTree.from_json(synthetic_tree_json(5000), engine)
    try:
        ex = TreeExplorer(big)
        assert isinstance(ex.fig.data[NODES], go.Scattergl)
        assert 2000 <= _drawn(ex) < 5000
        ex.max_depth.value = 3  # the depth box redraws
        assert _drawn(ex) == int((big.to_frame()["depth"] <= 3).sum())
        assert isinstance(ex.fig.data[NODES], go.Scatter)  # back under the WebGL threshold
        ex.select(int(ex.layout["id"].iloc[-1]))
        assert "none pinned" in ex.panel.value
    finally:
        big.close()


# ---------------------------------------------------------------- dashboards (engine data)


@pytest.fixture(scope="module")
def mcts_tree(engine: Engine) -> Iterator[SearchTree]:
    task = Game24Task(PUZZLE)
    tree = SearchTree(engine, g24.prompt(PUZZLE), STEP, seed=0)
    mcts(tree, MCTSConfig(simulations=8, children=3, max_depth=5), Game24Value(task),
         verifier=task.verifier, classify=task.classify)  # fmt: skip
    yield tree
    tree.close()


def test_sharing_map_counts_what_the_engine_reports(engine: Engine, mcts_tree: SearchTree) -> None:
    stats = engine.stats()
    assert stats.shared_pages > 0
    fig = D.fig_sharing_map(sharing_frame(engine, tree_branches(mcts_tree)))
    assert fig.layout.meta["shared_pages"] == stats.shared_pages
    z = np.asarray(fig.data[0].z, dtype=float)  # the drawn cells say the same
    assert int((np.nanmax(z, axis=0) >= 2).sum()) == stats.shared_pages
    assert z.shape == (stats.live_branches, stats.used_pages)  # every live branch, every page
    assert f"{stats.shared_pages} shared" in fig.layout.title.text
    hist = D.fig_refcount_histogram(refcount_frame(engine))
    assert hist.layout.meta["shared_pages"] == stats.shared_pages


def test_mcts_iterations_slider(mcts_tree: SearchTree) -> None:
    snaps = mcts_tree.snapshots_frame()
    fig = D.fig_mcts_iterations(snaps)
    steps = fig.layout.sliders[0].steps
    assert [s.label for s in steps] == [str(i) for i in range(1, 9)]
    root_visits = [s.args[0]["y"][0][0] for s in steps]  # the root is node 0, first bar
    assert root_visits == list(range(1, 9))
    assert len(fig.data[0].x) == snaps["id"].nunique()
    assert len(D.fig_mcts_iterations(snaps, max_steps=3).layout.sliders[0].steps) == 3


def test_pool_occupancy_and_tot(engine: Engine) -> None:
    task = Game24Task(PUZZLE)
    engine.telemetry.clear()
    base = engine.stats().used_pages
    with SearchTree(engine, g24.prompt(PUZZLE), STEP, seed=1) as tree:
        tot_bfs(tree, Game24Value(task), breadth=2, k=2, max_depth=2, verifier=task.verifier,
                classify=task.classify)  # fmt: skip
        peak = engine.stats().used_pages
    pages = engine.telemetry.pages_frame()
    fig = D.fig_pool_occupancy(pages, engine.pool.num_pages)
    used = np.asarray(fig.data[0].y)
    assert used[-1] == base  # everything went back
    assert fig.layout.meta["peak_pages"] >= peak


def test_benchmark_figures() -> None:
    from dendrite.bench.fork import run

    result = run(forks=20, contexts=(16, 256), depths=(1, 10))
    fig = D.fig_fork_latency(result)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert list(fig.data[0].x) == [16, 256] and len(fig.data) == 3
    gpu = json.loads((ROOT / "data" / "benchmarks" / "h200-bench-gpu.json").read_text())
    g = D.fig_gpu_bench(gpu)
    assert g.data[0].y[0] == gpu["tree"]["dendrite_tok_s"]
    beam = gpu["beam"]  # the beam panel: pipelined, KV-tree branches, HF, in seconds
    want = [beam["dendrite_s"], beam["dendrite_tree_path_s"], beam["hf_s"]]
    assert [list(t.y) for t in g.data if t.xaxis == "x4"] == [want]
    depth = json.loads((ROOT / "data" / "benchmarks" / "h200-bench-cascade-depth.json").read_text())
    c = D.fig_cascade_depth(depth)  # plain, two-level, by depth: each row's GPU time
    want = [[r[f"{k}_gpu_us"] for r in depth["rows"]] for k in ("plain", "two", "depth")]
    assert [list(t.y) for t in c.data] == want
    assert len(c.data[0].x) == len(depth["rows"])
    old = {**gpu, "beam": {"dendrite_s": 0.2, "hf_s": 1.0}}  # a run before the tree-path key
    assert [list(t.y) for t in D.fig_gpu_bench(old).data if t.xaxis == "x4"] == [[0.2, 1.0]]
    beams = pd.DataFrame(
        {"width": [2, 4], "peak_pages": [8, 14], "copy_pages": [10, 20], "min_pages": [6, 9]}
    )
    assert list(D.fig_beam_pages(beams).data[1].y) == [10, 20]
    rates = pd.DataFrame({"method": ["greedy", "mcts"], "rate": [0.25, 0.75], "solved": [2, 6],
                          "total": [8, 8], "tokens": [600, 9000]})  # fmt: skip
    assert list(D.fig_solve_rates(rates).data[0].y) == [25.0, 75.0]
