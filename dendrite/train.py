"""Train Dendrite's small default model: ``python -m dendrite.train game24 [options]``.

A LLaMA-architecture ``LlamaForCausalLM`` (head_dim 64, so the FlashInfer kernels apply on GPU)
with the character tokenizer, trained from scratch on the task's documents: step traces and
value judgements from the training split (see :mod:`dendrite.tasks.game24_traces`). Runs on CPU
or CUDA. Seeded and deterministic on CPU: the weights are a function of the options alone
(``tests/test_train.py`` trains twice and compares them exactly). On CUDA, bf16 autocast over
fp32 weights.

Writes an HF checkpoint directory: ``config.json``, ``model.safetensors`` (fp32),
``generation_config.json``, the tokenizer files, and ``loss.csv`` (step, split, loss, lr,
seconds), ``loss.svg`` and ``train.json`` (options, versions, hardware, time, final losses).

Example::

    python -m dendrite.train game24 --device cuda --workers 4 --out data/models/dendrite-24

The defaults are the settings of the shipped ``data/models/dendrite-24`` (see its MODEL.md):
1,800 steps of 256 documents, ``random_move_p`` 0.55, seed 0. Data workers keep a GPU fed;
the loss log and the weights do not depend on their number.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dendrite.errors import ConfigError
from dendrite.tasks import game24
from dendrite.tasks.game24_traces import Document, TraceConfig, sample_document
from dendrite.training.batches import SampledBatches
from dendrite.training.char_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, save_tokenizer
from dendrite.training.loss_svg import write_loss_svg

TASKS = ("game24",)
VALIDATION_SEED = 1_000_003  # validation batches do not depend on the run's seed
VALIDATION_BATCHES = 4


@dataclass(frozen=True)
class ModelShape:
    """The LLaMA hyper-parameters of the trained model (defaults: 3.89 M parameters)."""

    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 576
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.num_heads * self.head_dim != self.hidden_size:
            raise ConfigError(
                f"num_heads * head_dim ({self.num_heads} * {self.head_dim}) must equal "
                f"hidden_size ({self.hidden_size})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("num_heads must be a multiple of num_kv_heads")


@dataclass(frozen=True)
class TrainConfig:
    task: str = "game24"
    out: str = "data/models/dendrite-24"
    steps: int = 1800
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    workers: int = 0
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    log_every: int = 10
    eval_every: int = 250
    max_seconds: float = 0.0  # stop early after this long (0: never); train.json records it
    shape: ModelShape = field(default_factory=ModelShape)
    data: TraceConfig = field(default_factory=TraceConfig)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps and batch_size must be positive")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")


class Game24Sampler:
    """Documents from the training split (picklable, for DataLoader workers)."""

    def __init__(self, data: TraceConfig, split: game24.Split = "train") -> None:
        self.data = data
        self.puzzles = game24.split_puzzles(split)
        self.negatives = game24.unsolvable_puzzles()

    def __call__(self, rng: random.Random) -> Document:
        return sample_document(self.puzzles, self.negatives, rng, self.data)


def llama_config(shape: ModelShape) -> Any:  # a transformers.LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms and embeddings do not."""
    decay: list[torch.nn.Parameter] = []
    plain: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else plain).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train(cfg: TrainConfig, *, progress: bool = True) -> dict[str, object]:
    """Train, save the checkpoint under ``cfg.out`` and return the summary written to
    ``train.json``."""
    from transformers import GenerationConfig, LlamaForCausalLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but torch sees no CUDA device; use --device cpu")
    torch.manual_seed(cfg.seed)
    # initialised from the seeded CPU RNG, then moved (the same init on every device)
    model: Any = cast(Any, LlamaForCausalLM(llama_config(cfg.shape))).to(device)
    optimizer = make_optimizer(model, cfg)
    sampler = Game24Sampler(cfg.data)
    batches = SampledBatches(sampler, cfg.batch_size, cfg.seed, cfg.steps)
    loader = DataLoader(
        batches,
        batch_size=None,
        shuffle=False,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=8 if cfg.workers else None,
        persistent_workers=False,
    )
    val_data = SampledBatches(
        Game24Sampler(cfg.data, split="validation"),
        cfg.batch_size,
        VALIDATION_SEED,
        VALIDATION_BATCHES,
    )
    val_batches = [val_data[i] for i in range(VALIDATION_BATCHES)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def validation_loss() -> float:
        model.eval()
        with torch.no_grad(), autocast:
            losses = [
                model(**{k: v.to(device) for k, v in b.items()}).loss.float().item()
                for b in val_batches
            ]
        model.train()
        return sum(losses) / len(losses)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[int, str, float, float, float]] = []
    start = time.perf_counter()
    running = torch.zeros((), device=device)
    since = 0
    steps_done = 0
    bar = tqdm(total=cfg.steps, disable=not progress, desc=f"train {cfg.task}", unit="step")
    model.train()
    for step, batch in enumerate(loader):
        lr = learning_rate(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast:
            loss = model(
                input_ids=batch["input_ids"].to(device, non_blocking=True),
                labels=batch["labels"].to(device, non_blocking=True),
            ).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach().float()
        since += 1
        steps_done = step + 1
        elapsed = time.perf_counter() - start
        last = steps_done == cfg.steps or (cfg.max_seconds > 0 and elapsed > cfg.max_seconds)
        if steps_done % cfg.log_every == 0 or last:
            mean = running.item() / since
            rows.append((steps_done, "train", mean, lr, elapsed))
            running.zero_()
            since = 0
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
        if (cfg.eval_every and steps_done % cfg.eval_every == 0) or last:
            rows.append((steps_done, "validation", validation_loss(), lr, elapsed))
        bar.update(1)
        if last:
            break
    bar.close()
    seconds = time.perf_counter() - start

    model = model.to("cpu").float()
    model.save_pretrained(out)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(
        out
    )
    save_tokenizer(out)
    with open(out / "loss.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "split", "loss", "lr", "seconds"])
        writer.writerows(rows)
    series = {
        split: [(float(r[0]), r[2]) for r in rows if r[1] == split]
        for split in ("train", "validation")
    }
    write_loss_svg(out / "loss.svg", series, f"dendrite {cfg.task}: loss per completion token")
    summary: dict[str, object] = {
        "config": asdict(cfg),
        "steps_done": steps_done,
        "seconds": round(seconds, 1),
        "final_train_loss": next(r[2] for r in reversed(rows) if r[1] == "train"),
        "final_validation_loss": next(r[2] for r in reversed(rows) if r[1] == "validation"),
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "command": " ".join(["python -m dendrite.train", *sys.argv[1:]]),
    }
    (out / "train.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    d, s, t = TrainConfig(), ModelShape(), TraceConfig()
    p = argparse.ArgumentParser(prog="python -m dendrite.train", description=__doc__.split("\n")[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--out", default=d.out)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0: default)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--max-seconds", type=float, default=d.max_seconds)
    p.add_argument("--hidden-size", type=int, default=s.hidden_size)
    p.add_argument("--layers", type=int, default=s.num_layers)
    p.add_argument("--heads", type=int, default=s.num_heads)
    p.add_argument("--kv-heads", type=int, default=s.num_kv_heads)
    p.add_argument("--intermediate-size", type=int, default=s.intermediate_size)
    p.add_argument("--random-move-p", type=float, default=t.random_move_p)
    p.add_argument("--value-fraction", type=float, default=t.value_fraction)
    a = p.parse_args(argv)
    shape = ModelShape(
        hidden_size=a.hidden_size,
        num_layers=a.layers,
        num_heads=a.heads,
        num_kv_heads=a.kv_heads,
        head_dim=a.hidden_size // a.heads,
        intermediate_size=a.intermediate_size,
    )
    data = TraceConfig(random_move_p=a.random_move_p, value_fraction=a.value_fraction)
    return TrainConfig(
        task=a.task,
        out=a.out,
        steps=a.steps,
        seed=a.seed,
        device=a.device,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup_steps,
        workers=a.workers,
        threads=a.threads,
        log_every=a.log_every,
        eval_every=a.eval_every,
        max_seconds=a.max_seconds,
        shape=shape,
        data=data,
    )


def main(argv: Sequence[str] | None = None) -> None:
    summary = train(parse_args(argv))
    keys = ("steps_done", "seconds", "final_train_loss", "final_validation_loss", "parameters")
    print(json.dumps({k: summary[k] for k in keys}))


if __name__ == "__main__":
    main()
