"""The page pool's batched copy-on-write: ``copy_pages`` and the deferred ``request_copy``."""

from __future__ import annotations

import pytest
import torch

from dendrite.errors import ConfigError
from dendrite.kv.pool import PagePool, PoolConfig


def make_pool(num_layers: int = 3, num_pages: int = 8, page_size: int = 4) -> PagePool:
    cfg = PoolConfig(
        num_layers=num_layers, num_pages=num_pages, num_kv_heads=2, head_dim=3, page_size=page_size
    )
    pool = PagePool(cfg)
    g = torch.Generator().manual_seed(0)
    for t in pool.kv:
        t.copy_(torch.randn(t.shape, generator=g))
    return pool


def test_copy_pages_copies_the_first_slots_of_every_layer_k_and_v() -> None:
    pool = make_pool()
    before = [t.clone() for t in pool.kv]
    pool.copy_pages([1, 5, 2], [6, 0, 3], [3, 1, 4])
    for layer, (t, old) in enumerate(zip(pool.kv, before, strict=True)):
        want = old.clone()
        want[6, :, :3] = old[1, :, :3]
        want[0, :, :1] = old[5, :, :1]
        want[3, :, :4] = old[2, :, :4]
        assert torch.equal(t, want), layer  # the other slots and pages are untouched


def test_requested_copies_run_together_before_the_pages_are_read() -> None:
    pool = make_pool()
    before = [t.clone() for t in pool.kv]
    pool.request_copy(1, 6, 2)
    pool.request_copy(2, 7, 3)
    assert sum(e[2] for e in pool.telemetry.pages if e[1] == "cow") == 2  # one per page
    kv = pool.kv  # reading the pages runs the pending copies first
    for t, old in zip(kv, before, strict=True):
        assert torch.equal(t[6, :, :2], old[1, :, :2]) and torch.equal(t[7, :, :3], old[2, :, :3])
        assert torch.equal(t[6, :, 2:], old[6, :, 2:])


def test_a_page_released_with_a_pending_copy_gets_it_first() -> None:
    pool = make_pool(num_pages=4)
    pages = pool.allocate(2)
    pool.request_copy(pages[0], pages[1], 2)
    pool.release([pages[1]])  # the copy lands now, not into the page's next owner
    assert not pool._copies
    pool.release([pages[0]])
    assert pool.num_free == 4


def test_the_scratch_page_is_never_handed_out() -> None:
    pool = make_pool(num_pages=4)
    assert pool.kv[0].shape[0] == 5 and pool.scratch_page == 4
    assert pool.scratch_page not in pool.allocate(4)


def test_copy_slots_reads_every_source_before_writing() -> None:
    """Device-indexed copies (the pipelined beam search's last pages): a permutation where
    each page is another's source gets the old contents, not ones written by this call."""
    for n in (3, 4):  # part of each page; whole pages (P = 4)
        pool = make_pool()
        before = [t.clone() for t in pool.kv]
        src, dst = torch.tensor([1, 2, 3, 3]), torch.tensor([2, 3, 1, 5])  # 1 -> 2 -> 3 -> 1
        pool.copy_slots(src, dst, n)
        for layer, (t, old) in enumerate(zip(pool.kv, before, strict=True)):
            want = old.clone()
            for s, d in zip(src.tolist(), dst.tolist(), strict=True):
                want[d, :, :n] = old[s, :, :n]  # K and V, the first n slots only
            assert torch.equal(t, want), (n, layer)


def test_copy_slots_refuses_bad_input_changing_nothing() -> None:
    pool = make_pool()
    before = [t.clone() for t in pool.kv]
    for src, dst, n in (
        (torch.tensor([1]), torch.tensor([2]), 5),  # more slots than a page has
        (torch.tensor([1]), torch.tensor([2]), -1),
        (torch.tensor([1, 2]), torch.tensor([3]), 2),  # unpaired
        (torch.tensor([[1]]), torch.tensor([[2]]), 2),  # not a list of pages
    ):
        with pytest.raises(ConfigError, match="copy_slots"):
            pool.copy_slots(src, dst, n)
    assert all(torch.equal(t, old) for t, old in zip(pool.kv, before, strict=True))
