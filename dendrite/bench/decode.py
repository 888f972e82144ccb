"""``bench decode``: CPU decode speed against HF transformers ``generate`` on the same weights.

For each model (stories260k when ``../shared`` is present, a random ~10M-parameter Llama
saved by transformers, and the shipped default model when present) both engines decode the
same greedy continuation from the same prompt in the same process, batch 1 and batch 8;
each figure is the median of several runs, and the ratio is Dendrite / HF tokens per second.
The token ids are compared too: a speed-up that changes the output does not count.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from dendrite.bench.common import emit_json, environment, median_time, print_table
from dendrite.engine import Engine
from dendrite.model.random_init import make_random_checkpoint
from dendrite.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[2]
STORIES = ROOT.parent / "shared" / "reference" / "stories260k"
DEFAULT_MODEL = ROOT / "data" / "models" / "dendrite-24"


def _models(tmp: Path) -> dict[str, Path]:
    models: dict[str, Path] = {}
    if (STORIES / "model.safetensors").is_file():
        models["stories260k"] = STORIES
    models["random-llama-10m"] = make_random_checkpoint(tmp / "llama10m", "llama", preset="10m")
    if (DEFAULT_MODEL / "model.safetensors").is_file():
        models["dendrite-24"] = DEFAULT_MODEL
    return models


def bench_model(path: Path, new_tokens: int, batch: int, repeats: int) -> dict[str, Any]:
    import transformers

    engine = Engine.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    vocab = engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(3, vocab, (7,), generator=g).tolist()] for _ in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    ours_out: list[list[int]] = []

    def ours() -> None:
        ours_out[:] = [r.output_ids for r in engine.generate(prompts, params)]

    ids = torch.tensor(prompts)
    hf_out: list[list[int]] = []

    def theirs() -> None:
        with torch.inference_mode():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        hf_out[:] = out[:, ids.shape[1] :].tolist()

    t_ours = median_time(ours, repeats)
    t_hf = median_time(theirs, repeats)
    total = batch * new_tokens
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "dendrite_tok_s": total / t_ours,
        "hf_tok_s": total / t_hf,
        "ratio": t_hf / t_ours,
        "same_ids": ours_out == hf_out,
    }


def run(new_tokens: int = 128, repeats: int = 5) -> dict[str, Any]:
    results: dict[str, Any] = {}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in _models(Path(tmp)).items():
            for batch in (1, 8):
                r = bench_model(path, new_tokens, batch, repeats)
                results[f"{name}/b{batch}"] = r
                rows.append(
                    (name, batch, r["dendrite_tok_s"], r["hf_tok_s"], r["ratio"], r["same_ids"])
                )
    print(f"greedy decode on CPU, {new_tokens} new tokens, median of {repeats} runs")
    print_table(("model", "batch", "dendrite tok/s", "HF tok/s", "ratio", "same ids"), rows)
    return {"decode": results, "env": environment()}


def main(args: Any) -> None:
    emit_json(run(new_tokens=args.new_tokens, repeats=args.repeats))
