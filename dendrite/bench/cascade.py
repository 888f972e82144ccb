"""``bench gpu`` part (f): two-level cascade against plain paged decode, where each wins.

One decode step of ``B`` branches forked from a ``prefix``-token node (each with 8 tokens of
its own, then the step's new one), attention only, with the TinyLlama-1.1B KV shape (22
layers, 32 query / 4 KV heads, head_dim 64, bf16), timed as the engine runs a decode step:

* ``plan``: host time of one ``plan`` (the cascade plans two levels), median;
* ``gpu``: the 22 layers' ``run`` (append, attention; for the cascade a second kernel and a
  merge) captured as one CUDA graph, median replay time from CUDA events;
* ``step = plan + gpu``: the two run one after the other in a decode step.

Plain reads the prefix ``B`` times; the cascade reads it once (``attention/cascade.py``).
The crossover, in pages saved per step, is what ``CASCADE_MIN_SAVED_PAGES`` is set from.

``--part depth`` (:func:`run_depth`): levels by depth. ``subtrees`` lines fork from the
prefix, each runs ``segment`` tokens on, then forks into ``per`` branches (rows depth-first);
the same step as plain paged decode, as the two-level cascade (the segments read by every
branch at level 1) and with the segments as a second shared level (read once per subtree).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from dendrite.attention.base import BatchLayout, build_layout
from dendrite.attention.cascade import (
    CASCADE_MIN_GROUP_PAGES,
    CASCADE_MIN_SAVED_PAGES,
    split_shared_prefixes,
)
from dendrite.bench.common import environment, print_table
from dendrite.errors import ConfigError
from dendrite.kv.pool import PagePool, PoolConfig
from dendrite.kv.tree import KVBranch, KVTree
from dendrite.model.config import ModelConfig, RopeConfig

LAYERS, HQ, HKV, D = 22, 32, 4, 64
PREFIXES = (256, 1024, 2048, 4096, 8192, 16384)
BRANCHES = (4, 16, 64, 256)
OWN_TOKENS = 8


def _config() -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=HQ * D,
        intermediate_size=5632, num_layers=LAYERS, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
        max_position_embeddings=32768, rms_norm_eps=1e-5, rope=RopeConfig(),
    )  # fmt: skip


def _step_us(prefix: int, branches: int, repeats: int) -> dict[str, Any]:
    from dendrite.attention.flashinfer import FlashInferBackend

    pool, tree, root = _tree(prefix // 16 + branches * (OWN_TOKENS // 16 + 3) + 8, prefix)
    rows = [root] + [tree.fork(root) for _ in range(branches - 1)]
    lists, layout, qkv = _step(pool, tree, rows)
    split = split_shared_prefixes(lists)
    out: dict[str, Any] = {
        "prefix": prefix,
        "branches": branches,
        "saved_pages": 0 if split is None else split.saved_pages,
    }
    for name, cascade in (("plain", False), ("cascade", True)):
        backend = FlashInferBackend(
            pool, _config(), cascade=cascade, min_saved_pages=1, min_group_pages=1, max_depth=1
        )
        out.update(_time_backend(name, backend, layout, qkv, repeats))
        assert backend.cascade_steps == (repeats if cascade and split else 0)
    out["cascade_speedup"] = out["plain_us"] / out["cascade_us"]
    out["cascade_gpu_speedup"] = out["plain_gpu_us"] / out["cascade_gpu_us"]
    del pool
    torch.cuda.empty_cache()
    return out


def _tree(pages: int, prefix: int) -> tuple[PagePool, KVTree, KVBranch]:
    """A pool of ``pages`` random pages (TinyLlama's KV shape, bf16, on the GPU) and a KV tree
    on it whose root holds ``prefix`` tokens."""
    pool = PagePool(
        PoolConfig(
            num_layers=LAYERS, num_pages=pages, num_kv_heads=HKV, head_dim=D, page_size=16,
            dtype=torch.bfloat16, device="cuda",
        )
    )  # fmt: skip
    for t in pool.kv:
        t.normal_()
    tree = KVTree(pool)
    root = tree.new_branch()
    tree.append_batch([(root, [1] * prefix)])
    return pool, tree, root


def _step(
    pool: PagePool, tree: KVTree, rows: list[KVBranch]
) -> tuple[list[list[int]], BatchLayout, torch.Tensor]:
    """``OWN_TOKENS`` tokens of each row's own, then the measured step's token: the rows' page
    lists, the step's layout and random q, k, v rows [B, Hq + 2 Hkv, D]."""
    tree.append_batch([(b, [2] * OWN_TOKENS) for b in rows])
    slots = tree.append_batch([(b, [3]) for b in rows])  # the measured step's token
    lists = [tree.page_list(b) for b in rows]
    pool.flush_copies()
    tree.check_integrity()
    B = len(rows)
    layout = build_layout([1] * B, [len(b) for b in rows], lists, slots, 16, torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, HQ + 2 * HKV, D, generator=g, device="cuda").bfloat16()
    return lists, layout, qkv


def _time_backend(
    name: str, backend: Any, layout: Any, qkv: torch.Tensor, repeats: int
) -> dict[str, float]:
    """``{name}_plan_us`` (median host time of ``plan``), ``{name}_gpu_us`` (the 22 layers'
    ``run`` as one CUDA graph, median replay) and their sum ``{name}_us``."""
    q, k, v = qkv[:, :HQ], qkv[:, HQ : HQ + HKV], qkv[:, HQ + HKV :]
    plans = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backend.plan(layout)
        plans.append(time.perf_counter() - t0)

    def layers() -> None:
        for layer in range(LAYERS):
            backend.run(layer, q, k, v)

    plan_us, gpu_us = statistics.median(plans) * 1e6, _graph_ms(layers, repeats) * 1e3
    return {f"{name}_plan_us": plan_us, f"{name}_gpu_us": gpu_us, f"{name}_us": plan_us + gpu_us}


def _graph_ms(fn: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of replaying ``fn`` captured as one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(
    prefixes: tuple[int, ...] = PREFIXES, branches: tuple[int, ...] = BRANCHES, repeats: int = 30
) -> dict[str, Any]:
    """Every (prefix, branches) pair: plain and cascade step times; the measured crossover."""
    if not torch.cuda.is_available():
        raise ConfigError("bench gpu (cascade) needs a CUDA device")
    rows = [_step_us(p, b, repeats) for p in prefixes for b in branches]
    wins = [r["saved_pages"] for r in rows if r["cascade_gpu_speedup"] > 1.0]
    losses = [r["saved_pages"] for r in rows if r["cascade_gpu_speedup"] <= 1.0]
    result = {
        "what": "one decode step's attention (plan + 22 layers), TinyLlama KV shape, bf16",
        "own_tokens_per_branch": OWN_TOKENS,
        "rows": rows,
        "cascade_wins_from_saved_pages": min(wins) if wins else None,
        "plain_wins_up_to_saved_pages": max(losses) if losses else None,
        "min_saved_pages_in_use": CASCADE_MIN_SAVED_PAGES,
        "min_group_pages_in_use": CASCADE_MIN_GROUP_PAGES,
        "env": environment(),
    }
    print_table(
        ("prefix", "branches", "saved pages", "plain plan+gpu us", "cascade plan+gpu us",
         "plain/cascade", "gpu only"),
        [
            (r["prefix"], r["branches"], r["saved_pages"],
             f"{r['plain_plan_us']:.0f}+{r['plain_gpu_us']:.0f}",
             f"{r['cascade_plan_us']:.0f}+{r['cascade_gpu_us']:.0f}",
             r["cascade_speedup"], r["cascade_gpu_speedup"])
            for r in rows
        ],
    )  # fmt: skip
    return result


# (prefix, subtrees, branches per subtree, segment tokens per subtree)
NESTED = (
    (4096, 8, 8, 256),
    (4096, 8, 8, 1024),
    (4096, 8, 8, 2048),
    (1024, 4, 16, 1024),
    (1024, 4, 16, 4096),
    (1024, 16, 4, 1024),
    (256, 2, 32, 2048),
)


def _nested_us(prefix: int, subtrees: int, per: int, segment: int, repeats: int) -> dict[str, Any]:
    from dendrite.attention.flashinfer import FlashInferBackend

    branches = subtrees * per
    pages = prefix // 16 + subtrees * (segment // 16 + 2) + branches * (OWN_TOKENS // 16 + 3) + 8
    pool, tree, root = _tree(pages, prefix)
    rows = []
    for _ in range(subtrees):  # depth-first: each subtree's rows together
        line = tree.fork(root)
        tree.append_batch([(line, [4] * segment)])
        rows += [line] + [tree.fork(line) for _ in range(per - 1)]
    lists, layout, qkv = _step(pool, tree, rows)
    out: dict[str, Any] = dict(
        prefix=prefix, subtrees=subtrees, per_subtree=per, segment=segment, branches=branches
    )
    for name, cascade, depth in (("plain", False, 1), ("two", True, 1), ("depth", True, None)):
        backend = FlashInferBackend(
            pool, _config(), cascade=cascade, min_saved_pages=1, min_group_pages=1,
            max_depth=depth,
        )  # fmt: skip
        split = backend.cascade_split(lists)
        out[f"{name}_levels"] = 0 if split is None else split.depths
        out[f"{name}_saved_pages"] = 0 if split is None else split.saved_pages
        out.update(_time_backend(name, backend, layout, qkv, repeats))
    out["depth_over_two_gpu"] = out["two_gpu_us"] / out["depth_gpu_us"]
    out["depth_over_two"] = out["two_us"] / out["depth_us"]
    out["depth_over_plain"] = out["plain_us"] / out["depth_us"]
    del pool
    torch.cuda.empty_cache()
    return out


def run_depth(shapes: tuple[tuple[int, int, int, int], ...] = NESTED, repeats: int = 30) -> dict:
    """Levels by depth against the two-level cascade and plain decode on nested trees."""
    if not torch.cuda.is_available():
        raise ConfigError("bench gpu (depth) needs a CUDA device")
    rows = [_nested_us(*shape, repeats) for shape in shapes]
    print_table(
        ("prefix", "subtrees x per", "segment", "saved pages two/depth", "plain us",
         "two-level us", "by depth us", "depth/two gpu", "depth/two", "depth/plain"),
        [
            (r["prefix"], f"{r['subtrees']} x {r['per_subtree']}", r["segment"],
             f"{r['two_saved_pages']}/{r['depth_saved_pages']}",
             f"{r['plain_plan_us']:.0f}+{r['plain_gpu_us']:.0f}",
             f"{r['two_plan_us']:.0f}+{r['two_gpu_us']:.0f}",
             f"{r['depth_plan_us']:.0f}+{r['depth_gpu_us']:.0f}",
             r["depth_over_two_gpu"], r["depth_over_two"], r["depth_over_plain"])
            for r in rows
        ],
    )  # fmt: skip
    return {
        "what": "one decode step's attention (plan + 22 layers) on nested trees: plain, the "
        "two-level cascade, levels by depth; TinyLlama KV shape, bf16",
        "own_tokens_per_branch": OWN_TOKENS,
        "rows": rows,
        "min_group_pages_in_use": CASCADE_MIN_GROUP_PAGES,
        "env": environment(),
    }
