"""The tree explorer: a search tree drawn live, a node panel, and the buttons that grow it.

Python owns all state: the :class:`~dendrite.search.tree.SearchTree` (and through it the
engine) is the model; the view is a plotly ``FigureWidget`` with three traces (edges, nodes,
the selected node's ring) whose arrays are replaced *in place* on every refresh
(``fig.batch_update``), never re-created. Positions come from the pure
:func:`widgets.layout.layout_frame` over ``tree.to_frame()``; the node panel from
:mod:`widgets.panel`. Actions call the search package (``expand``, ``mcts``, ``release``) and
nothing else.

Example (in a notebook)::

    ex = TreeExplorer(tree, task=Game24Task((4, 4, 10, 10)))
    ex                       # the widget
    ex.run_mcts(32)          # grows live; the progress bar follows
    ex.select(5); ex.expand(3); ex.prune(); ex.export().frame
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import ipywidgets as W
import pandas as pd
import plotly.graph_objects as go

from dendrite.errors import DendriteError
from dendrite.search.mcts import MCTSConfig, SearchResult, evaluate, mcts
from dendrite.search.tree import Node, SearchTree
from dendrite.search.value import LogprobValue, ValueFunction
from widgets.layout import edge_coords, layout_frame
from widgets.panel import node_html, node_info

EDGES, NODES, SELECTED = 0, 1, 2  # trace indices


class Task(Protocol):
    """What the explorer needs of a task (``Game24Task`` is one): a verifier for answers and a
    hook that marks new nodes terminal."""

    def verifier(self, path_text: str) -> float: ...

    def classify(self, tree: SearchTree, nodes: list[Node]) -> None: ...


class TreeExport(NamedTuple):
    json: str  # SearchTree.to_json(): round-trips through SearchTree.from_json
    frame: pd.DataFrame  # SearchTree.to_frame(): one row per node


def _default_value(task: Task | None) -> ValueFunction:
    from dendrite.tasks.game24_eval import Game24Task, Game24Value

    return Game24Value(task) if isinstance(task, Game24Task) else LogprobValue()


class TreeExplorer:
    """Interactive view of a :class:`SearchTree`; display it as the last expression of a cell.

    ``task`` supplies the verifier and terminal rules (optional), ``value`` the node values
    (default: the task's own for the Game of 24, else :class:`LogprobValue`), ``config`` the
    MCTS settings (``simulations`` is replaced by each run's count). ``max_nodes`` caps what is
    drawn (the most visited, with their ancestors); above ``webgl_threshold`` drawn nodes the
    traces switch to WebGL (``Scattergl``).
    """

    def __init__(
        self,
        tree: SearchTree,
        task: Task | None = None,
        value: ValueFunction | None = None,
        *,
        config: MCTSConfig | None = None,
        max_nodes: int = 2000,
        webgl_threshold: int = 1000,
        refresh_every: int = 1,
        export_path: str | Path | None = None,
        height: int = 520,
    ) -> None:
        self.tree = tree
        self.task = task
        self.value = value or _default_value(task)
        self.config = config or MCTSConfig(children=3, max_depth=8)
        self.webgl_threshold = webgl_threshold
        self.refresh_every = max(1, refresh_every)
        self.export_path = Path(export_path) if export_path is not None else None
        self.iterations = 0  # MCTS simulations run through this explorer
        self.selected: int = tree.root.id
        self.last_result: SearchResult | None = None
        self.last_export: TreeExport | None = None
        self.layout = layout_frame(tree.to_frame())
        self._gl = len(self.layout) > webgl_threshold

        self.fig = go.FigureWidget(data=self._traces(self._gl), layout=_fig_layout(height))
        self._hook_click()
        self.panel = W.HTML(
            layout=W.Layout(flex="0 0 380px", width="380px", height=f"{height}px", overflow="auto")
        )
        self.panel.add_class("dendrite-panel")
        self.status = W.HTML()
        self.progress = W.IntProgress(value=0, min=0, max=1, description="MCTS")
        self.k = W.BoundedIntText(value=self.config.children, min=1, max=16, description="k")
        self.sims = W.BoundedIntText(value=16, min=1, max=10_000, description="N")
        self.max_depth = W.BoundedIntText(value=64, min=0, max=10_000, description="max depth")
        self.max_nodes = W.BoundedIntText(value=max_nodes, min=1, max=10**6, description="draw")
        buttons: list[tuple[str, str, Callable[[], object]]] = [
            ("expand k", "expand k children of the selected node", lambda: self.expand()),
            ("fork here", "one more sampled child of the selected node", self.fork_here),
            ("prune", "release the selected node's subtree", lambda: self.prune()),
            ("run N MCTS", "run N MCTS simulations from the root", lambda: self.run_mcts()),
            ("reset", "release every node below the root", self.reset),
            ("export", "tree as JSON and DataFrame", lambda: self.export()),
        ]
        self.buttons: dict[str, W.Button] = {}
        for label, tip, action in buttons:
            b = W.Button(description=label, tooltip=tip, layout=W.Layout(width="auto"))
            b.on_click(self._handler(action))
            self.buttons[label] = b
        for w in (self.max_depth, self.max_nodes):
            w.observe(lambda _: self.refresh(), names="value")
        small = W.Layout(width="150px")
        for w in (self.k, self.sims, self.max_depth, self.max_nodes):
            w.layout = small
            w.style = {"description_width": "initial"}
        controls = W.HBox([self.k, *(self.buttons[b] for b in ("expand k", "fork here", "prune"))])
        search = W.HBox([self.sims, self.buttons["run N MCTS"], self.progress])
        view = W.HBox(
            [self.max_depth, self.max_nodes, self.buttons["reset"], self.buttons["export"]]
        )
        self.widget = W.VBox(
            [
                controls,
                search,
                view,
                W.HBox([self.fig, self.panel], layout=W.Layout(flex_flow="row wrap")),
                self.status,
            ]
        )
        self.widget.add_class("dendrite-explorer")
        self.refresh()
        self.select(self.selected)

    # ------------------------------------------------------------------ display

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _traces(self, gl: bool) -> list[go.Scatter | go.Scattergl]:
        Trace = go.Scattergl if gl else go.Scatter
        edges = Trace(
            x=[], y=[], mode="lines", name="edges", hoverinfo="skip",
            line={"color": "rgba(120,120,120,0.5)", "width": 1},
        )  # fmt: skip
        nodes = Trace(
            x=[], y=[], mode="markers", name="nodes", hoverinfo="text",
            marker={
                "color": [], "size": [], "colorscale": "Viridis", "cmin": 0.0, "cmax": 1.0,
                "showscale": True, "colorbar": {"title": {"text": "value"}, "thickness": 12},
                "line": {"color": [], "width": []},
            },
        )  # fmt: skip
        ring = Trace(
            x=[], y=[], mode="markers", name="selected", hoverinfo="skip",
            marker={"size": 22, "color": "rgba(0,0,0,0)", "line": {"color": "#e4572e", "width": 3}},
        )  # fmt: skip
        return [edges, nodes, ring]

    def _rebuild_traces(self, gl: bool) -> None:
        """Swap SVG and WebGL traces (only when the drawn node count crosses the threshold)."""
        self.fig.data = ()
        self.fig.add_traces(self._traces(gl))
        self._gl = gl
        self._hook_click()

    def _hook_click(self) -> None:
        self.fig.data[NODES].on_click(self._on_click)

    def _on_click(self, trace: Any, points: Any, state: Any) -> None:
        if points.point_inds:
            self.select(int(self.layout["id"].iloc[points.point_inds[0]]))

    def refresh(self) -> None:
        """Recompute the layout and replace the traces' arrays in place."""
        lay = layout_frame(
            self.tree.to_frame(), max_depth=self.max_depth.value, max_nodes=self.max_nodes.value
        )
        self.layout = lay
        gl = len(lay) > self.webgl_threshold
        if gl != self._gl or len(self.fig.data) != 3:
            self._rebuild_traces(gl)
        ex, ey = edge_coords(lay)
        solved = int(lay["solved"].sum())
        # One batch (one restyle message) per trace: a batch spanning traces sends the
        # properties one trace changed as "undefined" for the others, which the front end drops.
        e, n = self.fig.data[EDGES], self.fig.data[NODES]
        with self.fig.batch_update():
            e.x, e.y = ex, ey
        with self.fig.batch_update():
            n.x, n.y = lay["x"].to_numpy(), lay["y"].to_numpy()
            n.customdata = lay["id"].to_numpy()
            n.hovertext = lay["hover"].tolist()
            n.marker.color = lay["colour"].to_numpy()  # NaN (not evaluated): drawn grey
            n.marker.size = lay["size"].to_numpy()
            n.marker.symbol = lay["symbol"].tolist()
            n.marker.line.color = lay["line_colour"].tolist()
            n.marker.line.width = lay["line_width"].to_numpy()
            self.fig.layout.title.text = (
                f"{len(self.tree)} nodes ({len(lay)} drawn) · {self.iterations} MCTS "
                f"simulations · {solved} solved"
            )
        self._place_ring()
        self._show_stats()

    def _place_ring(self) -> None:
        row = self.layout[self.layout["id"] == self.selected]
        ring = self.fig.data[SELECTED]
        with self.fig.batch_update():
            ring.x, ring.y = row["x"].tolist(), row["y"].tolist()
            ring.marker.size = float(row["size"].iloc[0]) + 12 if len(row) else 22

    def _show_stats(self, message: str = "", error: bool = False) -> None:
        s = self.tree.engine.stats()
        colour = "#c0392b" if error else "#333"
        text = (
            f"engine: {s.live_branches} live branches · {s.used_pages} pages used, "
            f"{s.shared_pages} shared · {s.logical_tokens:,} tokens held as {s.unique_tokens:,}"
        )
        self.status.value = (
            f"<span style='color:{colour}'>{message}</span>"
            f"{' · ' if message else ''}<span style='color:#666'>{text}</span>"
        )

    def _handler(self, action: Callable[[], object]) -> Callable[[W.Button], None]:
        """A button callback that shows a package error in the status line instead of raising."""

        def run(_: W.Button) -> None:
            try:
                action()
            except DendriteError as e:
                self._show_stats(f"{type(e).__name__}: {e}", error=True)

        return run

    # ------------------------------------------------------------------ selection

    def node(self, node_id: int | None = None) -> Node:
        return self.tree[self.selected if node_id is None else node_id]

    def select(self, node_id: int) -> None:
        """Show ``node_id`` in the panel and ring it in the figure."""
        node = self.tree[node_id]
        self.selected = node.id
        self.panel.value = node_html(node_info(self.tree, node))
        self._place_ring()

    # ------------------------------------------------------------------ actions

    def _prepare(self, kids: list[Node]) -> None:
        """New children: depth-limit, task rules, then values (batched), as MCTS does."""
        for kid in kids:
            kid.terminal = kid.terminal or kid.depth >= self.config.max_depth
        if self.task is not None:
            self.task.classify(self.tree, kids)
        evaluate(self.tree, kids, self.value, self.task.verifier if self.task else None)

    def expand(self, k: int | None = None, node: int | None = None) -> list[Node]:
        """Expand the selected node (or ``node``) ``k`` ways (default: the k box)."""
        target = self.node(node)
        kids = self.tree.expand(target, self.k.value if k is None else k)
        self._prepare(kids)
        self.refresh()
        self._show_stats(f"expanded node {target.id}: {len(kids)} new children")
        return kids

    def fork_here(self, node: int | None = None) -> Node:
        """One O(1) fork of the node's pinned branch, one sampled step; selects the new child
        (repeat it to walk down one line of reasoning)."""
        target = self.node(node)
        (kid,) = self.tree.expand(target, 1)
        self._prepare([kid])
        self.refresh()
        self.select(kid.id)
        self._show_stats(f"forked node {target.id} into node {kid.id}")
        return kid

    def prune(self, node: int | None = None) -> int:
        """Release the node's subtree (its pages go back to the pool); selects its parent."""
        target = self.node(node)
        if target.parent is None:
            raise DendriteError("the root cannot be pruned; use reset to drop its children")
        parent, size = target.parent, sum(1 for _ in self.tree.dfs(target))
        freed = self.tree.release(target)
        if self.selected not in self.tree.nodes:
            self.selected = parent
        self.refresh()
        self.select(self.selected)
        self._show_stats(f"pruned {size} nodes, freed {freed} branches")
        return freed

    def reset(self) -> None:
        """Back to the root alone: release every child subtree, clear visits and snapshots."""
        root = self.tree.root
        for child in list(self.tree.children(root)):
            self.tree.release(child)
        root.visits, root.value_sum = 0, 0.0
        self.tree.snapshots.clear()
        self.iterations = 0
        self.selected = root.id
        self.progress.value = 0
        self.refresh()
        self.select(root.id)

    def run_mcts(self, n: int | None = None) -> SearchResult:
        """``n`` MCTS simulations (default: the N box); the figure and progress bar update in
        place every ``refresh_every`` simulations."""
        n = self.sims.value if n is None else n
        cfg = replace(self.config, simulations=n, snapshots=False)
        self.progress.max, self.progress.value = max(n, 1), 0
        record = self.config.snapshots

        def on_iteration(it: int, tree: SearchTree) -> None:
            self.iterations += 1
            if record:
                tree.snapshot(self.iterations)
            self.progress.value = it
            if it % self.refresh_every == 0:
                self.refresh()

        verifier = self.task.verifier if self.task is not None else None
        classify = self.task.classify if self.task is not None else None
        res = mcts(self.tree, cfg, self.value, verifier, on_iteration, classify)
        self.last_result = res
        self.refresh()
        self.select(self.selected if self.selected in self.tree.nodes else self.tree.root.id)
        self._show_stats(
            f"{res.iterations} simulations, {res.engine_steps} engine steps"
            + (f", solved: path {res.best_path}" if res.solved else "")
        )
        return res

    def export(self) -> TreeExport:
        """The tree as JSON and as a DataFrame (also written to ``export_path`` if set)."""
        out = TreeExport(self.tree.to_json(), self.tree.to_frame())
        self.last_export = out
        where = ""
        if self.export_path is not None:
            self.export_path.write_text(out.json)
            out.frame.to_csv(self.export_path.with_suffix(".csv"), index=False)
            where = f" to {self.export_path} and its .csv"
        self._show_stats(f"exported {len(out.frame)} nodes{where} (explorer.last_export)")
        return out


def _fig_layout(height: int) -> go.Layout:
    return go.Layout(
        height=height, width=620, margin={"l": 10, "r": 10, "t": 40, "b": 30},
        showlegend=False, hovermode="closest", plot_bgcolor="white",
        title={"text": "", "font": {"size": 13}},
        xaxis={"title": {"text": "depth"}, "showgrid": False, "zeroline": False, "dtick": 1},
        yaxis={"visible": False, "autorange": "reversed"},
    )  # fmt: skip
