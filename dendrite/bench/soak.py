"""``bench soak``: a long random mix of engine operations with the prefix cache on.

A tiny random LLaMA (``make_random_checkpoint(..., "llama")``, tiny preset, 4-token pages)
over a pool small enough that the cache must evict: prompts made of a few shared system
prompts plus random suffixes (so ``add`` hits the cache), forks, teacher-forced extensions,
batched steps (greedy and sampled), scoring, frees, explicit evictions and, now and then,
``clear_cache``. ``check_integrity()`` runs every ``check_every`` operations and at the end,
and every ``5 * check_every`` a live branch's next-token logits are checked against an
engine without a cache that prefills its whole sequence (a mismatch counts as an integrity
failure); then every branch is freed, the cache cleared, and the pool must be all free.

Most operations are KV-tree operations or small steps, so the run measures the bookkeeping
as much as the model: ops/s is reported, not asserted. The last line is JSON::

    {"ops": n, "ops_per_s": x, "peak_pages": n, "evictions": n, "prefix_hit_tokens": n,
     "integrity_failures": n, "leaked_pages": n}
"""

from __future__ import annotations

import random
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from dendrite.bench.common import emit_json, print_table
from dendrite.engine import Branch, Engine, EngineConfig
from dendrite.errors import PoolExhaustedError
from dendrite.model.loader import load_model
from dendrite.model.random_init import make_random_checkpoint
from dendrite.sampling import SamplingParams

VOCAB = 256
MAX_LIVE = 16  # live branches kept at most (frees win above it)
MAX_LEN = 160  # a branch longer than this is freed rather than grown


def build_engine(path: Path, num_pages: int, page_size: int, watermark: int) -> Engine:
    model = load_model(path, dtype=torch.float32, device=torch.device("cpu"))
    cfg = EngineConfig(
        page_size=page_size,
        num_pages=num_pages,
        backend="torch",
        prefix_cache=True,
        cache_watermark=watermark,
    )
    return Engine(model, None, cfg)


class _Soak:
    """The random driver; ``op()`` runs one operation and names it."""

    def __init__(self, engine: Engine, seed: int) -> None:
        self.e = engine
        self.rng = random.Random(seed)
        rng = self.rng
        self.systems = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(8, 48))] for _ in range(4)]  # fmt: skip
        self.greedy = SamplingParams(max_new_tokens=24)
        self.sampled = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=20)

    def kv_matches(self, cold: Engine) -> bool | None:
        """Next-token logits of a live branch (through a fork) against ``cold``, an engine
        without a cache that prefills the whole sequence. None: nothing to check now."""
        e = self.e
        todo = [b for b in e.branches.values() if b.pending and len(b) < MAX_LEN]
        if not todo:
            return None
        b = self.rng.choice(todo)
        f = e.fork(b, seed=0)
        try:
            logits = e.forward([f])[0]
        except PoolExhaustedError:
            return None
        finally:
            e.free(f)
        c = cold.add(e.token_ids(b))
        try:
            ref = cold.forward([c])[0]
        finally:
            cold.free(c)
        return bool(torch.allclose(logits, ref, rtol=1e-4, atol=1e-4))

    def _pick(self) -> Branch:
        return self.rng.choice(list(self.e.branches.values()))

    def op(self) -> str:
        e, rng = self.e, self.rng
        n = len(e.branches)
        r = rng.random()
        if n == 0 or (r < 0.12 and n < MAX_LIVE):
            ids = rng.choice(self.systems) + [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))]  # fmt: skip
            params = self.greedy if rng.random() < 0.5 else self.sampled
            e.add(ids, params, seed=rng.randrange(1 << 30))
            return "add"
        if r < 0.30 and n < MAX_LIVE:
            e.fork(self._pick())
            return "fork"
        if r < 0.40:
            b = self._pick()
            if len(b) + 3 > MAX_LEN:
                e.free(b)
                return "free"
            e.extend(b, [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 3))])
            return "extend"
        if r < 0.62:
            todo = [b for b in e.branches.values() if b.pending and not b.finished]
            todo = [b for b in todo if len(b) < MAX_LEN]
            if not todo:
                return "step-none"
            e.step(rng.sample(todo, min(len(todo), rng.randint(1, 4))))
            return "step"
        if r < 0.66:
            todo = [b for b in e.branches.values() if b.pending and len(b) < MAX_LEN]
            if not todo:
                return "score-none"
            reqs = [(b, [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 4))])
                    for b in rng.sample(todo, min(len(todo), 2))]  # fmt: skip
            e.score_many(reqs)
            return "score"
        if r < 0.70:
            todo = [b for b in e.branches.values() if len(b.pending) > 1]
            if not todo:
                return "prefill-none"
            e.prefill(todo[:2])
            return "prefill"
        if r < 0.975:
            e.free(self._pick())
            return "free"
        if r < 0.998:
            assert e.prefix is not None
            e.prefix.evict_one()
            return "evict"
        e.clear_cache()
        return "clear-cache"


