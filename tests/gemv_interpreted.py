"""Run by ``test_gemv.py`` in a subprocess with ``TRITON_INTERPRET=1`` (set before Triton is
imported): the GEMV kernels, the split-K GEMMs, the greedy and sampled picks and the cascade
merge on CPU through Triton's interpreter. Prints one JSON line of measured errors; the test
asserts on them."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from dendrite import greedy as greedy_module
from dendrite import sampled_pick as pick_module
from dendrite.engine import Engine
from dendrite.model import gemm32 as gemm32_module
from dendrite.model import gemv as gemv_module
from dendrite.model import rope_kv as rope_kv_module
from dendrite.model import skinny as skinny_module
from dendrite.model.random_init import make_random_checkpoint
from dendrite.model.skinny import Tile
from dendrite.sampling import SamplingParams, noise_key, sample, sample_device

DT = torch.bfloat16
LN2 = 0.6931471805599453


class Calls:
    """Counts the calls of ``module.<name>`` while installed (``with``), and those among them
    given a keyword ``flag`` that is not None (its values in ``values``, call by call); puts
    the function back on exit. A Triton kernel's launches (``kernel[grid](...)``) count too."""

    def __init__(self, module: object, name: str, flag: str | None = None) -> None:
        self.module, self.name, self.flag = module, name, flag
        self.real = getattr(module, name)
        self.n = self.flagged = 0
        self.values: list[object] = []

    def __call__(self, *args: object, **kw: object) -> object:
        return self._count(self.real, args, kw)

    def __getitem__(self, grid: object) -> Callable[..., object]:
        launch = self.real[grid]
        return lambda *args, **kw: self._count(launch, args, kw)

    def _count(self, fn: Callable[..., object], args: tuple, kw: dict[str, object]) -> object:
        self.n += 1
        if self.flag is not None:
            self.values.append(kw.get(self.flag))
            self.flagged += kw.get(self.flag) is not None
        return fn(*args, **kw)

    def __enter__(self) -> Calls:
        setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.module, self.name, self.real)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def rope_ref(y: torch.Tensor, pos: int, head_dim: int, rotated: int) -> torch.Tensor:
    """RoPE (rotate-half convention, theta 10000) on the first ``rotated`` rows of y [1, N]."""
    half = head_dim // 2
    inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    cos, sin = (pos * inv).cos(), (pos * inv).sin()
    heads = y.float().view(-1, head_dim).clone()
    nrot = rotated // head_dim
    lo, hi = heads[:nrot, :half].clone(), heads[:nrot, half:].clone()
    heads[:nrot, :half] = lo * cos - hi * sin
    heads[:nrot, half:] = hi * cos + lo * sin
    return heads.view(1, -1)


def kernels() -> dict[str, float]:
    """Each prologue (and RoPE) against torch in fp32, rounded where the kernels round."""
    torch.manual_seed(0)
    n, k, eps, d = 96, 160, 1e-5, 16
    w, b = torch.randn(n, k, dtype=DT), torch.randn(n, dtype=DT)
    x, r, g = torch.randn(1, k, dtype=DT), torch.randn(1, k, dtype=DT), torch.randn(k, dtype=DT)
    gu = torch.randn(1, 2 * k, dtype=DT)
    s = x.float() + r.float()
    normed = (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * g.float()).to(DT)
    x_only = x.float()
    normed_x = x_only * torch.rsqrt(x_only.pow(2).mean(-1, keepdim=True) + eps) * g.float()
    act = (F.silu(gu[:, :k].float()) * gu[:, k:].float()).to(DT)
    out: dict[str, float] = {}
    y, none = gemv_module.gemv(x, w, tile=(4, 4))
    out["none"] = rel(y, F.linear(x.float(), w.float()))
    out["none_r"] = float(none is not None)
    y, _ = gemv_module.gemv(x, w, b, tile=(2, 4))
    out["bias"] = rel(y, F.linear(x.float(), w.float(), b.float()))
    r_before = r.clone()
    y, r_new = gemv_module.gemv(x, w, prologue="norm", residual=r, norm_weight=g, eps=eps)
    assert r_new is not None
    out["norm"] = rel(y, F.linear(normed.float(), w.float()))
    out["norm_residual"] = rel(r_new, s)
    out["residual_read_only"] = float(torch.equal(r, r_before))
    y, _ = gemv_module.gemv(x, w, prologue="norm", norm_weight=g, eps=eps, tile=(8, 4))
    out["norm_no_residual"] = rel(y, F.linear(normed_x.to(DT).float(), w.float()))
    y, _ = gemv_module.gemv(gu, w, prologue="silu", tile=(1, 4))
    out["silu"] = rel(y, F.linear(act.float(), w.float()))
    # RoPE on the first 4 of 6 heads (q and k of a fused QKV), position 37, with bias
    pos = torch.tensor([37])
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.arange(64).float()[:, None] * inv[None, :]
    table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    y, _ = gemv_module.gemv(
        x, w, b, prologue="norm", residual=r, norm_weight=g, eps=eps, tile=(4, 4),
        rope=(pos, table, d, 4 * d),
    )  # fmt: skip
    want = rope_ref(F.linear(normed.float(), w.float(), b.float()), 37, d, 4 * d)
    out["rope"] = rel(y, want)
    out["rope_v_rows"] = rel(y[:, 4 * d :], want[:, 4 * d :])  # not rotated
    # the same, writing K (heads 2-3: rows 2d..4d, rotated) and V (heads 4-5) into page 3,
    # slot 5 of a cache of 6 pages of 8 slots, 2 KV heads: nothing else may change
    pages = torch.randn(6, 2, 8, 2, d).to(DT)
    before = pages.clone()
    y2, _ = gemv_module.gemv(
        x, w, b, prologue="norm", residual=r, norm_weight=g, eps=eps, tile=(4, 4),
        rope=(pos, table, d, 4 * d), kv=(pages, torch.tensor([3]), torch.tensor([5]), 2 * d),
    )  # fmt: skip
    out["kv_same_output"] = float(torch.equal(y2, y))
    out["kv_k"] = float(torch.equal(pages[3, 0, 5].reshape(-1), y[0, 2 * d : 4 * d]))
    out["kv_v"] = float(torch.equal(pages[3, 1, 5].reshape(-1), y[0, 4 * d :]))
    pages[3, :, 5] = before[3, :, 5]
    out["kv_rest_untouched"] = float(torch.equal(pages, before))
    # fp32 out (the LM head): the bf16 output's values, without a cast after the kernel
    y32, _ = gemv_module.gemv(x, w, prologue="norm", residual=r, norm_weight=g, eps=eps,
                              out_dtype=torch.float32)  # fmt: skip
    y16, _ = gemv_module.gemv(x, w, prologue="norm", residual=r, norm_weight=g, eps=eps)
    out["fp32_out_dtype"] = float(y32.dtype == torch.float32)
    out["fp32_out_equal"] = float(torch.equal(y32, y16.float()))
    return out


