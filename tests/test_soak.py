"""The soak benchmark, short: a random mix of engine operations with the prefix cache on.

``dendrite.bench.soak.run`` checks integrity every ``check_every`` operations, frees
everything, clears the cache and counts the pages left. A short run must evict (the pool
is small), reuse cached prefixes, and end with no integrity failure and no leaked page.
"""

from __future__ import annotations

import json

import pytest

from dendrite.bench.soak import run


@pytest.mark.parametrize(("seed", "check_every"), [(0, 1), (1, 50), (2, 50)])
def test_short_soak_is_clean(
    seed: int, check_every: int, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(ops=1500, seed=seed, check_every=check_every)
    assert out["integrity_failures"] == 0
    assert out["leaked_pages"] == 0
    assert out["evictions"] > 0 and out["prefix_hit_tokens"] > 0
    assert out["peak_pages"] <= 96
    assert set(out) == {
        "ops", "ops_per_s", "peak_pages", "evictions", "prefix_hit_tokens",
        "integrity_failures", "leaked_pages",
    }  # fmt: skip
    json.dumps(out)  # the CLI's last line
    table = capsys.readouterr().out
    assert "prefix hit tokens" in table and "kv check " in table  # logits were compared
