"""The vectorised sampler: batch independence, reproducibility, truncation, statistics.

Small vocabularies on CPU. The reference for top-k / top-p is the per-row filter the engine
used before sampling was vectorised (kept here, in the test, as the specification).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dendrite.engine import Engine, EngineConfig
from dendrite.errors import ConfigError
from dendrite.model.loader import load_model
from dendrite.model.random_init import make_random_checkpoint
from dendrite.sampling import (
    SamplingParams,
    _mix32,
    _param_rows,
    derive_seed,
    gumbel_noise,
    noise_key,
    noise_keys,
    rank_keys,
    sample,
    truncate_sorted,
    uniform,
)

MIXED = [
    SamplingParams(),  # greedy
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=3),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=0.9, top_k=5, top_p=0.6),
    SamplingParams(temperature=2.0, top_k=1),
]


def reference_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p of one row [V]; removed entries become -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        remove[0] = False
        logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    return logits


def keys_for(n: int, seed: int = 0) -> list[int | None]:
    return [noise_key(seed + i, 7) for i in range(n)]


def test_vectorised_noise_keys_equal_the_scalar_ones() -> None:
    """``noise_keys`` (numpy uint64, wrapping) gives ``noise_key``'s value for every seed the
    engine makes (``derive_seed``'s 63 bits) and for the edges of uint64; a negative or wider
    seed takes the scalar path."""
    g = torch.Generator().manual_seed(0)
    seeds = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, *(derive_seed(7, i) for i in range(50))]
    seeds += torch.randint(0, 2**62, (30,), generator=g).tolist()
    positions = [i * 37 % 9000 for i in range(len(seeds))]
    assert noise_keys(seeds, positions) == [
        noise_key(s, p) for s, p in zip(seeds, positions, strict=True)
    ]
    odd = [-5, 2**64, 2**70 + 3]
    assert noise_keys(odd, [1, 2, 3]) == [
        noise_key(s, p) for s, p in zip(odd, [1, 2, 3], strict=True)
    ]
    assert noise_keys([], []) == []


def test_parameter_table_rows() -> None:
    """Each row's (temperature, top-k, top-p, key low, key high, greedy), whether its params
    object is shared or not: greedy rows (1, 0, 1, 0, 0, 1) whatever key they carry, a top-k
    at or over the vocabulary off, keys split in 32-bit halves; the draw width, the ranking
    and top-p flags over the sampled rows only."""
    V = 40
    shared = SamplingParams(temperature=0.5, top_k=7)
    params = [*MIXED, shared, shared, SamplingParams(temperature=1.0, top_k=V)]
    keys: list[int | None] = [None, *(noise_key(9, i) for i in range(len(params) - 1))]
    table, width, sort, top_p = _param_rows(params, keys, V)
    assert table.shape == (len(params), 6) and table.dtype.name == "float64"
    for row, p, key in zip(table.tolist(), params, keys, strict=True):
        if p.greedy:
            assert row == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
            continue
        assert key is not None
        k = p.top_k if p.top_k < V else 0
        assert row == [p.temperature, k, p.top_p, key & 0xFFFFFFFF, key >> 32, 0.0]
    assert (width, sort, top_p) == (V, True, True)  # MIXED's temperature-only row: all of V
    one = [shared] * 5
    table, width, sort, top_p = _param_rows(one, keys[1:6], V)
    assert (width, sort, top_p) == (7, True, False)
    assert table[:, 3].tolist() == [float(k & 0xFFFFFFFF) for k in keys[1:6]]
    with pytest.raises(AssertionError, match="noise key"):
        _param_rows([shared], [None], V)
    assert _param_rows([], [], V)[0].shape == (0, 6)


def test_temperature_zero_is_argmax_with_the_models_logprob() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=g)
    allowed = torch.rand(5, 40, generator=g) > 0.5
    allowed[:, 0] = True
    tokens, logps = sample(logits, [SamplingParams()] * 5, [None] * 5, allowed)
    masked = logits.masked_fill(~allowed, float("-inf"))
    assert tokens == masked.argmax(-1).tolist()
    want = torch.log_softmax(masked, -1)[torch.arange(5), masked.argmax(-1)]
    assert logps == pytest.approx(want.tolist(), abs=1e-6)
    assert all(isinstance(t, int) for t in tokens) and all(isinstance(x, float) for x in logps)


def test_a_rows_token_depends_only_on_its_own_row() -> None:
    """The same row draws the same token alone, in a batch, in another order, among others."""
    g = torch.Generator().manual_seed(1)
    V = 50
    rows = torch.randn(len(MIXED), V, generator=g) * 3
    keys = keys_for(len(MIXED))
    full, full_lp = sample(rows, MIXED, keys)
    for i, p in enumerate(MIXED):
        alone, alone_lp = sample(rows[i : i + 1], [p], [keys[i]])
        assert alone == [full[i]] and alone_lp == pytest.approx([full_lp[i]], abs=1e-6)
    perm = list(reversed(range(len(MIXED))))
    others = torch.randn(3, V, generator=g)
    batch = torch.cat([rows[perm], others])
    params = [MIXED[i] for i in perm] + [SamplingParams(temperature=1.0, top_k=40)] * 3
    got, _ = sample(batch, params, [keys[i] for i in perm] + keys_for(3, seed=100))
    assert got[: len(MIXED)] == [full[i] for i in perm]


def test_same_key_same_token_and_keys_differ() -> None:
    logits = torch.zeros(1, 64)  # uniform: every key picks its own token
    p = [SamplingParams(temperature=1.0)]
    a = [sample(logits, p, [noise_key(3, pos)])[0][0] for pos in range(40)]
    b = [sample(logits, p, [noise_key(3, pos)])[0][0] for pos in range(40)]
    c = [sample(logits, p, [noise_key(4, pos)])[0][0] for pos in range(40)]
    assert a == b
    assert a != c
    assert len(set(a)) > 20  # positions of one seed do not repeat one token


@pytest.mark.parametrize("seed", range(4))
def test_truncation_matches_the_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    B, V = 64, 12
    logits = torch.randn(B, V, generator=g) * 2
    top_k = torch.randint(0, V + 2, (B,), generator=g)
    top_p = torch.rand(B, generator=g) * 0.9 + 0.1
    top_p[::3] = 1.0
    vals, idx = logits.sort(dim=-1, descending=True)
    got = torch.full_like(logits, float("-inf"))
    got.scatter_(1, idx, truncate_sorted(vals, top_k, top_p))
    for i in range(B):
        want = reference_filter(logits[i], int(top_k[i]), float(top_p[i]))
        assert torch.equal(torch.isfinite(got[i]), torch.isfinite(want)), i


def test_draws_stay_inside_the_kept_set() -> None:
    g = torch.Generator().manual_seed(5)
    V, N = 16, 400
    row = torch.randn(V, generator=g)
    for p in MIXED[1:]:
        kept = torch.isfinite(reference_filter(row / p.temperature, p.top_k, p.top_p))
        tokens, _ = sample(row.expand(N, V), [p] * N, keys_for(N))
        assert all(bool(kept[t]) for t in tokens), p


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.0, top_k=4),
        SamplingParams(temperature=1.2, top_k=5, top_p=0.7),
    ],
)
def test_frequencies_follow_the_distribution(params: SamplingParams) -> None:
    """Chi-square of 20,000 draws (one seed, consecutive positions) against the softmax of
    the filtered logits: 7 cells, a bound the right distribution exceeds with p ~ 1e-6."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0])
    V, N = logits.numel(), 20_000
    probs = reference_filter(logits / params.temperature, params.top_k, params.top_p).softmax(-1)
    keys: list[int | None] = [noise_key(11, pos) for pos in range(N)]
    tokens, _ = sample(logits.expand(N, V), [params] * N, keys)
    counts = torch.bincount(torch.tensor(tokens), minlength=V).double()
    expected = probs.double() * N
    kept = expected > 0
    assert counts[~kept].sum() == 0
    chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    assert chi2 < 40.0, (chi2, counts.tolist(), expected.tolist())


def test_gumbel_noise_is_standard_gumbel() -> None:
    """Mean (Euler-Mascheroni) and variance (pi^2 / 6) of 256 x 4096 hashed draws."""
    keys = torch.tensor([noise_key(s, 0) for s in range(256)])
    ids = torch.arange(4096).expand(256, 4096)
    g = gumbel_noise(keys & 0xFFFFFFFF, keys >> 32, ids).double()
    assert abs(float(g.mean()) - 0.5772) < 0.01
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.02
    assert torch.isfinite(g).all()


def test_rank_keys_order_by_value_then_lower_id() -> None:
    """The rank keys against a stable sort on (-value, id): ties (bf16-rounded and repeated
    values), negatives, -inf, -0.0 next to 0.0 (equal values); every key distinct."""
    g = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, 200, generator=g) * 3).bfloat16().float()
    logits[1] = logits[1].round()  # long runs of ties
    logits[2, ::7] = float("-inf")
    keys = rank_keys(logits)
    for row, key in zip(logits, keys, strict=True):
        want = sorted(range(row.numel()), key=lambda i: (-float(row[i]), i))
        assert key.argsort(descending=True).tolist() == want
        assert key.unique().numel() == row.numel()
    with pytest.raises(TypeError, match="fp32"):
        rank_keys(logits.double())


