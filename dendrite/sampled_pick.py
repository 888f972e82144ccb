"""The sampled pick of a decode step in one kernel: top-k, Gumbel-max, the log-prob, and the
host copy's layout.

:func:`dendrite.sampling.sample_device` draws a sampled row in torch: the parameters' copy,
``topk``, the hashed Gumbel noise (two ``_mix32`` of a dozen integer ops each), a truncation
and a gather: about 40 kernels, each a launch from Python. On the H200 that host work (2 ms
for 64 rows) is longer than the 64-row step's own GPU time, so a sampled tree decode is
host-bound. Here the same draw is one Triton launch, one program per row, the row's logits
held in registers (``VB``, the vocabulary rounded up to a power of two, over 32 warps):

1. the log-sum-exp (for the log-prob) and the first argmax (greedy rows), as
   :mod:`dendrite.greedy` computes them;
2. for a row with top-k, the k-th largest *rank key* (below) by bisection: 32 counts of the
   logits at or above a midpoint find the k-th largest value, and, only when that value
   ties, up to ``log2(VB)`` more find how many of its (lowest) ids are kept. The k keys at or
   above it are the kept tokens; they are packed in order into a scratch row (a prefix sum),
   read back, and the largest ``x / T + gumbel(key, token id)`` over them is taken;
3. for a row without top-k, the Gumbel-max over every token.

It writes the token (int64, the next step's input) and (token, log-prob) as float64 [2, B].
Any k is served: the bisection does not depend on it (the two chunked top-k kernels this
replaced kept 64 candidates a chunk, so rows with k > 64 took the torch path; on the H200
they took 69 us for 64 rows x 32,000 at k = 50, ``.device/exp_s12a.py``).

The rank key orders a row's logits by value, then by lower token id, in one int64: the
float's bits made monotone (-0.0 as 0.0) in the high half, ``2**32 - 1 - id`` in the low
half. Keys are distinct, so "the top k" has one meaning even among tied logits (bf16-rounded
logits tie often). :func:`dendrite.sampling.rank_keys` is the same key in torch, and the torch
path ranks by it too, so both paths draw the same token: the same noise (the hash is integer
arithmetic; the logarithms are CUDA's precise ``logf`` here and the division by T is IEEE's,
as in torch), the same threshold, and an exact tie of scores goes to the higher-ranked token
in both. A row with top-p < 1 is not handled here (the caller uses the torch path), nor a
vocabulary over ``MAX_VOCAB``.

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

MAX_VOCAB = 1 << 17  # the largest vocabulary a row's program holds (128 logits a thread)
# compiled: libdevice's log and div_rn; Triton's interpreter has neither
_PRECISE = os.environ.get("TRITON_INTERPRET") != "1"
_M32 = 4294967295


@triton.jit
def _order(x):
    """int32 ordering fp32 ``x`` as signed integers (-0.0 as 0.0): the rank key's high half."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)  # -0.0 ranks as 0.0
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: the order of their bits flips


