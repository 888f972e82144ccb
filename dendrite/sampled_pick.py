"""The sampled pick of a decode step in two kernels: top-k, Gumbel-max, the log-prob, and the
host copy's layout.

:func:`dendrite.sampling.sample_device` draws a sampled row in torch: the parameters' copy,
``topk``, the hashed Gumbel noise (two ``_mix32`` of a dozen integer ops each), a truncation
and a gather: about 40 kernels, each a launch from Python. On the H200 that host work (2 ms
for 64 rows) is longer than the 64-row step's own GPU time, so a sampled tree decode is
host-bound. Here the same draw is two Triton launches:

1. ``_chunk_kernel``, one program per (row, chunk of ``CHUNK_C`` logits): the chunk's
   maximum, sum of ``exp(x - max)`` and first argmax (the log-sum-exp and the greedy token in
   parts); for a row with top-k, the largest rank key (below) of each of ``SUB`` strided sets
   of the chunk (logits ``j, j + SUB, ...``); for a row without, its Gumbel-max.
2. ``_sample_kernel``, one program per row: the parts combined; for a row with top-k, the
   bound: the set maxima are a subset of the row's keys, so their k-th largest (``tl.topk``)
   is a lower bound on the row's k-th key, and every key of the top k lies in a set whose
   maximum is at or above it. Those sets (about k) are read back, their keys at or above the
   bound packed in order (a prefix sum) and ranked (``tl.topk``); the first k are the kept
   tokens, and each key holds the token's logit and id, so the largest
   ``x / T + gumbel(key, token id)`` is taken over those k alone. If more than ``SETCAP``
   sets or ``CAP`` keys pass (the top crowded into a few sets), the program ranks the row
   chunk by chunk instead (exact, slower). It writes the token (int64, the next step's input)
   and (token, log-prob) as float64 [2, B].

On the H200, 64 rows x 32,000 logits at top-k 50, both kernels in a CUDA graph: 23 us (plain
temperature 19, mixed rows 27; ``.device/exp_s12d.py``). Before: each chunk's own top 64 by
``tl.topk``, then a streaming pass a row, 68 us; the bound with the streaming pass, 47 us; one
kernel finding the k-th key by bisection in registers, 96 us. A top crowded into a few sets
(every 64th logit raised) takes the chunk-by-chunk path: 190 us.

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

KMAX = 64  # the largest top-k this pick serves
CHUNK_C = 2048  # logits a chunk program reads
SUB = 64  # strided sets of a chunk whose maximum key it keeps (at least KMAX)
SETCAP = 128  # sets at or above the bound the sampling program reads (else: chunk by chunk)
CAP = 256  # keys at or above the bound it packs (else: chunk by chunk)
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
def _row_params(PARAMS, row):
    """Row ``row``'s parameters (float64 [B, 6]: temperature, top-k, top-p, noise key low and
    high halves, greedy flag): temperature, top-k, the key's halves as uint32, greedy."""
    par = PARAMS + row * 6
    temp = tl.load(par).to(tl.float32)
    k = tl.load(par + 1).to(tl.int32)
    key_lo = tl.load(par + 3).to(tl.int64).to(tl.uint32)
    key_hi = tl.load(par + 4).to(tl.int64).to(tl.uint32)
    return temp, k, key_lo, key_hi, tl.load(par + 5) != 0


