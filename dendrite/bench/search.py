"""``bench search``: beam search and MCTS over one 512-token prompt, and grammar overheads.

- Beam search, width 8, 64 new tokens: wall time, engine steps (one batched forward per token
  for all beams), peak pages held against the pages a copy-per-beam cache needs and against
  the unique tokens' minimum; then the same search on a token-granular pool (``page_size=1``),
  which holds exactly the unique tokens (16-token pages hold up to one partial page per beam
  more: the paged minimum, ``beam.paged_minimum``).
- MCTS, 100 simulations, 3 children per expansion, 8-token steps: wall time, engine steps,
  pages in use at the end against copy-per-branch (every pinned node's whole context).
- Grammar: matcher fork time and per-step mask time (batch 1 and 25) under a JSON schema.

Search runs on a random Llama (head_dim 64, 2,048 positions: the prompt must fit); the grammar
on a model with a tokenizer (the shipped default, else stories260k).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from dendrite.bench.common import emit_json, environment, print_table
from dendrite.engine import Engine
from dendrite.model.random_init import make_random_checkpoint
from dendrite.search.beam import beam_search
from dendrite.search.mcts import MCTSConfig, mcts
from dendrite.search.tree import SearchTree, StepConfig
from dendrite.search.value import LogprobValue

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "data" / "models" / "dendrite-24"
STORIES = ROOT.parent / "shared" / "reference" / "stories260k"
SCHEMA = ROOT / "data" / "schemas" / "character.schema.json"


def _pages(n_tokens: int, page_size: int) -> int:
    return -(-n_tokens // page_size)


def run(
    prompt_len: int = 512, width: int = 8, new_tokens: int = 64, simulations: int = 100
) -> dict[str, Any]:
    out: dict[str, Any] = {"env": environment()}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_random_checkpoint(
            Path(tmp) / "m", "llama", hidden_size=256, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048,
        )  # fmt: skip
        engine = Engine.from_pretrained(path)
        token_engine = Engine.from_pretrained(path, page_size=1)  # token-granular KV
    g = torch.Generator().manual_seed(0)
    prompt = [1, *torch.randint(3, 256, (prompt_len - 1,), generator=g).tolist()]
    P = engine.pool.page_size

    t0 = time.perf_counter()
    # the beams as KV-tree branches (also on CUDA): the sharing this bench measures
    res = beam_search(engine, prompt, num_beams=width, max_new_tokens=new_tokens, pipelined=False)
    beam_s = time.perf_counter() - t0
    out["beam"] = {
        "width": width, "new_tokens": new_tokens, "seconds": beam_s, "steps": res.steps,
        "peak_pages": res.peak_pages, "copy_per_beam_pages": res.copy_pages,
        "unique_min_pages": res.min_pages, "pages_vs_unique": res.peak_pages / res.min_pages,
        "paged_min_pages": res.paged_min_pages,
        "pages_vs_copy": res.peak_pages / res.copy_pages,
    }  # fmt: skip
    t0 = time.perf_counter()
    res1 = beam_search(
        token_engine, prompt, num_beams=width, max_new_tokens=new_tokens, pipelined=False
    )
    out["beam_page1"] = {
        "seconds": time.perf_counter() - t0, "steps": res1.steps,
        "peak_pages": res1.peak_pages, "unique_tokens": res1.min_pages,
        "pages_vs_unique": res1.peak_pages / res1.min_pages,
        "pages_vs_copy": res1.peak_pages / res1.copy_pages,
        "same_beams": [b.output_ids for b in res1.beams] == [b.output_ids for b in res.beams],
        "kv_slots_vs_page16": res1.peak_pages / (res.peak_pages * P),
    }  # fmt: skip
    token_engine.check_integrity()
    del token_engine

    step = StepConfig(delimiter=None, max_step_tokens=8, temperature=1.0)
    t0 = time.perf_counter()
    with SearchTree(engine, prompt, step, seed=0) as tree:
        r = mcts(tree, MCTSConfig(simulations=simulations, children=3, max_depth=8), LogprobValue())
        mcts_s = time.perf_counter() - t0
        stats = engine.stats()
        pinned = [n.branch for n in tree.nodes.values() if n.branch is not None and n.branch.alive]
        copy = sum(_pages(len(b), P) for b in pinned)
        out["mcts"] = {
            "simulations": simulations, "nodes": len(tree), "seconds": mcts_s,
            "engine_steps": r.engine_steps, "pages_in_use": stats.used_pages,
            "copy_per_branch_pages": copy, "pages_vs_copy": stats.used_pages / copy,
        }  # fmt: skip
    engine.check_integrity()

    model = DEFAULT_MODEL if (DEFAULT_MODEL / "tokenizer.json").is_file() else STORIES
    if (model / "tokenizer.json").is_file() and SCHEMA.is_file():
        from dendrite.grammar import Grammar, grammar_timings

        gengine = Engine.from_pretrained(model)
        assert gengine.tokenizer is not None
        grammar = Grammar.json_schema(json.loads(SCHEMA.read_text()), gengine.tokenizer)
        out["grammar"] = {"model": model.name, **grammar_timings(gengine, grammar, n=40)}

    b1 = out["beam_page1"]
    rows = [
        ("beam", f"w{width} x {new_tokens} tok", out["beam"]["seconds"], res.steps,
         res.peak_pages, res.min_pages, out["beam"]["pages_vs_unique"], res.copy_pages,
         out["beam"]["pages_vs_copy"]),
        ("beam, page size 1", f"w{width} x {new_tokens} tok", b1["seconds"], res1.steps,
         res1.peak_pages, res1.min_pages, b1["pages_vs_unique"], res1.copy_pages,
         b1["pages_vs_copy"]),
        ("mcts", f"{simulations} sims", mcts_s, r.engine_steps, out["mcts"]["pages_in_use"],
         "", "", copy, out["mcts"]["pages_vs_copy"]),
    ]  # fmt: skip
    print(f"search over one {prompt_len}-token prompt (random Llama, page size {P} unless named)")
    print_table(
        ("algo", "setting", "seconds", "steps", "pages", "unique min", "ratio", "copy pages",
         "ratio"), rows,
    )  # fmt: skip
    if "grammar" in out:
        gt = out["grammar"]
        print(
            f"grammar ({gt['model']}): matcher fork {gt['fork_us']:.1f} us, "
            f"mask {gt['mask_us_b1']:.1f} us (batch 1), {gt['mask_us_b25']:.1f} us (batch 25)"
        )
    return out


def main(args: Any) -> None:
    emit_json(run())
