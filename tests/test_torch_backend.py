"""The torch reference backend's fresh-prompt path: a step that is one branch's whole sequence
attends over its own K/V with ``is_causal`` instead of gathering the pages through a mask.
It must give what the gather does (and write the same pages); any other step must not take
it."""

from __future__ import annotations

import math

import pytest
import torch

from dendrite.attention.base import BatchLayout, build_layout
from dendrite.attention.torch_ref import TorchBackend
from dendrite.kv.pool import PagePool, PoolConfig

HQ, HKV, D, P = 8, 2, 16, 16


def _pool(dtype: torch.dtype = torch.float32) -> PagePool:
    return PagePool(
        PoolConfig(
            num_layers=1, num_pages=32, num_kv_heads=HKV, head_dim=D, page_size=P, dtype=dtype
        )
    )


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of q [T, HQ, D] at positions start.. over keys k, v [L, HKV, D] (all
    positions 0..L-1), in fp64."""
    rep = HQ // HKV
    s = torch.einsum("thd,lhd->htl", q.double(), k.double().repeat_interleave(rep, 1))
    s = s / math.sqrt(D)
    t = torch.arange(q.shape[0])[:, None] + start
    s = s.masked_fill(torch.arange(k.shape[0])[None, :] > t, float("-inf"))
    return torch.einsum("htl,lhd->thd", s.softmax(-1), v.double().repeat_interleave(rep, 1))


def _prompt_layout(n: int) -> tuple[list[int], BatchLayout]:
    pages = [5, 2, 9][: -(-n // P)]
    slots = [[pages[i // P] * P + i % P for i in range(n)]]
    return pages, build_layout([n], [n], [pages], slots, P, torch.device("cpu"))


@pytest.mark.parametrize(("n", "dtype"), [(2, torch.float32), (16, torch.float32),
                                          (37, torch.float32), (37, torch.bfloat16)])  # fmt: skip
def test_fresh_prompt_attends_causally_as_the_gather_does(n: int, dtype: torch.dtype) -> None:
    """Over an fp32 pool and a bf16 one (k, v rounded to the pool's dtype, as the gather reads
    them back); ``attend`` after the same plan (its mask built then) agrees too."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(n, h, D, generator=g) for h in (HQ, HKV, HKV))
    _, layout = _prompt_layout(n)
    fresh_pool, gather_pool = _pool(dtype), _pool(dtype)
    fresh, gather = TorchBackend(fresh_pool), TorchBackend(gather_pool)
    fresh.plan(layout)
    gather.plan(layout)
    got = fresh.run(0, q, k, v)
    assert fresh.fresh_steps == 1
    gather._fresh = False  # the mask-and-gather path on the same step
    want = gather.run(0, q, k, v)
    assert torch.equal(fresh_pool.kv[0], gather_pool.kv[0])  # the same pages written
    assert (got - want).abs().max() < 1e-5
    assert (fresh.attend(0, q) - want).abs().max() < 1e-5
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    kr, vr = (x.to(dtype).float() for x in (k, v))
    assert (got.double() - _reference(q, kr, vr, 0)).abs().max() < tol


def test_only_a_whole_sequence_takes_the_fresh_path() -> None:
    """A prompt's second chunk (keys before its queries), two branches, decode steps (a
    one-token prompt too) and a prompt longer than the sliding window all gather; a prompt
    within the window does not."""
    g = torch.Generator().manual_seed(0)
    k_all, v_all = torch.randn(40, HKV, D, generator=g), torch.randn(40, HKV, D, generator=g)
    backend = TorchBackend(_pool())
    slots = [[(i // P + 1) * P + i % P for i in range(40)]]
    pages = [1, 2, 3]
    first = build_layout([24], [24], [pages[:2]], [slots[0][:24]], P, torch.device("cpu"))
    backend.plan(first)
    backend.run(0, torch.randn(24, HQ, D, generator=g), k_all[:24], v_all[:24])
    second = build_layout([16], [40], [pages], [slots[0][24:]], P, torch.device("cpu"))
    backend.plan(second)
    q = torch.randn(16, HQ, D, generator=g)
    got = backend.run(0, q, k_all[24:], v_all[24:])
    assert (got.double() - _reference(q, k_all, v_all, 24)).abs().max() < 1e-5
    two = build_layout([3, 3], [3, 3], [[4], [5]], [[64, 65, 66], [80, 81, 82]], P,
                       torch.device("cpu"))  # fmt: skip
    backend.plan(two)
    decode = build_layout([1], [41], [[1, 2, 3, 4]], [[64]], P, torch.device("cpu"))
    backend.plan(decode)
    one = build_layout([1], [1], [[6]], [[96]], P, torch.device("cpu"))  # a decode step
    backend.plan(one)
    assert backend.fresh_steps == 1
    windowed = TorchBackend(_pool(), sliding_window=8)
    windowed.plan(first)  # 24 tokens: the window cuts it
    assert windowed.fresh_steps == 0
    windowed.plan(_prompt_layout(8)[1])  # within the window: fresh
    assert windowed.fresh_steps == 1
