"""Decode steps as CUDA graphs, one graph per batch-size bucket.

A decode step of a small batch is some 250 to 700 small kernels whose launches cost more than
their work. Replaying the whole forward (embedding to logits) as one captured graph removes
that cost. A graph replays fixed addresses and shapes, so:

- every input lives in one static device buffer (int32), refilled per step by one
  host->device copy from a pinned twin laid out the same::

      [ ids Bmax | positions Bmax | kv_indptr Bmax+1 | last_page_len Bmax | batch_idx Bmax
        | kv_indices capacity ]

- a batch of ``B`` branches runs in the graph of the smallest bucket ``>= B`` (1, 2, 4, ...,
  128); the padded rows hold one token on the pool's scratch page (kv_len 1), which they
  read and write, and their logits are dropped;
- FlashInfer's ``plan`` runs per step outside the graph (host work that rewrites the
  wrapper's buffers in place); everything else is replayed. A batch-1 step over at most
  ``NOSPLIT_KV`` tokens has nothing to plan: its graph attends with ``split_decode.py``,
  which splits the row's pages on the device. Graphs are captured lazily, the
  first time a bucket is needed, and share one memory pool.
- a step whose branches share prefixes (``attention/cascade.py``) replays a cascade graph
  (:class:`CascadeShape`: with the Triton kernels keyed by level 0's splits, its groups of
  every depth ``G <= MAX_GROUPS`` rounded up to a power of two, its depths ``L`` and its keys
  a block; with FlashInfer's by its groups): the buffers above then hold each branch's own
  pages (level 1), and these the groups' shared ones (level 0, every depth's groups in one
  table; a split of more groups keeps its first depths that fit)::

      [ ... | qo0 Gmax+1 | kv_indptr0 Gmax+1 | last0 Gmax | merge mask Lmax x Bmax
        | level-1 positions Bmax | page Bmax | slot Bmax | level-0 tiles 4 (Lmax Bmax + Gmax)
        | kv_indices ... | kv_indices0 Gmax * max_pages ]

  (the model's RoPE reads the absolute positions; only the level-1 KV append reads the
  positions relative to each branch's own pages). ``page, slot``: where each row's new K/V
  go, for the kernels that write them themselves (``kv_slot``: the batch-1 QKV GEMV, the
  RoPE + append kernel).

Prefill and mixed steps, batches above the largest bucket and page tables beyond the buffer
run eagerly (:meth:`DecodeGraphs.fits`). Only used on CUDA with the FlashInfer backend; in
its float32 mode there is nothing to plan, and every step's attention is the Triton kernels
(a plain step as the cascade's level 1 alone, ``GraphDecodeAttention``).
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch

from dendrite.attention.cascade import CASCADE_MAX_DEPTH, CascadeSplit, SharedGroup
from dendrite.attention.flashinfer import (
    NOSPLIT_BATCH,
    FlashInferBackend,
    GraphCascadeAttention,
    GraphDecodeAttention,
)
from dendrite.attention.split_decode import SplitDecode
from dendrite.model.gemv import pdl_supported
from dendrite.model.transformer import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
MAX_INDICES = 1 << 22  # page-table entries a graph step may hold (16 MiB of int32)
# cascade graphs: at most this many shared-prefix groups, all depths (more: the split's first
# depths that fit; a step whose depth-0 groups alone do not fit replays a plain graph)
MAX_GROUPS = 16
# A batch-1 step over at most this many tokens replays a graph planned without split-KV: its
# one attention kernel beats split + merge up to ~512 tokens (H200: 0.127 against 0.184 ms
# for 22 layers at 192 tokens; 0.224 against 0.190 at 1,024).
NOSPLIT_KV = 512
# From the fifteenth session those graphs attend with ``split_decode.SplitDecode`` (the
# backend's ``split_decode``), in up to ``split_decode.MAX_SPLITS`` splits.


class CascadeShape(NamedTuple):
    """What a cascade graph is captured for: the level-0 kernel, the depth-0 groups
    (FlashInfer's level 0) or level 0's splits (Triton's), the groups its tables hold (all
    depths; Triton: a power of two, the tiles past the step's empty), the depths and level
    0's keys a block (Triton)."""

    kernel: str
    top_or_splits: int
    groups: int
    depths: int
    block_n: int


class _Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    attn: GraphDecodeAttention
    logits: torch.Tensor  # [bucket, V] fp32, rewritten by every replay
    cascade: GraphCascadeAttention | None = None


class _Layout(NamedTuple):
    """How a decode step's page lists replay: the cascade split (None: plain), the graph
    shape it replays in, each row's level-1 position shift (tokens before its first level-1
    page) and the page lists level 1 reads (all of them, plain)."""

    split: CascadeSplit | None
    shape: CascadeShape | None
    shift: list[int]
    lists: list[list[int]]


class DecodeGraphs:
    """Captured decode forwards of ``model`` over ``backend``'s pool, by batch bucket."""

    def __init__(
        self, model: Transformer, backend: FlashInferBackend, buckets: tuple[int, ...] = BUCKETS
    ) -> None:
        self.model = model
        self.backend = backend
        self.pool = backend.pool
        self.buckets = tuple(sorted(buckets))
        bmax = self.buckets[-1]
        P = self.pool.page_size
        max_pages = -(-model.config.max_position_embeddings // P)
        self.capacity = min(MAX_INDICES, bmax * max_pages + bmax)
        # offsets of the regions in the static buffer (and its pinned host twin)
        G, L = MAX_GROUPS, CASCADE_MAX_DEPTH
        self.capacity0 = G * max_pages
        tiles = 4 * (L * bmax + G)  # max_tiles(bucket, G, rows, L) <= L bucket + G
        sizes = [
            bmax,
            bmax,
            bmax + 1,
            bmax,
            bmax,
            G + 1,
            G + 1,
            G,
            L * bmax,
            bmax,
            bmax,
            bmax,
            tiles,
        ]
        o = list(itertools.accumulate((*sizes, self.capacity), initial=0))
        self._ids, self._pos, self._indptr, self._last, self._bidx = o[:5]
        self._qo0, self._kvp0, self._last0, self._mask, self._pos1 = o[5:10]
        self._wpage, self._wslot, self._tiles, self._ind, self._ind0 = o[10:]
        size = self._ind0 + self.capacity0
        dev = model.device
        self._dev = torch.zeros(size, dtype=torch.int32, device=dev)
        self._host = torch.zeros(size, dtype=torch.int32, pin_memory=True)
        self._np = self._host.numpy()
        self._np[self._bidx : self._bidx + bmax] = np.arange(bmax)
        self._graphs: dict[tuple[int, bool], _Graph] = {}  # (bucket, without split-KV)
        self._cascades: dict[tuple[int, CascadeShape], _Graph] = {}  # (bucket, shape)
        self.cascade_steps = 0  # steps replayed as a cascade graph
        # steps replayed as a cascade graph, by their split's (depth-0 groups, groups, depths)
        self.cascade_shapes: Counter[tuple[int, int, int]] = Counter()
        self._level0_key: tuple[object, ...] | None = None  # the level 0 in the buffers
        self._level0_nnz = 0
        self._memo: tuple[tuple[object, ...], list[list[int]], _Layout] | None = None
        # the page lists whose table the host buffer holds, their bucket and pages (_fill)
        self._filled: tuple[list[list[int]] | None, int, int] = (None, 0, 0)
        self._pool_handle = torch.cuda.graph_pool_handle()
        self._done = torch.cuda.Event()  # the last step's copies have read the host buffer
        self._done.record()
        self.copy_wait_s = 0.0  # seconds the host waited for that before filling a step

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def fits(self, batch: int, num_pages: int) -> bool:
        """Whether a decode step of ``batch`` branches reading ``num_pages`` pages can replay."""
        if not 0 < batch <= self.buckets[-1]:
            return False
        return num_pages + self.bucket(batch) - batch <= self.capacity

    def forward(
        self,
        tokens: list[int] | torch.Tensor,
        kv_lens: list[int],
        page_lists: list[list[int]],
        copy: bool = True,
        own: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, V] (fp32, a copy) of one decode token per branch.

        ``kv_lens``: tokens per branch after this step's append (which the KV tree has done:
        the new token's slot is the last one of its page list). ``tokens``: host ids, or a
        device tensor [B] (a pipelined decode feeds the previous step's samples without
        waiting for them: a device-to-device copy into the graph's input, in stream order).
        ``copy=False``: the graph's own logits buffer instead, for a caller that reads it (in
        stream order) before it launches the next replay, which rewrites it.
        ``own`` [B, c] (device): the true last ``c`` pages of every row, whose page lists all
        have one length and end in placeholders for them (only their last page, where the new
        K/V go, is real): written over the copied page table on the device, in stream order.
        A pipelined beam search knows its beams' pages there only (``search/beam.py``).
        """
        B = len(kv_lens)
        bucket = self.bucket(B)
        split, shape, shift, lists = self._layout(page_lists, bucket)
        if split is not None:
            assert shape is not None
            g = self._cascades.get((bucket, shape))
            if g is None:
                g = self._cascades[bucket, shape] = self._capture(bucket, shape)
            nnz = self._fill(tokens, kv_lens, lists, bucket, shift)
            nnz0 = self._fill_shared(split, B, bucket, shape)
            if self.backend.prefix_kernel != "triton":  # Triton's kernels read the buffers
                self._plan(g.attn, bucket, nnz, nosplit=bucket >= NOSPLIT_BATCH)
            assert g.cascade is not None
            self._plan_shared(g.cascade, split.num_groups, nnz0)
            self.cascade_steps += 1
            self.cascade_shapes[split.num_groups, len(split.groups), split.depths] += 1
        else:
            # (FlashInfer's plan only: the float32 mode's Triton kernels have one graph)
            nosplit = bucket == 1 and kv_lens[0] <= NOSPLIT_KV and not self.backend.float32
            g = self._graphs.get((bucket, nosplit))
            if g is None:
                g = self._graphs[bucket, nosplit] = self._capture(bucket, nosplit=nosplit)
            nnz = self._fill(tokens, kv_lens, lists, bucket)
            self._plan(g.attn, bucket, nnz, nosplit=nosplit)
        if own is not None:
            self._patch_own(lists, own)
        # The host buffers (ours, and FlashInfer's pinned plan buffer) may be rewritten once
        # the copies queued so far have run: the next step's _fill waits for this, not for
        # the replay, so the host can prepare step n + 1 while the GPU runs step n.
        self._done.record()
        if isinstance(tokens, torch.Tensor):
            self._dev[self._ids : self._ids + B].copy_(tokens, non_blocking=True)
        g.graph.replay()
        return g.logits[:B].clone() if copy else g.logits[:B]  # the next replay rewrites it

    def _patch_own(self, lists: list[list[int]], own: torch.Tensor) -> None:
        """Overwrite the last ``own.shape[1]`` entries of each row's filled page list."""
        B, width = len(lists), len(lists[0])
        if any(len(p) != width for p in lists) or own.shape[0] != B or own.shape[1] > width:
            raise ValueError(f"own pages {tuple(own.shape)} do not fit {B} rows of {width}")
        table = self._dev[self._ind : self._ind + B * width].view(B, width)
        table[:, width - own.shape[1] :].copy_(own, non_blocking=True)

    def _layout(self, page_lists: list[list[int]], bucket: int) -> _Layout:
        """A step's cascade split and what follows from it (:class:`_Layout`).

        Remembered for the next step: a decode step's page lists change only when a row
        crosses into a new page (one step in 16), so the next step usually finds the same
        lists (compared element by element, most of them the same int objects) and skips
        the split's search. The lists are the caller's own, not changed after the call
        (each step builds them anew: ``KVTree.page_list``)."""
        b = self.backend
        # everything _split and _shape read besides the lists
        key = (
            bucket, b.cascade, b.prefix_kernel, b.max_depth, b.min_saved_pages,
            b.min_group_pages, MAX_GROUPS,
        )  # fmt: skip
        memo = self._memo
        if memo is not None and memo[0] == key and memo[1] == page_lists:
            return memo[2]
        split = self._split(page_lists)
        if split is None:
            out = _Layout(None, None, [], page_lists)
        else:
            shift = [m * self.pool.page_size for m in split.shared]
            out = _Layout(split, self._shape(split, bucket), shift, split.level1(page_lists))
        self._memo = (key, page_lists, out)
        return out

    def _split(self, page_lists: list[list[int]]) -> CascadeSplit | None:
        """This step's cascade split, if the backend wants one and a graph can hold it: with
        more groups or shared pages than the buffers hold, its first depths that fit."""
        split = self.backend.cascade_split(page_lists)
        while split is not None and (
            len(split.groups) > MAX_GROUPS
            or sum(len(g.pages) for g in split.groups) > self.capacity0
        ):
            if split.depths == 1:
                return None
            split = split.truncated(split.depths - 1)
            if split.saved_pages < self.backend.min_saved_pages:
                return None
        return split

    def _shape(self, split: CascadeSplit, bucket: int) -> CascadeShape:
        """The graph a step's split replays in (:class:`CascadeShape`)."""
        kernel = self.backend.prefix_kernel
        if kernel != "triton":  # FlashInfer's level 0: one shared level, a wrapper per G
            return CascadeShape(kernel, split.num_groups, split.num_groups, 1, 0)
        splits, block_n = self.backend.kernels.level0_launch(
            bucket, split.num_groups, split.longest_pages, self.pool.page_size
        )
        groups = min(MAX_GROUPS, 1 << (len(split.groups) - 1).bit_length())
        return CascadeShape(kernel, splits, groups, split.depths, block_n)

    def _fill(
        self,
        tokens: list[int] | torch.Tensor,
        kv_lens: list[int],
        page_lists: list[list[int]],
        bucket: int,
        shift: list[int] | None = None,
    ) -> int:
        """Write one step's inputs into the host buffer and copy them over; returns pages.

        ``shift``: per branch, tokens before its first page here (a cascade's level 1 starts
        after the shared prefix, so positions in its page table start that much lower).
        """
        B, P, h = len(kv_lens), self.pool.page_size, self._np
        pad = bucket - B
        t = time.perf_counter()
        self._done.synchronize()  # the previous step's copy has left the host buffer
        self.copy_wait_s += time.perf_counter() - t
        lens = np.asarray(kv_lens, dtype=np.int32)
        h[self._ids : self._ids + bucket] = 0  # padded rows; device ids are copied later
        if not isinstance(tokens, torch.Tensor):
            h[self._ids : self._ids + B] = tokens
        h[self._pos : self._pos + B] = lens - 1  # absolute: the model's RoPE
        h[self._pos + B : self._pos + bucket] = 0
        if shift is not None:  # a cascade's level-1 append: relative to the own pages
            h[self._pos1 : self._pos1 + B] = lens - 1 - np.asarray(shift)
            h[self._pos1 + B : self._pos1 + bucket] = 0
        h[self._last : self._last + B] = (lens - 1) % P + 1
        h[self._last + B : self._last + bucket] = 1
        if page_lists is self._filled[0] and bucket == self._filled[1]:
            # the same lists as the last fill (``_layout`` remembered them): the page table,
            # its row offsets and the pages written are still in the host buffer
            nnz = self._filled[2]
        else:
            counts = np.fromiter((len(p) for p in page_lists), dtype=np.int64, count=B)
            indptr = h[self._indptr : self._indptr + bucket + 1]
            indptr[0] = 0
            np.cumsum(counts, out=indptr[1 : B + 1])
            nnz = int(indptr[B]) + pad
            indptr[B + 1 :] = indptr[B] + np.arange(1, pad + 1)  # a scratch page a padded row
            ind = self._ind
            h[ind : ind + nnz - pad] = np.fromiter(
                itertools.chain.from_iterable(page_lists), dtype=np.int32, count=nnz - pad
            )
            h[ind + nnz - pad : ind + nnz] = self.pool.scratch_page
            # where each row's new K/V go (kv_slot; a cascade's shift is whole pages): the
            # last page of its list, padded rows on the scratch page
            wpage = self._wpage
            h[wpage : wpage + B] = np.fromiter((p[-1] for p in page_lists), dtype=np.int32, count=B)
            h[wpage + B : wpage + bucket] = self.pool.scratch_page
            self._filled = (page_lists, bucket, nnz)
        slot = self._wslot
        h[slot : slot + B] = (lens - 1) % P
        h[slot + B : slot + bucket] = 0
        end = self._ind + nnz
        self._dev[:end].copy_(self._host[:end], non_blocking=True)
        return nnz

    def _fill_shared(
        self, split: CascadeSplit, batch: int, bucket: int, shape: CascadeShape
    ) -> int:
        """Write and copy over level 0: group ranges, shared pages, merge masks; returns pages.
        (Called after :meth:`_fill`, which waited for the previous step's copies.) A step with
        the same level 0 as the last one filled (a decode's shared prompt, step after step)
        finds it in place: the buffers' level-0 regions are written here only."""
        key = (split.groups, split.shared, batch, bucket, shape)
        if key == self._level0_key:
            return self._level0_nnz
        h, G, L = self._np, len(split.groups), split.depths
        starts = list(split.group_starts)  # FlashInfer's level 0: depth 0, every row
        starts[-1] = bucket  # the padded rows ride along with the last group, masked out
        h[self._qo0 : self._qo0 + len(starts)] = starts
        counts = np.fromiter((len(g.pages) for g in split.groups), dtype=np.int64, count=G)
        kvp = h[self._kvp0 : self._kvp0 + G + 1]
        kvp[0] = 0
        np.cumsum(counts, out=kvp[1:])
        nnz0 = int(kvp[G])
        h[self._last0 : self._last0 + G] = self.pool.page_size
        masks = h[self._mask : self._mask + L * bucket].reshape(L, bucket)
        masks[:, :batch] = split.masks()
        masks[:, batch:] = 0
        if shape.kernel == "triton":  # as long as the graph's table
            kern = self.backend.kernels
            length = kern.num_tiles0(bucket, shape.groups, L)
            h[self._tiles : self._tiles + 4 * length] = kern.tiles0(split.ranges(), length)
        h[self._ind0 : self._ind0 + nnz0] = np.fromiter(
            itertools.chain.from_iterable(g.pages for g in split.groups), dtype=np.int32, count=nnz0
        )
        self._dev[self._qo0 : self._ind].copy_(self._host[self._qo0 : self._ind], non_blocking=True)
        end = self._ind0 + nnz0
        self._dev[self._ind0 : end].copy_(self._host[self._ind0 : end], non_blocking=True)
        self._level0_key, self._level0_nnz = key, nnz0
        return nnz0

    def _plan_shared(self, attn: GraphCascadeAttention, groups: int, nnz0: int) -> None:
        qo = self._host[self._qo0 : self._qo0 + groups + 1]
        kvp = self._host[self._kvp0 : self._kvp0 + groups + 1]
        last = self._host[self._last0 : self._last0 + groups]
        attn.plan_shared(qo, kvp, last, nnz0)

    def _plan(
        self, attn: GraphDecodeAttention, bucket: int, nnz: int, nosplit: bool = False
    ) -> None:
        indptr = self._host[self._indptr : self._indptr + bucket + 1]
        last = self._host[self._last : self._last + bucket]
        attn.plan_pages(indptr, last, nnz, disable_split_kv=nosplit)

    def _capture(
        self, bucket: int, cascade_shape: CascadeShape | None = None, nosplit: bool = False
    ) -> _Graph:
        """Capture the decode forward of a bucket: plain, or a cascade of ``cascade_shape``
        (``nosplit``: a plain one planned without split-KV)."""
        d = self._dev
        append_at = self._pos if cascade_shape is None else self._pos1  # level 1: relative
        split = None
        if nosplit and bucket == 1 and self.backend.split_decode:
            split = SplitDecode(
                self.backend.num_heads,
                self.backend.num_kv_heads,
                self.backend.head_dim,
                bucket,
                d.device,
                pdl=pdl_supported(d.device),
            )
        attn = GraphDecodeAttention(
            self.backend,
            batch_indices=d[self._bidx : self._bidx + bucket],
            positions=d[append_at : append_at + bucket],
            kv_indptr=d[self._indptr : self._indptr + bucket + 1],
            kv_indices=d[self._ind : self._ind + self.capacity],
            last_page_len=d[self._last : self._last + bucket],
            slot=(d[self._wpage : self._wpage + bucket], d[self._wslot : self._wslot + bucket]),
            split=split,
        )
        # a harmless batch to capture with: every row one token on the scratch page
        scratch = [[self.pool.scratch_page]] * bucket
        nnz = self._fill([0] * bucket, [1] * bucket, scratch, bucket, [0] * bucket)
        # a cascade's level 1 (own pages, mostly short) runs without split-KV in big buckets
        big = cascade_shape is not None and bucket >= NOSPLIT_BATCH
        self._plan(attn, bucket, nnz, nosplit=nosplit or big)
        cascade = None
        if cascade_shape is not None:
            kern = self.backend.kernels
            triton = cascade_shape.kernel == "triton"
            groups, depths = cascade_shape.groups, cascade_shape.depths
            top = groups if not triton else 1  # (FlashInfer's level 0: every group at depth 0)
            n_tiles = kern.num_tiles0(bucket, groups, depths)
            mask = d[self._mask : self._mask + depths * bucket].view(depths, bucket)
            cascade = GraphCascadeAttention(
                attn,
                self.backend.workspace,
                qo_indptr=d[self._qo0 : self._qo0 + top + 1],
                kv_indptr=d[self._kvp0 : self._kvp0 + groups + 1],
                kv_indices=d[self._ind0 : self._ind0 + self.capacity0],
                last_page_len=d[self._last0 : self._last0 + groups],
                mask=mask if triton else mask[0],
                kernels=kern if triton else None,
                tiles0=d[self._tiles : self._tiles + 4 * n_tiles] if triton else None,
                splits0=cascade_shape.top_or_splits,
                depths=depths,
                block_n0=cascade_shape.block_n,
            )
            # harmless level 0: group g is row g // depths at depth g % depths, on the scratch
            # page (a depth's groups are disjoint rows, at least two each, so a step's G <=
            # depths x B / 2 and the power of two above it < depths x B)
            harmless = CascadeSplit(
                groups=tuple(
                    SharedGroup(g % depths, g // depths, g // depths + 1, (self.pool.scratch_page,))
                    for g in range(groups)
                ),
                shared=(0,) * bucket,
                saved_pages=0,
            )
            nnz0 = self._fill_shared(harmless, bucket, bucket, cascade_shape)
            self._plan_shared(cascade, top, nnz0)
        ids, pos = d[self._ids : self._ids + bucket], d[self._pos : self._pos + bucket]
        self.pool.flush_copies()  # (the capture must not contain a copy-on-write)
        step_attn = attn if cascade is None else cascade

        def forward() -> torch.Tensor:
            return self.model(ids, pos, step_attn, None)

        with torch.inference_mode():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, workspaces
                forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool_handle):
                logits = forward()
        self._done.record()
        return _Graph(graph, attn, logits, cascade)
