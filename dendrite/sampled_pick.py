"""The sampled pick of a decode step in two kernels: top-k, Gumbel-max, the log-prob, and the
host copy's layout.

:func:`dendrite.sampling.sample_device` draws a sampled row in torch: the parameters' copy,
``topk``, the hashed Gumbel noise (two ``_mix32`` of a dozen integer ops each), a truncation
and a gather: about 40 kernels, each a launch from Python. On the H200 that host work (2 ms
for 64 rows) is longer than the 64-row step's own GPU time, so a sampled tree decode is
host-bound. Here the same draw is two Triton launches:

1. ``_bound_kernel``, one program per (row, chunk of ``CHUNK_C`` logits): the largest rank
   key (below) of each of ``SUB`` strided sets of the chunk (logits ``j, j + SUB, ...``).
   These maxima are a subset of the row's keys, so their k-th largest is a lower bound on the
   row's k-th largest key: every key of the top k is at or above it.
2. ``_sample_kernel``, one program per row: the bound (``tl.topk`` of the row's maxima), then
   one pass over the row that packs the keys at or above it (a prefix sum) into a scratch row
   of ``CAP``, computes, as :mod:`dendrite.greedy` does, the first argmax and the online
   log-sum-exp (for the log-prob), and, for a row without top-k, the Gumbel-max over every
   token. The packed keys (k of them, and a few more where a set held two of the top k) are
   ranked (``tl.topk``); the first k are the kept tokens, and each key holds the token's logit
   and id, so the largest ``x / T + gumbel(key, token id)`` is taken over those k alone. If
   more than ``CAP`` keys pass the bound (the top k crowded into a few sets), the program
   ranks the row chunk by chunk instead, as the first kernel did before the bound (exact,
   slower). It writes the token (int64, the next step's input) and (token, log-prob) as
   float64 [2, B].

On the H200, 64 rows x 32,000 logits at top-k 50: the first version's candidates (each chunk's
own top 64 by ``tl.topk``) and draw took 68 us for both kernels (``.device/exp_s12b.py``); a
one-kernel pick that found the k-th key by bisection in registers took 96 us.

The rank key orders a row's logits by value, then by lower token id, in one int64: the
float's bits made monotone (-0.0 as 0.0) in the high half, ``2**32 - 1 - id`` in the low
half. Keys are distinct, so "the top k" has one meaning even among tied logits (bf16-rounded
logits tie often). :func:`dendrite.sampling.rank_keys` is the same key in torch, and the torch
path ranks by it too, so both paths draw the same token: the same noise (the hash is integer
arithmetic; the logarithms are CUDA's precise ``logf`` here and the division by T is IEEE's,
as in torch), the same threshold, and an exact tie of scores goes to the higher-ranked token
in both. A row with top-p < 1 or top-k > ``KMAX`` is not handled here (the caller uses the
torch path), nor a Triton without ``tl.topk`` (3.4+).

Imported only on CUDA (Triton ships with torch there) or in Triton's CPU interpreter (tests),
where ``libdevice`` and ``div_rn`` are not available and ``tl.log`` and ``/`` stand in for
them (exact there: numpy's).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dendrite.greedy import _online_step

KMAX = 64  # the largest top-k this pick serves
CHUNK_C = 2048  # logits a bound program reads
SUB = 64  # strided sets a bound program keeps the maximum of (at least KMAX)
CAP = 256  # keys at or above the bound the sampling program packs (else: chunk by chunk)
CHUNK = 8192  # logits the sampling program holds at a time (as dendrite.greedy)
# compiled: libdevice's log and div_rn; Triton's interpreter has neither
_PRECISE = os.environ.get("TRITON_INTERPRET") != "1"
TOPK = hasattr(tl, "topk")  # Triton's bitonic top-k (3.4+); without it, the torch path


@triton.jit
def _rank_key(x, ids):
    """int64 keys ordering fp32 ``x`` by value, then by lower ``ids`` (int32 tensor)."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 ranks as 0.0
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: the order of their bits flips
    return (mono.to(tl.int64) << 32) | (4294967295 - ids.to(tl.int64))