@triton.jit
def _chunk_kernel(
    LOGITS,
    PARAMS,
    MAXK,
    STATF,
    STATI,
    V,
    stride,
    C: tl.constexpr,
    SUB: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """One chunk of a row: its maximum, sum of exp(x - max) and first argmax (the log-sum-exp
    in parts); with top-k the maximum rank key of each of SUB strided sets (logits j,
    j + SUB, ...); for plain temperature its Gumbel-max (score, key, logit)."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    nch = tl.num_programs(1)
    temp, k, key_lo, key_hi, greedy = _row_params(PARAMS, row)
    lowest = tl.full((), -9223372036854775808, tl.int64)
    offs = chunk * C + tl.arange(0, C)
    valid = offs < V
    x = tl.load(LOGITS + row.to(tl.int64) * stride + offs, mask=valid, other=-float("inf"))
    m = tl.max(x, axis=0)
    arg = tl.argmax(x, axis=0, tie_break_left=True) + chunk * C
    s = tl.sum(tl.where(x > -float("inf"), tl.exp(x - m), 0.0), axis=0)
    at = row.to(tl.int64) * nch + chunk
    tl.store(STATF + at * 4, m)
    tl.store(STATF + at * 4 + 1, s)
    tl.store(STATI + at * 2, arg.to(tl.int64))
    if k > 0:
        key = tl.where(valid, _rank_key(x, offs), lowest)
        top = tl.max(tl.reshape(key, [C // SUB, SUB]), axis=0)  # column j: j, j + SUB, ...
        tl.store(MAXK + at * SUB + tl.arange(0, SUB), top)
    if (k == 0) & (not greedy):  # plain temperature: this chunk's best of every token
        smax, skey, sx = _best(
            x, offs, _rank_key(x, offs), valid, temp, key_lo, key_hi, lowest, PRECISE
        )  # fmt: skip
        tl.store(STATF + at * 4 + 2, smax)
        tl.store(STATF + at * 4 + 3, sx)
        tl.store(STATI + at * 2 + 1, skey)


@triton.jit
def _sample_kernel(
    LOGITS,
    MAXK,
    STATF,
    STATI,
    SETS,
    CAND,
    SPILL,
    PARAMS,
    TOK,
    PACKED,
    B,
    V,
    stride,
    NCH,
    NCHP: tl.constexpr,
    NM: tl.constexpr,
    KMAX: tl.constexpr,
    SUB: tl.constexpr,
    SETCAP: tl.constexpr,
    CAP: tl.constexpr,
    C: tl.constexpr,
    PRECISE: tl.constexpr,
):
    row = tl.program_id(0)
    temp, k, key_lo, key_hi, greedy = _row_params(PARAMS, row)
    lowest = tl.full((), -9223372036854775808, tl.int64)  # below every rank key
    base = LOGITS + row.to(tl.int64) * stride
    # the chunks' parts: the log-sum-exp, the first argmax (the first chunk holding the max)
    ch = tl.arange(0, NCHP)
    ch_ok = ch < NCH
    at = row.to(tl.int64) * NCH + ch
    cm = tl.load(STATF + at * 4, mask=ch_ok, other=-float("inf"))
    cs = tl.load(STATF + at * 4 + 1, mask=ch_ok, other=0.0)
    m = tl.max(cm, axis=0)
    s = tl.sum(tl.where(cm > -float("inf"), cs * tl.exp(cm - m), 0.0), axis=0)
    first = tl.argmax(cm, axis=0, tie_break_left=True)
    arg = tl.load(STATI + (row.to(tl.int64) * NCH + first) * 2).to(tl.int32)
    best_key = lowest
    best_x = 0.0
    if (k == 0) & (not greedy):  # plain temperature: the best of the chunks' bests
        smax = tl.load(STATF + at * 4 + 2, mask=ch_ok, other=-float("inf"))
        sx = tl.load(STATF + at * 4 + 3, mask=ch_ok, other=0.0)
        skey = tl.load(STATI + at * 2 + 1, mask=ch_ok, other=lowest)
        top = tl.max(smax, axis=0)  # an equal score (even -inf) goes to the higher rank
        best_key = tl.max(tl.where(ch_ok & (smax == top), skey, lowest), axis=0)
        best_x = tl.sum(tl.where(ch_ok & (skey == best_key), sx, 0.0), axis=0)
    if k > 0:
        # the bound: the k-th largest set maximum; the sets at or above it hold the top k
        jm = tl.arange(0, NM)
        mx = tl.load(MAXK + row.to(tl.int64) * NCH * SUB + jm, mask=jm < NCH * SUB, other=lowest)
        bound = _kth(tl.topk(mx, KMAX), k, KMAX)
        sel = (jm < NCH * SUB) & (mx >= bound)
        n_sets = tl.sum(sel.to(tl.int32), axis=0)
        pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
        sets = SETS + row.to(tl.int64) * SETCAP
        tl.store(sets + pos, jm, mask=sel & (pos < SETCAP))
        tl.debug_barrier()  # the block's stores, visible to its loads
        js = tl.arange(0, SETCAP)
        sid = tl.load(sets + js, mask=js < n_sets, other=0)
        idx = ((sid // SUB) * C + sid % SUB)[:, None] + (tl.arange(0, C // SUB) * SUB)[None, :]
        ok = (js < n_sets)[:, None] & (idx < V)
        xs = tl.load(base + idx, mask=ok, other=-float("inf"))
        keys = tl.reshape(tl.where(ok, _rank_key(xs, idx), lowest), [SETCAP * (C // SUB)])
        passed = keys >= bound
        n = tl.sum(passed.to(tl.int32), axis=0)
        pos2 = tl.cumsum(passed.to(tl.int32), axis=0) - 1
        cand = CAND + row.to(tl.int64) * CAP
        tl.store(cand + pos2, keys, mask=passed & (pos2 < CAP))
        tl.debug_barrier()
        if (n_sets <= SETCAP) & (n <= CAP):
            jc = tl.arange(0, CAP)
            ranked = tl.topk(tl.load(cand + jc, mask=jc < n, other=lowest), KMAX)
        else:  # the top crowded into many sets, or a few: each chunk's own top KMAX, then
            # theirs (chunks past the row's last hold no valid logit: all keys the lowest)
            spill = SPILL + row.to(tl.int64) * NCHP * KMAX
            jk = tl.arange(0, KMAX)
            oc = tl.arange(0, C)
            for c in range(0, NCHP):
                ids = c * C + oc
                valid = ids < V
                x = tl.load(base + ids, mask=valid, other=-float("inf"))
                key = tl.where(valid, _rank_key(x, ids), lowest)
                tl.store(spill + c * KMAX + jk, tl.topk(key, KMAX))
            tl.debug_barrier()
            ranked = tl.topk(tl.load(spill + tl.arange(0, NCHP * KMAX)), KMAX)
        j = tl.arange(0, KMAX)
        mono = (ranked >> 32).to(tl.int32)
        x = (mono ^ ((mono >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        ids = (4294967295 - (ranked & 4294967295)).to(tl.int32)
        kept = (j < k) & (ranked > lowest)
        _, best_key, best_x = _best(x, ids, ranked, kept, temp, key_lo, key_hi, lowest, PRECISE)
    drawn = (4294967295 - (best_key & 4294967295)).to(tl.int32)
    tok = tl.where(greedy, arg, drawn)
    logp = tl.where(greedy, m, best_x) - (m + tl.log(s))
    tl.store(TOK + row, tok.to(tl.int64))
    tl.store(PACKED + row, tok.to(tl.float64))
    tl.store(PACKED + B + row, logp.to(tl.float64))


def sampled_pick(logits: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] (int64) and (tokens, log-probs) as float64 [2, B] for rows of ``logits``
    [B, V] (fp32, rows contiguous) under ``cols`` [B, 6] (float64 on the device: temperature
    (1 for greedy rows), top-k (0: off, at most ``KMAX``), top-p (must be 1), noise key low
    and high halves, greedy flag), as :func:`dendrite.sampling.sample_device` builds them."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            f"sampled_pick wants fp32 logits [B, V] with contiguous rows, got "
            f"{logits.dtype} {tuple(logits.shape)}"
        )
    B, V = logits.shape
    assert SUB >= KMAX and CHUNK_C % SUB == 0, "a chunk keeps at least KMAX set maxima"
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    packed = torch.empty(2, B, dtype=torch.float64, device=dev)
    if not B:
        return tokens, packed
    nch = triton.cdiv(V, CHUNK_C)
    nchp = triton.next_power_of_2(nch)

    def scratch(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device=dev)

    maxk, statf, stati = (
        scratch(B, nch * SUB),
        scratch(B, nch, 4, dtype=torch.float32),
        scratch(B, nch, 2),
    )
    sets, cand, spill = scratch(B, SETCAP), scratch(B, CAP), scratch(B, nchp * KMAX)
    _chunk_kernel[(B, nch)](
        logits, cols, maxk, statf, stati, V, logits.stride(0), C=CHUNK_C, SUB=SUB,
        PRECISE=_PRECISE, num_warps=4,
    )  # fmt: skip
    _sample_kernel[(B,)](
        logits, maxk, statf, stati, sets, cand, spill, cols, tokens, packed, B, V,
        logits.stride(0), nch, NCHP=nchp, NM=triton.next_power_of_2(nch * SUB), KMAX=KMAX,
        SUB=SUB, SETCAP=SETCAP, CAP=CAP, C=CHUNK_C, PRECISE=_PRECISE, num_warps=8,
    )  # fmt: skip
    return tokens, packed
