"""The Triton GEMV kernels of batch-1 decode (``dendrite/model/gemv.py``), the split-K GEMMs
of few-row steps (``dendrite/model/skinny.py``), the greedy pick (``dendrite/greedy.py``) and
the sampled pick (``dendrite/sampled_pick.py``), run on CPU through Triton's interpreter:
every prologue of both GEMV kernels against torch, the GEMMs and their add + RMSNorm against
torch, the greedy pick against argmax / log_softmax, the sampled pick against the torch
sampler, the cascade's merge, and whole decode steps of a random Llama and Qwen2 (QKV bias)
against the plain path, one row (GEMV) and 3 or 20 rows (GEMM). On the GPU the same
kernels are compiled; ``test_gpu.py`` checks them there against HF and torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # a test dependency (pip install -e '.[test]')

# bf16 rounding of the output (2^-8 of the largest value, fp32 accumulation) and of the fused
# prologue's result, which Triton's interpreter rounds toward zero (compiled: to nearest)
TOL = 2e-2


@pytest.fixture(scope="module")
def measured() -> dict[str, float]:
    script = Path(__file__).with_name("gemv_interpreted.py")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_prologue_matches_torch(measured: dict[str, float]) -> None:
    for part in ("none", "bias", "norm", "norm_residual", "norm_no_residual", "silu"):
        assert measured[part] < TOL, (part, measured[part])
    assert measured["none_r"] == 0.0  # only the norm prologue returns a residual
    assert measured["residual_read_only"] == 1.0  # the sum goes to a new tensor


def test_fp32_output_holds_the_rounded_values(measured: dict[str, float]) -> None:
    """The LM head writes fp32 logits itself: the values a bf16 GEMM gives, no cast kernel."""
    assert measured["fp32_out_dtype"] == 1.0
    assert measured["fp32_out_equal"] == 1.0


@pytest.mark.parametrize("vocab", ["big", "small"])
def test_greedy_pick_matches_argmax_and_log_softmax(measured: dict[str, float], vocab: str) -> None:
    """One kernel for a greedy step: the first argmax (ties, a masked chunk, the last token)
    and its log-prob, packed as the host copy wants them."""
    assert measured[f"greedy_{vocab}_tokens"] == 1.0
    assert measured[f"greedy_{vocab}_packed_tokens"] == 1.0
    assert measured[f"greedy_{vocab}_logp"] < 1e-5
    assert measured["greedy_tie_index"] == 10.0  # the first of three tied maxima


def test_sampled_pick_draws_what_the_torch_path_draws(measured: dict[str, float]) -> None:
    """Two kernels for a sampled step (chunk parts and a bound on the k-th key, then the keys
    past it ranked and Gumbel-max with the log-prob):
    every row kind in one batch, ties across the top-k boundary, the same token as torch."""
    assert measured["sampled_draws"] == 40
    assert measured["sampled_same"] == measured["sampled_draws"]
    assert measured["sampled_logp"] < 1e-5
    assert measured["sampled_distinct_top5"] > 1
    assert measured["sampled_fallback_same"] == 1.0  # top-p: the torch path
    assert measured["sampled_fallback_calls"] == 0
    assert measured["sampled_plain_same"] == 9  # no top-k: the kernels, the same tokens
    assert measured["sampled_plain_calls"] == 3
    # more keys past the bound than the packed row holds: ranked chunk by chunk, same draw
    assert measured["sampled_comb_min_passed"] > 16
    assert measured["sampled_comb_same"] == measured["sampled_draws"] / 4
    assert measured["sampled_setcap_same"] == measured["sampled_draws"] / 4


def test_cascade_merge_kernel_matches_the_log_sum_exp_formula(measured: dict[str, float]) -> None:
    """``attention/merge.py``: a cascade's two levels merged in place, rows masked out kept."""
    assert measured["merge_err"] < TOL
    assert measured["merge_masked_untouched"] == 1.0
    assert measured["merge_half_level0_refused"] == 1.0
    assert measured["merge_depth_mismatch_refused"] == 1.0


