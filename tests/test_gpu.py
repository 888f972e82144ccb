"""GPU tests: the FlashInfer backend against the torch reference and against HF transformers.

Run on a CUDA machine with flashinfer installed (``pytest -m gpu``); skipped elsewhere.
Everything is bf16 with head_dim 64 (FlashInfer serves 64, 128 and 256), so the tolerances
are bf16's: relative max error ``max|a - b| / max|b|`` below 2e-2, while the K/V the two
backends write must be bit-identical (a write is a copy); the float32 mode's tests hold fp32
results to 1e-5.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from dendrite.attention.base import BatchLayout, build_layout
from dendrite.attention.torch_ref import TorchBackend
from dendrite.engine import Branch, Engine
from dendrite.errors import ConfigError
from dendrite.kv.pool import PagePool, PoolConfig
from dendrite.kv.tree import KVBranch, KVTree
from dendrite.model.config import ModelConfig, RopeConfig
from dendrite.model.random_init import make_random_checkpoint
from dendrite.sampling import SamplingParams

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
FlashInferBackend = pytest.importorskip("dendrite.attention.flashinfer").FlashInferBackend

BF16_TOL = 2e-2
HQ, HKV, D = 8, 2, 64  # the backend-level tests' heads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def attention_over(q: torch.Tensor, kv: torch.Tensor, pages: Any, n: int) -> torch.Tensor:
    """fp32 attention of one query row ``q`` [Hq, D] over the first ``n`` keys of ``pages``
    (page ids in order) of a layer's pages ``kv`` [N, 2, P, Hkv, D]: [Hq, D]."""
    hkv, d = kv.shape[3], kv.shape[4]
    keys = kv[pages].transpose(0, 1).reshape(2, -1, hkv, d)[:, :n].float()
    keys = keys.repeat_interleave(q.shape[0] // hkv, dim=2)
    s = torch.einsum("hd,nhd->hn", q.float(), keys[0]) / d**0.5
    return torch.einsum("hn,nhd->hd", s.softmax(-1), keys[1])


def prompt_ids(seed: int, n: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1, *torch.randint(3, vocab, (n - 1,), generator=g).tolist()]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama with head_dim 64 (256 / 4 heads) and GQA (2 KV heads)."""
    return make_random_checkpoint(
        tmp_path_factory.mktemp("gpu") / "llama-d64", "llama", seed=0, hidden_size=256,
        intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip


def hf_model(path: Path) -> transformers.PreTrainedModel:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    return model.to("cuda").eval()


# ---------------------------------------------------------------- backend against backend


def model_config(num_layers: int) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=256, hidden_size=HQ * D, intermediate_size=64,
        num_layers=num_layers, num_heads=HQ, num_kv_heads=HKV, head_dim=D,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope=RopeConfig(),
    )  # fmt: skip


def plan_step(tree: KVTree, items: list[tuple[KVBranch, int]]) -> BatchLayout:
    """Append ``n`` tokens to each branch and lay the step out as the engine does."""
    slots = tree.append_batch([(b, [5] * n) for b, n in items])
    return build_layout(
        [n for _, n in items],
        [len(b) for b, _ in items],
        [tree.page_list(b) for b, _ in items],
        slots,
        tree.page_size,
        torch.device("cuda"),
    )


@pytest.mark.parametrize("prefill", ["fa2", "fa3"])
@pytest.mark.parametrize("cascade", ["", "triton", "flashinfer"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_backend_matches_torch_on_the_same_pages(
    page_size: int, cascade: str, prefill: str
) -> None:
    """Ragged prefill, decode, forks with copy-on-write: same outputs, bit-identical writes.
    With ``cascade`` every decode step over shared pages runs as a two-level cascade, its
    level 0 on the Triton kernel or on FlashInfer's prefill. Ragged steps on FlashInfer's FA2
    or FA3 (Hopper) kernels."""
    if prefill == "fa3" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("FA3 runs on Hopper")
    layers = 2
    pool_cfg = PoolConfig(
        num_layers=layers, num_pages=4096 // page_size, num_kv_heads=HKV, head_dim=D,
        page_size=page_size, dtype=torch.bfloat16, device="cuda",
    )  # fmt: skip
    pool, ref_pool = PagePool(pool_cfg), PagePool(pool_cfg)
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in pool.kv:  # untouched slots hold noise: reading one would show
        t.copy_(torch.randn(t.shape, generator=g, device="cuda"))
    tree = KVTree(pool)  # allocation and copy-on-write happen in `pool`
    fi = FlashInferBackend(
        pool, model_config(layers), cascade=bool(cascade), min_saved_pages=1, min_group_pages=1,
        prefix_kernel=cascade or "triton", prefill_backend=prefill,
    )  # fmt: skip
    assert fi.prefill_kernel == prefill
    ref = TorchBackend(ref_pool)

    def check(items: list[tuple[KVBranch, int]]) -> None:
        layout = plan_step(tree, items)
        fi.plan(layout)
        ref.plan(layout)
        for src, dst in zip(pool.kv, ref_pool.kv, strict=True):
            dst.copy_(src)  # the reference starts from the same pages (copies included)
        T = layout.num_tokens
        for layer in range(layers):
            qkv = torch.randn(T, HQ + 2 * HKV, D, generator=g, device="cuda").bfloat16()
            q, k, v = qkv[:, :HQ], qkv[:, HQ : HQ + HKV], qkv[:, HQ + HKV :]  # strided views
            out, want = fi.run(layer, q, k, v), ref.run(layer, q, k, v)
            assert out.shape == want.shape == (T, HQ, D)
            assert rel_err(out, want) < BF16_TOL, (items, layer)
            assert torch.equal(pool.kv[layer], ref_pool.kv[layer]), "K/V written elsewhere"
        tree.check_integrity()

    fresh = tree.new_branch()
    check([(fresh, 300)])  # one new sequence: attends over its own K/V (single prefill)
    assert fi.fresh_steps == 1
    check([(fresh, 20)])  # more of it: over its pages
    assert fi.fresh_steps == 1
    tree.free(fresh)
    a, b = tree.new_branch(), tree.new_branch()
    check([(a, 37), (b, 5)])  # ragged prefill
    for _ in range(3):
        check([(a, 1), (b, 1)])  # decode; a ends at 40, mid-page for page_size 16
    c, d = tree.fork(a), tree.fork(a)
    check([(a, 1), (c, 1), (d, 20), (b, 1)])  # copy-on-write, a chunk among decodes
    e = tree.fork(d)
    for _ in range(4):
        check([(a, 1), (c, 1), (d, 1), (e, 1), (b, 1)])  # decode over shared pages
    check([(e, 3), (a, 1)])  # a short teacher-forced chunk
    # the decode steps over a, c, d, e (forks of one prefix) ran as cascades, or none did
    assert fi.cascade_steps == (4 if cascade else 0)


@pytest.mark.parametrize("long_blocks", [False, True], ids=["short-splits", "long-splits"])
@pytest.mark.parametrize(("hq", "hkv", "d"), [(32, 4, 64), (14, 2, 64), (16, 4, 128)])
def test_triton_cascade_matches_whole_attention(
    hq: int, hkv: int, d: int, long_blocks: bool
) -> None:
    """``shared_prefix.CascadeKernels`` compiled: 24 rows in two groups over 40 and 9 shared
    pages plus 1-3 own pages each (the last partial), one row without level 0, against one
    fp32 attention over shared + own keys; TinyLlama's heads, Qwen2-0.5B's 14 / 2, and
    head_dim 128 (its narrower key blocks); level 0's key blocks for short and long splits."""
    from dendrite.attention.shared_prefix import CascadeKernels

    g = torch.Generator(device="cuda").manual_seed(1)
    P, B, N = 16, 24, 200
    kv = torch.randn(N, 2, P, hkv, d, generator=g, device="cuda").bfloat16()
    q = torch.randn(B, hq + 2 * hkv, d, generator=g, device="cuda").bfloat16()[:, :hq]
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(2)).tolist()
    groups, starts = [perm[:40], perm[40:49]], [0, 15, B]
    own_pages = [1 + r % 3 for r in range(B)]
    own, at = [], 49
    for n in own_pages:
        own.append(perm[at : at + n])
        at += n
    lens = [(n - 1) * P + 1 + (5 * r) % P for r, n in enumerate(own_pages)]
    mask = [0 if r == 7 else 1 for r in range(B)]
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    kern = CascadeKernels(hq, hkv, sm, d)

    def dev(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.int32, device="cuda")

    n0 = kern.num_tiles0(B, 2)
    ranges = [(starts[0], starts[1], 0), (starts[1], starts[2], 0)]  # row 7 rides, masked
    level0 = (dev(kern.tiles0(ranges, n0)), dev([0, 40, 49]), dev(groups[0] + groups[1]),
              dev([P, P]), kern.splits0(B, 2), 1,
              kern.block_n0_long if long_blocks else kern.block_n0)  # fmt: skip
    indptr1 = [0]
    for n in own_pages:
        indptr1.append(indptr1[-1] + n)
    last1 = [n - (k - 1) * P for n, k in zip(lens, own_pages, strict=True)]
    level1 = (dev(kern.tiles1(B)), dev(indptr1), dev([p for o in own for p in o]), dev(last1),
              kern.splits1(B))  # fmt: skip
    got = kern.run(q, kv, level1, level0, dev(mask))
    for r in range(B):
        pages = (groups[0] if r < 15 else groups[1]) if mask[r] else []
        want = attention_over(q[r], kv, pages + own[r], len(pages) * P + lens[r])
        assert rel_err(got[r], want) < BF16_TOL, r


