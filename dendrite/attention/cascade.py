"""Cascade along the KV tree: shared prefixes read once per group, not per branch.

A decode step of ``B`` branches forked from one node reads the node's pages ``B`` times with
plain paged attention. Cascade attention splits every branch's KV in two levels::

    branch pages   [ p0 p1 ... p(m-1) | own pages ]
                     level 0: shared by the group      level 1: this branch alone
    level 0: one query group per shared prefix -> FlashInfer's prefill kernel reads the
             prefix once for all its queries (non-causal: every key precedes every query)
    level 1: one decode per branch over its own pages
    out = merge((out1, lse1), (out0, lse0))    (log-sum-exp merge, exact up to rounding)

Groups are *runs* of consecutive branches in the step's order whose page lists start with the
same page; a group's level 0 is the longest common prefix of its page lists (whole pages: all
but a branch's last page are full, and that last page is never shared, since the branch
writes into it this step). Branches in no group ride along with a neighbouring group: they
get its level 0 too, and a mask keeps it out of their merge. So level 0 has one entry per
group and covers every query, which is what its kernel (and a CUDA graph) wants::

    pages  A: [7 8 9 4]  B: [7 8 9 5]  C: [7 8 2]  D: [3 6]        (C shares only 7 8)
    run [A B C], common prefix [7 8]    -> group 0: queries 0..3 (D rides along, masked)
    level 0: qo_indptr [0 4]  kv [7 8]         level 1: A [9 4]  B [9 5]  C [2]  D [3 6]
    merge mask [1 1 1 0]                       pages read: 2 + 7 = 9 instead of 11

Whether a step uses the cascade is measured, not guessed: ``python -m dendrite bench gpu
--part cascade`` (part f) times both, as CUDA graphs, over prefix lengths and branch counts on
the H200 (``data/benchmarks/h200-bench-cascade.json``; at eba4575 the cascade's GPU time won
in every row but 16,384 tokens x 4 branches, 0.95x, under 64 pages too; the thresholds below
stay those of the earlier runs, described next, until a smaller group is measured end to
end). At 9eb26b1, with both levels in Triton
(``shared_prefix.py``) the cascade's GPU time wins from groups of 64 pages (1,024 tokens) on
(1,024 x 4: 1.02x; 2,048 x 64: 1.51x; 4,096 x 64: 1.99x; 16,384 x 256: 3.56x), but for 4
branches over 2,048, 8,192 and 16,384 tokens (1.00x, 0.98x, 0.92x: four rows give level 0 too
few programs); under 64 pages it loses but with 256 branches (256 tokens: 0.85x, 0.93x, 0.84x with
4, 16, 64 branches). Its plan is cheaper too (74-1,414 us of host against 237-740 us: the
Triton kernels need no plan), so end to end it wins everywhere but 16,384 x 4 (0.97x). The
runs at 4c4b55f and a0eae36 gave the same picture; with FlashInfer's kernels (9ce773c) the
cascade won only from 256 shared pages and 7,680 saved page reads. Hence the thresholds below:
a group of 64 pages, and 192 page reads saved (the least any winning row saved); FlashInfer's
kernels (``cascade_prefix_kernel="flashinfer"``, or heads too wide for the Triton kernels)
keep the thresholds measured for them.

Levels by depth (the Triton kernels): inside a group, the runs of rows that share more pages
after its prefix (a subtree that ran on before it forked) form groups one level down, and so
on, up to ``CASCADE_MAX_DEPTH`` shared levels; each nested segment is then read once per
subtree instead of once per branch at level 1. All depths' groups run in one launch, one
merge (``shared_prefix.CascadeKernels``)::

    root [1 2 3]   x [4 5] under it   x' [9] under x     (rows depth-first)
    A: [1 2 3 4 5 9 20]  B: [1 2 3 4 5 9 21]  C: [1 2 3 4 5 22]  D: [1 2 3 6 7 8 23]
    E: [1 2 3 6 7 8 24]  F: [1 2 3 25]
    depth 0: A..F [1 2 3]   depth 1: A..C [4 5], D..E [6 7 8]   depth 2: A..B [9]
    level 1: [20] [21] [22] [23] [24] [25]      pages read: 3 + 5 + 1 + 6 = 15 instead of 38

``python -m dendrite bench gpu --part depth`` times it against the two-level cascade on
nested trees (``data/benchmarks/h200-bench-cascade-depth.json``, H200, eba4575): with
segments of 64 pages and more the second level wins on the GPU, 1.30x to 2.54x (8 x 8
branches under 4,096 tokens with 1,024-token segments: 1.38x; with 2,048: 1.87x), and at 16
pages it loses (0.91x); so nested groups take the same ``min_group_pages`` as the first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

# The crossover ``bench gpu`` part (f) measured on the H200 (TinyLlama shape, bf16): a group
# shares at least this many pages, and the step saves at least this many page reads. With the
# Triton kernels (a0eae36), and with FlashInfer's (9ce773c).
CASCADE_MIN_GROUP_PAGES = 64
CASCADE_MIN_SAVED_PAGES = 192
# What runs a cascade: "triton" (``shared_prefix.py``: both levels' split states, merged in one
# pass) or "flashinfer" (level 0 on its prefill wrapper, which merges its own split-KV states
# first, level 1 on its decode wrapper, then ``merge.merge_into``); each with its measured
# (min group pages, min saved pages).
CASCADE_THRESHOLDS = {
    "triton": (CASCADE_MIN_GROUP_PAGES, CASCADE_MIN_SAVED_PAGES),
    "flashinfer": (192, 7_680),
}
PREFIX_KERNELS = tuple(CASCADE_THRESHOLDS)


# The most shared levels a step's cascade may have with the Triton kernels (levels by depth:
# a group's rows that share more pages after its prefix form a nested group one level down).
# FlashInfer's level 0 is one prefill over one level of groups: one shared level there.
CASCADE_MAX_DEPTH = 4


class SharedGroup(NamedTuple):
    """A run of rows ``start .. end - 1`` reading ``pages`` at shared level ``depth`` (the
    pages after those of the rows' groups at the levels above)."""

    depth: int
    start: int
    end: int
    pages: tuple[int, ...]


@dataclass(frozen=True)
class CascadeSplit:
    """How one decode step's branches split into shared levels and a private level 1.

    ``groups`` by depth, then by row: depth 0 are the runs sharing a prefix, depth ``d + 1``
    the runs inside a depth-``d`` group that share more pages after it (levels by depth)."""

    groups: tuple[SharedGroup, ...]
    shared: tuple[int, ...]  # [B] pages branch b reads at the shared levels (0: none)
    saved_pages: int  # page reads this saves over plain paged attention

    @property
    def depths(self) -> int:
        """Shared levels (1: the two-level cascade)."""
        return 1 + max(g.depth for g in self.groups)

    @property
    def top(self) -> tuple[SharedGroup, ...]:
        """The depth-0 groups."""
        return tuple(g for g in self.groups if g.depth == 0)

    @property
    def num_groups(self) -> int:
        """Depth-0 groups (FlashInfer's level 0 has one query group each)."""
        return len(self.top)

    @property
    def group_starts(self) -> tuple[int, ...]:
        """[G+1] query ranges of the depth-0 groups, each widened to the rows before the next
        one, so that they cover 0..B (rows in no group ride along, masked out of the merge)."""
        top = self.top
        return (0, *(g.start for g in top[1:]), len(self.shared))

    @property
    def group_pages(self) -> tuple[tuple[int, ...], ...]:
        """[G] each depth-0 group's shared pages."""
        return tuple(g.pages for g in self.top)

    @property
    def longest_pages(self) -> int:
        """Pages of the longest group (any depth)."""
        return max(len(g.pages) for g in self.groups)

    def ranges(self) -> list[tuple[int, int, int]]:
        """Each group's (first row, end row, depth), in group order: the Triton tile table's."""
        return [(g.start, g.end, g.depth) for g in self.groups]

    def masks(self) -> list[list[int]]:
        """[depths][B] 1 where row b reads a group at that depth."""
        out = [[0] * len(self.shared) for _ in range(self.depths)]
        for g in self.groups:
            out[g.depth][g.start : g.end] = [1] * (g.end - g.start)
        return out

    def truncated(self, depths: int) -> CascadeSplit:
        """The same split with its first ``depths`` shared levels only: the deeper groups'
        pages go back to each branch's level 1."""
        groups = tuple(g for g in self.groups if g.depth < depths)
        shared = [0] * len(self.shared)
        for g in groups:
            shared[g.start : g.end] = [m + len(g.pages) for m in shared[g.start : g.end]]
        saved = sum((g.end - g.start - 1) * len(g.pages) for g in groups)
        return CascadeSplit(groups=groups, shared=tuple(shared), saved_pages=saved)

    def level1(self, page_lists: list[list[int]]) -> list[list[int]]:
        """Every branch's level-1 pages: its own, after the shared levels'."""
        return [pages[m:] for pages, m in zip(page_lists, self.shared, strict=True)]


def split_shared_prefixes(
    page_lists: list[list[int]],
    min_saved_pages: int = 1,
    min_group_pages: int = 1,
    max_depth: int = 1,
) -> CascadeSplit | None:
    """The cascade split of a decode step, or ``None`` when it saves < ``min_saved_pages``.

    ``page_lists[b]``: branch b's pages in order (its last page holds its new token). A run
    whose common prefix is shorter than ``min_group_pages`` is no group. ``max_depth``: shared
    levels at most; below a group, the runs of its rows that share the next page form groups
    one level down (rows of a subtree are consecutive in a depth-first order), read once each.
    """
    B = len(page_lists)
    offset = [0] * B  # pages of each row taken by the levels so far
    spans = [(0, B)]  # the row ranges the next level's runs are looked for in
    groups: list[SharedGroup] = []
    for depth in range(max_depth):
        found: list[SharedGroup] = []
        for lo, hi in spans:
            i = lo
            while i < hi:
                first = _next_page(page_lists[i], offset[i])
                j = i + 1
                while (
                    j < hi and first is not None and first == _next_page(page_lists[j], offset[j])
                ):
                    j += 1
                if j - i >= 2:
                    run = page_lists[i:j]
                    at = offset[i]  # the same for every row of a span
                    m = _common_prefix_len(run) - at
                    m = min(m, min(len(p) for p in run) - at - 1)  # the last page stays own
                    if m >= max(1, min_group_pages):
                        found.append(SharedGroup(depth, i, j, tuple(run[0][at : at + m])))
                i = j
        if not found:
            break
        for g in found:
            offset[g.start : g.end] = [x + len(g.pages) for x in offset[g.start : g.end]]
        groups += found
        spans = [(g.start, g.end) for g in found]
    saved = sum((g.end - g.start - 1) * len(g.pages) for g in groups)
    if not groups or saved < max(1, min_saved_pages):
        return None
    return CascadeSplit(groups=tuple(groups), shared=tuple(offset), saved_pages=saved)


def _next_page(pages: list[int], at: int) -> int | None:
    """The page after the first ``at``, if it is not the list's last (never shared)."""
    return pages[at] if len(pages) - at > 1 else None


def _common_prefix_len(lists: list[list[int]]) -> int:
    """Length of the longest common prefix: that of the lexicographic least and greatest."""
    lo, hi = min(lists), max(lists)
    for i, (a, b) in enumerate(zip(lo, hi, strict=False)):
        if a != b:
            return i
    return len(lo)
