"""``Engine.branch_out``: n branches sampling their first token from one forward.

It must draw exactly what a step of n forks made before the forward draws (same seeds, same
logits), while holding fewer pages: the forks share the whole prompt, its partial last page
included, where forks made before the forward each copy that page when they feed the last
prompt token.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dendrite.engine import Engine, EngineConfig
from dendrite.errors import BranchError, ConfigError
from dendrite.model.loader import load_model
from dendrite.model.tokenizer import load_tokenizer
from dendrite.sampling import SamplingParams

from .test_kv_tree import snapshot

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"
PARAMS = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, ignore_eos=True)
PROMPT = "3 3 8 8\n8 / 3 = "  # not a whole number of 16-token pages


@pytest.fixture(scope="module")
def engines() -> tuple[Engine, Engine]:
    model, tok = load_model(MODEL), load_tokenizer(MODEL)
    return Engine(model, tok, EngineConfig(num_pages=64)), Engine(
        model, tok, EngineConfig(num_pages=64)
    )


@pytest.mark.parametrize("n", [1, 2, 7])
def test_same_tokens_as_stepping_forks_made_before(engines: tuple[Engine, Engine], n: int) -> None:
    new, old = engines
    root = new.add(PROMPT, PARAMS, seed=3)
    new.prefill([root])
    first = new.branch_out(root, n)
    branches = [new.branches[o.branch] for o in first]
    assert branches[0] is root and len({b.id for b in branches}) == n
    ref_root = old.add(PROMPT, PARAMS, seed=3)
    old.prefill([ref_root])
    ref = [ref_root] + [old.fork(ref_root) for _ in range(n - 1)]
    ref_first = old.step(ref)
    assert [o.token for o in first] == [o.token for o in ref_first]
    assert [o.logprob for o in first] == pytest.approx([o.logprob for o in ref_first], abs=1e-5)
    assert all(b.num_generated == 1 for b in branches)
    # the prompt is held once: forks made before the forward copy its partial last page
    assert len(new.encode(PROMPT)) % new.config.page_size != 0
    assert new.stats().used_pages == old.stats().used_pages - (n - 1)
    new.run(branches)
    old.run(ref)
    assert [new.output_ids(b) for b in branches] == [old.output_ids(b) for b in ref]
    for e in engines:
        e.check_integrity()
        e.free_all()


def test_bad_input_changes_nothing(engines: tuple[Engine, Engine]) -> None:
    e = engines[0]
    root = e.add(PROMPT, PARAMS)
    before = (snapshot(e.tree), root.pending, set(e.branches))
    with pytest.raises(ConfigError, match="n >= 1"):
        e.branch_out(root, 0)
    assert (snapshot(e.tree), root.pending, set(e.branches)) == before
    e.forward([root])  # nothing pending now
    with pytest.raises(BranchError, match="no pending tokens"):
        e.branch_out(root, 2)
    e.free(root)
    with pytest.raises(BranchError):
        e.branch_out(root, 2)  # freed
    e.check_integrity()
    assert not e.branches


def test_whole_prompt_in_one_call(engines: tuple[Engine, Engine]) -> None:
    """``branch_out`` on a fresh prompt (the bench's tree) feeds it in the same forward that
    gives the first samples: the same tokens, logprobs and pages as prefill, then branch_out.
    The outputs read from the leaf up equal the whole sequence's tail."""
    one, two = engines
    runs = []
    for e, prefill in ((one, False), (two, True)):
        root = e.add(PROMPT, PARAMS, seed=5)
        if prefill:
            e.prefill([root])
        branches = [e.branches[o.branch] for o in e.branch_out(root, 5)]
        e.run(branches[:3])  # two stay one token in: outputs with a pending token
        e.fork(branches[1])  # a fork shares its parent's segments
        outs = [(e.output_ids(b), e.output_logprobs(b)) for b in e.branches.values()]
        for b in e.branches.values():
            whole = e.token_ids(b)
            assert e.output_ids(b) == whole[b.prompt_len :]
            assert len(e.output_logprobs(b)) == len(whole) - b.prompt_len == b.num_generated
            assert e.tail_ids(b, 4) == whole[-4:] and e.tail_ids(b, 0) == []
        runs.append((outs, e.stats().used_pages))
        e.check_integrity()
        e.free_all()
    (outs1, pages1), (outs2, pages2) = runs
    assert [o for o, _ in outs1] == [o for o, _ in outs2] and pages1 == pages2
    for (_, lp1), (_, lp2) in zip(outs1, outs2, strict=True):
        assert lp1 == pytest.approx(lp2, abs=1e-5)
    assert {len(o) for o, _ in outs1} == {1, PARAMS.max_new_tokens}
