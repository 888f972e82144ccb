"""The FlashInfer backend: paged attention on GPU through FlashInfer's plan/run wrappers.

Same interface and same pool as the torch reference (``torch_ref.py``): ``plan`` once per
engine step, ``run`` once per layer, reading and writing the pool's NHD pages in place.
Importing this module imports ``flashinfer`` and so fails with ``ImportError`` where it is not
installed; the engine imports it lazily, only on CUDA.

One step is one of three shapes, and each has its wrapper(s), planned once and run per layer::

    decode only (every q_len == 1)   BatchDecodeWithPagedKVCacheWrapper   (tensor cores for GQA;
                                       a batch-1 CUDA graph over <= 512 tokens: the Triton
                                       split-KV kernel of ``split_decode.py``, no plan)
    decode, branches sharing a       cascade, chosen when it saves >= min_saved_pages reads:
      prefix (``cascade.py``)          every level (each shared prefix, nested ones by depth,
                                       each branch's own pages) in Triton,
                                       ``shared_prefix.CascadeKernels``; or, two levels
                                       with prefix_kernel="flashinfer", level 0 on
                                       BatchPrefillWithPagedKVCacheWrapper, level 1 on the decode
                                       wrapper, merged by ``merge.merge_into``
    anything else (prompt chunks,    BatchPrefillWithPagedKVCacheWrapper  (causal=True: query i
      decodes, teacher-forced runs)                                        of a q_len chunk sits
                                                                           at kv_len - q_len + i)

``run`` first appends the step's K/V with ``append_paged_kv_cache``, which finds each slot
from (branch, position) through the page table; with the layout of ``base.py`` that is
exactly the planned ``write_pages`` / ``write_offsets``::

    token t of branch b at position pos:  page = kv_indices[kv_indptr[b] + pos // P]
                                          slot = pos % P
    batch_indices [T] = b for every token of branch b      positions [T] = layout.positions

A decode step's model may write the K/V itself instead (``kv_slot`` names each row's page and
slot; ``model/rope_kv.py`` rotates q, k and writes k, v in one kernel) and call ``attend``:
``run`` without the append.

Planning reads only host data (the layout's ``q_lens`` / ``kv_lens``): FlashInfer's planners
want the indptr arrays on the host, and handing them device tensors would cost a GPU->host
sync per step. The page indices themselves stay on the device.

Example (on a CUDA machine with flashinfer installed)::

    backend = FlashInferBackend(pool, model_config)
    backend.plan(layout)                      # once per step
    out = backend.run(layer, q, k, v)         # per layer: writes k, v; out [T, Hq, D]
"""

from __future__ import annotations

from itertools import accumulate
from typing import Any

import flashinfer
import torch

from dendrite.attention.base import PREFILL_KERNELS, BatchLayout
from dendrite.attention.cascade import (
    CASCADE_MAX_DEPTH,
    CASCADE_THRESHOLDS,
    PREFIX_KERNELS,
    CascadeSplit,
    split_shared_prefixes,
)
from dendrite.attention.merge import merge_into
from dendrite.attention.shared_prefix import CascadeKernels, Level0, Level1
from dendrite.attention.split_decode import SplitDecode
from dendrite.attention.torch_ref import TorchBackend
from dendrite.errors import ConfigError
from dendrite.kv.pool import PagePool
from dendrite.model.config import ModelConfig

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's recommended split-KV scratch size
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
# A cascade's level 1 (each branch's own, mostly short, pages) runs without split-KV from this
# many rows on: enough CTAs without it, and one merge kernel less per layer.
NOSPLIT_BATCH = 16


def unsupported_reason(pool: PagePool, config: ModelConfig) -> str | None:
    """Why this backend cannot serve ``pool`` / ``config`` (``None``: it can).

    Only bf16 (and the float32 mode) with head_dim 64 has been run on the H200 so far; the
    other entries are what FlashInfer's kernels are built for. The engine's ``auto`` choice can
    ask this first and fall back to the torch backend instead of failing.
    """
    kv = pool.kv[0]
    if not kv.is_cuda:
        return "the KV pool is not on a CUDA device"
    if kv.dtype == torch.float32:
        return _float32_reason(config)
    if kv.dtype not in SUPPORTED_DTYPES:
        return f"FlashInfer attention runs float16 or bfloat16, not {kv.dtype}"
    if config.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {config.head_dim} is not one of FlashInfer's {SUPPORTED_HEAD_DIMS}"
    return None


