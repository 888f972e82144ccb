"""Search on the engine: tree, expansion batching, MCTS (UCT/PUCT), ToT BFS, best-of-N."""

from __future__ import annotations

from pathlib import Path

import pytest

from dendrite.engine import Engine
from dendrite.errors import SearchError
from dendrite.search.mcts import MCTSConfig, mcts
from dendrite.search.tot import best_of_n, tot_bfs
from dendrite.search.tree import SearchTree, StepConfig
from dendrite.search.value import LogprobValue, RolloutValue, VerifierValue

ONE_TOKEN = StepConfig(delimiter=None, max_step_tokens=1, temperature=1.0)
DEPTH, K = 3, 3


def reward(text: str) -> float:
    """A task whose optimum we can enumerate: graded by the step tokens' sum mod 7."""
    ids = [int(t) for t in text.split()]
    if len(ids) < DEPTH:
        return 0.0
    return 1.0 if sum(ids) % 7 == 0 else (sum(ids) % 7) / 10


@pytest.fixture
def engine(tiny_checkpoint: Path) -> Engine:
    return Engine.from_pretrained(tiny_checkpoint, page_size=4)


def exhaustive_optimum(engine: Engine, seed: int) -> float:
    tree = SearchTree(engine, [1, 5, 7, 9], ONE_TOKEN, seed=seed)
    frontier = [tree.root]
    for _ in range(DEPTH):
        frontier = [c for row in tree.expand_many(frontier, K) for c in row]
    best = max(reward(tree.path_text(n)) for n in frontier)
    tree.close()
    return best


def test_mcts_finds_the_known_optimum(engine: Engine) -> None:
    for seed in (0, 1, 2):
        optimum = exhaustive_optimum(engine, seed)
        for rule in ("uct", "puct"):
            cfg = MCTSConfig(simulations=60, children=K, max_depth=DEPTH, rule=rule, c=1.0)
            with SearchTree(engine, [1, 5, 7, 9], ONE_TOKEN, seed=seed) as tree:
                res = mcts(tree, cfg, LogprobValue(), verifier=reward)
                assert tree.root.visits == cfg.simulations == res.iterations
                leaf = tree[res.best_path[-1]]
                assert leaf.reward == optimum, (seed, rule)
                assert reward(tree.path_text(leaf)) == optimum
    engine.check_integrity()
    assert engine.stats().used_pages == 0


def test_mcts_is_deterministic_for_a_seed(engine: Engine) -> None:
    cfg = MCTSConfig(simulations=20, children=3, max_depth=DEPTH)
    dumps = []
    for _ in range(2):
        with SearchTree(engine, [1, 5, 7, 9], ONE_TOKEN, seed=42) as tree:
            mcts(tree, cfg, LogprobValue(), verifier=reward)
            frame = tree.to_frame()
            dumps.append(frame[["id", "parent", "token_ids", "visits", "value"]].to_json())
    assert dumps[0] == dumps[1]
    with SearchTree(engine, [1, 5, 7, 9], ONE_TOKEN, seed=43) as tree:
        mcts(tree, cfg, LogprobValue(), verifier=reward)
        other = tree.to_frame()[["id", "parent", "token_ids", "visits", "value"]].to_json()
    assert other != dumps[0]


def test_expansion_is_one_step_per_token_for_all_children(engine: Engine) -> None:
    step = StepConfig(delimiter=None, max_step_tokens=6)
    with SearchTree(engine, list(range(1, 40)), step, seed=0) as tree:
        before = engine.num_steps
        kids = tree.expand(tree.root, 5)
        assert engine.num_steps - before == 6  # not 5 * 6
        assert all(len(k.token_ids) == 6 for k in kids)
        assert abs(sum(k.prior for k in kids) - 1) < 1e-9
        # the prompt's pages are shared by every child, not copied
        assert engine.stats().shared_pages >= 39 // 4
        before = engine.num_steps
        tree.expand_many(kids[:3], 2)
        assert engine.num_steps - before == 6
    engine.check_integrity()
    assert engine.stats().used_pages == 0


