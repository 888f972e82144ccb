"""The node panel of the tree explorer: what one node is, as data, then as a small HTML string.

:func:`node_info` reads a node's step, its path, its tokens' log-probs and the KV pages its
pinned branch reads (with how many live branches read each) from the public search-tree and
engine objects; :func:`node_html` renders that record. The split keeps the rendering testable
without an engine and the engine reads out of the view.

Per-token log-probs come from ``engine.output_logprobs(branch)`` while the node's branch is
alive; a node whose branch was released (pruned by tree-of-thought, imported from JSON) only
has its step's summed log-prob, so each of its tokens shows the step's mean.
"""

from __future__ import annotations

import html
import math
from typing import NamedTuple

from dendrite.search.tree import Node, SearchTree


class TokenView(NamedTuple):
    text: str
    logprob: float  # nan: not sampled (given) or unknown
    step: int  # index of the path step the token belongs to (0: first step below the root)
    exact: bool  # False: the step's mean log-prob stands in for the token's own


class NodeInfo(NamedTuple):
    id: int
    depth: int
    visits: int
    value: float
    estimate: float | None
    reward: float | None
    prior: float
    terminal: bool
    finish_reason: str | None
    prompt: str
    steps: list[str]  # root excluded, this node's step last
    tokens: list[TokenView]
    pages: list[tuple[int, int]]  # (page, live branches reading it), in position order
    branch: int | None  # the pinned engine branch id, None if released


def node_info(tree: SearchTree, node: Node) -> NodeInfo:
    engine = tree.engine
    path = tree.path(node)[1:]
    tok = engine.tokenizer

    def decode(ids: list[int]) -> str:
        return tok.decode(ids) if tok is not None else " ".join(str(i) for i in ids)

    prompt_ids = [t for t in tree.prompt_ids if t != engine.bos_token_id]
    alive = node.branch is not None and node.branch.alive
    exact: list[float] | None = None
    if alive:
        assert node.branch is not None
        lps = engine.output_logprobs(node.branch)
        if len(lps) == sum(len(n.token_ids) for n in path):
            exact = lps
    tokens: list[TokenView] = []
    pos = 0
    for i, n in enumerate(path):
        mean = n.logprob / len(n.token_ids) if n.token_ids else math.nan
        for t in n.token_ids:
            lp = exact[pos] if exact is not None else mean
            tokens.append(TokenView(decode([t]), lp, i, exact is not None))
            pos += 1
    pages: list[tuple[int, int]] = []
    if alive:
        assert node.branch is not None
        refs = engine.tree.page_refcounts()
        pages = [(p, refs.get(p, 0)) for p in engine.tree.page_list(node.branch.kv)]
    return NodeInfo(
        id=node.id, depth=node.depth, visits=node.visits, value=node.value,
        estimate=node.estimate, reward=node.reward, prior=node.prior, terminal=node.terminal,
        finish_reason=node.finish_reason, prompt=decode(prompt_ids),
        steps=[n.text for n in path], tokens=tokens, pages=pages,
        branch=node.branch.id if alive and node.branch is not None else None,
    )  # fmt: skip


def logprob_colour(logprob: float) -> str:
    """Background for a token: red (improbable) through yellow to green (p = 1); grey if unknown."""
    if math.isnan(logprob):
        return "#e0e0e0"
    p = math.exp(min(0.0, logprob))
    return f"hsl({120 * p:.0f}, 75%, 82%)"


def _esc(text: str) -> str:
    return html.escape(text).replace("\n", "⏎")


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def node_html(info: NodeInfo) -> str:
    """The panel's HTML for one node (self-contained inline styles)."""
    flags = []
    if info.terminal:
        flags.append("terminal")
    if info.terminal and (info.reward or 0.0) >= 1.0:
        flags.append("<b style='color:#b08000'>solved</b>")
    head = (
        f"<div class='dendrite-node' data-node='{info.id}'><b>node {info.id}</b> · depth "
        f"{info.depth} · visits {info.visits} · value {info.value:.3f} · estimate "
        f"{_fmt(info.estimate)} · prior {info.prior:.3f} · reward {_fmt(info.reward)}"
        f"{' · ' + ' · '.join(flags) if flags else ''}</div>"
    )
    steps = "".join(
        f"<span style='font-weight:{'bold' if i == len(info.steps) - 1 else 'normal'}'>"
        f"{html.escape(s)}</span>"
        for i, s in enumerate(info.steps)
    )
    path = (
        "<div style='margin-top:6px'><b>path</b></div>"
        "<pre class='dendrite-path' style='white-space:pre-wrap;margin:2px 0;font-size:12px'>"
        f"<span style='color:#888'>{html.escape(info.prompt)}</span>{steps}</pre>"
    )
    exact = all(t.exact for t in info.tokens)
    last = len(info.steps) - 1
    chips = "".join(
        f"<span title='log p = {t.logprob:.3f}' style='background:{logprob_colour(t.logprob)};"
        f"font-family:monospace;padding:0 1px;"
        f"{'outline:1px solid #555;' if t.step == last else ''}'>{_esc(t.text)}</span>"
        for t in info.tokens
    )
    note = "" if exact else " (branch released: each token shows its step's mean)"
    tokens = (
        f"<div style='margin-top:6px'><b>tokens by log-prob</b>{note}</div>"
        f"<div style='line-height:1.7;word-break:break-all'>{chips}</div>"
    )
    if info.branch is None:
        pages = "<div style='margin-top:6px'><b>pages</b>: none pinned (branch released)</div>"
    else:
        shared = sum(1 for _, c in info.pages if c >= 2)
        page_chips = " ".join(
            f"<span title='read by {c} live branch{'es' if c != 1 else ''}' style='background:"
            f"{'#9ecae1' if c >= 2 else '#eeeeee'};padding:0 3px;border-radius:3px;"
            f"font-family:monospace'>{p}×{c}</span>"
            for p, c in info.pages
        )
        pages = (
            f"<div style='margin-top:6px'><b>pages</b> of branch {info.branch}: "
            f"{len(info.pages)} ({shared} shared, {len(info.pages) - shared} private); "
            f"page×refcount</div><div style='line-height:1.8'>{page_chips}</div>"
        )
    return f"<div style='font-size:13px'>{head}{path}{tokens}{pages}</div>"
