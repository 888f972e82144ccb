"""The prefix index: freed segments cached, prompts matched at page granularity, LRU eviction.

Tree level (no model), with the shadow KV of ``test_kv_tree.py``: a branch started on a cached
prefix must read back exactly its prompt's tokens, after any mix of prompts sharing system
prefixes, forks, appends, frees and evictions, with ``check_integrity()`` after every op.

Engine level: a prompt added on a cache hit gives the same logits as a cold engine; the
32-prompt shared-prefix workload prefills exactly the tokens the cache does not hold.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from dendrite.engine import Engine, EngineConfig
from dendrite.errors import PoolExhaustedError
from dendrite.kv.tree import KVBranch, KVTree
from dendrite.model.loader import load_model
from dendrite.model.random_init import make_random_checkpoint
from dendrite.sampling import SamplingParams

from .test_kv_tree import append, check_contents, make_tree, snapshot

# ---------------------------------------------------------------------- tree level


def cached_tree(page_size: int = 4, num_pages: int = 64, watermark: int = 0) -> KVTree:
    tree = make_tree(page_size=page_size, num_pages=num_pages)
    tree.enable_cache(watermark)
    return tree


def start(tree: KVTree, ids: list[int]) -> tuple[KVBranch, int]:
    """A branch for prompt ``ids`` on its cached prefix, the rest appended (shadow KV)."""
    b, n = tree.new_branch_matching(ids)
    assert tree.token_ids(b) == ids[:n] and n <= len(ids) - 1
    append(tree, b, ids[n:])
    return b, n


def test_dead_tail_read_by_an_in_place_chain_passes_the_check() -> None:
    """Found by the soak (and reachable without a cache): an owner whose partial page died
    while its one child (written in place on that page) still has head-copied children.
    The drop was right; ``check_integrity`` wrongly demanded a head copy of every child."""
    tree = make_tree(page_size=4)
    a = tree.new_branch()
    append(tree, a, list(range(1, 39)))  # ends on slot 2 of its last page
    b = tree.fork(a)
    append(tree, a, [100])  # in place on that page
    c, d = tree.fork(a), tree.fork(a)
    append(tree, a, [101])  # in place again
    append(tree, c, [102])  # copies
    append(tree, d, [103])  # copies
    tree.free(b)
    tree.free(a)  # the page is now read by nobody: released, owner and chain marked dead
    tree.check_integrity()
    check_contents(tree)


def test_freed_prompt_is_reused_at_page_granularity() -> None:
    tree = cached_tree(page_size=4)
    a, n = start(tree, list(range(10, 20)))  # 10 tokens: pages [4, 4, 2]
    assert n == 0
    used = tree.pool.num_used
    tree.free(a)  # cached, trimmed to 8 tokens: the partial page goes back
    assert tree.pool.num_used == used - 1 and tree.stats().cached_pages == 2
    tree.check_integrity()
    b, n = start(tree, [*list(range(10, 16)), 99, 98])  # shares 6 tokens: one full page
    assert n == 4
    c, n = start(tree, list(range(10, 20)))  # the cached 8 tokens (the split keeps them)
    assert n == 8
    tree.check_integrity()
    check_contents(tree)
    tree.free(b)
    tree.free(c)
    tree.clear_cache()
    tree.check_integrity()
    assert tree.pool.num_free == tree.pool.num_pages


def test_match_on_a_live_branch_shares_its_pages() -> None:
    tree = cached_tree(page_size=4)
    a, _ = start(tree, list(range(30, 43)))  # live, 13 tokens
    b, n = start(tree, [*list(range(30, 42)), 7])  # 12 shared: split a's segment at 12
    assert n == 12
    assert tree.page_list(a)[:3] == tree.page_list(b)[:3]
    tree.check_integrity()
    check_contents(tree)


def test_last_prompt_token_stays_pending() -> None:
    tree = cached_tree(page_size=4)
    a, _ = start(tree, list(range(8)))
    tree.free(a)
    _b, n = tree.new_branch_matching(list(range(8)))  # all 8 cached, but 7 may be reused
    assert n == 4  # the last page boundary at or below 7
    assert tree.new_branch_matching([0])[1] == 0  # one token: nothing to reuse


def test_lru_eviction_spares_what_live_branches_read() -> None:
    tree = cached_tree(page_size=4, num_pages=8)
    old, _ = start(tree, [1] * 8)  # 2 pages
    new, _ = start(tree, [2] * 8)  # 2 pages
    _live, _ = start(tree, [3] * 8)  # 2 pages, stays live
    tree.free(old)
    tree.free(new)  # both cached; `old` is the least recently used
    assert tree.pool.num_free == 2
    _c, n = start(tree, [4] * 12)  # needs 3 pages: evicts `old` only
    assert n == 0 and tree.cache is not None and tree.cache.evicted_segments == 1
    assert tree.new_branch_matching([2] * 8 + [5])[1] == 8  # `new` survived
    tree.check_integrity()
    check_contents(tree)


def test_pool_exhausted_when_live_branches_hold_every_page() -> None:
    tree = cached_tree(page_size=4, num_pages=4)
    a, _ = start(tree, [1] * 8)
    b, _ = start(tree, [2] * 8)
    before = snapshot(tree)
    with pytest.raises(PoolExhaustedError, match="prefix cache holds none"):
        tree.append(a, [5])
    assert snapshot(tree) == before
    tree.free(b)  # cached; the next append evicts it
    append(tree, a, [5])
    tree.check_integrity()
    check_contents(tree)


def test_watermark_keeps_free_pages() -> None:
    tree = cached_tree(page_size=4, num_pages=16, watermark=6)
    for i in range(4):
        b, _ = start(tree, [i] * 8)
        tree.free(b)
    assert tree.pool.num_free >= 6
    tree.check_integrity()


def _random_ops(page_size: int, seed: int, ops: int, num_pages: int) -> None:
    rng = random.Random(seed)
    tree = cached_tree(page_size=page_size, num_pages=num_pages, watermark=rng.choice([0, 3]))
    systems = [[rng.randrange(6) for _ in range(rng.randint(3, 5 * page_size))] for _ in range(3)]
    shadow: dict[int, list[int]] = {}
    for _ in range(ops):
        live = list(tree.branches.values())
        op = rng.random()
        try:
            if op < 0.3 or not live:
                ids = rng.choice(systems) + [rng.randrange(6) for _ in range(rng.randint(1, 9))]
                b, n = tree.new_branch_matching(ids)
                shadow[b.id] = ids[:n]
                append(tree, b, ids[n:])
                shadow[b.id] = ids
            elif op < 0.45:
                b = rng.choice(live)
                c = tree.fork(b)
                shadow[c.id] = list(shadow[b.id])
            elif op < 0.75:
                b = rng.choice(live)
                toks = [rng.randrange(6) for _ in range(rng.randint(1, page_size + 2))]
                append(tree, b, toks)
                shadow[b.id] += toks
            elif op < 0.97:
                b = rng.choice(live)
                tree.free(b)
                del shadow[b.id]
            else:
                assert tree.cache is not None
                tree.cache.evict_one()
        except PoolExhaustedError:
            pass  # the append changed nothing; the cache may be empty now
        tree.check_integrity()
        check_contents(tree, shadow)
    for b in list(tree.branches.values()):
        tree.free(b)
    tree.clear_cache()
    tree.check_integrity()
    assert tree.pool.num_free == tree.pool.num_pages
    assert tree.cache is not None and tree.cache.hit_tokens > 0


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("seed", range(6))
def test_random_ops_with_cache_read_back_their_tokens(page_size: int, seed: int) -> None:
    _random_ops(page_size, seed, ops=300, num_pages=max(24, 120 // page_size))


# ---------------------------------------------------------------------- engine level


@pytest.fixture(scope="module")
def long_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("prefix")
    return make_random_checkpoint(root / "tiny", "llama", seed=3, max_position_embeddings=2048)


def _engine(path: Path, cache: bool, num_pages: int = 4096) -> Engine:
    cfg = EngineConfig(page_size=16, num_pages=num_pages, prefix_cache=cache)
    return Engine(load_model(path), None, cfg)


def test_logits_on_a_cache_hit_equal_a_cold_run(long_checkpoint: Path) -> None:
    g = torch.Generator().manual_seed(0)
    system = torch.randint(3, 256, (70,), generator=g).tolist()
    warm = _engine(long_checkpoint, cache=True)
    first = warm.add([*system, 5, 6, 7])
    warm.step([first])
    warm.free(first)
    for suffix in ([9, 8], [5, 6, 7, 11], list(range(3, 40))):
        ids = system + suffix
        b = warm.add(ids)
        assert len(b.pending) < len(ids)  # a hit
        (hot,) = warm.step([b], keep_logits=True)
        cold = _engine(long_checkpoint, cache=False)
        (ref,) = cold.step([cold.add(ids)], keep_logits=True)
        assert hot.logits is not None and ref.logits is not None
        torch.testing.assert_close(hot.logits, ref.logits, rtol=1e-5, atol=1e-5)
        assert hot.token == ref.token
        warm.check_integrity()
        warm.free(b)
    stats = warm.prefix_stats()
    assert stats is not None and stats.hit_tokens >= 3 * 64


SHARED, SUFFIX, PROMPTS = 1024, 8, 32


def _workload(engine: Engine) -> int:
    """32 prompts sharing a 1,024-token prefix: the first is stepped alone, then the other
    31 together; everything freed. Returns the prefill tokens the engine computed."""
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(3, 256, (SHARED,), generator=g).tolist()
    prompts = [shared + torch.randint(3, 256, (SUFFIX,), generator=g).tolist()
               for _ in range(PROMPTS)]  # fmt: skip
    params = SamplingParams(max_new_tokens=1)
    engine.telemetry.clear()
    first = engine.add(prompts[0], params)
    engine.step([first])
    rest = [engine.add(p, params) for p in prompts[1:]]
    engine.step(rest)
    engine.check_integrity()
    engine.free_all()
    return int(engine.telemetry.steps_frame()["prefill_tokens"].sum())


def test_shared_prefix_prefills_only_what_is_not_cached(long_checkpoint: Path) -> None:
    cold = _workload(_engine(long_checkpoint, cache=False))
    assert cold == PROMPTS * (SHARED + SUFFIX)  # 33,024
    engine = _engine(long_checkpoint, cache=True)
    warm = _workload(engine)
    assert warm == (SHARED + SUFFIX) + (PROMPTS - 1) * SUFFIX  # 1,280
    assert cold - warm == (PROMPTS - 1) * SHARED
    hits = engine.telemetry.prefix_frame()  # one row per lookup, in the telemetry
    assert len(hits) == PROMPTS and hits["matched_tokens"].sum() == (PROMPTS - 1) * SHARED
    # Again, everything now cached: each prompt reuses 1,024 tokens (its 8-token suffix is
    # less than a page, so it is fed again), and the first one too.
    again = _workload(engine)
    assert again == PROMPTS * SUFFIX  # 256
    engine.clear_cache()
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_pages
    assert math.isclose(engine.stats().cached_pages, 0)


def test_engine_step_that_cannot_fit_raises_and_changes_nothing(long_checkpoint: Path) -> None:
    e = _engine(long_checkpoint, cache=True, num_pages=8)
    old = e.add(list(range(3, 40)))  # 37 tokens: 3 pages once fed
    e.step([old])
    e.free(old)  # cached: 2 whole pages kept
    a = e.add(list(range(50, 110)))  # 60 tokens: 4 pages; evicts the cached ones
    e.step([a])
    b = e.add(list(range(120, 180)))  # 4 more pages: only 4 free in all
    e.step([b])
    e.extend(a, list(range(3, 10)))  # a needs another page; none is free or cached
    before = (snapshot(e.tree), a.pending, b.pending)
    with pytest.raises(PoolExhaustedError):
        e.step([a, b])
    assert (snapshot(e.tree), a.pending, b.pending) == before
    e.check_integrity()
    e.free(b)  # cached, trimmed to whole pages: its partial page is free, the step fits
    e.step([a])
    e.check_integrity()