def test_unsupported_settings_raise_config_error() -> None:
    cfg = PoolConfig(num_layers=1, num_pages=4, num_kv_heads=HKV, head_dim=D, device="cuda")
    assert FlashInferBackend(PagePool(cfg), model_config(1)).float32  # fp32: the Triton mode
    with pytest.raises(ConfigError, match="max_depth"):
        FlashInferBackend(PagePool(cfg), model_config(1), max_depth=0)
    with pytest.raises(ConfigError, match="sliding window"):
        FlashInferBackend(PagePool(cfg), replace(model_config(1), sliding_window=64))
    wide = PoolConfig(num_layers=1, num_pages=4, num_kv_heads=HKV, head_dim=256, device="cuda")
    with pytest.raises(ConfigError, match="head_dim 256"):
        FlashInferBackend(PagePool(wide), replace(model_config(1), head_dim=256))
    cfg = PoolConfig(
        num_layers=1, num_pages=4, num_kv_heads=HKV, head_dim=16, dtype=torch.bfloat16,
        device="cuda",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="head_dim 16"):
        FlashInferBackend(PagePool(cfg), replace(model_config(1), head_dim=16))


def test_cascade_kernels_and_thresholds_follow_the_model() -> None:
    """The Triton cascade and its measured thresholds by default; FlashInfer's kernels with
    their own thresholds when asked, and for heads wider than 128 (not Triton's)."""
    from dendrite.attention import cascade

    def backend(head_dim: int, **kw: object) -> object:
        cfg = PoolConfig(
            num_layers=1, num_pages=4, num_kv_heads=HKV, head_dim=head_dim,
            dtype=torch.bfloat16, device="cuda",
        )  # fmt: skip
        return FlashInferBackend(PagePool(cfg), replace(model_config(1), head_dim=head_dim), **kw)

    fi: Any = backend(64)
    assert fi.prefix_kernel == "triton"
    assert (fi.min_group_pages, fi.min_saved_pages) == (64, 192)
    assert (cascade.CASCADE_MIN_GROUP_PAGES, cascade.CASCADE_MIN_SAVED_PAGES) == (64, 192)
    fi = backend(64, prefix_kernel="flashinfer")
    assert (fi.min_group_pages, fi.min_saved_pages) == (192, 7_680)
    fi = backend(256)
    assert fi.prefix_kernel == "flashinfer" and fi.min_saved_pages == 7_680
    fi = backend(64, min_saved_pages=5)
    assert (fi.min_group_pages, fi.min_saved_pages) == (64, 5)
    with pytest.raises(ConfigError, match="prefix_kernel"):
        backend(64, prefix_kernel="cuda")


# ---------------------------------------------------------------- through the engine


def test_engine_picks_flashinfer_on_cuda(small_llama: Path) -> None:
    engine = Engine.from_pretrained(small_llama, device="cuda")
    assert isinstance(engine.backend, FlashInferBackend)
    assert engine.dtype == torch.bfloat16
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert engine.backend.prefill_kernel == ("fa3" if hopper else "fa2")  # prefill_kernel auto
    torch_engine = Engine.from_pretrained(small_llama, device="cuda", backend="torch")
    assert isinstance(torch_engine.backend, TorchBackend)


def tree_scenario(engine: Engine) -> list[torch.Tensor]:
    """Teacher-forced steps over a tree (both engines see the same tokens); logits per step."""
    g = torch.Generator().manual_seed(0)

    def toks(n: int) -> list[int]:
        return torch.randint(3, 256, (n,), generator=g).tolist()

    out = []
    a, b = engine.add(prompt_ids(0, 37)), engine.add(prompt_ids(1, 5))
    out.append(engine.forward([a, b]))  # ragged prefill
    for _ in range(3):
        for br in (a, b):
            engine.extend(br, toks(1))
        out.append(engine.forward([a, b]))  # decode
    c, d = engine.fork(a), engine.fork(a)  # a holds 40 tokens: mid-page, copy-on-write
    for br, n in ((a, 1), (c, 1), (d, 20), (b, 1)):
        engine.extend(br, toks(n))
    out.append(engine.forward([a, c, d, b]))  # a prompt chunk among decodes
    e = engine.fork(d)
    for _ in range(4):
        for br in (a, b, c, d, e):
            engine.extend(br, toks(1))
        out.append(engine.forward([a, b, c, d, e]))  # decode over shared pages
    engine.free(c)
    for br in (a, d, e):
        engine.extend(br, toks(2))
    out.append(engine.forward([a, d, e]))
    engine.check_integrity()
    return out


