"""The page pool: KV memory for every branch, in fixed-size pages.

One tensor per layer, ``[num_pages, 2, page_size, num_kv_heads, head_dim]`` (index 0 of dim 1
is K, 1 is V): FlashInfer's NHD paged layout, identical on CPU and GPU so both attention
backends read the same memory. The pool only hands out and takes back page ids; which
segment owns a page and who reads it is the KV tree's business (``tree.py``).

Allocation is all-or-nothing: ``allocate(n)`` either returns ``n`` pages or raises
:class:`PoolExhaustedError` having changed nothing.
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
        shape = (config.num_pages, 2, config.page_size, config.num_kv_heads, config.head_dim)
        # [num_pages, 2, P, Hkv, D] per layer
        self.kv: list[torch.Tensor] = [
            torch.zeros(shape, dtype=config.dtype, device=config.device)
            for _ in range(config.num_layers)
        ]
        # Popping from the end hands out low page ids first (nicer pictures, same cost).
        self._free: list[int] = list(range(config.num_pages - 1, -1, -1))
        self._is_free = bytearray(b"\x01") * config.num_pages

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
        for p in pages:
            if self._is_free[p]:
                raise AssertionError(f"page {p} released twice")
            self._is_free[p] = 1
        self._free.extend(reversed(pages))
        self.telemetry.page("free", len(pages), len(self._free))

    def copy_slots(self, src: int, dst: int, num_slots: int) -> None:
        """Copy the first ``num_slots`` token slots of page ``src`` into ``dst`` (all layers)."""
        for layer in self.kv:
            layer[dst, :, :num_slots] = layer[src, :, :num_slots]
        self.telemetry.page("cow", 1, len(self._free))