def _float32_reason(config: ModelConfig) -> str | None:
    """Why an fp32 model cannot take the float32 mode (graph decode on the Triton kernels)."""
    D, group = config.head_dim, config.num_heads // config.num_kv_heads
    if D < 16 or D & (D - 1) or D > 128:  # tl.dot wants K >= 16 here
        return f"float32 decode runs the Triton kernels: head_dim {D} is not 16, 32, 64 or 128"
    if group > 64:
        return f"float32 decode runs the Triton kernels: {group} query heads a KV head (> 64)"
    if config.sliding_window is not None:
        return "float32 decode runs the Triton kernels, which have no sliding window"
    return None


class FlashInferBackend:
    """Paged attention through FlashInfer. ``plan(layout)`` per step, ``run(layer, ...)``.

    FlashInfer's kernels run fp16 and bf16 only. An fp32 pool gets the *float32 mode*, for
    runs that must round as the fp32 reference does (beam search against HF in fp32): eager
    steps (prompts, mixed steps) run the torch reference backend, and decode steps replay
    CUDA graphs (``cuda_graphs.py``) whose attention is the Triton cascade kernels
    (``shared_prefix.py``) at fp32 precision (3xTF32 products), a plain step as their level 1
    alone."""

    name = "flashinfer"

    def __init__(
        self,
        pool: PagePool,
        config: ModelConfig,
        *,
        workspace_bytes: int = WORKSPACE_BYTES,
        prefill_backend: str = "auto",
        cascade: bool = True,
        min_saved_pages: int | None = None,
        min_group_pages: int | None = None,
        prefix_kernel: str = "triton",
        max_depth: int | None = None,
    ) -> None:
        """``prefill_backend``: FlashInfer's kernel family for ragged steps (prompts): ``fa2``,
        ``fa3`` (Hopper), or ``auto``: FA3 on Hopper for models without a sliding window, else
        FA2. On the H200 the tree's 4,096-token prompt took 19.5 ms with FA3 against 22.0 with
        FA2 (``.device/exp_s12a.py``); FA3 is a second JIT module (58 s to build on first
        use there; FlashInfer caches it).
        ``cascade``: decode steps whose branches share prefixes may run as a
        cascade when that saves at least ``min_saved_pages`` page reads, counting groups
        that share at least ``min_group_pages`` pages (never for sliding-window models;
        None: the thresholds measured for the cascade's kernels, ``cascade.py``).
        ``prefix_kernel``: what runs the cascade (``PREFIX_KERNELS``). ``max_depth``: shared
        levels by depth at most with the Triton kernels (None: ``CASCADE_MAX_DEPTH``; 1: the
        two-level cascade); FlashInfer's level 0 has one."""
        reason = unsupported_reason(pool, config)
        if reason is not None:
            raise ConfigError(f"the FlashInfer backend cannot run here: {reason}")
        if prefix_kernel not in PREFIX_KERNELS:
            raise ConfigError(
                f"prefix_kernel must be one of {PREFIX_KERNELS}, got {prefix_kernel!r}"
            )
        if max_depth is not None and (
            not isinstance(max_depth, int) or not 1 <= max_depth <= CASCADE_MAX_DEPTH
        ):
            raise ConfigError(f"max_depth must be 1..{CASCADE_MAX_DEPTH}, got {max_depth}")
        if prefill_backend not in PREFILL_KERNELS:
            raise ConfigError(
                f"prefill_backend must be one of {PREFILL_KERNELS}, got {prefill_backend!r}"
            )
        self.pool = pool
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dtype = pool.kv[0].dtype
        self.device = pool.kv[0].device
        self.float32 = self.dtype == torch.float32
        # the float32 mode's eager steps
        self._ref = TorchBackend(pool, config.sliding_window) if self.float32 else None
        # FlashInfer's window is inclusive of the query: w tokens = the query and w - 1 before.
        self.window_left = -1 if config.sliding_window is None else config.sliding_window - 1
        if prefill_backend == "auto":
            hopper = torch.cuda.get_device_capability(self.device)[0] == 9
            prefill_backend = "fa3" if hopper and self.window_left < 0 else "fa2"
        self.prefill_kernel = prefill_backend
        # One scratch buffer for every wrapper (graph ones too): a step runs only one of them.
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=prefill_backend
        )
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.num_heads > self.num_kv_heads
        )
        # level 0 of the cascade: one query group per shared prefix (fa2: the decode's module)
        self._shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend="fa2"
        )
        self.cascade = cascade and self.window_left < 0
        # Batch-1 decode graphs over short rows attend with ``split_decode.py`` (no sliding
        # window there; head_dim <= 128 keeps a key block in registers). False: FlashInfer's.
        # Read when a graph is captured: graphs captured before a change keep their kernel.
        self.split_decode = self.window_left < 0 and self.head_dim <= 128 and not self.float32
        sm_count = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.kernels = CascadeKernels(
            self.num_heads, self.num_kv_heads, sm_count, self.head_dim, self.dtype.itemsize
        )
        # The Triton cascade runs head_dim <= 128 (64 and 128 tested on the H200) and GQA
        # groups that fit one tile; other models take FlashInfer's kernels, built for them.
        fits = self.head_dim <= 128 and self.num_heads // self.num_kv_heads <= self.kernels.block_m0
        self.prefix_kernel = prefix_kernel if fits else "flashinfer"
        if self.float32:  # FlashInfer's level 0 cannot read fp32
            self.prefix_kernel = "triton"
        self.max_depth = CASCADE_MAX_DEPTH if max_depth is None else max_depth
        self._triton_levels: tuple[Level1, Level0] | None = None  # (level 1, level 0) tables
        group_pages, saved_pages = CASCADE_THRESHOLDS[self.prefix_kernel]
        self.min_saved_pages = saved_pages if min_saved_pages is None else min_saved_pages
        self.min_group_pages = group_pages if min_group_pages is None else min_group_pages
        self._split: CascadeSplit | None = None  # this step's cascade, if it runs as one
        self._c_tables: tuple[torch.Tensor, ...] = ()  # level-1 tables, level-0 merge mask
        self.cascade_steps = 0  # steps planned as a cascade (for tests and benches)
        # A step that is one whole new sequence (a fresh prompt) attends over its own K/V,
        # contiguous, with FlashInfer's single-prefill kernel: no page table, no plan.
        self._fresh = False
        self.fresh_steps = 0
        self._wrapper: (
            flashinfer.BatchPrefillWithPagedKVCacheWrapper
            | flashinfer.BatchDecodeWithPagedKVCacheWrapper
            | None
        ) = None
        self._layout: BatchLayout | None = None
        self._batch_indices = torch.empty(0, dtype=torch.int32, device=self.device)
        self._positions = torch.empty(0, dtype=torch.int32, device=self.device)

    def plan(self, layout: BatchLayout) -> None:
        P = layout.page_size
        assert layout.page_size == self.pool.page_size, "layout and pool disagree on the page size"
        if self._ref is not None:  # float32: the torch reference runs eager steps
            self._ref.plan(layout)
            self._split, self._layout = None, layout
            return
        B = len(layout.q_lens)
        self._fresh = False
        i32 = torch.int32
        self._split = None
        if layout.is_decode and layout.page_lists:
            split = self.cascade_split(list(layout.page_lists))
            if split is not None:
                self._plan_cascade(layout, split)
                return
        if layout.is_decode:
            self._decode.plan(
                *self._host_pages(layout),
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
                P,
                window_left=self.window_left,
                q_data_type=self.dtype,
                kv_data_type=self.dtype,
            )
            self._wrapper = self._decode
            self._batch_indices = torch.arange(B, dtype=i32, device=self.device)  # [T = B]
        else:
            self._fresh = B == 1 and layout.q_lens[0] == layout.kv_lens[0]
            if self._fresh:
                self.fresh_steps += 1
            else:
                self._plan_prefill(layout)
            self._wrapper = self._prefill
            # [T] on the device: no host tensor of a prompt's length to build and copy
            rows = torch.arange(B, dtype=i32, device=self.device)
            reps = layout.qo_indptr[1:] - layout.qo_indptr[:-1]
            T = layout.num_tokens
            self._batch_indices = torch.repeat_interleave(rows, reps, output_size=T)
        self._positions = layout.positions.to(i32)  # [T]
        self._layout = layout

    @staticmethod
    def _host_pages(layout: BatchLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kv_indptr [B+1] on the host, kv_indices, last page lengths [B] on the host): the
        host copies FlashInfer plans from, of what the device layout holds."""
        P, i32 = layout.page_size, torch.int32
        pages = ((n + P - 1) // P for n in layout.kv_lens)
        kv_indptr = torch.tensor([0, *accumulate(pages)], dtype=i32)
        last = torch.tensor([(n - 1) % P + 1 for n in layout.kv_lens], dtype=i32)
        return kv_indptr, layout.kv_indices, last

    def _plan_prefill(self, layout: BatchLayout) -> None:
        self._prefill.plan(
            torch.tensor([0, *accumulate(layout.q_lens)], dtype=torch.int32),
            *self._host_pages(layout),
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            layout.page_size,
            causal=True,
            window_left=self.window_left,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )

    def cascade_split(self, page_lists: list[list[int]]) -> CascadeSplit | None:
        """The cascade a decode step over ``page_lists`` runs as, or ``None``: plain."""
        if not self.cascade:
            return None
        depth = self.max_depth if self.prefix_kernel == "triton" else 1
        return split_shared_prefixes(
            page_lists, self.min_saved_pages, self.min_group_pages, max_depth=depth
        )

    def _plan_cascade(self, layout: BatchLayout, split: CascadeSplit) -> None:
        """Plan a decode step as level 0 (shared prefixes, by depth) + level 1 (own pages)."""
        P, B = layout.page_size, len(layout.q_lens)
        own = split.level1(list(layout.page_lists))
        counts = [len(p) for p in own]
        indptr1 = [0, *accumulate(counts)]
        last = [(n - 1) % P + 1 for n in layout.kv_lens]
        pos1 = [n - 1 - m * P for n, m in zip(layout.kv_lens, split.shared, strict=True)]
        mask = [x for row in split.masks() for x in row]  # [depths, B]
        flat1 = [p for pages in own for p in pages]
        flat0 = [p for g in split.groups for p in g.pages]
        kvp0 = [0, *accumulate(len(g.pages) for g in split.groups)]
        triton = self.prefix_kernel == "triton"
        kern, G, L = self.kernels, len(split.groups), split.depths
        n0 = kern.num_tiles0(B, G, L)
        tables = (kern.tiles1(B), kern.tiles0(split.ranges(), n0), [P] * G) if triton else ()
        parts = (indptr1, flat1, last, pos1, mask, flat0, kvp0, *tables)
        host = torch.tensor([x for part in parts for x in part], dtype=torch.int32)
        dev = host.to(self.device, non_blocking=True)
        views = dev.split([len(part) for part in parts])
        heads = (self.num_heads, self.num_kv_heads, self.head_dim, P)
        dtypes = dict(q_data_type=self.dtype, kv_data_type=self.dtype)
        if triton:
            splits0, block_n = kern.level0_launch(B, split.num_groups, split.longest_pages, P)
            self._triton_levels = (
                (views[7], views[0], views[1], views[2], kern.splits1(B)),
                (views[8], views[6], views[5], views[9], splits0, L, block_n),
            )
        else:
            self._triton_levels = None
            self._decode.plan(
                host[: B + 1],
                views[1],
                host[B + 1 + len(flat1) : 2 * B + 1 + len(flat1)],
                *heads,
                disable_split_kv=B >= NOSPLIT_BATCH,
                **dtypes,
            )
            self._shared.plan(
                torch.tensor(split.group_starts, dtype=torch.int32),
                torch.tensor(kvp0, dtype=torch.int32),
                views[5],
                torch.full((split.num_groups,), P, dtype=torch.int32),
                *heads,
                causal=False,
                **dtypes,
            )
        # indptr1, indices1, last1, positions1, merge mask [depths, B] (FlashInfer's: one)
        self._c_tables = (views[0], views[1], views[2], views[3], views[4].view(L, B))
        self._batch_indices = torch.arange(B, dtype=torch.int32, device=self.device)
        self._split = split
        self._wrapper = self._decode
        self._layout = layout
        self.cascade_steps += 1

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (strided views are fine) -> out [T, Hq, D]."""
        if self._ref is not None:
            return self._ref.run(layer, q, k, v)
        assert self._wrapper is not None and self._layout is not None, "plan() before run()"
        kv = self.pool.kv[layer]  # [N, 2, P, Hkv, D]
        if self._split is not None:
            indptr1, indices1, last1, pos1, _ = self._c_tables
            flashinfer.append_paged_kv_cache(
                k, v, self._batch_indices, pos1, kv, indices1, indptr1, last1, "NHD"
            )
            return self.attend(layer, q)
        lay = self._layout
        flashinfer.append_paged_kv_cache(
            k,
            v,
            self._batch_indices,
            self._positions,
            kv,
            lay.kv_indices,
            lay.kv_indptr,
            lay.kv_last_page_len,
            "NHD",
        )
        if self._fresh:  # causal over the step's own K/V (q and kv lengths equal)
            return flashinfer.single_prefill_with_kv_cache(
                q, k, v, causal=True, window_left=self.window_left, backend=self.prefill_kernel
            )
        return self.attend(layer, q)

    def kv_slot(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a decode step (a cascade too): (layer's pages, page [T], slot [T]) of its new
        K/V, for a kernel that writes them itself and then calls :meth:`attend`."""
        if self._ref is not None:
            return self._ref.kv_slot(layer)
        lay = self._layout
        if lay is None or not lay.is_decode:
            return None
        return self.pool.kv[layer], lay.write_pages, lay.write_offsets

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """``run`` without the append (after :meth:`kv_slot`'s writer)."""
        if self._ref is not None:
            return self._ref.attend(layer, q)
        assert self._wrapper is not None, "plan() before attend()"
        kv = self.pool.kv[layer]
        if self._split is None:
            if self._fresh:  # attend alone (no K/V at hand): over the pages, planned now
                assert self._layout is not None
                self._plan_prefill(self._layout)
                self._fresh = False
            if self._wrapper is self._prefill:  # its run would zero-fill a new output first
                return self._wrapper.run(q, kv, out=q.new_empty(q.shape))  # (all rows written)
            return self._wrapper.run(q, kv)
        mask = self._c_tables[4]
        if self._triton_levels is not None:
            return self.kernels.run(q, kv, *self._triton_levels, mask)
        return cascade_merge(q, kv, self._decode, self._shared, mask[0])


def cascade_merge(
    q: torch.Tensor, kv: torch.Tensor, level1: Any, level0: Any, mask: torch.Tensor
) -> torch.Tensor:
    """A cascade on FlashInfer's planned wrappers: level 1 (decode) and level 0 (prefill)
    with their log-sum-exps, merged into level 1's output on the rows ``mask`` says."""
    out, lse = level1.run(q, kv, return_lse=True)
    out0, lse0 = level0.run(q, kv, return_lse=True)
    merge_into(out, lse, out0, lse0, mask)
    return out


class GraphDecodeAttention:
    """Decode-only attention that reads every index from fixed buffers: CUDA-graph capturable.

    One per batch-size bucket (``dendrite/cuda_graphs.py`` owns the buffers). It wraps a
    ``BatchDecodeWithPagedKVCacheWrapper(use_cuda_graph=True)`` over those buffers: ``plan``
    (host work, per step, outside the graph) rewrites the wrapper's plan and page table in
    place, and ``run`` (captured once, replayed) appends the new K/V and attends; or the
    model writes them into the ``slot`` buffers' page and slot (``kv_slot``) and ``attend``
    only attends::

        buffers, B = bucket size:  batch_indices [B] = 0..B-1   positions [B]
                                   kv_indptr [B+1]   kv_indices [capacity]   last_page_len [B]
                                   page [B]   slot [B]

    In the backend's float32 mode there is no wrapper: ``run`` writes k, v at the ``slot``
    buffers' page and slot and attends with the Triton kernels' level 1 over the same page
    table (:meth:`CascadeKernels.run_one`).

    With ``split`` (``split_decode.SplitDecode``: a batch-1 bucket's short steps) ``attend``
    runs that kernel over the same buffers instead of the wrapper's: it cuts each row's pages
    into splits on the device, so there is nothing to plan per step.
    """

    name = "flashinfer-graph"

    def __init__(
        self,
        backend: FlashInferBackend,
        batch_indices: torch.Tensor,
        positions: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        last_page_len: torch.Tensor,
        slot: tuple[torch.Tensor, torch.Tensor],
        split: SplitDecode | None = None,
    ) -> None:
        """``slot``: (page [B], slot [B]) buffers: where each row's new K/V go, for
        :meth:`kv_slot`. ``split``: the attention kernel of a batch-1 bucket (see above)."""
        self.pool = backend.pool
        self._slot = slot
        self._split_decode = split  # (never in the float32 mode: backend.split_decode)
        self._heads = (backend.num_heads, backend.num_kv_heads, backend.head_dim)
        self._window_left = backend.window_left
        self._dtype = backend.dtype
        self._batch_indices, self._positions = batch_indices, positions
        self._kv_indptr, self._kv_indices, self._last = kv_indptr, kv_indices, last_page_len
        self._kernels = backend.kernels
        self._wrapper: Any = None
        if backend.float32:  # the Triton kernels' level 1 over the same buffers; no plan
            bucket = last_page_len.shape[0]
            kern, dev = self._kernels, kv_indptr.device
            tiles = torch.tensor(kern.tiles1(bucket), dtype=torch.int32, device=dev)
            self._level1 = (tiles, kv_indptr, kv_indices, last_page_len, kern.splits1(bucket))
            return
        # shares the eager backend's scratch: graphs and eager steps never run at once
        self._wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            backend.workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=backend.num_heads > backend.num_kv_heads,
            paged_kv_indptr_buffer=kv_indptr,
            paged_kv_indices_buffer=kv_indices,
            paged_kv_last_page_len_buffer=last_page_len,
        )

    def plan_pages(
        self,
        kv_indptr: torch.Tensor,
        last_page_len: torch.Tensor,
        nnz: int,
        disable_split_kv: bool = False,
    ) -> None:
        """Plan a step whose page table is already in the buffers (``kv_indptr`` and
        ``last_page_len``: host copies of what the buffers hold; ``nnz`` pages in all).
        ``disable_split_kv`` must be what the graph was captured with. (The float32 mode's
        kernels read the buffers as they are: nothing to plan; nor with ``split``.)"""
        if self._wrapper is None or self._split_decode is not None:
            return
        self._wrapper.plan(
            kv_indptr,
            self._kv_indices[:nnz],  # the buffer itself: FlashInfer's copy into it is a no-op
            last_page_len,
            *self._heads,
            self.pool.page_size,
            window_left=self._window_left,
            q_data_type=self._dtype,
            kv_data_type=self._dtype,
            disable_split_kv=disable_split_kv,
        )

    def plan(self, layout: BatchLayout) -> None:
        raise TypeError("GraphDecodeAttention is planned through plan_pages, not a layout")

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, Hkv, D] -> out [B, Hq, D]; writes k, v at the planned slots."""
        self.append(layer, k, v)
        return self.attend(layer, q)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the step's k, v [B, Hkv, D]: through the page table (FlashInfer's append), or
        in the float32 mode at the ``slot`` buffers' page and slot (torch: FlashInfer's
        kernel runs fp16 / bf16 only)."""
        kv = self.pool.kv[layer]  # [N + 1, 2, P, Hkv, D]
        if self._wrapper is None:
            page, slot = (x.long() for x in self._slot)
            kv[page, 0, slot] = k
            kv[page, 1, slot] = v
            return
        flashinfer.append_paged_kv_cache(
            k,
            v,
            self._batch_indices,
            self._positions,
            kv,
            self._kv_indices,
            self._kv_indptr,
            self._last,
            "NHD",
        )

    def kv_slot(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(layer's pages, page [B], slot [B]) buffers, as the eager backend's."""
        return (self.pool.kv[layer], *self._slot)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        kv = self.pool.kv[layer]
        if self._wrapper is None:
            return self._kernels.run_one(q, kv, self._level1)
        if self._split_decode is not None:
            return self._split_decode.run(q, kv, self._kv_indptr, self._kv_indices, self._last)
        return self._wrapper.run(q, kv)


class GraphCascadeAttention:
    """The cascade of a decode step, CUDA-graph capturable (one per bucket and
    ``cuda_graphs.CascadeShape``: FlashInfer's graph-mode prefill plans a fixed batch).

    Level 1 is the bucket's :class:`GraphDecodeAttention` (its buffers then hold each branch's
    own pages and positions relative to them); level 0 is the Triton kernel of
    ``shared_prefix.py`` over the tile table ``tiles``, the groups of every shared depth (with
    the backend's ``prefix_kernel="flashinfer"``: one depth, a graph-mode prefill wrapper over
    the group buffers); ``mask`` (int32, [depths, bucket]; FlashInfer's [bucket]) says which
    rows merge each depth::

        level-0 buffers: qo_indptr [G+1]  kv_indptr [G+1]  kv_indices [capacity]  last [G]
                         tiles [4 x max_tiles(bucket, G, depths)]
    """

    name = "flashinfer-cascade-graph"

    def __init__(
        self,
        level1: GraphDecodeAttention,
        workspace: torch.Tensor,
        qo_indptr: torch.Tensor,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        last_page_len: torch.Tensor,
        mask: torch.Tensor,
        kernels: CascadeKernels | None = None,
        tiles0: torch.Tensor | None = None,
        splits0: int = 1,
        depths: int = 1,
        block_n0: int = 64,
    ) -> None:
        """``kernels`` and ``tiles0`` (level 0's tile table buffer, groups of ``depths``
        shared levels, ``splits0`` splits each, ``block_n0`` keys a block; ``mask`` then
        [depths, bucket]): both levels in Triton; None: on FlashInfer (one shared level,
        ``mask`` [bucket])."""
        self.pool = level1.pool
        self.level1 = level1
        self._kv_indices = kv_indices
        self._mask = mask
        self._kernels = kernels
        self._levels: tuple[Level1, Level0] | None = None
        if kernels is not None and tiles0 is not None:
            bucket = mask.shape[-1]
            tiles1 = torch.tensor(kernels.tiles1(bucket), dtype=torch.int32, device=mask.device)
            lv1 = level1
            self._levels = (
                (tiles1, lv1._kv_indptr, lv1._kv_indices, lv1._last, kernels.splits1(bucket)),
                (tiles0, kv_indptr, kv_indices, last_page_len, splits0, depths, block_n0),
            )
            return
        self._shared = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            workspace,
            "NHD",
            use_cuda_graph=True,
            qo_indptr_buf=qo_indptr,
            paged_kv_indptr_buf=kv_indptr,
            paged_kv_indices_buf=kv_indices,
            paged_kv_last_page_len_buf=last_page_len,
            backend="fa2",
        )

    def plan_shared(
        self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, last: torch.Tensor, nnz: int
    ) -> None:
        """Plan level 0 over the group buffers (host copies of what they hold); nothing to
        plan for the Triton kernels, which read the buffers themselves."""
        if self._levels is not None:
            return
        heads = self.level1._heads
        self._shared.plan(
            qo_indptr,
            kv_indptr,
            self._kv_indices[:nnz],
            last,
            *heads,
            self.pool.page_size,
            causal=False,
            q_data_type=self.level1._dtype,
            kv_data_type=self.level1._dtype,
        )

    def plan(self, layout: BatchLayout) -> None:
        raise TypeError("GraphCascadeAttention is planned through its levels, not a layout")

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.level1.append(layer, k, v)  # a row's new K/V go to its own last page
        return self.attend(layer, q)

    def kv_slot(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Level 1's buffers: a row's new K/V go to its own last page."""
        return self.level1.kv_slot(layer)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Both levels and their merge; the step's K/V are in the pages already."""
        kv = self.pool.kv[layer]
        if self._levels is not None:
            assert self._kernels is not None
            return self._kernels.run(q, kv, *self._levels, self._mask)
        return cascade_merge(q, kv, self.level1._wrapper, self._shared, self._mask)
