"""The LLaMA-family transformer (Llama, Mistral, Qwen2), reading and writing paged KV only
through an attention backend.

One forward runs one engine step: a flat ragged batch of new tokens from many branches
(prompt chunks and single decode tokens mixed). Per layer: RMSNorm, QKV, RoPE at the given
absolute positions (outside the attention kernel), ``backend.run`` (writes the new K/V into
the pages and attends over each branch's pages), output projection, SwiGLU MLP. Parameter
names mirror HF's so checkpoints load by name. Numerics follow HF's eager path (RMSNorm in
fp32, RoPE tables in fp32) so logits agree with transformers to float precision.

On CUDA with FlashInfer, :meth:`Transformer.use_flashinfer_kernels` swaps the small ops for
fused kernels (about 30 kernels a layer become about 10, which is what a decode step of a
small batch is made of): RMSNorm, residual add + RMSNorm in one, RoPE in place from a
precomputed fp32 cos/sin table, SiLU-and-mul. They compute in fp32 and round once, so logits
stay within bf16 noise of the torch path (checked against HF in the GPU tests)::

    torch path (CPU, reference)              FlashInfer path (CUDA)
    x = x + attn(norm1(x))                   h = rmsnorm(r)            (first layer only)
    x = x + mlp(norm2(x))                    h = attn(h); r += h; h = norm2(r)   (fused)
                                             h = mlp(h);  r += h; h = next norm1(r) (fused)

Decode steps (one new token a row) rotate q and k and write the new K/V into the pages in one
Triton kernel (``rope_kv.py``) where the backend names each row's slot; then the backend only
attends. Steps of one row (batch-1 decode) go further with
:meth:`Transformer.use_gemv_kernels`: every projection is one Triton GEMV with the norm,
SiLU-and-mul or RoPE fused in (``gemv.py``). Steps of 2 to 16 rows (beam search, small
batches) run with :meth:`Transformer.use_skinny_kernels` on split-K Triton GEMMs launched as
programmatic dependents, one kernel each, SiLU-and-mul fused into the down projection, with a
Triton residual add + RMSNorm between them (``skinny.py``). A float32 model on CUDA takes the
same forward for every step, its products at 3xTF32 (fp32's accuracy on the tensor cores):
steps of up to 16 rows on ``skinny.py``'s GEMMs with the residual adds and RMSNorms inside
them (``matmul_add`` / ``matmul_norm``), longer ones (prompts) on ``gemm32.py``'s with RoPE in
one Triton kernel (``rope_kv.rope_inplace``).
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from dendrite.attention.base import SlotBackend
from dendrite.model.config import ModelConfig, RopeConfig

if TYPE_CHECKING:
    from dendrite.attention.base import AttentionBackend


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in fp32, with linear or llama3 scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.kind == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.kind == "llama3":
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q, config.hidden_size, bias=config.o_bias)
        self.qkv_weight: torch.Tensor | None = None  # fused at load time (views share memory)
        self.qkv_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One [Hq+2Hkv)*D, H] weight for q, k, v; the three projections become views of it."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        self.qkv_weight = torch.cat([p.weight for p in projs])
        if self.q_proj.bias is not None:
            self.qkv_bias = torch.cat([p.bias for p in projs])
        start = 0
        for p in projs:
            n = p.weight.shape[0]
            p.weight = nn.Parameter(self.qkv_weight[start : start + n], requires_grad=False)
            if self.qkv_bias is not None:
                p.bias = nn.Parameter(self.qkv_bias[start : start + n], requires_grad=False)
            start += n

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        T = x.shape[0]
        Hq, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        assert self.qkv_weight is not None, "Transformer.finish_loading() fuses the weights"
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias).view(T, Hq + 2 * Hkv, D)
        q, k, v = self.split_rotated(qkv, cos, sin)
        out = backend.run(self.layer, q, k, v)  # [T, Hq, D]
        return F.linear(out.reshape(T, Hq * D), self.o_proj.weight, self.o_proj.bias)

    def split_rotated(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T,Hq,D], k [T,Hkv,D] (RoPE in torch, HF's numerics) and v [T,Hkv,D] of a fused
        projection [T, Hq + 2 Hkv, D]."""
        Hq, Hkv = self.num_heads, self.num_kv_heads
        qk = qkv[:, : Hq + Hkv]  # RoPE on q and k together
        qk = qk * cos + rotate_half(qk) * sin
        return qk[:, :Hq], qk[:, Hq:], qkv[:, Hq + Hkv :]

    def split_rotated_fused(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, fi: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same views of ``qkv``, q and k rotated in place by FlashInfer's RoPE from the
        fp32 cos | sin table (``Transformer._cos_sin``)."""
        Hq, Hkv = self.num_heads, self.num_kv_heads
        q, k, v = qkv[:, :Hq], qkv[:, Hq : Hq + Hkv], qkv[:, Hq + Hkv :]
        fi.rope.apply_rope_with_cos_sin_cache_inplace(positions, q, k, self.head_dim, cos_sin)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=b)
        self.up_proj = nn.Linear(h, i, bias=b)
        self.down_proj = nn.Linear(i, h, bias=b)
        self.gate_up_weight: torch.Tensor | None = None
        self.gate_up_bias: torch.Tensor | None = None

    def fuse(self) -> None:
        """One [2I, H] weight for gate and up; the two projections become views of it."""
        i = self.gate_proj.weight.shape[0]
        self.gate_up_weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        self.gate_proj.weight = nn.Parameter(self.gate_up_weight[:i], requires_grad=False)
        self.up_proj.weight = nn.Parameter(self.gate_up_weight[i:], requires_grad=False)
        if self.gate_proj.bias is not None:
            self.gate_up_bias = torch.cat([self.gate_proj.bias, self.up_proj.bias])
            self.gate_proj.bias = nn.Parameter(self.gate_up_bias[:i], requires_grad=False)
            self.up_proj.bias = nn.Parameter(self.gate_up_bias[i:], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate_up_weight is not None, "Transformer.finish_loading() fuses the weights"
        gate, up = F.linear(x, self.gate_up_weight, self.gate_up_bias).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj.weight, self.down_proj.bias)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        # plain method calls: nn.Module.__call__ costs more than these small ops on CPU
        x = x + self.self_attn.forward(self.input_layernorm.forward(x), cos, sin, backend)
        return x + self.mlp.forward(self.post_attention_layernorm.forward(x))


class Body(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, n) for n in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    """``model.*`` and ``lm_head`` as in HF's ``*ForCausalLM``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Body(config)
        self.lm_head: nn.Linear | None = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2), persistent=False)
        self._fi: Any = None  # the flashinfer module while its fused kernels are in use
        self._gemv: Any = None  # dendrite.model.gemv while one-row steps run through it
        self._pdl = False  # launch those GEMVs as programmatic dependents (Hopper on)
        self._skinny: Any = None  # dendrite.model.skinny while steps of 2-16 rows run on it
        self._skinny_pdl = False
        self._mid_rows = False  # steps of 17-64 rows on FlashInfer's path: skinny.swiglu
        self._gemm32: Any = None  # dendrite.model.gemm32 while an fp32 model's longer steps use it
        # decode steps rotate q, k and append K/V in one Triton kernel (rope_kv.py) where the
        # backend names the slots; else FlashInfer's (or torch's) RoPE, then backend.run
        d = config.head_dim
        self.rope_kv = importlib.util.find_spec("triton") is not None and d & (d - 1) == 0
        # a float32 model's steps of several tokens a row (prompts) rotate q and k in place in
        # one Triton kernel (rope_kv.rope_inplace; FlashInfer's RoPE takes fp16/bf16 only)
        self._rope_prompts = False
        self._cos_sin = torch.empty(0)  # [max_positions, head_dim] fp32: cos | sin

    def finish_loading(self, device: str | torch.device) -> None:
        """Once the weights are on ``device``: RoPE frequencies, fused QKV and gate/up weights."""
        self.inv_freq = rope_inv_freq(self.config.rope, self.config.head_dim).to(device)
        with torch.no_grad():
            for layer in self.model.layers:
                assert isinstance(layer, DecoderLayer)
                layer.self_attn.fuse()
                layer.mlp.fuse()

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin as [T, 1, D] in the model dtype (computed in fp32 as HF does)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def use_flashinfer_kernels(self, enable: bool = True) -> bool:
        """Run RMSNorm, add + RMSNorm, RoPE and SiLU-and-mul as FlashInfer kernels (or stop).

        Only on CUDA in fp16/bf16 with flashinfer importable; each kernel is tried once on a
        three-token batch (compiling it if need be) against the torch path, and any failure
        keeps the torch path.
        Returns whether the fused kernels are in use.
        """
        self._fi = None
        half = self.dtype in (torch.float16, torch.bfloat16)
        if not enable or self.device.type != "cuda" or not half:
            return False
        try:
            import flashinfer
        except ImportError:
            return False
        self._build_cos_sin()
        try:
            self._fi = flashinfer
            self._check_against_torch(self._forward_flashinfer, [1, 2, 3], [6, 7, 8], "fused")
        except Exception as e:  # a kernel that cannot build or run here: keep the torch path
            warnings.warn(f"FlashInfer fused kernels are off: {e}", stacklevel=2)
            self._fi = None
            return False
        return True

    def _check_against_torch(
        self, forward: Callable[..., torch.Tensor], ids: list[int], positions: list[int], what: str
    ) -> None:
        """Raise unless ``forward`` gives the torch path's logits on ``ids`` at ``positions``
        (away from 0, so RoPE shows) over an attention stand-in, within bf16 noise.

        The stand-in names K/V slots as a decode step's backend does, so the kernels that
        write them (the RoPE + append kernel, the batch-1 QKV GEMV) are checked too. If the
        check fails with the RoPE + append kernel on, that kernel is switched off (warned) and
        the check runs again without it."""
        try:
            self._compare_with_torch(forward, ids, positions, what)
        except Exception as e:
            if not self.rope_kv:
                raise
            self.rope_kv = False
            warnings.warn(f"the Triton RoPE + KV append kernel is off: {e}", stacklevel=3)
            self._compare_with_torch(forward, ids, positions, what)

    def _compare_with_torch(
        self, forward: Callable[..., torch.Tensor], ids: list[int], positions: list[int], what: str
    ) -> None:
        cfg = self.config
        with torch.inference_mode():
            t = torch.tensor(ids, device=self.device) % cfg.vocab_size
            pos = torch.tensor(positions, device=self.device) % cfg.max_position_embeddings
            ref = self._forward_torch(t, pos, _NoAttention(cfg), None)
            stand_in = _NoAttentionSlots(cfg, len(ids), self.dtype, self.device)
            got = forward(t, pos, stand_in, None)
        err = float((got - ref).abs().max() / ref.abs().max())
        # bf16 noise is ~1e-2, fp32's ~1e-6 (TF32 products would show at ~1e-3); a wiring
        # mistake is O(1)
        if not err < (1e-4 if self.dtype == torch.float32 else 5e-2):
            raise RuntimeError(f"the {what} forward differs from the torch one by {err:.3g}")

    def _build_cos_sin(self) -> None:
        """The RoPE table of the fused kernels: [max_positions, head_dim] fp32, cos | sin."""
        table = self._cos_sin
        if table.shape[0] == self.config.max_position_embeddings and table.device == self.device:
            return
        pos = torch.arange(self.config.max_position_embeddings, dtype=torch.float32)
        freqs = pos.to(self.device)[:, None] * self.inv_freq[None, :]  # as rope_tables
        self._cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()

    @property
    def fused_kernels(self) -> bool:
        return self._fi is not None

    def use_gemv_kernels(self, enable: bool = True, *, require_cuda: bool = True) -> bool:
        """Run one-row steps (batch-1 decode) through the Triton GEMVs of ``gemv.py``: each
        projection one kernel with the RMSNorm or SiLU-and-mul before it fused in, launched
        as programmatic dependents on Hopper so each streams its weights while the kernel
        before it drains. Steps of more rows keep the cuBLAS path.

        Only in fp16/bf16 with Triton importable, on CUDA (``require_cuda=False`` lets the
        tests run the kernels in Triton's CPU interpreter). A one-row forward is checked
        against the torch path first; any failure keeps the old path (and warns).
        Returns whether the GEMV path is in use.
        """
        self._gemv, self._pdl = None, False
        if not self._triton_usable(enable, require_cuda):
            return False
        from dendrite.model import gemv

        cfg = self.config
        if max(cfg.hidden_size, cfg.intermediate_size) > gemv.MAX_K:
            return False

        def use(on: bool, pdl: bool) -> None:
            self._gemv, self._pdl = (gemv if on else None), pdl

        return self._try_triton_path("GEMV", use, self._forward_gemv, [7], [5])

    @property
    def gemv_kernels(self) -> bool:
        return self._gemv is not None

    def use_skinny_kernels(self, enable: bool = True, *, require_cuda: bool = True) -> bool:
        """Run steps of 2 to ``skinny.ENGINE_ROWS`` (16) rows (beam search, small batches) on
        the split-K Triton GEMMs of ``skinny.py``: each projection one kernel launched as a
        programmatic dependent on Hopper (split-K slices added up inside it), the residual
        add + RMSNorm one kernel, SiLU-and-mul fused into the down projection. One-row steps
        keep the GEMV path when it is on; longer steps (the 64-branch tree, prompts) keep
        cuBLAS, where these kernels did not win on the H200, except that steps of up to
        ``skinny.MID_ROWS`` (64) rows on FlashInfer's path take the gate/up projection and
        the SiLU-and-mul as one kernel (``skinny.swiglu``), checked against the torch path
        with 20 rows. Allocates the split-K kernels' arrival counters (before any CUDA graph
        capture).

        A float32 model takes the same kernels with their products at 3xTF32 (``skinny.py``)
        and its residual adds and RMSNorms inside the GEMMs (:meth:`_forward_skinny_fp32`),
        not launched as programmatic dependents (slower there: the fp32 beam search 0.222
        against 0.210 s without, on the H200), and its longer steps (prompts) take the same
        forward with ``gemm32.py``'s GEMMs, checked with 20 rows.

        In fp16/bf16/fp32 with Triton importable, on CUDA (``require_cuda=False``: Triton's
        CPU interpreter, for the tests). A four-row forward is checked against the torch path
        first; any failure keeps the old path (and warns). Returns whether the path is in use.
        """
        self._skinny, self._skinny_pdl, self._mid_rows = None, False, False
        self._gemm32, self._rope_prompts = None, False
        if not self._triton_usable(enable, require_cuda, fp32=True):
            return False
        from dendrite.model import skinny

        if self.config.hidden_size > skinny.MAX_NORM:
            return False
        skinny.counters(self.device, 1)

        def use(on: bool, pdl: bool) -> None:
            self._skinny, self._skinny_pdl = (skinny if on else None), pdl

        fp32 = self.dtype == torch.float32
        on = self._try_triton_path(
            "skinny GEMM", use, self._forward_skinny, [1, 2, 3, 4], [6, 7, 8, 9], pdl=not fp32
        )
        wide = list(range(1, skinny.ENGINE_ROWS + 5)), list(range(skinny.ENGINE_ROWS + 4))
        if on and fp32:  # prompts: the same forward on the 3xTF32 GEMM for many rows
            from dendrite.model import gemm32

            self._rope_prompts = self.rope_kv and self._rope_inplace_matches()
            self._gemm32 = gemm32
            if not self._passes("fp32 GEMM", self._forward_gemm32, *wide):  # prompts: cuBLAS
                self._gemm32 = None
        if on and self._fi is not None:  # 17-64 rows on FlashInfer's path: the fused SwiGLU
            self._mid_rows = True
            if not self._passes("SwiGLU", self._forward_flashinfer, *wide):  # cuBLAS
                self._mid_rows = False
        return on

    def _rope_inplace_matches(self) -> bool:
        """Whether ``rope_kv.rope_inplace`` builds here and rotates 5 tokens (positions 3-7)
        of a random projection as torch's RoPE does, to fp32 rounding (else warned: prompts
        keep torch's RoPE)."""
        from dendrite.model.rope_kv import rope_inplace

        attn = self._decoder_layers[0].self_attn
        Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
        g = torch.Generator().manual_seed(0)
        qkv = torch.randn(5, Hq + 2 * Hkv, D, generator=g).to(self.device, self.dtype)
        pos = torch.arange(3, 8, device=self.device) % self.config.max_position_embeddings
        try:
            with torch.inference_mode():
                want = attn.split_rotated(qkv.clone(), *self.rope_tables(pos))
                got = rope_inplace(qkv, pos, self._cos_sin, Hq, Hkv)
            err = max(
                float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, want, strict=True)
            )
            if not err < 1e-5:
                raise RuntimeError(f"it differs from torch's RoPE by {err:.3g}")
            return True
        except Exception as e:  # cannot build or run here
            warnings.warn(f"the Triton RoPE of fp32 prompts is off: {e}", stacklevel=3)
            return False

    def _passes(
        self, what: str, forward: Callable[..., torch.Tensor], ids: list[int], positions: list[int]
    ) -> bool:
        """Whether a path switched on after the skinny GEMMs' check builds and matches the
        torch path (warned if not). The RoPE + append kernel passed that check: a failure
        here is this path's, so it stays on (no :meth:`_check_against_torch`)."""
        try:
            self._compare_with_torch(forward, ids, positions, what)
            return True
        except Exception as e:  # cannot build or run here
            warnings.warn(f"the Triton {what} kernel is off: {e}", stacklevel=3)
            return False

    def _triton_usable(self, enable: bool, require_cuda: bool, *, fp32: bool = False) -> bool:
        """Whether a Triton path may be tried: asked for, fp16/bf16 (or fp32 where the path
        has it), on CUDA (or not required), Triton importable."""
        dtypes = (torch.float16, torch.bfloat16) + ((torch.float32,) if fp32 else ())
        if not enable or self.dtype not in dtypes or (require_cuda and self.device.type != "cuda"):
            return False
        return importlib.util.find_spec("triton") is not None

    def _try_triton_path(
        self,
        what: str,
        use: Callable[[bool, bool], None],
        forward: Callable[..., torch.Tensor],
        ids: list[int],
        positions: list[int],
        pdl: bool = True,
    ) -> bool:
        """Switch a Triton path on (``use(True, pdl)``) with PDL where Hopper has it (and
        ``pdl``), then without, keeping the first that builds and matches the torch path;
        else off (warned).
        """
        from dendrite.model import gemv

        self._build_cos_sin()
        with_pdl = pdl and gemv.pdl_supported(self.device)
        for launch_pdl in (True, False) if with_pdl else (False,):
            try:
                use(True, launch_pdl)
                self._check_against_torch(forward, ids, positions, what)
                return True
            except Exception as e:  # cannot build or run here: try without PDL, then give up
                use(False, False)
                warnings.warn(
                    f"Triton {what} kernels (pdl={launch_pdl}) are off: {e}", stacklevel=3
                )
        return False

    @property
    def skinny_kernels(self) -> bool:
        return self._skinny is not None

    @property
    def swiglu_kernels(self) -> bool:
        """Steps of 17 to ``skinny.MID_ROWS`` rows take ``skinny.swiglu``."""
        return self._mid_rows

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [R, vocab] (fp32) for the rows ``logit_rows`` of the flat batch (all if None).

        ``input_ids``, ``positions``: [T]. The backend has been planned for this batch.
        """
        if self._gemv is not None and input_ids.shape[0] == 1:
            return self._forward_gemv(input_ids, positions, backend, logit_rows)
        if self._skinny is not None and input_ids.shape[0] <= self._skinny.ENGINE_ROWS:
            return self._forward_skinny(input_ids, positions, backend, logit_rows)
        if self._gemm32 is not None:
            return self._forward_gemm32(input_ids, positions, backend, logit_rows)
        if self._fi is not None:
            return self._forward_flashinfer(input_ids, positions, backend, logit_rows)
        return self._forward_torch(input_ids, positions, backend, logit_rows)

    @property
    def _decoder_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.model.layers if isinstance(layer, DecoderLayer)]

    @property
    def _lm_weight(self) -> torch.Tensor:
        return self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._lm_weight).float()

    def _forward_torch(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        logit_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        cos, sin = self.rope_tables(positions)
        x = self.model.embed_tokens(input_ids)  # [T, H]
        for layer in self.model.layers:
            x = layer.forward(x, cos, sin, backend)
        if logit_rows is not None:
            x = x[logit_rows]
        return self._logits(self.model.norm.forward(x))

    def _forward_flashinfer(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        logit_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """The same forward with FlashInfer's fused kernels (see the module docstring)."""
        fi, eps = self._fi, self.config.rms_norm_eps
        layers = self._decoder_layers
        slots = self._slots(backend)
        residual = self.model.embed_tokens(input_ids)  # [T, H], updated in place below
        T = residual.shape[0]
        mid = self._mid_rows and T <= self._skinny.MID_ROWS
        h = fi.norm.rmsnorm(residual, layers[0].input_layernorm.weight, eps, enable_pdl=False)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
            mlp = layer.mlp
            assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
            qkv = F.linear(h, attn.qkv_weight, attn.qkv_bias).view(T, Hq + 2 * Hkv, D)
            # no PDL on this path: with FlashInfer's norms and SiLU and the Triton cascade
            # launched as programmatic dependents, the H200's tree step was 1-2% slower
            out = self._attend(attn, qkv, positions, backend, slots, pdl=False)  # [T, Hq, D]
            h = F.linear(out.reshape(T, Hq * D), attn.o_proj.weight, attn.o_proj.bias)
            # residual += h; h = post_attention_layernorm(residual)
            fi.norm.fused_add_rmsnorm(
                h, residual, layer.post_attention_layernorm.weight, eps, enable_pdl=False
            )
            if mid:  # one Triton kernel: the gate/up projection and the SiLU-and-mul
                act = self._skinny.swiglu(h, mlp.gate_up_weight, mlp.gate_up_bias)
            else:
                gate_up = F.linear(h, mlp.gate_up_weight, mlp.gate_up_bias)  # [T, 2I]
                act = fi.activation.silu_and_mul(gate_up, enable_pdl=False)  # [T, I]
            h = F.linear(act, mlp.down_proj.weight, mlp.down_proj.bias)
            if i + 1 < len(layers):
                fi.norm.fused_add_rmsnorm(
                    h, residual, layers[i + 1].input_layernorm.weight, eps, enable_pdl=False
                )
        x = residual + h
        if logit_rows is not None:
            x = x[logit_rows]
        x = fi.norm.rmsnorm(x.contiguous(), self.model.norm.weight, eps, enable_pdl=False)
        return self._logits(x)

    def _slots(self, backend: AttentionBackend) -> SlotBackend | None:
        """``backend`` if decode steps may write their K/V through the RoPE + append kernel
        into slots it names (checked once a forward, not a layer)."""
        return backend if self.rope_kv and isinstance(backend, SlotBackend) else None

    def _attend(
        self,
        attn: Attention,
        qkv: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        slots: SlotBackend | None,
        pdl: bool,
        tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """RoPE on q and k of a fused projection ``qkv`` [T, Hq + 2 Hkv, D], the step's K/V
        into the pages, attention: out [T, Hq, D]. A decode step whose backend names the
        slots (``SlotBackend.kv_slot``) runs the first two as one kernel (``rope_kv.py``);
        other steps take torch's RoPE from ``tables`` (cos, sin), else FlashInfer's, else
        (a float32 model: ``_rope_prompts``) ``rope_kv.rope_inplace``, and ``backend.run``.
        ``slots``: the backend when it may name slots (:meth:`_slots`)."""
        slot = None if slots is None else slots.kv_slot(attn.layer)
        if slots is not None and slot is not None:
            from dendrite.model.rope_kv import rope_append

            Hq, Hkv = attn.num_heads, attn.num_kv_heads
            q = rope_append(qkv, positions, self._cos_sin, *slot, Hq, Hkv, pdl=pdl)
            return slots.attend(attn.layer, q)
        if tables is not None:
            q, k, v = attn.split_rotated(qkv, *tables)
        elif self._fi is not None:
            q, k, v = attn.split_rotated_fused(qkv, positions, self._cos_sin, self._fi)
        else:  # in place, in one Triton kernel (fp32: FlashInfer's RoPE takes fp16/bf16 only)
            from dendrite.model.rope_kv import rope_inplace

            q, k, v = rope_inplace(qkv, positions, self._cos_sin, attn.num_heads, attn.num_kv_heads)
        return backend.run(attn.layer, q, k, v)

    def _forward_gemm32(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        logit_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """An fp32 model's forward of many rows: :meth:`_forward_skinny` with each GEMM
        on ``gemm32.py``'s 3xTF32 kernel (the SiLU-and-mul before it in torch)."""
        g = self._gemm32

        def mm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, **kw: Any) -> Any:
            return g.matmul(x, w, b, prologue=kw.get("prologue", "none"))

        return self._forward_skinny(input_ids, positions, backend, logit_rows, mm)

    def _forward_skinny(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        logit_rows: torch.Tensor | None,
        mm: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The forward of a few rows on ``skinny.py``'s kernels (``mm``: another GEMM with
        ``skinny.matmul``'s arguments)::

        h = norm1(r)                                   (first layer; r: the residual stream)
        qkv = W_qkv h;  RoPE, K/V append;  attention   (one kernel: rope_kv.py; see _attend)
        h = norm2(r += W_o attn)                       (add + RMSNorm: one kernel)
        h = next norm1(r += W_down silu(gate) * up),  gate | up = W_gu h   (SiLU fused)
        logits = W_lm h                                (the last norm is the model's)
        """
        if mm is None and self.dtype == torch.float32:
            return self._forward_skinny_fp32(input_ids, positions, backend, logit_rows)
        sk, eps, pdl = self._skinny, self.config.rms_norm_eps, self._skinny_pdl
        mm = mm or sk.matmul
        layers = self._decoder_layers
        r, h, slots, tables = self._skinny_start(input_ids, positions, backend, pdl)
        T = r.shape[0]
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
            assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
            qkv = mm(h, attn.qkv_weight, attn.qkv_bias, pdl=pdl).view(T, Hq + 2 * Hkv, D)
            out = self._attend(attn, qkv, positions, backend, slots, pdl, tables)
            o = mm(out.reshape(T, Hq * D), attn.o_proj.weight, attn.o_proj.bias, pdl=pdl)
            h = sk.add_norm(o, r, layer.post_attention_layernorm.weight, eps=eps, pdl=pdl)
            gate_up = mm(h, mlp.gate_up_weight, mlp.gate_up_bias, pdl=pdl)  # [T, 2I]
            down = mm(gate_up, mlp.down_proj.weight, mlp.down_proj.bias, prologue="silu", pdl=pdl)
            norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else self.model.norm
            h = sk.add_norm(down, r, norm.weight, eps=eps, pdl=pdl)
        if logit_rows is not None:
            if logit_rows.numel() == 0:  # the K/V are in; no logits
                return torch.empty(0, self.config.vocab_size, device=self.device)
            h = h[logit_rows]
        if h.shape[0] > sk.MAX_ROWS:  # an fp32 prompt's logits for every row
            return mm(h, self._lm_weight, None)
        return sk.matmul(h, self._lm_weight, out_dtype=torch.float32, pdl=pdl)

    def _skinny_start(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        pdl: bool,
    ) -> tuple[
        torch.Tensor, torch.Tensor, SlotBackend | None, tuple[torch.Tensor, torch.Tensor] | None
    ]:
        """What both skinny forwards begin with: the residual stream r [T, H] (updated in
        place), the first layer's norm of it h, the slot-naming backend (:meth:`_slots`) and
        torch's RoPE tables where no kernel rotates (neither FlashInfer's nor, for a float32
        model, ``rope_inplace``), else None."""
        r = self.model.embed_tokens(input_ids)
        norm1 = self._decoder_layers[0].input_layernorm.weight
        h = self._skinny.add_norm(None, r, norm1, eps=self.config.rms_norm_eps, pdl=pdl)
        rotate = self._fi is not None or self._rope_prompts
        return r, h, self._slots(backend), None if rotate else self.rope_tables(positions)

    def _forward_skinny_fp32(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        logit_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """:meth:`_forward_skinny` for a float32 model's few-row steps, each residual add and
        RMSNorm inside the GEMMs (``skinny.matmul_add`` / ``matmul_norm``): the output and
        down projections add into the residual stream and write its rows' sums of squares,
        the next projection normalises as it loads. Two kernels a layer fewer; only the
        first layer's norm is a kernel of its own::

            h = norm1(r)                        (first layer; later: inside W_qkv's load)
            r += W_o attention(rope(W_qkv h))   ->  sums of squares s
            r += W_down silu(gate) * up,  gate | up = W_gu (r / rms(s) * g2)
            logits = W_lm (r / rms(s) * g)
        """
        sk, eps = self._skinny, self.config.rms_norm_eps
        r, h, slots, tables = self._skinny_start(input_ids, positions, backend, False)
        T = r.shape[0]
        sumsq: torch.Tensor | None = None
        for layer in self._decoder_layers:
            attn, mlp = layer.self_attn, layer.mlp
            Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
            assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
            if sumsq is None:
                qkv = sk.matmul(h, attn.qkv_weight, attn.qkv_bias)
            else:
                norm = sk.NormIn(sumsq, layer.input_layernorm.weight, eps)
                qkv = sk.matmul_norm(r, norm, attn.qkv_weight, attn.qkv_bias)
            out = self._attend(
                attn, qkv.view(T, Hq + 2 * Hkv, D), positions, backend, slots, False, tables
            )
            sumsq = sk.matmul_add(out.reshape(T, Hq * D), attn.o_proj.weight, r, attn.o_proj.bias)
            norm = sk.NormIn(sumsq, layer.post_attention_layernorm.weight, eps)
            gate_up = sk.matmul_norm(r, norm, mlp.gate_up_weight, mlp.gate_up_bias)
            sumsq = sk.matmul_add(
                gate_up, mlp.down_proj.weight, r, mlp.down_proj.bias, prologue="silu"
            )
        assert sumsq is not None
        if logit_rows is not None:
            if logit_rows.numel() == 0:
                return torch.empty(0, self.config.vocab_size, device=self.device)
            r, sumsq = r[logit_rows], sumsq[:, logit_rows].contiguous()
        return sk.matmul_norm(r, sk.NormIn(sumsq, self.model.norm.weight, eps), self._lm_weight)

    def _forward_gemv(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        backend: AttentionBackend,
        logit_rows: torch.Tensor | None,
    ) -> torch.Tensor:
        """The forward of one row, 4 GEMV kernels a layer (``gemv.py``)::

        qkv = rope(W_qkv norm1(h + r)), K/V into the pages   (r <- h + r)     attention
        o = W_o attn              gate_up = W_gu norm2(o + r)   (r <- o + r)
        h = W_down silu(gate) * up                  logits = W_lm norm(h + r)

        The QKV kernel writes the step's K/V into the pages itself where the backend says
        where (``SlotBackend.kv_slot``); otherwise ``backend.run`` appends them.
        """
        g, eps, pdl = self._gemv, self.config.rms_norm_eps, self._pdl
        layers = self._decoder_layers
        r = self.model.embed_tokens(input_ids)  # [1, H]: the residual stream
        h: torch.Tensor | None = None
        slots = backend if isinstance(backend, SlotBackend) else None
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            Hq, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
            assert attn.qkv_weight is not None and mlp.gate_up_weight is not None
            target = slots.kv_slot(attn.layer) if slots is not None else None
            qkv, r_new = g.gemv(
                r if h is None else h, attn.qkv_weight, attn.qkv_bias, prologue="norm",
                residual=None if h is None else r, norm_weight=layer.input_layernorm.weight,
                eps=eps, pdl=pdl, rope=(positions, self._cos_sin, D, (Hq + Hkv) * D),
                kv=None if target is None else (*target, Hq * D),
            )  # fmt: skip
            r = r if r_new is None else r_new
            qkv = qkv.view(1, Hq + 2 * Hkv, D)  # q and k rotated
            q = qkv[:, :Hq]
            if target is not None and slots is not None:  # K/V written by the projection
                out = slots.attend(attn.layer, q)
            else:
                out = backend.run(attn.layer, q, qkv[:, Hq : Hq + Hkv], qkv[:, Hq + Hkv :])
            o, _ = g.gemv(
                out.reshape(1, Hq * D).contiguous(), attn.o_proj.weight, attn.o_proj.bias,
                pdl=pdl,
            )  # fmt: skip
            gate_up, r_new = g.gemv(
                o, mlp.gate_up_weight, mlp.gate_up_bias, prologue="norm", residual=r,
                norm_weight=layer.post_attention_layernorm.weight, eps=eps, pdl=pdl,
            )  # fmt: skip
            assert r_new is not None
            r = r_new
            h, _ = g.gemv(
                gate_up, mlp.down_proj.weight, mlp.down_proj.bias, prologue="silu", pdl=pdl
            )
        if logit_rows is not None and logit_rows.numel() == 0:  # the K/V are in; no logits
            return torch.empty(0, self.config.vocab_size, device=self.device)
        logits, _ = g.gemv(
            h, self._lm_weight, prologue="norm", residual=r, norm_weight=self.model.norm.weight, eps=eps,
            pdl=pdl, out_dtype=torch.float32,
        )  # fmt: skip
        return logits


class _NoAttention:
    """A stand-in backend for the fused-kernel smoke test: no KV; output q + v (per head), so
    RoPE on q shows in the logits."""

    name = "none"

    def __init__(self, config: ModelConfig) -> None:
        self.group = config.num_heads // config.num_kv_heads

    def plan(self, layout: object) -> None:  # pragma: no cover - never planned
        pass

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return q + v.repeat_interleave(self.group, dim=1)  # [T, Hq, D]


class _NoAttentionSlots(_NoAttention):
    """The same stand-in naming K/V slots (a ``SlotBackend``): row t's K/V go to page t of a
    scratch cache of one-slot pages, from which ``attend`` reads v back."""

    def __init__(
        self, config: ModelConfig, rows: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__(config)
        shape = (rows, 2, 1, config.num_kv_heads, config.head_dim)
        self.pages = torch.zeros(shape, dtype=dtype, device=device)
        self.page = torch.arange(rows, device=device)
        self.slot = torch.zeros(rows, dtype=torch.long, device=device)

    def kv_slot(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.pages, self.page, self.slot

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.run(layer, q, self.pages[:, 0, 0], self.pages[:, 1, 0])
