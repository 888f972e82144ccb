"""Grammars through the search algorithms: beam search and MCTS only ever produce valid JSON."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from dendrite.engine import Engine
from dendrite.grammar import Grammar
from dendrite.search.beam import beam_search
from dendrite.search.mcts import MCTSConfig, mcts
from dendrite.search.tree import SearchTree, StepConfig
from dendrite.search.value import LogprobValue

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "schemas" / "character.schema.json").read_text()
)


@pytest.fixture(scope="module")
def setup(stories: Path) -> tuple[Engine, Grammar]:
    engine = Engine.from_pretrained(stories)
    assert engine.tokenizer is not None
    return engine, Grammar.json_schema(SCHEMA, engine.tokenizer)


def test_beam_search_beams_are_valid_json(setup: tuple[Engine, Grammar]) -> None:
    engine, grammar = setup
    valid = 0
    prompts = ["", "Once upon a time", "The cat", "Lily", "A dog", "Tom said", "One day",
               "The sun", "Mom", "In the park", "Ben", "The bird", "Sue"]  # fmt: skip
    for prompt in prompts:  # 13 searches x 8 beams
        res = beam_search(
            engine, prompt, num_beams=8, max_new_tokens=160, constraint=grammar.matcher()
        )
        for beam in res.beams:
            assert beam.finish_reason == "eos", beam
            assert engine.tokenizer is not None
            text = engine.tokenizer.decode(beam.output_ids)
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
    assert valid >= 100
    engine.check_integrity()
    assert engine.stats().used_pages == 0


def test_mcts_terminal_nodes_are_valid_json(setup: tuple[Engine, Grammar]) -> None:
    engine, grammar = setup
    step = StepConfig(delimiter=",", max_step_tokens=48, temperature=1.0)
    terminals = 0
    for seed in range(14):
        with SearchTree(engine, "", step, seed=seed, constraint=grammar.matcher()) as tree:
            cfg = MCTSConfig(simulations=40, children=4, max_depth=30)
            mcts(tree, cfg, LogprobValue())
            for n in tree.nodes.values():
                if n.finish_reason in ("grammar", "eos"):
                    jsonschema.validate(json.loads(tree.path_text(n)), SCHEMA)
                    terminals += 1
    assert terminals >= 100
    engine.check_integrity()
    assert engine.stats().used_pages == 0
