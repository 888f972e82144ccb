"""``DecodeGraphs``' cascade path on CPU, through ``graphs_simulated.py`` (a subprocess: it
stands in for CUDA's graph API and imports a stub flashinfer, which must not leak into the
other tests). The GPU tests run the same path on the H200; here CI runs its host side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")  # a test dependency (pip install -e '.[test]')


@pytest.fixture(scope="module")
def report() -> dict:
    script = Path(__file__).with_name("graphs_simulated.py")
    proc = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_replay_equals_plain_attention(report: dict) -> None:
    """Nested trees (up to 4 depths), padded buckets, several depth-0 groups, the level-0
    buffers reused and refilled, plain steps between, and 20 random trees: each replayed
    step's output equals plain attention over the rows' page lists (fp32; a read of a state
    no tile wrote would be NaN)."""
    steps = report["steps"]
    assert len(steps) == 31
    bad = [(s["tag"], s["err"]) for s in steps if not s["err"] < 1e-5]
    assert not bad, bad
    assert [s["cascade"] for s in steps].count(False) == 1  # only the plain step
    assert max(s["depths"] or 0 for s in steps) == 4


def test_graphs_are_keyed_by_what_they_capture(report: dict) -> None:
    """A graph per (bucket, splits, groups rounded up, depths, keys a block): the long
    splits' step gets a 128-key graph, steps of one shape share theirs."""
    graphs = {tuple(g) for g in report["graphs"]}
    assert len(graphs) == len(report["graphs"])
    assert any(g[-1] == 128 for g in graphs) and any(g[-1] == 64 for g in graphs)
    assert all(g[3] & (g[3] - 1) == 0 for g in graphs)  # groups: a power of two
    replays = sum(n for *_, n in report["cascade_shapes"])
    assert replays == sum(s["cascade"] for s in report["steps"]) > len(graphs)


def test_a_split_too_big_for_a_graph_keeps_its_first_depths(report: dict) -> None:
    """7 groups over 3 depths where graphs hold 4: replayed with depths 0 and 1 (3 groups),
    still equal to plain attention."""
    assert report["truncation"] == {"full_groups": 7, "full_depths": 3}
    (step,) = [s for s in report["steps"] if s["tag"].startswith("7 groups")]
    assert (step["depths"], step["groups"], step["cascade"]) == (2, 3, True)
    assert step["err"] < 1e-5


def test_a_step_with_the_last_steps_page_lists_skips_the_split_search(report: dict) -> None:
    """The split of a step is remembered with its page lists: the two steps that repeat the
    one before (the same lists, then equal lists in new objects) search no split; every
    other step does, and all replay right (above)."""
    steps = report["steps"]
    assert steps[1]["tag"].startswith("the same again") and steps[2]["tag"].startswith("equal")
    assert report["searches"] == len(steps) - 2
