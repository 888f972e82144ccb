"""Dashboards: plotly figures from DataFrames and result dicts. Data in, figure out.

Each ``fig_*`` function takes what the package already produces (``sharing_frame``, the
telemetry frames, ``tree.snapshots_frame()``, the dicts of ``dendrite.bench.*.run``) and
returns a ``go.Figure``; none of them touches an engine. Figures carry the numbers they show in
``layout.meta`` (e.g. the sharing map's shared-page count) so tests can compare them with the
engine's own report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PRIVATE, SHARED, COPY = "#bdbdbd", "#2171b5", "#e6550d"  # private page, shared page, baseline
_BASE = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 60, "b": 50}}
_SUBPLOTS = {**_BASE, "margin": {"l": 60, "r": 20, "t": 90, "b": 50}}  # room for subplot titles


def fig_sharing_map(sharing: pd.DataFrame, title: str = "Branch × page sharing") -> go.Figure:
    """Heatmap: one row per branch, one column per page it reads (first-read order); a cell is
    the number of live branches reading that page (grey: private, blue: shared).

    ``sharing`` is :func:`widgets.frames.sharing_frame`. ``layout.meta`` holds ``branches``,
    ``pages`` and ``shared_pages`` (pages read by two or more live branches).
    """
    labels = list(dict.fromkeys(sharing["label"]))
    pages = list(dict.fromkeys(sharing["page"]))
    col = {p: j for j, p in enumerate(pages)}
    row = {lab: i for i, lab in enumerate(labels)}
    z = np.full((len(labels), len(pages)), np.nan)
    for lab, p, c in zip(sharing["label"], sharing["page"], sharing["refcount"], strict=True):
        z[row[lab], col[p]] = c
    refs = sharing.drop_duplicates("page").set_index("page")["refcount"]
    shared = int((refs >= 2).sum())
    zmax = max(2.0, float(np.nanmax(z)) if z.size else 2.0)
    cut = 1.5 / zmax  # refcount 1 -> grey, 2..max -> light to dark blue
    scale = [[0.0, PRIVATE], [cut, PRIVATE], [cut, "#c6dbef"], [1.0, "#08306b"]]
    fig = go.Figure(
        go.Heatmap(
            z=z, x=[str(p) for p in pages], y=labels, colorscale=scale, zmin=0.0, zmax=zmax,
            xgap=1, ygap=1, colorbar={"title": {"text": "readers"}},
            hovertemplate="%{y}<br>page %{x}<br>read by %{z} live branches<extra></extra>",
        )
    )  # fmt: skip
    fig.update_layout(
        **_BASE,
        title=f"{title}: {len(labels)} branches read {len(pages)} pages, {shared} shared",
        xaxis={"title": "page (in first-read order)", "type": "category",
               "showticklabels": len(pages) <= 60},
        yaxis={"title": "branch", "autorange": "reversed", "type": "category",
               "showticklabels": len(labels) <= 60},
        meta={"branches": len(labels), "pages": len(pages), "shared_pages": shared},
    )  # fmt: skip
    return fig


def fig_refcount_histogram(refcounts: pd.DataFrame) -> go.Figure:
    """Bars: how many pages are read by 1, 2, 3, ... live branches (``refcount_frame``)."""
    counts = refcounts["refcount"].value_counts().sort_index()
    colours = [PRIVATE if r < 2 else SHARED for r in counts.index]
    fig = go.Figure(
        go.Bar(
            x=counts.index.tolist(), y=counts.to_numpy(), marker_color=colours,
            hovertemplate="read by %{x} branches: %{y} pages<extra></extra>",
        )
    )  # fmt: skip
    shared = int(counts[counts.index >= 2].sum())
    fig.update_layout(
        **_BASE,
        title=f"Page refcounts: {int(counts.sum())} pages, {shared} shared",
        xaxis={"title": "live branches reading the page", "dtick": 1},
        yaxis={"title": "pages"},
        meta={"pages": int(counts.sum()), "shared_pages": shared},
    )
    return fig


def fig_pool_occupancy(pages: pd.DataFrame, total_pages: int) -> go.Figure:
    """Pages in use after each pool event (``telemetry.pages_frame()``) over time; copy-on-write
    events marked."""
    if len(pages) == 0:
        t = np.zeros(0)
        used = np.zeros(0)
    else:
        t = (pages["t_ns"].to_numpy() - pages["t_ns"].iloc[0]) / 1e9
        used = total_pages - pages["free_after"].to_numpy()
    fig = go.Figure(
        go.Scatter(
            x=t, y=used, mode="lines", line_shape="hv", name="pages in use",
            line={"color": SHARED}, hovertemplate="%{x:.3f} s: %{y} pages<extra></extra>",
        )
    )  # fmt: skip
    if len(pages):
        cow = (pages["event"] == "cow").to_numpy()
        fig.add_trace(
            go.Scatter(
                x=t[cow],
                y=used[cow],
                mode="markers",
                name="copy-on-write of a partial page",
                marker={"color": COPY, "size": 5},
            )
        )
    peak = int(used.max()) if len(used) else 0
    fig.update_layout(
        **_BASE,
        title=f"Pool occupancy: peak {peak} of {total_pages:,} pages",
        xaxis={"title": "seconds since the first page event"},
        yaxis={"title": "pages in use", "rangemode": "tozero"},
        legend={"orientation": "h", "y": -0.2},
        meta={"peak_pages": peak, "total_pages": total_pages},
    )
    return fig


def fig_fork_latency(result: dict[str, Any]) -> go.Figure:
    """Fork latency against context length (log-log) beside the full-copy baseline, and
    against tree depth; ``result`` is ``dendrite.bench.fork.run()``'s dict."""
    ctx = sorted(int(c) for c in result["fork_us"])
    fork = [result["fork_us"][str(c)] for c in ctx]
    copy = [result["copy_us"][str(c)] for c in ctx]
    depth = sorted(int(d) for d in result.get("fork_depth_us", {}))
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.12,
        subplot_titles=("against context length", "against tree depth"),
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=ctx, y=fork, mode="lines+markers", name="Dendrite fork (O(1))",
                   line={"color": SHARED}),
        row=1, col=1,
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=ctx, y=copy, mode="lines+markers", name="copy the branch's KV",
                   line={"color": COPY, "dash": "dash"}),
        row=1, col=1,
    )  # fmt: skip
    if depth:
        fig.add_trace(
            go.Scatter(x=depth, y=[result["fork_depth_us"][str(d)] for d in depth],
                       mode="lines+markers", name="fork at depth", line={"color": "#6a51a3"}),
            row=1, col=2,
        )  # fmt: skip
    fig.update_xaxes(type="log", title_text="context length (tokens)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="median latency (µs)", row=1, col=1)
    fig.update_xaxes(type="log", title_text="tree depth", row=1, col=2)
    fig.update_yaxes(title_text="median fork (µs)", rangemode="tozero", row=1, col=2)
    ratio = copy[-1] / fork[-1] if fork else float("nan")
    fig.update_layout(
        **_SUBPLOTS,
        title=f"Fork latency: at {ctx[-1]:,} tokens a copy costs {ratio:,.0f}× a fork",
        legend={"orientation": "h", "y": -0.25},
        meta={"copy_over_fork_at_max": ratio},
    )
    return fig


def fig_mcts_iterations(snapshots: pd.DataFrame, max_steps: int = 40) -> go.Figure:
    """Visits (bars) and mean value (dots) of every node after each MCTS simulation, with a
    slider over simulations. ``snapshots`` is ``tree.snapshots_frame()``; nodes are in creation
    order, so new ones appear on the right. At most ``max_steps`` slider positions."""
    iters = sorted(snapshots["iteration"].unique().tolist())
    if len(iters) > max_steps:
        pick = np.linspace(0, len(iters) - 1, max_steps).round().astype(int)
        iters = [iters[i] for i in sorted(set(pick.tolist()))]
    ids = sorted(snapshots["id"].unique().tolist())
    xs = [str(i) for i in ids]
    by_iter = {it: g.set_index("id") for it, g in snapshots.groupby("iteration")}

    def arrays(it: int) -> tuple[list[float], list[float | None]]:
        g = by_iter[it].reindex(ids)
        value = [None if np.isnan(v) else float(v) for v in g["value"]]
        return g["visits"].fillna(0).astype(float).tolist(), value

    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        row_heights=[0.6, 0.4])  # fmt: skip
    if not iters:
        fig.update_layout(**_BASE, title="MCTS: no snapshots recorded")
        return fig
    visits, value = arrays(iters[-1])
    fig.add_trace(go.Bar(x=xs, y=visits, marker={"color": SHARED}, name="visits"), row=1, col=1)
    fig.add_trace(
        go.Scatter(
            x=xs, y=value, mode="markers", name="value",
            marker={"color": value, "colorscale": "Viridis", "cmin": 0, "cmax": 1, "size": 7},
        ),
        row=2, col=1,
    )  # fmt: skip
    steps = []
    for it in iters:  # each slider step restyles the two traces with that simulation's arrays
        v, q = arrays(it)
        steps.append(
            {"label": str(it), "method": "restyle",
             "args": [{"y": [v, q], "marker.color": [SHARED, q]}, [0, 1]]}
        )  # fmt: skip
    vmax = float(snapshots["visits"].max()) if len(snapshots) else 1.0
    fig.update_yaxes(title_text="visits", range=[0, vmax * 1.05], row=1, col=1)
    fig.update_yaxes(title_text="value", range=[-0.05, 1.05], row=2, col=1)
    fig.update_xaxes(title_text="node (creation order)", type="category", row=2, col=1)
    fig.update_layout(
        **_BASE,
        title=f"MCTS: visits and value per node across {iters[-1]} simulations",
        showlegend=False,
        sliders=[{"active": len(iters) - 1, "steps": steps, "y": -0.12,
                  "currentvalue": {"prefix": "after simulation "}}],
        meta={"iterations": iters, "nodes": len(ids)},
    )  # fmt: skip
    return fig