def test_triton_cascade_matches_attention_over_both_levels(measured: dict[str, float]) -> None:
    """``attention/shared_prefix.py``: split states of two groups' shared pages and of each
    row's own pages, merged, equal one attention over shared + own keys; a row without level
    0 attends to its own keys only; an empty split weighs 0."""
    assert measured["prefix_err"] < TOL
    assert measured["prefix_lse_err"] < 1e-4  # the splits' log-sum-exp is the prefix's
    assert measured["prefix_empty_split_lse"] == float("-inf")
    assert measured["prefix_one_launch_same"] == 1.0  # both levels in one grid: same states


def test_split_decode_matches_attention_over_each_row(measured: dict[str, float]) -> None:
    """``attention/split_decode.py``: one launch splits each row's pages by its length, the
    split that finishes last merges the states; an empty split weighs 0; the counts it
    merges by are back at zero for the next launch, which gives the same output."""
    assert measured["split_decode_err"] < TOL
    assert measured["split_decode_counts_zero"] == 1.0
    assert measured["split_decode_again"] == 1.0


def test_triton_cascade_by_depth_matches_attention_over_the_page_list(
    measured: dict[str, float],
) -> None:
    """Levels by depth: a root prefix, two nested subtrees and a sub-subtree split over three
    shared levels (4 groups, one launch, a mask per depth), and as a two-level cascade, both
    equal one attention over each row's pages; the deeper split saves more page reads."""
    assert measured["depths3_err"] < TOL
    assert measured["depths1_err"] < TOL
    assert (measured["depths3_levels"], measured["depths3_groups"]) == (3, 4)
    assert (measured["depths1_levels"], measured["depths1_groups"]) == (1, 1)
    # root 3 pages x 7 extra readers; x 2 x 3, y 3 x 1, x2 1 x 1
    assert measured["depths1_saved"] == 21
    assert measured["depths3_saved"] == 21 + 6 + 3 + 1


def test_triton_cascade_reads_fp32_at_fp32_precision(measured: dict[str, float]) -> None:
    """The float32 mode's decode attention: both levels, and a plain step (level 1 alone),
    over an fp32 pool, against one fp32 attention to fp32 rounding; its products asked for at
    3xTF32 (``tl.dot`` alone would take TF32, ~1e-3: the interpreter computes fp32 either
    way, so the launches' precision is checked, and the GPU test checks the numbers)."""
    assert measured["prefix_fp32_err"] < 1e-5
    assert measured["prefix_fp32_plain_err"] < 1e-5
    assert measured["prefix_fp32_dtype"] == 1.0
    assert measured["prefix_fp32_block_n"] == 1.0  # K and V blocks of 64 KiB at 4 bytes
    assert measured["prefix_fp32_tf32x3"] == 1.0  # 3xTF32 for fp32 pages, the default for bf16


def test_fused_rope_rotates_q_and_k_rows_only(measured: dict[str, float]) -> None:
    assert measured["rope"] < TOL
    assert measured["rope_v_rows"] < TOL


def test_qkv_kernel_writes_k_and_v_into_their_slot_only(measured: dict[str, float]) -> None:
    """The fused KV append: the (rotated) K rows and the V rows land bit for bit in the one
    slot named, the output is unchanged, every other slot of the cache is untouched."""
    assert measured["kv_same_output"] == 1.0
    assert measured["kv_k"] == 1.0 and measured["kv_v"] == 1.0
    assert measured["kv_rest_untouched"] == 1.0


def test_rope_append_rotates_and_writes_each_rows_slot(measured: dict[str, float]) -> None:
    """``model/rope_kv.py``: a decode step's RoPE and KV append in one kernel."""
    assert measured["rope_kv_q_is_view"] == 1.0  # q rotated in place
    assert measured["rope_kv_q"] < TOL
    assert measured["rope_kv_k"] < TOL
    assert measured["rope_kv_v"] == 1.0  # v bit for bit
    assert measured["rope_kv_unrotated_rest"] == 1.0  # k and v stay as projected in qkv
    assert measured["rope_kv_rest_untouched"] == 1.0
    # rope_inplace, a float32 prompt's RoPE: q and k in place, v as projected
    assert measured["rope_inplace_views"] == 1.0
    assert measured["rope_inplace_qk"] < 1e-5
    assert measured["rope_inplace_v"] == 1.0
    assert measured["rope_inplace_refused"] == 1.0
    assert measured["rope_kv_refused"] == 6  # bad shapes: ValueError, nothing written


