"""Pipelined decode (``Engine.run`` with ``pipeline="on"``) against stepping.

On the GPU the pipeline overlaps the host's preparation of step n + 1 with step n; here it
runs the same bookkeeping synchronously: placeholders fed before the samples are read,
patched afterwards, and taken back when a branch stops on EOS or a stop string. Everything
must equal stepping: tokens, log-probs, finish reasons, KV and pages. Faults in the middle
(a failing sampler, an interrupt inside the forward) leave a state that ``run`` finishes
exactly as an unfaulted engine does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import dendrite.engine as engine_mod
from dendrite.engine import Branch, Engine, EngineConfig
from dendrite.errors import BranchError, PoolExhaustedError
from dendrite.model.loader import load_model
from dendrite.model.tokenizer import load_tokenizer
from dendrite.sampling import SamplingParams

from .test_kv_tree import snapshot

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"


@pytest.fixture(scope="module")
def parts() -> tuple[Any, Any]:
    return load_model(MODEL), load_tokenizer(MODEL)


def make(parts: tuple[Any, Any], pipeline: str) -> Engine:
    return Engine(*parts, EngineConfig(num_pages=256, pipeline=pipeline))


def grow(e: Engine) -> list[Branch]:
    """Prompts with forks; greedy, sampled, EOS on and off, a stop string, uneven lengths."""
    sampled = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=8)
    a = e.add("4 4 10 13\n", sampled, seed=1)
    b = e.add("1 2 3 4\n", SamplingParams(max_new_tokens=100), seed=2)  # greedy: EOS at 72
    e.step([a, b])
    c = e.fork(a, SamplingParams(max_new_tokens=9, temperature=1.0, top_k=8, ignore_eos=True))
    d = e.fork(a, SamplingParams(max_new_tokens=30, temperature=1.0, stop=["="]))
    f = e.add("2 5 5 10\n", SamplingParams(max_new_tokens=60, temperature=0.7), seed=5)
    return [a, b, c, d, f]


def state(e: Engine, bs: list[Branch], pages: bool = True) -> list[Any]:
    """Branches, stats and (``pages``) the tree down to which physical page holds what."""
    out: list[Any] = [
        (e.token_ids(b), b.pending, b.num_generated, b.finish_reason, len(b.kv),
         [round(x, 4) for x in e.output_logprobs(b)])
        for b in bs
    ]  # fmt: skip
    return [*out, e.stats(), snapshot(e.tree) if pages else None]


def test_pipelined_run_equals_stepping(parts: tuple[Any, Any]) -> None:
    on, off = make(parts, "on"), make(parts, "off")
    bs_on, bs_off = grow(on), grow(off)
    steps = on.num_steps
    on.run(bs_on)
    off.run(bs_off)
    assert state(on, bs_on) == state(off, bs_off)
    reasons = {b.finish_reason for b in bs_on}
    assert {"eos", "length", "stop"} <= reasons, reasons  # every way out was taken
    assert on.num_steps - steps >= max(b.num_generated for b in bs_on) - 1
    on.check_integrity()
    for e in (on, off):
        e.free_all()
        assert e.stats().used_pages == 0


def _fail_on_call(n: int, exc: BaseException, target: Any) -> Any:
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise exc
        return target(*args, **kwargs)

    return wrapped


@pytest.mark.parametrize("when", [1, 2, 5, 17])
@pytest.mark.parametrize("where", ["sampler", "forward"])
def test_a_fault_mid_run_leaves_a_state_run_finishes_alike(
    parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, when: int, where: str
) -> None:
    e, ref = make(parts, "on"), make(parts, "off")
    bs, ref_bs = grow(e), grow(ref)
    if where == "sampler":
        broken = _fail_on_call(when, RuntimeError("sampler failed"), engine_mod.sample_packed)
        monkeypatch.setattr(engine_mod, "sample_packed", broken)
        expected: type[BaseException] = RuntimeError
    else:  # an interrupt at the second layer of the when-th forward
        run = e.backend.run
        layer_calls = e.model_config.num_layers * (when - 1) + 2
        monkeypatch.setattr(e.backend, "run", _fail_on_call(layer_calls, KeyboardInterrupt(), run))
        expected = KeyboardInterrupt
    with pytest.raises(expected):
        e.run(bs)
    monkeypatch.undo()
    e.check_integrity()
    for b in bs:  # a stepping state: something pending (a sample or a prompt), or finished
        assert b.finished or b.pending
    e.run(bs)
    ref.run(ref_bs)
    # the same everything; which physical pages hold it depends on the order of the frees
    assert state(e, bs, pages=False) == state(ref, ref_bs, pages=False)


def test_a_short_pool_finishes_as_stepping_does(parts: tuple[Any, Any]) -> None:
    """A speculative step needs a page for a branch that then stops on EOS: with just the
    pages stepping needs, the pipelined run steps on instead of running out."""
    greedy = SamplingParams(max_new_tokens=100)  # "1 2 3 4\n": EOS at the 72nd token

    def go(mode: str, num_pages: int) -> tuple[str | None, int, int] | str:
        e = Engine(*parts, EngineConfig(num_pages=num_pages, page_size=4, pipeline=mode))
        b = e.add("1 2 3 4\n", greedy, seed=2)
        try:
            e.run([b])
        except PoolExhaustedError:
            return "exhausted"
        e.check_integrity()
        return b.finish_reason, b.num_generated, len(b.kv)

    fewest = next(n for n in range(10, 60) if go("off", n) != "exhausted")
    assert go("off", fewest) == ("eos", 72, go("off", fewest)[2])  # type: ignore[index]
    assert go("on", fewest) == go("off", fewest)
    assert go("on", fewest - 1) == go("off", fewest - 1) == "exhausted"


def test_prefix_cache_is_not_evicted_by_speculation(parts: tuple[Any, Any]) -> None:
    def go(mode: str) -> tuple[Any, ...]:
        e = Engine(*parts, EngineConfig(num_pages=40, page_size=4, pipeline=mode,
                                        prefix_cache=True))  # fmt: skip
        c = e.add(list(range(5, 14)))
        e.forward([c])
        e.free(c)  # two cached pages
        b = e.add("1 2 3 4\n", SamplingParams(max_new_tokens=100), seed=2)
        e.run([b])
        return b.finish_reason, e.output_ids(b), e.prefix_stats(), e.stats()

    assert go("on") == go("off")


def test_a_failing_stop_check_leaves_a_stepping_state(
    parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = make(parts, "on")
    bs = grow(e)
    finish = Engine._finish_reason
    monkeypatch.setattr(
        Engine, "_finish_reason", _fail_on_call(40, RuntimeError("decode failed"), finish)
    )
    with pytest.raises(RuntimeError, match="decode failed"):
        e.run(bs)
    monkeypatch.undo()
    e.check_integrity()
    for b in bs:
        assert b.finished or b.pending
        assert len(e.output_ids(b)) == b.num_generated  # each sample counted once
    e.run(bs)
    e.check_integrity()
    assert all(b.finished for b in bs)


def test_run_refuses_branches_with_nothing_pending(parts: tuple[Any, Any]) -> None:
    e = make(parts, "on")
    b = e.add("1 2 3 4\n", SamplingParams(max_new_tokens=5))
    e.forward([b])  # fed: nothing pending, not finished
    before = (snapshot(e.tree), set(e.branches))
    with pytest.raises(BranchError, match="nothing pending"):
        e.run([b])
    with pytest.raises(BranchError, match="nothing pending"):
        e.run([b], n=3)  # before any branching out
    assert (snapshot(e.tree), set(e.branches)) == before
    e.check_integrity()


def test_run_n_branches_out_as_branch_out_does(parts: tuple[Any, Any]) -> None:
    """``run(bs, n=4)`` (the first step pipelined: prompts fed, forks made, samples left on
    the device) ends as branch_out of each then stepping: rows in order, each branch then
    its forks; a finished branch is passed through, not forked."""
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=8, ignore_eos=True)

    def go(mode: str) -> tuple[list[Any], list[Branch], list[Branch]]:
        e = make(parts, mode)
        a = e.add("4 4 10 13\n", sampled, seed=1)
        done = e.add("3 3 8 8\n", SamplingParams(max_new_tokens=0))
        b = e.add("1 2 3 4\n", SamplingParams(max_new_tokens=20, temperature=0.8), seed=2)
        if mode == "on":
            rows = e.run([a, done, b], n=4)
        else:  # the reference: branch_out, then stepping
            done.finish_reason = "length"
            rows = [e.branches[o.branch] for o in e.branch_out(a, 4)] + [done]
            rows += [e.branches[o.branch] for o in e.branch_out(b, 4)]
            e.run(rows)
        e.check_integrity()
        return state(e, rows), rows, [a, done, b]

    (on, rows, (a, done, b)), (off, _, _) = go("on"), go("off")
    assert on == off
    assert rows[0] is a and rows[4] is done and rows[5] is b and len(rows) == 9
    assert done.num_generated == 0 and done.finish_reason == "length"
    assert len({tuple(r) for r, *_ in on[:4]}) == 4  # four different samples of a


def test_generate_n(parts: tuple[Any, Any]) -> None:
    e = make(parts, "on")
    params = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    gens = e.generate(["1 2 3 4\n", "2 5 5 10\n"], params, seed=7, n=3)
    assert len(gens) == 6 and not e.branches and e.stats().used_pages == 0
    ref = make(parts, "off")
    want = []
    for i, p in enumerate(["1 2 3 4\n", "2 5 5 10\n"]):
        root = ref.add(p, params, seed=7 + i)
        rows = [ref.branches[o.branch] for o in ref.branch_out(root, 3)]
        ref.run(rows)
        want += [ref.output_ids(r) for r in rows]
    assert [g.output_ids for g in gens] == want
    assert gens[0].prompt_ids == gens[2].prompt_ids != gens[3].prompt_ids


@pytest.mark.parametrize("n", [0, -1, 2.0])
def test_bad_n_changes_nothing(parts: tuple[Any, Any], n: Any) -> None:
    from dendrite.errors import ConfigError

    e = make(parts, "on")
    b = e.add("1 2 3 4\n", SamplingParams(max_new_tokens=5))
    before = (snapshot(e.tree), b.pending, set(e.branches))
    with pytest.raises(ConfigError, match="n >= 1"):
        e.run([b], n=n)
    with pytest.raises(ConfigError, match="n >= 1"):
        e.generate("1 2 3 4\n", n=n)
    assert (snapshot(e.tree), b.pending, set(e.branches)) == before
    e.check_integrity()


def test_a_failing_first_sample_changes_nothing(
    parts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    e = make(parts, "on")
    b = e.add("1 2 3 4\n", SamplingParams(max_new_tokens=5, temperature=1.0), seed=3)
    before = (snapshot(e.tree), b.pending, set(e.branches), e.stats())
    broken = _fail_on_call(1, RuntimeError("sampler failed"), engine_mod.sample_packed)
    monkeypatch.setattr(engine_mod, "sample_packed", broken)
    with pytest.raises(RuntimeError, match="sampler failed"):
        e.run([b], n=5)
    assert (snapshot(e.tree), b.pending, set(e.branches), e.stats()) == before
    monkeypatch.undo()
    e.check_integrity()
    rows = e.run([b], n=5)  # and it runs as if nothing had happened: same forks' seeds
    fresh = make(parts, "on")
    ref = fresh.run([fresh.add("1 2 3 4\n", b.params, seed=3)], n=5)
    assert [e.output_ids(r) for r in rows] == [fresh.output_ids(r) for r in ref]
    assert len(rows) == 5 and all(r.num_generated == 5 for r in rows)


def test_run_n_from_a_long_prompt(parts: tuple[Any, Any]) -> None:
    """Forks made from a fed prompt hold nothing pending: with a prompt over half the
    context, a fork that still counted it would stop at once on "context"."""
    limit = parts[0].config.max_position_embeddings
    prompt = [1] + [5 + i % 40 for i in range(limit // 2 + 40)]
    params = SamplingParams(max_new_tokens=20, temperature=1.0, ignore_eos=True)
    outs = []
    for mode in ("on", "off"):
        e = make(parts, mode)
        rows = e.run([e.add(prompt, params, seed=4)], n=3)
        assert [(r.finish_reason, r.num_generated) for r in rows] == [("length", 20)] * 3
        outs.append([e.output_ids(r) for r in rows])
        e.check_integrity()
    assert outs[0] == outs[1]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_a_failing_run_n_frees_the_forks_it_made(parts: tuple[Any, Any], mode: str) -> None:
    """The pool runs short after the branching out: the forks (no handle on them outside)
    go; the branch is left as stepping leaves it, and finishes once pages are free."""
    e = Engine(*parts, EngineConfig(num_pages=12, page_size=4, pipeline=mode))
    params = SamplingParams(max_new_tokens=40, temperature=1.0, ignore_eos=True)
    b = e.add("1 2 3 4\n", params, seed=1)
    with pytest.raises(PoolExhaustedError):
        e.run([b], n=4)
    assert list(e.branches) == [b.id] and b.pending and not b.finished
    e.check_integrity()
    e.run([b])  # alone it fits
    assert b.finish_reason == "length" and b.num_generated == 40
    e.check_integrity()


def test_generate_n_with_nothing_to_generate(parts: tuple[Any, Any]) -> None:
    e = make(parts, "on")
    gens = e.generate(["1 2 3 4\n", "2 5 5 10\n"], SamplingParams(max_new_tokens=0), n=3)
    assert len(gens) == 6 and all(g.output_ids == [] for g in gens)
    assert gens[0].prompt_ids == gens[2].prompt_ids != gens[3].prompt_ids
    assert not e.branches