def test_engine_flashinfer_matches_torch_backend(small_llama: Path) -> None:
    fi = Engine.from_pretrained(small_llama, device="cuda", backend="flashinfer")
    ref = Engine.from_pretrained(small_llama, device="cuda", backend="torch")
    got, want = tree_scenario(fi), tree_scenario(ref)
    assert len(got) == len(want) == 10
    for step, (x, y) in enumerate(zip(got, want, strict=True)):
        assert x.shape == y.shape
        assert rel_err(x, y) < BF16_TOL, step


# ---------------------------------------------------------------- against HF transformers


def test_logits_match_hf_prefill_and_decode(small_llama: Path) -> None:
    """Two sequences in one batch: a ragged prefill, then teacher-forced decode steps."""
    engine = Engine.from_pretrained(small_llama, device="cuda")
    hf = hf_model(small_llama)
    seqs = [prompt_ids(3, 70), prompt_ids(4, 50)]
    starts = [40, 17]  # prompt lengths; the rest is fed one token per step
    refs = []
    with torch.no_grad():
        for ids in seqs:
            refs.append(hf(torch.tensor([ids], device="cuda")).logits[0].float())  # [L, V]
    branches = [engine.add(ids[:s]) for ids, s in zip(seqs, starts, strict=True)]
    rows: list[list[torch.Tensor]] = [[], []]
    for t in range(max(len(s) - st for s, st in zip(seqs, starts, strict=True)) + 1):
        todo = [i for i, b in enumerate(branches) if starts[i] + t <= len(seqs[i])]
        if t:
            for i in todo:
                engine.extend(branches[i], [seqs[i][starts[i] + t - 1]])
        logits = engine.forward([branches[i] for i in todo])
        for row, i in enumerate(todo):
            rows[i].append(logits[row])
    for i, (ids, s) in enumerate(zip(seqs, starts, strict=True)):
        ours = torch.stack(rows[i])  # next-token logits at positions s-1 .. L-1
        assert ours.shape[0] == len(ids) - s + 1
        assert rel_err(ours[0], refs[i][s - 1]) < BF16_TOL  # after the prefill
        assert rel_err(ours, refs[i][s - 1 :]) < BF16_TOL  # every decode step


def test_greedy_32_matches_hf(small_llama: Path) -> None:
    engine = Engine.from_pretrained(small_llama, device="cuda")
    hf = hf_model(small_llama)
    prompts = [prompt_ids(10, 23), prompt_ids(11, 7), prompt_ids(12, 100)]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=32, ignore_eos=True))
    for ids, gen in zip(prompts, ours, strict=True):
        x = torch.tensor([ids], device="cuda")
        with torch.no_grad():
            ref = hf.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=32, do_sample=False,
                pad_token_id=0,
            )[0, len(ids) :].tolist()  # fmt: skip
        if gen.output_ids != ref:
            # Two bf16 implementations may only part at a near-tie of the top two logits.
            j = next(i for i, (p, q) in enumerate(zip(gen.output_ids, ref, strict=True)) if p != q)
            with torch.no_grad():
                logits = hf(torch.tensor([ids + ref[:j]], device="cuda")).logits[0, -1].float()
            gap = float(logits[ref[j]] - logits[gen.output_ids[j]])
            assert gap < BF16_TOL * float(logits.abs().max()), (j, gap, gen.output_ids, ref)
    engine.check_integrity()


# ---------------------------------------------------------------- fused kernels, CUDA graphs


def test_fused_kernels_match_the_torch_ops(small_llama: Path) -> None:
    fused = Engine.from_pretrained(small_llama, device="cuda", cuda_graphs=False)
    plain = Engine.from_pretrained(
        small_llama, device="cuda", cuda_graphs=False, fused_kernels=False
    )
    assert fused.model.fused_kernels and not plain.model.fused_kernels
    got, want = tree_scenario(fused), tree_scenario(plain)
    for step, (x, y) in enumerate(zip(got, want, strict=True)):
        assert rel_err(x, y) < BF16_TOL, step


def test_gemv_path_matches_cublas_on_one_row_steps(small_llama: Path) -> None:
    """Batch-1 decode through the Triton GEMVs (norms, SiLU and RoPE fused in, PDL on
    Hopper), as CUDA graphs and eagerly, against the cuBLAS + FlashInfer path on the same
    weights; the steps cross 512 tokens of context, where the graph of batch 1 changes from
    one planned without split-KV to one with it."""
    engines = {
        "graph": Engine.from_pretrained(small_llama, device="cuda"),
        "eager": Engine.from_pretrained(small_llama, device="cuda", cuda_graphs=False),
        "cublas": Engine.from_pretrained(small_llama, device="cuda"),
    }
    assert engines["graph"].model.gemv_kernels and engines["eager"].model.gemv_kernels
    assert engines["graph"].model._pdl == (torch.cuda.get_device_capability()[0] >= 9)
    assert not engines["cublas"].use_gemv_kernels(False)
    outs: dict[str, list[torch.Tensor]] = {}
    slots: dict[str, list[torch.Tensor]] = {}  # each step's new K/V, all layers, read back
    for name, engine in engines.items():
        b = engine.add(prompt_ids(40, 505))
        engine.forward([b])  # the prompt: 505 rows, not the GEMV path
        outs[name], slots[name] = [], []
        for tok in prompt_ids(41, 14)[1:]:  # teacher-forced one-row steps, to 518 tokens
            engine.extend(b, [tok])
            outs[name].append(engine.forward([b])[-1])
            n, page = len(b.kv), engine.tree.page_list(b.kv)[-1]
            P = engine.pool.page_size
            slots[name].append(torch.stack([kv[page, :, (n - 1) % P] for kv in engine.pool.kv]))
        engine.check_integrity()
    # the K/V the QKV kernel wrote are where FlashInfer's append puts them (at 518 tokens a
    # wrong slot would hardly move the logits: check the slots themselves)
    for name in ("graph", "eager"):
        for step, (x, y) in enumerate(zip(slots[name], slots["cublas"], strict=True)):
            assert rel_err(x, y) < BF16_TOL, (name, step)
    assert engines["graph"]._graphs is not None and engines["eager"]._graphs is None
    assert set(engines["graph"]._graphs._graphs) == {(1, True), (1, False)}
    for step, (g, e, c) in enumerate(zip(*outs.values(), strict=True)):
        assert rel_err(g, c) < BF16_TOL, step
        assert rel_err(e, c) < BF16_TOL, step


