"""The command line, run as a user runs it (a subprocess), on real checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def dendrite(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dendrite", *args], capture_output=True, text=True, timeout=300
    )


def test_generate_json_reproduces_stories(stories: Path, stories_expected: list[int]) -> None:
    r = dendrite(
        "generate", "--model", str(stories), "--prompt-ids", "1", "--max-new-tokens", "60", "--json"
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt_ids"] == [1]
    assert out["output_ids"] == stories_expected[:60]
    assert out["text"].startswith("Once upon a time")


def test_empty_prompt_is_bos_only(stories: Path) -> None:
    a = dendrite(
        "generate", "--model", str(stories), "--prompt", "", "--max-new-tokens", "8", "--json"
    )
    b = dendrite(
        "generate", "--model", str(stories), "--prompt-ids", "1", "--max-new-tokens", "8", "--json"
    )
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert json.loads(a.stdout) == json.loads(b.stdout)


def test_model_without_tokenizer(tiny_checkpoint: Path) -> None:
    ok = dendrite(
        "generate",
        "--model",
        str(tiny_checkpoint),
        "--prompt-ids",
        "1,5,9",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    out = json.loads(ok.stdout)
    assert out["prompt_ids"] == [1, 5, 9] and len(out["output_ids"]) <= 5 and out["text"] is None
    bad = dendrite("generate", "--model", str(tiny_checkpoint), "--prompt", "hello")
    assert bad.returncode == 2 and "no tokenizer" in bad.stderr


def test_bad_model_path_is_a_clear_error(tmp_path: Path) -> None:
    r = dendrite("generate", "--model", str(tmp_path / "missing"), "--prompt-ids", "1")
    assert r.returncode == 2 and "does not exist" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA error path")
@pytest.mark.parametrize("part", ["cascade", "depth"])
def test_gpu_bench_parts_without_cuda_are_a_clear_error(part: str) -> None:
    r = dendrite("bench", "gpu", "--part", part)
    assert r.returncode == 2 and f"bench gpu ({part}) needs a CUDA device" in r.stderr
    assert r.stdout == ""


def test_bench_fork_json_shape() -> None:
    r = dendrite("bench", "fork", "--forks", "300", "--json")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1  # --json: the table went to stderr
    out = json.loads(lines[0])
    assert list(out["fork_us"]) == ["16", "256", "4096", "32768", "131072"]
    assert list(out["fork_depth_us"]) == ["1", "10", "100", "1000"]
    assert list(out["copy_us"]) == list(out["fork_us"])
    assert all(v > 0 for v in out["fork_us"].values())
    assert "fork_us" in r.stderr  # the table
