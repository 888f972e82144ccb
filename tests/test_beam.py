"""Beam search on the engine against HF ``generate(num_beams=k)``: same ids, same scores.

Random tiny models rarely emit their EOS, so each model gets an EOS set that beams actually
reach: four tokens the model finds likely along its best no-EOS beam but never uses there.
Every comparison also checks the search released everything it allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from dendrite.engine import Engine
from dendrite.errors import ContextLengthError, PoolExhaustedError, SearchError
from dendrite.model.random_init import make_random_checkpoint
from dendrite.search.beam import BeamResult, beam_search

PAD = 3  # nonzero: HF pads with eos[0] instead when pad_token_id is 0
MODES: tuple[bool | str, ...] = (True, False, "never")


@dataclass
class Case:
    engine: Engine
    hf: transformers.PreTrainedModel
    prompt: list[int]
    eos: list[int]


def random_prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(4, vocab, (n - 1,), generator=g).tolist()]


def pick_eos(case: Case, n: int = 4) -> list[int]:
    """``n`` tokens likely along the best no-EOS beam that no beam uses (so beams can end)."""
    dry = beam_search(case.engine, case.prompt, num_beams=8, max_new_tokens=32, eos_token_ids=())
    best = dry.beams[0].output_ids
    with torch.no_grad():
        logits = case.hf(torch.tensor([case.prompt + best])).logits[0, len(case.prompt) - 1 : -1]
    mean = torch.log_softmax(logits.float(), -1).mean(0)  # [V]
    mean[[t for b in dry.beams for t in b.output_ids]] = float("-inf")
    return mean.topk(n).indices.tolist()


Cases = Callable[[str], Case]  # model name -> its case, built on first use


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Cases:
    """llama / qwen2 (random, GQA, vocab 256) and stories260k (skips when absent)."""
    root = tmp_path_factory.mktemp("beam")
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            if name == "stories":
                path: Path = request.getfixturevalue("stories")
            else:
                path = make_random_checkpoint(root / name, name, seed=5 if name == "llama" else 6)
            engine = Engine.from_pretrained(path)
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            if name == "stories":
                prompt = engine.encode("Once upon a time, there was a little dog named")
            else:
                prompt = random_prompt(0, 16, engine.model_config.vocab_size)
            case = Case(engine, hf.eval(), prompt, [])
            case.eos = pick_eos(case)
            built[name] = case
        return built[name]

    return get


def hf_beams(
    case: Case, k: int, n: int, lp: float, mode: bool | str, eos: Sequence[int], **kw: Any
) -> tuple[list[list[int]], list[float]]:
    ids = torch.tensor([case.prompt])
    generate: Any = case.hf.generate
    with torch.no_grad():
        out = generate(
            ids, attention_mask=torch.ones_like(ids), num_beams=k, num_return_sequences=k,
            do_sample=False, max_new_tokens=n, length_penalty=lp, early_stopping=mode,
            output_scores=True, return_dict_in_generate=True, eos_token_id=list(eos),
            pad_token_id=PAD, **kw,
        )  # fmt: skip
    return out.sequences[:, len(case.prompt) :].tolist(), out.sequences_scores.tolist()


def ours(case: Case, **kw: Any) -> BeamResult:
    """beam_search, checking it leaves the engine exactly as it found it."""
    engine = case.engine
    before, live, steps = engine.stats().used_pages, set(engine.branches), engine.num_steps
    res = beam_search(engine, case.prompt, **kw)
    assert engine.stats().used_pages == before
    assert set(engine.branches) == live
    assert res.steps == engine.num_steps - steps <= kw["max_new_tokens"]
    engine.check_integrity()
    return res


def assert_same(res: BeamResult, ref: tuple[list[list[int]], list[float]], what: str) -> None:
    ref_ids, ref_scores = ref
    assert res.padded(PAD) == ref_ids, what
    got = [b.score for b in res.beams]
    assert max(abs(a - b) for a, b in zip(got, ref_scores, strict=True)) < 1e-4, what


# Every width x mode x two length penalties on every model (1.0, 0.6 and 2.0 all appear);
# 64 new tokens for widths 2 and 8, 32 for width 4.
SECOND_LP = {"llama": 0.6, "qwen2": 2.0, "stories": 0.6}


@pytest.mark.parametrize("pipelined", [False, True], ids=["tree", "pipelined"])
@pytest.mark.parametrize("mode", MODES, ids=str)
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("name", ["llama", "qwen2", "stories"])
def test_matches_hf(cases: Cases, name: str, k: int, mode: bool | str, pipelined: bool) -> None:
    """Both paths: beams as KV-tree branches, and pipelined (beams on the device's pages)."""
    case = cases(name)
    n = 32 if k == 4 else 64
    lps = (1.0, SECOND_LP[name])
    for lp in lps:
        what = f"{name} k={k} mode={mode} lp={lp} n={n} pipelined={pipelined}"
        res = ours(
            case, num_beams=k, max_new_tokens=n, length_penalty=lp, early_stopping=mode,
            eos_token_ids=case.eos, pipelined=pipelined,
        )  # fmt: skip
        assert_same(res, hf_beams(case, k, n, lp, mode, case.eos), what)
        assert len(res.beams) == k
        assert res.eos_hypotheses > 0, f"no hypothesis ended on EOS: {what}"
        for b in res.beams:
            assert (b.finish_reason == "eos") == (b.output_ids[-1] in case.eos)
            assert b.finish_reason == "eos" or len(b.output_ids) == n


def test_early_stopping_modes_differ(cases: Cases) -> None:
    """True stops once k hypotheses ended; False when none can improve; "never" runs longest."""
    case = cases("llama")
    steps = {
        str(mode): ours(
            case, num_beams=4, max_new_tokens=32, early_stopping=mode, eos_token_ids=case.eos
        ).steps
        for mode in MODES
    }
    assert steps["True"] <= steps["False"] <= steps["never"] == 32, steps
    assert steps["True"] < 32, steps


def test_no_eos_and_engine_default_eos(cases: Cases) -> None:
    case = cases("llama")
    res = ours(case, num_beams=4, max_new_tokens=32, eos_token_ids=())
    config = case.hf.generation_config
    saved, config.eos_token_id = config.eos_token_id, None
    try:
        assert_same(res, hf_beams(case, 4, 32, 1.0, False, []), "no eos")
    finally:
        config.eos_token_id = saved
    assert all(len(b.output_ids) == 32 and b.finish_reason == "length" for b in res.beams)
    default = ours(case, num_beams=4, max_new_tokens=32)  # the engine's eos: [2]
    assert case.engine.eos_token_ids == (2,)
    assert_same(default, hf_beams(case, 4, 32, 1.0, False, [2]), "engine eos")


@pytest.mark.parametrize("tight", [False, True], ids=["broad", "tight"])
def test_grammar_mask_matches_hf_prefix_constraint(
    cases: Cases, monkeypatch: pytest.MonkeyPatch, tight: bool
) -> None:
    """Masks from engine.allowed_tokens act like HF's prefix_allowed_tokens_fn.

    Tight: three allowed tokens for K = 8 candidates, so HF's -1e9 filler slots take part.
    """
    case = cases("llama" if tight else "qwen2")
    vocab = case.engine.model_config.vocab_size
    eos = case.eos[:1] if tight else case.eos
    if tight:
        allowed = [5, 9, eos[0]]
    else:
        allowed = [t for t in range(vocab) if t % 3 != 0 or t in eos]
    mask = torch.zeros(vocab, dtype=torch.bool)
    mask[allowed] = True
    monkeypatch.setattr(case.engine, "allowed_tokens", lambda rows: mask.expand(len(rows), -1))
    res = ours(case, num_beams=4, max_new_tokens=16 if tight else 32, eos_token_ids=eos)
    ref = hf_beams(
        case, 4, 16 if tight else 32, 1.0, False, eos,
        prefix_allowed_tokens_fn=lambda _b, _ids: allowed,
    )  # fmt: skip
    assert_same(res, ref, "masked")
    assert all(t in allowed for b in res.beams for t in b.output_ids)


def test_num_return_sequences_is_a_prefix(cases: Cases) -> None:
    case = cases("llama")
    kw: dict[str, Any] = dict(num_beams=4, max_new_tokens=32, eos_token_ids=case.eos)
    full = ours(case, **kw)
    two = ours(case, num_return_sequences=2, **kw)
    assert two.beams == full.beams[:2]


@pytest.mark.parametrize(
    "kw",
    [
        dict(num_beams=0),
        dict(num_beams=2.0),
        dict(max_new_tokens=0),
        dict(early_stopping="sometimes"),
        dict(early_stopping=1),
        dict(num_return_sequences=5),
        dict(num_return_sequences=0),
        dict(length_penalty=float("nan")),
        dict(eos_token_ids=[256]),
    ],
    ids=str,
)
def test_bad_settings_raise_before_allocating(cases: Cases, kw: dict[str, Any]) -> None:
    case = cases("llama")
    engine = case.engine
    before, live, steps = engine.stats(), set(engine.branches), engine.num_steps
    args: dict[str, Any] = {"num_beams": 4, "max_new_tokens": 8, **kw}
    with pytest.raises(SearchError):
        beam_search(engine, case.prompt, **args)
    assert (engine.stats(), set(engine.branches), engine.num_steps) == (before, live, steps)


def test_pipelined_refuses_a_grammar(cases: Cases) -> None:
    case = cases("llama")
    engine = case.engine
    before, live, steps = engine.stats(), set(engine.branches), engine.num_steps
    with pytest.raises(SearchError, match="grammar"):
        beam_search(
            engine, case.prompt, num_beams=2, max_new_tokens=4, constraint=object(),  # type: ignore[arg-type]
            pipelined=True,
        )  # fmt: skip
    assert (engine.stats(), set(engine.branches), engine.num_steps) == (before, live, steps)


def test_pipelined_search_without_room_for_its_pages_changes_nothing(tmp_path: Path) -> None:
    """8 slots x 2 pages each do not fit a 6-page pool: a clear error, everything given back."""
    engine = Engine.from_pretrained(make_random_checkpoint(tmp_path / "m", "llama"), num_pages=6)
    before = engine.stats()
    with pytest.raises(PoolExhaustedError, match="free KV pages"):
        beam_search(engine, list(range(1, 17)), num_beams=8, max_new_tokens=32, pipelined=True)
    assert engine.stats() == before and not engine.branches
    engine.check_integrity()


@pytest.mark.parametrize("fail_at", [1, 6, 17])
def test_error_mid_pipelined_search_frees_everything(
    cases: Cases, monkeypatch: pytest.MonkeyPatch, fail_at: int
) -> None:
    """A step that raises (here the 1st, 6th or 17th after the prompt, 17: past the first
    page filled) gives back the slots' pages and the prompt's branch."""
    case = cases("llama")
    engine = case.engine
    before, live = engine.stats().used_pages, set(engine.branches)
    real = engine._decode_pages
    calls = 0

    def failing(*args: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == fail_at:
            assert engine.stats().used_pages > before  # the slots' pages are taken
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(engine, "_decode_pages", failing)
    with pytest.raises(RuntimeError, match="boom"):
        beam_search(
            engine, case.prompt, num_beams=8, max_new_tokens=32, eos_token_ids=(), pipelined=True
        )
    assert calls == fail_at
    assert engine.stats().used_pages == before
    assert set(engine.branches) == live
    engine.check_integrity()


def test_error_mid_search_frees_everything(cases: Cases, monkeypatch: pytest.MonkeyPatch) -> None:
    case = cases("llama")
    engine = case.engine
    before, live = engine.stats().used_pages, set(engine.branches)
    calls = 0

    def failing(rows: list[Any]) -> None:
        nonlocal calls
        calls += 1
        if calls == 6:
            raise RuntimeError("boom")
        return None

    monkeypatch.setattr(engine, "allowed_tokens", failing)
    with pytest.raises(RuntimeError, match="boom"):
        beam_search(engine, case.prompt, num_beams=8, max_new_tokens=32, eos_token_ids=())
    assert engine.stats().used_pages == before
    assert set(engine.branches) == live
    engine.check_integrity()


def test_one_forward_per_generated_token(cases: Cases, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prompt is fed once (not k times); then one batched forward of <= k beams per token.

    Another user's branch holds pages throughout: the search gives back exactly its own.
    """
    case = cases("qwen2")
    engine = case.engine
    other = engine.add(random_prompt(3, 40, engine.model_config.vocab_size))
    engine.forward([other])
    sizes: list[int] = []
    forward = engine.forward

    def counting(rows: list[Any]) -> torch.Tensor:
        sizes.append(len(rows))
        return forward(rows)

    monkeypatch.setattr(engine, "forward", counting)
    try:
        before = engine.stats().used_pages
        assert before > 0
        res = ours(case, num_beams=8, max_new_tokens=24, eos_token_ids=())
        assert engine.stats().used_pages == before
    finally:
        engine.free(other)
    assert res.steps == len(sizes) == 24
    assert sizes[0] == 1 and all(1 <= s <= 8 for s in sizes)


def test_context_too_long_raises_before_allocating(cases: Cases) -> None:
    case = cases("llama")  # max_position_embeddings 1024
    before, live = case.engine.stats(), set(case.engine.branches)
    with pytest.raises(ContextLengthError):
        beam_search(case.engine, [1] * 1000, num_beams=2, max_new_tokens=26)
    assert (case.engine.stats(), set(case.engine.branches)) == (before, live)


@pytest.fixture(scope="module")
def long_prompt_run(cases: Cases) -> BeamResult:
    case = cases("llama")  # max_position_embeddings 1024
    prompt = random_prompt(7, 512, case.engine.model_config.vocab_size)
    steps, used = case.engine.num_steps, case.engine.stats().used_pages
    res = beam_search(case.engine, prompt, num_beams=8, max_new_tokens=64, eos_token_ids=())
    assert res.steps == case.engine.num_steps - steps == 64
    assert case.engine.stats().used_pages == used
    print(
        f"\nbeam 8 x 64 over 512: peak {res.peak_pages} pages, read {res.read_pages}, "
        f"paged minimum {res.paged_min_pages}, "
        f"unique minimum {res.min_pages}, copy-per-beam {res.copy_pages}; ratios held "
        f"{res.pages_ratio:.2f} read {res.read_ratio:.2f} copy {res.copy_ratio:.2f}"
    )
    return res


def test_pages_shared_not_copied(long_prompt_run: BeamResult) -> None:
    res = long_prompt_run
    assert res.copy_ratio > 5  # eight copies of a 576-token context
    assert res.read_ratio <= 1.3  # the pages the beams read: the prompt once + the tree
    assert res.pages_ratio < res.copy_ratio / 3


def test_pipelined_pages_read_are_the_fewest(cases: Cases, long_prompt_run: BeamResult) -> None:
    """The pipelined path holds each slot's pages for the whole search, but after the last
    step its beams read exactly the paged minimum: the prompt's full pages once, a filled
    page once for all its descendants, one last page per beam. Same beams as the tree path."""
    case = cases("llama")
    prompt = random_prompt(7, 512, case.engine.model_config.vocab_size)
    used = case.engine.stats().used_pages
    res = beam_search(
        case.engine, prompt, num_beams=8, max_new_tokens=64, eos_token_ids=(), pipelined=True
    )
    assert case.engine.stats().used_pages == used
    assert [b.output_ids for b in res.beams] == [b.output_ids for b in long_prompt_run.beams]
    for a, b in zip(res.beams, long_prompt_run.beams, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
    assert res.read_pages == res.paged_min_pages
    assert res.read_ratio <= 1.3 and res.copy_ratio > 5
    # held: the prompt's 32 pages, and 8 slots x the 4 page indices 64 new tokens reach
    assert res.peak_pages == 32 + 8 * ((512 + 64 - 2) // 16 - 32 + 1)
    assert res.copy_pages == long_prompt_run.copy_pages


def test_pages_held_within_1_3x_of_unique(long_prompt_run: BeamResult) -> None:
    assert long_prompt_run.pages_ratio <= 1.3


def test_pages_held_are_the_fewest_any_paged_cache_could_hold(
    long_prompt_run: BeamResult,
) -> None:
    """Held at the peak == one page per distinct (page index, prefix through that page) of
    the live beams: no cache of 16-token pages read by paged attention holds fewer."""
    assert long_prompt_run.peak_pages == long_prompt_run.paged_min_pages


def _paged_minimum_by_definition(sequences: list[list[int]], page_size: int) -> int:
    """The definition, spelled out: per page index, the distinct blocks (tokens up to the
    page's end), less the partial ones another block extends."""
    blocks: dict[int, set[tuple[int, ...]]] = {}
    for ids in sequences:
        for j in range(-(-len(ids) // page_size)):
            blocks.setdefault(j, set()).add(tuple(ids[: min((j + 1) * page_size, len(ids))]))
    return sum(
        1
        for same_page in blocks.values()
        for a in same_page
        if not any(len(b) > len(a) and b[: len(a)] == a for b in same_page)
    )


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 2), max_size=12), max_size=6),
    st.integers(1, 5),
)
def test_paged_minimum_matches_its_definition(seqs: list[list[int]], page_size: int) -> None:
    from dendrite.search.beam import paged_minimum

    assert paged_minimum(seqs, page_size) == _paged_minimum_by_definition(seqs, page_size)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 7), st.lists(st.integers(0, 3), max_size=9)), max_size=12),
    st.integers(1, 5),
    st.booleans(),
)
def test_tree_paged_minimum_reads_the_same_count_off_the_kv_tree(
    ops: list[tuple[int, list[int]]], page_size: int, distinct: bool
) -> None:
    """Random forks and appends on a KV tree: where its segments are a trie of the branches
    (``distinct``: each fork's first token differs from its siblings', as beam search's
    candidates do), the count off the tree equals ``paged_minimum`` of their tokens; where
    they may not be, it is either that or None (the meter then counts tokens)."""
    from dendrite.kv.pool import PagePool, PoolConfig
    from dendrite.kv.tree import KVTree
    from dendrite.search.beam import paged_minimum, tree_paged_minimum

    cfg = PoolConfig(num_layers=1, num_pages=256, num_kv_heads=1, head_dim=2, page_size=page_size)
    tree = KVTree(PagePool(cfg))
    branches = [tree.new_branch()]
    tree.append(branches[0], [5, 6, 7])
    fresh = 100  # a token no other branch starts a continuation with
    for which, tokens in ops:
        src = branches[which % len(branches)]
        child = tree.fork(src)
        if distinct:
            fresh += 1
            tokens = [fresh, *tokens]
        if tokens:
            tree.append(child, tokens)
        branches.append(child)
    tree.check_integrity()
    want = paged_minimum([tree.token_ids(b) for b in branches], page_size)
    got = tree_paged_minimum(branches, page_size)
    if distinct:
        assert got == want
    else:
        assert got in (want, None)


