"""Matrix-vector kernels for one-row decode steps, with the small ops before them fused in.

A batch-1 decode step reads every weight once for one row of activations: it is a chain of
matrix-vector products, bound by HBM bandwidth, with a few element-wise ops between them. On
the H200, cuBLAS's M=1 kernels read a 2-10 MB projection at 1.4-2 TB/s, and each of the small
kernels between them (add + RMSNorm, SiLU-and-mul) costs a launch of its own. These Triton
kernels give each program ``BN`` whole rows of ``W`` [N, K] (row-major) in registers,
accumulate in fp32 and fold the op that produces their input into the load of that input::

    prologue "none":  y = W x
    prologue "norm":  s = x + r (written to r_out by one program); y = W (rmsnorm(s) * g)
                      without r: s = x (the first layer's embedding)
    prologue "silu":  x = [gate | up] of length 2K;  y = W (silu(gate) * up)

and the fused QKV projection applies RoPE to its output (a program owns row pairs (i,
i + D/2) of a head). The prologue computes in fp32 and rounds to the weight dtype once, as
FlashInfer's fused add-RMSNorm and SiLU-and-mul do, so a step differs from the unfused one by
bf16 rounding only (checked in the GPU tests). The QKV kernel also writes the step's K and
V into their slot of the paged cache. Per layer a decode step then runs 5 kernels instead of
12 (cuBLAS's split-K M=1 GEMMs need a reduce kernel)::

    qkv = rope(W_qkv norm1(h + r)) -> K/V pages   attend   o = W_o out
    gate_up = W_gu norm2(o + r)                   h = W_down silu(gate) * up

On Hopper each is launched as a programmatic dependent of the kernel before it: a program
loads its weight rows, then waits for the previous kernel, then reads its input, so the
weight stream of one kernel overlaps the tail of the last. Weights are loaded with the
evict-first hint: a step reads each of them once, and 2 GB streaming through a 50 MB L2
would otherwise push out what is read again (the KV pages, the activations). On the H200
that took a TinyLlama-shape step's graph from 0.915 to 0.887 ms.

Only for one-row steps (batch-1 decode); ``Transformer.use_gemv_kernels`` turns them on.
This module imports Triton (only on CUDA, or in Triton's CPU interpreter for the tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

PROLOGUES = {"none": 0, "norm": 1, "silu": 2}


@triton.jit
def _row_input(
    X,
    R,
    R_OUT,
    G,
    K,
    eps,
    kk,
    k_ok,
    pid,
    dtype: tl.constexpr,
    PROLOGUE: tl.constexpr,
    HAS_R: tl.constexpr,
):
    """The whole input row [KP] in fp32 after the prologue (rounded to ``dtype`` once)."""
    if PROLOGUE == 1:
        s = tl.load(X + kk, mask=k_ok, other=0.0).to(tl.float32)
        if HAS_R:
            s += tl.load(R + kk, mask=k_ok, other=0.0).to(tl.float32)
            if pid == 0:
                tl.store(R_OUT + kk, s.to(R_OUT.dtype.element_ty), mask=k_ok)
        inv = tl.rsqrt(tl.sum(s * s, axis=0) / K + eps)
        g = tl.load(G + kk, mask=k_ok, other=0.0).to(tl.float32)
        x = (s * inv * g).to(dtype).to(tl.float32)
    elif PROLOGUE == 2:
        gate = tl.load(X + kk, mask=k_ok, other=0.0).to(tl.float32)
        up = tl.load(X + K + kk, mask=k_ok, other=0.0).to(tl.float32)
        x = (gate / (1.0 + tl.exp(-gate)) * up).to(dtype).to(tl.float32)
    else:
        x = tl.load(X + kk, mask=k_ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _gemv_row_kernel(
    X,
    W,
    Y,
    R,
    R_OUT,
    G,
    BIAS,
    N,
    K,
    eps,
    PROLOGUE: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BN: tl.constexpr,
    KP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """y = W x(prologue), each program holding its whole [BN, K] weight tile in registers.

    With ``USE_PDL`` (programmatic dependent launch, Hopper on) the tile is loaded *before*
    waiting for the previous kernel: weights never depend on it, so a program streams its
    weights while the kernel before it drains, and only the activations wait."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    n_ok = rn < N
    kk = tl.arange(0, KP)
    k_ok = kk < K
    w = tl.load(
        W + rn[:, None] * K + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0,
        eviction_policy="evict_first",
    )  # fmt: skip
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = _row_input(X, R, R_OUT, G, K, eps, kk, k_ok, pid, W.dtype.element_ty, PROLOGUE, HAS_R)
    y = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)
    # rounded to the weight dtype as a bf16/fp16 GEMM's output is, whatever Y's dtype
    tl.store(Y + rn, y.to(W.dtype.element_ty).to(Y.dtype.element_ty), mask=n_ok)


