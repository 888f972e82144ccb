"""Host-side rules of the split-K GEMMs (``dendrite/model/skinny.py``): the tile choice and
the input checks. The kernels themselves run in ``test_gemv.py`` (Triton's interpreter) and
``test_gpu.py`` (compiled)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")  # a test dependency (pip install -e '.[test]')

from dendrite.model import skinny
from dendrite.model.skinny import Tile

# The H200 sweep's best tiles (h200-experiments.json, skinny_gemm.per_projection) for the
# TinyLlama projections, or the one within 3% of it that the rule picks (K per load 128).
SWEEP = {
    (2560, 2048): Tile(64, 128, 2, 4, 4),  # qkv (64 rows: the best, 6.82 us)
    (2048, 2048): Tile(64, 128, 4, 4, 4),  # o (the best at 8 and 64 rows)
    (11264, 2048): Tile(128, 128, 1, 8, 4),  # gate_up (the best at 8 and 64 rows)
    (2048, 5632): Tile(128, 128, 8, 8, 4),  # down (8 rows: the best, 9.48 us)
    (32000, 2048): Tile(128, 128, 1, 8, 4),  # LM head (33.5 / 36.8 us, best 32.7 / 36.7)
}


@pytest.mark.parametrize("shape", list(SWEEP))
def test_tile_choice_follows_the_h200_sweep(shape: tuple[int, int]) -> None:
    assert skinny.choose_tile(*shape, sms=132) == SWEEP[shape]


@given(n=st.integers(1, 200_000), k=st.integers(1, 30_000), sms=st.sampled_from([16, 80, 108, 132]))
def test_tile_choice_fills_at_most_one_wave_with_deep_slices(n: int, k: int, sms: int) -> None:
    t = skinny.choose_tile(n, k, sms)
    tiles = -(-n // t.bn)
    assert t.splits & (t.splits - 1) == 0  # a power of two
    assert t.splits == 1 or (tiles * t.splits <= sms and k // t.splits >= 512)
    assert t.bn in (64, 128) and t.warps == (8 if t.bn == 128 else 4)


# fp32 weights at 3xTF32, 8 rows (h200-experiments.json, fp32_beam): the sweep's best tile, or
# the one within 1% of it that the rule picks.
SWEEP32 = {
    (2560, 2048): Tile(64, 64, 8, 4, 3),  # qkv (10.2 us; best 10.1 at K 32 a load, 4 stages)
    (2048, 2048): Tile(64, 64, 8, 4, 3),  # o (8.9, the best)
    (11264, 2048): Tile(64, 64, 2, 4, 3),  # gate_up (26.6, the best)
    (2048, 5632): Tile(64, 64, 8, 4, 3),  # down (18.3; best 18.1 at K 32, 16 slices)
    (32000, 2048): Tile(64, 64, 1, 4, 3),  # LM head (64.7, the best)
}


@pytest.mark.parametrize("shape", list(SWEEP32))
def test_fp32_tile_choice_follows_the_h200_sweep(shape: tuple[int, int]) -> None:
    assert skinny.choose_tile_fp32(*shape, sms=132) == SWEEP32[shape]


def test_fp32_steps_take_8_row_blocks() -> None:
    assert [skinny.block_rows(m, fp32=True) for m in (1, 8, 9, 16)] == [8, 8, 16, 16]
    assert [skinny.block_rows(m) for m in (1, 8, 9, 16)] == [16, 16, 16, 16]


def test_bad_shapes_raise_before_any_launch() -> None:
    w = torch.zeros(32, 48, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="1 to 64 rows"):
        skinny.matmul(torch.zeros(65, 48, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match=r"\[M, 96\]"):  # silu wants [gate | up]
        skinny.matmul(torch.zeros(4, 48, dtype=torch.bfloat16), w, prologue="silu")
    with pytest.raises(ValueError, match="contiguous"):
        skinny.matmul(torch.zeros(4, 48, dtype=torch.bfloat16), w.t().contiguous().t())
    r = torch.zeros(4, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"for a \[4, 32\] residual"):
        skinny.add_norm(torch.zeros(3, 32, dtype=torch.bfloat16), r, r[0])
    with pytest.raises(ValueError, match="norm weight"):
        skinny.add_norm(None, r, r[0, :16])
    with pytest.raises(ValueError, match="contiguous"):
        skinny.add_norm(None, r.t(), r[0])


def test_fused_norm_gemms_refuse_bad_input_before_any_launch() -> None:
    """``matmul_add`` / ``matmul_norm`` raise ValueError, the residual untouched, for inputs
    their kernel would read wrongly: a strided or empty table of sums of squares, a strided
    norm weight, a bias of the wrong size, x sharing the residual's storage."""
    w, r = torch.randn(32, 48), torch.randn(4, 32)
    before = r.clone()
    with pytest.raises(ValueError, match=r"bias of \(32,\)"):
        skinny.matmul_add(torch.randn(4, 48), w, r, torch.zeros(31))
    assert torch.equal(r, before)
    buf = torch.randn(4 * 48 + 4 * 32)  # x and the residual in one storage
    x, res = buf[: 4 * 48].view(4, 48), buf[4 * 48 :].view(4, 32)
    kept = buf.clone()
    with pytest.raises(ValueError, match="share storage"):
        skinny.matmul_add(x, w, res)
    assert torch.equal(buf, kept)
    g, ss = torch.rand(32), torch.rand(2, 4)
    wn = torch.randn(16, 32)
    bad = [
        skinny.NormIn(torch.rand(4, 2).t(), g, 1e-5),  # strided
        skinny.NormIn(torch.rand(0, 4), g, 1e-5),  # no blocks
        skinny.NormIn(ss, torch.rand(64)[::2], 1e-5),  # strided norm weight
        skinny.NormIn(ss.double(), g, 1e-5),
        skinny.NormIn(ss, torch.rand(31), 1e-5),
    ]
    for norm in bad:
        with pytest.raises(ValueError, match="matmul_norm"):
            skinny.matmul_norm(r, norm, wn)
    assert torch.equal(r, before)


def test_gemm32_bad_input_raises_before_any_launch() -> None:
    from dendrite.model import gemm32

    w = torch.zeros(32, 48)
    with pytest.raises(ValueError, match="prologue"):
        gemm32.matmul(torch.zeros(4, 48), w, prologue="gelu")
    with pytest.raises(ValueError, match=r"\[M, 48\]"):
        gemm32.matmul(torch.zeros(4, 40), w)
    with pytest.raises(ValueError, match="for fp32"):
        gemm32.matmul(torch.zeros(4, 48, dtype=torch.bfloat16), w.bfloat16())
    with pytest.raises(ValueError, match=r"bias of \(32,\)"):
        gemm32.matmul(torch.zeros(4, 48), w, torch.zeros(31))
    with pytest.raises(ValueError, match="contiguous"):
        gemm32.matmul(torch.zeros(4, 48), w.t().contiguous().t())