def test_paged_minimum_counts_distinct_page_prefixes() -> None:
    from dendrite.search.beam import paged_minimum

    a, b = [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7]
    assert paged_minimum([a, b], 4) == 3  # the docstring's example
    assert paged_minimum([a, a], 4) == 2  # identical sequences share everything
    assert paged_minimum([a[:4], a], 4) == 2  # a full first page is shared
    assert paged_minimum([[9, *a[1:]], b], 4) == 4  # nothing shared
    assert paged_minimum([a, b], 1) == 7  # page size 1: the unique tokens
    assert paged_minimum([a[:5], a], 4) == 2  # a partial page that a's page 1 extends
    assert paged_minimum([a[:5], b], 4) == 2  # likewise: b's page 1 starts with a[4]


@pytest.fixture(scope="module")
def page_size_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[BeamResult]]:
    """Beam 8 x 64 over three 512-token prompts, on 16-token pages and on token-sized ones
    (the same checkpoint: ``bench search``'s random Llama)."""
    path = make_random_checkpoint(
        tmp_path_factory.mktemp("pages") / "m", "llama", hidden_size=256,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
    )  # fmt: skip
    runs: dict[int, list[BeamResult]] = {}
    for page_size in (16, 1):
        engine = Engine.from_pretrained(path, page_size=page_size)
        runs[page_size] = []
        for seed in range(3):  # seed 0: 16-token pages hold 1.34x its unique tokens
            g = torch.Generator().manual_seed(seed)
            prompt = [1, *torch.randint(3, 256, (511,), generator=g).tolist()]
            runs[page_size].append(beam_search(engine, prompt, num_beams=8, max_new_tokens=64))
            assert engine.stats().used_pages == 0
        engine.check_integrity()
    return runs


