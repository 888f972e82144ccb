"""DataFrames the dashboards read that the package does not build itself.

The engine reports pages per branch (``engine.tree.page_list``) and readers per page
(``engine.tree.page_refcounts``); :func:`sharing_frame` joins them into one long frame, one
row per (branch, page) read, which the sharing map and the refcount histogram draw. Branch
labels come from a search tree when one pins them (:func:`tree_branches`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from dendrite.engine import Branch, Engine, Prompt
from dendrite.search.beam import beam_search
from dendrite.search.tree import SearchTree

SHARING_COLUMNS = ("label", "branch", "position", "page", "refcount")


def tree_branches(tree: SearchTree) -> dict[str, Branch]:
    """The live branches a search tree pins, depth-first, labelled ``node <id>``."""
    return {f"node {n.id}": n.branch for n in tree.dfs() if n.branch is not None and n.branch.alive}


def sharing_frame(engine: Engine, branches: Mapping[str, Branch] | None = None) -> pd.DataFrame:
    """One row per page each branch reads: (label, branch id, page index in the branch, page,
    live branches reading that page). ``branches`` defaults to every live branch of the engine.

    ``refcount`` counts every live branch of the engine, so a page is shared (>= 2) exactly
    when ``engine.stats()`` counts it as shared.
    """
    if branches is None:
        branches = {f"branch {b.id}": b for b in engine.branches.values()}
    refs = engine.tree.page_refcounts()
    rows = [
        (label, b.id, i, p, refs.get(p, 0))
        for label, b in branches.items()
        for i, p in enumerate(engine.tree.page_list(b.kv))
    ]
    return pd.DataFrame(rows, columns=list(SHARING_COLUMNS))


def refcount_frame(engine: Engine) -> pd.DataFrame:
    """One row per used page that a live branch reads: (page, refcount)."""
    refs = engine.tree.page_refcounts()
    return pd.DataFrame(sorted(refs.items()), columns=["page", "refcount"])


def beam_pages_frame(
    engine: Engine, prompt: Prompt, widths: Sequence[int], max_new_tokens: int
) -> pd.DataFrame:
    """Run ``beam_search`` once per width: its peak pages against a copy-per-beam cache."""
    rows = []
    for w in widths:
        # the beams as KV-tree branches (pipelined=False): the sharing this frame shows
        r = beam_search(engine, prompt, num_beams=w, max_new_tokens=max_new_tokens, pipelined=False)
        rows.append((w, r.steps, r.peak_pages, r.copy_pages, r.min_pages, r.pages_ratio))
    cols = ["width", "steps", "peak_pages", "copy_pages", "min_pages", "pages_vs_unique"]
    return pd.DataFrame(rows, columns=cols)


def solve_rate_frame(
    engine: Engine,
    puzzles: Sequence[Sequence[int]],
    budgets: Mapping[str, int | None],
    seed: int = 0,
) -> pd.DataFrame:
    """``game24_eval.evaluate`` per method (``{method: budget}``; None: its default budget),
    one summary row each: method, budget, solved, total, rate, tokens, forks, seconds."""
    from dendrite.tasks.game24_eval import evaluate

    rows = [
        evaluate(engine, puzzles, method, budget, seed=seed, progress=False)[1]
        for method, budget in budgets.items()
    ]
    return pd.DataFrame(rows)
