"""Faults injected mid-step leave the engine usable and the pool exactly as it was.

Three kinds of fault, as a user would meet them: an exception in sampling (``sample``
patched to raise), an exception in a grammar callback (a matcher whose ``consume`` raises
after another branch's matcher has already consumed), and a KeyboardInterrupt raised from
inside the forward (the attention backend's ``run``, at the second layer: the first layer's
K/V are already written), as a notebook interrupt lands. After each: ``check_integrity()``,
the tree/pool snapshot and every branch's state equal what they were before the call, and
the same call then gives what an engine that never faulted gives. With and without the
prefix cache.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import dendrite.engine as engine_mod
from dendrite.engine import Branch, Engine, EngineConfig
from dendrite.grammar import Grammar, GrammarMatcher, fill_masks
from dendrite.model.loader import load_model
from dendrite.model.tokenizer import load_tokenizer
from dendrite.sampling import SamplingParams

from .test_kv_tree import snapshot

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"
SAMPLED = SamplingParams(max_new_tokens=64, temperature=1.0, top_k=8)


@pytest.fixture(scope="module")
def parts() -> tuple[Any, Any]:
    return load_model(MODEL), load_tokenizer(MODEL)


def make(parts: tuple[Any, Any], cache: bool) -> Engine:
    model, tok = parts
    return Engine(model, tok, EngineConfig(num_pages=256, prefix_cache=cache))


def grow(e: Engine) -> list[Branch]:
    """Two prompts (the second shares a prefix with the first), forks, a few steps."""
    a = e.add("4 4 10 13\n", SAMPLED, seed=1)
    e.step([a])
    b = e.add("4 4 10 13\n10 - 4", SAMPLED, seed=2)
    c = e.fork(a)
    d = e.fork(b)
    for _ in range(3):
        e.step()
    return [a, b, c, d]


def state(e: Engine) -> dict[str, Any]:
    """What a failed call must leave as it was (the step counter aside)."""
    return {
        "tree": snapshot(e.tree),
        "branches": {
            i: (b.pending, repr(b.pending_logprobs), b.num_generated, b.finish_reason, b.forks)
            for i, b in e.branches.items()
        },
        "telemetry_steps": len(e.telemetry.steps),
    }


CALLS: dict[str, Callable[[Engine, list[Branch]], Any]] = {
    "step": lambda e, bs: [o.token for o in e.step(bs)],
    "forward": lambda e, bs: e.forward(bs),
    "prefill": lambda e, bs: (e.prefill(bs), [o.token for o in e.step(bs)])[1],
    "score": lambda e, bs: [s.logprob for s in e.score_many([(b, [5, 6, 7]) for b in bs])],
    "branch_out": lambda e, bs: [o.token for o in e.branch_out(bs[1], 3)],
}


def _same(x: Any, y: Any) -> None:
    if isinstance(x, torch.Tensor):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    elif isinstance(x, list) and x and isinstance(x[0], engine_mod.StepOutput):
        assert [o.token for o in x] == [o.token for o in y]
    else:
        assert x == y


def _check_recovery(
    parts: tuple[Any, Any], cache: bool, call: str, inject: Callable[[Engine], Any]
) -> None:
    e, ref = make(parts, cache), make(parts, cache)
    bs, ref_bs = grow(e), grow(ref)
    if call == "prefill":  # something to prefill: two more pending tokens each
        for b, rb in zip(bs, ref_bs, strict=True):
            e.extend(b, "+ 1")
            ref.extend(rb, "+ 1")
    before = state(e)
    undo = inject(e)
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        CALLS[call](e, bs)
    undo()
    e.check_integrity()
    assert state(e) == before
    _same(CALLS[call](e, bs), CALLS[call](ref, ref_bs))
    for _ in range(2):  # and it goes on as if nothing happened
        _same([o.token for o in e.step()], [o.token for o in ref.step()])
    e.check_integrity()
    assert e.stats() == ref.stats()


def _interrupt_in_backend(e: Engine) -> Callable[[], None]:
    run = e.backend.run
    calls = [0]

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 2:  # second layer: the first one's K/V are in the pool already
            raise KeyboardInterrupt
        return run(*args, **kwargs)

    e.backend.run = interrupted  # type: ignore[method-assign]
    return lambda: setattr(e.backend, "run", run)


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("call", list(CALLS))
def test_keyboard_interrupt_inside_the_forward(
    parts: tuple[Any, Any], cache: bool, call: str
) -> None:
    _check_recovery(parts, cache, call, _interrupt_in_backend)


@pytest.mark.parametrize("cache", [False, True])
def test_exception_in_sampling(
    parts: tuple[Any, Any], cache: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def inject(e: Engine) -> Callable[[], None]:
        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("sampler failed")

        monkeypatch.setattr(engine_mod, "sample", broken)
        return monkeypatch.undo

    _check_recovery(parts, cache, "step", inject)
    _check_recovery(parts, cache, "branch_out", inject)


class FaultyMatcher(GrammarMatcher):
    """A matcher whose next ``consume`` raises (a grammar callback failing mid-step)."""

    __slots__ = ("armed",)

    def consume(self, tokens: Any) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("grammar callback failed")
        super().consume(tokens)


@pytest.mark.parametrize("cache", [False, True])
def test_exception_in_a_grammar_callback(stories: Path, cache: bool) -> None:
    parts = (load_model(stories), load_tokenizer(stories))  # llguidance reads its tokenizer
    grammar = Grammar.regex(r"[0-9]{3}-[a-z]{2,4}", parts[1])
    runs = []
    for faulty in (True, False):
        e = make(parts, cache)
        a = e.add("Once upon a time", SAMPLED, seed=1, constraint=grammar.matcher())
        b = e.add("Once upon a time", SAMPLED, seed=2)
        e.step()
        bad = FaultyMatcher(grammar, grammar.matcher().ll, 0)
        bad.armed = False
        c = e.add("Once upon a time, there", SAMPLED, seed=3, constraint=bad)
        e.step()
        if faulty:
            before = state(e)
            assert a.constraint is not None
            before_a = a.constraint.fork()
            bad.armed = True  # a's matcher consumes first, then c's raises
            with pytest.raises(RuntimeError, match="grammar callback"):
                e.step([a, b, c])
            e.check_integrity()
            assert state(e) == before
            # a's grammar state was rolled back: it allows exactly what it allowed before
            vocab = e.model_config.vocab_size
            assert torch.equal(fill_masks([a.constraint], vocab), fill_masks([before_a], vocab))
        runs.append([[o.token for o in e.step([a, b, c])] for _ in range(3)])
        e.check_integrity()
    assert runs[0] == runs[1]
