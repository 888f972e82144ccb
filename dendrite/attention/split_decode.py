"""Split-KV decode attention for a few rows in one kernel launch, its merge included.

A batch-1 decode step attends one query row (32 heads sharing 4 KV heads in the TinyLlama
shape) to a few hundred keys. On the H200 that attention costs the step's CUDA graph 0.13 ms
of 0.89 (0.757 with it skipped, ``.device/exp_s15a.py``), about 6 us a layer, most of it the
boundary of one more kernel in a chain of dependent ones. This kernel cuts each row's pages
into *splits* at run time, from the row's length, so one graph serves every length and
nothing is planned on the host per step::

    program (row b, KV head h, split s < S_max):
        splits  S = clamp(ceil(pages / MIN_PAGES), 1, S_max)      (s >= S: nothing to do)
        pages   [s * ceil(pages / S), ...) of row b            GROUP query heads of h as rows
        q [GROUP, D] x K^T, online softmax over BLOCK_N keys a block, then x V
        S == 1: out[b, h*GROUP + j] directly
        else:   o_part[b, h, s] (normalised), lse_part (base 2); the split that finishes
                last (an atomic count per (row, KV head)) merges the S states into ``out``
                and resets the count for the next launch

On Hopper it launches as a programmatic dependent (PDL) of the kernel before it (the QKV
GEMV, which writes the step's K/V): its programs start while that kernel drains, load their
split's first key block (every key but the row's last was in the pages before that kernel
began), then wait for q and the step's own K/V; they release the next kernel (the output
projection) at once, whose programs stream their weights meanwhile.

In the engine's batch-1 graphs (rows of at most ``cuda_graphs.NOSPLIT_KV`` = 512 tokens, 8
splits) against FlashInfer's decode there, one process (``.device/exp_s15c.py``): the graph
0.880 against 0.890 ms, decode 1,080-1,100 against 1,048-1,079 tok/s, the rest of the gain
from the plan and its host-to-device copies it does without. Longer rows stay on FlashInfer:
with 4,096 keys an earlier version took 17 us against FlashInfer's split-KV 9 (one program
merging 32 states). Standalone at 192 keys: 5.6-6.3 us against FlashInfer's 7.9 (split-KV)
and 5.4 (one kernel without splits).

Imported only on CUDA (Triton ships with torch there) or in Triton's CPU interpreter (tests).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# the CPU interpreter misreads bf16 operands of tl.dot (see shared_prefix.py): fp32 there
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
MIN_PAGES = 4  # pages a split holds at least (64 keys with 16-token pages: one key block)
# splits of a row at most (the grid: rows x KV heads x MAX_SPLITS): 512 tokens (the engine's
# batch-1 graphs, ``cuda_graphs.NOSPLIT_KV``) of 16-token pages in splits of MIN_PAGES; one
# program merges them all, so long rows would want more splits than it merges quickly
MAX_SPLITS = 8
MERGE_CHUNK = 4  # split states the merging program reads at once


@triton.jit
def _attend_block(q, k, v, k_ok, m_i, l_i, acc, scale_log2, dtype: tl.constexpr):
    """One key block into the online softmax state (m_i, l_i, acc), scores in base 2."""
    qk = tl.dot(q, tl.trans(k)) * scale_log2
    qk = tl.where(k_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: weights 0, not NaN
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(qk - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(dtype).to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _split_decode_kernel(
    Q,
    KV,
    OUT,
    O_PART,
    S_PART,
    COUNT,
    KVP,
    IND,
    LAST,
    sq_b,
    sq_h,
    so_b,
    so_h,
    s_page,
    s_half,
    s_tok,
    scale_log2,
    HKV,
    S_MAX,
    MIN_PAGES,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    UPCAST: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program: row ``b``, KV head ``h``, split ``s`` (the module doc's diagram)."""
    pid = tl.program_id(0)
    s = pid % S_MAX
    h = (pid // S_MAX) % HKV
    b = pid // (S_MAX * HKV)
    bb = b.to(tl.int64)
    first = tl.load(KVP + b)
    pages = tl.load(KVP + b + 1) - first
    total = tl.maximum(pages - 1, 0) * P + tl.where(pages > 0, tl.load(LAST + b), 0)
    splits = tl.minimum(tl.maximum(tl.cdiv(pages, MIN_PAGES), 1), S_MAX)
    per_split = tl.cdiv(pages, splits)
    p0 = tl.minimum(s * per_split, pages)
    keys = tl.maximum(tl.minimum((p0 + per_split) * P, total) - p0 * P, 0)
    # The split's first key block, before the wait: every key but the row's last (the step's
    # own, written by the kernel before this one) was in the pages before that kernel began.
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    new = total - 1 - p0 * P  # the step's own key, relative to the split
    k_ok = n < keys
    page = tl.load(IND + first + p0 + n // P, mask=k_ok, other=0).to(tl.int64)
    at = (page * s_page + (n % P) * s_tok + h * D)[:, None] + d[None, :]
    old = (k_ok & (n != new))[:, None]
    k = tl.load(KV + at, mask=old, other=0.0)
    v = tl.load(KV + s_half + at, mask=old, other=0.0)
    if USE_PDL:  # q and the step's K/V wait for the kernel before
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if s < splits:
        fresh = (k_ok & (n == new))[:, None]  # its row in the block is 0 so far
        k += tl.load(KV + at, mask=fresh, other=0.0)
        v += tl.load(KV + s_half + at, mask=fresh, other=0.0)
        m = tl.arange(0, BLOCK_M)
        m_ok = m < GROUP
        hq = h * GROUP + m
        q = tl.load(Q + bb * sq_b + hq[:, None] * sq_h + d[None, :], mask=m_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter's tl.dot misreads bf16: the same values in fp32
            q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        dtype = KV.dtype.element_ty
        m_i, l_i, acc = _attend_block(q, k, v, k_ok, m_i, l_i, acc, scale_log2, dtype)
        for start in range(BLOCK_N, keys, BLOCK_N):  # the split's other blocks
            key = start + n
            k_ok = key < keys
            page = tl.load(IND + first + p0 + key // P, mask=k_ok, other=0).to(tl.int64)
            at = (page * s_page + (key % P) * s_tok + h * D)[:, None] + d[None, :]
            k = tl.load(KV + at, mask=k_ok[:, None], other=0.0)
            v = tl.load(KV + s_half + at, mask=k_ok[:, None], other=0.0)
            if UPCAST:
                k, v = k.to(tl.float32), v.to(tl.float32)
            m_i, l_i, acc = _attend_block(q, k, v, k_ok, m_i, l_i, acc, scale_log2, dtype)
        has = keys > 0  # an empty split: o 0, lse -inf (weight 0 in the merge)
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        out_at = OUT + bb * so_b + hq[:, None] * so_h + d[None, :]
        if splits == 1:
            tl.store(out_at, o.to(OUT.dtype.element_ty), mask=m_ok[:, None])
        else:
            lse = tl.where(has, m_i + tl.log2(l_i), float("-inf"))
            state = (bb * HKV + h) * S_MAX  # this (row, KV head)'s first state
            tl.store(O_PART + ((state + s) * BLOCK_M + m)[:, None] * D + d[None, :], o)
            tl.store(S_PART + (state + s) * BLOCK_M + m, lse)
            tl.debug_barrier()  # every thread's stores before the count (release)
            done = tl.atomic_add(COUNT + b * HKV + h, 1, sem="acq_rel")
            if done == splits - 1:  # the last split merges them all (reads past L1: .cg)
                c = tl.arange(0, CHUNK)
                run_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
                den = tl.zeros([BLOCK_M], tl.float32)
                out = tl.zeros([BLOCK_M, D], tl.float32)
                for c0 in range(0, splits, CHUNK):
                    c_ok = c0 + c < splits
                    at_s = (state + c0 + c)[:, None] * BLOCK_M + m[None, :]  # [CHUNK, BLOCK_M]
                    lse_c = tl.load(
                        S_PART + at_s, mask=c_ok[:, None], other=float("-inf"),
                        cache_modifier=".cg",
                    )  # fmt: skip
                    o_c = tl.load(
                        O_PART + at_s[:, :, None] * D + d[None, None, :],
                        mask=c_ok[:, None, None], other=0.0, cache_modifier=".cg",
                    )  # fmt: skip
                    new_m = tl.maximum(run_m, tl.max(lse_c, axis=0))
                    safe = tl.where(new_m == float("-inf"), 0.0, new_m)
                    scale = tl.exp2(run_m - safe)
                    w = tl.exp2(lse_c - safe[None, :])  # [CHUNK, BLOCK_M]
                    den = den * scale + tl.sum(w, axis=0)
                    out = out * scale[:, None] + tl.sum(w[:, :, None] * o_c, axis=0)
                    run_m = new_m
                out = out * tl.where(den > 0, 1.0 / den, 0.0)[:, None]
                tl.store(out_at, out.to(OUT.dtype.element_ty), mask=m_ok[:, None])
                tl.atomic_xchg(COUNT + b * HKV + h, 0)  # ready for the next launch


class SplitDecode:
    """The kernel's launch for a pool's layers, with its scratch: ``rows`` rows at most.

    ``run(q, kv, kv_indptr, kv_indices, last_page_len)`` attends each row ``b`` of q
    [B, Hq, D] to its pages ``kv_indices[kv_indptr[b]:kv_indptr[b+1]]`` (the last holding
    ``last_page_len[b]`` tokens) of a layer's pages ``kv`` [N, 2, P, Hkv, D]: out
    [B, Hq, D]. The tables live on the device; nothing is planned on the host, so a CUDA
    graph captured once serves every length. The split states and the counts are this
    object's (the counts return to zero after each launch); one launch at a time.

    ``pdl``: launch as a programmatic dependent of the kernel before (Hopper). Then only
    each row's last key may be written by that kernel: every other key must have been in the
    pages before it began (a decode step's own K/V are its only new ones)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        rows: int,
        device: torch.device | str,
        *,
        max_splits: int = MAX_SPLITS,
        min_pages: int = MIN_PAGES,
        pdl: bool = False,
    ) -> None:
        group = num_heads // num_kv_heads
        if group * num_kv_heads != num_heads or head_dim & (head_dim - 1) or head_dim < 16:
            raise ValueError(
                f"SplitDecode: {num_heads} / {num_kv_heads} heads of dim {head_dim} "
                "(whole GQA groups, a power-of-two head_dim >= 16)"
            )
        if rows < 1 or max_splits < 1 or min_pages < 1:
            raise ValueError(
                f"SplitDecode: rows {rows}, max_splits {max_splits}, min_pages {min_pages}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group, self.rows = group, rows
        self.max_splits, self.min_pages, self.pdl = max_splits, min_pages, pdl
        self.block_m = max(16, triton.next_power_of_2(group))  # tl.dot wants M >= 16
        states = rows * num_kv_heads * max_splits * self.block_m
        self.o_part = torch.empty(states * head_dim, dtype=torch.float32, device=device)
        self.s_part = torch.empty(states, dtype=torch.float32, device=device)
        self.count = torch.zeros(rows * num_kv_heads, dtype=torch.int32, device=device)

    def run(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        last_page_len: torch.Tensor,
    ) -> torch.Tensor:
        rows, heads, dim = q.shape
        if (heads, dim) != (self.num_heads, self.head_dim) or not 1 <= rows <= self.rows:
            raise ValueError(
                f"SplitDecode: q {tuple(q.shape)} for {self.rows} rows of "
                f"{self.num_heads} heads x {self.head_dim}"
            )
        if q.stride(2) != 1 or not kv.is_contiguous() or kv.dtype == torch.float32:
            raise ValueError("SplitDecode wants q with D contiguous and a contiguous bf16/fp16 kv")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        launch: dict[str, object] = dict(num_warps=4, num_stages=2)
        if self.pdl:
            launch["launch_pdl"] = True
        _split_decode_kernel[(rows * self.num_kv_heads * self.max_splits,)](
            q, kv, out, self.o_part, self.s_part, self.count, kv_indptr, kv_indices,
            last_page_len, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            kv.stride(0), kv.stride(1), kv.stride(2), LOG2E / math.sqrt(dim), self.num_kv_heads,
            self.max_splits, self.min_pages, GROUP=self.group, BLOCK_M=self.block_m,
            BLOCK_N=64, P=kv.shape[2], D=dim, CHUNK=MERGE_CHUNK, UPCAST=_INTERPRETED,
            USE_PDL=self.pdl, **launch,
        )  # fmt: skip
        return out