def test_skinny_kernels_match_cublas_and_flashinfer() -> None:
    """``model/skinny.py`` compiled: TinyLlama-shape projections at 2-64 rows (split-K and
    not, PDL on Hopper, SiLU fused) against cuBLAS, its add + RMSNorm against FlashInfer's
    fused one, and the split-K counters back at 0."""
    import flashinfer

    from dendrite.model import gemv, skinny

    torch.manual_seed(0)
    pdl = gemv.pdl_supported(torch.device("cuda"))
    for n, k in ((2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632), (32000, 2048)):
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in (2, 8, 17, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            assert rel_err(skinny.matmul(x, w, pdl=pdl), torch.nn.functional.linear(x, w)) < 1e-2
            gu = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)
            act = flashinfer.activation.silu_and_mul(gu)
            got = skinny.matmul(gu, w, prologue="silu", pdl=pdl)
            assert rel_err(got, torch.nn.functional.linear(act, w)) < 1e-2, (n, k, m)
    h, g = 2048, torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
    for m in (2, 64):
        y = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
        r_fi, y_fi = r.clone(), y.clone()
        flashinfer.norm.fused_add_rmsnorm(y_fi, r_fi, g, 1e-5)  # y <- norm(r += y)
        out = skinny.add_norm(y, r, g, eps=1e-5, pdl=pdl)
        assert rel_err(r, r_fi) < 1e-2 and rel_err(out, y_fi) < BF16_TOL
    assert not skinny.counters(torch.device("cuda"), 1).any()  # every block reset its own


def test_fp32_fused_norm_gemms_match_fp64() -> None:
    """``skinny.matmul_add`` / ``matmul_norm`` compiled at 3xTF32 (a float32 model's decode
    steps): TinyLlama's output and down projections adding into an 8-row residual stream
    (their sums of squares by feature block), and the QKV, gate/up and LM head projections
    normalising it as they load, against fp64 torch; counters back at 0."""
    from dendrite.model import skinny

    torch.manual_seed(0)
    m, h, eps = 8, 2048, 1e-5
    g = torch.rand(h, device="cuda") + 0.5
    for k in (2048, 5632):  # o, down (SiLU in)
        w = torch.randn(h, k, device="cuda") * 0.02
        x = torch.randn(m, 2 * k if k == 5632 else k, device="cuda")
        act = x if k == 2048 else torch.nn.functional.silu(x[:, :k]) * x[:, k:]
        r = torch.randn(m, h, device="cuda")
        want = r.double() + act.double() @ w.double().T
        ss = skinny.matmul_add(x, w, r, prologue="silu" if k == 5632 else "none")
        assert rel_err(r, want) < 1e-5, k
        assert rel_err(ss.sum(0), (want**2).sum(-1)) < 1e-5, k
    r = torch.randn(m, h, device="cuda") * 3
    ss = torch.stack([(r[:, i : i + 64].double() ** 2).sum(-1) for i in range(0, h, 64)]).float()
    normed = r.double() * torch.rsqrt((r.double() ** 2).mean(-1, keepdim=True) + eps) * g.double()
    for n in (2560, 11264, 32000):  # qkv, gate/up, LM head
        w = torch.randn(n, h, device="cuda") * 0.02
        got = skinny.matmul_norm(r, skinny.NormIn(ss, g, eps), w)
        assert rel_err(got, normed @ w.double().T) < 1e-5, n
    assert not skinny.counters(torch.device("cuda"), 1).any()


def test_rope_inplace_matches_torch_rope_in_fp32() -> None:
    """``rope_kv.rope_inplace`` compiled (a float32 model's prompts): a 300-token fp32
    projection of TinyLlama's heads at positions 1,000-1,299, q and k rotated in place as
    torch's RoPE rotates them (to fp32 rounding), v untouched."""
    from dendrite.model.rope_kv import rope_inplace
    from dendrite.model.transformer import rotate_half

    torch.manual_seed(0)
    hq, hkv, d, T = 32, 4, 64, 300
    qkv = torch.randn(T, hq + 2 * hkv, d, device="cuda")
    before = qkv.clone()
    pos = torch.arange(1000, 1000 + T, device="cuda")
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device="cuda").float() / d)
    table = torch.arange(4096, device="cuda").float()[:, None] * inv[None, :]
    cos_sin = torch.cat((table.cos(), table.sin()), dim=-1).contiguous()
    emb = torch.cat((table[pos], table[pos]), dim=-1)[:, None, :]
    qk = before[:, : hq + hkv]
    want = qk * emb.cos() + rotate_half(qk) * emb.sin()
    q, k, v = rope_inplace(qkv, pos, cos_sin, hq, hkv)
    assert q.data_ptr() == qkv.data_ptr() and tuple(k.shape) == (T, hkv, d)
    assert rel_err(qkv[:, : hq + hkv], want) < 1e-6
    assert torch.equal(v, before[:, hq + hkv :])


def test_rope_append_matches_flashinfer_rope_and_append() -> None:
    """``model/rope_kv.py`` compiled (PDL on Hopper): a 37-row decode step of TinyLlama's
    heads at scattered positions, against FlashInfer's RoPE in place and its KV append into
    the same pages: q and the written K/V within one bf16 rounding, V bit for bit, every
    other slot untouched."""
    import flashinfer

    from dendrite.model import gemv
    from dendrite.model.rope_kv import rope_append

    torch.manual_seed(1)
    hq, hkv, d, P, T = 32, 4, 64, 16, 37
    qkv = torch.randn(T, hq + 2 * hkv, d, device="cuda", dtype=torch.bfloat16)
    positions = torch.randint(0, 2048, (T,), device="cuda", dtype=torch.int32)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, device="cuda").float() / d)
    freqs = torch.arange(2048, device="cuda").float()[:, None] * inv[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()
    pages = torch.randn(64, 2, P, hkv, d, device="cuda", dtype=torch.bfloat16)
    page_ids = torch.randperm(64, device="cuda")[:T].to(torch.int32)  # one page a row
    slot = (positions % P).to(torch.int32)
    want_qkv, want_pages = qkv.clone(), pages.clone()
    q, k, v = want_qkv[:, :hq], want_qkv[:, hq : hq + hkv], want_qkv[:, hq + hkv :]
    flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, d, cos_sin)
    indptr = torch.arange(T + 1, device="cuda", dtype=torch.int32)
    flashinfer.append_paged_kv_cache(
        k, v, torch.arange(T, device="cuda", dtype=torch.int32), slot, want_pages, page_ids,
        indptr, slot + 1, "NHD",
    )  # fmt: skip
    before = pages.clone()
    got_q = rope_append(
        qkv, positions, cos_sin, pages, page_ids, slot, hq, hkv,
        pdl=gemv.pdl_supported(torch.device("cuda")),
    )  # fmt: skip
    assert got_q.data_ptr() == qkv.data_ptr()
    ulp = 2.0**-7  # one bf16 rounding, relative
    assert ((got_q.float() - q.float()).abs() <= ulp * q.float().abs() + 1e-6).all()
    rows = page_ids.long()
    k_got, k_want = pages[rows, 0, slot.long()], want_pages[rows, 0, slot.long()]
    assert ((k_got.float() - k_want.float()).abs() <= ulp * k_want.float().abs() + 1e-6).all()
    assert torch.equal(pages[rows, 1, slot.long()], want_pages[rows, 1, slot.long()])
    touched = torch.zeros(64, 2, P, dtype=torch.bool, device="cuda")
    touched[rows, :, slot.long()] = True
    assert torch.equal(pages[~touched], before[~touched])


