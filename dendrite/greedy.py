"""The greedy pick of a decode step in one kernel: argmax, its log-prob, and the host copy's
layout.

A greedy step needs, per row of logits [B, V] (fp32), the first index of the maximum and that
token's ``log_softmax``. In torch that is ``log_softmax``, ``argmax``, ``gather``, two casts
and a ``stack`` for the one device-to-host copy: six kernels, each a launch and a pass over
the row, about 30 us of a 1 ms batch-1 step on the H200. This Triton kernel gives each row
one program that streams the row once in chunks, keeping a running maximum, the first index
where it occurs, and the sum of ``exp(x - max)`` rescaled as the maximum grows (the online
log-sum-exp)::

    token = first argmax x          logp = x[token] - (max + log sum exp(x - max))

and writes the token (int64, the next step's input on the device) and the pair (token,
logp) as float64 [2, B], the layout the engine copies to the host. The sum runs in a
different order from torch's, so logp differs from ``log_softmax`` by fp32 rounding only;
the token is the same (ties go to the first index, as ``torch.argmax``).

Imported only on CUDA (Triton ships with torch there) or in Triton's CPU interpreter (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# logits a program holds at a time: on the H200, 7.0 us a step for 1 to 64 rows of 32,000
# (4,096: 8.6-9.0 us; 2,048: 13-14 us; torch's ops in a CUDA graph: 16-18 us)
CHUNK = 8192


@triton.jit
def _online_step(x, start, m, s, arg):
    """One chunk ``x`` (starting at ``start``) into the running maximum ``m``, the sum ``s``
    of ``exp(x - m)`` and the first index ``arg`` of the maximum."""
    cmax = tl.max(x, axis=0)
    carg = tl.argmax(x, axis=0, tie_break_left=True) + start
    arg = tl.where(cmax > m, carg, arg)  # strictly greater: an earlier tie stays
    new_m = tl.maximum(m, cmax)
    scale = tl.where(new_m > -float("inf"), tl.exp(m - new_m), 1.0)
    s = s * scale + tl.sum(tl.where(x > -float("inf"), tl.exp(x - new_m), 0.0), axis=0)
    return new_m, s, arg


@triton.jit
def _greedy_kernel(LOGITS, TOK, PACKED, B, V, stride, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNK)
    base = LOGITS + row.to(tl.int64) * stride
    m = -float("inf")  # running maximum
    s = 0.0  # sum of exp(x - m)
    arg = tl.full((), 0, tl.int32)  # first index of the maximum
    for start in range(0, V, CHUNK):
        x = tl.load(base + start + offs, mask=start + offs < V, other=-float("inf"))
        m, s, arg = _online_step(x, start, m, s, arg)
    logp = -tl.log(s)  # x[token] == m: x[token] - (m + log s)
    tl.store(TOK + row, arg.to(tl.int64))
    tl.store(PACKED + row, arg.to(tl.float64))
    tl.store(PACKED + B + row, logp.to(tl.float64))


def greedy_pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [B] (int64) and (tokens, log-probs) as float64 [2, B] for rows of ``logits``
    [B, V] (fp32, rows contiguous)."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(
            f"greedy_pick wants fp32 logits [B, V] with contiguous rows, got "
            f"{logits.dtype} {tuple(logits.shape)}"
        )
    B, V = logits.shape
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    packed = torch.empty(2, B, dtype=torch.float64, device=logits.device)
    if B:
        _greedy_kernel[(B,)](
            logits, tokens, packed, B, V, logits.stride(0), CHUNK=CHUNK, num_warps=8
        )
    return tokens, packed
