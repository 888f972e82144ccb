"""Sampling: one vectorised draw for a whole batch of rows, reproducible per branch.

Every row has its own temperature, top-k and top-p, and its own noise key, which the engine
derives on the host from the branch's seed and the position of the token being drawn
(:func:`noise_key`). The draw is Gumbel-max over the kept tokens, with the Gumbel noise a
counter-based hash of (key, token id) computed in torch on the logits' device. A branch's
token therefore depends only on its own logits, parameters, seed and position: not on which
other branches share the batch, nor on how many steps ran before, and no generator state has
to be created, stored or forked::

    row i:  x = logits / T_i                       greedy rows (T = 0): exact argmax, no noise
            rank by logit, then lower token id     (rank_keys: distinct, so ties fall one way)
            drop rank >= k_i; drop a token when the probability before it reaches p_i
            u = hash32(key_i, token id) in (0, 1);  g = -log(-log u)   (uniform: 23 bits)
            token = the kept token with the largest x + g     (~ softmax(x) over the kept;
                                                               an exact tie: the higher rank)

The log-prob returned is the model's own (``log_softmax`` of the raw logits, after any grammar
mask), which is what priors and scores want; temperature and truncation only shape which token
is drawn. Tokens and log-probs come back to the host in one transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dendrite.errors import ConfigError

_MASK64 = (1 << 64) - 1
_M32 = 0xFFFFFFFF
_LOWEST = -(1 << 63)  # below every rank key
MIN_TEMPERATURE = 1e-6  # below it (but above 0) the draw is greedy in all but name


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    stop: tuple[str, ...] = ()  # stop strings (checked on the decoded output)
    stop_token_ids: tuple[int, ...] | None = None  # None: the model's eos ids
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be an int >= 0, got {self.max_new_tokens!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be >= 0 and finite, got {self.temperature!r}")
        if 0 < self.temperature < MIN_TEMPERATURE:  # logits / T would overflow fp32
            raise ConfigError(
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, "
                f"got {self.temperature!r}"
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # splitmix64's


def derive_seed(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): independent, reproducible seeds for forked branches."""
    c0, c1, c2 = _SPLITMIX
    z = (seed * c0 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * c1) & _MASK64
    z = ((z ^ (z >> 27)) * c2) & _MASK64
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def noise_key(seed: int, position: int) -> int:
    """The 63-bit noise key of the token drawn at ``position`` by a branch seeded ``seed``."""
    return derive_seed(seed, position)


def noise_keys(seeds: Sequence[int], positions: Sequence[int]) -> list[int]:
    """:func:`noise_key` of many rows at once: splitmix64 in numpy's uint64 arithmetic,
    which wraps modulo 2**64 as ``derive_seed``'s masks do (a decode step of 64 rows
    derives its keys in a few microseconds instead of 64 Python calls). Seeds that are not
    ints in [0, 2**64) take the scalar path (which refuses a float as it always did)."""
    if any(type(s) is not int or not 0 <= s <= _MASK64 for s in seeds) or any(
        p < 0 for p in positions
    ):
        return [noise_key(s, p) for s, p in zip(seeds, positions, strict=True)]
    c0, c1, c2 = (np.uint64(c) for c in _SPLITMIX)
    z = np.array(seeds, dtype=np.uint64) * c0 + np.array(positions, dtype=np.uint64) + 1
    z = (z ^ (z >> np.uint64(30))) * c1
    z = (z ^ (z >> np.uint64(27))) * c2
    return ((z ^ (z >> np.uint64(31))) & np.uint64(0x7FFFFFFFFFFFFFFF)).tolist()


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """An xorshift-multiply avalanche of uint32 values held in int64.

    Both multipliers are below 2**31, so no product of a 32-bit value overflows int64: the
    result is exact and identical on every device.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def uniform(h: torch.Tensor) -> torch.Tensor:
    """fp32 uniforms in (0, 1) from 32-bit hashes (int64): ``((h >> 9) + 0.5) / 2**23``.

    23 bits, so ``h + 0.5`` has 24 significant bits and is exact in fp32: never 0 or 1. (With
    24 bits the top value rounds up to exactly 1, ``log`` gives an infinite Gumbel noise, and
    on a masked token ``-inf + inf`` is NaN, which ``argmax`` picks.)
    """
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(
    key_lo: torch.Tensor, key_hi: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, W] (fp32) for ``token_ids`` [B, W] under row keys [B] (int64)."""
    h = _mix32(token_ids ^ key_lo[:, None])
    h = _mix32(h ^ key_hi[:, None])
    return -torch.log(-torch.log(uniform(h)))