def test_a_temperature_that_overflows_the_logits_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least"):
        SamplingParams(temperature=1e-40)
    assert SamplingParams(temperature=1e-6).temperature == 1e-6


@pytest.mark.parametrize("with_top_k_row", [False, True])
def test_an_exact_score_tie_goes_to_the_higher_ranked_token(
    monkeypatch: pytest.MonkeyPatch, with_top_k_row: bool
) -> None:
    """Noise that makes every score equal: the draw is the highest logit, lowest id among
    equals, whether the batch ranks (a top-k row in it) or not, as in the Triton pick."""
    import dendrite.sampling as sampling_mod

    logits = torch.tensor([[0.5, 2.0, 1.0, 2.0], [0.0, 1.0, 2.0, 3.0]])

    def flat(key_lo: torch.Tensor, key_hi: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return 5.0 - logits[: idx.shape[0]].gather(1, idx)  # x + noise = 5 everywhere (T = 1)

    monkeypatch.setattr(sampling_mod, "gumbel_noise", flat)
    params = [SamplingParams(temperature=1.0)]
    if with_top_k_row:
        params.append(SamplingParams(temperature=1.0, top_k=2))
    tokens, _ = sample(logits[: len(params)], params, keys_for(len(params)))
    assert tokens[0] == 1


def _unmix32(h: int) -> int:
    """The inverse of ``_mix32`` (each xorshift and odd multiply is a bijection of 32 bits)."""
    m = 0xFFFFFFFF
    h ^= h >> 16
    h = (h * pow(0x2C1B3C6D, -1, 1 << 32)) & m
    h ^= (h >> 15) ^ (h >> 30)
    h = (h * pow(0x7FEB352D, -1, 1 << 32)) & m
    return h ^ (h >> 16)


def test_the_top_hash_gives_a_uniform_below_one() -> None:
    """The extremes of the 32-bit hash map inside (0, 1), so the noise is finite."""
    u = uniform(torch.tensor([0, 1, 0xFFFFFE00, 0xFFFFFFFF]))
    assert bool((u > 0).all()) and bool((u < 1).all())
    assert torch.isfinite(-torch.log(-torch.log(u))).all()


def test_a_token_whose_hash_tops_the_range_stays_outside_the_top_k() -> None:
    """A key chosen so that token 2's hash is 0xFFFFFFFF, the one value that made the noise
    infinite (24 bits rounded up to u = 1): with top-k 1 the top token is still drawn, and
    the noise of token 2 is finite."""
    tok = 2
    top = _unmix32(0xFFFFFFFF)
    lo = next(lo for lo in range(100) if top ^ int(_mix32(torch.tensor(tok ^ lo))) < 1 << 31)
    hi = top ^ int(_mix32(torch.tensor(tok ^ lo)))  # below 2**31: a 63-bit noise key
    key = (hi << 32) | lo
    h = _mix32(_mix32(torch.tensor([tok]) ^ lo) ^ hi)
    assert int(h[0]) == 0xFFFFFFFF
    assert torch.isfinite(
        gumbel_noise(torch.tensor([lo]), torch.tensor([hi]), torch.tensor([[tok]]))
    )
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 3.0]])
    for p in (
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=0.01),
    ):
        tokens, _ = sample(logits, [p], [key])
        assert tokens == [3], p
    allowed = torch.tensor([[True, True, False, True, True]])  # a grammar masks token 2 out
    tokens, _ = sample(logits, [SamplingParams(temperature=1.0)], [key], allowed)
    assert tokens != [2]


