"""The cascade split (``attention/cascade.py``): which pages a decode step reads once per group.

The GPU tests run the split through FlashInfer; here, on CPU, the split itself is checked: on
the docstring's example, on page lists of real KV trees (every branch's level 0 + level 1
pages are its page list, groups cover the batch), and numerically: attention over level 0
and level 1 merged by log-sum-exp equals attention over the whole page list.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite.attention.base import build_layout
from dendrite.attention.cascade import SharedGroup, split_shared_prefixes
from dendrite.attention.torch_ref import TorchBackend
from dendrite.kv.pool import PagePool, PoolConfig
from dendrite.kv.tree import KVBranch, KVTree

P, HKV, HQ, D = 4, 2, 4, 8


def test_docstring_example() -> None:
    lists = [[7, 8, 9, 4], [7, 8, 9, 5], [7, 8, 2], [3, 6]]
    split = split_shared_prefixes(lists)
    assert split is not None
    assert split.group_starts == (0, 4)  # one group; D rides along
    assert split.group_pages == ((7, 8),)
    assert split.shared == (2, 2, 2, 0)
    assert split.saved_pages == 4  # (3 - 1) branches x 2 pages
    assert split.level1(lists) == [[9, 4], [9, 5], [2], [3, 6]]


def test_groups_are_runs_and_threshold_holds() -> None:
    lists = [[1, 2, 3, 10], [1, 2, 3, 11], [5, 12], [4, 6, 13], [4, 6, 14], [4, 6, 15]]
    split = split_shared_prefixes(lists)
    assert split is not None
    assert split.group_pages == ((1, 2, 3), (4, 6))
    assert split.group_starts == (0, 3, 6)  # [5, 12] rides with the first group
    assert split.shared == (3, 3, 0, 2, 2, 2)
    assert split.saved_pages == 3 + 4
    assert split_shared_prefixes(lists, min_saved_pages=8) is None
    assert split_shared_prefixes(lists, min_saved_pages=7) is not None


def test_levels_by_depth_split_nested_subtrees() -> None:
    """A root prefix, two subtrees sharing more pages under it and a sub-subtree: with
    ``max_depth`` 3 each nested segment is a group one level down (read once per subtree);
    with 1, only the root's; with 2, the sub-subtree's pages stay at level 1."""
    root, x, y = [1, 2, 3], [4, 5], [6, 7, 8]
    lists = [root + x + [9, 20], root + x + [9, 21], root + x + [22], root + y + [23],
             root + y + [24], [*root, 25]]  # fmt: skip
    split = split_shared_prefixes(lists, max_depth=3)
    assert split is not None
    assert split.groups == (
        SharedGroup(0, 0, 6, (1, 2, 3)),
        SharedGroup(1, 0, 3, (4, 5)),
        SharedGroup(1, 3, 5, (6, 7, 8)),
        SharedGroup(2, 0, 2, (9,)),
    )
    assert split.depths == 3 and split.num_groups == 1 and split.group_starts == (0, 6)
    assert split.shared == (6, 6, 5, 6, 6, 3)
    assert split.masks() == [[1] * 6, [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    assert split.saved_pages == 5 * 3 + 2 * 2 + 1 * 3 + 1 * 1
    assert split.level1(lists) == [[20], [21], [22], [23], [24], [25]]
    two = split_shared_prefixes(lists, max_depth=2)
    assert two is not None and two.depths == 2 and two.level1(lists)[0] == [9, 20]
    one = split_shared_prefixes(lists)
    assert one is not None and one.groups == (SharedGroup(0, 0, 6, (1, 2, 3)),)
    assert split.truncated(2) == two and split.truncated(1) == one
    # a nested run shorter than min_group_pages is no group; the levels above it stay
    short = split_shared_prefixes(lists, min_group_pages=2, max_depth=3)
    assert short is not None and [g.depth for g in short.groups] == [0, 1, 1]


def test_nothing_shared_or_single_page_branches_give_none() -> None:
    assert split_shared_prefixes([[1, 2], [3, 4], [5]]) is None
    assert split_shared_prefixes([[1], [1]]) is None  # a lone last page is never shared
    assert split_shared_prefixes([]) is None


def _tree_step(ops: list[tuple[int, int]], seed: int) -> tuple[KVTree, PagePool, list[KVBranch]]:
    """A KV tree grown by (fork-source, tokens) ops, then one decode token per live branch."""
    pool = PagePool(
        PoolConfig(num_layers=1, num_pages=512, num_kv_heads=HKV, head_dim=D, page_size=P)
    )
    g = torch.Generator().manual_seed(seed)
    pool.kv[0].copy_(torch.randn(pool.kv[0].shape, generator=g))
    tree = KVTree(pool)
    root = tree.new_branch()
    tree.append_batch([(root, [1] * 13)])
    branches = [root]
    for src, n in ops:
        child = tree.fork(branches[src % len(branches)])
        tree.append_batch([(child, [2] * n)])
        branches.append(child)
    return tree, pool, branches


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 11)), min_size=1, max_size=8),
    seed=st.integers(0, 10_000),
)
def test_split_reconstructs_page_lists_and_attention(ops: list[tuple[int, int]], seed: int) -> None:
    tree, pool, branches = _tree_step(ops, seed)
    slots = tree.append_batch([(b, [3]) for b in branches])  # the decode step's new tokens
    lists = [tree.page_list(b) for b in branches]
    kv_lens = [len(b) for b in branches]
    tree.check_integrity()
    split = split_shared_prefixes(lists)
    if split is None:
        return
    B = len(branches)
    starts = split.group_starts
    assert starts[0] == 0 and starts[-1] == B and list(starts) == sorted(set(starts))
    own = split.level1(lists)
    for b in range(B):
        g = max(i for i in range(split.num_groups) if starts[i] <= b)
        if split.shared[b]:
            assert split.group_pages[g] == tuple(lists[b][: split.shared[b]])
            assert len(own[b]) >= 1  # the branch's own last page stays at level 1
        assert [*lists[b][: split.shared[b]], *own[b]] == lists[b]

    # numerics: level 0 and level 1 attention merged by log-sum-exp == plain attention
    q, want = _plain_step(pool, lists, kv_lens, slots, seed)
    kv = pool.kv[0]  # [N, 2, P, Hkv, D]
    for b in range(B):
        m = split.shared[b]
        parts = [
            _attend(q[b], kv, lists[b][:m], None),
            _attend(q[b], kv, own[b], kv_lens[b] - m * P),
        ]
        got = _merge([p for p in parts if p is not None])
        torch.testing.assert_close(got, want[b], rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    ops=st.lists(st.tuples(st.integers(0, 50), st.integers(0, 11)), min_size=1, max_size=10),
    seed=st.integers(0, 10_000),
    depth_first=st.booleans(),
)
def test_split_by_depth_reconstructs_page_lists_and_attention(
    ops: list[tuple[int, int]], seed: int, depth_first: bool
) -> None:
    """Levels by depth on real KV trees (branches in creation order, or depth-first: sorted
    by page list): each row's page list is its groups' pages, depth by depth, then its own;
    a depth's groups are disjoint runs inside one group of the depth above; the masks and
    page reads saved follow; and attention over every segment merged equals plain."""
    tree, pool, branches = _tree_step(ops, seed)
    slots = tree.append_batch([(b, [3]) for b in branches])
    tree.check_integrity()
    order = sorted(range(len(branches)), key=lambda i: tree.page_list(branches[i]))
    if depth_first:
        branches, slots = [branches[i] for i in order], [slots[i] for i in order]
    lists = [tree.page_list(b) for b in branches]
    kv_lens = [len(b) for b in branches]
    split = split_shared_prefixes(lists, max_depth=4)
    if split is None:
        return
    B = len(branches)
    own = split.level1(lists)
    masks = split.masks()
    segments: list[list[list[int]]] = [[] for _ in range(B)]
    for g in split.groups:
        assert g.end - g.start >= 2 and g.pages
        if g.depth:  # inside one group of the depth above
            assert any(
                p.depth == g.depth - 1 and p.start <= g.start and g.end <= p.end
                for p in split.groups
            )
        for r in range(g.start, g.end):
            assert len(segments[r]) == g.depth  # one group per depth, depth by depth
            segments[r].append(list(g.pages))
    for b in range(B):
        assert [*(p for seg in segments[b] for p in seg), *own[b]] == lists[b]
        assert len(own[b]) >= 1
        assert [masks[d][b] for d in range(split.depths)] == [
            int(d < len(segments[b])) for d in range(split.depths)
        ]
    saved = sum((g.end - g.start - 1) * len(g.pages) for g in split.groups)
    assert split.saved_pages == saved
    for depth in range(1, split.depths + 1):  # its first levels: the split of that depth
        assert split.truncated(depth) == split_shared_prefixes(lists, max_depth=depth)

    q, want = _plain_step(pool, lists, kv_lens, slots, seed)
    kv = pool.kv[0]
    for b in range(B):
        parts = [_attend(q[b], kv, seg, None) for seg in segments[b]]
        parts.append(_attend(q[b], kv, own[b], kv_lens[b] - split.shared[b] * P))
        got = _merge([p for p in parts if p is not None])
        torch.testing.assert_close(got, want[b], rtol=1e-5, atol=1e-5)


def _plain_step(
    pool: PagePool, lists: list[list[int]], kv_lens: list[int], slots: Any, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode step's random queries [B, HQ, D] and plain paged attention over each page
    list, by the torch backend (which also writes the step's random K/V into the pages)."""
    B = len(lists)
    layout = build_layout([1] * B, kv_lens, lists, slots, P, torch.device("cpu"))
    ref = TorchBackend(pool)
    ref.plan(layout)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, HQ, D, generator=g)
    k = torch.randn(B, HKV, D, generator=g)
    v = torch.randn(B, HKV, D, generator=g)
    return q, ref.run(0, q, k, v)