def greedy() -> dict[str, float]:
    """``greedy_pick`` against ``argmax`` and ``log_softmax``: rows over several chunks,
    ties inside and across chunks, a masked (-inf) first chunk, a vocabulary under a chunk."""
    torch.manual_seed(1)
    chunk = greedy_module.CHUNK
    v = 3 * chunk + 77
    rows = torch.randn(5, v) * 4
    rows[1, 10] = rows[1, chunk + 5] = rows[1, 3 * chunk + 9] = 50.0  # first of 3 ties
    rows[2, 100] = rows[2, 200] = 60.0  # a tie inside one chunk
    rows[3, :chunk] = float("-inf")  # a grammar mask over the whole first chunk
    rows[4, -1] = 70.0  # the last token, in the short final chunk
    small = torch.randn(2, 512)
    out: dict[str, float] = {}
    for name, logits in (("big", rows), ("small", small)):
        tokens, packed = greedy_module.greedy_pick(logits)
        want = logits.argmax(dim=-1)
        lp = torch.log_softmax(logits, dim=-1).gather(1, want[:, None])[:, 0]
        out[f"greedy_{name}_tokens"] = float(torch.equal(tokens, want))
        out[f"greedy_{name}_packed_tokens"] = float(torch.equal(packed[0], want.double()))
        out[f"greedy_{name}_logp"] = float((packed[1] - lp.double()).abs().max())
    out["greedy_tie_index"] = float(greedy_module.greedy_pick(rows)[0][1])
    return out


def sampled() -> dict[str, float]:
    """``sampled_pick`` against the torch path (``sample_device``): bf16-rounded logits, so
    ties are everywhere and the top-k boundary falls inside runs of equal values; every kind
    of row in one batch, 4 noise keys each; rows over several chunks of both kernels; rows
    whose top k crowd into a few strided sets, so that more keys pass the bound than the
    packed row holds, and the same with room for fewer sets than pass (both ranked chunk by
    chunk). The interpreter runs a sort's network op by op, so the sizes are scaled down
    (chunks of 64 logits in 8 sets, 8 kept at most, 16 sets read back, 16 keys packed); the
    GPU test runs the real ones."""
    from dendrite.sampling import rank_keys, sample_packed

    pm = pick_module
    pm.CHUNK_C, pm.SUB, pm.KMAX, pm.SETCAP, pm.CAP = 64, 8, 8, 16, 16
    kinds = [
        SamplingParams(),  # greedy, in a batch that samples
        SamplingParams(temperature=1.0),  # no truncation: every token kept
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_k=8),  # top-k = KMAX
        SamplingParams(temperature=2.0, top_k=100_000),  # above the vocabulary: off
    ]
    hot = [SamplingParams(temperature=3.0, top_k=p.top_k) for p in kinds[1:5]]
    params = kinds + hot  # hot rows: a token one past the top-k would often win
    torch.manual_seed(2)
    v = 128 + 3 * 64 + 77
    out: dict[str, float] = {"sampled_draws": 0.0, "sampled_same": 0.0, "sampled_logp": 0.0}
    distinct: set[int] = set()
    for trial in range(4):
        logits = (torch.randn(len(params), v) * 2).bfloat16().float()
        logits[:, 300] = logits.max()  # a tie at the top, far from the first
        logits[4::5] = logits[4::5].round()  # runs of equal values across the top-k boundary
        keys = [None if p.greedy else noise_key(trial, 100 + i) for i, p in enumerate(params)]
        want, want_lp = sample_device(logits, params, keys)
        tokens, packed = sample_packed(logits, params, keys, fused=True)
        out["sampled_draws"] += len(params)
        out["sampled_same"] += float((tokens == want).sum() + (packed[0] == want).sum()) / 2
        out["sampled_logp"] = max(out["sampled_logp"], float((packed[1] - want_lp).abs().max()))
        distinct.add(int(tokens[3]))
    out["sampled_distinct_top5"] = float(len(distinct))  # it samples: not one token
    # the top of every row on a comb (ids 0, 8, 16, ...: one strided set of each chunk), so
    # the bound (the k-th largest set maximum) lets ~50 keys through, more than CAP
    comb = (torch.randn(len(params), v) * 2).bfloat16().float()
    comb[:, ::8] += 20.0
    comb[1::3, ::8] = comb[1::3, ::8].round()  # ties on the comb too
    rk = rank_keys(comb)  # [R, v]; chunk c, set j: logits c * 64 + 8 t + j
    low = torch.full((len(params), 7 * 64 - v), torch.iinfo(torch.int64).min)
    maxima = torch.cat([rk, low], 1).view(len(params), 7, 8, 8).amax(2).view(len(params), -1)
    passed = (rk >= maxima.topk(8, dim=1).values[:, -1:]).sum(1)  # keys at or above the bound
    out["sampled_comb_min_passed"] = float(passed.min())
    keys = [None if p.greedy else noise_key(9, 100 + i) for i, p in enumerate(params)]
    want, _ = sample_device(comb, params, keys)
    out["sampled_comb_same"] = float(
        (sample_packed(comb, params, keys, fused=True)[0] == want).sum()
    )
    # room for 4 sets only: rows with k > 4 pass more sets than that, and rank chunk by chunk
    pm.SETCAP = 4
    logits = (torch.randn(len(params), v) * 2).bfloat16().float()
    want, _ = sample_device(logits, params, keys)
    out["sampled_setcap_same"] = float(
        (sample_packed(logits, params, keys, fused=True)[0] == want).sum()
    )
    pm.SETCAP = 16
    # a batch with top-p (or a top-k above KMAX) takes the torch path: the kernels are not called
    with Calls(pick_module, "sampled_pick") as calls:
        odd = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=1.0, top_k=9)]
        small = torch.randn(2, 300)
        keys2 = [noise_key(1, 1), noise_key(2, 1)]
        out["sampled_fallback_same"] = float(
            sample(small, odd, keys2, fused=True)[0] == sample(small, odd, keys2)[0]
        )
        out["sampled_fallback_calls"] = float(calls.n)
        # a batch without top-k (plain temperature and greedy rows): the kernels, the same draw
        plain = [SamplingParams(temperature=1.0), SamplingParams(), SamplingParams(temperature=0.5)]
        same = 0
        for trial in range(3):
            logits = (torch.randn(3, v) * 2).bfloat16().float()
            keys3: list[int | None] = [noise_key(trial, 1), None, noise_key(trial, 2)]
            same += int(
                (
                    sample_packed(logits, plain, keys3, fused=True)[0]
                    == sample_device(logits, plain, keys3)[0]
                ).sum()
            )
        out["sampled_plain_same"] = float(same)
        out["sampled_plain_calls"] = float(calls.n)
    return out