@triton.jit
def _mix32(h):
    """The xorshift-multiply avalanche of ``dendrite.sampling._mix32``, on uint32."""
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x7FEB352D, tl.uint32)
    h = h ^ (h >> 15)
    h = h * tl.full((), 0x2C1B3C6D, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    if PRECISE:
        return libdevice.log(x)  # CUDA's logf, as torch.log
    else:
        return tl.log(x)


@triton.jit
def _div(x, t, PRECISE: tl.constexpr):
    if PRECISE:
        return tl.math.div_rn(x, t)  # IEEE division, as torch (Triton's "/" is approximate)
    else:
        return x / t


@triton.jit
def _bound_kernel(LOGITS, MAXK, V, stride, C: tl.constexpr, SUB: tl.constexpr):
    """The largest rank key of each of SUB strided sets of one chunk (logits j, j + SUB, ...)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * C + tl.arange(0, C)
    valid = offs < V
    x = tl.load(LOGITS + row.to(tl.int64) * stride + offs, mask=valid, other=-float("inf"))
    key = tl.where(valid, _rank_key(x, offs), -9223372036854775808)
    top = tl.max(tl.reshape(key, [C // SUB, SUB]), axis=0)  # column j: j, j + SUB, ...
    tl.store(MAXK + (row.to(tl.int64) * tl.num_programs(1) + chunk) * SUB + tl.arange(0, SUB), top)


@triton.jit
def _best(x, ids, key, kept, temp, key_lo, key_hi, lowest, PRECISE: tl.constexpr):
    """Over the ``kept`` tokens: the largest ``x / T + g``, its rank key (an equal score goes
    to the higher-ranked token) and its logit."""
    h = _mix32(ids.to(tl.uint32) ^ key_lo)
    h = _mix32(h ^ key_hi)
    u = ((h >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # as sampling.uniform
    g = -_log(-_log(u, PRECISE), PRECISE)
    score = tl.where(kept, _div(x, temp, PRECISE) + g, -float("inf"))
    smax = tl.max(score, axis=0)
    skey = tl.max(tl.where(kept & (score == smax), key, lowest), axis=0)
    sx = tl.sum(tl.where(kept & (key == skey), x, 0.0), axis=0)
    return smax, skey, sx


@triton.jit
def _kth(ranked, k, KMAX: tl.constexpr):
    """The k-th entry (1-based) of ``ranked`` [KMAX]."""
    return tl.max(tl.where(tl.arange(0, KMAX) == k - 1, ranked, -9223372036854775808), axis=0)


@triton.jit
def _sample_kernel(
    LOGITS,
    MAXK,
    CAND,
    SPILL,
    PARAMS,
    TOK,
    PACKED,
    B,
    V,
    stride,
    NMAX,
    NM: tl.constexpr,
    KMAX: tl.constexpr,
    CAP: tl.constexpr,
    CHUNK: tl.constexpr,
    C: tl.constexpr,
    NSPILL: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0)
    par = PARAMS + row * 6  # float64: temperature, top-k, top-p, key lo, key hi, greedy
    temp = tl.load(par).to(tl.float32)
    k = tl.load(par + 1).to(tl.int32)
    key_lo = tl.load(par + 3).to(tl.int64).to(tl.uint32)
    key_hi = tl.load(par + 4).to(tl.int64).to(tl.uint32)
    greedy = tl.load(par + 5) != 0
    lowest = tl.full((), -9223372036854775808, tl.int64)  # below every rank key
    best = -float("inf")  # the largest x / T + g over the kept tokens, its key and its x
    best_key = lowest
    best_x = 0.0
    bound = lowest  # every key of the row's top k is at or above it
    if k > 0:  # the k-th largest of the row's strided-set maxima (a subset of its keys)
        jm = tl.arange(0, NM)
        mx = tl.load(MAXK + row.to(tl.int64) * NMAX + jm, mask=jm < NMAX, other=lowest)
        bound = _kth(tl.topk(mx, KMAX), k, KMAX)
    stream = (k == 0) & (tl.load(par + 5) == 0)  # plain temperature: every token is kept
    offs = tl.arange(0, CHUNK)
    base = LOGITS + row.to(tl.int64) * stride
    cand = CAND + row.to(tl.int64) * CAP
    m = -float("inf")  # running maximum and the sum of exp(x - m): the log-sum-exp
    s = 0.0
    arg = tl.full((), 0, tl.int32)  # first index of the maximum (greedy rows)
    n = tl.full((), 0, tl.int32)  # keys at or above the bound so far
    for start in range(0, V, CHUNK):
        ids = start + offs
        valid = ids < V
        x = tl.load(base + ids, mask=valid, other=-float("inf"))
        m, s, arg = _online_step(x, start, m, s, arg)
        if k > 0:  # pack the keys at or above the bound, in order, while they fit
            key = _rank_key(x, ids)
            sel = valid & (key >= bound)
            at = n + tl.cumsum(sel.to(tl.int32), axis=0) - 1
            tl.store(cand + at, key, mask=sel & (at < CAP))
            n += tl.sum(sel.to(tl.int32), axis=0)
        if stream:
            key = _rank_key(x, ids)
            smax, skey, sx = _best(x, ids, key, valid, temp, key_lo, key_hi, lowest, PRECISE)
            # a higher score wins; an equal one (even -inf) goes to the higher-ranked token
            better = (smax > best) | ((smax == best) & (skey > best_key))
            best = tl.where(better, smax, best)
            best_key = tl.where(better, skey, best_key)
            best_x = tl.where(better, sx, best_x)
    if k > 0:  # the kept tokens are the first k ranked keys: each holds its logit and id
        tl.debug_barrier()  # the block's packed keys, visible to its loads
        jc = tl.arange(0, CAP)
        if n <= CAP:
            ranked = tl.topk(tl.load(cand + jc, mask=jc < n, other=lowest), KMAX)
        else:  # too many passed the bound: each chunk's own top KMAX, then theirs (the
            # chunks past the row's last hold no valid logit: their keys are all the lowest)
            spill = SPILL + row.to(tl.int64) * NSPILL * KMAX
            jk = tl.arange(0, KMAX)
            oc = tl.arange(0, C)
            for c in range(0, NSPILL):
                ids = c * C + oc
                valid = ids < V
                x = tl.load(base + ids, mask=valid, other=-float("inf"))
                key = tl.where(valid, _rank_key(x, ids), lowest)
                tl.store(spill + c * KMAX + jk, tl.topk(key, KMAX))
            tl.debug_barrier()
            js = tl.arange(0, NSPILL * KMAX)
            ranked = tl.topk(tl.load(spill + js), KMAX)
        j = tl.arange(0, KMAX)
        mono = (ranked >> 32).to(tl.int32)
        x = (mono ^ ((mono >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        ids = (4294967295 - (ranked & 4294967295)).to(tl.int32)
        kept = (j < k) & (ranked > lowest)
        best, best_key, best_x = _best(x, ids, ranked, kept, temp, key_lo, key_hi, lowest, PRECISE)
    drawn = (4294967295 - (best_key & 4294967295)).to(tl.int32)
    tok = tl.where(greedy, arg, drawn)
    logp = tl.where(greedy, m, best_x) - (m + tl.log(s))
    tl.store(TOK + row, tok.to(tl.int64))
    tl.store(PACKED + row, tok.to(tl.float64))
    tl.store(PACKED + B + row, logp.to(tl.float64))


def sampled_pick(
    logits: torch.Tensor, cols: torch.Tensor, need_topk: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] (int64) and (tokens, log-probs) as float64 [2, B] for rows of ``logits``
    [B, V] (fp32, rows contiguous) under ``cols`` [B, 6] (float64 on the device: temperature
    (1 for greedy rows), top-k (0: off, at most ``KMAX``), top-p (must be 1), noise key low
    and high halves, greedy flag), as :func:`dendrite.sampling.sample_device` builds them.
    ``need_topk``: some row has a top-k (else the bound kernel is skipped)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            f"sampled_pick wants fp32 logits [B, V] with contiguous rows, got "
            f"{logits.dtype} {tuple(logits.shape)}"
        )
    B, V = logits.shape
    assert SUB >= KMAX and CHUNK_C % SUB == 0, "a bound program keeps at least KMAX maxima"
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    packed = torch.empty(2, B, dtype=torch.float64, device=dev)
    if not B:
        return tokens, packed
    n_chunks = triton.cdiv(V, CHUNK_C)
    nmax = n_chunks * SUB
    rows = B if need_topk else 1
    maxk = torch.empty(rows, nmax, dtype=torch.int64, device=dev)
    cand = torch.empty(rows, CAP, dtype=torch.int64, device=dev)
    spill = torch.empty(
        rows, triton.next_power_of_2(n_chunks) * KMAX, dtype=torch.int64, device=dev
    )
    if need_topk:
        _bound_kernel[(B, n_chunks)](
            logits, maxk, V, logits.stride(0), C=CHUNK_C, SUB=SUB, num_warps=4
        )
    _sample_kernel[(B,)](
        logits, maxk, cand, spill, cols, tokens, packed, B, V, logits.stride(0), nmax,
        NM=triton.next_power_of_2(nmax), KMAX=KMAX, CAP=CAP, CHUNK=CHUNK, C=CHUNK_C,
        NSPILL=triton.next_power_of_2(n_chunks), PRECISE=_PRECISE, num_warps=8,
    )  # fmt: skip
    return tokens, packed