def test_mid_row_steps_take_the_fused_kernels_with_the_same_logits(
    measured: dict[str, float],
) -> None:
    """A 20-row decode step on the fused forward takes ``swiglu`` once a layer (2 layers) and
    gives the logits and K/V of the same forward without it."""
    assert measured["mid/on"] == 1.0
    assert measured["mid/swiglu_calls"] == 2
    assert measured["mid/logits"] < TOL
    assert measured["mid/pages"] < TOL


def test_rope_append_is_not_used_where_it_cannot_serve(measured: dict[str, float]) -> None:
    """Head dim 24 (not a power of two): off from the start, decode steps of 3 rows still
    match the plain path; a kernel failing the enable-time check: switched off, warned, the
    skinny GEMMs stay on."""
    assert measured["guard/hd24_rope_kv"] == 0.0 and measured["guard/hd24_skinny"] == 1.0
    assert measured["guard/hd24_logits"] < 2e-2
    assert measured["guard/hd16_rope_kv_before"] == 1.0
    assert measured["guard/broken_skinny"] == 1.0
    assert measured["guard/broken_rope_kv"] == 0.0 and measured["guard/broken_warned"] == 1.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decode_steps_match_the_plain_path(measured: dict[str, float], family: str) -> None:
    assert measured[f"{family}/same_tokens"] == 8
    assert measured[f"{family}/logits"] < 2e-2
    assert measured[f"{family}/logprob"] < 2e-2  # the greedy pick's, against log_softmax's
    # 4 GEMVs a layer and the LM head: every projection of a one-row step went through them
    assert measured[f"{family}/gemv_calls_per_step"] == 4 * measured[f"{family}/layers"] + 1
    # the torch backend names the KV slot: each layer's QKV kernel did the append itself
    assert measured[f"{family}/kv_appends_per_step"] == measured[f"{family}/layers"]


def test_skinny_gemm_matches_torch(measured: dict[str, float]) -> None:
    """``model/skinny.py``: 1-64 rows, 1-8 K slices (one cut short) added up by the last
    slice to arrive, bias, a strided x, SiLU fused, fp32 logits."""
    for m in (1, 5, 20, 64):
        assert measured[f"skinny_rows_{m}"] < TOL, (m, measured[f"skinny_rows_{m}"])
    assert measured["skinny_counters_zero"] == 1.0  # every block's last slice reset its own
    assert measured["skinny_split_vs_whole"] < TOL
    assert measured["skinny_strided"] < TOL
    assert measured["skinny_silu"] < TOL
    assert measured["skinny_fp32_equal"] == 1.0  # fp32 logits hold the bf16-rounded values
    assert measured["swiglu"] < TOL  # gate/up + SiLU-and-mul in one kernel, 1-64 rows
    assert measured["swiglu_no_bias"] < TOL
    assert measured["swiglu_fp32"] < 1e-5  # the halves, the bias and the rows in the right place


def test_fused_norms_add_in_place_and_normalise_as_they_load(measured: dict[str, float]) -> None:
    """fp32: ``matmul_add`` (r += x W^T, SiLU prologue too, 1 or 3 K slices) returns the new
    rows' sums of squares by feature block; ``matmul_norm`` equals RMSNorm then the GEMM
    from partials of 32 or 64 features; the pair equals add_norm between two GEMMs."""
    assert measured["add_shape_64"] == measured["add_shape_32"] == 1.0
    for key in ("add_residual", "add_sumsq", "add_silu", "norm_prologue", "fused_vs_add_norm"):
        assert measured[key] < 1e-5, (key, measured[key])
    assert measured["fused_residual_equal"] == 1.0