def test_token_pages_hold_exactly_the_unique_tokens(
    page_size_runs: dict[int, list[BeamResult]],
) -> None:
    """With page_size=1 the cache holds each distinct (prefix, token) once: pages held ==
    unique tokens at the peak (ratio 1.0), under every prompt; 16-token pages hold the paged
    minimum, which on some prompts is above 1.3x the unique tokens' pages."""
    for res in page_size_runs[1]:
        assert res.peak_pages == res.min_pages == res.paged_min_pages
        assert res.pages_ratio == 1.0
        assert res.copy_ratio > 5
    for res in page_size_runs[16]:
        assert res.peak_pages == res.paged_min_pages
    assert max(r.pages_ratio for r in page_size_runs[16]) > 1.3  # why page_size=1 exists


def test_page_size_does_not_change_the_beams(
    page_size_runs: dict[int, list[BeamResult]],
) -> None:
    for a, b in zip(page_size_runs[16], page_size_runs[1], strict=True):
        assert [x.output_ids for x in a.beams] == [x.output_ids for x in b.beams]
        assert [x.score for x in a.beams] == pytest.approx([x.score for x in b.beams], abs=1e-5)
    tokens16 = [r.peak_pages * 16 for r in page_size_runs[16]]
    tokens1 = [r.peak_pages for r in page_size_runs[1]]
    assert all(t1 < t16 for t1, t16 in zip(tokens1, tokens16, strict=True))  # fewer KV slots
