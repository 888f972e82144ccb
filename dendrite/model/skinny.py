"""Tensor-core GEMMs for decode steps of a few rows (up to 64; the engine: 2 to 16), split-K,
launched as programmatic dependents, with the residual add + RMSNorm between them.

A decode step of a tree (64 branches) or a beam search (8 beams) multiplies a few rows of
activations by every weight of the model once: like batch-1 decode it is bound by streaming
the weights, and by the fixed cost of each kernel. On the H200, cuBLAS runs each 64-row
projection of a TinyLlama-shape model in about 3.9 us plus its weight bytes at 3.9 TB/s (a fit
to four shapes): for the 89 GEMMs of a step, 0.34 ms of fixed cost on top of a 0.53 ms stream.

``_skinny_kernel`` computes ``y^T = W x^T``: a program owns ``BN`` output features and one of
``S`` slices of K, streams its [BN, BK] weight tiles (evict-first: each is read once a step)
and multiplies them by the matching [BM, BK] rows of x, BM (16 to 64) covering every row.
The weight sits on the MMA's M side, so Hopper's 64-row warp-group MMA runs on a handful of
activation rows. Split-K fills the SMs where N is small (the output and down projections of a
2048-wide model): each slice stores its fp32 partial sums and counts itself in with an atomic;
the block's last slice to arrive adds all of them up and writes the output, in the same
kernel (no reduce kernel, no memset: it resets its counter).

The SiLU-and-mul before the down projection is folded into that GEMM's load of x (prologue
``silu``: right for a few rows; at 64 rows the computed operand stalled the load pipeline,
2x slower on the H200). ``add_norm`` is the residual add + RMSNorm between the projections.
On Hopper every kernel here is launched as a programmatic dependent (fp16/bf16; not fp32,
where it was slower): its launch and set-up overlap the kernel before, and it waits for that
kernel before it reads or writes anything.
Everything sums in fp32 and rounds where a bf16 GEMM, FlashInfer's fused add-RMSNorm and
SiLU-and-mul round, so a step differs from the cuBLAS one by bf16 rounding and summation
order only (checked in the tests).

Measured on the H200 (``.device/exp_skinny.py``, ``.device/exp_pdl.py``; the 88 projections of
22 TinyLlama layers back to back in a CUDA graph): 64 rows 763 us against cuBLAS's 897 (832
without PDL); 8 rows 705-727 against 841. In the engine, with attention, RoPE and the norms
between them, that gain mostly went: see ``ENGINE_ROWS``. ``Transformer.use_skinny_kernels``
turns the path on for steps of 2 to ``ENGINE_ROWS`` rows. Triton's CPU interpreter runs the
same kernels in the tests (fp32 operands there: its ``tl.dot`` misreads bf16).

**fp32 weights** (a float32 model's decode steps) take the same kernel with the products at
3xTF32 (``tl.dot``'s ``tf32x3``: each operand split into two TF32 parts, three tensor-core
products, fp32 sums): as exact as fp32 here, not TF32's 10 bits. On the H200
(``.device/exp_s14a.py``, ``exp_s14b.py``; 8 rows, the TinyLlama projections): each output's
error against an fp64 product 0.7-1.6e-6 (cuBLAS fp32: 0.6-4.3e-6), and a step's 89 GEMMs in
1.47 ms against cuBLAS fp32's 3.70 (2.0-4.1 TB/s against 0.74-2.1). An FMA-only kernel (every
product at IEEE fp32 in registers, a 3-D accumulator) took 2.42 ms, ``tl.dot`` at IEEE
precision 3.76: dropped.

**Norms inside the GEMMs** (fp32 steps): ``matmul_add`` adds its product into the residual
stream in the GEMM's own epilogue and writes each row's sum of squares over its feature block;
``matmul_norm`` takes the residual stream as x, multiplies it by the norm's weight as it loads
and scales each row's sums by 1 / rms at the end (the sums of squares and the residual tile
are loaded before the weight stream, their latency behind it). A layer is then four GEMMs, the
RoPE + append kernel and attention, without the two ``add_norm`` kernels. bf16 steps keep
``add_norm``, which rounds as FlashInfer's fused add-RMSNorm (the fused form would normalise
the rounded residual). On the H200 the fp32 8-beam search went from 0.181-0.183 to 0.176-0.178
s (different machines; ``h200-experiments.json``, ``fp32_fused_norms``).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

MAX_ROWS = 64  # BM: all rows of the step in one tile
MAX_NORM = 16384  # add_norm holds a whole row in registers
# The engine's steps of 2 to this many rows take these kernels. On the H200, each against
# cuBLAS + FlashInfer's norms in the same run: the 8-beam search 1.09x and 1.07x faster
# (07b57fb), the 64-branch tree 0.99x (06b0c9e; 1.02x at e99ee50, when the split-K slices were
# added by the norm kernel instead), so 64-row steps stay on cuBLAS.
ENGINE_ROWS = 16
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PROLOGUES = {"none": 0, "silu": 2}  # 3: the RMSNorm of matmul_norm
# Steps of ENGINE_ROWS + 1 to this many rows keep cuBLAS for the QKV, output and down
# projections but take the gate/up projection with the SiLU-and-mul fused in (:func:`swiglu`):
# one kernel instead of two, without the [M, 2I] round trip. Its tile (64 features of each
# half a program, K 128 a load, 4 warps, 4 stages) was the best of 36 on the
# H200 (64 rows, 22 layers' weights in a CUDA graph, .device/exp_s12b.py): 15.2 us a layer
# against 17.6 for cuBLAS's gate/up GEMM + FlashInfer's SiLU-and-mul (8 warps: 16.3).
MID_ROWS = 64


class Tile(NamedTuple):
    """A launch of ``_skinny_kernel``: features per program, K per load, K slices, warps,
    pipeline stages."""

    bn: int
    bk: int
    splits: int
    warps: int
    stages: int


SWIGLU_TILE = Tile(64, 128, 1, 4, 4)


@triton.jit
def _skinny_kernel(
    X,
    W,
    Y,
    BIAS,
    WS,
    CNT,
    SS_IN,
    G,
    SS_OUT,
    M,
    N,
    K,
    k_split,
    sx,
    nb_in,
    eps,
    PROLOGUE: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREC: tl.constexpr = None,
    ADD: tl.constexpr = False,
    NBP: tl.constexpr = 1,
):
    """Y[:M, n-block] = x W^T (+ bias), this program's share: one slice of K (``k_split``, a
    multiple of BK). X has row stride ``sx``; for PROLOGUE 2 a row of X is [gate (K) | up
    (K)] and x = silu(gate) * up, rounded to W's dtype; for PROLOGUE 3 X is the residual
    stream r and the product is rmsnorm(r) G W^T, computed as (r G) W^T scaled by each
    row's 1 / rms at the end, from its sum of squares added up from the ``nb_in`` partials
    in SS_IN [nb_in, M] (``ADD``'s output of the GEMM before). With SPLIT, each
    slice stores its fp32 partial sum in WS [S, M, N] and counts itself in CNT[n-block]; the
    last slice of the block to arrive adds up all S, writes Y and sets the counter back to
    0. With ADD, Y is the residual stream: Y += x W^T (+ bias), and the block's sums of
    squares of the new rows go to SS_OUT[n-block, :M]."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn < N
    rm = tl.arange(0, BM)
    m_ok = rm < M
    kr = tl.arange(0, BK)
    w_rows = W + rn.to(tl.int64)[:, None] * K
    x_rows = X + rm.to(tl.int64)[:, None] * sx
    acc = tl.zeros([BN, BM], tl.float32)
    k0 = pid_s * k_split
    if USE_PDL:  # launched early: wait for the kernel before (x is its output)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    at = rm.to(tl.int64)[None, :] * N + rn[:, None]  # acc is [BN, BM]
    ok = n_ok[:, None] & m_ok[None, :]
    # Loaded before the loop, used after it (their latency hidden behind the weight stream):
    if PROLOGUE == 3:  # the rows' partial sums of squares (1 / rms scales the sums at the end)
        b = tl.arange(0, NBP)
        parts = tl.load(
            SS_IN + b[:, None] * M + rm[None, :], mask=(b < nb_in)[:, None] & m_ok[None, :],
            other=0.0,
        )  # fmt: skip
    if ADD:  # the residual's tile (only the block's last slice adds into it)
        r_old = tl.load(Y + at, mask=ok, other=0.0)
    for kb in range(k0, tl.minimum(k0 + k_split, K), BK):
        kk = kb + kr
        k_ok = kk < K
        w = tl.load(
            w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
            eviction_policy="evict_first",
        )  # fmt: skip
        xm = m_ok[:, None] & k_ok[None, :]
        if PROLOGUE == 2:
            gate = tl.load(x_rows + kk[None, :], mask=xm, other=0.0).to(tl.float32)
            up = tl.load(x_rows + K + kk[None, :], mask=xm, other=0.0).to(tl.float32)
            x = (gate / (1.0 + tl.exp(-gate)) * up).to(W.dtype.element_ty)
        elif PROLOGUE == 3:  # r * g; each row's 1 / rms multiplies its sums at the end
            r = tl.load(x_rows + kk[None, :], mask=xm, other=0.0).to(tl.float32)
            g = tl.load(G + kk, mask=k_ok, other=0.0).to(tl.float32)
            x = (r * g[None, :]).to(W.dtype.element_ty)
        else:
            x = tl.load(x_rows + kk[None, :], mask=xm, other=0.0)
        if UPCAST:  # the interpreter's tl.dot misreads bf16: the same values in fp32
            acc = tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), acc)
        else:  # PREC: fp32 operands at 3xTF32 ("tf32x3"), not TF32
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PREC)
    last = pid_s == tl.num_programs(1) - 1
    if SPLIT:
        splits = tl.num_programs(1)
        tl.store(WS + pid_s * M * N + at, acc, mask=ok)
        tl.debug_barrier()  # every thread's partial is out before the count (release below)
        arrived = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel", scope="gpu")
        last = arrived == splits - 1
        if last:  # the others' partials are in L2 (acquire above); read past L1
            acc = tl.zeros([BN, BM], tl.float32)
            for s in range(splits):
                acc += tl.load(WS + s * M * N + at, mask=ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(CNT + pid_n, 0)  # ready for the next launch
    if last:
        if PROLOGUE == 3:  # rmsnorm(r) g W^T = (1 / rms) (r g) W^T, row by row
            acc *= tl.rsqrt(tl.sum(parts, axis=0) / K + eps)[None, :]
        if HAS_BIAS:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        # rounded to the weight dtype as a bf16/fp16 GEMM's output is, whatever Y's dtype
        y = acc.to(W.dtype.element_ty)
        if ADD:  # the residual: r += y in fp32, stored rounded; the new rows' sums of squares
            r = r_old.to(tl.float32) + y.to(tl.float32)
            tl.store(Y + at, r.to(Y.dtype.element_ty), mask=ok)
            tl.store(SS_OUT + pid_n * M + rm, tl.sum(r * r, axis=0), mask=m_ok)
        else:
            tl.store(Y + at, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _swiglu_kernel(
    X,
    W,
    Y,
    BIAS,
    M,
    NI,
    K,
    sx,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Y[:M, f-block] = silu(x Wg^T) * (x Wu^T) for W = [Wg | Wu] ([2 NI, K], gate rows
    then up rows): this program's BN features of both halves over the whole K. Each half is
    rounded to W's dtype first, as the GEMM's output is before FlashInfer's SiLU-and-mul,
    which this replaces."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    n_ok = rn < NI
    rm = tl.arange(0, BM)
    m_ok = rm < M
    kr = tl.arange(0, BK)
    g_rows = W + rn.to(tl.int64)[:, None] * K
    u_rows = W + (rn + NI).to(tl.int64)[:, None] * K
    x_rows = X + rm.to(tl.int64)[:, None] * sx
    acc_g = tl.zeros([BN, BM], tl.float32)
    acc_u = tl.zeros([BN, BM], tl.float32)
    for kb in range(0, K, BK):
        kk = kb + kr
        k_ok = kk < K
        wm = n_ok[:, None] & k_ok[None, :]
        wg = tl.load(g_rows + kk[None, :], mask=wm, other=0.0, eviction_policy="evict_first")
        wu = tl.load(u_rows + kk[None, :], mask=wm, other=0.0, eviction_policy="evict_first")
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot misreads bf16: the same values in fp32
            acc_g = tl.dot(wg.to(tl.float32), tl.trans(x.to(tl.float32)), acc_g)
            acc_u = tl.dot(wu.to(tl.float32), tl.trans(x.to(tl.float32)), acc_u)
        else:
            acc_g = tl.dot(wg, tl.trans(x), acc_g)
            acc_u = tl.dot(wu, tl.trans(x), acc_u)
    if HAS_BIAS:
        acc_g += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        acc_u += tl.load(BIAS + NI + rn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
    gate = acc_g.to(W.dtype.element_ty).to(tl.float32)
    up = acc_u.to(W.dtype.element_ty).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate)) * up
    at = rm.to(tl.int64)[None, :] * NI + rn[:, None]  # the accumulators are [BN, BM]
    tl.store(Y + at, act.to(Y.dtype.element_ty), mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _add_norm_kernel(
    Y,
    R,
    G,
    OUT,
    N,
    eps,
    ADD: tl.constexpr,
    NP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One row: with ADD, R += Y (fp32 sum, stored rounded); OUT = rmsnorm(R) * G, the
    normalised fp32 sum rounded once (FlashInfer's fused add-RMSNorm rounds the same way)."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.arange(0, NP)
    ok = n < N
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    r = tl.load(R + row * N + n, mask=ok, other=0.0).to(tl.float32)
    if ADD:
        r += tl.load(Y + row * N + n, mask=ok, other=0.0).to(tl.float32)
        tl.store(R + row * N + n, r.to(R.dtype.element_ty), mask=ok)
    inv = tl.rsqrt(tl.sum(r * r, axis=0) / N + eps)
    g = tl.load(G + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * N + n, (r * inv * g).to(OUT.dtype.element_ty), mask=ok)


def block_rows(m: int, fp32: bool = False) -> int:
    """BM: the MMA's N side, 16 to 64 rows (fp32: from 8, the smallest TF32 MMA)."""
    return max(8 if fp32 else 16, triton.next_power_of_2(m))


def choose_tile(n: int, k: int, sms: int) -> Tile:
    """The launch for an [n, k] weight on ``sms`` SMs, from the H200 sweep of the TinyLlama
    projections at 8 and 64 rows (``h200-experiments.json``, ``skinny_gemm``): 128 features a
    program for wide or deep weights, 64 otherwise; then K slices (a power of two, each at
    least 512 deep) while the programs still fit one wave. It picks the sweep's best tile, or
    one within 3% of it, for every shape swept but 8-row QKV (5.60 against 5.30 us); the
    64-row down projection was swept with SiLU fused only."""
    bn = 128 if k >= 4096 or n >= 8192 else 64
    splits = _k_slices(triton.cdiv(n, bn), k, programs=sms, depth=512)
    return Tile(bn, 128, splits, 8 if bn == 128 else 4, 4)


def _k_slices(tiles: int, k: int, programs: int, depth: int) -> int:
    """K slices for ``tiles`` feature blocks: doubled (a power of two) while the programs
    stay within ``programs`` and each slice at least ``depth`` deep."""
    splits = 1
    while tiles * splits * 2 <= programs and k // (splits * 2) >= depth:
        splits *= 2
    return splits


def choose_tile_fp32(n: int, k: int, sms: int) -> Tile:
    """The launch for an fp32 [n, k] weight (3xTF32 products), from the H200 sweep at 8 rows
    (``h200-experiments.json``, ``fp32_beam``): 64 features and K 64 a load, 4 warps, 3
    stages; K slices (each at least 256 deep) while the programs fit three per SM. It picks
    the sweep's best for the output, gate/up and LM head projections and tiles within 1% of
    it for QKV (10.2 against 10.1 us) and down (18.3 against 18.1)."""
    return Tile(64, 64, _k_slices(triton.cdiv(n, 64), k, programs=3 * sms, depth=256), 4, 3)


class NormIn(NamedTuple):
    """The RMSNorm a ``matmul_norm`` applies to its residual-stream input: each row's sums of
    squares by feature block ([blocks, M] fp32, from ``matmul_add``), the norm's weight [K]
    and its epsilon."""

    sumsq: torch.Tensor
    weight: torch.Tensor
    eps: float


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: str = "none",
    tile: Tile | None = None,
    out_dtype: torch.dtype | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``x`` [M, K] ([M, 2K] for ``silu``) times ``weight`` [N, K]^T (+ ``bias``), M <= 64:
    [M, N] in ``out_dtype`` (default the weight's; the values rounded to the weight dtype
    as a GEMM's output is). One kernel whatever the tile's K slices (the last slice of each
    block adds them up). ``pdl``: launch as a programmatic dependent (Hopper; see
    ``gemv.pdl_supported``). fp32 weights: products at 3xTF32 (see the module doc).
    """
    m, n = x.shape[0], weight.shape[0]
    _check(x, weight, bias, PROLOGUES[prologue], "matmul")
    y = torch.empty(m, n, device=x.device, dtype=out_dtype or weight.dtype)
    _launch(x, weight, y, bias, PROLOGUES[prologue], tile, pdl)
    return y


def matmul_add(
    x: torch.Tensor,
    weight: torch.Tensor,
    residual: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: str = "none",
    tile: Tile | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``residual`` [M, N] += ``x`` W^T (+ ``bias``) in place (the product rounded to the
    weight dtype first, the sum in fp32), in the GEMM's own kernel: no output tensor, no
    add kernel. Returns the new rows' sums of squares by feature block, [blocks, M] fp32,
    for a ``matmul_norm`` (the RMSNorm before the next projection) to finish."""
    m, n = x.shape[0], weight.shape[0]
    _check(x, weight, bias, PROLOGUES[prologue], "matmul_add")
    if tuple(residual.shape) != (m, n) or not residual.is_contiguous():
        raise ValueError(
            f"skinny.matmul_add: a contiguous [{m}, {n}] residual, got {tuple(residual.shape)}"
        )
    if residual.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
        raise ValueError("skinny.matmul_add: x and the residual it adds into share storage")
    t = tile or _tile(weight, x.device)
    sumsq = torch.empty(triton.cdiv(n, t.bn), m, device=x.device, dtype=torch.float32)
    _launch(x, weight, residual, bias, PROLOGUES[prologue], t, pdl, add=sumsq)
    return sumsq


def matmul_norm(
    residual: torch.Tensor,
    norm: NormIn,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tile: Tile | None = None,
    out_dtype: torch.dtype | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """``rmsnorm(residual) * norm.weight`` times ``weight`` [N, K]^T (+ ``bias``), the norm
    inside the GEMM: it loads x = r * g (rounded to the weight dtype) and scales each row's
    sums by 1 / rms at the end, from ``norm.sumsq`` (``matmul_add``'s partial sums of
    squares of ``residual``; loaded before the weight stream, so no latency of its own).
    In fp32 (the engine's use) that differs from ``add_norm`` then ``matmul`` by the order
    of two multiplications; a bf16 x would be rounded before the scaling, not after (the
    engine keeps bf16 steps on ``add_norm``). [M, N] as ``matmul``'s."""
    m, k = residual.shape[0], weight.shape[1]
    n = weight.shape[0]
    _check(residual, weight, bias, 0, "matmul_norm")
    parts, g = norm.sumsq, norm.weight
    if (
        parts.dim() != 2
        or parts.shape[0] < 1
        or parts.shape[1] != m
        or parts.dtype != torch.float32
        or not parts.is_contiguous()
    ):
        raise ValueError(
            f"skinny.matmul_norm: contiguous fp32 sums of squares [blocks >= 1, {m}], got "
            f"{tuple(parts.shape)} {parts.dtype}"
        )
    if tuple(g.shape) != (k,) or not g.is_contiguous() or not g.is_floating_point():
        raise ValueError(
            f"skinny.matmul_norm: a contiguous float norm weight of ({k},), got "
            f"{tuple(g.shape)} {g.dtype}"
        )
    if parts.device != residual.device or g.device != residual.device:
        raise ValueError(
            "skinny.matmul_norm: the sums of squares and norm weight on another device"
        )
    y = torch.empty(m, n, device=residual.device, dtype=out_dtype or weight.dtype)
    _launch(residual, weight, y, bias, 3, tile, pdl, norm=norm)
    return y


def _check(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, code: int, what: str
) -> None:
    """Raise ValueError (before any launch) unless x, the weight and the bias fit."""
    n, k = weight.shape
    width = 2 * k if code == 2 else k
    if bias is not None and (tuple(bias.shape) != (n,) or not bias.is_contiguous()):
        raise ValueError(f"skinny.{what}: a contiguous bias of ({n},), got {tuple(bias.shape)}")
    if x.dim() != 2 or x.shape[1] != width or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(
            f"skinny.{what} wants an [M, {width}] x with unit column stride and a contiguous "
            f"[N, K] weight, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"skinny.{what} takes 1 to {MAX_ROWS} rows, got {x.shape[0]}")


def _tile(weight: torch.Tensor, device: torch.device) -> Tile:
    n, k = weight.shape
    fp32 = weight.dtype == torch.float32
    return (choose_tile_fp32 if fp32 else choose_tile)(n, k, _sms(device))


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    y: torch.Tensor,
    bias: torch.Tensor | None,
    code: int,
    tile: Tile | None,
    pdl: bool,
    *,
    add: torch.Tensor | None = None,
    norm: NormIn | None = None,
) -> None:
    """One ``_skinny_kernel`` launch (inputs checked by the caller): y = x W^T, or with
    ``add`` (the [blocks, M] sums of squares out) y += x W^T; ``norm``: PROLOGUE 3."""
    m = x.shape[0]
    n, k = weight.shape
    fp32 = weight.dtype == torch.float32
    t = tile or _tile(weight, x.device)
    k_split = triton.cdiv(triton.cdiv(k, t.splits), t.bk) * t.bk
    splits = triton.cdiv(k, k_split)
    blocks = triton.cdiv(n, t.bn)
    ws, cnt = y, y
    if splits > 1:
        ws = torch.empty(splits, m, n, device=x.device, dtype=torch.float32)
        cnt = counters(x.device, blocks)
    bm = block_rows(m, fp32)
    # pipeline stages that fit shared memory: a weight tile and one (SiLU: two) x tiles each
    stage_bytes = (t.bn + bm * (2 if code == 2 else 1)) * t.bk * weight.element_size()
    stages = max(1, min(t.stages, _smem(x.device) // stage_bytes))
    launch = {"launch_pdl": True} if pdl else {}
    ss_in, g, nb, eps = (
        (y, y, 1, 0.0) if norm is None else (norm.sumsq, norm.weight, norm.sumsq.shape[0], norm.eps)
    )
    _skinny_kernel[(blocks, splits)](
        x, weight, y, bias if bias is not None else weight, ws, cnt, ss_in, g,
        add if add is not None else y, m, n, k, k_split, x.stride(0), nb, eps, PROLOGUE=code,
        SPLIT=splits > 1, HAS_BIAS=bias is not None, BM=bm, BN=t.bn, BK=t.bk,
        UPCAST=_INTERPRETED, USE_PDL=pdl, PREC="tf32x3" if fp32 else None, ADD=add is not None,
        NBP=triton.next_power_of_2(nb), num_warps=t.warps, num_stages=stages, **launch,
    )  # fmt: skip


def swiglu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    tile: Tile | None = None,
) -> torch.Tensor:
    """``silu(gate) * up`` of ``x`` [M, K] (M <= 64) times the fused ``weight`` [2I, K] (gate
    rows, then up rows; + ``bias`` [2I]) in one kernel: [M, I] in the weight's dtype. The
    GEMM into [M, 2I] and FlashInfer's SiLU-and-mul, without the [M, 2I] round trip and the
    second launch. ``tile``: features per program (of each half), K per load, warps, stages
    (no K slices: the SiLU needs whole sums)."""
    m, k = x.shape if x.dim() == 2 else (0, 0)
    n2 = weight.shape[0]
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != k or n2 % 2 or x.stride(1) != 1:
        raise ValueError(
            f"skinny.swiglu wants an [M, K] x with unit column stride and a [2I, K] weight, "
            f"got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if not weight.is_contiguous() or not 1 <= m <= MAX_ROWS:
        raise ValueError(f"skinny.swiglu: a contiguous weight and 1 to {MAX_ROWS} rows, got {m}")
    i = n2 // 2
    t = tile or SWIGLU_TILE
    bm = block_rows(m)
    y = torch.empty(m, i, device=x.device, dtype=weight.dtype)
    stage_bytes = (2 * t.bn + bm) * t.bk * weight.element_size()  # two weight tiles and x's
    stages = max(1, min(t.stages, _smem(x.device) // stage_bytes))
    _swiglu_kernel[(triton.cdiv(i, t.bn),)](
        x, weight, y, bias if bias is not None else weight, m, i, k, x.stride(0),
        HAS_BIAS=bias is not None, BM=bm, BN=t.bn, BK=t.bk, UPCAST=_INTERPRETED,
        num_warps=t.warps, num_stages=stages,
    )  # fmt: skip
    return y


def add_norm(
    y: torch.Tensor | None,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    *,
    eps: float = 1e-6,
    pdl: bool = False,
) -> torch.Tensor:
    """``residual += y`` (in place; skipped for ``y=None``), then ``rmsnorm(residual) *
    norm_weight`` as a new [M, N] tensor of the residual's dtype."""
    if not residual.is_contiguous() or residual.dim() != 2:
        raise ValueError(
            f"add_norm wants a contiguous [M, N] residual, got {tuple(residual.shape)}"
        )
    m, n = residual.shape
    if y is not None and (tuple(y.shape) != (m, n) or not y.is_contiguous()):
        raise ValueError(f"add_norm: y {tuple(y.shape)} for a [{m}, {n}] residual")
    if tuple(norm_weight.shape) != (n,):
        raise ValueError(f"add_norm: a norm weight of {tuple(norm_weight.shape)} for width {n}")
    if n > MAX_NORM:
        raise ValueError(f"add_norm holds whole rows in registers: N={n} is over {MAX_NORM}")
    out = torch.empty_like(residual)
    np_ = triton.next_power_of_2(n)
    launch = {"launch_pdl": True} if pdl else {}
    _add_norm_kernel[(m,)](
        y if y is not None else residual, residual, norm_weight, out, n, eps, ADD=y is not None,
        NP=np_, USE_PDL=pdl, num_warps=4 if np_ <= 4096 else 8, **launch,
    )  # fmt: skip
    return out


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MIN_COUNTERS = 4096


def counters(device: torch.device, blocks: int) -> torch.Tensor:
    """The split-K arrival counters of ``device``: int32, all 0 between kernels (each block's
    last slice resets its own). Shared by every launch, which is safe in stream order: a
    kernel touches them only after the one before it has finished. Not across streams: two
    split-K GEMMs running at once on one device would count into the same slots (the engine
    runs its steps on one stream). Allocated outside CUDA
    graph capture (``Transformer.use_skinny_kernels`` does it; a zeroing kernel must not be
    captured)."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < blocks:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny.counters: allocate them before capturing a CUDA graph")
        have = torch.zeros(max(_MIN_COUNTERS, blocks), dtype=torch.int32, device=device)
        _COUNTERS[device] = have
    return have


@functools.lru_cache(maxsize=16)
def _smem(device: torch.device) -> int:
    """Shared memory a program may use, less 8 KiB for the epilogue's layout conversions."""
    if device.type != "cuda":
        return 224 * 1024
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 160 * 1024)) - 8 * 1024


@functools.lru_cache(maxsize=16)
def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: tile as on an H100/H200
    return torch.cuda.get_device_properties(device).multi_processor_count
