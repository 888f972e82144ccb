"""The Triton kernels of the cascade, the fused SwiGLU and the sampled pick, compiled for Hopper
(sm_90) on this CPU machine.

Triton's interpreter (``gemv_interpreted.py``) runs the kernels' arithmetic on CPU but not
its compiler's checks: a variable whose type changes inside an ``if`` runs there and fails
to compile on the GPU. Here each kernel goes through the whole compiler, down to a cubin,
for the variants the engine launches (bf16 / fp16 / fp32 pools, one or two levels, both key
blocks; the merge with no level 0, one and several depths).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)


def compile_for_hopper(fn: Any, const: dict[str, Any], types: Callable[[str], str], **opts: Any):
    names = list(inspect.signature(fn.fn).parameters)
    sig = {n: ("constexpr" if n in const else types(n)) for n in names}
    src = ASTSource(
        fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()}
    )
    return triton.compile(src, target=HOPPER, options={"enable_fp_fusion": True, **opts})


@pytest.mark.parametrize(
    ("kv", "prec", "two", "block_n"),
    [("*bf16", None, True, 64), ("*bf16", None, True, 128), ("*fp16", None, False, 64),
     ("*fp32", "tf32x3", True, 64), ("*fp32", "tf32x3", False, 32)],
)  # fmt: skip
def test_cascade_partials_kernel_compiles_for_sm90(
    kv: str, prec: str | None, two: bool, block_n: int
) -> None:
    from dendrite.attention import shared_prefix as sp

    def types(n: str) -> str:
        if n in ("Q", "KV"):
            return kv
        if n in ("O_A", "S_A", "O_B", "S_B"):
            return "*fp32"
        if n.startswith(("TILES", "KVP", "IND", "LAST")):
            return "*i32"
        return "fp32" if n == "scale_log2" else "i32"

    const = dict(GROUP=8, BM_A=64, BN_A=block_n, BM_B=16, BN_B=64, P=16, D=64, UPCAST=False,
                 PREC=prec, TWO=two)  # fmt: skip
    kernel = compile_for_hopper(sp._partials_kernel, const, types, num_warps=4, num_stages=2)
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]


@pytest.mark.parametrize(("depths", "splits0"), [(0, 0), (1, 8), (3, 4)])
def test_cascade_merge_kernel_compiles_for_sm90(depths: int, splits0: int) -> None:
    from dendrite.attention import merge as mg

    def types(n: str) -> str:
        return {"OUT": "*bf16", "MASK": "*i32"}.get(
            n, "*fp32" if n in ("O1", "S1", "O0", "S0") else "i32"
        )

    const = dict(NS1=2, DEPTHS=depths, SPLITS0=splits0, BH=8, D=64)
    kernel = compile_for_hopper(mg._merge_kernel, const, types, num_warps=2)
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]


def test_swiglu_kernel_compiles_for_sm90() -> None:
    """The gate/up projection with the SiLU-and-mul fused in, as the engine launches it for
    64 rows (bf16, its tile and pipeline stages)."""
    from dendrite.model import skinny as sk

    def types(n: str) -> str:
        return "*bf16" if n in ("X", "W", "Y", "BIAS") else "i32"

    t = sk.SWIGLU_TILE
    const = dict(HAS_BIAS=False, BM=64, BN=t.bn, BK=t.bk, UPCAST=False)
    kernel = compile_for_hopper(
        sk._swiglu_kernel, const, types, num_warps=t.warps, num_stages=t.stages
    )
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]
    assert kernel.metadata.shared <= 227 * 1024  # the H100 / H200 opt-in limit


def test_sampled_pick_kernels_compile_for_sm90() -> None:
    """The sampled pick's chunk and sampling kernels as launched for a 32,000-token
    vocabulary (16 chunks)."""
    from dendrite import sampled_pick as sp

    def types(n: str) -> str:
        ptr = {"LOGITS": "*fp32", "PARAMS": "*fp64", "PACKED": "*fp64", "STATF": "*fp32"}
        i64 = ("MAXK", "STATI", "SETS", "CAND", "SPILL", "TOK")
        return ptr.get(n, "*i64" if n in i64 else "i32")

    chunk = compile_for_hopper(
        sp._chunk_kernel, dict(C=sp.CHUNK_C, SUB=sp.SUB, PRECISE=True), types, num_warps=4
    )
    const = dict(NCHP=16, NM=1024, KMAX=sp.KMAX, SUB=sp.SUB, SETCAP=sp.SETCAP, CAP=sp.CAP,
                 C=sp.CHUNK_C, PRECISE=True)  # fmt: skip
    sample = compile_for_hopper(sp._sample_kernel, const, types, num_warps=8)
    for kernel in (chunk, sample):
        assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]


def tf32_mmas(ptx: str) -> int:
    """Hopper's TF32 warp-group MMAs in a kernel's PTX (each covers K 8): 3xTF32 issues three
    for each K step of 8 (big x big, big x small, small x big)."""
    return len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k8\.f32\.tf32\.tf32", ptx))


@pytest.mark.parametrize(
    ("rows", "split", "fused"),
    [(8, True, "none"), (16, False, "none"), (8, True, "norm"), (8, True, "add_silu")],
)
def test_fp32_skinny_kernel_compiles_at_3xtf32_for_sm90(rows: int, split: bool, fused: str) -> None:
    """A float32 model's decode GEMM as the engine launches it (its fp32 tile, 8 or 16 rows;
    plain, with the RMSNorm prologue of ``matmul_norm``, or SiLU in and the residual add out
    as ``matmul_add``): the products on the tensor cores at 3xTF32, three TF32 MMAs for
    each (TF32 would be one), no FMA-unit dot."""
    from dendrite.model import skinny as sk

    def types(n: str) -> str:
        if n in ("X", "W", "Y", "BIAS", "WS", "SS_IN", "G", "SS_OUT"):
            return "*fp32"
        return {"CNT": "*i32", "eps": "fp32"}.get(n, "i32")

    t = sk.choose_tile_fp32(2048, 2048, 132)
    prologue = {"none": 0, "norm": 3, "add_silu": 2}[fused]
    const = dict(PROLOGUE=prologue, SPLIT=split, HAS_BIAS=False, BM=sk.block_rows(rows, True),
                 BN=t.bn, BK=t.bk, UPCAST=False, USE_PDL=False, PREC="tf32x3",
                 ADD=fused == "add_silu", NBP=32)  # fmt: skip
    kernel = compile_for_hopper(
        sk._skinny_kernel, const, types, num_warps=t.warps, num_stages=t.stages
    )
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]
    assert tf32_mmas(kernel.asm["ptx"]) == 3 * t.bk // 8  # TF32 alone: t.bk // 8
    if fused == "none":  # (the fused norm's sums of squares may take an FMA)
        assert "fma.rn.f32" not in kernel.asm["ptx"]  # no dot on the FMA units (IEEE)
    assert kernel.metadata.shared <= 227 * 1024


def test_fp32_prompt_gemm_compiles_at_3xtf32_for_sm90() -> None:
    """``gemm32``'s kernel with its tile: tensor-core TF32 MMAs, within shared memory."""
    from dendrite.model import gemm32 as g

    def types(n: str) -> str:
        return "*fp32" if n in ("X", "W", "Y", "BIAS") else "i32"

    const = dict(HAS_BIAS=True, BM=g.BM, BN=g.BN, BK=g.BK, GROUP=g.GROUP)
    kernel = compile_for_hopper(
        g._gemm_kernel, const, types, num_warps=g.WARPS, num_stages=g.STAGES
    )
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]
    assert tf32_mmas(kernel.asm["ptx"]) == 3 * g.BK // 8
    assert kernel.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("kv", ["*bf16", "*fp16"])