def _attend(
    q: torch.Tensor, kv: torch.Tensor, pages: list[int], n: int | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Attention of q [HQ, D] over the first ``n`` tokens of ``pages``: (out, lse)."""
    if not pages:
        return None
    keys = kv[pages, 0].reshape(-1, HKV, D)[:n]  # [L, Hkv, D]
    vals = kv[pages, 1].reshape(-1, HKV, D)[:n]
    rep = HQ // HKV
    s = torch.einsum("hd,lhd->hl", q, keys.repeat_interleave(rep, dim=1)) / math.sqrt(D)
    lse = torch.logsumexp(s, dim=-1)  # [HQ]
    out = torch.einsum("hl,lhd->hd", torch.softmax(s, dim=-1), vals.repeat_interleave(rep, 1))
    return out, lse


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    lse = torch.logsumexp(torch.stack([s for _, s in parts]), dim=0)  # [HQ]
    return sum(o * torch.exp(s - lse)[:, None] for o, s in parts)  # type: ignore[return-value]


@pytest.mark.parametrize("n", [1, 5, 64])
def test_many_forks_of_one_node_form_one_group(n: int) -> None:
    """The tree-decode shape: n branches forked from one long prompt -> one group."""
    tree, _, branches = _tree_step([(0, 0)] * n, seed=0)
    tree.append_batch([(b, [3]) for b in branches])
    lists = [tree.page_list(b) for b in branches]
    split = split_shared_prefixes(lists)
    assert split is not None
    assert split.num_groups == 1
    # 13 + 1 tokens: pages 0..2 full, shared; each branch's 4th page is its own
    assert split.group_pages == (tuple(lists[0][:3]),)
    assert split.saved_pages == n * 3  # n + 1 branches read the 3 pages once


def test_triton_tile_table_covers_each_group_in_tiles() -> None:
    """The Triton cascade's tile table (``shared_prefix.tile_table``): each group's rows in
    tiles of at most ``rows``, never across a group's end, empty tiles after the last; a
    table too short says so."""
    sp = pytest.importorskip("dendrite.attention.shared_prefix")
    table = sp.tile_table([(0, 5, 0), (5, 10, 0), (1, 4, 1)], 2, 10)
    tiles = list(zip(*(table[i * 10 : (i + 1) * 10] for i in range(4)), strict=True))
    want = [(0, 0, 2, 0), (0, 2, 2, 0), (0, 4, 1, 0), (1, 5, 2, 0), (1, 7, 2, 0), (1, 9, 1, 0),
            (2, 1, 2, 1), (2, 3, 1, 1), (0, 0, 0, 0), (0, 0, 0, 0)]  # fmt: skip
    assert tiles == want  # (group, first row, rows, depth)
    with pytest.raises(ValueError, match="exceed 5"):
        sp.tile_table([(0, 5, 0), (5, 10, 0)], 2, 5)


@given(
    st.lists(st.lists(st.integers(1, 40), min_size=1, max_size=6), min_size=1, max_size=4),
    st.integers(1, 16),
)
@settings(max_examples=200, deadline=None)
def test_triton_tile_table_fits_max_tiles(depths: list[list[int]], rows: int) -> None:
    """Any groups of any depths (each depth's groups disjoint rows of the batch) fit the table
    length a CUDA graph fixes for their batch, group count and depths."""
    sp = pytest.importorskip("dendrite.attention.shared_prefix")
    batch = max(sum(sizes) for sizes in depths)
    groups = []
    for depth, sizes in enumerate(depths):
        start = 0
        for n in sizes:
            groups.append((start, start + n, depth))
            start += n
    length = sp.max_tiles(batch, len(groups), rows, len(depths))
    table = sp.tile_table(groups, rows, length)
    counts, tile_depths = table[2 * length : 3 * length], table[3 * length :]
    for depth, sizes in enumerate(depths):  # every row of a depth's groups in one tile
        assert sum(c for c, d in zip(counts, tile_depths, strict=True) if c and d == depth) == sum(
            sizes
        )
    assert max(counts) <= rows


def test_triton_level0_key_blocks_follow_the_split_length() -> None:
    """Level 0 reads 64 keys a block while a split holds at most 512 keys (the tree's 4,096
    tokens in 8 splits), 128 above; blocks of K and V stay within 64 KiB for wider heads and
    fp32."""
    sp = pytest.importorskip("dendrite.attention.shared_prefix")
    kern = sp.CascadeKernels(32, 4, 132, head_dim=64)
    assert kern.block_n0_for(256, 16, 8) == 64  # 512 keys a split
    assert kern.block_n0_for(257, 16, 8) == 128
    assert kern.block_n0_for(1024, 16, 16) == 128
    wide = sp.CascadeKernels(32, 4, 132, head_dim=128, itemsize=4)
    assert {wide.block_n0_for(n, 16, 1) for n in (1, 1000)} == {32}


def test_triton_split_counts_are_powers_of_two() -> None:
    """Split counts (compiled into the merge) are powers of two from 1 to 16, and give about
    two waves of programs where the tiles alone do not."""
    sp = pytest.importorskip("dendrite.attention.shared_prefix")
    counts = {sp.num_splits(t, h, 132) for t in range(1, 300) for h in (1, 2, 4, 8)}
    assert counts == {1, 2, 4, 8, 16}
    assert sp.num_splits(9, 4, 132) == 8  # the tree: 9 tiles x 4 KV heads x 8 = 288 programs
    assert sp.num_splits(1, 1, 132) == 16
