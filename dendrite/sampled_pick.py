"""The sampled pick of a decode step in two kernels: top-k, Gumbel-max, the log-prob, and the
host copy's layout.

:func:`dendrite.sampling.sample_device` draws a sampled row in torch: the parameters' copy,
``topk``, the hashed Gumbel noise (two ``_mix32`` of a dozen integer ops each), a truncation
and a gather: about 40 kernels, each a launch from Python. On the H200 that host work (2 ms
for 64 rows) is longer than the 64-row step's own GPU time, so a sampled tree decode is
host-bound. Here the same draw is two Triton launches:

1. ``_candidates_kernel``, one program per (row, chunk of ``CHUNK_C`` logits): each logit's
   rank key (below), sorted in the chunk, and the chunk's first ``KMAX`` kept. A row's top-k
   (k <= ``KMAX``) is among its chunks' candidates.
2. ``_sample_kernel``, one program per row: the row's candidates sorted; the first k are the
   kept tokens, and each key holds the token's logit and id, so the largest
   ``x / T + gumbel(key, token id)`` is taken over those k alone. One pass over the row then
   computes, as :mod:`dendrite.greedy` does, the first argmax and the online log-sum-exp
   (for the log-prob), and, for a row without top-k, the Gumbel-max over every token. It
   writes the token (int64, the next step's input) and (token, log-prob) as float64 [2, B].

The rank key orders a row's logits by value, then by lower token id, in one int64: the
float's bits made monotone (-0.0 as 0.0) in the high half, ``2**32 - 1 - id`` in the low
half. Keys are distinct, so "the top k" has one meaning even among tied logits (bf16-rounded
logits tie often). :func:`dendrite.sampling.rank_keys` is the same key in torch, and the torch
path ranks by it too, so both paths draw the same token: the same noise (the hash is integer
arithmetic; the logarithms are CUDA's precise ``logf`` here and the division by T is IEEE's,
as in torch), the same threshold, and an exact tie of scores goes to the higher-ranked token
in both. A row with top-p < 1 or top-k > ``KMAX`` is not handled here (the caller uses the
torch path).

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

KMAX = 64  # the largest top-k this pick serves (each chunk keeps this many candidates)
# logits a candidates program ranks: on the H200, 64 rows x 32,000 at top-k 50 take 74 us
# for both kernels with 2,048 (1,024: 97 us; 512: 136 us; a whole sort instead of tl.topk:
# 149-222 us)
CHUNK_C = 2048
CHUNK = 8192  # logits the sampling program holds at a time (as dendrite.greedy)
# compiled: libdevice's log and div_rn; Triton's interpreter has neither
_PRECISE = os.environ.get("TRITON_INTERPRET") != "1"
TOPK = hasattr(tl, "topk")  # Triton's bitonic top-k (3.4+): else a whole sort of each chunk


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
def _candidates_kernel(
    LOGITS, CAND, V, stride, C: tl.constexpr, KMAX: tl.constexpr, TOPK: tl.constexpr
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    offs = chunk * C + tl.arange(0, C)
    valid = offs < V
    x = tl.load(LOGITS + row.to(tl.int64) * stride + offs, mask=valid, other=-float("inf"))
    key = tl.where(valid, _rank_key(x, offs), -9223372036854775808)
    out = CAND + (row.to(tl.int64) * tl.num_programs(1) + chunk) * KMAX
    if TOPK:  # a bitonic top-k: sorts runs of KMAX and merges, keeping KMAX at each stage
        tl.store(out + tl.arange(0, KMAX), tl.topk(key, KMAX))
    else:
        ranked = tl.sort(key, descending=True)
        j = tl.arange(0, C)
        tl.store(out + j, ranked, mask=j < KMAX)


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
def _sample_kernel(
    LOGITS,
    CAND,
    PARAMS,
    TOK,
    PACKED,
    B,
    V,
    stride,
    NCAND,
    NC: tl.constexpr,
    KMAX: tl.constexpr,
    CHUNK: tl.constexpr,
    TOPK: tl.constexpr,
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
    if k > 0:  # the kept tokens are the first k candidates: the key holds logit and id
        jc = tl.arange(0, NC)
        c = tl.load(CAND + row.to(tl.int64) * NCAND + jc, mask=jc < NCAND, other=lowest)
        if TOPK:  # the first KMAX in order are all a row can keep
            ranked = tl.topk(c, KMAX)
            j = tl.arange(0, KMAX)
        else:
            ranked = tl.sort(c, descending=True)
            j = jc
        mono = (ranked >> 32).to(tl.int32)
        x = (mono ^ ((mono >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
        ids = (4294967295 - (ranked & 4294967295)).to(tl.int32)
        kept = (j < k) & (ranked > lowest)
        best, best_key, best_x = _best(x, ids, ranked, kept, temp, key_lo, key_hi, lowest, PRECISE)
    stream = (k == 0) & (tl.load(par + 5) == 0)  # plain temperature: every token is kept
    offs = tl.arange(0, CHUNK)
    base = LOGITS + row.to(tl.int64) * stride
    m = -float("inf")  # running maximum and the sum of exp(x - m): the log-sum-exp
    s = 0.0
    arg = tl.full((), 0, tl.int32)  # first index of the maximum (greedy rows)
    for start in range(0, V, CHUNK):
        ids = start + offs
        valid = ids < V
        x = tl.load(base + ids, mask=valid, other=-float("inf"))
        m, s, arg = _online_step(x, start, m, s, arg)
        if stream:
            key = _rank_key(x, ids)
            smax, skey, sx = _best(x, ids, key, valid, temp, key_lo, key_hi, lowest, PRECISE)
            # a higher score wins; an equal one (even -inf) goes to the higher-ranked token
            better = (smax > best) | ((smax == best) & (skey > best_key))
            best = tl.where(better, smax, best)
            best_key = tl.where(better, skey, best_key)
            best_x = tl.where(better, sx, best_x)
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
    ``need_topk``: some row has a top-k (else the candidates kernel is skipped)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            f"sampled_pick wants fp32 logits [B, V] with contiguous rows, got "
            f"{logits.dtype} {tuple(logits.shape)}"
        )
    B, V = logits.shape
    assert CHUNK_C >= KMAX, "a candidates chunk must hold KMAX logits"
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    packed = torch.empty(2, B, dtype=torch.float64, device=dev)
    if not B:
        return tokens, packed
    n_chunks = triton.cdiv(V, CHUNK_C)
    ncand = n_chunks * KMAX
    cand = torch.empty(B if need_topk else 1, ncand, dtype=torch.int64, device=dev)
    if need_topk:
        _candidates_kernel[(B, n_chunks)](
            logits, cand, V, logits.stride(0), C=CHUNK_C, KMAX=KMAX, TOPK=TOPK, num_warps=4
        )
    _sample_kernel[(B,)](
        logits,
        cand,
        cols,
        tokens,
        packed,
        B,
        V,
        logits.stride(0),
        ncand,
        NC=triton.next_power_of_2(ncand),
        KMAX=KMAX,
        CHUNK=CHUNK,
        TOPK=TOPK,
        PRECISE=_PRECISE,
        num_warps=8,
    )
    return tokens, packed
