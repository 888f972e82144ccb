"""The reasoning tree: nodes are reasoning steps (a line, a move), each pinning a KV branch.

A node's pinned branch ends where the node's step ends, so expanding it is ``k`` O(1) forks
plus one batched generation: :meth:`SearchTree.expand_many` forks every node to expand ``k``
ways and steps all the forks together, one engine step per generated token, until each hits
the step delimiter (a stop string, a regex, a grammar's end, EOS or the token budget).
Children with identical tokens are merged (their multiplicity adds to the prior).

The tree is what the widgets and researchers read: :meth:`SearchTree.to_frame` (one row per
node), JSON export/import that round-trips (without the engine branches), and per-iteration
snapshots of visits and values.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from dendrite.engine import Branch, Engine, Prompt
from dendrite.errors import SearchError
from dendrite.grammar_base import BranchConstraint
from dendrite.sampling import SamplingParams, derive_seed


@dataclass
class Node:
    id: int
    parent: int | None
    depth: int
    text: str = ""  # this node's step (decoded)
    token_ids: list[int] = field(default_factory=list)
    logprob: float = 0.0  # sum of the step's token log-probs
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    terminal: bool = False
    reward: float | None = None  # verifier's verdict on a terminal node
    estimate: float | None = None  # value function's estimate when first evaluated
    finish_reason: str | None = None
    children: list[int] = field(default_factory=list)
    multiplicity: int = 1  # how many of the k samples produced this same step
    expansions: int = 0  # how many times this node was expanded (progressive widening)
    branch: Branch | None = None  # the KV branch pinned at the node's end (not exported)

    @property
    def value(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent": self.parent,
            "depth": self.depth,
            "text": self.text,
            "token_ids": self.token_ids,
            "logprob": self.logprob,
            "prior": self.prior,
            "visits": self.visits,
            "value_sum": self.value_sum,
            "terminal": self.terminal,
            "reward": self.reward,
            "estimate": self.estimate,
            "finish_reason": self.finish_reason,
            "children": self.children,
            "multiplicity": self.multiplicity,
            "expansions": self.expansions,
        }


@dataclass(frozen=True)
class StepConfig:
    """How one reasoning step is generated."""

    delimiter: str | None = "\n"  # a step ends after this string (None: only eos / budget)
    regex: str | None = None  # ...or once its text matches this regex
    max_step_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_step_tokens < 1:
            raise SearchError(f"max_step_tokens must be >= 1, got {self.max_step_tokens}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as e:
                raise SearchError(f"step regex {self.regex!r} does not compile: {e}") from None

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_step_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop=(self.delimiter,) if self.delimiter else (),
        )


class SearchTree:
    """Nodes over an engine; the root pins the prompt's branch (prefilled once, shared)."""

    def __init__(
        self,
        engine: Engine,
        prompt: Prompt,
        step: StepConfig | None = None,
        *,
        seed: int = 0,
        constraint: BranchConstraint | None = None,
    ) -> None:
        self.engine = engine
        self.step = step or StepConfig()
        self.seed = seed
        self.nodes: dict[int, Node] = {}
        self.snapshots: list[dict[str, Any]] = []
        self._next = 0
        self._regex = re.compile(self.step.regex) if self.step.regex else None
        branch = engine.add(prompt, self.step.sampling(), seed=seed, constraint=constraint)
        try:
            engine.prefill([branch])
        except BaseException:
            engine.free(branch)
            raise
        self.prompt_ids = engine.token_ids(branch)
        self.root = self._add(None, branch=branch)

    # ------------------------------------------------------------------ structure

    def _add(self, parent: Node | None, **fields: Any) -> Node:
        node = Node(
            id=self._next, parent=None if parent is None else parent.id,
            depth=0 if parent is None else parent.depth + 1, **fields,
        )  # fmt: skip
        self._next += 1
        self.nodes[node.id] = node
        if parent is not None:
            parent.children.append(node.id)
        return node

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, node_id: int) -> Node:
        return self.nodes[node_id]

    def children(self, node: Node) -> list[Node]:
        return [self.nodes[c] for c in node.children]

    def path(self, node: Node) -> list[Node]:
        """Root -> node."""
        out = [node]
        while out[-1].parent is not None:
            out.append(self.nodes[out[-1].parent])
        out.reverse()
        return out

    def path_text(self, node: Node) -> str:
        """The text of every step from the root to ``node`` (the prompt excluded)."""
        return "".join(n.text for n in self.path(node))

    def dfs(self, node: Node | None = None) -> Iterator[Node]:
        stack = [node or self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(self.nodes[c] for c in reversed(n.children))

    def leaves(self) -> list[Node]:
        return [n for n in self.dfs() if not n.children]

    # ------------------------------------------------------------------ expansion

    def expand(self, node: Node, k: int) -> list[Node]:
        return self.expand_many([node], k)[0]

    def expand_many(self, nodes: Sequence[Node], k: int) -> list[list[Node]]:
        """Expand every node ``k`` ways in one batched generation; returns each one's new children.

        A node may be expanded again (progressive widening): samples equal to an existing
        child add to its multiplicity.

        Costs one engine step per generated token for all ``len(nodes) * k`` forks together.
        """
        if k < 1:
            raise SearchError(f"children per expansion must be >= 1, got {k}")
        for n in nodes:
            if n.branch is None:
                raise SearchError(f"node {n.id} has no pinned branch (released or imported)")
            if n.terminal:
                raise SearchError(f"node {n.id} is terminal and cannot be expanded")
        engine = self.engine
        params = self.step.sampling()
        forks: list[list[Branch]] = []
        try:
            for n in nodes:
                assert n.branch is not None
                base = n.branch.seed
                row = []
                for i in range(k):
                    seed = derive_seed(base, len(n.children) * 1000 + i)
                    row.append(engine.fork(n.branch, params, seed=seed))
                forks.append(row)
            for b in (b for row in forks for b in row):
                b.num_generated = 0
                b.finish_reason = None
            self._generate([b for row in forks for b in row])
        except BaseException:
            for b in (b for row in forks for b in row):
                if b.alive:
                    engine.free(b)
            raise
        return [self._adopt(n, row) for n, row in zip(nodes, forks, strict=True)]

    def _generate(self, branches: list[Branch]) -> None:
        engine = self.engine
        todo = list(branches)
        while todo:
            engine.step(todo)
            if self._regex is not None:
                for b in todo:
                    if not b.finished and self._regex.search(self._step_text(b)):
                        b.finish_reason = "regex"
            todo = [b for b in todo if not b.finished]

    def _step_text(self, b: Branch) -> str:
        ids = self.engine.tail_ids(b, b.num_generated)
        tok = self.engine.tokenizer
        return tok.decode(ids) if tok is not None else "".join(f"{i} " for i in ids)

    def _adopt(self, node: Node, row: list[Branch]) -> list[Node]:
        """New children from finished forks; a step the node already has (from this batch or
        an earlier expansion) adds to that child's multiplicity instead. Returns the new ones."""
        engine = self.engine
        node.expansions += 1
        fresh: list[Node] = []
        seen: dict[tuple[int, ...], Node] = {tuple(c.token_ids): c for c in self.children(node)}
        for b in row:
            ids = engine.tail_ids(b, b.num_generated)
            key = tuple(ids)
            if key in seen:  # the same step sampled twice: one node, more prior mass
                seen[key].multiplicity += 1
                engine.free(b)
                continue
            lps = engine.output_logprobs(b)[-len(ids) :] if ids else []
            child = self._add(
                node,
                text=self._step_text(b),
                token_ids=ids,
                logprob=float(sum(lps)),
                finish_reason=b.finish_reason,
                terminal=b.finish_reason in ("eos", "grammar", "context"),
                branch=b,
            )
            seen[key] = child
            fresh.append(child)
        # priors over all children: sequence probabilities, renormalised (with multiplicity)
        children = self.children(node)
        weights = [c.multiplicity * math.exp(c.logprob) for c in children]
        total = sum(weights)
        for c, w in zip(children, weights, strict=True):
            c.prior = w / total if total > 0 else 1.0 / len(children)
        return fresh

    # ------------------------------------------------------------------ release

    def release(self, node: Node, *, remove: bool = True) -> int:
        """Free the branches of ``node``'s subtree (and drop the nodes when ``remove``).

        Returns how many branches were freed. Releasing the root releases everything.
        """
        freed = 0
        sub = list(self.dfs(node))
        for n in sub:
            if n.branch is not None and n.branch.alive:
                self.engine.free(n.branch)
                freed += 1
            n.branch = None
        if remove and node.parent is not None:
            parent = self.nodes[node.parent]
            parent.children.remove(node.id)
            for n in sub:
                del self.nodes[n.id]
        return freed

    def close(self) -> None:
        """Free every branch the tree pins (the nodes stay for inspection)."""
        self.release(self.root, remove=False)

    def __enter__(self) -> SearchTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ frames and export

    def to_frame(self) -> pd.DataFrame:
        """One row per node, depth-first order (the order the widgets lay nodes out in)."""
        rows = []
        for order, n in enumerate(self.dfs()):
            d = n.to_dict()
            d.pop("children")
            d["value"] = n.value
            d["order"] = order
            d["num_children"] = len(n.children)
            d["branch"] = n.branch.id if n.branch is not None and n.branch.alive else None
            d["context_len"] = len(n.branch) if n.branch is not None and n.branch.alive else None
            rows.append(d)
        return pd.DataFrame(rows)

    def snapshot(self, iteration: int) -> None:
        """Record visits and values of every node (for the value/visits slider view)."""
        self.snapshots.append(
            {
                "iteration": iteration,
                "nodes": [(n.id, n.visits, n.value) for n in self.nodes.values()],
            }
        )

    def snapshots_frame(self) -> pd.DataFrame:
        rows = [
            {"iteration": s["iteration"], "id": i, "visits": v, "value": q}
            for s in self.snapshots
            for i, v, q in s["nodes"]
        ]
        return pd.DataFrame(rows, columns=["iteration", "id", "visits", "value"])

    def to_json(self) -> str:
        return json.dumps(
            {
                "prompt_ids": self.prompt_ids,
                "seed": self.seed,
                "root": self.root.id,
                "nodes": [n.to_dict() for n in self.nodes.values()],
                "snapshots": self.snapshots,
            }
        )

    @classmethod
    def from_json(cls, text: str, engine: Engine, step: StepConfig | None = None) -> SearchTree:
        """Rebuild an exported tree on ``engine``: the root pins the prompt again; other nodes
        get their branches back on demand (:meth:`ensure_branch`) by re-feeding their tokens."""
        data = json.loads(text)
        tree = cls(engine, data["prompt_ids"], step, seed=data["seed"])
        root_branch = tree.root.branch
        tree.nodes = {d["id"]: Node(**d) for d in data["nodes"]}
        tree.root = tree.nodes[data["root"]]
        tree.root.branch = root_branch
        tree.snapshots = list(data["snapshots"])
        tree._next = max(tree.nodes) + 1
        return tree

    def ensure_branch(self, node: Node) -> Branch:
        """The node's pinned branch, re-created from its parent's if it was not there."""
        if node.branch is not None and node.branch.alive:
            return node.branch
        if node.parent is None:
            raise SearchError("the root's branch was released; build a new tree")
        parent = self.ensure_branch(self.nodes[node.parent])
        b = self.engine.fork(parent, self.step.sampling())
        try:
            self.engine.extend(b, node.token_ids)
            self.engine.prefill([b])
        except BaseException:
            self.engine.free(b)
            raise
        node.branch = b
        return b


Verifier = Callable[[str], "float | None"]
