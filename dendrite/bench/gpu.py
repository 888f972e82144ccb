"""``bench gpu``: Dendrite on FlashInfer against HF transformers, same GPU, same weights.

Both run in one process on the same random TinyLlama-1.1B-shape checkpoint (bf16, saved by
transformers itself). HF runs first and is freed before Dendrite loads, so each side's peak
memory is its own.

* **tree**: 64 branches from one 4,096-token prompt, 64 new tokens each, sampled
  (temperature 1, top-k 50). HF: ``generate(num_return_sequences=64, do_sample=True)``,
  which expands the prompt to 64 rows. Dendrite: ``Engine.run([root], n=64)`` feeds the
  prompt once and branches it 64 ways (every branch reads all the prompt's pages), then all
  branches decode in one batch per step, as a cascade (the prompt read once per step).
  Tokens/s over the whole call, prefill included (Dendrite: from ``add`` to the outputs
  read back, plus ``free_all``; HF: ``generate``); peak GPU memory; KV pages held against
  the unique-token minimum (counted outside the timed call). Dendrite greedy and with the
  cascade off too.
* **batch-1 decode**: greedy tokens/s against HF and against the bandwidth roofline
  (bytes of the weights read per token / 4.3 TB/s): over a whole ``generate`` of 64 tokens
  (the 128-token prompt's prefill included), and per decode step (64 tokens less 1, over
  the time of 64 less the time of 1), the roofline's own terms. Dendrite on its Triton GEMV
  path (``dendrite/model/gemv.py``) and, for the ratio, on cuBLAS.
* **beam search**: 8 beams, 64 new tokens from a 1,024-token prompt, no EOS: HF
  ``generate(num_beams=8)`` against ``dendrite.search.beam.beam_search`` (one batched
  forward per token; pipelined: the beams' choice and pages stay on the GPU, the host one
  step ahead); the best beam's ids are compared. Dendrite on its split-K Triton GEMMs
  (``dendrite/model/skinny.py``) and, for the ratios, on cuBLAS, and with the beams as forks
  in the KV tree (each step waits for the last one's choice).
* Each time is a median: the tree over 9 runs (HF: 3), batch-1 over 9, beam search over 3;
  both sides are warmed by one whole run first (HF's first beam search took about 4x its
  later ones).
* **where a decode step goes**: the whole ``Engine.step`` (CUDA graphs for decode steps);
  the eager path's host work before the model (KV append, layout, ``plan``); the model's
  eager forward; the same forward captured by hand as one CUDA graph (GPU time only). Then a
  profile of a few engine steps: torch operators by host time and by device time, and the
  Python functions by own time (cProfile), which is where the host's share goes.
"""

from __future__ import annotations

import cProfile
import dataclasses
import functools
import gc
import io
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dendrite.attention.base import build_layout
from dendrite.bench.common import emit_json, environment, median_time, print_table
from dendrite.engine import Branch, Engine
from dendrite.errors import ConfigError
from dendrite.model.random_init import make_random_checkpoint
from dendrite.sampling import SamplingParams

HBM_BYTES_S = 4.3e12  # H200 device-to-device copy ceiling measured on the lent machine
TOP_K = 50  # HF's default top-k when sampling; Dendrite samples the same way
_DENDRITE_KEYS = (
    "backend", "fused_kernels", "cuda_graphs", "cuda_graph_buckets", "cuda_graphs_error",
    "pool_pages", "pool_gib", "prefill_kernel", "fused_swiglu", "gc_tracked",
)  # fmt: skip


def _sync() -> None:
    torch.cuda.synchronize()


def _times(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None) -> float:
    """Median seconds of ``repeats`` synchronised calls of ``fn`` (after ``warmup()``)."""
    if warmup is not None:
        warmup()
    return median_time(fn, repeats, warmup=0)


def _timed_peak(
    fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None
) -> tuple[float, float]:
    """``_times`` plus the peak GPU memory (GiB) allocated meanwhile, all that is resident
    (weights, KV pool, workspaces) included."""
    _sync()
    torch.cuda.reset_peak_memory_stats()
    t = _times(fn, repeats, warmup)
    return t, torch.cuda.max_memory_allocated() / 2**30


def _release() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, vocab, (n - 1,), generator=g).tolist()]


# ---------------------------------------------------------------- HF transformers


