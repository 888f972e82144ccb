"""Where each node of a search tree goes on screen: a pure function of ``tree.to_frame()``.

The frame is one row per node in depth-first order (``SearchTree.to_frame``). Depth is one
axis; the other is the depth-first order of the leaves, with every inner node centred over
its first and last child (a "tidy" tree)::

    depth 0     1      2
          .---- a ---- c      leaf slot 0
    root -+      `---- d      leaf slot 1         a sits at 0.5, between c and d
          `---- b             leaf slot 2         root at (0.5 + 2) / 2 = 1.25

Large trees are collapsed before layout: nodes deeper than ``max_depth`` are dropped, and when
more than ``max_nodes`` remain only the most visited are kept (with their ancestors, so what is
drawn is still a tree). A node with children that are not drawn is marked ``collapsed``.

Everything here is plain pandas/numpy so the tests run it without a browser or a kernel.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

LAYOUT_COLUMNS = (
    "id", "parent", "depth", "x", "y", "visits", "value", "colour", "size", "symbol",
    "line_colour", "line_width", "terminal", "solved", "hidden_children", "hover",
)  # fmt: skip

SOLVED_REWARD = 1.0  # a terminal node whose reward reaches this is a solution


def visible_nodes(
    frame: pd.DataFrame, max_depth: int | None = None, max_nodes: int | None = None
) -> pd.DataFrame:
    """The rows to draw, still in depth-first order: depth-limited, then the ``max_nodes``
    most visited (ties: earlier in depth-first order) plus their ancestors."""
    out = frame
    if max_depth is not None:
        out = out[out["depth"] <= max_depth]
    if max_nodes is not None and len(out) > max_nodes:
        order = np.lexsort((out["order"].to_numpy(), -out["visits"].to_numpy()))
        keep = set(out["id"].to_numpy()[order[:max_nodes]].tolist())
        parent_of = dict(zip(frame["id"].tolist(), frame["parent"].tolist(), strict=True))
        for node in list(keep):
            p = parent_of[node]
            while p is not None and not _isnan(p) and int(p) not in keep:
                keep.add(int(p))
                p = parent_of[int(p)]
        out = out[out["id"].isin(keep)]
    return out


def _isnan(x: object) -> bool:
    return isinstance(x, float) and math.isnan(x)


def tidy_positions(ids: list[int], parents: list[int | None]) -> tuple[list[float], list[int]]:
    """Leaf-slot coordinate of each node (depth-first rows) and its number of drawn children."""
    index = {node: i for i, node in enumerate(ids)}
    kids: list[list[int]] = [[] for _ in ids]
    for i, p in enumerate(parents):
        if p is not None and p in index:
            kids[index[p]].append(i)
    slot = [0.0] * len(ids)
    leaf = 0
    for i in range(len(ids)):  # leaves in depth-first order
        if not kids[i]:
            slot[i] = float(leaf)
            leaf += 1
    for i in reversed(range(len(ids))):  # children come after their parent: fill bottom-up
        if kids[i]:
            slot[i] = (slot[kids[i][0]] + slot[kids[i][-1]]) / 2
    return slot, [len(k) for k in kids]


def marker_size(visits: np.ndarray) -> np.ndarray:
    """Marker diameter in px: 6 for an unvisited node up to 30 for the most visited one, by
    the square root of the visits' share (so area follows visits, whatever the tree's size)."""
    top = float(visits.max()) if len(visits) else 0.0
    share = np.maximum(visits, 0) / top if top > 0 else np.zeros_like(visits)
    return 6.0 + 24.0 * np.sqrt(share)


def layout_frame(
    frame: pd.DataFrame,
    *,
    max_depth: int | None = None,
    max_nodes: int | None = None,
    orientation: str = "h",
) -> pd.DataFrame:
    """One row per drawn node with its position and marker style (columns ``LAYOUT_COLUMNS``).

    ``orientation="h"``: depth grows along x, leaves are stacked along y (slot 0 at the top:
    use a reversed y axis); ``"v"``: depth grows downwards along y (y = -depth), leaves along x.
    ``colour`` is the node's mean value when visited, else its value estimate (NaN if none).
    """
    if orientation not in ("h", "v"):
        raise ValueError(f"orientation must be 'h' or 'v', got {orientation!r}")
    if len(frame) == 0:
        return pd.DataFrame({c: [] for c in LAYOUT_COLUMNS})
    rows = visible_nodes(frame, max_depth, max_nodes)
    ids = [int(i) for i in rows["id"]]
    parents = [None if p is None or _isnan(p) else int(p) for p in rows["parent"]]
    slot, drawn_kids = tidy_positions(ids, parents)
    depth = rows["depth"].to_numpy(dtype=float)
    visits = rows["visits"].to_numpy(dtype=float)
    value = rows["value"].to_numpy(dtype=float)
    estimate = pd.to_numeric(rows["estimate"], errors="coerce").to_numpy(dtype=float)
    reward = pd.to_numeric(rows["reward"], errors="coerce").to_numpy(dtype=float)
    terminal = rows["terminal"].to_numpy(dtype=bool)
    solved = terminal & (np.nan_to_num(reward, nan=-1.0) >= SOLVED_REWARD)
    hidden = rows["num_children"].to_numpy(dtype=int) - np.asarray(drawn_kids, dtype=int)
    colour = np.where(visits > 0, value, estimate)
    symbol = np.where(
        solved, "star", np.where(terminal, "square", np.where(hidden > 0, "diamond", "circle"))
    )
    line_colour = np.where(solved, "#d4a000", np.where(terminal, "#333333", "#ffffff"))
    line_width = np.where(solved, 2.5, np.where(terminal, 1.5, 0.5))
    pos = np.asarray(slot, dtype=float)
    x, y = (depth, pos) if orientation == "h" else (pos, -depth)
    texts = rows["text"].astype(str).tolist()
    hover = [
        f"#{i} depth {int(d)} · N={int(n)} · Q={q:.3f}<br>{_short(t)}"
        + (f"<br>+{h} hidden" if h > 0 else "")
        for i, d, n, q, t, h in zip(ids, depth, visits, colour, texts, hidden, strict=True)
    ]
    return pd.DataFrame(
        {
            "id": ids,
            "parent": pd.array(parents, dtype="Int64"),
            "depth": depth.astype(int),
            "x": x,
            "y": y,
            "visits": visits.astype(int),
            "value": value,
            "colour": colour,
            "size": marker_size(visits),
            "symbol": symbol,
            "line_colour": line_colour,
            "line_width": line_width,
            "terminal": terminal,
            "solved": solved,
            "hidden_children": hidden,
            "hover": hover,
        }
    )


def _short(text: str, n: int = 60) -> str:
    flat = text.replace("\n", "⏎").replace("<", "&lt;").replace(">", "&gt;")
    return flat if len(flat) <= n else flat[: n - 1] + "…"


def edge_coords(layout: pd.DataFrame) -> tuple[list[float | None], list[float | None]]:
    """x and y of every parent -> child segment, ``None``-separated (one line trace)."""
    pos = dict(zip(layout["id"].tolist(), zip(layout["x"], layout["y"], strict=True), strict=True))
    xs: list[float | None] = []
    ys: list[float | None] = []
    for node, parent in zip(layout["id"].tolist(), layout["parent"].tolist(), strict=True):
        if parent is pd.NA or parent is None or parent not in pos:
            continue
        (x0, y0), (x1, y1) = pos[parent], pos[node]
        xs += [float(x0), float(x1), None]
        ys += [float(y0), float(y1), None]
    return xs, ys
