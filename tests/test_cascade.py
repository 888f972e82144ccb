"""The cascade split (``attention/cascade.py``): which pages a decode step reads once per group.

The GPU tests run the split through FlashInfer; here, on CPU, the split itself is checked: on
the docstring's example, on page lists of real KV trees (every branch's level 0 + level 1
pages are its page list, groups cover the batch), and numerically: attention over level 0
and level 1 merged by log-sum-exp equals attention over the whole page list.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite.attention.base import build_layout
from dendrite.attention.cascade import split_shared_prefixes
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
    layout = build_layout([1] * B, kv_lens, lists, slots, P, torch.device("cpu"))
    ref = TorchBackend(pool)
    ref.plan(layout)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(B, HQ, D, generator=g)
    k = torch.randn(B, HKV, D, generator=g)
    v = torch.randn(B, HKV, D, generator=g)
    want = ref.run(0, q, k, v)  # also writes k, v into the pages
    kv = pool.kv[0]  # [N, 2, P, Hkv, D]
    for b in range(B):
        m = split.shared[b]
        parts = [
            _attend(q[b], kv, lists[b][:m], None),
            _attend(q[b], kv, own[b], kv_lens[b] - m * P),
        ]
        got = _merge([p for p in parts if p is not None])
        torch.testing.assert_close(got, want[b], rtol=1e-5, atol=1e-5)


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
    table = sp.tile_table([0, 5, 10], 2, 8)
    groups, firsts, counts = table[:8], table[8:16], table[16:]
    want = [(0, 0, 2), (0, 2, 2), (0, 4, 1), (1, 5, 2), (1, 7, 2), (1, 9, 1), (0, 0, 0), (0, 0, 0)]
    assert list(zip(groups, firsts, counts, strict=True)) == want
    with pytest.raises(ValueError, match="exceed 5"):
        sp.tile_table([0, 5, 10], 2, 5)


@given(st.lists(st.integers(1, 40), min_size=1, max_size=6), st.integers(1, 16))
@settings(max_examples=200, deadline=None)
def test_triton_tile_table_fits_max_tiles(sizes: list[int], rows: int) -> None:
    """Any groups fit the table length a CUDA graph fixes for their batch and group count."""
    sp = pytest.importorskip("dendrite.attention.shared_prefix")
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + n)
    length = sp.max_tiles(starts[-1], len(sizes), rows)
    table = sp.tile_table(starts, rows, length)
    counts = table[2 * length :]
    assert sum(counts) == starts[-1]  # every row in exactly one tile
    assert max(counts) <= rows


def test_triton_split_counts_are_powers_of_two() -> None:
    """Split counts (compiled into the merge) are powers of two from 1 to 16, and give about
    two waves of programs where the tiles alone do not."""
    sp = pytest.importorskip("dendrite.attention.shared_prefix")
    counts = {sp.num_splits(t, h, 132) for t in range(1, 300) for h in (1, 2, 4, 8)}
    assert counts == {1, 2, 4, 8, 16}
    assert sp.num_splits(9, 4, 132) == 8  # the tree: 9 tiles x 4 KV heads x 8 = 288 programs
    assert sp.num_splits(1, 1, 132) == 16
