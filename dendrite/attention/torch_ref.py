"""The torch reference backend: paged attention in plain PyTorch, on CPU or CUDA.

``plan`` turns the ragged layout into padded gather indices and one boolean mask, so ``run``
is a scatter of the new K/V, one gather of every branch's K/V and one batched
``scaled_dot_product_attention`` per layer, whatever mix of prompt chunks and decode tokens
the step holds::

    kv gather [B, Lmax]: page = kv_indices[kv_indptr[b] + pos // P], slot = pos % P
    mask  [B, 1, Qmax, Lmax]: key pos <= query pos (causal) and key pos < kv_len[b]
                              (and query pos - key pos < window for sliding-window models)

Padding costs memory when lengths differ a lot; that is the price of a reference that is
easy to check. The FlashInfer backend is the fast path on GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dendrite.attention.base import BatchLayout
from dendrite.kv.pool import PagePool


class TorchBackend:
    name = "torch"

    def __init__(self, pool: PagePool, sliding_window: int | None = None) -> None:
        self.pool = pool
        self.sliding_window = sliding_window
        self._layout: BatchLayout | None = None

    def plan(self, layout: BatchLayout) -> None:
        dev = layout.positions.device
        P = layout.page_size
        B = len(layout.q_lens)
        q_lens = torch.tensor(layout.q_lens, device=dev)
        kv_lens = torch.tensor(layout.kv_lens, device=dev)
        l_max, q_max = max(layout.kv_lens), max(layout.q_lens)
        pos = torch.arange(l_max, device=dev)  # [Lmax]
        # page table [B, max_pages], padded with page 0 (masked out below)
        n_pages = (kv_lens + P - 1) // P
        max_pages = int(n_pages.max())
        col = torch.arange(max_pages, device=dev)
        valid_page = col[None, :] < n_pages[:, None]
        flat = (layout.kv_indptr[:-1, None].long() + col[None, :]).clamp(
            max=max(len(layout.kv_indices) - 1, 0)
        )
        table = torch.where(valid_page, layout.kv_indices.long()[flat], 0)
        self._gather_pages = table[:, pos // P]  # [B, Lmax]
        self._gather_offsets = (pos % P).expand(B, l_max)  # [B, Lmax]
        # queries: [B, Qmax] -> row of the flat batch (padded rows point at row 0)
        qi = torch.arange(q_max, device=dev)
        self._q_valid = qi[None, :] < q_lens[:, None]  # [B, Qmax]
        self._q_rows = torch.where(self._q_valid, layout.qo_indptr[:-1, None].long() + qi, 0)
        q_pos = kv_lens[:, None] - q_lens[:, None] + qi[None, :]  # [B, Qmax]
        mask = (pos[None, None, :] <= q_pos[:, :, None]) & (
            pos[None, None, :] < kv_lens[:, None, None]
        )
        if self.sliding_window is not None:
            mask &= pos[None, None, :] > q_pos[:, :, None] - self.sliding_window
        mask |= ~self._q_valid[:, :, None] & (pos == 0)[None, None, :]  # keep padded rows finite
        self._mask = mask[:, None]  # [B, 1, Qmax, Lmax]
        self._layout = layout

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layout = self._layout
        assert layout is not None, "plan() before run()"
        kv = self.pool.kv[layer]  # [N, 2, P, Hkv, D]
        kv[layout.write_pages, 0, layout.write_offsets] = k.to(kv.dtype)
        kv[layout.write_pages, 1, layout.write_offsets] = v.to(kv.dtype)
        keys = kv[self._gather_pages, 0, self._gather_offsets]  # [B, Lmax, Hkv, D]
        values = kv[self._gather_pages, 1, self._gather_offsets]  # [B, Lmax, Hkv, D]
        queries = q[self._q_rows]  # [B, Qmax, Hq, D]
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2).to(q.dtype),
            values.transpose(1, 2).to(q.dtype),
            attn_mask=self._mask,
            enable_gqa=True,
        )  # [B, Hq, Qmax, D]
        return out.transpose(1, 2)[self._q_valid]  # [T, Hq, D], flat order