def _hf(
    path: Path,
    tree_prompt: list[int],
    b1_prompt: list[int],
    beam_prompt: list[int],
    cfg: dict[str, int],
) -> dict:
    import transformers

    # Any: transformers' stubs mistype nn.Module.to / .cuda on its models
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model = model.to("cuda").eval()
    model.generation_config.eos_token_id = None  # always the full number of new tokens
    branches, new, reps = cfg["branches"], cfg["new_tokens"], cfg["hf_repeats"]

    def gen(prompt: list[int], n: int, **kw: Any) -> torch.Tensor:
        ids = torch.tensor([prompt], device="cuda")
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, pad_token_id=0, **kw
            )
        return out[:, len(prompt) :]

    sampled = dict(do_sample=True, top_k=TOP_K, temperature=1.0, num_return_sequences=branches)
    tree = lambda: gen(tree_prompt, new, **sampled)  # noqa: E731
    t_tree, peak = _timed_peak(tree, reps, tree)  # warmed by a whole run, as Dendrite is
    b1_ids: list[int] = []

    def b1() -> None:
        b1_ids[:] = gen(b1_prompt, cfg["b1_tokens"], do_sample=False)[0].tolist()

    t_b1 = _times(b1, reps, lambda: gen(b1_prompt, 2, do_sample=False))
    t_first = _times(lambda: gen(b1_prompt, 1, do_sample=False), reps, None)
    beam = dict(num_beams=cfg["beams"], do_sample=False, early_stopping=False, length_penalty=1.0)
    beam_ids: list[int] = []

    def hf_beam() -> None:
        beam_ids[:] = gen(beam_prompt, new, **beam)[0].tolist()

    t_beam, beam_error = 0.0, None
    if cfg["beams"]:
        try:
            t_beam = _times(hf_beam, cfg["beam_repeats"], hf_beam)
        except Exception as e:  # keep the other results
            beam_error = f"{type(e).__name__}: {e}"[:300]
    result = {
        "beam_s": t_beam,
        "beam_error": beam_error,
        "beam_ids": beam_ids,
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "tree_s": t_tree,
        "tree_tok_s": branches * new / t_tree,
        "tree_peak_gib": peak,
        "b1_tok_s": cfg["b1_tokens"] / t_b1,
        "b1_decode_tok_s": (cfg["b1_tokens"] - 1) / (t_b1 - t_first),
        "b1_ids": b1_ids,
    }
    return result


# ---------------------------------------------------------------- Dendrite


def _tree(engine: Engine, prompt: list[int], cfg: dict[str, int], params: SamplingParams) -> dict:
    """One tree run: ``Engine.run(n=64)`` feeds the whole prompt once (its last position's
    logits only), forks, and each branch samples its first token with its own seed from
    those logits, as HF's 64 identical rows each sample theirs; the pipelined decode goes
    on from those samples on the GPU. Then the branches' outputs are read back.

    ``total_s`` is what the bench times: from ``add`` to the outputs in hand, plus
    ``free_all``. The KV count against the unique-token minimum (``engine.stats()``, a walk
    of the tree) and the distinct-output check are measurement, outside it. To tell a slow
    host or a collection from a slow GPU: ``wait_s``, the time the host waited for the GPU
    in pipelined decode (a step's samples, a graph's input copies; near 0 in a pipelined
    run: the host was the bottleneck; the unpipelined variant waits inside the sampler's
    copy instead, not counted), ``gc_runs`` the garbage collections by generation and
    ``gc_ms`` their time (the whole call: the stats walk too), ``start`` the wall-clock time
    it began (to match a GPU clock log).
    """
    with _GcClock() as gcc:
        out = _tree_timed(engine, prompt, cfg, params)
    return {**out, "gc_runs": gcc.runs, "gc_ms": gcc.ms}


