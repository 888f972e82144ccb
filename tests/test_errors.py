"""Bad input: each case raises the documented :class:`DendriteError` subclass, with a message
that names the problem, and leaves the engine exactly as it was (``dendrite/errors.py``).

"Exactly as it was" is checked by :func:`refused`: stats, the free pages, and every live
branch's tokens, pending tokens, finish reason and KV length are compared before and after
the call, and ``check_integrity()`` must still hold.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from dendrite.engine import Branch, Engine, EngineConfig
from dendrite.errors import (
    BranchError,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    DendriteError,
    InvalidTokenError,
    PoolExhaustedError,
    UnsupportedModelError,
)
from dendrite.model import Transformer, load_model
from dendrite.sampling import SamplingParams

VOCAB = 256  # the tiny preset
MAX_CONTEXT = 1024
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_checkpoint: Path) -> Transformer:
    return load_model(tiny_checkpoint)


@pytest.fixture
def make_engine(model: Transformer) -> Callable[..., Engine]:
    def make(page_size: int = 4, num_pages: int = 64) -> Engine:
        return Engine(model, None, EngineConfig(page_size=page_size, num_pages=num_pages))

    return make


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    """An engine holding a small tree: a prefilled branch, a fork of it, a pending prompt."""
    e = make_engine()
    a = e.add(list(range(3, 13)), GREEDY)
    e.step([a])
    b = e.fork(a)
    e.step([a, b])
    e.add([7, 8, 9, 10, 11], SamplingParams(temperature=0.8, max_new_tokens=8), seed=3)
    assert e.stats().shared_pages > 0
    return e


def state(e: Engine) -> tuple[Any, ...]:
    return (
        e.stats(),
        sorted(e.pool.free_pages()),
        {
            i: (e.token_ids(b), b.pending, b.finish_reason, b.num_generated, len(b.kv))
            for i, b in e.branches.items()
        },
    )


@contextmanager
def refused(e: Engine, error: type[DendriteError], *words: str) -> Iterator[None]:
    """The block raises ``error`` whose message contains ``words``; ``e`` is unchanged."""
    e.check_integrity()
    before = state(e)
    with pytest.raises(error) as info:
        yield
    message = str(info.value)
    for w in words:
        assert w in message, f"{w!r} not in {message!r}"
    e.check_integrity()
    assert state(e) == before, f"{error.__name__} left the engine changed"


def live(e: Engine) -> list[Branch]:
    return list(e.branches.values())


def still_works(e: Engine) -> None:
    """After the refusals the engine runs and frees as usual."""
    outs = e.step()
    assert all(0 <= o.token < VOCAB for o in outs)
    e.check_integrity()
    e.free_all()
    assert e.stats().used_pages == 0


# ---------------------------------------------------------------------- checkpoints


def test_missing_model_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match=r"no-such-model does not exist"):
        load_model(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        Engine.from_pretrained(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_model(tmp_path / "empty")


@pytest.fixture
def ckpt(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny checkpoint to break."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def edit_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_the_copy_loads(ckpt: Path) -> None:
    """(So the failures below are due to the edits alone.)"""
    assert load_model(ckpt).config.vocab_size == VOCAB


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, ["GPT2LMHeadModel"]),
        ({"architectures": None, "model_type": "falcon"}, ["falcon", "not supported"]),
        ({"hidden_act": "gelu"}, ["gelu"]),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, ["yarn"]),
        ({"num_key_value_heads": 3}, ["num_key_value_heads 3"]),
    ],
)
def test_unsupported_model(ckpt: Path, changes: dict[str, Any], words: list[str]) -> None:
    edit_config(ckpt, **changes)
    with pytest.raises(UnsupportedModelError) as info:
        load_model(ckpt)
    for w in words:
        assert w in str(info.value)


def test_broken_config(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["hidden_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_model(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(ckpt)


K0 = "model.layers.0.self_attn.k_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
EXTRA = "model.layers.0.self_attn.extra_proj.weight"


def _drop(t: dict[str, torch.Tensor]) -> None:
    del t[DOWN1]


def _reshape(t: dict[str, torch.Tensor]) -> None:
    t[K0] = t[K0][:-1].contiguous()


def _add(t: dict[str, torch.Tensor]) -> None:
    t[EXTRA] = torch.zeros(4, 4)


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (_drop, ["lacks tensor", DOWN1]),
        (_reshape, [K0, "shape (31, 64)", "(32, 64)"]),
        (_add, ["unexpected tensor", EXTRA]),
    ],
    ids=["missing", "mis-shaped", "unexpected"],
)
def test_bad_tensor(
    ckpt: Path, edit: Callable[[dict[str, torch.Tensor]], None], words: list[str]
) -> None:
    edit_tensors(ckpt, edit)
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    for w in words:
        assert w in str(info.value), str(info.value)


def test_ignored_and_corrupt_files(ckpt: Path) -> None:
    # a buffer some old checkpoints carry is ignored, not "unexpected"
    def add_inv_freq(t: dict[str, torch.Tensor]) -> None:
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)

    edit_tensors(ckpt, add_inv_freq)
    load_model(ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(ckpt)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_model(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {K0: "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(
        CheckpointError, match=r"model-00001-of-00002\.safetensors, which is missing"
    ):
        load_model(ckpt)


# ---------------------------------------------------------------------- token ids


def test_token_outside_vocabulary(engine: Engine) -> None:
    a, b, c = live(engine)
    for bad in (VOCAB, VOCAB + 1000, -1):
        with refused(engine, InvalidTokenError, f"[{bad}]", f"vocabulary of {VOCAB}"):
            engine.add([5, bad, 6])
        with refused(engine, InvalidTokenError, f"[{bad}]"):
            engine.extend(a, [bad])
        with refused(engine, InvalidTokenError, f"[{bad}]"):
            engine.extend(c, [4, 5, bad])
        with refused(engine, InvalidTokenError, f"[{bad}]"):
            engine.score(b, [7, bad])
        with refused(engine, InvalidTokenError, f"[{bad}]"):
            engine.score_many([(a, [3]), (b, [bad])])
        with refused(engine, InvalidTokenError, f"[{bad}]"):
            engine.generate([[5, 6], [5, bad]], GREEDY)
    with refused(engine, InvalidTokenError, "[256, 300]"):
        engine.add([256, 300])
    still_works(engine)


# ---------------------------------------------------------------------- context length


def test_context_past_the_maximum(make_engine: Callable[..., Engine]) -> None:
    e = make_engine(page_size=16, num_pages=80)
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 1} tokens", f"{MAX_CONTEXT}"):
        e.add([5] * (MAX_CONTEXT + 1))
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 1} tokens"):
        e.generate([[5] * (MAX_CONTEXT + 1)], GREEDY)

    short = e.add([5] * 1000, GREEDY)
    e.extend(short, [6] * (MAX_CONTEXT - 1000))  # exactly the maximum is fine
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 1} tokens"):
        e.extend(short, [6])
    e.free(short)

    full = e.add([5] * MAX_CONTEXT, GREEDY)
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 1} tokens"):
        e.extend(full, [6])
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 1} tokens"):
        e.score(full, [6])
    # the step that fills the context finishes the branch: its sampled token can never be fed
    (out,) = e.step([full])
    assert out.finish_reason == "context" and len(full) == MAX_CONTEXT + 1
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 2} tokens"):
        e.extend(full, [6])
    child = e.fork(full)
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 2} tokens"):
        e.extend(child, [6])
    before = state(e)
    assert e.step([full, child]) == [] and e.step() == []
    assert state(e) == before
    # feeding that token anyway (forward() feeds finished branches too) would pass the maximum
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 1} tokens"):
        e.forward([full])
    fresh = e.add([5, 6], GREEDY)
    with refused(e, ContextLengthError, f"{MAX_CONTEXT + 1} tokens"):
        e.forward([fresh, child])  # all or nothing: the fresh prompt is not fed either
    e.free_all()
    assert e.stats().used_pages == 0


# ---------------------------------------------------------------------- pool capacity


def test_exhausted_pool_then_the_same_step_succeeds(make_engine: Callable[..., Engine]) -> None:
    e = make_engine(page_size=4, num_pages=8)
    a = e.add(list(range(3, 27)), GREEDY)  # 24 tokens: 6 pages
    e.step([a])
    sampled = SamplingParams(temperature=0.9, top_k=50, max_new_tokens=8)
    prompt = [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7]  # 12 tokens: 3 pages
    c = e.add(prompt, sampled, seed=5)
    assert e.stats().free_pages == 2
    with refused(e, PoolExhaustedError, "needs 3 new KV pages but only 2 of 8"):
        e.step([c])
    with refused(e, PoolExhaustedError, "needs 4 new KV pages"):  # a decodes onto a new page
        e.step()
    with refused(e, PoolExhaustedError, "new KV pages"):
        e.score(a, list(range(3, 20)))
    with refused(e, PoolExhaustedError, "new KV pages"):
        e.generate([list(range(3, 20))], GREEDY)
    e.free(a)
    (out,) = e.step([c])
    # the refused attempts left no trace: a fresh engine draws the same token
    ref = make_engine(page_size=4, num_pages=8)
    (want,) = ref.step([ref.add(prompt, sampled, seed=5)])
    assert (out.token, out.finish_reason) == (want.token, want.finish_reason)
    assert math.isclose(out.logprob, want.logprob, abs_tol=1e-5)
    e.check_integrity()
    e.free_all()
    assert e.stats().used_pages == 0


def test_exhausted_pool_by_a_copy_on_write(make_engine: Callable[..., Engine]) -> None:
    """Two forks writing after a mid-page fork in a full pool: the copy has no page."""
    e = make_engine(page_size=4, num_pages=2)
    a = e.add([3, 4, 5, 6, 7], GREEDY)  # after the step: 5 tokens in KV, 2 pages
    e.step([a])
    b = e.fork(a)
    assert e.stats().free_pages == 0
    with refused(e, PoolExhaustedError, "needs 1 new KV pages but only 0"):
        e.step([a, b])
    (out,) = e.step([a])  # the first writer continues in place: no page needed
    assert e.stats().free_pages == 0 and out.branch == a.id
    with refused(e, PoolExhaustedError, "needs 1 new KV pages but only 0"):
        e.step([b])
    e.free(a)
    e.step([b])
    e.check_integrity()


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"temperature": -0.5}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
    ],
)
def test_invalid_sampling_params(engine: Engine, kwargs: dict[str, Any], word: str) -> None:
    with refused(engine, ConfigError, word):
        engine.add([5, 6], SamplingParams(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "word"),
    [
        ({"page_size": 0}, "page_size"),
        ({"num_pages": 0}, "num_pages"),
        ({"num_pages": 2.5}, "num_pages"),
        ({"backend": "cuda-magic"}, "backend"),
        ({"cascade_max_depth": 0}, "cascade_max_depth"),
        ({"cascade_max_depth": 5}, "cascade_max_depth"),
        ({"cascade_max_depth": 2.0}, "cascade_max_depth"),
        ({"prefill_kernel": "fa4"}, "prefill_kernel"),
    ],
)
def test_invalid_engine_config(kwargs: dict[str, Any], word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        EngineConfig(**kwargs)


def test_text_or_empty_input_without_a_tokenizer(engine: Engine) -> None:
    a = live(engine)[0]
    with refused(engine, ConfigError, "tokenizer"):
        engine.add("Once upon a time")
    with refused(engine, ConfigError, "tokenizer"):
        engine.extend(a, "more text")
    with refused(engine, ConfigError, "tokenizer"):
        engine.score(a, "a continuation")
    with refused(engine, ConfigError, "must not be empty"):
        engine.add([])
    with refused(engine, ConfigError, "must not be empty"):
        engine.extend(a, [])
    with refused(engine, ConfigError, "must not be empty"):
        engine.score(a, [])
    still_works(engine)


# ---------------------------------------------------------------------- branches


def test_freed_branch(engine: Engine, make_engine: Callable[..., Engine]) -> None:
    a, b, c = live(engine)
    engine.free(b)
    for call in (
        lambda: engine.free(b),
        lambda: engine.fork(b),
        lambda: engine.extend(b, [3]),
        lambda: engine.step([a, b]),
        lambda: engine.score(b, [3]),
        lambda: engine.score_many([(a, [3]), (b, [3])]),
        lambda: engine.run([c, b]),
    ):
        with refused(engine, BranchError, "not a live branch"):
            call()
    other = make_engine()
    stranger = other.add([5, 6, 7])
    with refused(engine, BranchError, "not a live branch"):
        engine.step([stranger])
    with refused(engine, BranchError, "not a live branch"):
        engine.fork(stranger)
    with refused(engine, BranchError, "twice"):
        engine.step([a, c, a])
    engine.forward([a])  # a has nothing pending now
    with refused(engine, BranchError, "no pending"):
        engine.forward([c, a])
    with refused(engine, BranchError, "no pending"):
        engine.score(a, [3])
    still_works(engine)