def merge() -> dict[str, float]:
    """The cascade's merge kernel against the log-sum-exp formula (base 2), rows with mask 0
    untouched, strided level-0 output (a view), bf16; 4 heads and 14 (Qwen2-0.5B's)."""
    from dendrite.attention.merge import merge_into

    torch.manual_seed(4)
    out: dict[str, float] = {"merge_err": 0.0, "merge_masked_untouched": 1.0}
    for H in (4, 14):
        T, D = 5, 16
        o1 = torch.randn(T, H, D).to(DT)
        wide = torch.randn(T, H, 2 * D).to(DT)
        o0 = wide[:, :, :D]  # strided rows, as a view
        lse, lse0 = torch.randn(T, H) * 4, torch.randn(T, H) * 4
        mask = torch.tensor([1, 0, 1, 1, 0], dtype=torch.int32)
        m = torch.maximum(lse, lse0)
        w1, w0 = torch.exp2(lse - m)[..., None], torch.exp2(lse0 - m)[..., None]
        want = (o1.float() * w1 + o0.float() * w0) / (w1 + w0)
        got = o1.clone()
        merge_into(got, lse, o0, lse0, mask)
        keep = mask.bool()
        out["merge_err"] = max(out["merge_err"], rel(got[keep], want[keep]))
        out["merge_masked_untouched"] *= float(torch.equal(got[~keep], o1[~keep]))
    from dendrite.attention.merge import merge_states

    try:  # level 0 without its mask: refused, not merged as if there were no level 0
        merge_states(o1.clone(), o1, lse, o0, lse0)
        out["merge_half_level0_refused"] = 0.0
    except ValueError:
        out["merge_half_level0_refused"] = 1.0
    # two depths' masks for three level-0 states: which depth a state is cannot be told
    states0, lses0 = torch.stack([o0] * 3), torch.stack([lse0] * 3)
    try:
        merge_states(o1.clone(), o1, lse, states0, lses0, torch.stack([mask, mask]))
        out["merge_depth_mismatch_refused"] = 0.0
    except ValueError as e:
        out["merge_depth_mismatch_refused"] = float("level-0 states" in str(e))
    return out