# ---------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_checkpoint(tmp_path_factory.mktemp("sampling") / "llama", "llama", seed=3)


SAMPLED = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, ignore_eos=True)


def test_engine_branch_tokens_do_not_depend_on_the_batch(tiny: Path) -> None:
    model = load_model(tiny)
    alone = Engine(model, None, EngineConfig(page_size=4))
    a = alone.add([1, 5, 9, 13], SAMPLED, seed=42)
    alone.run([a])
    crowd = Engine(model, None, EngineConfig(page_size=4))
    others = [crowd.add([1, 7, 2], SAMPLED, seed=s) for s in (1, 2)]
    b = crowd.add([1, 5, 9, 13], SAMPLED, seed=42)
    greedy = crowd.add([1, 3], SamplingParams(max_new_tokens=4, ignore_eos=True))
    crowd.run([others[0], b, greedy, others[1]])
    assert alone.output_ids(a) == crowd.output_ids(b)
    assert alone.output_logprobs(a) == pytest.approx(crowd.output_logprobs(b), abs=1e-5)
    assert crowd.output_ids(others[0]) != crowd.output_ids(others[1])


def test_engine_forks_are_reproducible(tiny: Path) -> None:
    model = load_model(tiny)

    def tree() -> list[list[int]]:
        e = Engine(model, None, EngineConfig(page_size=4))
        root = e.add([1, 5, 9, 13, 17], SAMPLED, seed=7)
        e.prefill([root])
        kids = [root] + [e.fork(root) for _ in range(5)]
        e.run(kids)
        out = [e.output_ids(k) for k in kids]
        e.check_integrity()
        return out

    first, second = tree(), tree()
    assert first == second
    assert len({tuple(x) for x in first}) == len(first)  # every fork draws its own tokens


