"""Shared fixtures: HF-saved random checkpoints of each family, and the stories260k reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dendrite.model.random_init import make_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "reference" / "stories260k"

# name -> (family, overrides): GQA and MHA, tied and untied, each family
CHECKPOINTS = {
    "llama-gqa-untied": ("llama", {}),
    "llama-mha-tied": ("llama", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "llama3-rope-bias": (
        "llama",
        {
            "attention_bias": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "mistral-gqa": ("mistral", {}),
    "mistral-mha-tied": ("mistral", {"num_key_value_heads": 4, "tie_word_embeddings": True}),
    "qwen2-gqa-tied": ("qwen2", {"tie_word_embeddings": True}),
    "qwen2-mha-untied": ("qwen2", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {
        name: make_random_checkpoint(root / name, family, seed=i, **overrides)
        for i, (name, (family, overrides)) in enumerate(CHECKPOINTS.items())
    }


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoints: dict[str, Path]) -> Path:
    return checkpoints["llama-gqa-untied"]


@pytest.fixture(scope="session")
def stories() -> Path:
    if not (STORIES / "model.safetensors").is_file():
        pytest.skip("../shared/reference/stories260k is absent")
    return STORIES


@pytest.fixture(scope="session")
def stories_expected(stories: Path) -> list[int]:
    return list(json.loads((stories / "greedy_expected.json").read_text())["greedy_ids"])


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)  # tiny models: threads cost more than they give