def _tree_timed(
    engine: Engine, prompt: list[int], cfg: dict[str, int], params: SamplingParams
) -> dict:
    start, wait0 = time.time(), _host_waits(engine)
    marks = [time.perf_counter()]
    base_pages = engine.pool.num_used
    root = engine.add(prompt, params, seed=0)
    # the prompt, 64 first samples, then the pipelined decode (CUDA graphs), one step a token
    branches = engine.run([root], n=cfg["branches"])
    _sync()
    marks.append(time.perf_counter())
    outputs = [engine.output_ids(b) for b in branches]
    marks.append(time.perf_counter())
    wait_s = _host_waits(engine) - wait0
    assert all(len(o) == cfg["new_tokens"] for o in outputs)
    # KV memory against the unique-token minimum (what the last step held: the most)
    kv_pages = engine.pool.num_used - base_pages
    unique = engine.stats().unique_tokens  # tokens in the KV tree, each counted once
    t_free = time.perf_counter()
    engine.free_all()
    free_s = time.perf_counter() - t_free
    return {
        "start": start,
        "total_s": marks[2] - marks[0] + free_s,
        "wait_s": wait_s,
        "run_s": marks[1] - marks[0],  # add, the prompt, forks, 64 x 64 samples
        "outputs_s": marks[2] - marks[1],
        "free_s": free_s,
        "distinct_branches": len({tuple(o) for o in outputs}),
        "kv_pages": kv_pages,
        "kv_pages_unique_min": -(-unique // engine.config.page_size),
        "kv_over_unique": kv_pages / -(-unique // engine.config.page_size),
    }


def _tree_runs(
    engine: Engine, prompt: list[int], cfg: dict[str, int], params: SamplingParams
) -> tuple[dict, float, list[list[float]]]:
    """``_tree`` warmed by one run then repeated: the median run's figures (by ``total_s``),
    the peak GPU memory (GiB) allocated meanwhile, all that is resident included, and every
    timed run's (start, total_s, wait_s, collections of generations 0, 1, 2, their ms) in
    the order they ran."""
    _tree(engine, prompt, cfg, params)
    _sync()
    torch.cuda.reset_peak_memory_stats()
    timed = [_tree(engine, prompt, cfg, params) for _ in range(cfg["tree_repeats"])]
    runs = sorted(timed, key=lambda r: r["total_s"])
    keys = ("start", "total_s", "wait_s")
    order = [[*(round(r[k], 5) for k in keys), *r["gc_runs"], round(r["gc_ms"], 2)] for r in timed]
    return runs[len(runs) // 2], torch.cuda.max_memory_allocated() / 2**30, order


def _host_waits(engine: Engine) -> float:
    """Seconds the engine's host has waited for its GPU so far (pipelined samples, graph
    input copies)."""
    graphs = engine._graphs
    return engine.sample_wait_s + (graphs.copy_wait_s if graphs is not None else 0.0)


class _GcClock:
    """Python's garbage collections while it is on (a ``gc.callbacks`` hook): how many of
    each generation (``runs``) and the milliseconds they took (``ms``)."""

    def __init__(self) -> None:
        self.runs, self.ms, self._start = [0, 0, 0], 0.0, 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.runs[info["generation"]] += 1
            self.ms += 1e3 * (time.perf_counter() - self._start)

    def __enter__(self) -> _GcClock:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def _step_parts(engine: Engine, branches: list[Branch], repeats: int) -> dict[str, Any]:
    """Split one decode step of ``branches`` (one pending token each) into its parts.

    The KV append is rolled back after each measurement, so the tree ends as it started.
    """
    tree, model, backend = engine.tree, engine.model, engine.backend
    items = [(b.kv, b.pending) for b in branches]

    def prepare() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        slots = tree.append_batch(items)
        layout = build_layout(
            [1] * len(items), [len(kv) for kv, _ in items],
            [tree.page_list(kv) for kv, _ in items], slots, tree.page_size, engine.device,
        )  # fmt: skip
        backend.plan(layout)
        ids = torch.tensor([t for _, toks in items for t in toks], device=engine.device)
        rows = torch.arange(len(items), device=engine.device)
        return ids, layout.positions, rows

    def rollback() -> None:
        for kv, _ in items:
            tree.truncate(kv, 1)

    def host() -> None:
        prepare()
        rollback()

    t_host = _times(host, repeats, host)
    ids, positions, rows = prepare()

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(ids, positions, backend, rows)

    t_fwd = _times(forward, repeats, forward)
    parts: dict[str, Any] = {"host_prepare_ms": 1e3 * t_host, "forward_eager_ms": 1e3 * t_fwd}
    try:  # the same forward as one CUDA graph: launch overhead gone, GPU time left
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            forward()
        parts["forward_graph_ms"] = 1e3 * _times(graph.replay, repeats, graph.replay)
        del graph
    except Exception as e:  # a backend that cannot be captured yet: say so, keep the rest
        parts["forward_graph_error"] = f"{type(e).__name__}: {e}"[:300]
    rollback()

    t_step = _times(lambda: engine.step(branches), repeats, None)  # advances the branches
    parts["step_ms"] = 1e3 * t_step
    return parts


def _profile(engine: Engine, branches: list[Branch], steps: int) -> dict[str, Any]:
    """Where ``steps`` engine steps of ``branches`` go: torch operators (host and device time
    per step) and Python functions by own time per step (cProfile)."""
    from torch.profiler import ProfilerActivity, profile

    engine.step(branches)
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step(branches)
        _sync()
    events = list(prof.key_averages())

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)))

    def rows(key: Callable[[Any], float]) -> list[dict[str, Any]]:
        top = sorted(events, key=key, reverse=True)[:12]
        return [
            {
                "op": e.key[:70],
                "calls_per_step": e.count / steps,
                "host_ms": e.self_cpu_time_total / 1e3 / steps,
                "device_ms": device_us(e) / 1e3 / steps,
            }
            for e in top
        ]

    out: dict[str, Any] = {
        "steps": steps,
        "by_host": rows(lambda e: e.self_cpu_time_total),
        "by_device": rows(device_us),
        "device_ms_per_step": sum(device_us(e) for e in events) / 1e3 / steps,
    }
    prof_py = cProfile.Profile()
    prof_py.enable()
    for _ in range(steps):
        engine.step(branches)
    _sync()
    prof_py.disable()
    stats = pstats.Stats(prof_py, stream=io.StringIO())
    funcs = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]  # type: ignore[attr-defined]
    out["python_by_own_time"] = [
        {
            "function": f"{Path(file).name}:{line} {name}",
            "calls_per_step": cc / steps,
            "own_ms": 1e3 * tt / steps,
            "cumulative_ms": 1e3 * ct / steps,
        }
        for (file, line, name), (cc, _nc, tt, ct, _callers) in funcs
    ]
    return out