@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_split_decode_matches_flashinfer_decode(pdl: bool) -> None:
    """``attention/split_decode.py`` compiled: rows of 1 to 2,000 keys of TinyLlama's heads
    (one split; up to 8 merged; 33 pages in 8 splits of 5, the last empty) against an fp32
    attention within bf16 tolerance, no further from it than FlashInfer's decode; the counts
    back at zero; a second launch bit for bit the same."""
    import flashinfer

    from dendrite.attention.split_decode import SplitDecode

    torch.manual_seed(2)
    hq, hkv, d, P, N = 32, 4, 64, 16, 600
    kv = torch.randn(N, 2, P, hkv, d, device="cuda", dtype=torch.bfloat16)
    lens = [1, 16, 17, 100, 192, 512, 519, 2000]
    counts = [-(-n // P) for n in lens]
    pages = torch.randperm(N, device="cuda")[: sum(counts)].to(torch.int32)
    indptr = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32)
    last = torch.tensor([n - (c - 1) * P for n, c in zip(lens, counts, strict=True)])
    last = last.to(torch.int32)
    q = torch.randn(len(lens), hq, d, device="cuda", dtype=torch.bfloat16)
    sd = SplitDecode(hq, hkv, d, len(lens), "cuda", max_splits=8, pdl=pdl)
    args = (kv, indptr.cuda(), pages, last.cuda())
    got = sd.run(q, *args)
    assert torch.equal(sd.run(q, *args), got) and not sd.count.any()
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    fi = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)
    fi.plan(indptr, pages, last, hq, hkv, d, P, q_data_type=torch.bfloat16)
    theirs = fi.run(q, kv)
    for r, n in enumerate(lens):
        want = attention_over(q[r], kv, pages[indptr[r] : indptr[r + 1]].long(), n)
        assert rel_err(got[r], want) < BF16_TOL, n
        assert rel_err(got[r], want) <= 1.5 * rel_err(theirs[r], want) + 2**-8, n


def test_batch1_graphs_attend_with_split_decode() -> None:
    """A batch-1 decode graph over at most NOSPLIT_KV tokens attends with ``split_decode.py``
    (no plan per step; launched as a programmatic dependent of the QKV GEMV, it reads every
    key but the step's own before that kernel ends): on dendrite-24 (trained, bf16; a key
    missed or stale shows in its logits), greedy steps of a 10- and a 300-token prompt (1
    and 5 splits) match eager FlashInfer steps within bf16 tolerance; tokens part only at a
    near-tie."""
    model = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"
    graphs = Engine.from_pretrained(model, device="cuda", dtype=torch.bfloat16)
    eager = Engine.from_pretrained(model, device="cuda", dtype=torch.bfloat16, cuda_graphs=False)
    assert graphs.backend.split_decode and graphs.model.gemv_kernels
    greedy = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for prompt in ("4 4 10 13\n", "4 4 10 13\n" * 30):
        a, b = graphs.add(prompt, greedy), eager.add(prompt, greedy)
        graphs.prefill([a])
        eager.prefill([b])
        for _ in range(24):
            (og,), (oe,) = graphs.step([a], keep_logits=True), eager.step([b], keep_logits=True)
            assert og.logits is not None and oe.logits is not None
            assert rel_err(og.logits, oe.logits) < BF16_TOL
            if og.token != oe.token:  # bf16 kernels may only part at a near-tie
                gap = float(oe.logits[oe.token] - oe.logits[og.token])
                assert gap < BF16_TOL * float(oe.logits.abs().max())
                break
        graphs.free_all()
        eager.free_all()
    assert graphs._graphs is not None
    g = graphs._graphs._graphs[1, True]
    assert g.attn._split_decode is not None and g.attn._split_decode.pdl
    graphs.check_integrity()


def test_skinny_path_matches_cublas_on_few_row_steps(small_llama: Path) -> None:
    """Steps of 3, 8 and 16 rows through the split-K Triton GEMMs, and of 40 rows through
    cuBLAS with the fused gate/up + SiLU kernel (``skinny.swiglu``), as CUDA graphs and
    eagerly, against the cuBLAS + FlashInfer path on the same weights, teacher-forced."""
    engines = {
        "graph": Engine.from_pretrained(small_llama, device="cuda"),
        "eager": Engine.from_pretrained(small_llama, device="cuda", cuda_graphs=False),
        "cublas": Engine.from_pretrained(small_llama, device="cuda"),
    }
    assert engines["graph"].model.skinny_kernels and engines["eager"].model.skinny_kernels
    assert engines["graph"].model.swiglu_kernels and engines["eager"].model.swiglu_kernels
    assert not engines["cublas"].use_skinny_kernels(False)
    assert not engines["cublas"].model.swiglu_kernels
    outs: dict[str, list[torch.Tensor]] = {}
    for name, engine in engines.items():
        outs[name] = []
        for rows in (3, 8, 16, 40):
            root = engine.add(prompt_ids(50 + rows, 90))
            engine.prefill([root])
            branches = [root] + [engine.fork(root) for _ in range(rows - 1)]  # 1 pending
            outs[name].append(engine.forward(branches))
            g = torch.Generator().manual_seed(rows)
            for _ in range(3):
                toks = torch.randint(3, 256, (rows,), generator=g).tolist()
                for b, t in zip(branches, toks, strict=True):
                    engine.extend(b, [t])
                outs[name].append(engine.forward(branches))
            engine.free_all()
        engine.check_integrity()
    assert engines["graph"]._graphs is not None
    for step, (g_, e, c) in enumerate(zip(*outs.values(), strict=True)):
        assert g_.shape == c.shape and g_.shape[0] in (3, 8, 16, 40)
        assert rel_err(g_, c) < BF16_TOL, step
        assert rel_err(e, c) < BF16_TOL, step


def test_graph_replay_matches_eager_steps(small_llama: Path) -> None:
    """Teacher-forced logits over a tree (decode steps of 2 and 5 branches replay buckets 2
    and 8, with padded rows), then greedy decoding of 3 branches step by step."""
    graphs = Engine.from_pretrained(small_llama, device="cuda")
    eager = Engine.from_pretrained(small_llama, device="cuda", cuda_graphs=False)
    got, want = tree_scenario(graphs), tree_scenario(eager)
    assert graphs._graphs is not None
    assert set(graphs._graphs._graphs) == {(2, False), (8, False)}  # (bucket, no split-KV)
    assert eager._graphs is None
    for step, (x, y) in enumerate(zip(got, want, strict=True)):
        assert rel_err(x, y) < BF16_TOL, step
    diverged = [False] * 3
    same = 0
    for i, og, oe in greedy_side_by_side(graphs, eager, 24):
        if diverged[i]:
            continue
        assert og.logits is not None and oe.logits is not None
        assert rel_err(og.logits, oe.logits) < BF16_TOL
        if og.token == oe.token:
            same += 1
            continue
        # bf16 kernels of different batch shapes may only part at a near-tie
        gap = float(oe.logits[oe.token] - oe.logits[og.token])
        assert gap < BF16_TOL * float(oe.logits.abs().max()), (i, gap)
        diverged[i] = True
    assert same >= 24 * 3 // 2
    graphs.check_integrity()


