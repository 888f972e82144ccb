"""A search in a background thread while the main thread makes UI-style calls.

The engine serialises its public methods with a re-entrant lock (see ``Engine``'s
docstring). Here an MCTS search runs in a thread over ``dendrite-24`` while the main thread
loops over what a notebook's widgets do: ``stats()``, fork and free of its own branch,
``tree.to_frame()``, ``page_refcounts()`` (under ``engine.lock``: the tree itself is not
locked), ``check_integrity()``. Afterwards integrity holds and the search's tree and result
equal the same search run alone (same seed): nothing the UI did leaked into it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from dendrite.engine import Engine, EngineConfig
from dendrite.model.loader import load_model
from dendrite.model.tokenizer import load_tokenizer
from dendrite.search.mcts import MCTSConfig, SearchResult, mcts
from dendrite.search.tree import SearchTree, StepConfig
from dendrite.search.value import LogprobValue
from dendrite.tasks import game24

MODEL = Path(__file__).resolve().parents[1] / "data" / "models" / "dendrite-24"
STEP = StepConfig(delimiter="\n", max_step_tokens=24, temperature=1.0)
CFG = MCTSConfig(simulations=16, children=3, max_depth=4)
COLUMNS = ["id", "parent", "token_ids", "visits", "value", "terminal"]


@pytest.fixture(scope="module")
def parts() -> tuple[Any, Any]:
    return load_model(MODEL), load_tokenizer(MODEL)


def make(parts: tuple[Any, Any], cache: bool) -> Engine:
    return Engine(parts[0], parts[1], EngineConfig(num_pages=512, prefix_cache=cache))


def search(tree: SearchTree) -> SearchResult:
    return mcts(tree, CFG, LogprobValue())


@pytest.mark.parametrize("cache", [False, True])
def test_background_search_with_ui_calls(parts: tuple[Any, Any], cache: bool) -> None:
    prompt = game24.prompt([4, 4, 10, 13])
    alone = make(parts, cache)
    with SearchTree(alone, prompt, STEP, seed=7) as tree:
        want = search(tree)
        want_frame = tree.to_frame()[COLUMNS].to_json()

    engine = make(parts, cache)
    mine = engine.add(game24.prompt([1, 2, 3, 4]), seed=1)
    engine.prefill([mine])
    tree = SearchTree(engine, prompt, STEP, seed=7)
    out: dict[str, Any] = {}

    def background() -> None:
        try:
            out["result"] = search(tree)
        except BaseException as e:  # surfaced by the main thread
            out["error"] = e

    worker = threading.Thread(target=background)
    worker.start()
    ui_calls = 0
    while worker.is_alive():
        engine.stats()
        kids = [engine.fork(mine) for _ in range(3)]
        tree.to_frame()
        with engine.lock:
            engine.tree.page_refcounts()
        engine.check_integrity()
        for k in kids:
            engine.free(k)
        ui_calls += 1
    worker.join()
    assert "error" not in out, out.get("error")
    assert ui_calls >= 3  # the loops did interleave
    engine.check_integrity()
    assert out["result"] == want
    assert tree.to_frame()[COLUMNS].to_json() == want_frame
    tree.close()
    engine.free(mine)
    engine.clear_cache()
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_pages
