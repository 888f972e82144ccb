"""Level 0 of the cascade in Triton: a shared prefix read once for all its queries, split-KV.

Level 0 of a cascade (``cascade.py``) attends every decode row of a group to the group's
shared pages (every shared depth's groups in one table). FlashInfer runs it as a non-causal
prefill with one request per group: for 64 branches over a 4,096-token prompt (TinyLlama
shape) that is 14 us a layer on the H200, plus 11 us for the merge of its own split-KV states (``PersistentVariableLengthMergeStates``),
a quarter of the tree's decode step. This kernel writes its split states for the cascade's
merge (``merge.merge_states``) to combine with level 1 in the same pass, so the split-KV
merge costs nothing extra; level 1 runs through it too (:class:`CascadeKernels`).

Work is cut three ways: a *tile* of ``TB`` consecutive rows of one group times the ``GROUP``
query heads that share a KV head (``BLOCK_M = TB x GROUP`` query rows: GQA's heads packed into
rows, so each K/V block loaded serves all of them), one KV head, and one of ``S`` *splits* of
the group's pages::

    program (tile t, split s, kv head h):
        rows  r0 .. r0 + n of group g = tiles[t]      pages  [kvp[g], kvp[g+1]) cut in S
        q  [TB x GROUP, D]  x  K^T of the split's pages (BLOCK_N keys a block, online softmax)
        -> o_part[s, r, h*GROUP + j]  (normalised)   lse_part[s, r, h*GROUP + j] (base 2)

A split with no pages writes ``lse = -inf`` (weight 0 in the merge). A group's last page holds
``LAST[g]`` tokens (P at level 0: a branch's last page is never shared). The tile
table (group, first row, rows, depth: states at ``depth x S + s``) is built on the host per
step (:func:`tile_table`); a CUDA graph fixes its length, and tiles past the step's last are
empty (0 rows).

Imported only on CUDA (Triton ships with torch there) or in Triton's CPU interpreter (tests).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from dendrite.attention.merge import merge_states

LOG2E = 1.4426950408889634
# Triton's CPU interpreter misreads bf16 operands of tl.dot (3.9): there the kernel feeds it
# the same values in fp32 (products of bf16 values are exact in fp32 either way)
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _prefix_tile(
    t,
    s,
    h,
    Q,
    KV,
    TILES,
    KVP,
    IND,
    LAST,
    O_PART,
    S_PART,
    sq_b,
    sq_h,
    s_page,
    s_half,
    s_tok,
    so_s,
    so_b,
    ss_s,
    ss_b,
    num_tiles,
    S,
    scale_log2,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """One program's work: tile ``t``, split ``s``, KV head ``h`` of one level."""
    g = tl.load(TILES + t)
    r0 = tl.load(TILES + num_tiles + t)
    rows = tl.load(TILES + 2 * num_tiles + t)
    slot = (s + S * tl.load(TILES + 3 * num_tiles + t)).to(tl.int64)  # depth d: states d*S + s
    if rows > 0:
        m = tl.arange(0, BLOCK_M)
        m_ok = m < rows * GROUP
        b = r0 + m // GROUP
        hq = h * GROUP + m % GROUP
        d = tl.arange(0, D)
        q = tl.load(
            Q + b.to(tl.int64)[:, None] * sq_b + hq[:, None] * sq_h + d[None, :],
            mask=m_ok[:, None], other=0.0,
        )  # fmt: skip
        if UPCAST:
            q = q.to(tl.float32)
        first = tl.load(KVP + g)
        pages = tl.load(KVP + g + 1) - first
        total = (pages - 1) * P + tl.load(LAST + g)  # keys of the group (its last page: LAST)
        per_split = tl.cdiv(pages, S)
        p0 = tl.minimum(s * per_split, pages)
        keys = tl.maximum(tl.minimum((p0 + per_split) * P, total) - p0 * P, 0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        n = tl.arange(0, BLOCK_N)
        for start in range(0, keys, BLOCK_N):
            key = start + n
            k_ok = key < keys
            page = tl.load(IND + first + p0 + key // P, mask=k_ok, other=0).to(tl.int64)
            at = page * s_page + (key % P) * s_tok + h * D
            k = tl.load(KV + at[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
            v = tl.load(KV + s_half + at[:, None] + d[None, :], mask=k_ok[:, None], other=0.0)
            if UPCAST:  # the interpreter's tl.dot misreads bf16: the same values in fp32
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * scale_log2  # base 2
            qk = tl.where(k_ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            pv = tl.dot(p.to(KV.dtype.element_ty).to(v.dtype), v, input_precision=PREC)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        has = keys > 0
        inv = tl.where(has, 1.0 / l_i, 0.0)
        o = acc * inv[:, None]
        lse = tl.where(has, m_i + tl.log2(l_i), float("-inf"))
        row = b.to(tl.int64) * so_b + hq * D
        tl.store(O_PART + slot * so_s + row[:, None] + d[None, :], o, mask=m_ok[:, None])
        tl.store(S_PART + slot * ss_s + b.to(tl.int64) * ss_b + hq, lse, mask=m_ok)


@triton.jit
def _partials_kernel(
    Q,
    KV,
    sq_b,
    sq_h,
    s_page,
    s_half,
    s_tok,
    scale_log2,
    HKV,
    TILES_A,
    KVP_A,
    IND_A,
    LAST_A,
    O_A,
    S_A,
    soa_s,
    soa_b,
    ssa_s,
    ssa_b,
    tiles_a,
    splits_a,
    TILES_B,
    KVP_B,
    IND_B,
    LAST_B,
    O_B,
    S_B,
    sob_s,
    sob_b,
    ssb_s,
    ssb_b,
    tiles_b,
    splits_b,
    GROUP: tl.constexpr,
    BM_A: tl.constexpr,
    BN_A: tl.constexpr,
    BM_B: tl.constexpr,
    BN_B: tl.constexpr,
    P: tl.constexpr,
    D: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    TWO: tl.constexpr,
):
    """Level A's programs (tile fastest, then split, then KV head), then, with ``TWO``, level
    B's, in one flat grid: B's short programs fill the SMs as A's finish."""
    pid = tl.program_id(0)
    n_a = tiles_a * splits_a * HKV
    if pid < n_a:
        _prefix_tile(
            pid % tiles_a, (pid // tiles_a) % splits_a, pid // (tiles_a * splits_a), Q, KV,
            TILES_A, KVP_A, IND_A, LAST_A, O_A, S_A, sq_b, sq_h, s_page, s_half, s_tok, soa_s,
            soa_b, ssa_s, ssa_b, tiles_a, splits_a, scale_log2, GROUP=GROUP, BLOCK_M=BM_A,
            BLOCK_N=BN_A, P=P, D=D, UPCAST=UPCAST, PREC=PREC,
        )  # fmt: skip
    elif TWO:
        b = pid - n_a
        _prefix_tile(
            b % tiles_b, (b // tiles_b) % splits_b, b // (tiles_b * splits_b), Q, KV, TILES_B,
            KVP_B, IND_B, LAST_B, O_B, S_B, sq_b, sq_h, s_page, s_half, s_tok, sob_s, sob_b,
            ssb_s, ssb_b, tiles_b, splits_b, scale_log2, GROUP=GROUP, BLOCK_M=BM_B,
            BLOCK_N=BN_B, P=P, D=D, UPCAST=UPCAST, PREC=PREC,
        )  # fmt: skip


def rows_per_tile(num_heads: int, num_kv_heads: int, block_m: int) -> int:
    """Decode rows in one tile: ``block_m`` query rows hold this many rows' GQA groups."""
    return max(1, block_m // (num_heads // num_kv_heads))


def max_tiles(batch: int, groups: int, tile_rows: int, depths: int = 1) -> int:
    """Tiles a step of ``batch`` rows in ``groups`` groups over ``depths`` levels can need (the
    groups of one depth are disjoint rows; each group's end can cut one tile short)."""
    return depths * -(-batch // tile_rows) + groups


def tile_table(groups: Sequence[tuple[int, int, int]], tile_rows: int, length: int) -> list[int]:
    """The flat int32 table [4 x length]: each tile's group, first row, rows (0: empty) and
    depth (where its split states go: ``depth * splits + split``).

    ``groups`` [G]: each group's rows ``start .. end - 1`` and depth, in group order."""
    out = [0] * (4 * length)
    t = 0
    for g, (start, end, depth) in enumerate(groups):
        for r in range(start, end, tile_rows):
            if t == length:
                raise ValueError(f"tile_table: the tiles of {list(groups)} exceed {length}")
            out[t], out[length + t], out[3 * length + t] = g, r, depth
            out[2 * length + t] = min(tile_rows, end - r)
            t += 1
    return out


def num_splits(tiles: int, num_kv_heads: int, sm_count: int) -> int:
    """Splits of each group's pages: enough programs for about two waves, a power of two (the
    merge is compiled per split count) up to 16."""
    want = -(-2 * sm_count // max(1, tiles * num_kv_heads))
    return min(16, triton.next_power_of_2(max(1, want)))


class Level(NamedTuple):
    """One level's launch: its tile table [4 x tiles] (:func:`tile_table`), the groups' page
    ranges ``kv_indptr`` [G+1] and pages ``kv_indices``, the tokens in each group's last page
    ``last_page_len`` [G], the splits of each group's pages, the depths its groups span (the
    shared levels run as one launch: ``depths x splits`` states), query rows and keys a block."""

    tiles: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    last_page_len: torch.Tensor
    splits: int
    depths: int = 1
    block_m: int = 64
    block_n: int = 128


def level_partials(
    q: torch.Tensor,
    kv: torch.Tensor,
    levels: Sequence[Level],
    num_kv_heads: int,
    *,
    num_warps: int = 4,
    num_stages: int = 2,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each level's split states of every row, one kernel launch for one or two levels:
    (o [L x S, T, Hq, D] fp32, lse [L x S, T, Hq] fp32, base 2) per level of ``L`` depths.

    ``q`` [T, Hq, D] (rows and heads may be strided, D contiguous); ``kv`` a layer's pages
    [N, 2, P, Hkv, D] (contiguous); the levels' tables on the device (:class:`Level`; P
    tokens in level 0's last pages: whole pages). Rows no tile of a level covers are left
    unwritten in its states (in a depth's, rows in no group of that depth). The first level's
    programs come first in the grid.

    An fp32 pool is read at fp32 precision: the products run at 3xTF32 (each operand split
    into two TF32 parts, three tensor-core products; ``tl.dot`` alone would take TF32, 10
    mantissa bits, as cuBLAS does not by default) for a step that rounds as a float32 model
    should. On the H200 the fp32 beam search's attention took 12.4 us a layer that way
    against about 43 at IEEE fp32 on the FMA units (``float32_mode``'s profile), and the
    search 0.222 against 0.264 s, with the same beams as HF's fp32 search
    (``.device/exp_s14b.py``)."""
    T, HQ, D = q.shape
    precision = "tf32x3" if kv.dtype == torch.float32 else None
    P = kv.shape[2]
    group = HQ // num_kv_heads
    if q.stride(2) != 1 or not kv.is_contiguous():
        raise ValueError("level_partials wants q [T, Hq, D] with D contiguous and kv contiguous")
    if not 1 <= len(levels) <= 2:
        raise ValueError(f"level_partials runs one or two levels, got {len(levels)}")
    if D & (D - 1) or group * num_kv_heads != HQ or any(group > lv.block_m for lv in levels):
        raise ValueError(f"level_partials: head dim {D}, {HQ} / {num_kv_heads} heads")
    states = []
    for lv in levels:
        n = lv.depths * lv.splits
        o = torch.empty(n, T, HQ, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(n, T, HQ, dtype=torch.float32, device=q.device)
        states.append((o, lse))
    tiles = [lv.tiles.numel() // 4 for lv in levels]
    args = [
        (lv.tiles, lv.kv_indptr, lv.kv_indices, lv.last_page_len, o, lse, o.stride(0),
         o.stride(1), lse.stride(0), lse.stride(1), n, lv.splits)
        for lv, (o, lse), n in zip(levels, states, tiles, strict=True)
    ]  # fmt: skip
    a, b = levels[0], levels[-1]
    programs = num_kv_heads * sum(n * lv.splits for n, lv in zip(tiles, levels, strict=True))
    if programs and T:
        _partials_kernel[(programs,)](
            q, kv, q.stride(0), q.stride(1), kv.stride(0), kv.stride(1), kv.stride(2),
            LOG2E / math.sqrt(D), num_kv_heads, *args[0], *args[-1], GROUP=group,
            BM_A=a.block_m, BN_A=a.block_n, BM_B=b.block_m, BN_B=b.block_n, P=P, D=D,
            UPCAST=_INTERPRETED, PREC=precision, TWO=len(levels) == 2, num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip
    return states


# level 1's launch: (tiles, kv_indptr, kv_indices, last_page_len, splits); level 0's: the same,
# the number of shared levels (depths) its groups span and its keys a block
Level1 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]
Level0 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int, int]


class CascadeKernels:
    """Both levels of a cascade decode step in one launch (:func:`level_partials`), then one
    merge.

    Level 0 runs as above. Level 1 (each row's own pages, its last page partial) is the same
    tile code with every row a group of its own (a tile of one row's GQA heads, ``block_m1``
    query rows, 64 keys a block), its programs after level 0's in the same grid; its split
    states and level 0's go to ``merge.merge_states`` together. On the H200, for the tree's
    step (64 rows over 4,096 shared tokens and 5 own pages, one layer, CUDA graphs, measured
    with two launches before they became one, ``.device/exp_prefix2.py``):
    level 1 4.85 us (FlashInfer's decode 7.6; 16-key blocks on one warp: 4.8, but a long
    private tail would crawl), level 0 11.7 us, the merge 2.4 us; in all 20.4 us against
    FlashInfer's 34.0 (decode, prefill and its split merge, then ours)::

        level 1: tiles1 [4 x B]   indptr1 [B+1]  indices1  last1 [B]     (every row)
        level 0: tiles0 [4 x n0]  indptr0 [G+1]  indices0  last0 [G] = P (rows with mask 1)

    Levels by depth (``cascade.SharedGroup``): level 0 holds the groups of every shared depth
    in one table, each tile's states at ``depth x splits + split``, and the merge takes depth
    d's states on the rows of ``mask[d]``: a nested shared segment is read once per subgroup,
    in the same launch.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        sm_count: int,
        head_dim: int = 64,
        itemsize: int = 2,
    ) -> None:
        """``itemsize``: bytes of a KV element (2: bf16 / fp16; 4: fp32)."""
        self.num_heads, self.num_kv_heads, self.sm_count = num_heads, num_kv_heads, sm_count
        group = num_heads // num_kv_heads
        self.block_m0 = 64
        # level 0's keys a block (:meth:`block_n0_for`): 64 for splits of up to 512 keys, 128
        # for longer ones, fewer for wider heads or fp32, so that a block's K and V (two
        # pipeline stages) stay within 64 KiB of shared memory
        self.block_n0 = max(16, min(64, 16384 // (head_dim * itemsize)))
        self.block_n0_long = max(16, min(128, 16384 // (head_dim * itemsize)))
        self.block_m1 = max(16, triton.next_power_of_2(group))
        self.rows0 = rows_per_tile(num_heads, num_kv_heads, self.block_m0)
        self.rows1 = rows_per_tile(num_heads, num_kv_heads, self.block_m1)

    def levels(self, level1: Level1, level0: Level0) -> list[Level]:
        """Both levels' launches, level 0 first (its programs are the long ones)."""
        return [
            Level(*level0[:6], block_m=self.block_m0, block_n=level0[6]),
            Level(*level1, block_m=self.block_m1, block_n=64),
        ]

    def block_n0_for(self, longest_pages: int, page_size: int, splits: int) -> int:
        """Level 0's keys a block for groups of at most ``longest_pages`` pages cut in
        ``splits``: 64 while a split holds at most 512 keys, 128 above. On the H200 (bf16,
        head_dim 64) 64 won with short splits: the tree's 4,096 tokens in 8 splits decoded
        2.6% faster in one process (30,386 against 29,625 tok/s, ``.device/exp_tree_l0.py``).
        Across two runs of ``bench gpu --part cascade`` (9eb26b1 at 128 keys, 170f7d3 at 64;
        one step's attention as a CUDA graph), 2,048 tokens x 64 branches took 337 against
        409 us at 64, and 128 won with long splits (16,384 tokens x 64 branches in 8 splits:
        1,086 against 1,243 us; x 4 in 16: 612 against 663)."""
        keys = -(-longest_pages // max(1, splits)) * page_size
        return self.block_n0 if keys <= 512 else self.block_n0_long

    def level0_launch(
        self, batch: int, top_groups: int, longest_pages: int, page_size: int
    ) -> tuple[int, int]:
        """Level 0's splits (:meth:`splits0`) and keys a block (:meth:`block_n0_for`) for a
        step of ``batch`` rows: the eager plan and the CUDA graphs' key both take them here."""
        splits = self.splits0(batch, top_groups)
        return splits, self.block_n0_for(longest_pages, page_size, splits)

    def num_tiles0(self, batch: int, groups: int, depths: int = 1) -> int:
        """Level 0's tile table length for ``groups`` groups over ``depths`` shared levels."""
        return max_tiles(batch, groups, self.rows0, depths)

    def tiles0(self, groups: Sequence[tuple[int, int, int]], length: int) -> list[int]:
        """Level 0's tile table: each group's (first row, end row, depth), in group order."""
        return tile_table(groups, self.rows0, length)

    def tiles1(self, batch: int) -> list[int]:
        return tile_table([(b, b + 1, 0) for b in range(batch)], self.rows1, batch)

    def splits0(self, batch: int, top_groups: int) -> int:
        """Splits of every shared level's pages: those the depth-0 groups alone want (the
        deeper levels' groups are shorter; one split count keeps a depth's states together)."""
        return num_splits(
            max_tiles(batch, top_groups, self.rows0), self.num_kv_heads, self.sm_count
        )

    def splits1(self, batch: int) -> int:
        return num_splits(batch, self.num_kv_heads, self.sm_count)

    def run(
        self, q: torch.Tensor, kv: torch.Tensor, level1: Level1, level0: Level0, mask: torch.Tensor
    ) -> torch.Tensor:
        """out [T, Hq, D]: level 1 as (tiles, indptr, indices, last_page_len, splits), level 0
        the same, its depths and keys a block; ``mask`` [depths, T] (or [T] for one): rows that
        merge each depth's states."""
        (o0, s0), (o1, s1) = level_partials(q, kv, self.levels(level1, level0), self.num_kv_heads)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        merge_states(out, o1, s1, o0, s0, mask)
        return out

    def run_one(self, q: torch.Tensor, kv: torch.Tensor, level1: Level1) -> torch.Tensor:
        """out [T, Hq, D] of a plain decode step: every row over its whole page list, as
        level 1 (its last page partial), its split states merged; no level 0."""
        lv = Level(*level1, block_m=self.block_m1, block_n=64)
        ((o1, s1),) = level_partials(q, kv, [lv], self.num_kv_heads)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        merge_states(out, o1, s1)
        return out
