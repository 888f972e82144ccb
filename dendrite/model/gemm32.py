"""An fp32 GEMM on the tensor cores at 3xTF32, for a float32 model's prompts.

A float32 model's prompt is a large fp32 GEMM per projection. cuBLAS runs it on the FMA units
(TF32 is off by default in torch, as it should be for a model asked for in fp32). Here each
operand is split into two TF32 parts and three tensor-core products are summed in fp32
(``tl.dot``'s ``tf32x3``): about fp32's accuracy at several times TF32's cost, still well
under the FMA units' time.

Measured on the H200 (``.device/exp_s14b.py``; 1,024 rows, the TinyLlama projections in fp32):
the 88 projections of a prompt in 27.1 ms against cuBLAS fp32's 42.3 (its FMA kernels), each
output's error against an fp64 product 1.7-3.8e-6 (cuBLAS: 3.7-13.6e-6). The tile (128 x 128
outputs, K 64 a load, 8 warps, 3 stages) was the best of seven for every projection.

``Transformer.use_skinny_kernels`` turns it on for an fp32 model's steps of more than
``skinny.ENGINE_ROWS`` rows (those of fewer take ``skinny.matmul``, also at 3xTF32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BM, BN, BK, WARPS, STAGES = 128, 128, 64, 8, 3
GROUP = 8  # row blocks a column of programs walks before the next: the weight tile stays in L2


@triton.jit
def _gemm_kernel(
    X,
    W,
    Y,
    BIAS,
    M,
    N,
    K,
    sx,
    HAS_BIAS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP: tl.constexpr,
):
    """Y[m-block, n-block] = x W^T (+ bias), the products at 3xTF32, sums in fp32."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    width = GROUP * grid_n
    first = (pid // width) * GROUP
    group = tl.minimum(grid_m - first, GROUP)
    pid_m = first + (pid % width) % group
    pid_n = (pid % width) // group
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    kr = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = X + rm.to(tl.int64)[:, None] * sx
    w_rows = W + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros([BM, BN], tl.float32)
    for kb in range(0, K, BK):
        kk = kb + kr
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="tf32x3")
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0)[None, :]
    at = rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(Y + at, acc, mask=m_ok[:, None] & n_ok[None, :])


def matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    prologue: str = "none",
) -> torch.Tensor:
    """``x`` [M, K] ([M, 2K] for ``silu``: x = silu(gate) * up first) times the fp32
    ``weight`` [N, K]^T (+ ``bias``): [M, N] fp32."""
    if prologue == "silu":
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    elif prologue != "none":
        raise ValueError(f"gemm32.matmul: prologue 'none' or 'silu', got {prologue!r}")
    n, k = weight.shape
    if x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(
            f"gemm32.matmul wants an [M, {k}] x with unit column stride and a contiguous "
            f"[N, K] weight, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        raise ValueError(f"gemm32.matmul is for fp32, got {x.dtype} and {weight.dtype}")
    if bias is not None and (
        tuple(bias.shape) != (n,) or bias.dtype != torch.float32 or not bias.is_contiguous()
    ):
        raise ValueError(
            f"gemm32.matmul wants a contiguous fp32 bias of ({n},), got {tuple(bias.shape)} "
            f"{bias.dtype}"
        )
    m = x.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.float32)
    if m == 0:
        return y
    grid = (triton.cdiv(m, BM) * triton.cdiv(n, BN),)
    _gemm_kernel[grid](
        x, weight, y, bias if bias is not None else weight, m, n, k, x.stride(0),
        HAS_BIAS=bias is not None, BM=BM, BN=BN, BK=BK, GROUP=GROUP, num_warps=WARPS,
        num_stages=STAGES,
    )  # fmt: skip
    return y
