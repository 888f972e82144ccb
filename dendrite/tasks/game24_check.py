"""Sanity check of a Game of 24 model with plain HF transformers: greedy vs a small search.

``python -m dendrite.tasks.game24_check --model data/models/dendrite-24 --split test``

Answers one question before Dendrite's own engine exists: does search over the model's own
proposals and value judgement solve clearly more puzzles than greedy decoding? Three numbers:

- **greedy**: the whole trace decoded greedily; solved if its steps are legal and its answer
  line passes the exact verifier.
- **search**: best-first search over step lines, all puzzles in lock-step so each round is one
  batched ``generate``. A round expands, in every unfinished puzzle, its frontier node of
  highest priority ``value * 0.5**expansions``: ``k`` sampled next lines (temperature 1),
  illegal and duplicate ones dropped. A child's value is the model's own judgement,
  ``P(sure) = softmax(logp(" sure"), logp(" impossible"))`` after ``eval: <state> ->``; a
  child with one number is dead unless it is 24, and expanding a 24 node samples answer lines
  that the exact verifier checks (after two such expansions without a verified answer the node
  is dropped). At most ``budget`` expansions per puzzle (64, like MCTS simulations). No
  solver is called: the parser checks legality, the verifier checks answers.
- **value accuracy**: the judgement against the solver on every state one legal move away
  from the split's puzzles (the solver is used here only to score the judgement).

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from dendrite.errors import DendriteError
from dendrite.tasks import game24
from dendrite.tasks.game24 import State

PRIORITY_DECAY = 0.5
CHUNK = 512  # sequences per generate / forward call


@dataclass
class Node:
    text: str  # everything after the prompt: finished lines, each ending in "\n"
    state: State
    value: float
    depth: int
    expansions: int = 0
    children: set[str] = field(default_factory=set)

    @property
    def priority(self) -> float:
        return self.value * PRIORITY_DECAY**self.expansions


class Model:
    """An HF causal LM plus tokenizer with the two calls the check needs, batched."""

    def __init__(self, path: str, device: str) -> None:
        from transformers import AutoTokenizer, LlamaForCausalLM

        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"
        self.lm: Any = cast(Any, LlamaForCausalLM.from_pretrained(path)).to(device).eval()
        self.device = device
        self.newline = self.tok.convert_tokens_to_ids("\n")

    @torch.no_grad()
    def generate(
        self, texts: Sequence[str], *, sample: bool, max_new_tokens: int, stop_at_newline: bool
    ) -> list[str]:
        """One continuation per text (stopping at newline or EOS), special tokens dropped."""
        eos = [self.tok.eos_token_id, self.newline] if stop_at_newline else [self.tok.eos_token_id]
        out: list[str] = []
        for i in range(0, len(texts), CHUNK):
            enc = self.tok(list(texts[i : i + CHUNK]), return_tensors="pt", padding=True).to(
                self.device
            )
            # pure sampling at temperature 1: top_k = the whole vocabulary, valid in every
            # transformers version (0 / None mean different things across versions)
            extra = {"top_k": len(self.tok), "top_p": 1.0, "temperature": 1.0} if sample else {}
            gen = self.lm.generate(
                **enc,
                do_sample=sample,
                **extra,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=self.tok.pad_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(self.tok.batch_decode(new, skip_special_tokens=True))
        return out

    @torch.no_grad()
    def p_sure(self, states: Sequence[State]) -> list[float]:
        """The model's value judgement ``P(sure)`` of each state."""
        texts = []
        for s in states:
            texts += [game24.value_line(s, True), game24.value_line(s, False)]
        prompt_lens = [len(self.tok(game24.value_prompt(s)).input_ids) for s in states]
        logps: list[float] = []
        self.tok.padding_side = "right"
        try:
            for i in range(0, len(texts), CHUNK):
                enc = self.tok(texts[i : i + CHUNK], return_tensors="pt", padding=True).to(
                    self.device
                )
                logits = self.lm(**enc).logits.float()  # [B, T, V]
                lp = torch.log_softmax(logits[:, :-1], dim=-1)
                tgt = enc["input_ids"][:, 1:]
                tok_lp = lp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # [B, T-1]
                for row in range(tgt.shape[0]):
                    start = prompt_lens[(i + row) // 2] - 1  # first label token's position - 1
                    end = int(enc["attention_mask"][row].sum()) - 1
                    logps.append(float(tok_lp[row, start:end].sum()))
        finally:
            self.tok.padding_side = "left"
        return [
            float(torch.softmax(torch.tensor([logps[2 * j], logps[2 * j + 1]]), 0)[0])
            for j in range(len(states))
        ]


def _greedy_solved(puzzle: game24.Puzzle, completion: str) -> bool:
    state = game24.as_state(puzzle)
    for line in completion.split("\n"):
        if line.startswith(game24.ANSWER_PREFIX):
            try:
                return state == (24,) and game24.verify_answer(
                    puzzle, game24.parse_answer_line(line)
                )
            except DendriteError:
                return False
        try:
            state = game24.parse_step(state, line).left
        except DendriteError:
            return False
    return False


def greedy(model: Model, puzzles: Sequence[game24.Puzzle]) -> list[bool]:
    outs = model.generate(
        [game24.prompt(p) for p in puzzles], sample=False, max_new_tokens=200, stop_at_newline=False
    )
    return [_greedy_solved(p, o) for p, o in zip(puzzles, outs, strict=True)]


def search(model: Model, puzzles: Sequence[game24.Puzzle], k: int, budget: int) -> list[int | None]:
    """Best-first search in lock-step; per puzzle the expansions used to solve it, or None."""
    frontiers = [[Node("", game24.as_state(p), 1.0, 0)] for p in puzzles]
    used = [0] * len(puzzles)
    solved: list[int | None] = [None] * len(puzzles)
    values: dict[State, float] = {}
    while True:
        active = [
            i
            for i in range(len(puzzles))
            if solved[i] is None and used[i] < budget and frontiers[i]
        ]
        if not active:
            return solved
        picked = {i: max(frontiers[i], key=lambda n: (n.priority, n.depth)) for i in active}
        texts = [game24.prompt(puzzles[i]) + picked[i].text for i in active for _ in range(k)]
        lines = model.generate(texts, sample=True, max_new_tokens=64, stop_at_newline=True)
        new: list[tuple[int, Node]] = []
        for j, i in enumerate(active):
            node = picked[i]
            node.expansions += 1
            used[i] += 1
            for line in (s.strip() for s in lines[j * k : (j + 1) * k]):
                if solved[i] is not None or line in node.children:
                    continue
                node.children.add(line)
                if node.state == (24,):
                    try:
                        if game24.verify_answer(puzzles[i], game24.parse_answer_line(line)):
                            solved[i] = used[i]
                    except DendriteError:
                        pass  # not an answer line
                    continue
                try:
                    step = game24.parse_step(node.state, line)
                except DendriteError:
                    continue
                if len(step.left) == 1 and step.left != (24,):
                    continue  # a dead end: one number, not 24
                new.append((i, Node(node.text + line + "\n", step.left, 1.0, node.depth + 1)))
            if node.state == (24,) and node.expansions >= 2:
                frontiers[i].remove(node)  # its answer lines keep failing
        unknown = sorted({n.state for _, n in new if len(n.state) > 1} - values.keys())
        values.update(zip(unknown, model.p_sure(unknown), strict=True))
        for i, n in new:
            n.value = values.get(n.state, 1.0)
            frontiers[i].append(n)


def value_accuracy(model: Model, puzzles: Sequence[game24.Puzzle]) -> dict[str, float]:
    states = sorted({s.left for p in puzzles for s in game24.legal_steps(game24.as_state(p))})
    p = model.p_sure(states)
    truth = [game24.solvable(s) for s in states]
    right = [(q > 0.5) == t for q, t in zip(p, truth, strict=True)]
    pos = [r for r, t in zip(right, truth, strict=True) if t]
    neg = [r for r, t in zip(right, truth, strict=True) if not t]
    return {
        "states": len(states),
        "accuracy": sum(right) / len(right),
        "recall_sure": sum(pos) / max(1, len(pos)),
        "recall_impossible": sum(neg) / max(1, len(neg)),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        prog="python -m dendrite.tasks.game24_check", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--model", default="data/models/dendrite-24")
    ap.add_argument("--split", default="test", choices=["train", "validation", "test"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=4, help="sampled lines per expansion")
    ap.add_argument("--budget", type=int, default=64, help="expansions per puzzle")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N puzzles (0: all)")
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    puzzles = game24.split_puzzles(a.split)
    puzzles = puzzles[: a.limit] if a.limit else puzzles
    model = Model(a.model, a.device)
    t0 = time.perf_counter()
    g = greedy(model, puzzles)
    t1 = time.perf_counter()
    s = search(model, puzzles, a.k, a.budget)
    t2 = time.perf_counter()
    v = value_accuracy(model, puzzles)
    t3 = time.perf_counter()
    found = [x for x in s if x is not None]
    result: dict[str, Any] = {
        "model": a.model,
        "split": a.split,
        "puzzles": len(puzzles),
        "greedy_solved": sum(g) / len(puzzles),
        "search_solved": len(found) / len(puzzles),
        "search_k": a.k,
        "search_budget": a.budget,
        "search_mean_expansions_when_solved": sum(found) / max(1, len(found)),
        "value_accuracy_one_move": v["accuracy"],
        "value_recall_sure": v["recall_sure"],
        "value_recall_impossible": v["recall_impossible"],
        "value_states": v["states"],
        "seconds_greedy": round(t1 - t0, 1),
        "seconds_search": round(t2 - t1, 1),
        "seconds_value": round(t3 - t2, 1),
        "device": a.device,
        "seed": a.seed,
    }
    print(f"{'split':<12}{a.split}  ({len(puzzles)} puzzles)")
    print(f"{'greedy':<12}{result['greedy_solved']:.1%}")
    print(f"{'search':<12}{result['search_solved']:.1%}  (k={a.k}, <= {a.budget} expansions)")
    print(f"{'value acc':<12}{v['accuracy']:.1%} on {v['states']} states one move in")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
