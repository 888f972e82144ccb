"""The merge of a cascade's attention levels in one small Triton kernel.

A cascade (``cascade.py``) attends each decode row twice or more: to its branch's own pages
(level 1) and to the shared prefix (level 0; by depth, to each nested shared segment too).
Each level gives one output ``o`` [T, H, D] with the log-sum-exp of its scores ``s`` [T, H]
(in base 2, as FlashInfer's), or several split states of them (``shared_prefix.py``); rows
that read a level 0 take the log-sum-exp-weighted mean of all their states::

    m = max_i s_i    w_i = 2^(s_i - m)    out = sum_i w_i o_i / sum_i w_i

FlashInfer's ``merge_state_in_place`` merges two states in 2.8-2.9 us a layer on the H200 for
64 rows x 32 heads x 64, with the bool mask it wants made by one more kernel; this kernel
merged them in 1.7 us (``.device/exp_pick.py``, in a CUDA graph), and reads the int32 mask as
it is. Ten states (the Triton cascade's 2 + 8 splits): 2.4 us (``.device/exp_prefix2.py``).
One program merges 8 heads of one row; the merged log-sum-exp is not written (nothing reads
it).

Imported only on CUDA (Triton ships with torch there) or in Triton's CPU interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    OUT,
    O1,
    S1,
    O0,
    S0,
    MASK,
    sout_t,
    sout_h,
    s1o_s,
    s1o_t,
    s1o_h,
    s1s_s,
    s1s_t,
    s0o_s,
    s0o_t,
    s0o_h,
    s0s_s,
    s0s_t,
    smask,
    H,
    NS1: tl.constexpr,
    DEPTHS: tl.constexpr,
    SPLITS0: tl.constexpr,
    BH: tl.constexpr,
    D: tl.constexpr,
):
    """Level 0's states depth by depth, ``SPLITS0`` each, depth d's merged where
    MASK[d, t] != 0 (DEPTHS 0: no level 0)."""
    t = tl.program_id(0)
    h = tl.program_id(1) * BH + tl.arange(0, BH)
    d = tl.arange(0, D)
    hm = h < H
    tt = t.to(tl.int64)
    m = tl.full([BH], float("-inf"), tl.float32)
    for i in tl.static_range(NS1):
        m = tl.maximum(m, tl.load(S1 + i * s1s_s + tt * s1s_t + h, mask=hm, other=0.0))
    for dd in tl.static_range(DEPTHS):
        hm0 = h < tl.where(tl.load(MASK + dd * smask + t) != 0, H, 0)  # all heads or none
        for j in tl.static_range(SPLITS0):
            i = dd * SPLITS0 + j
            s0 = tl.load(S0 + i * s0s_s + tt * s0s_t + h, mask=hm0, other=float("-inf"))
            m = tl.maximum(m, s0)
    o = tl.zeros([BH, D], tl.float32)
    total = tl.zeros([BH], tl.float32)
    for i in tl.static_range(NS1):
        w = tl.exp2(tl.load(S1 + i * s1s_s + tt * s1s_t + h, mask=hm, other=0.0) - m)
        p = O1 + i * s1o_s + tt * s1o_t + h[:, None] * s1o_h + d[None, :]
        o += tl.load(p, mask=hm[:, None], other=0.0).to(tl.float32) * w[:, None]
        total += w
    for dd in tl.static_range(DEPTHS):
        hm0 = h < tl.where(tl.load(MASK + dd * smask + t) != 0, H, 0)
        for j in tl.static_range(SPLITS0):
            i = dd * SPLITS0 + j
            s0 = tl.load(S0 + i * s0s_s + tt * s0s_t + h, mask=hm0, other=float("-inf"))
            w = tl.exp2(s0 - m)  # 0 for an empty split and for rows without level 0
            p = O0 + i * s0o_s + tt * s0o_t + h[:, None] * s0o_h + d[None, :]
            x = tl.load(p, mask=hm0[:, None], other=0.0).to(tl.float32)
            o += tl.where(w[:, None] > 0.0, x * w[:, None], 0.0)
            total += w
    o = o * (1.0 / total)[:, None]
    dst = OUT + tt * sout_t + h[:, None] * sout_h + d[None, :]
    tl.store(dst, o.to(OUT.dtype.element_ty), mask=hm[:, None])


def _states(x: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One level's output as [S, T, H, D] states and [S, T, H] log-sum-exps (S = 1 for a
    plain [T, H, D] output)."""
    if x.dim() == 3:
        x, lse = x.unsqueeze(0), lse.unsqueeze(0)
    if x.stride(3) != 1 or lse.stride(2) != 1:
        raise ValueError("merge: outputs [.., T, H, D] and lse [.., T, H], last dim contiguous")
    return x, lse