def greedy_side_by_side(a: Engine, b: Engine, steps: int) -> Iterator[tuple[int, Any, Any]]:
    """Free both engines, then decode the same 3 prompts greedily on each, step by step:
    (row, a's output, b's output) for every row of every step, logits kept."""
    a.free_all()
    b.free_all()
    greedy = SamplingParams(max_new_tokens=steps, ignore_eos=True)
    prompts = [prompt_ids(20, 30), prompt_ids(21, 9), prompt_ids(22, 64)]
    rows_a, rows_b = [a.add(p, greedy) for p in prompts], [b.add(p, greedy) for p in prompts]
    a.prefill(rows_a)
    b.prefill(rows_b)
    for _ in range(steps):
        outs = zip(a.step(rows_a, keep_logits=True), b.step(rows_b, keep_logits=True), strict=True)
        for i, (oa, ob) in enumerate(outs):
            yield i, oa, ob


def test_float32_mode_replays_graphs_that_match_the_torch_backend(small_llama: Path) -> None:
    """fp32 on CUDA: eager steps on the torch reference, decode steps replayed as CUDA graphs
    on the Triton kernels at 3xTF32 (plain steps and cascades), against the torch
    backend in fp32 to fp32 rounding; then greedy decoding of 3 branches, the same tokens."""
    kw: Any = dict(device="cuda", dtype=torch.float32)
    fast = Engine.from_pretrained(
        small_llama, cascade_min_saved_pages=1, cascade_min_group_pages=1, **kw
    )
    # the reference keeps cuBLAS's IEEE fp32 GEMMs (no Triton path)
    ref = Engine.from_pretrained(small_llama, backend="torch", fused_kernels=False, **kw)
    assert isinstance(fast.backend, FlashInferBackend) and fast.backend.float32
    assert not ref.model.skinny_kernels
    # no FlashInfer kernels in fp32; the skinny GEMMs at 3xTF32, prompts on gemm32
    assert not fast.model.fused_kernels and fast.model.skinny_kernels
    assert fast.model._gemm32 is not None and not fast.model._skinny_pdl
    got, want = tree_scenario(fast), tree_scenario(ref)
    graphs = fast._graphs
    assert graphs is not None and fast.graphs_error is None
    assert graphs._graphs and graphs.cascade_steps > 0  # plain graphs and cascade graphs
    for step, (x, y) in enumerate(zip(got, want, strict=True)):
        assert x.dtype == torch.float32 and rel_err(x, y) < 1e-5, step
    for _, of, orf in greedy_side_by_side(fast, ref, 24):
        assert of.logits is not None and orf.logits is not None
        assert rel_err(of.logits, orf.logits) < 1e-5
        assert of.token == orf.token
    fast.check_integrity()


def test_float32_beam_search_equals_hf_on_cuda_graphs() -> None:
    """The beam search HF's fp32 runs, on dendrite-24 in fp32 (the float32 mode: pipelined on
    CUDA graphs, the prompt's pages a cascade's level 0): every beam identical to HF's,
    scores within fp32 noise."""
    from dendrite.search.beam import beam_search

    model_dir = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"
    kw: Any = dict(cascade_min_saved_pages=1, cascade_min_group_pages=1)
    engine = Engine.from_pretrained(model_dir, device="cuda", dtype=torch.float32, **kw)
    prompt = engine.encode("4 4 10 13\n" * 20)
    res = beam_search(engine, prompt, num_beams=6, max_new_tokens=40, eos_token_ids=())
    graphs = engine._graphs
    assert graphs is not None and engine.graphs_error is None and graphs.cascade_steps > 0
    hf: Any = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf = hf.to("cuda").eval()
    hf.generation_config.eos_token_id = None  # as eos_token_ids=() above
    ids = torch.tensor([prompt], device="cuda")
    with torch.inference_mode():
        out = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, pad_token_id=0,
            num_beams=6, num_return_sequences=6, do_sample=False, early_stopping=False,
            length_penalty=1.0, output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    want = [row[len(prompt) :].tolist() for row in out.sequences]
    assert [b.output_ids for b in res.beams] == want
    gaps = [abs(b.score - s) for b, s in zip(res.beams, out.sequences_scores.tolist(), strict=True)]
    assert max(gaps) < 1e-4
    engine.check_integrity()


def cascade_logits(
    path: Path, scenario: Callable[[Engine], list[torch.Tensor]]
) -> tuple[dict[str, list[torch.Tensor]], set[int]]:
    """``scenario``'s logits on three engines over the same checkpoint: cascade graphs and
    eager cascades (thresholds at 1: every shared prefix runs as a cascade), and plain graphs
    without the cascade, which the other two must match. Returns the logits by engine and
    the shapes the cascade graphs were captured for: (depth-0 groups, groups, depths)."""
    kw = dict(device="cuda", cascade_min_saved_pages=1, cascade_min_group_pages=1)
    fi0 = dict(cascade_prefix_kernel="flashinfer")  # level 0 on FlashInfer's prefill
    engines = {
        "graph": Engine.from_pretrained(path, **kw),  # type: ignore[arg-type]
        "graph-fi": Engine.from_pretrained(path, **fi0, **kw),  # type: ignore[arg-type]
        "eager": Engine.from_pretrained(path, cuda_graphs=False, **kw),  # type: ignore[arg-type]
        "plain": Engine.from_pretrained(path, device="cuda", cascade=False),
    }
    logits = {}
    for name, engine in engines.items():
        logits[name] = scenario(engine)
        engine.check_integrity()
    # each level's partial output is rounded to bf16 before the merge: one rounding more
    # than plain attention, hence 1.5x the bf16 bound; a wrong page would be off by O(1)
    for name in ("graph", "graph-fi", "eager"):
        for step, (x, y) in enumerate(zip(logits[name], logits["plain"], strict=True)):
            assert rel_err(x, y) < 1.5 * BF16_TOL, (name, step)
    graphs = engines["graph"]._graphs
    assert graphs is not None and graphs.cascade_steps == len(logits["graph"])
    eager, plain = engines["eager"].backend, engines["plain"].backend
    assert isinstance(eager, FlashInferBackend) and eager.cascade_steps >= len(logits["eager"])
    assert isinstance(plain, FlashInferBackend) and plain.cascade_steps == 0
    assert engines["plain"]._graphs is not None and engines["plain"]._graphs.cascade_steps == 0
    return logits, set(graphs.cascade_shapes)


def decode_random(
    engine: Engine, rows: list[Branch], steps: int, vocab: int, g: torch.Generator
) -> list[torch.Tensor]:
    """``steps`` decode steps of ``rows``, each a random token per row: the steps' logits."""
    out = []
    for _ in range(steps):
        for br in rows:
            engine.extend(br, torch.randint(3, vocab, (1,), generator=g).tolist())
        out.append(engine.forward(rows))
    return out


