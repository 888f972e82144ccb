"""Two-level cascade along the KV tree: shared prefixes read once per group, not per branch.

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
the H200 (``data/benchmarks/h200-bench-cascade.json``, 9eb26b1). With both levels in Triton
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
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class CascadeSplit:
    """How one decode step's branches split into a shared level 0 and a private level 1."""

    group_starts: tuple[int, ...]  # [G+1] query ranges of the level-0 groups (cover 0..B)
    group_pages: tuple[tuple[int, ...], ...]  # [G] each group's shared pages
    shared: tuple[int, ...]  # [B] pages branch b reads at level 0 (0: masked out)
    saved_pages: int  # page reads this saves over plain paged attention

    @property
    def num_groups(self) -> int:
        return len(self.group_pages)

    def level1(self, page_lists: list[list[int]]) -> list[list[int]]:
        """Every branch's level-1 pages: its own, after the shared prefix."""
        return [pages[m:] for pages, m in zip(page_lists, self.shared, strict=True)]


def split_shared_prefixes(
    page_lists: list[list[int]], min_saved_pages: int = 1, min_group_pages: int = 1
) -> CascadeSplit | None:
    """The cascade split of a decode step, or ``None`` when it saves < ``min_saved_pages``.

    ``page_lists[b]``: branch b's pages in order (its last page holds its new token). A run
    whose common prefix is shorter than ``min_group_pages`` is no group.
    """
    B = len(page_lists)
    groups: list[tuple[int, int, int]] = []  # (start, end, shared pages) with end - start >= 2
    i = 0
    while i < B:
        first = page_lists[i][0] if len(page_lists[i]) > 1 else None
        j = i + 1
        while j < B and first is not None and len(page_lists[j]) > 1 and page_lists[j][0] == first:
            j += 1
        if j - i >= 2:
            run = page_lists[i:j]
            m = _common_prefix_len(run)
            m = min(m, min(len(p) for p in run) - 1)  # a branch's last page stays its own
            if m >= max(1, min_group_pages):
                groups.append((i, j, m))
        i = j
    saved = sum((end - start - 1) * m for start, end, m in groups)
    if not groups or saved < max(1, min_saved_pages):
        return None
    shared = [0] * B
    for start, end, m in groups:
        shared[start:end] = [m] * (end - start)
    # level-0 query ranges: each group widened to the branches between it and the next one
    starts = [0] + [start for start, _, _ in groups[1:]] + [B]
    return CascadeSplit(
        group_starts=tuple(starts),
        group_pages=tuple(tuple(page_lists[start][:m]) for start, _, m in groups),
        shared=tuple(shared),
        saved_pages=saved,
    )


def _common_prefix_len(lists: list[list[int]]) -> int:
    """Length of the longest common prefix: that of the lexicographic least and greatest."""
    lo, hi = min(lists), max(lists)
    for i, (a, b) in enumerate(zip(lo, hi, strict=False)):
        if a != b:
            return i
    return len(lo)