def test_split_decode_kernel_compiles_for_sm90_and_loads_before_its_wait(kv: str) -> None:
    """``attention/split_decode.py`` with PDL: the first key block's K and V are loaded
    before ``griddepcontrol.wait`` (they do not depend on the kernel before), q after it."""
    from dendrite.attention import split_decode as sd

    def types(n: str) -> str:
        if n in ("Q", "KV", "OUT"):
            return kv
        if n in ("O_PART", "S_PART"):
            return "*fp32"
        if n in ("COUNT", "KVP", "IND", "LAST"):
            return "*i32"
        return "fp32" if n == "scale_log2" else "i32"

    const = dict(GROUP=8, BLOCK_M=16, BLOCK_N=64, P=16, D=64, CHUNK=4, UPCAST=False, USE_PDL=True)
    kernel = compile_for_hopper(sd._split_decode_kernel, const, types, num_warps=4, num_stages=2)
    ptx = kernel.asm["ptx"]
    assert ".target sm_90" in ptx and kernel.asm["cubin"]
    before, wait, after = ptx.partition("griddepcontrol.wait")
    assert wait and "griddepcontrol.launch_dependents" in before
    # the page table (3 loads), the block's pages, and K and V of 64 keys x 64 dims over 128
    # threads: 64 elements of each a thread, in 4 16-byte loads at the least
    assert len(re.findall(r"ld\.global", before)) >= 3 + 1 + 2 * 4
    assert len(re.findall(r"ld\.global", after)) >= 1  # q
    assert "atom.global" in after  # the count of finished splits


@pytest.mark.parametrize("append", [True, False])
def test_rope_kv_kernel_compiles_for_sm90_in_both_modes(append: bool) -> None:
    """The RoPE kernel as decode steps launch it (``rope_append``: bf16, into the pages) and as
    a float32 model's prompts do (``rope_inplace``: fp32, q and k in place): TinyLlama's 36
    heads of 64 in a block of 64."""
    from dendrite.model import rope_kv as rk

    dtype = "*bf16" if append else "*fp32"

    def types(n: str) -> str:
        return {"QKV": dtype, "KV": dtype, "COS_SIN": "*fp32"}.get(
            n, "*i32" if n in ("POS", "PAGE", "SLOT") else "i32"
        )

    const = dict(HALF=32, HB=64, USE_PDL=False, APPEND=append)
    kernel = compile_for_hopper(rk._rope_kv_kernel, const, types, num_warps=4)
    assert ".target sm_90" in kernel.asm["ptx"] and kernel.asm["cubin"]