def test_cascade_graphs_match_plain_steps(small_llama: Path) -> None:
    """Branches forked from a long prompt (plus one unrelated branch): decode steps as cascade
    graphs (one and two groups) and as eager cascades equal plain decoding."""

    def scenario(engine: Engine) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        root, other = engine.add(prompt_ids(30, 301)), engine.add(prompt_ids(31, 40))
        engine.forward([root, other])
        kids = [engine.fork(root) for _ in range(6)]
        sub = engine.fork(kids[0])
        rows = [root, *kids, other, sub]
        out = []
        for step in range(12):
            if step == 6:  # kids[0]'s line moves on: two groups after this
                for _ in range(40):
                    engine.extend(kids[0], [7])
                    engine.forward([kids[0]])
                rows.append(engine.fork(kids[0]))
            for br in rows:
                engine.extend(br, torch.randint(3, 256, (1,), generator=g).tolist())
            out.append(engine.forward(rows))
        return out

    logits, shapes = cascade_logits(small_llama, scenario)
    assert len(logits["graph"]) == 12
    assert {top for top, _, _ in shapes} == {1, 2}  # one and two shared-prefix groups


def test_cascade_by_depth_graphs_match_plain_steps(small_llama: Path) -> None:
    """Levels by depth: two subtrees under a 301-token prompt, each line 40 tokens on before
    it forks three ways, one sub-subtree deeper still, rows in depth-first order: cascade
    graphs and eager cascades with the nested segments as shared levels (3 depths) equal
    plain decoding."""

    def scenario(engine: Engine) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(6)
        root = engine.add(prompt_ids(32, 301))
        engine.forward([root])
        rows = []
        for i in range(2):
            line = engine.fork(root)
            engine.extend(line, prompt_ids(60 + i, 41)[1:])
            engine.forward([line])
            rows += [line] + [engine.fork(line) for _ in range(3)]
        deep = rows[0]
        engine.extend(deep, prompt_ids(70, 33)[1:])
        engine.forward([deep])
        rows[1:1] = [engine.fork(deep)]  # beside its source: depth-first order
        return decode_random(engine, rows, 6, 256, g)

    logits, shapes = cascade_logits(small_llama, scenario)
    assert len(logits["graph"]) == 6
    assert {depths for _, _, depths in shapes} == {3}, shapes  # root, lines, the deep pair


def test_cascade_graphs_keep_the_depths_that_fit(small_llama: Path) -> None:
    """A 4-ary tree three levels deep (64 leaves, depth-first) beside a second prompt's 4
    branches: 22 groups over 3 depths, more than a graph holds (``MAX_GROUPS``), so the graphs
    replay its first two depths (6 groups, two of them at depth 0); the eager cascade runs
    all three; both equal plain decoding."""

    def scenario(engine: Engine) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(8)
        root = engine.add(prompt_ids(33, 65))
        engine.forward([root])
        rows: list[Branch] = []
        for i in range(4):
            line = engine.fork(root)
            engine.extend(line, prompt_ids(80 + i, 33)[1:])
            engine.forward([line])
            for j in range(4):
                sub = engine.fork(line)
                engine.extend(sub, prompt_ids(90 + 4 * i + j, 33)[1:])
                engine.forward([sub])
                rows += [sub] + [engine.fork(sub) for _ in range(3)]
        other = engine.add(prompt_ids(34, 40))
        engine.forward([other])
        rows += [other] + [engine.fork(other) for _ in range(3)]
        return decode_random(engine, rows, 4, 256, g)

    logits, shapes = cascade_logits(small_llama, scenario)
    assert len(logits["graph"]) == 4 and shapes == {(2, 6, 2)}, shapes


def test_cascade_on_a_trained_model_matches_plain() -> None:
    """The same on dendrite-24 (trained: its attention is far from uniform, so a RoPE or page
    mix-up in the cascade shows): 6 branches forked from a 200-token game prompt."""
    model = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"
    prompt = "4 4 10 13\n" * 20  # 200 tokens: 12 full shared pages

    def scenario(engine: Engine) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(9)
        root = engine.add(prompt)
        assert len(engine.encode(prompt)) >= 192
        engine.forward([root])
        rows = [root] + [engine.fork(root) for _ in range(5)]
        return decode_random(engine, rows, 8, 100, g)

    logits, shapes = cascade_logits(model, scenario)
    assert len(logits["graph"]) == 8 and shapes == {(1, 1, 1)}


def pipelined_equals_stepping(
    path: Path, scenario: Callable[[Engine], list[Branch]]
) -> list[tuple[Any, ...]]:
    """``scenario`` on a fresh engine pipelined (``pipeline="auto"``) and stepping (``"off"``),
    both replaying CUDA graphs: each branch it returns has the same tokens, finish reason and
    pending tokens, and the KV the same counts. Returns those per branch (pipelined)."""
    outs = {}
    for mode in ("auto", "off"):
        engine = Engine.from_pretrained(path, device="cuda")
        engine.config = replace(engine.config, pipeline=mode)
        rows = scenario(engine)
        engine.check_integrity()
        assert engine._graphs is not None
        got = [(engine.output_ids(b), b.finish_reason, b.pending) for b in rows]
        outs[mode] = (got, engine.stats())
    assert outs["auto"] == outs["off"]
    return outs["auto"][0]


def test_pipelined_run_equals_stepping_on_cuda_graphs(small_llama: Path) -> None:
    """``run`` pipelined (step n + 1 launched on step n's samples still on the GPU) against
    ``run`` stepping, both replaying CUDA graphs: the same tokens, stops and KV."""

    def scenario(engine: Engine) -> list[Branch]:
        stop = SamplingParams(max_new_tokens=48, temperature=1.0, top_k=4, stop_token_ids=(7, 9))
        roots = [engine.add(prompt_ids(40 + i, 20 + 7 * i), stop, seed=i) for i in range(4)]
        engine.prefill(roots)
        rows = [engine.branches[o.branch] for r in roots for o in engine.branch_out(r, 4)]
        greedy = engine.add(prompt_ids(50, 33), SamplingParams(max_new_tokens=40, ignore_eos=True))
        engine.run([*rows, greedy])
        return [*rows, greedy]

    reasons = [r for _, r, _ in pipelined_equals_stepping(small_llama, scenario)]
    assert "eos" in reasons and "length" in reasons, reasons  # both ways out were taken


def test_run_n_on_cuda_graphs_pipelined_equals_stepping(small_llama: Path) -> None:
    """``run(roots, n=8)`` pipelined from the prompts (fed, forked and sampled without the
    host waiting; the first decode step launched on those samples still on the GPU) against
    it stepping (the prompts fed in one forward, branched out, then stepped): the same
    tokens, stops and KV."""

    def scenario(engine: Engine) -> list[Branch]:
        stop = SamplingParams(max_new_tokens=40, temperature=1.0, top_k=4, stop_token_ids=(7, 9))
        roots = [engine.add(prompt_ids(60 + i, 70 + 9 * i), stop, seed=i) for i in range(3)]
        rows = engine.run(roots, n=8)
        assert len(rows) == 24
        return rows

    pipelined_equals_stepping(small_llama, scenario)


