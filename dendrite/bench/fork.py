"""``bench fork``: fork latency through the public API against copying the branch's KV.

For each context length (16 to 131,072 tokens) and tree depth (1 to 1,000) it times
``Engine.fork`` one call at a time, at least 10,000 forks per figure, and reports the
median in microseconds. Every timed fork is of a branch whose own segment holds tokens (the
path that freezes it), and the forked branch is freed untimed. In the same run, the
baseline a cache without paging must pay: copying the branch's contiguous KV
(``[layers, 2, tokens, kv_heads, head_dim]``), whose cost grows with the context.

The model is random and never runs (fork does not touch the weights or the KV contents);
its shape sets only the bytes the baseline copies: 4 layers, 2 KV heads of 64, bf16.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Any

import torch

from dendrite.bench.common import emit_json, environment, median_time, print_table
from dendrite.engine import Branch, Engine, EngineConfig
from dendrite.model.config import ModelConfig, RopeConfig
from dendrite.model.transformer import Transformer

CONTEXTS = (16, 256, 4096, 32768, 131072)
DEPTHS = (1, 10, 100, 1000)


def bench_engine(max_context: int, page_size: int = 16, device: str = "cpu") -> Engine:
    config = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=128, intermediate_size=256,
        num_layers=4, num_heads=2, num_kv_heads=2, head_dim=64,
        max_position_embeddings=2 * max_context, rms_norm_eps=1e-5, rope=RopeConfig(),
    )  # fmt: skip
    model = Transformer(config).to(device=device, dtype=torch.bfloat16)
    model.finish_loading(device)
    pages = (max_context + 4096) // page_size + 2048
    return Engine(model, None, EngineConfig(page_size=page_size, num_pages=pages))


def _time_forks(engine: Engine, base: Branch, n: int) -> list[int]:
    """Latency (ns) of ``n`` forks, each of a branch holding one token of its own."""
    times = []
    fork, free, append = engine.fork, engine.free, engine.tree.append
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(n):
            mid = fork(base)
            append(mid.kv, [0])  # untimed: mid now owns a segment of one token
            t0 = time.perf_counter_ns()
            child = fork(mid)
            t1 = time.perf_counter_ns()
            times.append(t1 - t0)
            free(child)
            free(mid)
    finally:
        if gc_was:
            gc.enable()
    return times


def run(
    forks: int = 10_000,
    contexts: tuple[int, ...] = CONTEXTS,
    depths: tuple[int, ...] = DEPTHS,
    device: str = "cpu",
) -> dict[str, Any]:
    """``device="cuda"``: the pool (and the copy baseline) on the GPU; fork stays host work."""
    engine = bench_engine(max(max(contexts), 16 + max(depths)), device=device)
    cfg = engine.model_config
    fork_us: dict[str, float] = {}
    copy_us: dict[str, float] = {}
    rows = []
    for ctx in contexts:
        base = engine.add([1])
        engine.tree.append(base.kv, [0] * (ctx - 1))  # the context, without running the model
        fork_us[str(ctx)] = statistics.median(_time_forks(engine, base, forks)) / 1000
        kv = torch.zeros(
            cfg.num_layers,
            2,
            ctx,
            cfg.num_kv_heads,
            cfg.head_dim,
            dtype=torch.bfloat16,
            device=device,
        )
        reps = max(5, min(1000, int(2e9 // max(kv.numel() * kv.element_size(), 1) // 100)))
        copy_us[str(ctx)] = median_time(kv.clone, reps, warmup=2) * 1e6
        rows.append(
            (
                "context",
                ctx,
                fork_us[str(ctx)],
                copy_us[str(ctx)],
                copy_us[str(ctx)] / fork_us[str(ctx)],
            )
        )
        engine.free(base)
        del kv
    depth_us: dict[str, float] = {}
    for depth in depths:
        base = engine.add([1])
        engine.tree.append(base.kv, [0] * 15)
        keep = []
        for _ in range(depth - 1):  # each fork + append adds one level under base
            keep.append(engine.fork(base))
            engine.tree.append(base.kv, [0])
        assert base.kv.leaf.depth == depth, (base.kv.leaf.depth, depth)
        depth_us[str(depth)] = statistics.median(_time_forks(engine, base, forks)) / 1000
        rows.append(("depth", depth, depth_us[str(depth)], float("nan"), float("nan")))
        for b in keep:
            engine.free(b)
        engine.free(base)
    engine.check_integrity()
    assert engine.stats().used_pages == 0
    print(f"fork latency, median of {forks} forks each (us); copy = clone of the branch's KV")
    print_table(("axis", "value", "fork_us", "copy_us", "copy/fork"), rows)
    fv = list(fork_us.values())
    dv = list(depth_us.values())
    summary = {
        "max_over_min_context": max(fv) / min(fv),
        "max_over_min_depth": max(dv) / min(dv),
        "max_fork_us": max(fv + dv),
    }
    print(
        f"max/min over contexts {summary['max_over_min_context']:.2f}, "
        f"over depths {summary['max_over_min_depth']:.2f}, slowest median {summary['max_fork_us']:.2f} us"
    )
    return {
        "fork_us": fork_us,
        "fork_depth_us": depth_us,
        "copy_us": copy_us,
        "summary": summary,
        "env": environment(),
    }


def main(args: Any) -> None:
    result = run(forks=args.forks)
    emit_json(result)
