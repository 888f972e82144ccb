"""Attention backends behind one interface: torch reference (CPU, GPU) and FlashInfer (GPU)."""

from dendrite.attention.base import AttentionBackend, BatchLayout, build_layout
from dendrite.attention.torch_ref import TorchBackend

__all__ = ["AttentionBackend", "BatchLayout", "TorchBackend", "build_layout"]