def test_release_frees_a_subtree(engine: Engine) -> None:
    tree = SearchTree(engine, [1, 2, 3, 4, 5, 6], StepConfig(delimiter=None, max_step_tokens=8))
    a, _ = tree.expand(tree.root, 2)
    tree.expand(a, 3)
    used = engine.stats().used_pages
    n_before = len(tree)
    freed = tree.release(a)
    assert freed >= 2 and len(tree) < n_before and a.id not in tree.nodes
    assert engine.stats().used_pages < used
    engine.check_integrity()
    tree.close()
    assert engine.stats().used_pages == 0


def test_json_round_trip_and_reexpansion(engine: Engine) -> None:
    cfg = MCTSConfig(simulations=8, children=2, max_depth=DEPTH)
    with SearchTree(engine, [1, 5, 7, 9], ONE_TOKEN, seed=3) as tree:
        mcts(tree, cfg, LogprobValue(), verifier=reward)
        text = tree.to_json()
    again = SearchTree.from_json(text, engine, ONE_TOKEN)
    assert again.to_json() == text
    leaf = next(n for n in again.dfs() if n.depth == 1 and not n.terminal)
    branch = again.ensure_branch(leaf)  # re-materialised from its tokens
    assert engine.token_ids(branch)[-len(leaf.token_ids) :] == leaf.token_ids
    kids = again.expand(leaf, 2)
    assert all(k.parent == leaf.id for k in kids)
    again.close()
    engine.check_integrity()
    assert engine.stats().used_pages == 0


def test_tot_bfs_and_best_of_n(engine: Engine) -> None:
    with SearchTree(engine, [1, 5, 7, 9], ONE_TOKEN, seed=0) as tree:
        res = tot_bfs(tree, LogprobValue(), breadth=2, k=3, max_depth=DEPTH, verifier=reward)
        assert tree[res.best_path[-1]].depth == DEPTH
        assert res.engine_steps <= DEPTH * 2  # one step per level (+ feeding forks)
        frame = tree.to_frame()
        assert (frame["depth"] == 1).sum() <= 3
    whole = StepConfig(delimiter=None, max_step_tokens=3)
    with SearchTree(engine, [1, 5, 7, 9], whole, seed=0) as tree:
        res2 = best_of_n(tree, 8, answer=lambda t: t.split()[-1], verifier=reward)
        assert sum(res2.votes.values()) == 8
        assert res2.answer in res2.votes
        assert res2.engine_steps == 3
    engine.check_integrity()
    assert engine.stats().used_pages == 0


def test_value_functions(engine: Engine) -> None:
    with SearchTree(engine, [1, 5, 7, 9], ONE_TOKEN, seed=0) as tree:
        kids = tree.expand(tree.root, 3)
        rv = RolloutValue(reward, rollouts=2, max_tokens=2, temperature=1.0)
        vals = rv.evaluate(tree, kids)
        assert len(vals) == 3 and all(0 <= v <= 1 for v in vals)
        for k in kids:
            k.terminal = True
        vv = VerifierValue(lambda t: 0.25)
        assert vv.evaluate(tree, kids) == [0.25] * 3
    assert engine.stats().used_pages == 0


def test_bad_settings_fail_clearly_and_free_everything(engine: Engine) -> None:
    with pytest.raises(SearchError, match="children"):
        MCTSConfig(children=0)
    with pytest.raises(SearchError, match="simulations"):
        MCTSConfig(simulations=-1)
    with pytest.raises(SearchError, match="rule"):
        MCTSConfig(rule="alphago")
    with pytest.raises(SearchError, match="regex"):
        StepConfig(regex="(")
    with SearchTree(engine, [1, 2, 3], ONE_TOKEN) as tree:
        with pytest.raises(SearchError, match=">= 1"):
            tree.expand(tree.root, 0)
        with pytest.raises(SearchError):
            tot_bfs(tree, LogprobValue(), breadth=0)
    engine.check_integrity()
    assert engine.stats().used_pages == 0
