"""The torch reference backend: paged attention in plain PyTorch, on CPU or CUDA.

``plan`` turns the ragged layout into padded gather indices and one boolean mask, so ``run``
is a scatter of the new K/V, one gather of every branch's K/V and one batched
``scaled_dot_product_attention`` per layer, whatever mix of prompt chunks and decode tokens
the step holds. Indices are into the layer tensor viewed flat as ``[N * 2 * P, Hkv, D]``
(row ``(page * 2 + kv) * P + slot``)::

    key of branch b at position pos:  page = kv_indices[kv_indptr[b] + pos // P]
                                      row  = page * 2P + pos % P        (value: row + P)
    mask [B, 1, Qmax, Lmax]: key pos <= query pos (causal) and key pos < kv_len[b]
                             (and query pos - key pos < window for sliding-window models)

Padding costs memory when lengths differ a lot; that is the price of a reference that is
easy to check. The FlashInfer backend is the fast path on GPU.

A *fresh* prompt (one branch whose step is its whole sequence of more than one token, no
sliding window to cut it) skips the gather and the mask: ``run`` attends over the step's own
k, v with ``is_causal`` (K/V heads repeated for GQA), which lets torch take its fused kernels
(on CUDA in fp32, the memory-efficient one; the float32 mode's prompts run here). On the H200 the float32 mode's
1,024-token TinyLlama-shape prompt took 46.7 ms that way against 49.5 through the mask
(``.device/exp_s14d.py``, with the inputs still 3-D, which kept torch on its math kernels;
they are 4-D since, not measured alone).
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
        self._planned = False
        self._fresh = False
        self.fresh_steps = 0  # steps planned as fresh prompts (their run() attends causally)

    def plan(self, layout: BatchLayout) -> None:
        dev = layout.positions.device
        P = layout.page_size
        B = len(layout.q_lens)
        l_max, q_max = max(layout.kv_lens), max(layout.q_lens)
        kv_lens = torch.tensor(layout.kv_lens, device=dev)
        pos = torch.arange(l_max, device=dev)  # [Lmax]
        # page of every (branch, position); padded positions read page 0 and are masked
        col = (pos // P)[None, :] + layout.kv_indptr[:-1, None].long()
        col = col.clamp(max=max(len(layout.kv_indices) - 1, 0))
        pages = layout.kv_indices.long()[col]  # [B, Lmax]
        self._key_rows = (pages * (2 * P) + pos % P).reshape(-1)  # [B * Lmax]
        self._val_rows = self._key_rows + P
        self._write_rows = layout.write_pages * (2 * P) + layout.write_offsets  # [T]
        self._slot = (layout.write_pages, layout.write_offsets)
        self._shape = (B, l_max)
        self._decode = layout.is_decode
        window = self.sliding_window
        # a fresh prompt: one branch, its whole sequence (more than one token: a one-token
        # step is a decode step, whose K/V a kernel may write into the slots instead)
        self._fresh = B == 1 and 1 < q_max == l_max and (window is None or l_max <= window)
        self.fresh_steps += self._fresh
        key_valid = pos[None, :] < kv_lens[:, None]  # [B, Lmax]
        if q_max == 1:  # decode: one query per branch, at the last position
            self._q_rows = None

            def make_mask() -> torch.Tensor:
                mask = key_valid[:, None, :]  # [B, 1, Lmax]
                if window is not None:
                    mask = mask & (pos[None, None, :] > (kv_lens - 1 - window)[:, None, None])
                return mask
        else:
            q_lens = torch.tensor(layout.q_lens, device=dev)
            qi = torch.arange(q_max, device=dev)
            q_valid = self._q_valid = qi[None, :] < q_lens[:, None]  # [B, Qmax]
            self._q_rows = torch.where(q_valid, layout.qo_indptr[:-1, None].long() + qi, 0)
            q_pos = kv_lens[:, None] - q_lens[:, None] + qi[None, :]  # [B, Qmax]

            def make_mask() -> torch.Tensor:
                mask = (pos[None, None, :] <= q_pos[:, :, None]) & key_valid[:, None, :]
                if window is not None:
                    mask &= pos[None, None, :] > q_pos[:, :, None] - window
                mask |= ~q_valid[:, :, None] & (pos == 0)[None, None, :]  # padded rows finite
                return mask

        self._make_mask = make_mask
        # [B, 1, Qmax, Lmax]; a fresh prompt's (T x T) only if attend() is called on it
        self._mask: torch.Tensor | None = None if self._fresh else make_mask()[:, None]
        self._planned = True

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        assert self._planned, "plan() before run()"
        kv = self.pool.kv[layer]  # [N, 2, P, Hkv, D]
        flat = kv.view(-1, kv.shape[-2], kv.shape[-1])  # [N * 2 * P, Hkv, D]
        k, v = k.to(kv.dtype), v.to(kv.dtype)
        flat.index_copy_(0, self._write_rows, k)
        flat.index_copy_(0, self._write_rows + self.pool.page_size, v)
        if self._fresh:  # causal over the step's own K/V, as they went into the pages
            group = q.shape[1] // k.shape[1]
            k, v = (x.to(q.dtype).repeat_interleave(group, dim=1) for x in (k, v))
            # 4-D, as torch's fused kernels want ([1, Hq, T, D]; 3-D takes the math path)
            q4, k4, v4 = (x.transpose(0, 1)[None] for x in (q, k, v))
            out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True)
            return out[0].transpose(0, 1)
        return self.attend(layer, q)

    def kv_slot(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """For a decode step: (layer's pages, page [T], slot [T]) where its new K/V go, for
        a kernel that writes them itself and then calls :meth:`attend`; else None."""
        if not self._planned or not self._decode:
            return None
        return self.pool.kv[layer], *self._slot

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """``run`` without the append: the step's K/V are in the pages already."""
        assert self._planned, "plan() before run()"
        kv = self.pool.kv[layer]
        flat = kv.view(-1, kv.shape[-2], kv.shape[-1])
        B, L = self._shape
        if self._mask is None:
            self._mask = self._make_mask()[:, None]
        keys = flat.index_select(0, self._key_rows).view(B, L, *flat.shape[1:])  # [B, L, Hkv, D]
        values = flat.index_select(0, self._val_rows).view(B, L, *flat.shape[1:])
        if self._q_rows is None:
            queries = q[:, None]  # [B, 1, Hq, D]
        else:
            queries = q[self._q_rows]  # [B, Qmax, Hq, D]
        out = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys.transpose(1, 2).to(q.dtype),
            values.transpose(1, 2).to(q.dtype),
            attn_mask=self._mask,
            enable_gqa=True,
        )  # [B, Hq, Qmax, D]
        out = out.transpose(1, 2)
        if self._q_rows is None:
            return out[:, 0]  # [T=B, Hq, D]
        return out[self._q_valid]  # [T, Hq, D], flat order
