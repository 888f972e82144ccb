"""``DecodeGraphs``' cascade path on CPU (run by ``test_graphs_simulated.py`` in a subprocess).

The graph machinery's host side (the static buffer's regions, the graph keys, the level-0
cache, the capture's placeholder split, the truncation of splits a graph cannot hold) runs
here for real; what a CPU lacks is stood in for: flashinfer is an empty module (the backend
is the float32 mode's, which uses none of it), CUDA streams and events do nothing, and a
"captured graph" replays its forward eagerly against the same static buffers, so a replay
sees exactly what the host wrote there for that step. The attention is the real Triton
cascade kernels in Triton's interpreter, over one fp32 layer. Every step's output is
compared with plain attention over each row's whole page list; states no tile writes are
filled with NaN, so a merge that read one would show. Prints one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import types
from typing import Any

os.environ["TRITON_INTERPRET"] = "1"
import torch

sys.modules["flashinfer"] = types.ModuleType("flashinfer")  # the float32 mode uses none of it
for _name in ("BatchPrefillWithPagedKVCacheWrapper", "BatchDecodeWithPagedKVCacheWrapper"):
    setattr(sys.modules["flashinfer"], _name, None)


class _Event:
    def record(self) -> None: ...

    def synchronize(self) -> None: ...


class _Stream:
    def wait_stream(self, _: Any) -> None: ...


_CAPTURED: dict[str, Any] = {}


class _Graph:
    """Replays the captured forward eagerly into the captured output."""

    fn: Any = None

    def replay(self) -> None:
        with torch.inference_mode():
            self.fn()


@contextlib.contextmanager
def _capture(graph: _Graph, pool: Any = None) -> Any:
    yield
    forward, out = _CAPTURED["forward"], _CAPTURED["out"]
    graph.fn = lambda: out.copy_(forward())


torch.cuda.Event = _Event  # type: ignore[assignment,misc]
torch.cuda.Stream = lambda: _Stream()  # type: ignore[assignment,misc]
torch.cuda.stream = lambda _s: contextlib.nullcontext()  # type: ignore[assignment]
torch.cuda.current_stream = lambda: _Stream()  # type: ignore[assignment]
torch.cuda.graph_pool_handle = lambda: None  # type: ignore[assignment]
torch.cuda.CUDAGraph = _Graph  # type: ignore[assignment,misc]
torch.cuda.graph = _capture  # type: ignore[assignment]
_zeros, _empty = torch.zeros, torch.empty
torch.zeros = lambda *a, pin_memory=False, **k: _zeros(*a, **k)  # type: ignore[assignment]


def _nan_empty(*a: Any, **k: Any) -> torch.Tensor:
    t = _empty(*a, **k)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


torch.empty = _nan_empty  # type: ignore[assignment]

from dendrite import cuda_graphs as cg  # noqa: E402
from dendrite.attention import shared_prefix as sp  # noqa: E402
from dendrite.attention.cascade import split_shared_prefixes  # noqa: E402

P, D, HKV, HQ = 4, 16, 2, 8


class Pool:
    page_size = P

    def __init__(self, pages: int) -> None:
        self.scratch_page = pages
        self.kv = [torch.randn(pages + 1, 2, P, HKV, D, generator=torch.Generator().manual_seed(0))]

    def flush_copies(self) -> None: ...


class Backend:
    """The float32 mode's backend as ``DecodeGraphs`` sees it: thresholds at 1."""

    num_heads, num_kv_heads, head_dim = HQ, HKV, D
    window_left, dtype, float32 = -1, torch.float32, True
    prefix_kernel, workspace, min_saved_pages = "triton", None, 1
    cascade, max_depth, min_group_pages = True, 4, 1

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.kernels = sp.CascadeKernels(HQ, HKV, sm_count=4, head_dim=D, itemsize=4)
        self.kernels.block_m0 = 16  # 2 rows a tile: groups over several tiles
        self.kernels.rows0 = sp.rows_per_tile(HQ, HKV, 16)

    def cascade_split(self, lists: list[list[int]]) -> Any:
        return split_shared_prefixes(lists, 1, 1, max_depth=4)


class Model:
    """One attention layer: the logits are the attention output of the step's queries."""

    device = torch.device("cpu")
    q = torch.empty(0)

    class config:
        max_position_embeddings = 4096

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, attn: Any, _: Any) -> torch.Tensor:
        def forward() -> torch.Tensor:
            T = ids.shape[0]
            return attn.attend(0, Model.q[:T]).reshape(T, -1).clone()

        _CAPTURED["forward"] = forward
        _CAPTURED["out"] = forward()
        return _CAPTURED["out"]


