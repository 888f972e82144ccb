"""Random-weight checkpoints saved by HF transformers itself, for golden tests and benchmarks.

No model hub is reachable here, so tests and benchmarks make their own checkpoints: a config
of the requested family, HF's own initialisation (seeded), ``save_pretrained``. What Dendrite
then loads is byte for byte what transformers writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Shapes used across tests and benchmarks.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=1024,
    ),
    "10m": dict(
        hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=2, vocab_size=2048, max_position_embeddings=2048,
    ),
    "tinyllama-1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192,
    ),
}  # fmt: skip


def make_random_checkpoint(
    path: str | Path,
    family: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    preset: str = "tiny",
    **overrides: Any,
) -> Path:
    """Write a random ``family`` (llama | mistral | qwen2) checkpoint with HF's save_pretrained."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }
    config_cls, model_cls = classes[family]
    kwargs = {**PRESETS[preset], "bos_token_id": 1, "eos_token_id": 2, **overrides}
    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype)
    path = Path(path)
    model.save_pretrained(path)
    return path
