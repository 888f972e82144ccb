"""Stateful property tests (hypothesis) of the KV tree and of the engine.

Two kinds of machine, each checked after every rule:

- ``KVTreeMachine`` drives a :class:`KVTree` directly over a small pool (page sizes 1, 4 and
  16): new branches, forks, appends, batched appends, truncations and frees (after which the
  freed handle must be refused everywhere). After every rule ``check_integrity()`` holds and every live branch reads back its
  own tokens from the pool (the shadow-KV check of ``test_kv_tree.py``). The pool is small, so
  appends run out of pages; then nothing may have changed.
- ``EngineMachine`` drives an :class:`Engine` with a tiny random LLaMA (max context 64) over a
  32-page pool: prompts, forks, teacher-forced extensions, steps over random subsets (greedy
  and sampled), scores (checked against a fresh engine that shares nothing) and frees, plus
  bad input. Every refused call must leave stats, branches and integrity exactly as before.

Every machine ends by freeing everything: the pool must be all free. Settings are
derandomized (the same examples on every run) and the rules count their calls in ``STEPS``;
``test_total_state_machine_steps`` checks that the machines ran at least 10,000 steps.
"""

from __future__ import annotations

import functools
import math
import tempfile
from collections import Counter
from typing import Any

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dendrite.engine import Branch, Engine, EngineConfig
from dendrite.errors import (
    BranchError,
    ContextLengthError,
    InvalidTokenError,
    PoolExhaustedError,
)
from dendrite.kv.tree import KVBranch
from dendrite.model import Transformer, load_model
from dendrite.model.random_init import make_random_checkpoint
from dendrite.sampling import SamplingParams

from .test_kv_tree import check_contents, make_tree, snapshot, write_kv

MIN_TOTAL_STEPS = 10_000
STEPS: Counter[str] = Counter()  # rules run per machine class (the machines are rebuilt often)
EVENTS: Counter[str] = Counter()  # how often the interesting paths ran (exhaustion, refusals)
FINISHED: set[str] = set()  # machine classes that have run in this session

INDEX = st.integers(0, 1 << 16)  # picks a live branch: live[index % len(live)]
SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def machine_settings(max_examples: int, steps: int = 50) -> settings:
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=SUPPRESS,
        print_blob=True,
    )


# ---------------------------------------------------------------------- the KV tree


