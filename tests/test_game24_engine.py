"""The shipped model on the engine: HF's greedy output equals Dendrite's; the evaluation CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from dendrite.engine import Engine
from dendrite.sampling import SamplingParams
from dendrite.tasks import game24 as g24
from dendrite.tasks.game24_eval import answer_of, solve_one

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"


def test_hf_greedy_equals_dendrite_greedy_on_puzzles() -> None:
    engine = Engine.from_pretrained(MODEL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    puzzles = list(g24.split_puzzles("test"))[:6]
    prompts = [g24.prompt(p) for p in puzzles]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=120))  # one batch
    for text, gen in zip(prompts, ours, strict=True):
        ids = tok(text, return_tensors="pt").input_ids
        assert gen.prompt_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=120, do_sample=False, pad_token_id=3)
        assert gen.output_ids == ref[0, ids.shape[1] :].tolist()
    engine.check_integrity()


def test_mcts_solves_what_greedy_misses_and_answers_verify() -> None:
    engine = Engine.from_pretrained(MODEL)
    puzzle = (4, 4, 10, 10)
    greedy = solve_one(engine, puzzle, "greedy", 1, 0)
    mcts = solve_one(engine, puzzle, "mcts", 64, 0)
    assert mcts.solved and mcts.answer is not None
    assert g24.verify_answer(puzzle, mcts.answer)
    assert answer_of(puzzle, f"answer: {mcts.answer} = 24")[0]
    assert mcts.forks > 0 and greedy.forks == 0
    assert engine.stats().used_pages == 0
    engine.check_integrity()


def test_game24_cli_json_summary() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dendrite", "game24", "--method", "greedy",
         "--puzzles", "4 4 10 10;1 1 1 1x", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "four integers" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "dendrite", "game24", "--method", "beam", "--budget", "4",
         "--puzzles", "4 4 10 10;3 3 8 8", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["method"] == "beam" and out["total"] == 2 and 0 <= out["solved"] <= 2
    assert out["rate"] == out["solved"] / 2 and out["tokens"] > 0 and out["forks"] > 0
