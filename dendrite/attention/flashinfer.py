"""The FlashInfer backend: paged attention on GPU through FlashInfer's plan/run wrappers.

Same interface and same pool as the torch reference (``torch_ref.py``): ``plan`` once per
engine step, ``run`` once per layer, reading and writing the pool's NHD pages in place.
Importing this module imports ``flashinfer`` and so fails with ``ImportError`` where it is not
installed; the engine imports it lazily, only on CUDA.

One step is one of two shapes, and each has its wrapper, planned once and run per layer::

    decode only (every q_len == 1)   BatchDecodeWithPagedKVCacheWrapper   (tensor cores for GQA)
    anything else (prompt chunks,    BatchPrefillWithPagedKVCacheWrapper  (causal=True: query i
      decodes, teacher-forced runs)                                        of a q_len chunk sits
                                                                           at kv_len - q_len + i)

``run`` first appends the step's K/V with ``append_paged_kv_cache``, which finds each slot
from (branch, position) through the page table; with the layout of ``base.py`` that is
exactly the planned ``write_pages`` / ``write_offsets``::

    token t of branch b at position pos:  page = kv_indices[kv_indptr[b] + pos // P]
                                          slot = pos % P
    batch_indices [T] = b for every token of branch b      positions [T] = layout.positions

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

import flashinfer
import torch

from dendrite.attention.base import BatchLayout
from dendrite.errors import ConfigError
from dendrite.kv.pool import PagePool
from dendrite.model.config import ModelConfig

WORKSPACE_BYTES = 128 * 2**20  # FlashInfer's recommended split-KV scratch size
SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def unsupported_reason(pool: PagePool, config: ModelConfig) -> str | None:
    """Why this backend cannot serve ``pool`` / ``config`` (``None``: it can).

    Only bf16 with head_dim 64 has been run on the H200 so far; the other entries are what
    FlashInfer's kernels are built for. The engine's ``auto`` choice can ask this first and
    fall back to the torch backend instead of failing.
    """
    kv = pool.kv[0]
    if not kv.is_cuda:
        return "the KV pool is not on a CUDA device"
    if kv.dtype not in SUPPORTED_DTYPES:
        return f"FlashInfer attention runs float16 or bfloat16, not {kv.dtype}"
    if config.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head_dim {config.head_dim} is not one of FlashInfer's {SUPPORTED_HEAD_DIMS}"
    return None


class FlashInferBackend:
    """Paged attention through FlashInfer. ``plan(layout)`` per step, ``run(layer, ...)``."""

    name = "flashinfer"

    def __init__(
        self,
        pool: PagePool,
        config: ModelConfig,
        *,
        workspace_bytes: int = WORKSPACE_BYTES,
        prefill_backend: str = "fa2",
    ) -> None:
        """``prefill_backend``: FlashInfer's kernel family for ragged steps. ``fa2`` is one JIT
        module shared with the tensor-core decode; ``auto`` takes FA3 on Hopper for long
        prompts (faster, but a second ~90 s compile on first use)."""
        reason = unsupported_reason(pool, config)
        if reason is not None:
            raise ConfigError(f"the FlashInfer backend cannot run here: {reason}")
        self.pool = pool
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dtype = pool.kv[0].dtype
        self.device = pool.kv[0].device
        # FlashInfer's window is inclusive of the query: w tokens = the query and w - 1 before.
        self.window_left = -1 if config.sliding_window is None else config.sliding_window - 1
        # One scratch buffer for every wrapper (graph ones too): a step runs only one of them.
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self._prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=prefill_backend
        )
        self._decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.num_heads > self.num_kv_heads
        )
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
        B = len(layout.q_lens)
        # host copies of what the device layout holds (FlashInfer plans on the host)
        i32 = torch.int32
        pages = ((n + P - 1) // P for n in layout.kv_lens)
        kv_indptr = torch.tensor([0, *accumulate(pages)], dtype=i32)  # [B+1]
        last_page_len = torch.tensor([(n - 1) % P + 1 for n in layout.kv_lens], dtype=i32)  # [B]
        heads = (self.num_heads, self.num_kv_heads, self.head_dim, P)
        dtypes = dict(q_data_type=self.dtype, kv_data_type=self.dtype)
        if layout.is_decode:
            self._decode.plan(
                kv_indptr,
                layout.kv_indices,
                last_page_len,
                *heads,
                window_left=self.window_left,
                **dtypes,
            )
            self._wrapper = self._decode
            self._batch_indices = torch.arange(B, dtype=i32, device=self.device)  # [T = B]
        else:
            q_lens = torch.tensor(layout.q_lens, dtype=i32)
            qo_indptr = torch.tensor([0, *accumulate(layout.q_lens)], dtype=i32)
            self._prefill.plan(
                qo_indptr,
                kv_indptr,
                layout.kv_indices,
                last_page_len,
                *heads,
                causal=True,
                window_left=self.window_left,
                **dtypes,
            )
            self._wrapper = self._prefill
            batch = torch.repeat_interleave(torch.arange(B, dtype=i32), q_lens)  # [T]
            self._batch_indices = batch.to(self.device, non_blocking=True)
        self._positions = layout.positions.to(i32)  # [T]
        self._layout = layout

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (strided views are fine) -> out [T, Hq, D]."""
        assert self._wrapper is not None and self._layout is not None, "plan() before run()"
        kv = self.pool.kv[layer]  # [N, 2, P, Hkv, D]
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
        return self._wrapper.run(q, kv)


class GraphDecodeAttention:
    """Decode-only attention that reads every index from fixed buffers: CUDA-graph capturable.

    One per batch-size bucket (``dendrite/cuda_graphs.py`` owns the buffers). It wraps a
    ``BatchDecodeWithPagedKVCacheWrapper(use_cuda_graph=True)`` over those buffers: ``plan``
    (host work, per step, outside the graph) rewrites the wrapper's plan and page table in
    place, and ``run`` (captured once, replayed) appends the new K/V and attends::

        buffers, B = bucket size:  batch_indices [B] = 0..B-1   positions [B]
                                   kv_indptr [B+1]   kv_indices [capacity]   last_page_len [B]
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
    ) -> None:
        self.pool = backend.pool
        self._heads = (backend.num_heads, backend.num_kv_heads, backend.head_dim)
        self._window_left = backend.window_left
        self._dtype = backend.dtype
        self._batch_indices, self._positions = batch_indices, positions
        self._kv_indptr, self._kv_indices, self._last = kv_indptr, kv_indices, last_page_len
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

    def plan_pages(self, kv_indptr: torch.Tensor, last_page_len: torch.Tensor, nnz: int) -> None:
        """Plan a step whose page table is already in the buffers (``kv_indptr`` and
        ``last_page_len``: host copies of what the buffers hold; ``nnz`` pages in all)."""
        self._wrapper.plan(
            kv_indptr,
            self._kv_indices[:nnz],  # the buffer itself: FlashInfer's copy into it is a no-op
            last_page_len,
            *self._heads,
            self.pool.page_size,
            window_left=self._window_left,
            q_data_type=self._dtype,
            kv_data_type=self._dtype,
        )

    def plan(self, layout: BatchLayout) -> None:
        raise TypeError("GraphDecodeAttention is planned through plan_pages, not a layout")

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, Hq, D], k/v [B, Hkv, D] -> out [B, Hq, D]; writes k, v at the planned slots."""
        kv = self.pool.kv[layer]  # [N + 1, 2, P, Hkv, D]
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
        return self._wrapper.run(q, kv)