def truncate_sorted(
    vals: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, use_top_p: bool = True
) -> torch.Tensor:
    """Top-k then top-p (nucleus) on rows sorted descending [B, W]; removed become -inf.

    ``top_k`` [B] int64 (0: off), ``top_p`` [B] fp32 (1: off). Top-p keeps the tokens whose
    preceding probability mass (over the top-k survivors) is below ``p``: the token that
    crosses ``p`` stays, and so does the first one always.
    """
    W = vals.shape[-1]
    rank = torch.arange(W, device=vals.device)
    k = torch.where(top_k > 0, top_k, W)
    vals = vals.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    if use_top_p:
        probs = vals.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # [B, W] mass ahead of each token
        remove = (before >= top_p[:, None]) & (rank[None, :] > 0)
        vals = vals.masked_fill(remove, float("-inf"))
    return vals


def rank_keys(logits: torch.Tensor) -> torch.Tensor:
    """int64 keys [B, V] ranking each row of fp32 ``logits`` by value, then by lower token id.

    The float's bits made monotone sit in the high half and ``2**32 - 1 - id`` in the low
    half, so keys are distinct: "the top k" of a row is one set even among tied logits
    (bf16-rounded logits tie often), on every device and in :mod:`dendrite.sampled_pick`.
    """
    if logits.dtype != torch.float32:
        raise TypeError(f"rank_keys wants fp32 logits, got {logits.dtype}")
    bits = logits.contiguous().view(torch.int32).long()
    bits = bits.masked_fill(bits == -(1 << 31), 0)  # -0.0 ranks as 0.0
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: the order of their bits flips
    ids = torch.arange(logits.shape[-1], device=logits.device)
    return (mono << 32) | (_M32 - ids)


def _param_rows(
    params: Sequence[SamplingParams], keys: Sequence[int | None], V: int
) -> tuple[np.ndarray, int, bool, bool]:
    """Each row's (temperature, top-k, top-p, key low, key high, greedy) as a float64 table
    [B, 6], and the batch's draw width, whether it ranks (a top-k or top-p), whether it needs
    top-p. Greedy rows: (1, 0, 1, 0, 0, 1). Built once per distinct ``SamplingParams``
    object, the keys' halves in numpy: the rows of a tree share one or a few."""
    B = len(params)
    if not B:
        return np.zeros((0, 6)), 1, False, False
    first = params[0]
    if all(p is first for p in params):
        uniq, idx = [first], np.zeros(B, dtype=np.intp)
    else:
        at: dict[int, int] = {}
        uniq = []
        for p in params:
            if at.setdefault(id(p), len(uniq)) == len(uniq):
                uniq.append(p)
        idx = np.fromiter((at[id(p)] for p in params), dtype=np.intp, count=B)
    width, sort, use_top_p = 1, False, False
    templates = []
    for p in uniq:
        if p.greedy:
            templates.append((1.0, 0.0, 1.0, 0.0, 0.0, 1.0))
            continue
        k = p.top_k if 0 < p.top_k < V else 0
        width = max(width, k or V)
        sort = sort or k > 0 or p.top_p < 1.0
        use_top_p = use_top_p or p.top_p < 1.0
        templates.append((p.temperature, float(k), p.top_p, 0.0, 0.0, 0.0))
    table = np.array(templates, dtype=np.float64).reshape(-1, 6)[idx]
    sampled = table[:, 5] == 0
    if sampled.any():
        if any(k is None and s for k, s in zip(keys, sampled.tolist(), strict=True)):
            raise AssertionError("a sampled row needs a noise key")
        ks = np.array([0 if k is None else k for k in keys], dtype=np.uint64)
        table[:, 3] = np.where(sampled, ks & np.uint64(_M32), 0)
        table[:, 4] = np.where(sampled, ks >> np.uint64(32), 0)
    return table, width, sort, use_top_p