def test_skinny_add_norm_updates_the_residual_and_normalises(measured: dict[str, float]) -> None:
    assert measured["add_norm_residual"] < TOL  # r += y, in place
    assert measured["add_norm"] < TOL
    assert measured["norm"] < TOL
    assert measured["norm_keeps_residual"] == 1.0


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_skinny_decode_steps_match_the_plain_path(measured: dict[str, float], family: str) -> None:
    """3 and 12 rows a step, teacher-forced with the plain path's tokens: bf16 noise apart,
    the same logits. Every projection of a step of 2-16 rows goes through the skinny GEMM (4
    a layer and the LM head), a two-prompt step of 11 tokens too; a 17-row step and a
    240-token prompt stay on the other path."""
    key = f"skinny/{family}"
    assert measured[f"{key}/logits"] < 2e-2
    assert measured[f"{key}/same_frac"] >= 0.95  # argmax: near-ties may flip in bf16
    assert measured[f"{key}/calls_per_forward"] == 4 * measured[f"{key}/layers"] + 1
    assert measured[f"{key}/add_norms_per_forward"] == 2 * measured[f"{key}/layers"] + 1
    assert measured[f"{key}/fused_norm_calls"] == 0  # bf16 rounds as FlashInfer's add-norm
    # decode steps: RoPE and the KV append in one kernel a layer, into the named slots
    assert measured[f"{key}/rope_appends_per_forward"] == measured[f"{key}/layers"]
    assert measured[f"{key}/short_prompts_calls"] == 4 * measured[f"{key}/layers"] + 1
    assert measured[f"{key}/rows_17_calls"] == 0
    assert measured[f"{key}/prompt_240_calls"] == 0
    assert (
        measured[f"{key}/rows_17_gemm32_calls"] == measured[f"{key}/prompt_240_gemm32_calls"] == 0
    )
    assert measured[f"{key}/launches"] == 8 * measured[f"{key}/calls_per_forward"]
    assert measured[f"{key}/prec_default"] == 1.0  # bf16 operands: tl.dot's own precision
    # prompts keep torch's RoPE in bf16 (no FlashInfer here): the in-place kernel is fp32's
    assert measured[f"{key}/rope_prompts"] == 0.0
    for label in ("prompt_240", "short_prompts", "rows_17"):
        assert measured[f"{key}/{label}_rope_inplace"] == 0


def test_fp32_steps_take_the_3xtf32_kernels_and_match_the_plain_path(
    measured: dict[str, float],
) -> None:
    """A float32 model: steps of 3 and 12 rows on the skinny GEMMs, a 17-row step and a
    240-token prompt on ``gemm32`` (their LM head, one row a branch, on the skinny GEMM),
    all within fp32 rounding of the plain fp32 path. The interpreter computes the products in
    fp32 whatever the precision asked for, so each skinny launch is checked to ask for 3xTF32
    (TF32 alone would be ~1e-3 off; its compiled form is checked in
    ``test_triton_compile.py``; gemm32's precision is fixed in its kernel)."""
    key = "skinny/llama-fp32"
    layers = measured[f"{key}/layers"]
    assert measured[f"{key}/launches"] == 8 * measured[f"{key}/calls_per_forward"]
    assert measured[f"{key}/prec_tf32x3"] == 1.0
    assert measured[f"{key}/logits"] < 1e-5
    assert measured[f"{key}/same_frac"] == 1.0
    assert measured[f"{key}/calls_per_forward"] == 4 * layers + 1
    # the residual adds and RMSNorms inside the GEMMs: only the first layer's norm is a kernel
    assert measured[f"{key}/add_norms_per_forward"] == 1
    assert measured[f"{key}/fused_norm_calls"] == 4 * layers  # 2 adds and 2 norms a layer
    assert measured[f"{key}/rope_appends_per_forward"] == layers
    assert measured[f"{key}/short_prompts_calls"] == 4 * layers + 1
    assert measured[f"{key}/short_prompts_gemm32_calls"] == 0
    for label in ("rows_17", "prompt_240"):
        assert measured[f"{key}/{label}_calls"] == 1  # the LM head
        assert measured[f"{key}/{label}_gemm32_calls"] == 4 * layers
    # steps of several tokens a row rotate q and k in place in one Triton kernel a layer;
    # one-token rows (decode-like) write their K/V through the RoPE + append kernel
    assert measured[f"{key}/rope_prompts"] == 1.0
    assert measured[f"{key}/prompt_240_rope_inplace"] == layers
    assert measured[f"{key}/short_prompts_rope_inplace"] == layers
    assert measured[f"{key}/rows_17_rope_inplace"] == 0
