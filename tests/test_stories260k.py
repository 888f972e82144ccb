"""The really trained reference: llama2.c's stories260K must decode its published 200 tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from dendrite.engine import Engine
from dendrite.sampling import SamplingParams

GREEDY_200 = SamplingParams(max_new_tokens=200, ignore_eos=True)


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_greedy_200_from_bos(stories: Path, stories_expected: list[int], page_size: int) -> None:
    engine = Engine.from_pretrained(stories, page_size=page_size)
    gen = engine.generate("", GREEDY_200)[0]  # the empty prompt is BOS alone
    assert gen.prompt_ids == [1]
    assert gen.output_ids == stories_expected
    assert gen.text is not None and gen.text.startswith("Once upon a time, there was a little girl")
    engine.check_integrity()
    assert engine.stats().used_pages == 0


def test_forked_branches_each_reproduce_the_reference(
    stories: Path, stories_expected: list[int]
) -> None:
    """Fork at several points; every greedy branch continues exactly as the reference."""
    engine = Engine.from_pretrained(stories, page_size=16)
    root = engine.add([1], GREEDY_200)
    branches = [root]
    for _ in range(150):
        engine.step(branches)
        if len(branches) < 8 and engine.output_ids(root) and len(engine.output_ids(root)) % 19 == 0:
            branches.append(engine.fork(root))
    engine.run(branches)
    assert len(branches) == 8
    for b in branches:
        assert engine.output_ids(b) == stories_expected
    stats = engine.stats()
    assert stats.shared_pages > 0
    engine.check_integrity()
