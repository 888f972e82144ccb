"""The page pool: KV memory for every branch, in fixed-size pages.

One tensor per layer, ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (index 0 of dim 1
is K, 1 is V): FlashInfer's NHD paged layout, identical on CPU and GPU so both attention
backends read the same memory. The pool only hands out and takes back page ids; which
segment owns a page and who reads it is the KV tree's business (``tree.py``).

Allocation is all-or-nothing: ``allocate(n)`` either returns ``n`` pages or raises
:class:`PoolExhaustedError` having changed nothing.

All layers live in one tensor ``[L, N + 1, 2, P, Hkv, D]`` (``kv[layer]`` is a view), so the
copy-on-writes of a whole step are one gather and one scatter over every layer: the tree
*requests* them while it appends (``request_copy``) and they run together at the next read of
``kv`` (or ``flush_copies()``), before any kernel can see the pages. Row ``N`` is a scratch
page that is never handed out: padded rows of a CUDA-graph batch read and write it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dendrite.errors import ConfigError, PoolExhaustedError
from dendrite.telemetry import Telemetry


@dataclass(frozen=True)
class PoolConfig:
    num_layers: int
    num_pages: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_pages", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"PoolConfig.{name} must be a positive int, got {value!r}")

    @property
    def page_bytes(self) -> int:
        """Bytes of one page over all layers (K and V)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.page_size * self.num_kv_heads * self.head_dim * elem


class PagePool:
    """Fixed set of KV pages with a free list."""

    def __init__(self, config: PoolConfig, telemetry: Telemetry | None = None) -> None:
        self.config = config
        self.page_size = config.page_size
        self.num_pages = config.num_pages
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        P, Hkv, D = config.page_size, config.num_kv_heads, config.head_dim
        self.scratch_page = config.num_pages  # never allocated; see the module docstring
        # [L, N + 1, 2, P, Hkv, D]; kv[layer] is [N + 1, 2, P, Hkv, D]
        self._storage = torch.zeros(
            (config.num_layers, config.num_pages + 1, 2, P, Hkv, D),
            dtype=config.dtype,
            device=config.device,
        )
        self._kv: list[torch.Tensor] = list(self._storage.unbind(0))
        self._copies: list[tuple[int, int, int]] = []  # requested (src, dst, num_slots)
        # Popping from the end hands out low page ids first (nicer pictures, same cost).
        self._free: list[int] = list(range(config.num_pages - 1, -1, -1))
        self._is_free = bytearray(b"\x01") * config.num_pages

    @property
    def kv(self) -> list[torch.Tensor]:
        """Per-layer page tensors ``[N + 1, 2, P, Hkv, D]``, requested copies done first."""
        if self._copies:
            self.flush_copies()
        return self._kv

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def is_free(self, page: int) -> bool:
        return bool(self._is_free[page])

    def free_pages(self) -> list[int]:
        return list(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` pages, or raise :class:`PoolExhaustedError` without taking any."""
        if n > len(self._free):
            raise PoolExhaustedError(
                f"need {n} free KV pages but only {len(self._free)} of {self.num_pages} are free; "
                "free some branches or build the engine with a larger num_pages"
            )
        if n == 0:
            return []
        pages = self._free[-n:]
        del self._free[-n:]
        pages.reverse()
        for p in pages:
            self._is_free[p] = 0
        self.telemetry.page("alloc", n, len(self._free))
        return pages

    def release(self, pages: list[int]) -> None:
        if self._copies:
            self.flush_copies()  # a copy into a page must not land after its next owner
        for p in pages:
            if self._is_free[p]:
                raise AssertionError(f"page {p} released twice")
            self._is_free[p] = 1
        self._free.extend(reversed(pages))
        self.telemetry.page("free", len(pages), len(self._free))

    def request_copy(self, src: int, dst: int, num_slots: int) -> None:
        """Copy-on-write of the first ``num_slots`` slots of ``src`` into ``dst`` (all layers),
        done with the other requested copies at the next read of :attr:`kv`."""
        self._copies.append((src, dst, num_slots))
        self.telemetry.page("cow", 1, len(self._free))

    def flush_copies(self) -> None:
        """Run every requested copy now (one indexed copy over all layers)."""
        if self._copies:
            src, dst, n = zip(*self._copies, strict=True)
            self._copies = []
            self.copy_pages(list(src), list(dst), list(n))

    def copy_pages(self, src: list[int], dst: list[int], num_slots: list[int]) -> None:
        """Copy the first ``num_slots[i]`` token slots of page ``src[i]`` into ``dst[i]``, K and
        V, every layer: one gather and one scatter over the flat rows of all layers.

        ``_storage`` viewed as ``[L, (N + 1) * 2 * P, Hkv * D]``: slot ``s`` of page ``p`` is
        row ``p * 2P + s`` (K) and ``p * 2P + P + s`` (V).
        """
        if not src:
            return
        P = self.page_size
        src_rows: list[int] = []
        dst_rows: list[int] = []
        for s, d, n in zip(src, dst, num_slots, strict=True):
            for half in (0, P):
                src_rows.extend(range(s * 2 * P + half, s * 2 * P + half + n))
                dst_rows.extend(range(d * 2 * P + half, d * 2 * P + half + n))
        rows = torch.tensor([src_rows, dst_rows], dtype=torch.int64)
        self._copy_rows(rows.to(self._storage.device))

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor, num_slots: int) -> None:
        """:meth:`copy_pages` with the page ids in tensors on the pool's device (the same
        ``num_slots`` for every pair): no host round trip, so the caller never waits for the
        device. Every source is read before any destination is written, so a page may be
        both (a search reshuffling the last pages of its beams)."""
        P = self.page_size
        if not 0 <= num_slots <= P:
            raise ConfigError(f"copy_slots: num_slots {num_slots} outside [0, {P}]")
        if src.shape != dst.shape or src.dim() != 1:
            raise ConfigError(f"copy_slots: src {tuple(src.shape)} and dst {tuple(dst.shape)}")
        if num_slots == 0 or src.numel() == 0:
            return
        if num_slots == P:  # whole pages: one gather and one scatter along the page axis
            st = self._storage
            st.index_copy_(1, dst.to(torch.int64), st.index_select(1, src.to(torch.int64)))
            return
        off = torch.arange(num_slots, device=src.device)
        off = torch.cat([off, off + P])  # K's slots, then V's
        pages = torch.stack([src, dst]).to(torch.int64)  # [2, n]
        self._copy_rows((pages[:, :, None] * (2 * P) + off).reshape(2, -1))

    def _copy_rows(self, rows: torch.Tensor) -> None:
        """``rows`` [2, R] flat rows (source, destination) of every layer's storage."""
        st = self._storage
        flat = st.view(st.shape[0], -1, st.shape[-2] * st.shape[-1])
        flat[:, rows[1]] = flat[:, rows[0]]  # gathered in full, then scattered
