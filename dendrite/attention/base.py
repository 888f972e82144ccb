"""The attention backend interface: ``plan`` once per engine step, ``run`` once per layer.

The engine describes a step as a ragged batch in FlashInfer's conventions (``BatchLayout``):
for branch ``i``, its new query tokens are rows ``qo_indptr[i]:qo_indptr[i+1]`` of the flat
batch, its pages are ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]`` (already including the
pages the new tokens go to), and ``kv_last_page_len[i]`` tokens of its last page are valid::

    branch 0: 5 prompt tokens, KV 5        q rows 0..4   pages [3]          last len 5
    branch 1: 1 decode token,  KV 20       q row  5      pages [0, 7]       last len 4
    qo_indptr = [0, 5, 6]   kv_indptr = [0, 1, 3]   kv_indices = [3, 0, 7]   (page_size 16)

``run(layer, q, k, v)`` writes the step's new K/V into the pool at the planned slots and
returns causal attention of every query over its branch's KV. Both backends (torch reference,
FlashInfer) implement exactly this, so one test suite checks both.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, pairwise
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class BatchLayout:
    q_lens: tuple[int, ...]  # new tokens per branch
    kv_lens: tuple[int, ...]  # tokens per branch after this step's append
    qo_indptr: torch.Tensor  # [B+1] int32
    kv_indptr: torch.Tensor  # [B+1] int32
    kv_indices: torch.Tensor  # [nnz_pages] int32
    kv_last_page_len: torch.Tensor  # [B] int32
    positions: torch.Tensor  # [T] int64, absolute position of each new token
    write_pages: torch.Tensor  # [T] int64, page of each new token's K/V
    write_offsets: torch.Tensor  # [T] int64, slot inside that page
    page_size: int
    page_lists: tuple[list[int], ...] = ()  # host copy of each branch's pages (for cascade)
    token_ids: torch.Tensor | None = None  # [T] int64, the new tokens (when given)
    last_rows: torch.Tensor | None = None  # [B] int64, each branch's last new row

    @property
    def num_tokens(self) -> int:
        return int(sum(self.q_lens))

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.q_lens)


# FlashInfer's kernel families for prompts (``FlashInferBackend(prefill_backend=...)``)
PREFILL_KERNELS = ("auto", "fa2", "fa3")


def build_layout(
    q_lens: list[int],
    kv_lens: list[int],
    page_lists: list[list[int]],
    slots: list[list[int]],
    page_size: int,
    device: torch.device,
    tokens: Iterable[int] | None = None,
) -> BatchLayout:
    """Assemble a :class:`BatchLayout` from per-branch host lists (and ``tokens``, the T new
    token ids in row order, if given: the model's input).

    Everything travels in one host->device copy of one int64 buffer, cast to int32 once on
    the device; the layout's tensors are views of those two::

        [ qo_indptr B+1 | kv_indptr B+1 | kv_indices nnz | last_page_len B | positions T
          | write_pages T | write_offsets T | last_rows B | token_ids T (if given) ]
    """
    B = len(q_lens)
    if not len(kv_lens) == len(page_lists) == len(slots) == B:
        raise ValueError(
            f"build_layout: {B} q_lens, {len(kv_lens)} kv_lens, {len(page_lists)} page lists "
            f"and {len(slots)} slot lists"
        )
    # numpy, not Python lists: a 4,096-token prompt's layout took 1.6 ms of host on the H200
    q = np.asarray(q_lens, dtype=np.int64)
    kv = np.asarray(kv_lens, dtype=np.int64)
    qo = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(q, out=qo[1:])
    kvp = np.zeros(B + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, page_lists), np.int64, count=B), out=kvp[1:])
    T = int(qo[-1])
    indices = np.fromiter(chain.from_iterable(page_lists), np.int64, count=int(kvp[-1]))
    # token t of branch b sits at kv_len - q_len + (t - qo[b])
    positions = np.repeat(kv - q - qo[:-1], q) + np.arange(T, dtype=np.int64)
    per_row = np.fromiter(map(len, slots), np.int64, count=B)
    if not np.array_equal(per_row, q):
        raise ValueError(
            f"build_layout: slots per branch {per_row.tolist()} for {list(q_lens)} new tokens"
        )
    flat_slots = np.fromiter(chain.from_iterable(slots), np.int64, count=T)
    last = (kv - 1) % page_size + 1
    parts = [qo, kvp, indices, last, positions, flat_slots // page_size, flat_slots % page_size]
    parts.append(qo[1:] - 1)
    if tokens is not None:
        parts.append(np.fromiter(tokens, np.int64, count=T))
    host = torch.from_numpy(np.concatenate(parts))
    dev64 = host.to(device, non_blocking=True)
    dev32 = dev64.to(torch.int32)
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + len(part))
    v32 = [dev32[a:b] for a, b in pairwise(bounds)]
    v64 = [dev64[a:b] for a, b in pairwise(bounds)]
    return BatchLayout(
        q_lens=tuple(q_lens),
        kv_lens=tuple(kv_lens),
        qo_indptr=v32[0],
        kv_indptr=v32[1],
        kv_indices=v32[2],
        kv_last_page_len=v32[3],
        positions=v64[4],
        write_pages=v64[5],
        write_offsets=v64[6],
        page_size=page_size,
        page_lists=tuple(page_lists),
        token_ids=v64[8] if tokens is not None else None,
        last_rows=v64[7],
    )


class AttentionBackend(Protocol):
    """Paged attention over the KV pool. ``plan`` once per step, ``run`` per layer."""

    name: str

    def plan(self, layout: BatchLayout) -> None: ...

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for the new tokens -> attention output [T, Hq, D]."""
        ...


@runtime_checkable
class SlotBackend(Protocol):
    """A backend that lets a decode step's own kernels write the new K/V (the batch-1 QKV
    GEMV of ``dendrite/model/gemv.py``, the RoPE + append kernel of ``rope_kv.py``):
    ``kv_slot`` says where, per layer, and ``attend`` is ``run`` without the append."""

    def kv_slot(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(the layer's pages [N, 2, P, Hkv, D], page [T], slot [T]) on the device for a
        decode step (one new token a row); None otherwise (then ``run`` appends as usual)."""
        ...

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor: ...