def merge_states(
    out: torch.Tensor,
    out1: torch.Tensor,
    lse1: torch.Tensor,
    out0: torch.Tensor | None = None,
    lse0: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """``out`` [T, H, D] <- the log-sum-exp merge of level 1's states (every row) with level
    0's (rows whose ``mask`` [T] is not 0; or, for ``L`` shared levels by depth, ``mask``
    [L, T] and level 0's ``L x S`` states depth by depth, depth d's on the rows of
    ``mask[d]``). Each level is one output [T, H, D] with its lse
    [T, H], or ``S`` split states [S, T, H, D] with lse [S, T, H] (``shared_prefix.py``),
    merged in the same pass; lse in base 2, fp32. A state whose lse is ``-inf`` (an empty
    split) weighs nothing; level 1 always holds the row's new token, so one of its states is
    finite. ``out`` may be ``out1`` itself (merged in place). Without level 0 (``out0``,
    ``lse0``, ``mask`` None) it merges level 1's splits alone. Any H (Qwen2 has 12, 14, 28
    heads); D a power of two (FlashInfer's head dims are)."""
    T, H, D = out.shape
    o1, s1 = _states(out1, lse1)
    if out0 is None and lse0 is None and mask is None:  # level 1's splits alone
        # no state of level 0 is read; the kernel's mask load reads lse1 (T values are
        # there) and weighs nothing
        o0, s0, mask, depths = o1[:0], s1[:0], lse1, 0
    elif out0 is None or lse0 is None or mask is None:
        raise ValueError("merge: level 0 wants out0, lse0 and mask together (or none of them)")
    else:
        o0, s0 = _states(out0, lse0)
        depths = 1 if mask.dim() == 1 else mask.shape[0]
        if mask.dim() > 2 or mask.shape[-1] < T or mask.stride(-1) != 1 or o0.shape[0] % depths:
            raise ValueError(
                f"merge: mask {tuple(mask.shape)} for {T} rows and {o0.shape[0]} level-0 states"
            )
    if out.stride(2) != 1:
        raise ValueError("merge: out [T, H, D] with D contiguous")
    if D & (D - 1):
        raise ValueError(f"merge wants a head dim that is a power of two, got {D}")
    bh = min(triton.next_power_of_2(H), 8)
    if T:
        _merge_kernel[(T, triton.cdiv(H, bh))](
            out, o1, s1, o0, s0, mask, out.stride(0), out.stride(1),
            o1.stride(0), o1.stride(1), o1.stride(2), s1.stride(0), s1.stride(1),
            o0.stride(0), o0.stride(1), o0.stride(2), s0.stride(0), s0.stride(1),
            mask.stride(0) if depths > 1 else 0, H, NS1=o1.shape[0], DEPTHS=depths,
            SPLITS0=o0.shape[0] // max(1, depths), BH=bh, D=D, num_warps=2,
        )  # fmt: skip


def merge_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    out0: torch.Tensor,
    lse0: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """``out`` [T, H, D] (level 1, with ``lse`` [T, H]) merged in place with level 0 (one
    output or split states) on the rows whose ``mask`` is not 0: :func:`merge_states`."""
    merge_states(out, out, lse, out0, lse0, mask)