@triton.jit
def _unorder(mono):
    """The fp32 value of an :func:`_order` (-0.0 comes back as 0.0)."""
    return (mono ^ ((mono >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _key(mono, ids):
    """int64 rank keys: the value (:func:`_order`), then the lower id (int32 tensor)."""
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
def _kth_key(mono, ids, valid, k, LOG_VB: tl.constexpr):
    """The k-th largest rank key of a row (1 <= k <= its valid tokens): the k-th largest
    value by bisection over int32 (the largest t with k values at or above it), then, if
    that value ties, the largest id among its kept (lowest-id) tokens."""
    lo = tl.min(tl.where(valid, mono, 2147483647), axis=0).to(tl.int64)  # all at or above
    hi = tl.max(mono, axis=0).to(tl.int64)
    for _ in range(32):  # the int32 range halves each time: 32 steps close it
        mid = lo + (hi - lo + 1) // 2
        n = tl.sum((mono >= mid.to(tl.int32)).to(tl.int32), axis=0)
        lo = tl.where(n >= k, mid, lo)
        hi = tl.where(n >= k, hi, mid - 1)
    t = lo.to(tl.int32)
    need = k - tl.sum((mono > t).to(tl.int32), axis=0)  # kept among the ties (>= 1)
    tie = valid & (mono == t)
    last = tl.max(tl.where(tie, ids, 0), axis=0)  # every tie kept: up to the last
    if tl.sum(tie.to(tl.int32), axis=0) > need:  # the need lowest ids: the smallest id n with
        a = tl.min(tl.where(tie, ids, 2147483647), axis=0)  # need ties at or below it
        b = last
        for _ in range(LOG_VB):
            m = (a + b) // 2
            n = tl.sum((tie & (ids <= m)).to(tl.int32), axis=0)
            a = tl.where(n >= need, a, m + 1)
            b = tl.where(n >= need, m, b)
        last = a
    return (t.to(tl.int64) << 32) | (4294967295 - last.to(tl.int64))


@triton.jit
def _pick_kernel(
    LOGITS,
    PARAMS,
    CAND,
    TOK,
    PACKED,
    B,
    V,
    stride,
    VB: tl.constexpr,
    LOG_VB: tl.constexpr,
    KC: tl.constexpr,
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
    ids = tl.arange(0, VB)
    valid = ids < V
    x = tl.load(LOGITS + row.to(tl.int64) * stride + ids, mask=valid, other=-float("inf"))
    # the log-sum-exp and the first argmax, as dendrite.greedy (one block: the whole row)
    m = tl.max(x, axis=0)
    arg = tl.argmax(x, axis=0, tie_break_left=True)
    s = tl.sum(tl.where(x > -float("inf"), tl.exp(x - m), 0.0), axis=0)
    mono = tl.where(valid, _order(x), -2147483648)  # the row from here on (x comes back)
    best_key = lowest
    best_x = 0.0
    if not greedy:
        if k > 0:  # the k kept keys, packed in order into the row's scratch, then drawn from
            keys = _key(mono, ids)
            kept = valid & (keys >= _kth_key(mono, ids, valid, k, LOG_VB))
            at = tl.cumsum(kept.to(tl.int32), axis=0) - 1
            out = CAND + row.to(tl.int64) * KC
            tl.store(out + at, keys, mask=kept)
            tl.debug_barrier()  # the block's stores, visible to its loads
            j = tl.arange(0, KC)
            c = tl.load(out + j, mask=j < k, other=lowest)
            cx = _unorder((c >> 32).to(tl.int32))
            cid = (4294967295 - (c & 4294967295)).to(tl.int32)
            _, best_key, best_x = _best(
                cx, cid, c, j < k, temp, key_lo, key_hi, lowest, PRECISE
            )  # fmt: skip
        else:  # plain temperature: every token is kept
            _, best_key, best_x = _best(
                _unorder(mono), ids, _key(mono, ids), valid, temp, key_lo, key_hi, lowest,
                PRECISE,
            )  # fmt: skip
    drawn = (4294967295 - (best_key & 4294967295)).to(tl.int32)
    tok = tl.where(greedy, arg, drawn)
    logp = tl.where(greedy, m, best_x) - (m + tl.log(s))
    tl.store(TOK + row, tok.to(tl.int64))
    tl.store(PACKED + row, tok.to(tl.float64))
    tl.store(PACKED + B + row, logp.to(tl.float64))


def sampled_pick(
    logits: torch.Tensor, cols: torch.Tensor, max_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] (int64) and (tokens, log-probs) as float64 [2, B] for rows of ``logits``
    [B, V] (fp32, rows contiguous, V <= ``MAX_VOCAB``) under ``cols`` [B, 6] (float64 on the
    device: temperature (1 for greedy rows), top-k (0: off; below V), top-p (must be 1),
    noise key low and high halves, greedy flag), as :func:`dendrite.sampling.sample_device`
    builds them. ``max_k``: the largest top-k of the rows (0: none)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            f"sampled_pick wants fp32 logits [B, V] with contiguous rows, got "
            f"{logits.dtype} {tuple(logits.shape)}"
        )
    B, V = logits.shape
    if V > MAX_VOCAB:
        raise ValueError(f"sampled_pick holds a vocabulary of at most {MAX_VOCAB}, got {V}")
    dev = logits.device
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    packed = torch.empty(2, B, dtype=torch.float64, device=dev)
    if not B:
        return tokens, packed
    vb = triton.next_power_of_2(V)
    kc = triton.next_power_of_2(max(16, max_k))
    cand = torch.empty(B if max_k else 1, kc, dtype=torch.int64, device=dev)
    _pick_kernel[(B,)](
        logits, cols, cand, tokens, packed, B, V, logits.stride(0), VB=vb,
        LOG_VB=max(1, vb.bit_length() - 1), KC=kc, PRECISE=_PRECISE,
        num_warps=min(32, max(4, vb // 1024)),
    )  # fmt: skip
    return tokens, packed