@pytest.mark.parametrize("cascade", [False, True], ids=["plain", "cascade"])
def test_pipelined_beam_search_equals_the_tree_path_on_cuda_graphs(cascade: bool) -> None:
    """The pipelined beam search (beams on slot-owned pages, chosen on the GPU, each step's
    page table patched on the device before its graph replays) against the beams as KV-tree
    branches, on dendrite-24 (trained: few near-ties) from a 200-token prompt (12 shared
    pages, 8 prompt tokens on a partial page): the same beams up to a bf16 near-tie, scores
    within bf16 noise."""
    from dendrite.search.beam import beam_search

    model = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"
    # any shared page; one shared level, as the pipelined search has (its beams' pages are
    # slot-owned): by depth, the tree path would read the beams' common tokens as more
    # levels, a different rounding, and near-tied beams could swap late in the 40 tokens
    kw = dict(cascade_min_saved_pages=1, cascade_min_group_pages=1, cascade_max_depth=1)
    engine = Engine.from_pretrained(model, device="cuda", cascade=cascade, **kw)  # type: ignore[arg-type]
    prompt = engine.encode("4 4 10 13\n" * 20)
    assert len(prompt) % 16 and len(prompt) >= 192
    used = engine.stats().used_pages
    res = {}
    for pipelined in (False, True):
        graphs = engine._graphs
        before = graphs.cascade_steps if graphs is not None else 0
        res[pipelined] = beam_search(
            engine, prompt, num_beams=6, max_new_tokens=40, eos_token_ids=(), pipelined=pipelined
        )
        assert engine._graphs is not None and engine.graphs_error is None
        assert (engine._graphs.cascade_steps > before) == cascade
        assert engine.stats().used_pages == used
        engine.check_integrity()
    tree, pipe = res[False], res[True]
    # The two paths round differently (the cascade's levels differ), so a bf16 near-tie may
    # swap beams late in the 40 tokens. Measured (.device/exp_s13d.py, H200): with the prompt
    # on the paged prefill all 6 beams agreed; on the single prefill (shipped) beams 3-6
    # part from tokens 15-40, scores within 0.002 of each other. So: the best beam is the
    # same, and every beam scores what the other path's beam of its rank does, within bf16
    # noise; with the cascade off, every beam is the same.
    same = [a.output_ids == b.output_ids for a, b in zip(pipe.beams, tree.beams, strict=True)]
    assert same[0] and (cascade or all(same)), same
    assert max(abs(a.score - b.score) for a, b in zip(pipe.beams, tree.beams, strict=True)) < 1e-2
    assert pipe.read_pages == pipe.paged_min_pages


def test_sampler_on_cuda_draws_what_it_draws_on_cpu() -> None:
    from dendrite.sampling import noise_key, sample

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 32000, generator=g) * 3
    params = [
        SamplingParams(temperature=1.0, top_k=50),
        SamplingParams(temperature=0.8, top_p=0.9),
        SamplingParams(),
        SamplingParams(temperature=1.0),
    ] * 16
    keys: list[int | None] = [noise_key(s, 100 + s) for s in range(64)]
    cpu_tokens, cpu_lp = sample(logits, params, keys)
    gpu_tokens, gpu_lp = sample(logits.cuda(), params, keys)
    assert gpu_tokens == cpu_tokens
    assert gpu_lp == pytest.approx(cpu_lp, abs=1e-4)


def test_greedy_pick_kernel_matches_torch_on_cuda() -> None:
    """The fused greedy pick (one Triton kernel) against argmax / log_softmax on the GPU, on
    a TinyLlama-size vocabulary, with bf16-rounded logits (ties are common) and a masked row;
    and greedy rows through ``sample`` with the kernel on and off."""
    from dendrite.greedy import greedy_pick
    from dendrite.sampling import sample

    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(64, 32000, generator=g) * 3).bfloat16().float().cuda()
    logits[5, :20000] = float("-inf")
    tokens, packed = greedy_pick(logits)
    want = logits.argmax(dim=-1)
    lp = torch.log_softmax(logits, dim=-1).gather(1, want[:, None])[:, 0]
    assert torch.equal(tokens, want)
    assert torch.equal(packed[0], want.double())
    assert float((packed[1] - lp.double()).abs().max()) < 1e-5
    params = [SamplingParams()] * 64
    keys: list[int | None] = [None] * 64
    fused, plain = sample(logits, params, keys, fused=True), sample(logits, params, keys)
    assert fused[0] == plain[0]
    assert fused[1] == pytest.approx(plain[1], abs=1e-5)


def test_sampled_pick_kernels_draw_what_torch_draws_on_cuda() -> None:
    """The fused sampled pick (two Triton kernels, the real chunk sizes) against the torch
    sampler on the GPU: 64 rows of a TinyLlama-size vocabulary, bf16-rounded logits (ties
    across the top-k boundary), greedy, plain-temperature and top-k rows (k up to 64) in one
    batch, 10 noise keys each (the last two with the top on a comb, ranked chunk by chunk):
    the same tokens, log-probs within fp32 rounding."""
    from dendrite import sampled_pick
    from dendrite.sampled_pick import KMAX
    from dendrite.sampling import noise_key, sample_device, sample_packed

    kinds = [
        SamplingParams(),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.8, top_k=50),
        SamplingParams(temperature=1.0, top_k=50),
        SamplingParams(temperature=1.5, top_k=KMAX),
        SamplingParams(temperature=0.6, top_k=7),
        SamplingParams(temperature=1.0, top_k=10**6),
    ]
    params = [kinds[i % len(kinds)] for i in range(64)]
    g = torch.Generator().manual_seed(3)
    same = draws = 0
    worst = 0.0
    diffs: list[tuple[int, int]] = []  # (trial, kind) of a differing row
    for trial in range(10):
        logits = (torch.randn(64, 32000, generator=g) * 3).bfloat16().float()
        logits[::5] = logits[::5].round()  # long runs of ties
        if trial >= 8:  # the top on a comb (one strided set of each chunk): more keys pass
            logits[:, :: sampled_pick.SUB] += 30.0  # the bound than the packed row holds
        logits = logits.cuda()
        keys = [None if p.greedy else noise_key(trial, i) for i, p in enumerate(params)]
        want, want_lp = sample_device(logits, params, keys)
        tokens, packed = sample_packed(logits, params, keys, fused=True)
        same += int((tokens == want).sum()) + int((packed[0] == want.double()).sum())
        draws += 128
        diffs += [(trial, i % len(kinds)) for i in (tokens != want).nonzero()[:, 0].tolist()]
        worst = max(worst, float((packed[1] - want_lp.double()).abs().max()))
    assert same == draws, diffs
    assert worst < 1e-4
