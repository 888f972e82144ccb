"""A decode step's RoPE and KV append in one Triton kernel.

Between a step's QKV projection and its attention, FlashInfer runs two kernels a layer: RoPE
on q and k in place (``apply_rope_with_cos_sin_cache_inplace``), then the append of k and v
into the pages (``append_paged_kv_cache``), neither launched as a programmatic dependent. For
a decode step (one new token a row) this kernel does both: one program a row rotates that
row's q and k heads in fp32 from the model's cos | sin table, rounds once (as FlashInfer's
RoPE does), writes q back in place and k, v into the row's page slot, which the attention
backend names (``SlotBackend.kv_slot``)::

    qkv [T, Hq + 2 Hkv, D]   row t:  q_h, k_h  <-  (x_lo cos - x_hi sin | x_hi cos + x_lo sin)
                                     (x_lo, x_hi: the halves of a head; cos, sin at POS[t])
    pages [N, 2, P, Hkv, D]:  [PAGE[t], 0, SLOT[t]] <- k   [PAGE[t], 1, SLOT[t]] <- v

Where the caller asks (the skinny GEMM path on Hopper), it is launched as a programmatic
dependent (it waits for the projection before it reads). Checked against the torch RoPE and
the pages' slots in Triton's CPU interpreter (``tests/test_gemv.py``) and against
FlashInfer's two kernels on the GPU (``tests/test_gpu.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kv_kernel(
    QKV,
    POS,
    COS_SIN,
    KV,
    PAGE,
    SLOT,
    sq_t,
    HQ,
    HKV,
    P,
    HALF: tl.constexpr,
    HB: tl.constexpr,
    USE_PDL: tl.constexpr,
    APPEND: tl.constexpr = True,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HB)
    j = tl.arange(0, HALF)
    h_ok = (h < HQ + 2 * HKV)[:, None]
    if USE_PDL:  # launched early: wait for the projection that wrote qkv
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    at = QKV + t * sq_t + h[:, None] * (2 * HALF) + j[None, :]
    lo = tl.load(at, mask=h_ok, other=0.0).to(tl.float32)
    hi = tl.load(at + HALF, mask=h_ok, other=0.0).to(tl.float32)
    pos = tl.load(POS + t).to(tl.int64)
    cos = tl.load(COS_SIN + pos * (2 * HALF) + j)[None, :]
    sin = tl.load(COS_SIN + pos * (2 * HALF) + HALF + j)[None, :]
    rot = (h < HQ + HKV)[:, None]  # q and k heads; v passes as it is
    out_lo = tl.where(rot, lo * cos - hi * sin, lo).to(QKV.dtype.element_ty)
    out_hi = tl.where(rot, hi * cos + lo * sin, hi).to(QKV.dtype.element_ty)
    if not APPEND:  # q and k rotated in place, v as it is, no page write
        tl.store(at, out_lo, mask=rot)
        tl.store(at + HALF, out_hi, mask=rot)
        return
    is_q = (h < HQ)[:, None]
    tl.store(at, out_lo, mask=is_q)
    tl.store(at + HALF, out_hi, mask=is_q)
    kvh = h - HQ  # 0..Hkv-1: K heads, Hkv..2Hkv-1: V heads
    is_v = (kvh >= HKV).to(tl.int64)
    page = tl.load(PAGE + t).to(tl.int64)
    slot = tl.load(SLOT + t).to(tl.int64)
    row = ((page * 2 + is_v) * P + slot) * HKV + kvh - is_v * HKV  # [HB] (page, k|v, slot, head)
    dst = KV + row[:, None] * (2 * HALF) + j[None, :]
    kv_ok = h_ok & (h >= HQ)[:, None]
    tl.store(dst, out_lo.to(KV.dtype.element_ty), mask=kv_ok)
    tl.store(dst + HALF, out_hi.to(KV.dtype.element_ty), mask=kv_ok)


def rope_append(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    pages: torch.Tensor,
    page: torch.Tensor,
    slot: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """RoPE on a decode step's q and k, k and v into their page slots; returns q [T, Hq, D].

    ``qkv`` [T, Hq + 2 Hkv, D] (rows may be strided; each row's heads contiguous) is one new
    token a row, at ``positions`` [T] (absolute); ``cos_sin`` [positions, D] fp32 (cos | sin);
    ``pages`` a layer's cache [N, 2, P, Hkv, D]; ``page``, ``slot`` [T] where each row's K/V
    go. q is rotated in place (the returned view of ``qkv``). ``pdl``: launch as a
    programmatic dependent (``gemv.pdl_supported``)."""
    _check(qkv, positions, cos_sin, num_heads, num_kv_heads, "rope_append")
    T, heads, D = qkv.shape
    if pages.dim() != 5 or tuple(pages.shape[3:]) != (num_kv_heads, D) or pages.shape[1] != 2:
        raise ValueError(f"rope_append: a KV cache of shape {tuple(pages.shape)} does not fit")
    if not pages.is_contiguous():
        raise ValueError("rope_append wants the KV cache contiguous")
    if not positions.numel() == page.numel() == slot.numel() == T:
        raise ValueError(f"rope_append: positions, page and slot must hold {T} rows each")
    if T:
        launch = {"launch_pdl": True} if pdl else {}
        _rope_kv_kernel[(T,)](
            qkv, positions, cos_sin, pages, page, slot, qkv.stride(0), num_heads,
            num_kv_heads, pages.shape[2], HALF=D // 2, HB=triton.next_power_of_2(heads),
            USE_PDL=pdl, num_warps=4, **launch,
        )  # fmt: skip
    return qkv[:, :num_heads]


def rope_inplace(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE on q and k of a fused projection ``qkv`` [T, Hq + 2 Hkv, D] (any number of tokens
    a row, each at its ``positions`` [T]), in place, as ``rope_append`` rotates them; returns
    the views q, k, v. For steps whose K/V the attention backend appends itself (prompts of
    a float32 model, which FlashInfer's RoPE does not take)."""
    _check(qkv, positions, cos_sin, num_heads, num_kv_heads, "rope_inplace")
    T, heads, D = qkv.shape
    if T:
        _rope_kv_kernel[(T,)](
            qkv, positions, cos_sin, qkv, positions, positions, qkv.stride(0), num_heads,
            num_kv_heads, 1, HALF=D // 2, HB=triton.next_power_of_2(heads), USE_PDL=False,
            APPEND=False, num_warps=4,
        )  # fmt: skip
    q_end = num_heads + num_kv_heads
    return qkv[:, :num_heads], qkv[:, num_heads:q_end], qkv[:, q_end:]


def _check(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    what: str,
) -> None:
    """Raise ValueError (before any launch) unless ``qkv`` [T, Hq + 2 Hkv, D] (each row's
    heads contiguous, D a power of two), the fp32 cos | sin table [positions, D] and the
    positions fit the kernel. The kernel reads position t at ``positions + t``: a contiguous
    1-D integer tensor of T on ``qkv``'s device."""
    T, heads, D = qkv.shape
    if heads != num_heads + 2 * num_kv_heads or D % 2 or D & (D - 1):
        raise ValueError(f"{what}: qkv {tuple(qkv.shape)} for {num_heads}/{num_kv_heads}")
    if qkv.stride(2) != 1 or qkv.stride(1) != D:
        raise ValueError(f"{what} wants each row's heads contiguous")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != D or cos_sin.dtype != torch.float32:
        raise ValueError(f"{what} wants a [positions, head_dim] fp32 cos | sin table")
    if not cos_sin.is_contiguous():
        raise ValueError(f"{what} wants the cos | sin table contiguous")
    device = qkv.device
    if (
        positions.dim() != 1
        or positions.numel() != T
        or positions.is_floating_point()
        or not positions.is_contiguous()
        or positions.device != device
    ):
        raise ValueError(
            f"{what} wants {T} positions as a contiguous 1-D integer tensor on {device}, got "
            f"{tuple(positions.shape)} {positions.dtype} on {positions.device}"
        )