def plain(pool: Pool, lists: list[list[int]], lens: list[int], q: torch.Tensor) -> torch.Tensor:
    kv, out = pool.kv[0], []
    for b, (pages, n) in enumerate(zip(lists, lens, strict=True)):
        keys = torch.cat([kv[p] for p in pages], dim=1)[:, :n]
        k = keys[0].repeat_interleave(HQ // HKV, 1)
        v = keys[1].repeat_interleave(HQ // HKV, 1)
        s = torch.einsum("hd,nhd->hn", q[b], k) / D**0.5
        out.append(torch.einsum("hn,nhd->hd", s.softmax(-1), v))
    return torch.stack(out)


def main() -> None:
    torch.manual_seed(0)
    pool = Pool(700)
    graphs = cg.DecodeGraphs(Model(), Backend(pool), buckets=(2, 4, 8, 16))  # type: ignore[arg-type]
    report: dict[str, Any] = {"steps": [], "searches": 0}
    search = graphs._split

    def counted(lists: list[list[int]]) -> Any:
        report["searches"] += 1
        return search(lists)

    graphs._split = counted  # type: ignore[method-assign]

    def step(lists: list[list[int]], lens: list[int], tag: str) -> None:
        B = len(lists)
        Model.q = torch.randn(16, HQ, D)
        split = search(lists)
        before = graphs.cascade_steps
        got = graphs.forward([0] * B, lens, lists).reshape(B, HQ, D)
        diff = (got - plain(pool, lists, lens, Model.q)).abs()
        err = float(torch.nan_to_num(diff, nan=float("inf")).max())  # a NaN read shows
        report["steps"].append({
            "tag": tag, "rows": B, "err": err, "cascade": graphs.cascade_steps > before,
            "depths": None if split is None else split.depths,
            "groups": None if split is None else len(split.groups),
        })  # fmt: skip

    root, x, y, x2 = [1, 2, 3], [4, 5], [6, 7, 8], [9]
    a = [[*root, *x, *x2, 20], [*root, *x, *x2, 21, 22], [*root, *x, 23], [*root, *y, 24],
         [*root, *y, 25], [*root, 26], [*root, 27, 28]]  # fmt: skip
    lens_a = [(len(p) - 1) * P + 1 + i % P for i, p in enumerate(a)]
    step(a, lens_a, "nested, 7 rows in bucket 8")
    step(a, lens_a, "the same again (level 0 in place)")
    # equal lists in new objects, one token further in each last page that has room: the
    # split and the page table are kept, the positions and lengths rewritten
    nxt_a = [n + 1 if n % P else n for n in lens_a]  # a full last page stays as it was
    step([list(p) for p in a], nxt_a, "equal lists, new objects, next token")
    b = [[*root, *y, 30], [*root, *y, 31], [*root, *x, 32], [*root, *x, 33, 34]]
    lens_b = [(len(p) - 1) * P + 2 for p in b]
    step(b, lens_b, "another tree, 4 rows")
    step(a, lens_a, "back to the first (its graph exists)")
    step(b[:3], lens_b[:3], "3 rows in bucket 4")
    c: list[list[int]] = []
    for g in range(4):
        base = [40 + 10 * g, 41 + 10 * g]
        c += [[*base, 42 + 10 * g, 100 + 3 * g + j] for j in range(2)] + [[*base, 150 + g]]
    lens_c = [(len(p) - 1) * P + 3 for p in c]
    step(c, lens_c, "4 depth-0 groups with nested ones, 12 rows in bucket 16")
    step([[60 + i, 70 + i] for i in range(3)], [5, 6, 7], "plain")
    step(c, lens_c, "after a plain step")
    long = list(range(200, 470))  # 270 pages in 2 splits: 540 keys a split, 128-key blocks
    rows = [[*long, 480, 481, 600], [*long, 480, 481, 601], [*long, 602], [*long, 603, 604]]
    step(rows, [(len(p) - 1) * P + 2 for p in rows], "long splits")
    # more groups than a graph holds: its first depths that fit
    cg.MAX_GROUPS = 4
    d = []
    for i in range(2):
        for j in range(2):
            d += [[1, 2, 300 + 10 * i, 301 + 10 * i, 320 + 10 * i + j, 500 + 4 * (2 * i + j) + k]
                  for k in range(2)]  # fmt: skip
    full = split_shared_prefixes(d, max_depth=4)
    report["truncation"] = {"full_groups": len(full.groups), "full_depths": full.depths}
    step(d, [(len(p) - 1) * P + 1 for p in d], "7 groups over 3 depths, graphs hold 4")
    cg.MAX_GROUPS = 16
    rng = random.Random(1)
    nxt = [1]

    def new(n: int) -> list[int]:
        out = list(range(nxt[0], nxt[0] + n))
        nxt[0] += n
        return out

    def tree(depth: int, left: list[int]) -> list[list[int]]:
        seg, rows = new(rng.randint(0 if depth else 1, 3)), []
        for _ in range(rng.randint(1, 3) if depth < 4 else 1):
            if left[0] <= 0:
                break
            if depth < 4 and rng.random() < 0.5:
                rows += [seg + r for r in tree(depth + 1, left)]
            else:
                left[0] -= 1
                rows.append(seg + new(rng.randint(1, 3)))
        return rows

    for it in range(20):
        nxt[0] = 1
        lists: list[list[int]] = []
        while len(lists) < 2:
            lists = tree(0, [rng.randint(2, 16)])[:16]
        if rng.random() < 0.3:
            rng.shuffle(lists)
        step(lists, [(len(p) - 1) * P + rng.randint(1, P) for p in lists], f"random {it}")
    report["graphs"] = [[bucket, *shape] for bucket, shape in graphs._cascades]
    report["cascade_shapes"] = [[*k, n] for k, n in graphs.cascade_shapes.items()]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
