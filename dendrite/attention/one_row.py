"""Attention of one decode row over its paged KV, in one Triton kernel (batch-1 graphs).

A batch-1 decode step over a short context is latency, not bandwidth: FlashInfer's decode
(tensor-core prefill kernel, no split-KV below 512 tokens) takes ~6.8 us a layer on the H200
for 192 tokens of TinyLlama's KV (4 KV heads x 64), against well under 1 us of reads. This
kernel splits the context into chunks of ``CHUNK`` tokens, one program per (KV head, chunk),
each attending its chunk for the head's whole query group with two small MMAs; the last
program of a head to finish (an atomic counter, reset by that program) merges the chunks'
partial softmax states, so there is no second kernel::

    program (h, c):  s = q[h*G:(h+1)*G] . K[c]^T * scale   m_c = max s   l_c = sum exp(s - m_c)
                     acc_c = exp(s - m_c) V[c]      -> scratch; counter[h] += 1
    last of head h:  M = max m_c;  out = sum exp(m_c - M) acc_c / sum exp(m_c - M) l_c

The page table is the graph's own buffers (``kv_indptr`` [2], ``kv_indices``,
``last_page_len`` [1]): the context length is read on the device, so one captured kernel
serves every length up to ``MAX_TOKENS``. Launched as a programmatic dependent on Hopper
(it waits for the QKV kernel that wrote q and the new K/V; the output projection after it
streams its weights meanwhile). Used by ``GraphDecodeAttention`` for the batch-1 graph
without split-KV (contexts up to ``cuda_graphs.NOSPLIT_KV``); checked against the torch
reference in Triton's CPU interpreter (``tests/test_gemv.py``) and against FlashInfer on the
GPU (``tests/test_gpu.py``).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CHUNK = 64  # tokens per program (>= 16: an MMA dimension)
MAX_TOKENS = 512  # contexts up to this many tokens (CHUNK * SPLITS)
SPLITS = MAX_TOKENS // CHUNK


@triton.jit
def _one_row_kernel(
    Q,
    KV,
    INDICES,
    INDPTR,
    LAST,
    OUT,
    PART_M,
    PART_L,
    PART_ACC,
    COUNTER,
    scale,
    HKV: tl.constexpr,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    P: tl.constexpr,
    CHUNK: tl.constexpr,
    SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    kh = tl.program_id(0)
    sp = tl.program_id(1)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    start = tl.load(INDPTR)
    length = (tl.load(INDPTR + 1) - start - 1) * P + tl.load(LAST)
    chunks = tl.cdiv(length, CHUNK)
    if sp < chunks:
        t = sp * CHUNK + tl.arange(0, CHUNK)
        ok = t < length
        page = tl.load(INDICES + start + t // P, mask=ok, other=0).to(tl.int64)
        row = (page * 2 * P + t % P) * (HKV * D) + kh * D  # K of token t, head kh
        d = tl.arange(0, D)
        k = tl.load(KV + row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(KV + row[:, None] + P * HKV * D + d[None, :], mask=ok[:, None], other=0.0)
        g = tl.arange(0, GP)
        q = tl.load(Q + (kh * G + g)[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0)
        if F32_DOT:  # Triton's interpreter multiplies bf16 wrongly: fp32 there
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))  # [GP, CHUNK], fp32 accumulation
        s = tl.where(ok[None, :], s * scale, float("-inf"))
        m = tl.max(s, axis=1)
        p = tl.exp(s - m[:, None])
        if F32_DOT:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
        else:
            acc = tl.dot(p.to(v.dtype), v)  # [GP, D] fp32
        part = (kh * SPLITS + sp) * GP + g
        tl.store(PART_M + part, m)
        tl.store(PART_L + part, tl.sum(p, axis=1))
        tl.store(PART_ACC + part[:, None] * D + d[None, :], acc)
        tl.debug_barrier()  # every thread's partial is written before the release below
        done = tl.atomic_add(COUNTER + kh, 1, sem="acq_rel", scope="gpu")
        if done == chunks - 1:  # the last chunk of this head to finish merges them all
            tl.debug_barrier()
            c = tl.arange(0, SPLITS)
            parts = (kh * SPLITS + c)[:, None] * GP + g[None, :]  # [SPLITS, GP]
            live = (c < chunks)[:, None]
            ms = tl.load(PART_M + parts, mask=live, other=float("-inf"), cache_modifier=".cg")
            ls = tl.load(PART_L + parts, mask=live, other=0.0, cache_modifier=".cg")
            top = tl.max(ms, axis=0)  # [GP]
            w = tl.exp(ms - top[None, :])  # [SPLITS, GP]; 0 for chunks past the end
            accs = tl.load(
                PART_ACC + parts[:, :, None] * D + d[None, None, :],
                mask=live[:, :, None],
                other=0.0,
                cache_modifier=".cg",
            )  # [SPLITS, GP, D]
            out = tl.sum(w[:, :, None] * accs, axis=0) / tl.sum(w * ls, axis=0)[:, None]
            dst = OUT + (kh * G + g)[:, None] * D + d[None, :]
            tl.store(dst, out.to(OUT.dtype.element_ty), mask=(g < G)[:, None])
            tl.atomic_xchg(COUNTER + kh, 0, sem="relaxed", scope="gpu")  # ready for the next


class OneRowAttention:
    """The kernel with its scratch (partials and counters) for one model's heads."""

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, device: torch.device
    ) -> None:
        self.hq, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.gp = max(16, triton.next_power_of_2(self.group))  # MMA rows
        parts = num_kv_heads * SPLITS * self.gp
        self._m = torch.empty(parts, dtype=torch.float32, device=device)
        self._l = torch.empty(parts, dtype=torch.float32, device=device)
        self._acc = torch.empty(parts * head_dim, dtype=torch.float32, device=device)
        self._counter = torch.zeros(num_kv_heads, dtype=torch.int32, device=device)
        self.scale = 1.0 / math.sqrt(head_dim)

    @staticmethod
    def supports(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        return head_dim in (64, 128) and num_heads % num_kv_heads == 0

    def __call__(
        self,
        q: torch.Tensor,
        kv: torch.Tensor,
        kv_indices: torch.Tensor,
        kv_indptr: torch.Tensor,
        last_page_len: torch.Tensor,
        pdl: bool = False,
    ) -> torch.Tensor:
        """q [1, Hq, D] (a strided view is fine if each head's D values are contiguous);
        kv: the layer's pages [N, 2, P, Hkv, D]; the page table of the one row (its context
        at most ``MAX_TOKENS``) -> out [1, Hq, D]."""
        out = torch.empty(1, self.hq, self.d, dtype=q.dtype, device=q.device)
        launch = {"launch_pdl": True} if pdl else {}
        _one_row_kernel[(self.hkv, SPLITS)](
            q, kv, kv_indices, kv_indptr, last_page_len, out, self._m, self._l, self._acc,
            self._counter, self.scale, HKV=self.hkv, G=self.group, GP=self.gp, D=self.d,
            P=kv.shape[2], CHUNK=CHUNK, SPLITS=SPLITS, USE_PDL=pdl, F32_DOT=_INTERPRETED,
            num_warps=4, num_stages=1, **launch,
        )  # fmt: skip
        return out