def _rows_to(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """One host->device transfer for every row's parameters (fp64 holds the 32-bit halves)."""
    cols = torch.from_numpy(rows)
    if device.type == "cuda":  # pinned: the copy does not wait for the GPU (a pipelined decode)
        cols = cols.pin_memory()
    return cols.to(device, non_blocking=True)


def _draw(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    keys: Sequence[int | None],
    argmax: torch.Tensor,
) -> torch.Tensor:
    """Token ids [B]: drawn for sampled rows, ``argmax`` [B] for greedy ones."""
    B, V = logits.shape
    rows, width, sort, use_top_p = _param_rows(params, keys, V)
    cols = _rows_to(rows, logits.device)
    temp, top_k, top_p = cols[:, 0].float(), cols[:, 1].long(), cols[:, 2].float()
    key_lo, key_hi, greedy = cols[:, 3].long(), cols[:, 4].long(), cols[:, 5] > 0
    x = logits / temp[:, None]  # [B, V]
    if sort:  # ranked by the logits (rank_keys), so ties fall the same way everywhere
        ranked = rank_keys(logits)
        if width < V:
            ranked = ranked.topk(width, dim=-1).values  # [B, W], descending
        else:
            ranked = ranked.sort(dim=-1, descending=True).values
        idx = _M32 - (ranked & _M32)
        vals = truncate_sorted(x.gather(1, idx), top_k, top_p, use_top_p)
        j = (vals + gumbel_noise(key_lo, key_hi, idx)).argmax(dim=-1)  # [B], first = ranked higher
    else:  # plain temperature sampling: no truncation; an exact tie goes to the higher rank
        idx = torch.arange(V, device=x.device).expand(B, V)
        score = x + gumbel_noise(key_lo, key_hi, idx)
        top = score.amax(dim=-1, keepdim=True)
        j = torch.where(score == top, rank_keys(logits), _LOWEST).argmax(dim=-1)
    return torch.where(greedy, argmax, idx.gather(1, j[:, None])[:, 0])


def sample_device(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    keys: Sequence[int | None],
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sample` without the copy to the host: tokens [B] (int64) and their log-probs
    [B] (fp32), on ``logits``' device (a pipelined decode copies them over asynchronously)."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)  # [B, V]
    tokens = logits.argmax(dim=-1)  # [B]
    if not all(p.greedy for p in params):
        tokens = _draw(logits, params, keys, tokens)
    return tokens, logp.gather(1, tokens[:, None])[:, 0]


def sample_packed(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    keys: Sequence[int | None],
    allowed: torch.Tensor | None = None,
    *,
    fused: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] (int64) and (tokens, log-probs) as float64 [2, B], both on ``logits``'
    device: the second is what goes to the host, in one copy. ``fused`` (CUDA only): a step
    without a mask takes Triton kernels, one for greedy rows (:mod:`dendrite.greedy`), two
    when rows sample with top-k <= 64 and no top-p (:mod:`dendrite.sampled_pick`); the same
    tokens as the torch path, log-probs to fp32 rounding."""
    if fused and allowed is None:
        if all(p.greedy for p in params):
            from dendrite.greedy import greedy_pick

            return greedy_pick(logits)
        from dendrite.sampled_pick import KMAX, TOPK, sampled_pick

        V = logits.shape[-1]
        rows, _, _, use_top_p = _param_rows(params, keys, V)
        if TOPK and not use_top_p and bool((rows[:, 1] <= KMAX).all()):
            return sampled_pick(logits, _rows_to(rows, logits.device))
    tokens, chosen = sample_device(logits, params, keys, allowed)
    return tokens, torch.stack([tokens.double(), chosen.double()])


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    keys: Sequence[int | None],
    allowed: torch.Tensor | None = None,
    *,
    fused: bool = False,
) -> tuple[list[int], list[float]]:
    """Next token and its log-prob for each row of ``logits`` [B, V] (fp32).

    ``keys``: each row's :func:`noise_key` (``None`` is fine for greedy rows). ``allowed``
    [B, V] bool masks tokens out (grammar) before anything else. ``fused``: see
    :func:`sample_packed`.
    """
    _, packed = sample_packed(logits, params, keys, allowed, fused=fused)
    ids, lps = packed.cpu().tolist()  # the one device->host copy
    return [int(t) for t in ids], lps