def _diagnose(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The step breakdown is a diagnostic: if it fails, report why and keep the results."""
    try:
        return fn()
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _dendrite(
    path: Path,
    tree_prompt: list[int],
    b1_prompt: list[int],
    beam_prompt: list[int],
    cfg: dict[str, int],
) -> dict:
    new = cfg["new_tokens"]
    # pages for the prompt, plus per branch a copy-on-write page and its own tokens, plus slack
    pages = len(tree_prompt) // 16 + cfg["branches"] * (new // 16 + 2) + 256
    engine = Engine.from_pretrained(path, device="cuda", dtype=torch.bfloat16, num_pages=pages)
    mc = engine.model_config
    result: dict[str, Any] = {
        "backend": engine.backend.name,
        "fused_kernels": engine.model.fused_kernels,
        "prefill_kernel": getattr(engine.backend, "prefill_kernel", None),
        "fused_swiglu": engine.model.swiglu_kernels,  # 17-64-row steps: skinny.swiglu
        "pool_pages": pages,
        "pool_gib": engine.pool.config.page_bytes * pages / 2**30,
        "gc_tracked": len(gc.get_objects()),  # what a full collection walks, HF's model gone
    }
    sampled = SamplingParams(max_new_tokens=new, temperature=1.0, top_k=TOP_K, ignore_eos=True)
    greedy = SamplingParams(max_new_tokens=new, ignore_eos=True)
    backend: Any = engine.backend
    config = engine.config
    kernel = backend.prefix_kernel  # "flashinfer" where the model does not fit the Triton one
    runs = (
        ("tree", sampled, True, "auto", kernel),
        ("tree_greedy", greedy, True, "auto", kernel),
        ("tree_plain", sampled, False, "auto", kernel),  # every branch reads the prompt itself
        ("tree_nopipe", sampled, True, "off", kernel),  # each step prepared after the last
        ("tree_fi_level0", sampled, True, "auto", "flashinfer"),  # the cascade on FlashInfer
        ("tree_again", sampled, True, "auto", kernel),  # the first, again: a slow start?
    )
    for name, params, cascade, pipeline, level0 in runs:
        backend.cascade, backend.prefix_kernel = cascade, level0
        engine.config = dataclasses.replace(config, pipeline=pipeline)
        run, peak, order = _tree_runs(engine, tree_prompt, cfg, params)
        t = run["total_s"]
        result.update({f"{name}_s": t, f"{name}_tok_s": cfg["branches"] * new / t})
        result[f"{name}_peak_gib"] = peak
        result.setdefault("tree_runs", {})[name] = order  # each run: start, total_s, wait_s, gc
        if name == "tree":
            result["tree_phases"] = run  # the median run's parts
    backend.cascade, backend.prefix_kernel, engine.config = config.cascade, kernel, config
    skinny = result["skinny_kernels"] = engine.model.skinny_kernels
    result["tree_cascade_steps"] = engine._graphs.cascade_steps if engine._graphs else None

    b1_ids: list[int] = []

    def b1(n: int) -> None:
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        b1_ids[:] = engine.generate(b1_prompt, params)[0].output_ids

    # the GEMV path (Triton, fused prologues, PDL) and, for the ratio, cuBLAS + FlashInfer
    for label, gemv in (("cublas_", False), ("", True)):
        result[f"b1_{label}gemv"] = engine.use_gemv_kernels(gemv)
        n = cfg["b1_tokens"]
        t_b1 = _times(lambda: b1(n), cfg["b1_repeats"], lambda: b1(n))  # noqa: B023
        t_first = _times(lambda: b1(1), cfg["b1_repeats"], lambda: b1(1))
        result[f"b1_{label}tok_s"] = n / t_b1
        result[f"b1_{label}decode_tok_s"] = (n - 1) / (t_b1 - t_first)  # after the first token
    b1(cfg["b1_tokens"])
    untied = 0 if mc.tie_word_embeddings else mc.vocab_size * mc.hidden_size
    weight_bytes = (mc.num_params - untied) * engine.dtype.itemsize  # the embedding: one row
    result.update(
        b1_ids=b1_ids,
        weight_bytes_per_token=weight_bytes,
        roofline_tok_s=HBM_BYTES_S / weight_bytes,
    )

    if cfg["beams"]:
        if skinny:  # the same search on cuBLAS + FlashInfer's norms, for the ratio
            engine.use_skinny_kernels(False)
            result["beam_cublas"] = _diagnose(lambda: _beam(engine, beam_prompt, cfg))
            engine.use_skinny_kernels(True)
        result["beam"] = _diagnose(lambda: _beam(engine, beam_prompt, cfg))
        # the beams as branches of the KV tree, each step waiting for the last one's choice
        result["beam_tree"] = _diagnose(lambda: _beam(engine, beam_prompt, cfg, False))
    result["cuda_graphs"] = engine._graphs is not None and not engine.graphs_error
    result["cuda_graph_buckets"] = (
        sorted({b for b, _ in engine._graphs._graphs}) if engine._graphs else []
    )
    result["cuda_graphs_error"] = engine.graphs_error

    # where a decode step goes: batch 1 and the 64-branch tree
    one = engine.add(b1_prompt, SamplingParams(max_new_tokens=10_000, ignore_eos=True))
    engine.step([one])
    result["step_parts_b1"] = _diagnose(lambda: _step_parts(engine, [one], cfg["parts_repeats"]))
    result["profile_b1"] = _diagnose(lambda: _profile(engine, [one], 5))
    engine.free_all()
    root = engine.add(tree_prompt, sampled)
    engine.prefill([root])
    branches = [engine.branches[o.branch] for o in engine.branch_out(root, cfg["branches"])]
    parts_params = SamplingParams(max_new_tokens=10_000, temperature=1.0, top_k=TOP_K)
    for b in branches:
        b.params = parts_params  # room for the extra measured steps
    result["step_parts_tree"] = _diagnose(
        lambda: _step_parts(engine, branches, cfg["parts_repeats"])
    )
    result["profile_tree"] = _diagnose(lambda: _profile(engine, branches, 5))
    engine.free_all()
    engine.check_integrity()
    return result


def _beam(
    engine: Engine, prompt: list[int], cfg: dict[str, int], pipelined: bool = True
) -> dict[str, Any]:
    from dendrite.search.beam import beam_search

    ids: list[int] = []

    def run() -> None:
        res = beam_search(
            engine, prompt, num_beams=cfg["beams"], max_new_tokens=cfg["new_tokens"],
            eos_token_ids=(), pipelined=pipelined,
        )  # fmt: skip
        ids[:] = res.beams[0].output_ids

    t = _times(run, cfg["beam_repeats"], run)
    engine.check_integrity()
    return {"beam_s": t, "beam_ids": list(ids)}


def _beam_token_pages(path: Path, prompt: list[int], cfg: dict[str, int]) -> dict[str, Any]:
    """The beam search again on a token-granular pool (``page_size=1``): its time, and the
    KV slots it holds against 16-token pages (which hold up to a partial page per beam more)."""
    from dendrite.search.beam import beam_search

    out: dict[str, Any] = {}
    for page_size in (16, 1):
        engine = Engine.from_pretrained(
            path, device="cuda", dtype=torch.bfloat16, page_size=page_size
        )
        results: list[Any] = []

        def run(e: Engine = engine, results: list[Any] = results) -> None:
            results[:] = [
                beam_search(
                    e, prompt, num_beams=cfg["beams"], max_new_tokens=cfg["new_tokens"],
                    eos_token_ids=(), pipelined=False,
                )
            ]  # fmt: skip

        t = _times(run, cfg["beam_repeats"], run)
        res = results[0]
        out[f"page{page_size}"] = {
            "seconds": t, "peak_pages": res.peak_pages, "kv_slots": res.peak_pages * page_size,
            "pages_vs_unique": res.pages_ratio, "best_ids": res.beams[0].output_ids,
        }  # fmt: skip
        engine.check_integrity()
        del engine
        _release()
    out["same_best_beam"] = out["page1"].pop("best_ids") == out["page16"].pop("best_ids")
    out["slots_page1_over_page16"] = out["page1"]["kv_slots"] / out["page16"]["kv_slots"]
    out["time_page1_over_page16"] = out["page1"]["seconds"] / out["page16"]["seconds"]
    return out


def _beam_in(
    path: Path, prompt: list[int], cfg: dict[str, int], dtype: torch.dtype
) -> dict[str, Any]:
    """All beams and their times, HF against Dendrite, both in ``dtype`` on the GPU (the same
    bf16 weights, converted): whether the beams are identical where rounding is finer than
    bf16's (fp16: 3 more mantissa bits; fp32). Dendrite runs FlashInfer in fp16; in fp32 the
    FlashInfer backend's float32 mode (FlashInfer serves fp16/bf16 only): the prompt's
    attention on the torch reference, the decode steps as CUDA graphs, every GEMM and the
    decode attention on Triton kernels at 3xTF32 (fp32's accuracy), the search pipelined. Medians of ``beam_repeats`` runs each, after one."""
    import transformers

    from dendrite.search.beam import beam_search

    k, new = cfg["beams"], cfg["new_tokens"]
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model = model.to("cuda").eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([prompt], device="cuda")
    outs: list[Any] = []

    def hf() -> None:
        with torch.inference_mode():
            outs[:] = [model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, pad_token_id=0,
                num_beams=k, num_return_sequences=k, do_sample=False, early_stopping=False,
                length_penalty=1.0, output_scores=True, return_dict_in_generate=True,
            )]  # fmt: skip

    t_hf = _times(hf, cfg["beam_repeats"], hf)
    out = outs[0]
    hf_beams = [row[len(prompt) :].tolist() for row in out.sequences]
    hf_scores = out.sequences_scores.tolist()
    engine = Engine.from_pretrained(path, device="cuda", dtype=dtype)
    results: list[Any] = []

    def run() -> None:
        results[:] = [
            beam_search(engine, prompt, num_beams=k, max_new_tokens=new, eos_token_ids=())
        ]

    t_ours = _times(run, cfg["beam_repeats"], run)
    res = results[0]
    ours = [b.output_ids for b in res.beams]
    gaps = [abs(b.score - s) for b, s in zip(res.beams, hf_scores, strict=True)]
    engine.check_integrity()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "dendrite_backend": engine.backend.name,
        "float32_mode": bool(getattr(engine.backend, "float32", False)),
        "cuda_graphs": engine._graphs is not None and engine.graphs_error is None,
        # each search's steps (the graphs count those of the warm-up and timed runs too)
        "cascade_steps": (engine._graphs.cascade_steps if engine._graphs is not None else 0)
        // (1 + cfg["beam_repeats"]),
        "steps": res.steps,
        "beams_identical": ours == hf_beams,
        "beams_equal": sum(x == y for x, y in zip(ours, hf_beams, strict=True)),
        "beams": k,
        "max_score_diff": max(gaps),
        "dendrite_s": t_ours,
        "hf_s": t_hf,
        "speedup": t_hf / t_ours,
    }


