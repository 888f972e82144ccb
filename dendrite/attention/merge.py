"""The merge of a cascade's two attention levels in one small Triton kernel.

A two-level cascade (``cascade.py``) attends each decode row twice: to its branch's own pages
(level 1) and to the shared prefix (level 0). Each level returns its output ``o`` [T, H, D]
and the log-sum-exp of its scores ``s`` [T, H] (FlashInfer's, in base 2); rows that read a
level 0 take the log-sum-exp-weighted mean of the two::

    m = max(s1, s0)    w1 = 2^(s1 - m)    w0 = 2^(s0 - m)    o1 <- (w1 o1 + w0 o0) / (w1 + w0)

FlashInfer's ``merge_state_in_place`` does this in 2.8-2.9 us a layer on the H200 for 64 rows
x 32 heads x 64, with the bool mask it wants made by one more kernel; this kernel takes 1.7 us
(``.device/exp_pick.py``, in a CUDA graph) and reads the int32 mask as it is. One program merges
one row's heads, in place, skipping rows whose mask is 0; the merged log-sum-exp is not
written (nothing reads it).

Imported only on CUDA (Triton ships with torch there) or in Triton's CPU interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(
    O1,
    S1,
    O0,
    S0,
    MASK,
    so_t,
    so_h,
    s0o_t,
    s0o_h,
    ss_t,
    s0s_t,
    H,
    BH: tl.constexpr,
    D: tl.constexpr,
):
    t = tl.program_id(0)
    if tl.load(MASK + t) != 0:
        h = tl.arange(0, BH)
        d = tl.arange(0, D)
        hm = h < H
        s1 = tl.load(S1 + t * ss_t + h, mask=hm, other=0.0)
        s0 = tl.load(S0 + t * s0s_t + h, mask=hm, other=0.0)
        m = tl.maximum(s1, s0)
        w1 = tl.exp2(s1 - m)
        w0 = tl.exp2(s0 - m)
        inv = 1.0 / (w1 + w0)
        p1 = O1 + t.to(tl.int64) * so_t + h[:, None] * so_h + d[None, :]
        p0 = O0 + t.to(tl.int64) * s0o_t + h[:, None] * s0o_h + d[None, :]
        o1 = tl.load(p1, mask=hm[:, None], other=0.0).to(tl.float32)
        o0 = tl.load(p0, mask=hm[:, None], other=0.0).to(tl.float32)
        o = (o1 * (w1 * inv)[:, None]) + (o0 * (w0 * inv)[:, None])
        tl.store(p1, o.to(p1.dtype.element_ty), mask=hm[:, None])


def merge_into(
    out: torch.Tensor,
    lse: torch.Tensor,
    out0: torch.Tensor,
    lse0: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    """``out`` [T, H, D] (rows with ``mask`` [T] != 0) <- the merge of (out, lse) with
    (out0, lse0); lse [T, H] fp32 in base 2. Any H (Qwen2 has 12, 14, 28 heads); D a power of
    two (FlashInfer's head dims are), contiguous."""
    T, H, D = out.shape
    if out.stride(2) != 1 or out0.stride(2) != 1 or lse.stride(1) != 1 or lse0.stride(1) != 1:
        raise ValueError(
            "merge_into wants out/out0 [T, H, D] and lse/lse0 [T, H], last dim contiguous"
        )
    if D & (D - 1):
        raise ValueError(f"merge_into wants a head dim that is a power of two, got {D}")
    if T:
        _merge_kernel[(T,)](
            out, lse, out0, lse0, mask,
            out.stride(0), out.stride(1), out0.stride(0), out0.stride(1),
            lse.stride(0), lse0.stride(0), H, BH=triton.next_power_of_2(H), D=D, num_warps=4,
        )  # fmt: skip