@triton.jit
def _store_kv(KV, base, r, val, ok, KV_ROWS, P):
    """Rows ``r`` of K (0 <= r < KV_ROWS) and V (KV_ROWS <= r) into one slot of the paged
    cache (``base``: the slot's first K element; V is P slots later); r < 0 (Q) skipped."""
    is_v = (r >= KV_ROWS).to(tl.int64)
    dst = base + is_v * (P * KV_ROWS) + r - is_v * KV_ROWS
    tl.store(KV + dst, val.to(KV.dtype.element_ty), mask=ok & (r >= 0))


@triton.jit
def _gemv_rope_kernel(
    X,
    W,
    Y,
    R,
    R_OUT,
    G,
    BIAS,
    POS,
    COS_SIN,
    KV,
    PAGE,
    OFF,
    N,
    K,
    eps,
    ROTATED,
    Q_ROWS,
    KV_ROWS,
    P,
    HALF: tl.constexpr,
    WRITE_KV: tl.constexpr,
    PROLOGUE: tl.constexpr,
    HAS_R: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BN: tl.constexpr,
    KP: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The whole-row product of a fused QKV weight with RoPE applied to its output.

    A program owns ``BN`` pairs of rows (i, i + D/2) of the same head, the pairs RoPE
    rotates together: y_i' = y_i cos - y_(i+D/2) sin, y_(i+D/2)' = y_(i+D/2) cos + y_i sin,
    in fp32 at the position ``POS[0]`` (cos | sin table [positions, D], fp32). Rows from
    ``ROTATED`` on (the V heads) are stored as they are. With ``WRITE_KV`` the K rows (from
    ``Q_ROWS``, rotated) and the V rows also go straight into the paged cache ``KV``
    [pages, 2, P, Hkv, D] at page ``PAGE[0]``, slot ``OFF[0]``: the step's KV append."""
    pid = tl.program_id(0)
    pair = pid * BN + tl.arange(0, BN)
    lo = (pair // HALF) * (2 * HALF) + pair % HALF
    hi = lo + HALF
    n_ok = lo < N
    kk = tl.arange(0, KP)
    k_ok = kk < K
    m = n_ok[:, None] & k_ok[None, :]
    w_lo = tl.load(
        W + lo[:, None] * K + kk[None, :], mask=m, other=0.0, eviction_policy="evict_first"
    )
    w_hi = tl.load(
        W + hi[:, None] * K + kk[None, :], mask=m, other=0.0, eviction_policy="evict_first"
    )
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    x = _row_input(X, R, R_OUT, G, K, eps, kk, k_ok, pid, W.dtype.element_ty, PROLOGUE, HAS_R)
    y_lo = tl.sum(w_lo.to(tl.float32) * x[None, :], axis=1)
    y_hi = tl.sum(w_hi.to(tl.float32) * x[None, :], axis=1)
    if HAS_BIAS:
        y_lo += tl.load(BIAS + lo, mask=n_ok, other=0.0).to(tl.float32)
        y_hi += tl.load(BIAS + hi, mask=n_ok, other=0.0).to(tl.float32)
    pos = tl.load(POS).to(tl.int64)
    freq = pair % HALF
    cos = tl.load(COS_SIN + pos * (2 * HALF) + freq)
    sin = tl.load(COS_SIN + pos * (2 * HALF) + HALF + freq)
    rot = lo < ROTATED
    cos = tl.where(rot, cos, 1.0)
    sin = tl.where(rot, sin, 0.0)
    out_lo = (y_lo * cos - y_hi * sin).to(Y.dtype.element_ty)
    out_hi = (y_hi * cos + y_lo * sin).to(Y.dtype.element_ty)
    tl.store(Y + lo, out_lo, mask=n_ok)
    tl.store(Y + hi, out_hi, mask=n_ok)
    if WRITE_KV:
        base = (tl.load(PAGE).to(tl.int64) * 2 * P + tl.load(OFF).to(tl.int64)) * KV_ROWS
        _store_kv(KV, base, lo - Q_ROWS, out_lo, n_ok, KV_ROWS, P)
        _store_kv(KV, base, hi - Q_ROWS, out_hi, n_ok, KV_ROWS, P)


MAX_K = 16384  # a program holds BN whole rows of the weight in registers
# (BN: rows per program, num_warps). Tuned in the engine on the H200 (batch-1 decode of the
# TinyLlama shape, two rounds over 38 tiles per projection): no per-shape choice beat this one
# by more than the run-to-run noise (about 5%).
DEFAULT_TILE = (4, 8)


def pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch: CUDA on Hopper or newer, and not the interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: str = "none",
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    tile: tuple[int, int] | None = None,
    pdl: bool = False,
    rope: tuple[torch.Tensor, torch.Tensor, int, int] | None = None,
    kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``y`` [1, N] = the prologue's input times ``weight`` [N, K]^T (+ ``bias``).

    ``x``: [1, K] ([1, 2K] for ``silu``). For ``norm``, ``residual`` [1, K] (or None) is added
    to ``x`` first and the sum is returned as the new residual (a new tensor: the old one is
    read by every program while one of them writes the sum), and ``norm_weight`` [K] scales
    the normalised sum. Returns ``(y, new_residual)``; ``new_residual`` is None unless
    ``prologue == "norm"`` with a residual. ``pdl``: launch as a programmatic dependent of
    the kernel before it (see ``pdl_supported``; every kernel launched so must wait on its
    predecessor before reading, which these do). ``rope``: (positions [1] on the device,
    cos | sin table [positions, head_dim] fp32, head_dim, rows to rotate): RoPE on the
    output's first rows (the Q and K heads of a fused QKV weight). ``kv`` (with ``rope``):
    (the layer's paged cache [pages, 2, P, Hkv, D], page [1] and slot [1] on the device, rows
    of Q): write the K and V rows into that slot too (the step's KV append). ``out_dtype``:
    ``y``'s dtype (default the weight's; fp32 for logits: the same values, rounded to the
    weight dtype as a GEMM's output, without a cast kernel after it; not with ``rope``).
    """
    n, k = weight.shape
    code = PROLOGUES[prologue]
    if out_dtype is not None and rope is not None:
        raise ValueError("gemv: out_dtype is for the row kernel, not the RoPE one")
    width = 2 * k if code == 2 else k
    if x.shape != (1, width) or not x.is_contiguous() or not weight.is_contiguous():
        raise ValueError(
            f"gemv wants a contiguous [1, {width}] x and [N, K] weight, got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if k > MAX_K:
        raise ValueError(f"gemv holds whole rows in registers: K={k} is over {MAX_K}")
    bn, warps = tile or DEFAULT_TILE
    if rope is not None:
        head_dim = rope[2]
        if n % head_dim or tuple(rope[1].shape[1:]) != (head_dim,) or bn % 2:
            raise ValueError("gemv: RoPE needs whole heads, a [positions, head_dim] table, even BN")
        if kv is not None:
            pages = kv[0]
            if kv[3] + 2 * pages.shape[3] * pages.shape[4] != n or pages.shape[4] != head_dim:
                raise ValueError(f"gemv: a KV cache of shape {tuple(pages.shape)} does not fit")
            if pages.dtype != weight.dtype:
                raise ValueError(f"gemv: a {pages.dtype} KV cache for {weight.dtype} weights")
    y = torch.empty(1, n, device=x.device, dtype=out_dtype or weight.dtype)
    r_out = torch.empty_like(residual) if code == 1 and residual is not None else None
    kp = triton.next_power_of_2(k)
    args = (
        x,
        weight,
        y,
        residual if residual is not None else x,
        r_out if r_out is not None else y,
        norm_weight if norm_weight is not None else weight,
        bias if bias is not None else weight,
        n,
        k,
        eps,
    )
    flags = dict(PROLOGUE=code, HAS_R=residual is not None, HAS_BIAS=bias is not None, KP=kp)
    launch = dict(USE_PDL=pdl, num_warps=warps, num_stages=1)
    if pdl:
        launch["launch_pdl"] = True
    if rope is None:
        _gemv_row_kernel[(triton.cdiv(n, bn),)](*args, **flags, BN=bn, **launch)
        return y, r_out
    positions, cos_sin, head_dim, rotated = rope
    if kv is None:
        pages, page, offset, q_rows, kv_rows, page_size = y, positions, positions, 0, 0, 1
    else:
        pages, page, offset, q_rows = kv
        page_size, kv_rows = pages.shape[2], pages.shape[3] * pages.shape[4]
    grid = (triton.cdiv(n // 2, bn // 2),)
    _gemv_rope_kernel[grid](
        *args[:7], positions, cos_sin, pages, page, offset, *args[7:], rotated, q_rows,
        kv_rows, page_size, HALF=head_dim // 2, WRITE_KV=kv is not None, **flags, BN=bn // 2,
        **launch,
    )  # fmt: skip
    return y, r_out