# ---------------------------------------------------------------- the program


def _versions() -> dict[str, Any]:
    import transformers

    info = environment()
    info.update(transformers=transformers.__version__, cuda=torch.version.cuda)
    try:
        import flashinfer

        info["flashinfer"] = flashinfer.__version__
    except ImportError:
        info["flashinfer"] = None
    info["command"] = " ".join(getattr(sys, "orig_argv", sys.argv))
    return info


def run(
    prompt_len: int = 4096,
    branches: int = 64,
    new_tokens: int = 64,
    b1_tokens: int = 64,
    b1_repeats: int = 9,
    beam_repeats: int = 3,
    tree_repeats: int = 9,
    hf_repeats: int = 3,
    parts_repeats: int = 20,
    beams: int = 8,
    beam_prompt_len: int = 1024,
) -> dict[str, Any]:
    """Measure everything, print a table, return JSON-able results (see the module doc)."""
    if not torch.cuda.is_available():
        raise ConfigError("bench gpu needs a CUDA device")
    cfg = dict(
        prompt_len=prompt_len, branches=branches, new_tokens=new_tokens, b1_tokens=b1_tokens,
        b1_repeats=b1_repeats, beam_repeats=beam_repeats,
        tree_repeats=tree_repeats, hf_repeats=hf_repeats, parts_repeats=parts_repeats,
        beams=beams, beam_prompt_len=beam_prompt_len,
    )  # fmt: skip
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_checkpoint(
            Path(tmp) / "tinyllama", "llama", preset="tinyllama-1.1b", dtype=torch.bfloat16
        )
        vocab = 32000
        tree_prompt = _prompt(prompt_len, vocab, seed=0)
        b1_prompt = _prompt(128, vocab, seed=1)
        beam_prompt = _prompt(beam_prompt_len, vocab, seed=2)
        hf = _hf(path, tree_prompt, b1_prompt, beam_prompt, cfg)
        _release()  # HF's model is gone: Dendrite's peak memory is its own
        ours = _dendrite(path, tree_prompt, b1_prompt, beam_prompt, cfg)
        _release()
        other: dict[str, Any] = {}
        if beams:
            other["token_pages"] = _diagnose(
                functools.partial(_beam_token_pages, path, beam_prompt, cfg)
            )
        for dt in (torch.float16, torch.float32) if beams else ():
            other[str(dt).removeprefix("torch.")] = _diagnose(
                functools.partial(_beam_in, path, beam_prompt, cfg, dt)
            )
            _release()
    same = 0
    for x, y in zip(ours.pop("b1_ids"), hf.pop("b1_ids"), strict=True):
        if x != y:
            break
        same += 1
    beam: dict[str, Any] = {}
    if beams:
        ours_beam = ours.pop("beam")
        hf_ids = hf.pop("beam_ids")  # new tokens only, as ours
        if "error" in ours_beam or hf["beam_error"]:
            beam = {"dendrite_error": ours_beam.get("error"), "hf_error": hf["beam_error"]}
        else:
            ids = ours_beam["beam_ids"]
            beam = {
                "dendrite_s": ours_beam["beam_s"],
                "hf_s": hf["beam_s"],
                "speedup": hf["beam_s"] / ours_beam["beam_s"],
                "skinny_kernels": ours["skinny_kernels"],
                "dendrite_cublas_s": ours.get("beam_cublas", {}).get("beam_s"),
                "dendrite_tree_path_s": ours.get("beam_tree", {}).get("beam_s"),
                "tree_path_best_beam_equal": ours.get("beam_tree", {}).get("beam_ids") == ids,
                "best_beam_ids_equal": ids == hf_ids,
                "ids_agree_first": next(
                    (i for i, (x, y) in enumerate(zip(ids, hf_ids, strict=False)) if x != y),
                    min(len(ids), len(hf_ids)),
                ),
                **other,
            }
    result: dict[str, Any] = {
        "model": "random TinyLlama-1.1B shape (22 layers, 32 q / 4 kv heads, d=64), bf16",
        "config": cfg,
        "tree": {
            "dendrite_tok_s": ours["tree_tok_s"],
            "dendrite_greedy_tok_s": ours["tree_greedy_tok_s"],
            "dendrite_again_tok_s": ours["tree_again_tok_s"],  # the sampled tree, measured last
            "hf_tok_s": hf["tree_tok_s"],
            "speedup": ours["tree_tok_s"] / hf["tree_tok_s"],
            "dendrite_plain_tok_s": ours["tree_plain_tok_s"],
            "cascade_over_plain": ours["tree_tok_s"] / ours["tree_plain_tok_s"],
            "dendrite_nopipe_tok_s": ours["tree_nopipe_tok_s"],
            "pipeline_over_nopipe": ours["tree_tok_s"] / ours["tree_nopipe_tok_s"],
            "dendrite_fi_level0_tok_s": ours["tree_fi_level0_tok_s"],
            "triton_level0_over_flashinfer": ours["tree_tok_s"] / ours["tree_fi_level0_tok_s"],
            "cascade_steps": ours["tree_cascade_steps"],
            "dendrite_peak_gib": ours["tree_peak_gib"],
            "hf_peak_gib": hf["tree_peak_gib"],
            "memory_ratio": hf["tree_peak_gib"] / ours["tree_peak_gib"],
            "dendrite_phases": ours["tree_phases"],
            # every timed run of each variant, in order: (start, total_s, host wait_s, gc
            # collections of generations 0-2, their ms)
            "dendrite_runs": ours["tree_runs"],
        },
        "batch1": {
            "dendrite_tok_s": ours["b1_tok_s"],
            "hf_tok_s": hf["b1_tok_s"],
            "speedup": ours["b1_tok_s"] / hf["b1_tok_s"],
            "dendrite_decode_tok_s": ours["b1_decode_tok_s"],
            "hf_decode_tok_s": hf["b1_decode_tok_s"],
            "decode_speedup": ours["b1_decode_tok_s"] / hf["b1_decode_tok_s"],
            "gemv_kernels": ours["b1_gemv"],
            "cublas_tok_s": ours["b1_cublas_tok_s"],
            "cublas_decode_tok_s": ours["b1_cublas_decode_tok_s"],
            "gemv_over_cublas": ours["b1_decode_tok_s"] / ours["b1_cublas_decode_tok_s"],
            "roofline_tok_s": ours["roofline_tok_s"],
            "roofline_fraction": ours["b1_tok_s"] / ours["roofline_tok_s"],
            "decode_roofline_fraction": ours["b1_decode_tok_s"] / ours["roofline_tok_s"],
            "weight_bytes_per_token": ours["weight_bytes_per_token"],
            "greedy_ids_agree_first": same,
        },
        "beam": beam,
        "step_parts": {"b1": ours["step_parts_b1"], "tree": ours["step_parts_tree"]},
        "profile": {"b1": ours["profile_b1"], "tree": ours["profile_tree"]},
        "dendrite": {k: ours[k] for k in _DENDRITE_KEYS},
        "hf": {"attn_implementation": hf["attn_implementation"]},
        "env": _versions(),
        "wall_s": time.perf_counter() - t0,
    }
    tr, b1 = result["tree"], result["batch1"]
    shape = f"{branches}x{new_tokens}"
    print(f"bench gpu on {result['env'].get('gpu')}: {result['model']}")
    print_table(
        ("workload", "dendrite", "HF", "ratio"),
        [
            (f"tree {shape} tok/s (sampled)", tr["dendrite_tok_s"], tr["hf_tok_s"], tr["speedup"]),
            (f"tree {shape} tok/s (greedy)", tr["dendrite_greedy_tok_s"], "", ""),
            (f"tree {shape} tok/s (sampled, again)", tr["dendrite_again_tok_s"], "", ""),
            (f"tree {shape} tok/s (no cascade)", tr["dendrite_plain_tok_s"], "", ""),
            (f"tree {shape} tok/s (no pipeline)", tr["dendrite_nopipe_tok_s"], "", ""),
            (f"tree {shape} tok/s (level 0 FlashInfer)", tr["dendrite_fi_level0_tok_s"], "", ""),
            ("tree peak GiB", tr["dendrite_peak_gib"], tr["hf_peak_gib"], tr["memory_ratio"]),
            ("batch-1 tok/s (generate 64)", b1["dendrite_tok_s"], b1["hf_tok_s"], b1["speedup"]),
            (
                "batch-1 decode tok/s",
                b1["dendrite_decode_tok_s"],
                b1["hf_decode_tok_s"],
                b1["decode_speedup"],
            ),
            (
                "batch-1 decode tok/s (cuBLAS)",
                b1["cublas_decode_tok_s"],
                "",
                b1["gemv_over_cublas"],
            ),
            ("batch-1 roofline tok/s", b1["roofline_tok_s"], "", b1["decode_roofline_fraction"]),
            (
                f"beam {beams}x{new_tokens} s",
                beam.get("dendrite_s", "n/a"),
                beam.get("hf_s", "n/a"),
                beam.get("speedup", "n/a"),
            ),
            (
                f"beam {beams}x{new_tokens} s (cuBLAS GEMMs)",
                beam.get("dendrite_cublas_s") or "n/a",
                "",
                "",
            ),
            (
                f"beam {beams}x{new_tokens} s (beams in the KV tree)",
                beam.get("dendrite_tree_path_s") or "n/a",
                "",
                "",
            ),
            *(
                (
                    f"beam {beams}x{new_tokens} s {dt}, {b.get('beams_equal')}/{beams} same",
                    b.get("dendrite_s", "n/a"),
                    b.get("hf_s", "n/a"),
                    b.get("speedup", "n/a"),
                )
                for dt, b in ((dt, beam.get(dt, {})) for dt in ("float16", "float32"))
                if b
            ),
        ],
    )
    rows = []
    for name, p in result["step_parts"].items():
        cols = ("step_ms", "host_prepare_ms", "forward_eager_ms", "forward_graph_ms")
        rows.append((name, *(p.get(c, "n/a") for c in cols)))
    print_table(("decode step", "step ms", "prepare ms", "forward ms", "graph ms"), rows)
    return result


