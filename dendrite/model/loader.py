"""Checkpoint loading: safetensors (one file or a sharded index) into a ``Transformer``.

Every tensor is checked against the shape the config implies before anything is assigned:
a missing, unexpected or mis-shaped tensor raises :class:`CheckpointError` naming it, and
no half-loaded model is returned.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from dendrite.errors import CheckpointError
from dendrite.model.config import ModelConfig
from dendrite.model.transformer import Transformer

# Buffers some older checkpoints carry that the model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (single file or sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from None
        files = sorted({path / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names the shard {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {path} "
        "(only safetensors checkpoints are read; convert .bin files with transformers first)"
    )


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold, with its shape."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for n in range(config.num_layers):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for name, out_f in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{name}.weight"] = (out_f, h)
            if config.qkv_bias:
                shapes[p + f"self_attn.{name}.bias"] = (out_f,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        if config.mlp_bias:
            shapes[p + "mlp.gate_proj.bias"] = (i,)
            shapes[p + "mlp.up_proj.bias"] = (i,)
            shapes[p + "mlp.down_proj.bias"] = (h,)
    return shapes


def load_state_dict(
    path: Path, config: ModelConfig, dtype: torch.dtype, device: str | torch.device
) -> dict[str, torch.Tensor]:
    want = expected_shapes(config)
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if name == "lm_head.weight" and config.tie_word_embeddings:
                        continue  # tied: the embedding serves as the head
                    if name not in want:
                        raise CheckpointError(f"unexpected tensor {name!r} in {file.name}")
                    shape = tuple(f.get_slice(name).get_shape())
                    if shape != want[name]:
                        raise CheckpointError(
                            f"tensor {name!r} in {file.name} has shape {shape}, "
                            f"config.json implies {want[name]}"
                        )
                    state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        except CheckpointError:
            raise
        except Exception as e:  # a corrupt or truncated file
            raise CheckpointError(f"cannot read {file}: {e}") from None
    missing = sorted(set(want) - set(state))
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(f"checkpoint {path} lacks tensor(s) {missing[:3]}{more}")
    return state


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Transformer:
    """Build the transformer for the checkpoint at ``path`` and load its weights."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model path {path} does not exist or is not a directory")
    config = ModelConfig.from_file(path)
    state = load_state_dict(path, config, dtype, device)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state, strict=True, assign=True)
    model.finish_loading(device)
    return model.eval().requires_grad_(False)