def test_greedy_forks_never_derive_a_seed_and_float_seeds_are_refused(tiny: Path) -> None:
    """A batch's noise keys are derived for its sampled rows only: a greedy fork's seed stays
    underived (it is derived from its parent's on first use), and its sampled sibling draws
    as it would alone. A seed that is not an int is refused, as ``noise_key`` refuses it."""
    model = load_model(tiny)
    e = Engine(model, None, EngineConfig(page_size=4))
    root = e.add([1, 5, 9, 13], SamplingParams(max_new_tokens=4, ignore_eos=True), seed=7)
    e.prefill([root])
    greedy = e.fork(root)
    sampled = e.fork(root, SAMPLED, seed=11)
    e.run([root, greedy, sampled])
    assert greedy._seed is None and greedy._seed_src is not None
    alone = Engine(model, None, EngineConfig(page_size=4))
    solo = alone.add([1, 5, 9, 13], SamplingParams(max_new_tokens=4, ignore_eos=True), seed=7)
    alone.prefill([solo])
    twin = alone.fork(solo, SAMPLED, seed=11)
    alone.run([twin])
    assert e.output_ids(sampled) == alone.output_ids(twin)
    assert e.output_ids(greedy) == e.output_ids(root)
    with pytest.raises(TypeError):
        noise_keys([2.7], [5])
    e.check_integrity()