def main(args: Any) -> None:
    emit_json(run())


# ---------------------------------------------------------------- (d) MCTS, (e) fork on the GPU


def mcts_rate(device: str, puzzles: int = 8, simulations: int = 32) -> dict[str, Any]:
    """MCTS simulations per second with the shipped Game-of-24 model on ``device``.

    Every puzzle runs all ``simulations`` (no early stop), so the rate is comparable across
    devices; the same seeds give the same trees.
    """
    from dendrite.search.mcts import MCTSConfig, mcts
    from dendrite.search.tree import SearchTree, StepConfig
    from dendrite.tasks import game24 as g24
    from dendrite.tasks.game24_eval import STEP_TOKENS, Game24Task, Game24Value

    model = Path(__file__).resolve().parents[2] / "data" / "models" / "dendrite-24"
    engine = Engine.from_pretrained(model, device=device)
    cfg = MCTSConfig(simulations=simulations, children=4, max_depth=5, snapshots=False, widen=3)
    step = StepConfig(delimiter="\n", max_step_tokens=STEP_TOKENS, temperature=1.0)
    chosen = list(g24.split_puzzles("test"))[:puzzles]
    t0 = time.perf_counter()
    sims = 0
    for i, p in enumerate(chosen):
        task = Game24Task(p)
        with SearchTree(engine, g24.prompt(task.puzzle), step, seed=i) as tree:
            r = mcts(tree, cfg, Game24Value(task), verifier=task.verifier, classify=task.classify)
            sims += r.iterations
    if device != "cpu":
        _sync()
    seconds = time.perf_counter() - t0
    return {
        "device": device, "backend": engine.backend.name, "puzzles": len(chosen),
        "simulations": sims, "seconds": seconds, "sims_per_s": sims / seconds,
    }  # fmt: skip


def extras(fork_count: int = 10_000) -> dict[str, Any]:
    """(d) MCTS simulations/s GPU vs CPU; (e) fork latency with the pool on the GPU."""
    from dendrite.bench import fork

    torch.set_num_threads(1)  # the CPU side as the CLI runs it for small models
    gpu = mcts_rate("cuda")
    cpu = mcts_rate("cpu")
    forks = fork.run(forks=fork_count, device="cuda")
    out = {
        "mcts": {"gpu": gpu, "cpu": cpu, "gpu_over_cpu": gpu["sims_per_s"] / cpu["sims_per_s"]},
        "fork_gpu_pool": forks,
        "env": {**environment(), **_versions()},
    }
    print(
        f"MCTS (dendrite-24, {gpu['puzzles']} puzzles x {gpu['simulations'] // gpu['puzzles']} "
        f"sims): GPU {gpu['sims_per_s']:.1f} sims/s, CPU {cpu['sims_per_s']:.1f} sims/s "
        f"({out['mcts']['gpu_over_cpu']:.2f}x)"
    )
    return out