class KVTreeMachine(RuleBasedStateMachine):
    page_size = 4
    num_pages = 30  # 120 slots: prompts of up to 40 and appends of up to 20 exhaust it

    def __init__(self) -> None:
        super().__init__()
        self.tree = make_tree(self.page_size, self.num_pages)
        self.shadow: dict[int, list[int]] = {}
        self.next_token = 1

    def _step(self) -> None:
        STEPS[type(self).__name__] += 1

    def _tokens(self, n: int) -> list[int]:
        ids = list(range(self.next_token, self.next_token + n))
        self.next_token += n
        return ids

    def _live(self, index: int) -> KVBranch:
        live = sorted(self.tree.branches)
        return self.tree.branches[live[index % len(live)]]

    def _append(self, items: list[tuple[KVBranch, int]]) -> bool:
        """Append ``n`` new tokens to each branch, all or nothing; False when the pool is full."""
        batch = [(b, self._tokens(n)) for b, n in items]
        before = snapshot(self.tree)
        events = len(self.tree.telemetry.pages)
        try:
            slots = self.tree.append_batch(batch)
        except PoolExhaustedError as e:
            assert "free some branches" in str(e)
            assert snapshot(self.tree) == before, "a refused append changed the tree"
            assert len(self.tree.telemetry.pages) == events
            EVENTS[f"{type(self).__name__} exhausted"] += 1
            return False
        for (b, toks), sl in zip(batch, slots, strict=True):
            write_kv(self.tree, sl, toks)
            self.shadow[b.id] += toks
        EVENTS[f"{type(self).__name__} appended"] += 1
        return True

    @property
    def has_live(self) -> bool:
        return bool(self.tree.branches)

    @initialize(n=st.integers(1, 40))
    def first_branch(self, n: int) -> None:
        self.new_branch(n)

    @rule(n=st.integers(1, 40))
    def new_branch(self, n: int) -> None:
        self._step()
        b = self.tree.new_branch()
        self.shadow[b.id] = []
        self._append([(b, n)])  # when the pool is full the branch stays, empty

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX)
    def fork(self, i: int) -> None:
        self._step()
        b = self._live(i)
        used, forks = self.tree.pool.num_used, len(self.tree.telemetry.forks)
        c = self.tree.fork(b)
        assert self.tree.pool.num_used == used
        assert len(self.tree.telemetry.forks) == forks + 1
        self.shadow[c.id] = list(self.shadow[b.id])

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX, n=st.integers(1, 20))
    def append(self, i: int, n: int) -> None:
        self._step()
        self._append([(self._live(i), n)])

    @precondition(lambda self: len(self.tree.branches) >= 2)
    @rule(picks=st.lists(st.tuples(INDEX, st.integers(0, 12)), min_size=2, max_size=6))
    def append_batch(self, picks: list[tuple[int, int]]) -> None:
        self._step()
        items: dict[int, tuple[KVBranch, int]] = {}
        for i, n in picks:
            b = self._live(i)
            items.setdefault(b.id, (b, n))
        self._append(list(items.values()))

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX, n=st.integers(1, 20), k=st.integers(0, 20))
    def append_then_roll_back(self, i: int, n: int, k: int) -> None:
        """What a failed engine step does: append, then truncate the same tokens (some or all)."""
        self._step()
        b = self._live(i)
        before = snapshot(self.tree)
        if not self._append([(b, n)]):
            return
        k = min(k, n)
        self.tree.truncate(b, k)
        del self.shadow[b.id][len(self.shadow[b.id]) - k :]
        if k == n:
            assert snapshot(self.tree) == before, "append + truncate is not a no-op"

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX, k=st.integers(1, 8))
    def truncate(self, i: int, k: int) -> None:
        self._step()
        b = self._live(i)
        own = 0 if b.leaf.frozen else len(b.leaf.tokens)  # tokens only this handle holds
        if k > own:
            before = snapshot(self.tree)
            try:
                self.tree.truncate(b, k)
            except BranchError:
                assert snapshot(self.tree) == before
                EVENTS[f"{type(self).__name__} truncate refused"] += 1
                return
            raise AssertionError(f"truncating {k} of {own} own tokens was not refused")
        self.tree.truncate(b, k)
        del self.shadow[b.id][-k:]

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX)
    def free(self, i: int) -> None:
        self._step()
        b = self._live(i)
        self.tree.free(b)
        del self.shadow[b.id]
        # the freed handle is refused everywhere, and the refusal changes nothing
        before = snapshot(self.tree)
        others = [(x, [1]) for x in list(self.tree.branches.values())[:1]]
        for call in (
            lambda: self.tree.free(b),
            lambda: self.tree.fork(b),
            lambda: self.tree.append(b, [1]),
            lambda: self.tree.truncate(b, 0),
            lambda: self.tree.append_batch([*others, (b, [1])]),
        ):
            try:
                call()
            except BranchError as e:
                assert "not a live branch" in str(e)
            else:
                raise AssertionError("a freed branch was not refused")
            assert snapshot(self.tree) == before

    @invariant()
    def consistent(self) -> None:
        self.tree.check_integrity()
        check_contents(self.tree, self.shadow)
        s = self.tree.stats()
        assert s.live_branches == len(self.shadow)
        assert s.logical_tokens == sum(len(t) for t in self.shadow.values())
        assert s.used_pages + s.free_pages == s.total_pages == self.num_pages

    def teardown(self) -> None:
        for b in list(self.tree.branches.values()):
            self.tree.free(b)
        self.tree.check_integrity()
        assert self.tree.pool.num_free == self.num_pages
        assert not any(self.tree._claim)
        assert self.tree.stats().segments == 0 and self.tree.root.handles == 0


class KVTreePage1(KVTreeMachine):
    page_size = 1
    num_pages = 150


class KVTreePage4(KVTreeMachine):
    page_size = 4
    num_pages = 30


class KVTreePage16(KVTreeMachine):
    page_size = 16
    num_pages = 12


# ---------------------------------------------------------------------- the engine

MAX_CONTEXT = 64
VOCAB = 256


