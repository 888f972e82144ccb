"""Golden tests: Dendrite against HF transformers on the same random weights (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from dendrite.engine import Engine
from dendrite.sampling import SamplingParams

from .conftest import CHECKPOINTS

GREEDY = SamplingParams(max_new_tokens=64, ignore_eos=True)


def hf_model(path: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def prompt_ids(seed: int, n: int = 23, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, vocab, (n - 1,), generator=g).tolist()]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_last_logits_match_hf(checkpoints: dict[str, Path], name: str) -> None:
    path = checkpoints[name]
    engine = Engine.from_pretrained(path)
    hf = hf_model(path)
    for seed, n in ((0, 23), (1, 40), (2, 1)):
        ids = prompt_ids(seed, n)
        b = engine.add(ids)
        out = engine.step([b], keep_logits=True)[0]
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0, -1]
        assert out.logits is not None
        assert rel_err(out.logits, ref) < 1e-4, name
        engine.free(b)
    engine.check_integrity()
    assert engine.stats().used_pages == 0


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_64_matches_hf(checkpoints: dict[str, Path], name: str) -> None:
    path = checkpoints[name]
    engine = Engine.from_pretrained(path)
    hf = hf_model(path)
    prompts = [prompt_ids(10), prompt_ids(11, 7)]
    ours = engine.generate(prompts, GREEDY)  # both prompts in one batch
    for ids, gen in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]), max_new_tokens=64, do_sample=False, pad_token_id=0
            )
        assert gen.output_ids == ref[0, len(ids) :].tolist(), name
    engine.check_integrity()


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-gqa-tied", "mistral-mha-tied"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_fork_mid_generation_equals_fresh_run(
    checkpoints: dict[str, Path], name: str, page_size: int
) -> None:
    """A fork at position p continued with tokens t equals a fresh run over the same tokens."""
    engine = Engine.from_pretrained(checkpoints[name], page_size=page_size)
    prompt = prompt_ids(3, 21)
    parent = engine.add(prompt, SamplingParams(max_new_tokens=100, ignore_eos=True))
    for _ in range(12):
        engine.step([parent])
    child = engine.fork(parent)
    forced = [7, 99, 42, 5, 200]
    engine.extend(child, forced)
    for _ in range(9):  # the parent moves on first: copy-on-write must protect the child
        engine.step([parent])
    got = engine.step([child], keep_logits=True)[0].logits
    history = engine.token_ids(child)[:-1]  # without the token this step sampled
    assert history[: len(prompt)] == prompt and history[-len(forced) :] == forced
    fresh = Engine.from_pretrained(checkpoints[name], page_size=page_size)
    f = fresh.add(history)
    want = fresh.step([f], keep_logits=True)[0].logits
    assert got is not None and want is not None
    assert rel_err(got, want) < 1e-4
    # and the parent is still exactly HF's greedy continuation of the prompt
    hf = hf_model(checkpoints[name])
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]), max_new_tokens=21, do_sample=False, pad_token_id=0
        )
    assert engine.output_ids(parent) == ref[0, len(prompt) :].tolist()
    engine.check_integrity()


def test_batched_mixed_prefill_and_decode_equals_single(checkpoints: dict[str, Path]) -> None:
    """A step mixing a long prompt chunk, a short one and decode tokens gives each its own logits."""
    path = checkpoints["llama-gqa-untied"]
    engine = Engine.from_pretrained(path, page_size=4)
    a = engine.add(prompt_ids(20, 30))
    engine.step([a])
    b = engine.add(prompt_ids(21, 9))
    c = engine.fork(a)
    engine.extend(c, [11, 12, 13])
    outs = engine.step([a, b, c], keep_logits=True)
    for br, out in zip((a, b, c), outs, strict=True):
        solo = Engine.from_pretrained(path, page_size=4)
        s = solo.add(engine.token_ids(br)[:-1])  # history before this step's sample
        ref = solo.step([s], keep_logits=True)[0].logits
        assert out.logits is not None and ref is not None
        assert rel_err(out.logits, ref) < 1e-4
    engine.check_integrity()