def _attend_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [Hq, D] against k, v [N, Hkv, D] in fp32: (o [Hq, D], lse [Hq] in base 2)."""
    group = q.shape[0] // k.shape[1]
    kk = k.float().repeat_interleave(group, dim=1)  # [N, Hq, D]
    vv = v.float().repeat_interleave(group, dim=1)
    s = torch.einsum("hd,nhd->hn", q.float(), kk) / q.shape[1] ** 0.5
    o = torch.einsum("hn,nhd->hd", s.softmax(-1), vv)
    return o, torch.logsumexp(s, -1) / torch.log(torch.tensor(2.0))


def prefix() -> dict[str, float]:
    """The cascade in Triton (``shared_prefix.py``): level 0's split states over two groups'
    shared pages and level 1's over each row's own pages (its last page partial), merged,
    against one attention over shared + own keys in fp32. Groups over several tiles, a tile
    cut short by a group's end, empty tiles, splits with no pages (lse -inf) at both levels,
    a row without level 0 (mask 0); GQA groups of 4 and of 7 query heads (Qwen2-0.5B's 14 /
    2); queries as a strided view."""
    from dendrite.attention import shared_prefix as sp

    torch.manual_seed(5)
    out = {"prefix_err": 0.0, "prefix_lse_err": 0.0, "prefix_empty_split_lse": -math.inf}
    P, D, Hkv, N = 4, 16, 2, 40
    starts = [0, 6, 9]  # rows 0..5 share group 0's pages, 6..8 group 1's
    group_pages = [[3, 17, 8, 22, 5], [30, 11]]
    own = [[1], [2, 4], [6], [7], [9, 10], [12], [13], [14, 15], [16]]  # each row's own pages
    own_len = [3, 6, 1, 4, 7, 2, 4, 5, 3]  # tokens in them (the last page may be partial)
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.int32)  # row 5: no level 0
    i32 = torch.int32
    for hq in (8, 14):
        kv = torch.randn(N, 2, P, Hkv, D).to(DT)
        wide = torch.randn(9, hq, 2 * D).to(DT)
        q = wide[:, :, :D]  # strided rows, as the fused QKV output's view is
        kern = sp.CascadeKernels(hq, Hkv, sm_count=4)
        kern.block_m0, kern.rows0 = 16, sp.rows_per_tile(hq, Hkv, 16)  # groups over tiles
        n0 = kern.num_tiles0(9, 2)
        groups = [(starts[g], starts[g + 1], 0) for g in range(2)]  # row 5 rides, masked
        tiles0 = torch.tensor(kern.tiles0(groups, n0), dtype=i32)
        kvp0 = torch.tensor([0, 5, 7], dtype=i32)
        ind0 = torch.tensor([p for g in group_pages for p in g], dtype=i32)
        last0 = torch.tensor([P, P], dtype=i32)
        indptr1 = torch.tensor([0, *itertools.accumulate(len(o) for o in own)], dtype=i32)
        ind1 = torch.tensor([p for o in own for p in o], dtype=i32)
        last1 = torch.tensor(
            [n - (len(o) - 1) * P for n, o in zip(own_len, own, strict=True)], dtype=i32
        )
        tiles1 = torch.tensor(kern.tiles1(9), dtype=i32)
        level1 = (tiles1, indptr1, ind1, last1, 2)  # rows of one page: an empty split
        level0 = (tiles0, kvp0, ind0, last0, 3, 1, kern.block_n0)  # group 1: 2 pages, 3 splits
        got = kern.run(q, kv, level1, level0, mask)
        # one launch for both levels: each level's states exactly as its own launch's
        both = sp.level_partials(q, kv, kern.levels(level1, level0), Hkv)
        alone = [sp.level_partials(q, kv, [lv], Hkv)[0] for lv in kern.levels(level1, level0)]
        for (o_b, s_b), (o_a, s_a) in zip(both, alone, strict=True):  # tiles cover every row
            same = torch.equal(o_b, o_a) and torch.equal(s_b, s_a)
            out["prefix_one_launch_same"] = min(out.get("prefix_one_launch_same", 1.0), float(same))
        _, lse0 = both[0]
        out["prefix_empty_split_lse"] = max(out["prefix_empty_split_lse"], float(lse0[2, 6:].max()))
        want = torch.empty(9, hq, D)
        for r in range(9):
            ok = torch.cat([kv[p] for p in own[r]], dim=1)[:, : own_len[r]]  # [2, n, Hkv, D]
            g = 0 if r < 6 else 1
            shared = torch.cat([kv[p] for p in group_pages[g]], dim=1)
            both = torch.cat([shared, ok], dim=1) if mask[r] else ok
            want[r] = _attend_ref(q[r], both[0], both[1])[0]
            if mask[r]:  # the split states alone: their log-sum-exp is level 0's
                ref_lse = _attend_ref(q[r], shared[0], shared[1])[1]
                got_lse = torch.logsumexp(lse0[:, r] * LN2, 0) / LN2
                err = float((got_lse - ref_lse).abs().max())
                out["prefix_lse_err"] = max(out["prefix_lse_err"], err)
        out["prefix_err"] = max(out["prefix_err"], rel(got, want))
    return out


def split_decode() -> dict[str, float]:
    """``attention/split_decode.py``: rows of 1 to 30 keys (one split; several, merged by the
    last to finish; one whose last split is empty), GQA groups of 4 and 7 query heads, q as a
    strided view, against one fp32 attention over each row's keys; the counts back at 0 (a
    graph replays the launch); a second launch gives the same output."""
    from dendrite.attention.split_decode import SplitDecode

    torch.manual_seed(6)
    out = {"split_decode_err": 0.0, "split_decode_counts_zero": 1.0, "split_decode_again": 1.0}
    P, D, Hkv, N = 4, 16, 2, 48
    lens = [1, 4, 5, 17, 30, 36]  # 36 keys: 9 pages in 4 splits of 3 (min 2 pages): the last empty
    pages = torch.randperm(N)[: sum(-(-n // P) for n in lens)].tolist()
    counts = [-(-n // P) for n in lens]
    indptr = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
    last = torch.tensor([n - (c - 1) * P for n, c in zip(lens, counts, strict=True)])
    for hq in (8, 14):
        kv = torch.randn(N, 2, P, Hkv, D).to(DT)
        q = torch.randn(len(lens), hq, 2 * D).to(DT)[:, :, :D]
        sd = SplitDecode(hq, Hkv, D, len(lens), "cpu", max_splits=4, min_pages=2)
        args = (kv, indptr, torch.tensor(pages, dtype=torch.int32), last.to(torch.int32))
        got = sd.run(q, *args)
        out["split_decode_counts_zero"] *= float(not sd.count.any())
        out["split_decode_again"] *= float(torch.equal(sd.run(q, *args), got))
        for r, n in enumerate(lens):
            rows = torch.cat([kv[p] for p in pages[indptr[r] : indptr[r + 1]]], dim=1)[:, :n]
            want = _attend_ref(q[r], rows[0], rows[1])[0]
            out["split_decode_err"] = max(out["split_decode_err"], rel(got[r], want))
    return out


def prefix_depths() -> dict[str, float]:
    """Levels by depth: a tree whose rows share a root prefix, two subtrees sharing more
    pages under it and a sub-subtree under one of them, split by ``split_shared_prefixes``
    (``max_depth=3``), its tables built as the backend builds them (one tile table over every
    depth's groups, a mask per depth), against one attention over each row's whole page list;
    and the same step as a two-level cascade (``max_depth=1``)."""
    from dendrite.attention import shared_prefix as sp
    from dendrite.attention.cascade import split_shared_prefixes

    torch.manual_seed(7)
    P, D, Hkv, N, hq = 4, 16, 2, 48, 8
    i32 = torch.int32
    root, x, y, x2 = [3, 17, 8], [22, 5], [30, 11, 40], [41]
    lists = [
        root + x + x2 + [1], root + x + x2 + [2, 4], root + x + [6], root + x + [7],
        root + y + [9, 10], root + y + [12], [*root, 13], [*root, 14, 15],
    ]  # fmt: skip
    lens = [(len(p) - 1) * P + n for p, n in zip(lists, [3, 2, 1, 4, 3, 2, 4, 1], strict=True)]
    kv = torch.randn(N, 2, P, Hkv, D).to(DT)
    q = torch.randn(8, hq, 2 * D).to(DT)[:, :, :D]
    kern = sp.CascadeKernels(hq, Hkv, sm_count=4)
    kern.block_m0, kern.rows0 = 16, sp.rows_per_tile(hq, Hkv, 16)  # groups over tiles
    want = torch.empty(8, hq, D)
    for r in range(8):
        keys = torch.cat([kv[p] for p in lists[r]], dim=1)[:, : lens[r]]
        want[r] = _attend_ref(q[r], keys[0], keys[1])[0]
    out: dict[str, float] = {}
    for depth in (3, 1):
        split = split_shared_prefixes(lists, max_depth=depth)
        assert split is not None
        own = split.level1(lists)
        indptr1 = torch.tensor([0, *itertools.accumulate(len(o) for o in own)], dtype=i32)
        last1 = torch.tensor([(n - 1) % P + 1 for n in lens], dtype=i32)
        tiles1 = torch.tensor(kern.tiles1(8), dtype=i32)
        level1 = (tiles1, indptr1, torch.tensor([p for o in own for p in o], dtype=i32), last1, 2)
        G, L = len(split.groups), split.depths
        tiles0 = torch.tensor(kern.tiles0(split.ranges(), kern.num_tiles0(8, G, L)), dtype=i32)
        kvp0 = torch.tensor([0, *itertools.accumulate(len(g.pages) for g in split.groups)])
        ind0 = torch.tensor([p for g in split.groups for p in g.pages], dtype=i32)
        level0 = (tiles0, kvp0.to(i32), ind0, torch.full((G,), P, dtype=i32), 2, L, 16)
        mask = torch.tensor(split.masks(), dtype=i32)  # [L, 8]
        got = kern.run(q, kv, level1, level0, mask)
        out[f"depths{depth}_err"] = rel(got, want)
        out[f"depths{depth}_levels"] = L
        out[f"depths{depth}_groups"] = G
        out[f"depths{depth}_saved"] = split.saved_pages
    return out


def prefix_fp32() -> dict[str, float]:
    """The same kernels over an fp32 pool (the float32 mode's graph decode): the cascade of
    both levels, and a plain step as level 1 alone over each row's whole page list
    (``CascadeKernels.run_one``), both against one attention in fp32; blocks of keys sized
    for 4-byte elements."""
    from dendrite.attention import shared_prefix as sp

    torch.manual_seed(6)
    P, D, Hkv, N, hq = 4, 16, 2, 40, 8
    i32, f32 = torch.int32, torch.float32
    kv = torch.randn(N, 2, P, Hkv, D, dtype=f32)
    q = torch.randn(4, hq, 2 * D, dtype=f32)[:, :, :D]  # strided rows
    shared, own, own_len = [3, 17, 8], [[1], [2, 4], [6], [7, 9]], [3, 6, 1, 5]
    kern = sp.CascadeKernels(hq, Hkv, sm_count=4, head_dim=D, itemsize=4)
    wide = sp.CascadeKernels(hq, Hkv, sm_count=4, head_dim=128, itemsize=4)
    last = torch.tensor(
        [n - (len(o) - 1) * P for n, o in zip(own_len, own, strict=True)], dtype=i32
    )

    def table(lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        indptr = torch.tensor([0, *itertools.accumulate(len(x) for x in lists)], dtype=i32)
        return indptr, torch.tensor([p for x in lists for p in x], dtype=i32)

    tiles1 = torch.tensor(kern.tiles1(4), dtype=i32)
    level1 = (tiles1, *table(own), last, 2)
    n0 = kern.num_tiles0(4, 1)
    tiles0 = torch.tensor(kern.tiles0([(0, 4, 0)], n0), dtype=i32)
    level0 = (tiles0, *table([shared]), torch.tensor([P], dtype=i32), 2, 1, kern.block_n0)
    mask = torch.ones(4, dtype=i32)
    # each launch's tl.dot precision (the interpreter computes fp32 whatever it is)
    with Calls(sp, "_partials_kernel", flag="PREC") as launches:
        cascade = kern.run(q, kv, level1, level0, mask)
        plain = kern.run_one(q, kv, (tiles1, *table([shared + o for o in own]), last, 3))
        bf16 = sp.Level(*level0[:6], block_n=level0[6])
        sp.level_partials(q.to(DT), kv.to(DT), [bf16], Hkv)  # bf16: the default
    want = torch.empty(4, hq, D)
    for r in range(4):
        keys = torch.cat([kv[p] for p in shared + own[r]], dim=1)[:, : len(shared) * P + own_len[r]]
        want[r] = _attend_ref(q[r], keys[0], keys[1])[0]
    return {
        "prefix_fp32_err": rel(cascade, want),
        "prefix_fp32_plain_err": rel(plain, want),
        "prefix_fp32_dtype": float(cascade.dtype == plain.dtype == f32),
        "prefix_fp32_block_n": float(kern.block_n0 == 64 and wide.block_n0 == 32),
        "prefix_fp32_tf32x3": float(
            launches.values == ["tf32x3", "tf32x3", None]
        ),  # 2 fp32, 1 bf16
    }


def decode(family: str, tmp: Path) -> dict[str, float]:
    """Greedy decode, one branch, GEMV path against the plain path on the same weights."""
    path = make_random_checkpoint(
        tmp / family, family, seed=3, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    fast = Engine.from_pretrained(path, dtype=DT)
    plain = Engine.from_pretrained(path, dtype=DT)
    assert fast.model.use_gemv_kernels(require_cuda=False)
    fast._fused_pick = True  # the greedy pick in Triton too (on CUDA: by default)
    with Calls(gemv_module, "gemv", flag="kv") as calls:  # kv: the QKV kernel's append
        greedy = SamplingParams(max_new_tokens=8, ignore_eos=True)
        prompt = [1, *range(5, 25)]
        bf, bp = fast.add(prompt, greedy), plain.add(prompt, greedy)
        fast.prefill([bf])
        plain.prefill([bp])
        worst, worst_lp, same = 0.0, 0.0, 0
        for _ in range(8):
            (of,), (op,) = fast.step([bf], keep_logits=True), plain.step([bp], keep_logits=True)
            assert of.logits is not None and op.logits is not None
            worst = max(worst, rel(of.logits, op.logits))
            worst_lp = max(worst_lp, abs(of.logprob - op.logprob))
            same += of.token == op.token
            if of.token != op.token:
                break
    fast.check_integrity()
    layers = fast.model_config.num_layers
    return {f"{family}/logits": worst, f"{family}/same_tokens": same,
            f"{family}/logprob": worst_lp,
            f"{family}/gemv_calls_per_step": calls.n / max(1, same), f"{family}/layers": layers,
            f"{family}/kv_appends_per_step": calls.flagged / max(1, same)}  # fmt: skip


def skinny() -> dict[str, float]:
    """The split-K GEMM and the add + RMSNorm against torch in fp32, rounded where the kernels
    round: row counts 1-64, tiles of 1-8 K slices (a slice cut short), bias, the SiLU
    prologue, fp32 output, a strided x; the arrival counters back at 0 after each launch."""
    torch.manual_seed(1)
    n, k, eps = 200, 600, 1e-5
    w, b = torch.randn(n, k, dtype=DT), torch.randn(n, dtype=DT)
    out: dict[str, float] = {}
    tiles = (None, Tile(64, 64, 1, 4, 1), Tile(32, 128, 3, 4, 1), Tile(64, 32, 8, 4, 1))
    for m in (1, 5, 20, 64):
        x = torch.randn(m, k, dtype=DT)
        want = F.linear(x.float(), w.float(), b.float())
        out[f"skinny_rows_{m}"] = max(
            rel(skinny_module.matmul(x, w, b, tile=t), want) for t in tiles
        )
    out["skinny_counters_zero"] = float(not skinny_module.counters(torch.device("cpu"), 1).any())
    x = torch.randn(7, k, dtype=DT)
    one, split = Tile(64, 64, 1, 4, 1), Tile(64, 64, 3, 4, 1)
    y1, y3 = skinny_module.matmul(x, w, b, tile=one), skinny_module.matmul(x, w, b, tile=split)
    out["skinny_split_vs_whole"] = rel(y3, y1)  # summation order only
    gu = torch.randn(7, 2 * k, dtype=DT)
    act = (F.silu(gu[:, :k].float()) * gu[:, k:].float()).to(DT)
    y = skinny_module.matmul(gu, w, prologue="silu", tile=Tile(64, 64, 2, 4, 1))
    out["skinny_silu"] = rel(y, F.linear(act.float(), w.float()))
    y32 = skinny_module.matmul(x, w, b, tile=one, out_dtype=torch.float32)
    out["skinny_fp32_equal"] = float(y32.dtype == torch.float32 and torch.equal(y32, y1.float()))
    xs = torch.randn(7, k + 40, dtype=DT)[:, :k]  # row stride k + 40
    out["skinny_strided"] = rel(
        skinny_module.matmul(xs, w, b), F.linear(xs.float(), w.float(), b.float())
    )
    # the gate/up projection with the SiLU-and-mul fused in: each half rounded, then combined
    wgu, bgu = torch.randn(2 * 100, k, dtype=DT), torch.randn(2 * 100, dtype=DT)
    out["swiglu"] = 0.0
    for m in (1, 20, 64):
        x = torch.randn(m, k, dtype=DT)
        gu = F.linear(x.float(), wgu.float(), bgu.float()).to(DT).float()
        want = (F.silu(gu[:, :100]) * gu[:, 100:]).to(DT)
        for t in (None, Tile(32, 64, 1, 4, 1)):
            got = skinny_module.swiglu(x, wgu, bgu, tile=t)
            out["swiglu"] = max(out["swiglu"], rel(got, want))
    w32, b32, x32 = wgu.float(), bgu.float(), torch.randn(20, k)  # fp32: nothing rounds
    gu = F.linear(x32, w32, b32)
    out["swiglu_fp32"] = rel(skinny_module.swiglu(x32, w32, b32), F.silu(gu[:, :100]) * gu[:, 100:])
    out["swiglu_no_bias"] = rel(
        skinny_module.swiglu(x, wgu),
        (F.silu(F.linear(x.float(), wgu[:100].float()).to(DT).float())
         * F.linear(x.float(), wgu[100:].float()).to(DT).float()).to(DT),
    )  # fmt: skip
    out.update(_skinny_fused_norms(n, k, eps))
    r, g = torch.randn(7, n, dtype=DT), torch.randn(n, dtype=DT)
    r_before = r.clone()
    h = skinny_module.add_norm(y1, r, g, eps=eps)
    s = r_before.float() + y1.float()
    out["add_norm_residual"] = rel(r, s)
    out["add_norm"] = rel(h, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps) * g.float())
    r_now = r.clone()
    h = skinny_module.add_norm(None, r, g, eps=eps)
    out["norm_keeps_residual"] = float(torch.equal(r, r_now))
    rf = r_now.float()
    out["norm"] = rel(h, rf * torch.rsqrt(rf.pow(2).mean(-1, keepdim=True) + eps) * g.float())
    return out


def _skinny_fused_norms(n: int, k: int, eps: float) -> dict[str, float]:
    """fp32 (the engine's use): ``matmul_add`` adds into the residual in place and returns its
    rows' sums of squares by feature block, whatever the K slices; ``matmul_norm`` normalises
    as it loads and equals RMSNorm, then the GEMM; the pair equals add_norm between two
    GEMMs."""
    out: dict[str, float] = {}
    w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(6, k)
    worst_r = worst_ss = 0.0
    for t in (Tile(64, 64, 1, 4, 1), Tile(32, 128, 3, 4, 1)):
        r = torch.randn(6, n)
        want = r + F.linear(x, w, b)
        ss = skinny_module.matmul_add(x, w, r, b, tile=t)
        blocks = -(-n // t.bn)
        out[f"add_shape_{t.bn}"] = float(tuple(ss.shape) == (blocks, 6))
        worst_r = max(worst_r, rel(r, want))
        by_block = torch.stack(
            [(want[:, i * t.bn : (i + 1) * t.bn] ** 2).sum(-1) for i in range(blocks)]
        )
        worst_ss = max(worst_ss, rel(ss, by_block))
    out["add_residual"], out["add_sumsq"] = worst_r, worst_ss
    gu = torch.randn(6, 2 * k)
    r = torch.randn(6, n)
    want = r + F.linear(F.silu(gu[:, :k]) * gu[:, k:], w)
    skinny_module.matmul_add(gu, w, r, prologue="silu", tile=Tile(64, 64, 2, 4, 1))
    out["add_silu"] = rel(r, want)
    # the norm prologue: a [6, n] residual's RMSNorm, then an [m2, n] weight
    w2, g = torch.randn(150, n), torch.randn(n)
    r = torch.randn(6, n)
    normed = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + eps) * g
    want = F.linear(normed, w2)
    worst = 0.0
    for bn in (64, 32):  # sums of squares from blocks of bn features
        parts = torch.stack([(r[:, i : i + bn] ** 2).sum(-1) for i in range(0, n, bn)])
        for t in (None, Tile(64, 64, 3, 4, 1)):
            y = skinny_module.matmul_norm(r, skinny_module.NormIn(parts, g, eps), w2, tile=t)
            worst = max(worst, rel(y, want))
    out["norm_prologue"] = worst
    # o projection + add_norm + gate/up against the fused pair on the same inputs
    r1 = torch.randn(6, n)
    r2 = r1.clone()
    y = skinny_module.matmul(x, w, b)
    h = skinny_module.add_norm(y, r1, g, eps=eps)
    plain = skinny_module.matmul(h, w2)
    ss = skinny_module.matmul_add(x, w, r2, b)
    fused = skinny_module.matmul_norm(r2, skinny_module.NormIn(ss, g, eps), w2)
    out["fused_vs_add_norm"] = rel(fused, plain)
    out["fused_residual_equal"] = float(torch.equal(r1, r2))
    return out


def rope_kv() -> dict[str, float]:
    """``rope_append`` on 5 rows of a [T, Hq + 2 Hkv, D] projection with a row stride past
    its heads: q and k rotated as ``rope_ref`` does (each row at its own position), q in
    place, k and v bit for bit in the one slot each row names, every other slot untouched;
    bad shapes refused before anything is written."""
    torch.manual_seed(4)
    hq, hkv, d, P, T = 6, 2, 16, 4, 5  # 10 heads: the kernel's block of 16 has padding
    heads = hq + 2 * hkv
    qkv = torch.randn(T, heads * d + 8, dtype=DT)[:, : heads * d].view(T, heads, d)
    before = qkv.clone()
    pos = torch.tensor([0, 3, 7, 12, 30])
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    freqs = torch.arange(64).float()[:, None] * inv[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    pages = torch.randn(6, 2, P, hkv, d, dtype=DT)
    pages_before = pages.clone()
    page, slot = torch.tensor([5, 0, 3, 3, 1]), torch.tensor([2, 0, 1, 3, 3])
    q = rope_kv_module.rope_append(qkv, pos, cos_sin, pages, page, slot, hq, hkv)
    out: dict[str, float] = {"rope_kv_q_is_view": float(q.data_ptr() == qkv.data_ptr())}
    want = torch.stack(
        [rope_ref(before[t].view(1, -1), int(pos[t]), d, (hq + hkv) * d)[0] for t in range(T)]
    ).view(T, heads, d)  # fp32, rotated q and k, v as it was
    out["rope_kv_q"] = rel(qkv[:, :hq], want[:, :hq])
    out["rope_kv_unrotated_rest"] = float(torch.equal(qkv[:, hq:], before[:, hq:]))
    k_got = pages[page, 0, slot]  # [T, Hkv, D]
    out["rope_kv_k"] = rel(k_got, want[:, hq : hq + hkv])
    out["rope_kv_v"] = float(torch.equal(pages[page, 1, slot], before[:, hq + hkv :]))
    touched = torch.zeros(6, 2, P, dtype=torch.bool)
    touched[page, :, slot] = True
    out["rope_kv_rest_untouched"] = float(torch.equal(pages[~touched], pages_before[~touched]))
    refused = 0
    for bad in (
        lambda: rope_kv_module.rope_append(qkv, pos, cos_sin, pages, page, slot, hq, hkv + 1),
        lambda: rope_kv_module.rope_append(qkv, pos[:4], cos_sin, pages, page, slot, hq, hkv),
        lambda: rope_kv_module.rope_append(qkv, pos, cos_sin.to(DT), pages, page, slot, hq, hkv),
        lambda: rope_kv_module.rope_append(
            qkv, pos, cos_sin, pages[:, :, :, :1], page, slot, hq, hkv
        ),
        lambda: rope_kv_module.rope_append(
            qkv, pos, torch.cat((cos_sin, cos_sin), 1)[:, :d], pages, page, slot, hq, hkv
        ),  # a strided table
        lambda: rope_kv_module.rope_append(
            qkv, pos, cos_sin, torch.zeros(6, 3, P, hkv, d, dtype=DT), page, slot, hq, hkv
        ),  # not [N, 2, P, Hkv, D]
    ):
        snapshot = (qkv.clone(), pages.clone())
        try:
            bad()
        except ValueError:
            refused += int(torch.equal(qkv, snapshot[0]) and torch.equal(pages, snapshot[1]))
    out["rope_kv_refused"] = refused
    # rope_inplace (a float32 prompt's RoPE): q and k rotated in place, v untouched, fp32
    qkv32 = before.float().clone()
    q, k, v = rope_kv_module.rope_inplace(qkv32, pos, cos_sin, hq, hkv)
    out["rope_inplace_views"] = float(
        q.data_ptr() == qkv32.data_ptr() and tuple(k.shape) == (T, hkv, d) and v.shape[1] == hkv
    )
    out["rope_inplace_qk"] = rel(qkv32[:, : hq + hkv], want[:, : hq + hkv])
    out["rope_inplace_v"] = float(torch.equal(qkv32[:, hq + hkv :], before[:, hq + hkv :].float()))
    try:
        rope_kv_module.rope_inplace(qkv32, pos[:4], cos_sin, hq, hkv)
        out["rope_inplace_refused"] = 0.0
    except ValueError:
        out["rope_inplace_refused"] = 1.0
    return out


class _TorchFI:
    """FlashInfer's three small kernels of the fused forward, in torch (CPU has no FlashInfer):
    RMSNorm, the residual add + RMSNorm in place, SiLU-and-mul; each rounds once as theirs."""

    class norm:
        @staticmethod
        def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, **_: object) -> torch.Tensor:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(
                x.dtype
            )

        @staticmethod
        def fused_add_rmsnorm(
            x: torch.Tensor, r: torch.Tensor, w: torch.Tensor, eps: float, **_: object
        ) -> None:
            r.copy_((r.float() + x.float()).to(r.dtype))
            x.copy_(_TorchFI.norm.rmsnorm(r, w, eps))

    class activation:
        @staticmethod
        def silu_and_mul(x: torch.Tensor, **_: object) -> torch.Tensor:
            d = x.shape[-1] // 2
            return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


def mid_rows(tmp: Path) -> dict[str, float]:
    """The fused forward of a 20-row decode step with the 17-64-row kernel (``swiglu``)
    against the same forward without it: the wiring on CPU, FlashInfer's small kernels
    stood in by torch."""
    from dendrite.model.transformer import _NoAttentionSlots

    path = make_random_checkpoint(
        tmp / "mid", "llama", seed=5, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    model = Engine.from_pretrained(path, dtype=DT).model
    model._fi = _TorchFI
    out = {"mid/on": float(model.use_skinny_kernels(require_cuda=False) and model.swiglu_kernels)}
    cfg, cpu = model.config, torch.device("cpu")
    ids, pos = torch.arange(1, 21), torch.arange(20) + 5
    slots = _NoAttentionSlots(cfg, 20, DT, cpu)
    with Calls(skinny_module, "swiglu") as calls:
        got = model._forward_flashinfer(ids, pos, slots, None)
    model._mid_rows = False
    plain_slots = _NoAttentionSlots(cfg, 20, DT, cpu)
    want = model._forward_flashinfer(ids, pos, plain_slots, None)
    out["mid/logits"] = rel(got, want)
    out["mid/pages"] = rel(slots.pages, plain_slots.pages)  # the last layer's K/V
    out["mid/swiglu_calls"] = float(calls.n)
    return out


def rope_kv_guards(tmp: Path) -> dict[str, float]:
    """Where the RoPE + append kernel cannot serve, decode steps keep torch's (or FlashInfer's)
    RoPE: a head dim that is not a power of two (24) never turns it on, and a kernel that
    fails the enable-time check is switched off with a warning, the skinny path staying on."""
    out: dict[str, float] = {}
    odd = make_random_checkpoint(
        tmp / "hd24", "llama", seed=3, hidden_size=48, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    fast, plain = Engine.from_pretrained(odd, dtype=DT), Engine.from_pretrained(odd, dtype=DT)
    out["guard/hd24_rope_kv"] = float(fast.model.rope_kv)
    out["guard/hd24_skinny"] = float(fast.model.use_skinny_kernels(require_cuda=False))
    bf = [fast.add([1, *range(5 + i, 12 + i)]) for i in range(3)]
    bp = [plain.add([1, *range(5 + i, 12 + i)]) for i in range(3)]
    fast.prefill(bf)
    plain.prefill(bp)
    out["guard/hd24_logits"] = rel(fast.forward(bf), plain.forward(bp))  # a 3-row decode step
    path = make_random_checkpoint(
        tmp / "hd16", "llama", seed=3, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    engine = Engine.from_pretrained(path, dtype=DT)
    out["guard/hd16_rope_kv_before"] = float(engine.model.rope_kv)
    real = rope_kv_module.rope_append

    def broken(*args: object, **kw: object) -> torch.Tensor:
        raise RuntimeError("this kernel cannot run here")

    rope_kv_module.rope_append = broken  # type: ignore[assignment]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["guard/broken_skinny"] = float(engine.model.use_skinny_kernels(require_cuda=False))
    finally:
        rope_kv_module.rope_append = real
    out["guard/broken_rope_kv"] = float(engine.model.rope_kv)
    out["guard/broken_warned"] = float(any("RoPE + KV append" in str(w.message) for w in caught))
    return out


def skinny_decode(family: str, tmp: Path, dtype: torch.dtype = DT) -> dict[str, float]:
    """Steps of 3 and 12 rows on the skinny path against the plain path, both fed the plain
    path's greedy tokens; which steps take the path (2-16 rows: a short prompt step too, not
    a 17-row step nor a long prompt, which take ``gemm32`` in fp32). Keys ``skinny/{family}``
    (bf16) or ``skinny/{family}-fp32``."""
    path = make_random_checkpoint(
        tmp / f"skinny-{family}", family, seed=3, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    fast = Engine.from_pretrained(path, dtype=dtype)
    plain = Engine.from_pretrained(path, dtype=dtype)
    assert fast.model.use_skinny_kernels(require_cuda=False)
    if dtype == torch.float32:
        family += "-fp32"
    # the GEMMs: skinny.matmul, and fp32's matmul_add / matmul_norm (norms inside the GEMMs)
    gemms = [Calls(skinny_module, f) for f in ("matmul", "matmul_add", "matmul_norm")]
    wide = Calls(gemm32_module, "matmul")
    ropes = Calls(rope_kv_module, "rope_append")
    norms = Calls(skinny_module, "add_norm")
    precs = Calls(skinny_module, "_skinny_kernel", flag="PREC")  # each launch's tl.dot precision
    worst, same, total = 0.0, 0, 0

    def n_gemms() -> int:
        return sum(c.n for c in gemms)

    for rows in (3, 12):
        bf = [fast.add([1, *range(5 + i, 25 + i)]) for i in range(rows)]
        bp = [plain.add([1, *range(5 + i, 25 + i)]) for i in range(rows)]
        fast.prefill(bf)  # 60 and 240 prompt tokens: the cuBLAS path (fp32: gemm32)
        plain.prefill(bp)
        for _ in range(4):
            with contextlib.ExitStack() as calls:
                for c in (*gemms, ropes, precs, norms):
                    calls.enter_context(c)
                lf = fast.forward(bf)
            lp = plain.forward(bp)
            worst = max(worst, rel(lf, lp))
            same += int((lf.argmax(-1) == lp.argmax(-1)).sum())
            total += rows
            for a, c, t in zip(bf, bp, lp.argmax(-1).tolist(), strict=True):
                fast.extend(a, [t])
                plain.extend(c, [t])
        fast.free_all()
        plain.free_all()
    counted: dict[str, float] = {
        f"skinny/{family}/calls_per_forward": n_gemms() / 8,
        f"skinny/{family}/add_norms_per_forward": norms.n / 8,
        f"skinny/{family}/fused_norm_calls": sum(c.n for c in gemms[1:]) / 8,
        f"skinny/{family}/rope_appends_per_forward": ropes.n / 8,
        f"skinny/{family}/launches": precs.n,
        f"skinny/{family}/prec_tf32x3": float(precs.values == ["tf32x3"] * precs.n),
        f"skinny/{family}/prec_default": float(precs.values == [None] * precs.n),
    }
    inplace = Calls(rope_kv_module, "rope_inplace")
    counted[f"skinny/{family}/rope_prompts"] = float(fast.model._rope_prompts)
    for label, sizes in (("prompt_240", [240]), ("short_prompts", [5, 6]), ("rows_17", [1] * 17)):
        branches = [fast.add([1, *range(7, 6 + n)]) for n in sizes]
        for c in (*gemms, wide, inplace):
            c.n = 0
        with contextlib.ExitStack() as calls:
            for c in (*gemms, wide, inplace):
                calls.enter_context(c)
            lf = fast.forward(branches)
        lp = plain.forward([plain.add([1, *range(7, 6 + n)]) for n in sizes])
        worst = max(worst, rel(lf, lp))
        counted[f"skinny/{family}/{label}_calls"] = n_gemms()
        counted[f"skinny/{family}/{label}_gemm32_calls"] = wide.n
        counted[f"skinny/{family}/{label}_rope_inplace"] = inplace.n
        fast.free_all()
        plain.free_all()
    fast.check_integrity()
    return {
        f"skinny/{family}/logits": worst, f"skinny/{family}/same_frac": same / total,
        f"skinny/{family}/layers": fast.model_config.num_layers, **counted,
    }  # fmt: skip


if __name__ == "__main__":
    result = {
        **kernels(),
        **skinny(),
        **rope_kv(),
        **greedy(),
        **sampled(),
        **merge(),
        **prefix(),
        **prefix_fp32(),
        **prefix_depths(),
        **split_decode(),
    }
    with tempfile.TemporaryDirectory() as d:
        for fam in ("llama", "qwen2"):
            result.update(decode(fam, Path(d)))
            result.update(skinny_decode(fam, Path(d)))
        result.update(skinny_decode("llama", Path(d), torch.float32))
        result.update(rope_kv_guards(Path(d)))
        result.update(mid_rows(Path(d)))
    json.dump(result, sys.stdout)
    print()
