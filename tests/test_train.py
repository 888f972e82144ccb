"""Training is reproducible: the same options give bit-identical weights on CPU.

A tiny model (one layer, head_dim 64) and a handful of steps keep this under a few seconds;
the default model's training is the same code with other sizes.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dendrite.errors import ConfigError
from dendrite.tasks.game24_traces import TraceConfig
from dendrite.train import Game24Sampler, ModelShape, TrainConfig, parse_args, train
from dendrite.training.batches import SampledBatches

TINY = ModelShape(
    hidden_size=64,
    num_layers=1,
    num_heads=1,
    num_kv_heads=1,
    head_dim=64,
    intermediate_size=128,
    max_position_embeddings=256,
)


def _config(out: Path, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        out=str(out),
        steps=4,
        seed=seed,
        batch_size=8,
        warmup_steps=2,
        log_every=2,
        eval_every=0,
        threads=1,
        shape=TINY,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_same_seed_same_weights_different_seed_different(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    train(_config(a), progress=False)
    train(_config(b), progress=False)
    train(_config(c, seed=1), progress=False)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys() and len(wa) > 0
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "loss.csv").read_text().count("\n") >= 3
    assert (a / "loss.svg").read_text().startswith("<svg")
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (a / name).is_file()


def test_batches_do_not_depend_on_order_of_requests() -> None:
    batches = SampledBatches(Game24Sampler(TraceConfig()), batch_size=4, seed=7, length=10)
    late_first = batches[3]
    _ = batches[0]
    again = batches[3]
    assert torch.equal(late_first["input_ids"], again["input_ids"])
    assert not torch.equal(batches[3]["input_ids"], batches[4]["input_ids"])


def test_a_batch_holds_distinct_documents_with_loss_on_completions_only() -> None:
    batch = SampledBatches(Game24Sampler(TraceConfig()), batch_size=32, seed=0, length=1)[0]
    ids, labels = batch["input_ids"], batch["labels"]
    assert len({tuple(row.tolist()) for row in ids}) > 24  # not one document repeated
    assert (ids[:, 0] == 1).all()  # BOS
    assert (labels[:, :2] == -100).all()  # BOS and the prompt's first character carry no loss
    assert ((labels == 2).sum(1) == 1).all()  # exactly one EOS target per row


def test_cli_parses_and_validates() -> None:
    cfg = parse_args(["game24", "--steps", "5", "--seed", "3", "--random-move-p", "0.7"])
    assert (cfg.steps, cfg.seed, cfg.data.random_move_p) == (5, 3, 0.7)
    assert cfg.shape.head_dim == 64
    with pytest.raises(ConfigError):
        replace(cfg, device="tpu")
    with pytest.raises(ConfigError):
        parse_args(["game24", "--random-move-p", "1.5"])