@functools.lru_cache(maxsize=1)
def tiny_model() -> Transformer:
    """A random tiny LLaMA (2 layers, vocab 256, context 64), saved by HF and loaded once."""
    with tempfile.TemporaryDirectory(prefix="dendrite-sm-") as tmp:
        path = make_random_checkpoint(
            f"{tmp}/llama", "llama", seed=7, max_position_embeddings=MAX_CONTEXT
        )
        return load_model(path)


GREEDY = SamplingParams(max_new_tokens=24)
SAMPLED = SamplingParams(max_new_tokens=40, temperature=0.9, top_k=40, top_p=0.95)
PARAMS = st.sampled_from([GREEDY, SAMPLED])
IDS = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        torch.set_num_threads(1)  # a tiny model: threads only add sync cost on a busy CPU
        model = tiny_model()
        self.engine = Engine(model, None, EngineConfig(page_size=4, num_pages=32))
        self.reference = Engine(model, None, EngineConfig(page_size=16, num_pages=8))
        self.shadow: dict[int, list[int]] = {}

    def _step(self) -> None:
        STEPS[type(self).__name__] += 1

    def _live(self, index: int) -> Branch:
        live = sorted(self.engine.branches)
        return self.engine.branches[live[index % len(live)]]

    def _state(self) -> tuple[Any, ...]:
        e = self.engine
        branches = {
            i: (e.token_ids(b), b.pending, b.finish_reason, b.num_generated, len(b.kv))
            for i, b in e.branches.items()
        }
        return e.stats(), sorted(e.pool.free_pages()), branches

    def _refused(self, call: Any, error: type[Exception], match: str) -> None:
        """``call`` raises ``error`` (message containing ``match``) and changes nothing."""
        before = self._state()
        try:
            call()
        except error as e:
            assert match in str(e), str(e)
        else:
            raise AssertionError(f"expected {error.__name__}")
        self.engine.check_integrity()
        assert self._state() == before, f"a refused call ({error.__name__}) changed the engine"
        EVENTS[f"engine {error.__name__}"] += 1

    @property
    def has_live(self) -> bool:
        return bool(self.engine.branches)

    @initialize(ids=IDS, params=PARAMS)
    def first_prompt(self, ids: list[int], params: SamplingParams) -> None:
        self.add(ids, params, 0)

    @rule(ids=IDS, params=PARAMS, seed=st.integers(0, 3))
    def add(self, ids: list[int], params: SamplingParams, seed: int) -> None:
        self._step()
        b = self.engine.add(ids, params, seed=seed)
        self.shadow[b.id] = list(ids)

    @precondition(lambda self: self.has_live)  # (not the only rule left when all are freed)
    @rule(n=st.integers(MAX_CONTEXT + 1, MAX_CONTEXT + 8), bad=st.integers(VOCAB, VOCAB + 9))
    def add_bad(self, n: int, bad: int) -> None:
        self._step()
        self._refused(lambda: self.engine.add([5] * n), ContextLengthError, "maximum context")
        self._refused(lambda: self.engine.add([5, bad]), InvalidTokenError, str(bad))

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX, params=st.none() | PARAMS)
    def fork(self, i: int, params: SamplingParams | None) -> None:
        self._step()
        b = self._live(i)
        used = self.engine.stats().used_pages
        c = self.engine.fork(b, params)
        assert self.engine.stats().used_pages == used
        assert c.finish_reason == b.finish_reason and c.pending == b.pending
        self.shadow[c.id] = list(self.shadow[b.id])

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX, ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20))
    def extend(self, i: int, ids: list[int]) -> None:
        self._step()
        b = self._live(i)
        if len(b) + len(ids) > MAX_CONTEXT:
            self._refused(lambda: self.engine.extend(b, ids), ContextLengthError, "context")
            return
        self.engine.extend(b, ids)
        assert not b.finished
        self.shadow[b.id] += ids

    @precondition(lambda self: self.has_live)
    @rule(picks=st.lists(INDEX, min_size=1, max_size=6), keep=st.booleans())
    def step(self, picks: list[int], keep: bool) -> None:
        self._step()
        self._step_branches(list({b.id: b for b in map(self._live, picks)}.values()), keep)

    @precondition(lambda self: self.has_live)
    @rule(keep=st.booleans())
    def step_all(self, keep: bool) -> None:
        self._step()
        self._step_branches(None, keep)

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX, keep=st.booleans())
    def step_more_forks_than_pages(self, i: int, keep: bool) -> None:
        """Fork a branch with tokens to feed once more than the pool has free pages and step
        the forks: each needs a page of its own (a copy of the shared last page, or a new
        one), so the step is refused and changes nothing. The exhaustion path on demand, not
        left to the draw: Hypothesis mixes the literal constants of the project's loaded
        modules into its draws (``hypothesis.internal.constants_ast``), so even derandomized
        examples move with which modules earlier tests imported. Forks freed after."""
        self._step()
        b = self._live(i)
        if not b.pending or b.finished:
            return
        forks = []
        for _ in range(self.engine.stats().free_pages + 1):
            c = self.engine.fork(b)
            self.shadow[c.id] = list(self.shadow[b.id])
            forks.append(c)
        self._step_branches(forks, keep)
        for c in forks:
            self.engine.free(c)
            del self.shadow[c.id]

    def _step_branches(self, chosen: list[Branch] | None, keep: bool) -> None:
        """One engine step (``None``: every unfinished branch); checks the outputs."""
        live = self.engine.branches.values()
        todo = {b.id for b in (live if chosen is None else chosen) if b.pending and not b.finished}
        before = self._state()
        try:
            outs = self.engine.step(chosen, keep_logits=keep)
        except PoolExhaustedError as e:
            assert "free some branches" in str(e)
            self.engine.check_integrity()
            assert self._state() == before, "a refused step changed the engine"
            EVENTS["engine step exhausted"] += 1
            return
        assert {o.branch for o in outs} == todo
        for o in outs:
            b = self.engine.branches[o.branch]
            self.shadow[o.branch].append(o.token)
            assert 0 <= o.token < VOCAB and math.isfinite(o.logprob) and o.logprob <= 0
            assert b.pending == (o.token,) and b.finish_reason == o.finish_reason
            if keep:
                assert o.logits is not None and o.logits.shape == (VOCAB,)
                logp = torch.log_softmax(o.logits, -1)
                assert abs(float(logp[o.token]) - o.logprob) < 1e-4
                if b.params.greedy:
                    assert o.token == int(o.logits.argmax())
        EVENTS["engine step"] += 1

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX, ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8))
    def score(self, i: int, ids: list[int]) -> None:
        self._step()
        b = self._live(i)
        if not b.pending:  # after forward(): nothing to score from
            self._refused(lambda: self.engine.score(b, ids), BranchError, "no pending")
            return
        if len(b) + len(ids) > MAX_CONTEXT:
            self._refused(lambda: self.engine.score(b, ids), ContextLengthError, "context")
            return
        before = self._state()
        try:
            got = self.engine.score(b, ids)
        except PoolExhaustedError:
            self.engine.check_integrity()
            assert self._state() == before, "a refused score changed the engine"
            EVENTS["engine score exhausted"] += 1
            return
        self.engine.check_integrity()
        assert self._state() == before, "score changed the engine"
        # the same sequence in an engine that shares nothing gives the same numbers
        ref = self.reference.add(self.engine.token_ids(b))
        want = self.reference.score(ref, ids)
        self.reference.free(ref)
        assert len(got.token_logprobs) == len(ids)
        for x, y in zip(got.token_logprobs, want.token_logprobs, strict=True):
            assert abs(x - y) < 1e-4, (got, want)
        EVENTS["engine score"] += 1

    @precondition(lambda self: self.has_live)
    @rule(picks=st.lists(INDEX, min_size=1, max_size=4))
    def forward(self, picks: list[int]) -> None:
        """Feed the pending tokens without sampling (what search algorithms do)."""
        self._step()
        e = self.engine
        chosen = list({b.id: b for b in map(self._live, picks)}.values())
        if any(not b.pending for b in chosen):
            self._refused(lambda: e.forward(chosen), BranchError, "no pending")
            return
        if any(len(b) > MAX_CONTEXT for b in chosen):  # finished by context: can't be fed
            self._refused(lambda: e.forward(chosen), ContextLengthError, "maximum context")
            return
        before = self._state()
        try:
            logits = e.forward(chosen)
        except PoolExhaustedError:
            e.check_integrity()
            assert self._state() == before, "a refused forward changed the engine"
            EVENTS["engine forward exhausted"] += 1
            return
        assert logits.shape == (len(chosen), VOCAB)
        for b in chosen:
            assert b.pending == () and len(b.kv) == len(self.shadow[b.id])
        ref = self.reference.add(self.shadow[chosen[0].id])
        want = self.reference.forward([ref])[0]
        self.reference.free(ref)
        assert torch.allclose(logits[0], want, atol=1e-4)
        EVENTS["engine forward"] += 1

    @precondition(lambda self: self.has_live)
    @rule(picks=st.lists(INDEX, min_size=1, max_size=4))
    def prefill(self, picks: list[int]) -> None:
        """Feed all pending tokens but the last (before forking a fresh prompt)."""
        self._step()
        e = self.engine
        chosen = list({b.id: b for b in map(self._live, picks)}.values())
        before = self._state()
        last = {b.id: b.pending[-1:] for b in chosen}
        try:
            e.prefill(chosen)
        except PoolExhaustedError:
            e.check_integrity()
            assert self._state() == before, "a refused prefill changed the engine"
            EVENTS["engine prefill exhausted"] += 1
            return
        for b in chosen:
            assert b.pending == last[b.id]
        EVENTS["engine prefill"] += 1

    @precondition(lambda self: self.has_live)
    @rule(i=INDEX)
    def free(self, i: int) -> None:
        self._step()
        b = self._live(i)
        self.engine.free(b)
        del self.shadow[b.id]
        e = self.engine
        for call in (
            lambda: e.free(b),
            lambda: e.fork(b),
            lambda: e.extend(b, [3]),
            lambda: e.step([b]),
            lambda: e.score(b, [3]),
        ):
            self._refused(call, BranchError, "not a live branch")

    @invariant()
    def consistent(self) -> None:
        self.engine.check_integrity()
        assert set(self.engine.branches) == set(self.shadow)
        for i, b in self.engine.branches.items():
            assert self.engine.token_ids(b) == self.shadow[i]
            assert len(b) == len(self.shadow[i]) <= MAX_CONTEXT + 1
        assert self.reference.stats().used_pages == 0

    def teardown(self) -> None:
        self.engine.free_all()
        self.engine.check_integrity()
        s = self.engine.stats()
        assert s.used_pages == 0 and s.free_pages == s.total_pages and s.live_branches == 0


