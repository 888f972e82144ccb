"""Unit tests of the page pool and the KV tree, driven directly (no model).

The *shadow KV* check is the heart of it: every appended token writes its own id into the
slot the tree hands back (K = id + 1000 * layer, V = -K, in every layer), so reading a
branch's first ``len(b)`` slots along ``page_list(b)`` must give back ``token_ids(b)``
exactly. A wrong page list, a copy-on-write that copied the wrong slots (or too few layers),
or two branches writing one slot all show up as a mismatch.

The helpers here (``make_tree``, ``append``, ``read_kv``, ``snapshot``) are shared with
``test_state_machine.py``.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

from dendrite.errors import BranchError, ConfigError, PoolExhaustedError
from dendrite.kv.pool import PagePool, PoolConfig
from dendrite.kv.tree import KVBranch, KVTree

LAYER_OFFSET = 1 << 20  # token ids stay below this; every (layer, K/V) value is distinct and
# exact in fp32 (below 2**24)


def make_tree(page_size: int = 4, num_pages: int = 64, num_layers: int = 2) -> KVTree:
    """A tree over a tiny pool: 2 KV heads of dim 2, fp32 (ids up to 2**24 are exact)."""
    cfg = PoolConfig(
        num_layers=num_layers,
        num_pages=num_pages,
        num_kv_heads=2,
        head_dim=2,
        page_size=page_size,
    )
    return KVTree(PagePool(cfg))


def write_kv(tree: KVTree, slots: list[int], tokens: list[int]) -> None:
    """Write each token's shadow value into its slot, in every layer, K and V."""
    if not slots:
        return
    P = tree.page_size
    s = torch.tensor(slots, dtype=torch.long)
    v = torch.tensor(tokens, dtype=torch.float32)[:, None, None]  # [T, 1, 1]
    for layer, kv in enumerate(tree.pool.kv):  # [N, 2, P, Hkv, D]
        kv[s // P, 0, s % P] = v + LAYER_OFFSET * layer
        kv[s // P, 1, s % P] = -(v + LAYER_OFFSET * layer)


def append(tree: KVTree, b: KVBranch, tokens: list[int]) -> list[int]:
    """``tree.append`` plus the shadow write (what the attention backend does in a step)."""
    slots = tree.append(b, tokens)
    assert len(slots) == len(tokens)
    write_kv(tree, slots, tokens)
    return slots


def read_kv(tree: KVTree, b: KVBranch) -> list[int]:
    """Token ids read back from the pool along ``page_list(b)``; checks every layer, K and V."""
    P = tree.page_size
    n = len(b)
    pages = tree.page_list(b)
    assert len(pages) == (n + P - 1) // P
    pos = torch.arange(n)
    page = torch.tensor(pages, dtype=torch.long)[pos // P] if n else pos
    off = pos % P
    k0 = tree.pool.kv[0][page, 0, off]  # [n, Hkv, D]
    for layer, kv in enumerate(tree.pool.kv):
        want = k0 + LAYER_OFFSET * layer
        assert torch.equal(kv[page, 0, off], want), f"layer {layer} K differs from layer 0"
        assert torch.equal(kv[page, 1, off], -want), f"layer {layer} V differs from its K"
    assert torch.equal(k0, k0[:, :1, :1].expand_as(k0)), "heads/dims of one slot differ"
    return [int(x) for x in k0[:, 0, 0].tolist()]


def check_contents(tree: KVTree, shadow: dict[int, list[int]] | None = None) -> None:
    """Every live branch reads back its own tokens (and the shadow's, when given)."""
    if shadow is not None:
        assert set(tree.branches) == set(shadow)
    for bid, b in tree.branches.items():
        ids = tree.token_ids(b)
        assert len(ids) == len(b)
        if shadow is not None:
            assert ids == shadow[bid], f"branch {bid} token ids"
        assert read_kv(tree, b) == ids, f"branch {bid} reads wrong KV"


def snapshot(tree: KVTree) -> dict[str, Any]:
    """Everything a failed or rolled-back operation must leave exactly as it was."""
    return {
        "stats": tree.stats(),
        "free": sorted(tree.pool.free_pages()),
        "claims": list(tree._claim),
        "pages": {i: tree.page_list(b) for i, b in tree.branches.items()},
        "tokens": {i: tree.token_ids(b) for i, b in tree.branches.items()},
        "refcounts": tree.page_refcounts(),
    }


def cow_events(tree: KVTree) -> int:
    return sum(e[2] for e in tree.telemetry.pages if e[1] == "cow")


_ids = itertools.count(1)


def fresh(n: int) -> list[int]:
    """``n`` token ids never used before in this module (so any mix-up is visible)."""
    return [next(_ids) % LAYER_OFFSET for _ in range(n)]


# ---------------------------------------------------------------------- copy-on-write accounting


@pytest.mark.parametrize(("page_size", "prompt_len"), [(4, 6), (4, 5), (16, 7), (16, 31)])
def test_fork_mid_page_then_one_token_each_costs_exactly_one_page(
    page_size: int, prompt_len: int
) -> None:
    tree = make_tree(page_size)
    a = tree.new_branch()
    append(tree, a, fresh(prompt_len))
    used = tree.pool.num_used
    assert used == (prompt_len + page_size - 1) // page_size

    b = tree.fork(a)
    assert tree.pool.num_used == used, "fork must not take a page"
    assert cow_events(tree) == 0

    append(tree, a, fresh(1))  # first writer: in place on the shared partial page
    assert tree.pool.num_used == used
    assert cow_events(tree) == 0
    append(tree, b, fresh(1))  # second writer: copies that one page
    assert tree.pool.num_used == used + 1
    assert cow_events(tree) == 1
    tree.check_integrity()
    check_contents(tree)
    assert tree.token_ids(a)[:prompt_len] == tree.token_ids(b)[:prompt_len]
    assert tree.token_ids(a)[-1] != tree.token_ids(b)[-1]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_fork_at_page_boundary_takes_only_new_pages_and_copies_none(page_size: int) -> None:
    tree = make_tree(page_size)
    a = tree.new_branch()
    append(tree, a, fresh(2 * page_size))
    used = tree.pool.num_used
    assert used == 2
    b = tree.fork(a)
    assert tree.pool.num_used == used
    append(tree, a, fresh(1))
    append(tree, b, fresh(1))
    assert tree.pool.num_used == used + 2  # one fresh page each
    assert cow_events(tree) == 0
    # a whole further page each costs exactly one more page each, still no copy
    append(tree, a, fresh(page_size))
    append(tree, b, fresh(page_size))
    assert tree.pool.num_used == used + 4
    assert cow_events(tree) == 0
    tree.check_integrity()
    check_contents(tree)


def test_many_siblings_of_a_mid_page_fork_copy_one_page_each_but_the_first() -> None:
    tree = make_tree(4)
    root = tree.new_branch()
    append(tree, root, fresh(6))  # pages: [a b c d] [e f . .]
    sibs = [tree.fork(root) for _ in range(5)]
    used = tree.pool.num_used
    for i, s in enumerate([root, *sibs]):
        append(tree, s, fresh(1))
        assert tree.pool.num_used == used + i  # root in place, each sibling after copies
        assert cow_events(tree) == i
    tree.check_integrity()
    check_contents(tree)


def test_first_writer_in_place_needs_no_free_page_but_the_copy_does() -> None:
    tree = make_tree(4, num_pages=2)
    a = tree.new_branch()
    append(tree, a, fresh(6))  # both pages used, the second one partially
    b = tree.fork(a)
    assert tree.pool.num_free == 0
    before = snapshot(tree)
    with pytest.raises(PoolExhaustedError, match="1 new KV pages but only 0"):
        tree.append_batch([(a, [1]), (b, [2])])  # the copy needs a page
    assert snapshot(tree) == before
    tree.check_integrity()
    append(tree, a, fresh(1))  # in place: fits in a full pool
    assert tree.pool.num_free == 0
    with pytest.raises(PoolExhaustedError):
        tree.append(b, [3])
    tree.check_integrity()
    check_contents(tree)


# ---------------------------------------------------------------------- fork is O(1)


@pytest.mark.parametrize("prompt_len", [0, 1, 5, 8, 37])
def test_fork_touches_no_page(prompt_len: int) -> None:
    tree = make_tree(4)
    a = tree.new_branch()
    append(tree, a, fresh(prompt_len))
    for _ in range(3):  # forks of forks too
        before = snapshot(tree)
        forks = len(tree.telemetry.forks)
        page_events = len(tree.telemetry.pages)
        child = tree.fork(a)
        assert len(tree.telemetry.forks) == forks + 1
        assert tree.telemetry.forks[-1][1:3] == (a.id, child.id)
        assert len(tree.telemetry.pages) == page_events, "fork logged a page event"
        after = snapshot(tree)
        assert after["free"] == before["free"]
        assert after["claims"] == before["claims"]
        assert after["stats"].used_pages == before["stats"].used_pages
        assert tree.page_list(child) == tree.page_list(a) == before["pages"][a.id]
        assert tree.token_ids(child) == tree.token_ids(a)
        a = child
    tree.check_integrity()
    check_contents(tree)


# ---------------------------------------------------------------------- contents


def _grow_tree(tree: KVTree, seed: int, ops: int) -> dict[int, list[int]]:
    """A fixed pseudo-random sequence of fork / append / free; returns the shadow tokens."""
    g = torch.Generator().manual_seed(seed)

    def pick(n: int) -> int:
        return int(torch.randint(n, (1,), generator=g))

    first = tree.new_branch()
    toks = fresh(1 + pick(2 * tree.page_size + 3))
    append(tree, first, toks)
    shadow = {first.id: toks}
    for _ in range(ops):
        live = list(tree.branches.values())
        b = live[pick(len(live))]
        op = pick(10)
        if op < 3:
            c = tree.fork(b)
            shadow[c.id] = list(shadow[b.id])
        elif op < 9 or len(live) == 1:
            toks = fresh(1 + pick(tree.page_size + 2))
            append(tree, b, toks)
            shadow[b.id] += toks
        else:
            tree.free(b)
            del shadow[b.id]
        tree.check_integrity()
        check_contents(tree, shadow)
    return shadow


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_contents_across_forks_of_forks(page_size: int, seed: int) -> None:
    tree = make_tree(page_size, num_pages=512)
    shadow = _grow_tree(tree, seed, ops=120)
    assert len(shadow) > 3  # the run really built a tree
    assert tree.stats().shared_pages > 0
    for b in list(tree.branches.values()):
        tree.free(b)
        tree.check_integrity()
        del shadow[b.id]
        check_contents(tree, shadow)
    assert tree.pool.num_free == tree.pool.num_pages


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_contents_hand_built_tree(page_size: int) -> None:
    """A deep chain of mid-page forks, each level with three siblings writing in turn."""
    tree = make_tree(page_size, num_pages=256)
    a = tree.new_branch()
    append(tree, a, fresh(page_size + 1))
    for depth in range(6):
        kids = [tree.fork(a) for _ in range(3)]
        for i, k in enumerate(kids):
            append(tree, k, fresh(i + depth + 1))
        append(tree, a, fresh(1))
        tree.check_integrity()
        check_contents(tree)
        a = kids[depth % 3]
    # mid-page forks copy (a page of one slot is never partial)
    assert (cow_events(tree) > 0) == (page_size > 1)
    for b in list(tree.branches.values()):
        tree.free(b)
    tree.check_integrity()
    assert tree.pool.num_free == tree.pool.num_pages


# ---------------------------------------------------------------------- free / truncate


def test_free_returns_every_page_and_freed_handles_are_refused() -> None:
    tree = make_tree(4, num_pages=32)
    a = tree.new_branch()
    append(tree, a, fresh(10))
    b = tree.fork(a)
    append(tree, b, fresh(3))
    c = tree.fork(b)
    append(tree, c, fresh(5))
    append(tree, a, fresh(2))
    assert tree.pool.num_used > 0
    tree.free(b)
    tree.check_integrity()
    check_contents(tree)
    for op in (
        lambda: tree.free(b),
        lambda: tree.fork(b),
        lambda: tree.append(b, [1]),
        lambda: tree.append_batch([(a, [1]), (b, [1])]),
        lambda: tree.truncate(b, 1),
    ):
        before = snapshot(tree)
        with pytest.raises(BranchError, match="not a live branch"):
            op()
        assert snapshot(tree) == before
    assert not b.alive
    tree.free(a)
    tree.free(c)
    tree.check_integrity()
    assert tree.pool.num_free == tree.pool.num_pages
    assert sorted(tree.pool.free_pages()) == list(range(tree.pool.num_pages))
    assert not any(tree._claim)
    assert tree.stats().used_pages == 0 and tree.stats().segments == 0
    with pytest.raises(BranchError):
        tree.free(a)


def test_branch_twice_in_one_batch_is_refused() -> None:
    tree = make_tree(4)
    a = tree.new_branch()
    append(tree, a, fresh(3))
    before = snapshot(tree)
    with pytest.raises(BranchError, match="twice"):
        tree.append_batch([(a, [1]), (a, [2])])
    assert snapshot(tree) == before


# (prompt, fork?, first appends by the fork's sibling, then the append to roll back)
TRUNCATE_CASES = {
    "fresh-branch": (0, False, 0, 9),
    "within-own-page": (5, False, 0, 2),
    "crossing-pages": (5, False, 0, 11),
    "in-place-on-parent-page": (6, True, 0, 1),
    "in-place-then-new-pages": (6, True, 0, 9),
    "copy-on-write-head": (6, True, 1, 1),
    "copy-on-write-then-pages": (6, True, 1, 7),
    "at-page-boundary": (8, True, 1, 5),
}


@pytest.mark.parametrize("case", list(TRUNCATE_CASES))
@pytest.mark.parametrize("page_size", [1, 4])
def test_truncate_rolls_back_exactly(case: str, page_size: int) -> None:
    prompt, fork, sibling_first, n = TRUNCATE_CASES[case]
    tree = make_tree(page_size, num_pages=64)
    a = tree.new_branch()
    append(tree, a, fresh(prompt))
    b = tree.fork(a) if fork else a
    if sibling_first:
        append(tree, a, fresh(sibling_first))  # takes the shared page in place first
    before = snapshot(tree)
    cows = cow_events(tree)
    append(tree, b, fresh(n))
    tree.check_integrity()
    tree.truncate(b, n)
    tree.check_integrity()
    assert snapshot(tree) == before
    check_contents(tree)
    # and the branch works exactly as before the rolled-back append
    append(tree, b, fresh(n))
    copies = sibling_first and prompt % page_size != 0  # b's first token lands on a's page
    assert cow_events(tree) - cows == (2 if copies else 0)  # once rolled back, once for good
    tree.check_integrity()
    check_contents(tree)


def test_truncate_partially_and_refusals() -> None:
    tree = make_tree(4)
    a = tree.new_branch()
    append(tree, a, fresh(10))
    before = snapshot(tree)
    append(tree, a, fresh(7))
    tree.truncate(a, 3)
    tree.truncate(a, 4)
    assert snapshot(tree) == before
    check_contents(tree)
    b = tree.fork(a)
    for br in (a, b):  # both handles read a shared segment: nothing of their own to undo
        with pytest.raises(BranchError):
            tree.truncate(br, 1)
    append(tree, b, fresh(2))
    with pytest.raises(BranchError, match="cannot truncate 3"):
        tree.truncate(b, 3)
    tree.truncate(b, 0)
    tree.check_integrity()
    check_contents(tree)


# ---------------------------------------------------------------------- refcounts and stats


def test_page_refcounts_and_stats_on_a_hand_built_tree() -> None:
    tree = make_tree(4, num_pages=16)
    a = tree.new_branch()
    append(tree, a, fresh(10))  # pages 0 1 2, the last holding 2 tokens
    assert tree.page_list(a) == [0, 1, 2]
    assert tree.page_refcounts() == {0: 1, 1: 1, 2: 1}
    assert tree.stats().shared_pages == 0

    b = tree.fork(a)
    assert tree.page_refcounts() == {0: 2, 1: 2, 2: 2}
    assert tree.stats().shared_pages == 3

    append(tree, a, fresh(1))  # in place on page 2
    append(tree, b, fresh(1))  # copies page 2 to page 3
    assert tree.page_list(a) == [0, 1, 2]
    assert tree.page_list(b) == [0, 1, 3]
    assert tree.page_refcounts() == {0: 2, 1: 2, 2: 1, 3: 1}

    c = tree.fork(b)
    append(tree, c, fresh(2))  # c fills page 3 in place (b has not written past it)
    assert tree.page_list(c) == [0, 1, 3, 4]
    assert tree.page_refcounts() == {0: 3, 1: 3, 2: 1, 3: 2, 4: 1}

    s = tree.stats()
    pb = tree.pool.config.page_bytes
    assert pb == 2 * 2 * 4 * 2 * 2 * 4  # layers * K/V * page * heads * dim * fp32
    assert s.total_pages == 16
    assert s.used_pages == 5 and s.free_pages == 11
    assert s.shared_pages == 3
    assert s.used_bytes == 5 * pb and s.shared_bytes == 3 * pb
    assert s.live_branches == 3
    assert s.logical_tokens == 11 + 11 + 13
    assert s.unique_tokens == 10 + 1 + 1 + 2  # prompt, a's, b's, c's
    tree.check_integrity()
    check_contents(tree)

    tree.free(b)  # c still reads page 3
    assert tree.page_refcounts() == {0: 2, 1: 2, 2: 1, 3: 1, 4: 1}
    assert tree.stats().shared_pages == 2
    tree.free(a)  # a's one token on page 2 goes; nobody reads page 2 any more (c reads its
    # copy, page 3), so c absorbs the prompt's segment and page 2 goes back to the pool
    assert tree.page_refcounts() == {0: 1, 1: 1, 3: 1, 4: 1}
    assert tree.stats().used_pages == 4
    assert tree.stats().segments == 1
    assert tree.pool.is_free(2) and tree._claim[2] == 0
    tree.check_integrity()
    check_contents(tree)


# ---------------------------------------------------------------------- all or nothing


def test_a_partial_page_nobody_reads_is_released_with_its_in_place_chain() -> None:
    """Owner, then two in-place writers on its partial page; every survivor copied it."""
    tree = make_tree(page_size=8)
    a = tree.new_branch()
    append(tree, a, fresh(3))  # owner: page 0, slots 0..2
    b = tree.fork(a)
    append(tree, a, fresh(2))  # a writes in place (slots 3..4)
    c = tree.fork(a)
    append(tree, a, fresh(1))  # a again in place (slot 5)
    append(tree, c, fresh(1))  # c copies page 0 (slots 0..4) + its token
    append(tree, b, fresh(1))  # b copies page 0 (slots 0..2) + its token
    check_contents(tree)
    used = tree.stats().used_pages
    assert used == 3
    tree.free(a)  # page 0 is now read by nobody: b and c read their copies
    assert tree.stats().used_pages == used - 1
    assert tree.pool.is_free(0) and tree._claim[0] == 0
    tree.check_integrity()
    check_contents(tree)
    append(tree, c, fresh(5))  # both go on growing over the released page
    append(tree, b, fresh(9))
    tree.check_integrity()
    check_contents(tree)
    tree.free(b)
    tree.free(c)
    assert tree.stats().used_pages == 0
    tree.check_integrity()


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_append_batch_is_all_or_nothing(page_size: int) -> None:
    P = page_size
    tree = make_tree(P, num_pages=6)
    a = tree.new_branch()
    append(tree, a, fresh(2 * P + 1))
    b = tree.fork(a)
    c = tree.new_branch()
    free = tree.pool.num_free
    assert free == 3
    before = snapshot(tree)
    allocs = len(tree.telemetry.pages)
    # a: in place / fresh pages; b: a copy (P > 1) + pages; c: fresh pages: one page too many
    batch = [(a, fresh(P)), (b, fresh(P)), (c, fresh(2 * P))]
    with pytest.raises(PoolExhaustedError, match=r"needs \d+ new KV pages but only 3 of 6"):
        tree.append_batch(batch)
    assert snapshot(tree) == before
    assert len(tree.telemetry.pages) == allocs
    tree.check_integrity()
    check_contents(tree)
    # dropping one item makes it fit, and then it all lands
    slots = tree.append_batch(batch[:2])
    for (br, toks), sl in zip(batch[:2], slots, strict=True):
        write_kv(tree, sl, toks)
        assert tree.token_ids(br)[-len(toks) :] == toks
    tree.check_integrity()
    check_contents(tree)


def test_pool_allocate_is_all_or_nothing_and_config_is_checked() -> None:
    pool = PagePool(PoolConfig(num_layers=1, num_pages=4, num_kv_heads=1, head_dim=1))
    got = pool.allocate(3)
    assert got == [0, 1, 2] and pool.num_free == 1
    with pytest.raises(PoolExhaustedError, match="need 2 free KV pages but only 1"):
        pool.allocate(2)
    assert pool.num_free == 1 and pool.free_pages() == [3]
    pool.release(got)
    assert pool.num_free == 4
    with pytest.raises(AssertionError, match="released twice"):
        pool.release([0])
    for bad in ({"num_pages": 0}, {"page_size": 0}, {"head_dim": -1}, {"num_layers": 1.5}):
        kwargs: dict[str, Any] = {
            "num_layers": 1,
            "num_pages": 4,
            "num_kv_heads": 1,
            "head_dim": 1,
            **bad,
        }
        with pytest.raises(ConfigError, match=next(iter(bad))):
            PoolConfig(**kwargs)