def fig_beam_pages(frame: pd.DataFrame) -> go.Figure:
    """Peak KV pages of beam search on the engine against a copy-per-beam cache, per width.

    ``frame``: columns ``width``, ``peak_pages``, ``copy_pages``, ``min_pages`` (one row per
    ``beam_search`` run; see :func:`widgets.frames.beam_pages_frame`)."""
    x = [str(w) for w in frame["width"]]
    fig = go.Figure(
        [
            go.Bar(x=x, y=frame["peak_pages"], name="Dendrite (shared KV tree)",
                   marker_color=SHARED),
            go.Bar(x=x, y=frame["copy_pages"], name="copy per beam", marker_color=COPY),
            go.Scatter(x=x, y=frame["min_pages"], name="unique tokens' minimum",
                       mode="markers", marker={"symbol": "line-ew-open", "size": 30,
                                               "color": "black", "line": {"width": 2}}),
        ]
    )  # fmt: skip
    fig.update_layout(
        **_BASE,
        barmode="group",
        title="Beam search: peak KV pages against a copy-per-beam cache",
        xaxis={"title": "beam width"},
        yaxis={"title": "pages (peak over the search)"},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def fig_solve_rates(summaries: pd.DataFrame) -> go.Figure:
    """Solve rate per method (``game24_eval.evaluate`` summaries, one row per method), with
    the tokens the model processed on a second axis."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Bar(x=summaries["method"], y=summaries["rate"] * 100, name="solved (%)",
               marker_color=SHARED,
               text=[f"{s}/{t}" for s, t in zip(summaries["solved"], summaries["total"],
                                                strict=True)]),
        secondary_y=False,
    )  # fmt: skip
    fig.add_trace(
        go.Scatter(x=summaries["method"], y=summaries["tokens"], name="tokens processed",
                   mode="markers", marker={"color": COPY, "size": 10}),
        secondary_y=True,
    )  # fmt: skip
    fig.update_yaxes(title_text="solved (%)", range=[0, 105], secondary_y=False)
    fig.update_yaxes(title_text="tokens processed", type="log", secondary_y=True)
    fig.update_layout(**_BASE, title="Game of 24: solve rate per method",
                      legend={"orientation": "h", "y": -0.2})  # fmt: skip
    return fig


def fig_gpu_bench(result: dict[str, Any]) -> go.Figure:
    """``dendrite.bench.gpu.run()``'s dict: throughput and peak memory against HF transformers,
    where a decode step's time goes, and the beam search's time (pipelined, as KV-tree
    branches, HF)."""
    tree, b1, beam = result["tree"], result["batch1"], result.get("beam", {})
    cfg = result.get("config", {})
    fig = make_subplots(
        rows=1, cols=4, horizontal_spacing=0.07,
        subplot_titles=(
            f"tokens/s ({tree['dendrite_phases']['distinct_branches']} branches; batch 1)",
            "peak GPU memory, tree (GiB)", "decode step parts (ms)",
            f"beam search {cfg.get('beams', '')} x {cfg.get('new_tokens', '')} (s)",
        ),
    )  # fmt: skip
    beam_bars = [
        ("Dendrite", beam.get("dendrite_s"), SHARED),
        ("Dendrite, beams in the KV tree", beam.get("dendrite_tree_path_s"), "#6baed6"),
        ("HF", beam.get("hf_s"), COPY),
    ]
    beam_bars = [b for b in beam_bars if b[1] is not None]
    groups = ["tree", "batch 1"]
    fig.add_trace(go.Bar(x=groups, y=[tree["dendrite_tok_s"], b1["dendrite_tok_s"]],
                         name="Dendrite", marker_color=SHARED), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Bar(x=groups, y=[tree["hf_tok_s"], b1["hf_tok_s"]],
                         name="HF transformers", marker_color=COPY), row=1, col=1)  # fmt: skip
    fig.add_trace(go.Bar(x=["Dendrite", "HF"], y=[tree["dendrite_peak_gib"], tree["hf_peak_gib"]],
                         marker_color=[SHARED, COPY], showlegend=False), row=1, col=2)  # fmt: skip
    parts = result.get("step_parts", {})
    names = ["host_prepare_ms", "forward_eager_ms", "forward_graph_ms", "step_ms"]
    for key, colour in (("b1", "#9ecae1"), ("tree", "#08519c")):
        if key in parts:
            fig.add_trace(
                go.Bar(x=[n.removesuffix("_ms").replace("_", " ") for n in names],
                       y=[parts[key][n] for n in names], name=f"step parts: {key}",
                       marker_color=colour),
                row=1, col=3,
            )  # fmt: skip
    if beam_bars:
        fig.add_trace(
            go.Bar(x=[b[0] for b in beam_bars], y=[b[1] for b in beam_bars],
                   marker_color=[b[2] for b in beam_bars], showlegend=False),
            row=1, col=4,
        )  # fmt: skip
    gpu = result.get("env", {}).get("gpu", "GPU")
    fig.update_yaxes(type="log", title_text="tokens/s", row=1, col=1)
    fig.update_layout(
        **_SUBPLOTS,
        barmode="group",
        title=f"{gpu}: Dendrite {tree['speedup']:.2f}× HF on the tree workload, "
        f"{tree['memory_ratio']:.1f}× less memory"
        + (f", beam search {beam['speedup']:.1f}× faster" if "speedup" in beam else ""),
        legend={"orientation": "h", "y": -0.25},
    )
    return fig


def fig_cascade_depth(result: dict[str, Any]) -> go.Figure:
    """``dendrite.bench.cascade.run_depth()``'s dict (``bench gpu --part depth``): one decode
    step's GPU time (22 layers) on each nested tree, plain paged decode, the two-level cascade
    and levels by depth side by side (hover: the host plan and the page reads saved)."""
    df = pd.DataFrame(result["rows"])
    labels = [f"{r.prefix} + {r.subtrees}x{r.per_subtree} x {r.segment}" for r in df.itertuples()]
    fig = go.Figure()
    for key, name, colour in (
        ("plain", "plain paged decode", PRIVATE),
        ("two", "two-level cascade", "#6baed6"),
        ("depth", "levels by depth", SHARED),
    ):
        saved = df[f"{key}_saved_pages"] if f"{key}_saved_pages" in df else [0] * len(df)
        fig.add_trace(
            go.Bar(x=labels, y=df[f"{key}_gpu_us"], name=name, marker_color=colour,
                   customdata=np.stack([df[f"{key}_plan_us"], saved], axis=-1),
                   hovertemplate="%{x}<br>GPU %{y:.0f} us<br>plan %{customdata[0]:.0f} us<br>"
                                 "page reads saved %{customdata[1]}<extra></extra>")
        )  # fmt: skip
    fig.update_layout(
        **_BASE,
        barmode="group",
        title=f"{result.get('env', {}).get('gpu', 'GPU')}: nested trees, one decode step's "
        "attention (22 layers, GPU time)",
        xaxis_title="prefix + subtrees x branches each x segment (tokens)",
        yaxis_title="GPU time (us)",
        legend={"orientation": "h", "y": -0.3},
    )
    return fig


def fig_cascade_crossover(result: dict[str, Any]) -> go.Figure:
    """``dendrite.bench.cascade.run()``'s dict (``bench gpu --part cascade``): plain over
    cascade decode time per prefix length, one line per branch count; above 1 the cascade
    wins. Left: GPU time of the 22 layers; right: with each side's ``plan`` (host) added."""
    df = pd.DataFrame(result["rows"])
    fig = make_subplots(
        rows=1, cols=2, horizontal_spacing=0.1,
        subplot_titles=("GPU time: plain / cascade", "plan + GPU time: plain / cascade"),
    )  # fmt: skip
    blues = ["#c6dbef", "#6baed6", "#2171b5", "#08306b"]
    for i, (branches, rows) in enumerate(df.groupby("branches")):
        colour = blues[i % len(blues)]
        for col, key in ((1, "cascade_gpu_speedup"), (2, "cascade_speedup")):
            fig.add_trace(
                go.Scatter(x=rows["prefix"], y=rows[key], mode="lines+markers",
                           name=f"{branches} branches", legendgroup=str(branches),
                           showlegend=col == 1, marker_color=colour,
                           customdata=rows["saved_pages"],
                           hovertemplate="prefix %{x}<br>ratio %{y:.2f}<br>"
                                         "saved pages %{customdata}<extra></extra>"),
                row=1, col=col,
            )  # fmt: skip
    for col in (1, 2):
        fig.add_hline(y=1.0, line_dash="dot", line_color="grey", row=1, col=col)
        fig.update_xaxes(type="log", title_text="shared prefix (tokens)", row=1, col=col)
    fig.update_yaxes(title_text="plain / cascade (>1: cascade wins)", row=1, col=1)
    fig.update_layout(
        **_SUBPLOTS,
        title=f"{result.get('env', {}).get('gpu', 'GPU')}: two-level cascade against plain "
        "paged decode, one step of 22 layers (above 1: the cascade is faster)",
        legend={"orientation": "h", "y": -0.25},
    )
    return fig