# ---------------------------------------------------------------------- running them

MACHINES: dict[str, tuple[type[RuleBasedStateMachine], settings, int]] = {
    # name: (machine, settings, fewest steps it must have run)
    "KVTreePage1": (KVTreePage1, machine_settings(80), 2_800),
    "KVTreePage4": (KVTreePage4, machine_settings(80), 2_800),
    "KVTreePage16": (KVTreePage16, machine_settings(80), 2_800),
    "EngineMachine": (EngineMachine, machine_settings(100), 3_500),
}


def run_machine(name: str) -> None:
    machine, machine_settings_, least = MACHINES[name]
    STEPS[name] = 0
    run_state_machine_as_test(machine, settings=machine_settings_)
    assert STEPS[name] >= least, f"{name} ran only {STEPS[name]} steps"
    FINISHED.add(name)


def test_kv_tree_page_size_1() -> None:
    run_machine("KVTreePage1")


def test_kv_tree_page_size_4() -> None:
    run_machine("KVTreePage4")


def test_kv_tree_page_size_16() -> None:
    run_machine("KVTreePage16")


def test_engine() -> None:
    run_machine("EngineMachine")


def test_total_state_machine_steps() -> None:
    """At least 10,000 steps in all (runs any machine not yet run in this session)."""
    for name in MACHINES:
        if name not in FINISHED:
            run_machine(name)
    total = sum(STEPS[n] for n in MACHINES)
    print(f"state-machine steps: {dict(STEPS)} total {total}; events: {dict(EVENTS)}")
    assert total >= MIN_TOTAL_STEPS
    # the interesting paths really ran
    for name in ("KVTreePage1", "KVTreePage4", "KVTreePage16"):
        assert EVENTS[f"{name} exhausted"] > 0 and EVENTS[f"{name} appended"] > 0
    for event in (
        "engine step",
        "engine step exhausted",
        "engine score",
        "engine forward",
        "engine prefill",
        "engine BranchError",
        "engine ContextLengthError",
        "engine InvalidTokenError",
    ):
        assert EVENTS[event] > 0, event