def run(
    ops: int = 10_000,
    seed: int = 0,
    *,
    num_pages: int = 96,
    page_size: int = 4,
    watermark: int = 4,
    check_every: int = 100,
) -> dict[str, Any]:
    """Run ``ops`` random operations; print a table; return the summary (see the docstring)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: intra-op threads cost more than they give
    try:
        return _run(ops, seed, num_pages, page_size, watermark, check_every)
    finally:
        torch.set_num_threads(threads)


def _run(
    ops: int, seed: int, num_pages: int, page_size: int, watermark: int, check_every: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_checkpoint(Path(tmp) / "tiny", "llama", seed=seed)
        engine = build_engine(path, num_pages, page_size, watermark)
    cold = Engine(engine.model, None, EngineConfig(page_size=page_size, num_pages=256))
    assert engine.prefix is not None
    soak = _Soak(engine, seed)
    counts: Counter[str] = Counter()
    failures = 0
    mismatches = 0
    first_failure = ""
    peak = 0
    t0 = time.perf_counter()
    for i in range(1, ops + 1):
        try:
            counts[soak.op()] += 1
        except PoolExhaustedError:
            counts["exhausted"] += 1  # documented: nothing changed; make room and go on
            for b in list(engine.branches.values())[: max(1, len(engine.branches) // 2)]:
                engine.free(b)
        peak = max(peak, engine.pool.num_used)
        if i % check_every == 0 or i == ops:
            try:
                engine.check_integrity()
            except AssertionError:
                failures += 1
                first_failure = first_failure or traceback.format_exc(limit=3)
        if i % (5 * check_every) == 0:  # the KV itself: logits as a cold engine computes them
            ok = soak.kv_matches(cold)
            counts["kv check"] += ok is not None
            if ok is False:
                mismatches += 1
                first_failure = first_failure or f"op {i}: logits differ from a cold engine"
    seconds = time.perf_counter() - t0
    engine.free_all()
    engine.clear_cache()
    try:
        engine.check_integrity()
    except AssertionError:
        failures += 1
        first_failure = first_failure or traceback.format_exc(limit=3)
    leaked = engine.pool.num_used
    stats = engine.prefix.stats()
    rows: list[tuple[str, Any]] = sorted(counts.items())
    rows += [
        ("steps (forwards)", engine.num_steps),
        ("pool pages", num_pages),
        ("page size", page_size),
        ("peak pages used", peak),
        ("prompt tokens looked up", stats.prompt_tokens),
        ("prefix hit tokens", stats.hit_tokens),
        ("evicted segments", stats.evicted_segments),
        ("evicted pages", stats.evicted_pages),
        ("integrity checks", ops // check_every + 1),
        ("kv checks failed", mismatches),
        ("seconds", seconds),
    ]
    print_table(("what", "count"), rows)
    if first_failure:
        print(first_failure)
    return {
        "ops": ops,
        "ops_per_s": round(ops / seconds, 1),
        "peak_pages": peak,
        "evictions": stats.evicted_segments,
        "prefix_hit_tokens": stats.hit_tokens,
        "integrity_failures": failures + mismatches,
        "leaked_pages": leaked,
    }


def main(args: Any) -> None:
    emit_json(run(ops=args.ops, seed=args.seed))
