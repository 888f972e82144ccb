"""Token-level beam search on the engine that returns exactly the beams HF ``generate`` returns.

Beams are branches. Every step feeds all live beams in one :meth:`Engine.forward`, scores
``num_beams x vocab`` continuations, and turns the chosen ones into the next beams by forking
their source branch (O(1), the prefix KV stays shared) and extending it with the new token. A
source chosen once is reused as is; a source chosen by nobody is freed at once, so the pages
held are the KV tree of the surviving beams, not ``num_beams`` copies of the context.

The selection rules are those of ``transformers`` (``GenerationMixin._beam_search`` and its
helpers, read in 5.24), re-implemented so that ids and ``sequences_scores`` match HF's:

- Candidates: ``K = max(2, 1 + len(eos)) * num_beams`` best of ``running score + log_softmax``
  over all beams and tokens (fp32, one ``torch.topk`` over the flattened ``[1, k*V]`` scores,
  so ties break the same way). Before the first step the ``k`` beams are the prompt, scored
  ``[0, -1e9, ...]``: we feed the prompt once and reuse its log-probs for every slot.
- A candidate *hits* when its token is an EOS or it reaches ``max_new_tokens``. The ``k``
  best candidates that do not hit are the next running beams (hitting ones are pushed down
  by ``-1e9``, which only matters at the last step, when all of them hit).
- Among the *first k* of the ``K`` candidates, those that hit become finished hypotheses
  scored ``sum_logprob / generated_len ** length_penalty`` (``generated_len`` counts the new
  tokens including the EOS, not the prompt); the ``k`` best finished ones are kept.
- Termination after each step: (a) every candidate hit (max length); (b) ``early_stopping is
  True`` and ``k`` hypotheses are finished; (c) ``k`` are finished and the best running score
  divided by ``L ** length_penalty`` cannot beat the worst finished one, where ``L`` is
  ``max_new_tokens`` for ``early_stopping="never"`` with a positive penalty and the current
  generated length otherwise. Once (c) holds it stays true.
- Output: the best ``num_return_sequences`` finished hypotheses, best first. HF pads shorter
  ones (to the longest returned) with ``pad_token_id`` (or ``eos[0]`` when pad is 0 or unset):
  :meth:`BeamResult.padded` gives that layout.

Grammar masks (:meth:`Engine.allowed_tokens`) are applied to the log-probs as HF applies
logits processors (after ``log_softmax``, disallowed = ``-inf``); tight masks give HF's
``-1e9``-scored filler beams too. Two deliberate divergences, both only when a grammar leaves
almost nothing allowed: a candidate scored ``-inf`` never becomes a beam or a hypothesis here
(HF would carry it along), and when fewer than ``k`` real hypotheses exist HF returns
placeholder rows (prompt + padding, score ``-1e9``) where we return the filler hypotheses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from dendrite.engine import Branch, Engine, Prompt
from dendrite.errors import ContextLengthError, SearchError
from dendrite.grammar_base import BranchConstraint
from dendrite.kv.tree import KVBranch, Segment

_NEG = -1.0e9  # HF's "impossible" score offset (kept identical: it takes part in fp32 rounding)
_DEAD = -1  # a beam slot whose every continuation was masked out


class Beam(NamedTuple):
    output_ids: list[int]  # generated tokens, the EOS included when it ended on one; no padding
    score: float  # sum of token log-probs / len(output_ids) ** length_penalty
    finish_reason: str  # "eos" | "length"


class BeamResult(NamedTuple):
    beams: list[Beam]  # best first
    steps: int  # batched engine forwards used (<= max_new_tokens)
    peak_pages: int  # most pages this search held at once
    copy_pages: int  # pages a copy-per-beam cache would need (its peak over the steps)
    min_pages: int  # ceil(unique tokens / page_size) when this search held its peak
    read_pages: int  # of the peak pages, those a live beam reads (the rest: dead partial pages)
    paged_min_pages: int  # the fewest any cache of page_size-token pages could hold then
    eos_hypotheses: int  # hypotheses ending on EOS that entered the k best finished ones

    @property
    def pages_ratio(self) -> float:
        """Pages held at the peak over the unique tokens' minimum (1.0 is perfect sharing)."""
        return self.peak_pages / max(1, self.min_pages)

    @property
    def read_ratio(self) -> float:
        """Pages the beams read at the peak over the same minimum (what a tree that frees dead
        partial pages at once would hold)."""
        return self.read_pages / max(1, self.min_pages)

    @property
    def copy_ratio(self) -> float:
        """What a copy-per-beam cache would need over the same minimum."""
        return self.copy_pages / max(1, self.min_pages)

    def padded(self, pad_token_id: int) -> list[list[int]]:
        """Output ids right-padded to the longest beam: HF's ``sequences[:, prompt_len:]``."""
        width = max((len(b.output_ids) for b in self.beams), default=0)
        return [b.output_ids + [pad_token_id] * (width - len(b.output_ids)) for b in self.beams]


class _Hypothesis(NamedTuple):
    score: float
    ids: list[int]


def _check_settings(
    engine: Engine,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float,
    early_stopping: bool | str,
    num_return_sequences: int | None,
    eos: Sequence[int],
) -> None:
    def positive_int(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SearchError(f"{name} must be an int >= 1, got {value!r}")

    positive_int("num_beams", num_beams)
    positive_int("max_new_tokens", max_new_tokens)
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
        raise SearchError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, int | float):
        raise SearchError(f"length_penalty must be a number, got {length_penalty!r}")
    if not math.isfinite(length_penalty):
        raise SearchError(f"length_penalty must be finite, got {length_penalty!r}")
    if num_return_sequences is not None:
        positive_int("num_return_sequences", num_return_sequences)
        if num_return_sequences > num_beams:
            raise SearchError(
                f"num_return_sequences ({num_return_sequences}) must be <= num_beams "
                f"({num_beams}): beam search keeps only num_beams finished hypotheses"
            )
    vocab = engine.model_config.vocab_size
    bad = [t for t in eos if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
    if bad:
        raise SearchError(f"eos token id(s) {bad[:5]} are outside the vocabulary of {vocab}")
    if max(2, 1 + len(eos)) > vocab:
        raise SearchError(f"{len(eos)} eos ids leave too few candidates in a vocabulary of {vocab}")


def beam_search(
    engine: Engine,
    prompt: Prompt,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
    constraint: BranchConstraint | None = None,
) -> BeamResult:
    """Beam search from ``prompt`` (text or ids); the same beams as HF ``generate(num_beams=k)``.

    ``eos_token_ids`` defaults to the engine's; pass ``()`` to search without EOS.
    ``constraint`` (a grammar matcher) restricts every beam; it forks with the beams. One batched
    :meth:`Engine.forward` per generated token. Every branch the search creates is freed
    before it returns (or raises).

    Example
    -------
    >>> res = beam_search(engine, [1, 42, 7], num_beams=4, max_new_tokens=32)  # doctest: +SKIP
    >>> res.beams[0].output_ids, res.beams[0].score, res.pages_ratio  # doctest: +SKIP
    """
    eos = tuple(engine.eos_token_ids if eos_token_ids is None else eos_token_ids)
    _check_settings(
        engine, num_beams, max_new_tokens, length_penalty, early_stopping, num_return_sequences, eos
    )
    prompt_ids = engine.encode(prompt)
    limit = engine.model_config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens - 1 > limit:
        raise ContextLengthError(
            f"a prompt of {len(prompt_ids)} tokens plus {max_new_tokens} new tokens exceeds the "
            f"model's maximum context of {limit}: shorten the prompt or lower max_new_tokens"
        )
    k = num_beams
    num_cand = max(2, 1 + len(eos)) * k  # enough that k candidates never end on an EOS
    eos_t = torch.tensor(eos, dtype=torch.long)
    first_k = torch.arange(num_cand) < k  # [K] only these may become finished hypotheses
    pages = _PageMeter(engine)

    mine: dict[int, Branch] = {}  # every live branch this search owns (freed in `finally`)
    try:
        root = engine.add(prompt_ids, constraint=constraint)
        mine[root.id] = root
        rows: list[Branch] = [root]  # the distinct branches fed together each step
        slot_row = [0] * k  # beam slot -> row in `rows` (_DEAD: masked out, no branch)
        run_scores = torch.full((k,), _NEG, dtype=torch.float32)  # [k] sums of log-probs
        run_scores[0] = 0.0  # the k initial slots are all the prompt: only the first counts
        finished: list[_Hypothesis] = []  # best first, at most k
        heuristic_open = True  # HF's "is_early_stop_heuristic_unsatisfied"
        steps = eos_kept = 0

        for step in range(max_new_tokens):
            logits = engine.forward(rows)  # [R, V] fp32; rows now have nothing pending
            steps += 1
            pages.measure(rows, slot_row)
            logp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
            allowed = engine.allowed_tokens(rows)
            if allowed is not None:
                logp = logp.masked_fill(~allowed.to(logp.device), float("-inf"))
            cand_scores, cand_slot, cand_tok = _top_candidates(logp, slot_row, run_scores, num_cand)
            gen_len = step + 1  # new tokens in every candidate, this one included
            hits = torch.isin(torch.tensor(cand_tok), eos_t) | (gen_len >= max_new_tokens)

            # Finished hypotheses: the hitting candidates among the first k, length-penalised.
            fin_scores = cand_scores / (gen_len**length_penalty)
            new = [
                (float(fin_scores[c]), c)
                for c in torch.nonzero(hits & first_k).flatten().tolist()
                if math.isfinite(float(fin_scores[c]))
            ]
            finished, taken = _merge_finished(finished, new, k)
            for i, c in taken:
                row = rows[slot_row[cand_slot[c]]]
                finished[i] = _Hypothesis(finished[i].score, [*engine.output_ids(row), cand_tok[c]])
                eos_kept += cand_tok[c] in eos

            # Next running beams: the k best candidates that did not hit.
            adjusted = cand_scores + hits.to(torch.float32) * _NEG  # [K]
            next_c = torch.topk(adjusted.view(1, -1), k).indices[0].tolist()
            run_scores = adjusted[next_c]

            # Stop? HF's early-stop heuristic (sticky), early_stopping=True, or all hit.
            never = early_stopping == "never" and length_penalty > 0.0
            best_len = max_new_tokens if never else gen_len
            best_possible = float(run_scores[0] / (best_len**length_penalty))
            worst_finished = min(h.score for h in finished) if len(finished) == k else _NEG
            heuristic_open = heuristic_open and best_possible > worst_finished
            all_finished = len(finished) == k and early_stopping is True
            if not heuristic_open or all_finished or bool(hits.all()):
                break

            parents = [
                slot_row[cand_slot[c]] if math.isfinite(float(run_scores[s])) else _DEAD
                for s, c in enumerate(next_c)
            ]
            if all(p == _DEAD for p in parents):
                break  # every continuation is masked out: nothing can grow
            rows, slot_row = _regrow(engine, rows, parents, [cand_tok[c] for c in next_c], mine)

        n_return = k if num_return_sequences is None else num_return_sequences
        beams = [
            Beam(h.ids, h.score, "eos" if h.ids and h.ids[-1] in eos else "length")
            for h in finished[:n_return]
        ]
        return BeamResult(beams, steps, *pages.result(), eos_kept)
    finally:
        for branch in mine.values():
            engine.free(branch)


def _top_candidates(
    logp: torch.Tensor, slot_row: list[int], run_scores: torch.Tensor, num_cand: int
) -> tuple[torch.Tensor, list[int], list[int]]:
    """The ``num_cand`` best (slot, token) continuations: scores [K] (sorted, on CPU), slots,
    tokens.

    ``logp`` is [R, V] per distinct branch; slot ``s`` reads row ``slot_row[s]``, so the first
    step scores the prompt's single row for all k slots, as HF's k identical copies would.
    """
    vocab = logp.shape[-1]
    dead = torch.tensor([r == _DEAD for r in slot_row])
    scores = run_scores.masked_fill(dead, float("-inf")).to(logp.device)  # [k]
    rows = torch.tensor([max(r, 0) for r in slot_row], device=logp.device)
    acc = logp[rows] + scores[:, None]  # [k, V]
    top_scores, top_idx = torch.topk(acc.view(1, -1), num_cand)  # [1, K], ties as HF's
    top_idx = top_idx[0].cpu()
    return top_scores[0].cpu(), (top_idx // vocab).tolist(), (top_idx % vocab).tolist()


def _merge_finished(
    finished: list[_Hypothesis], new: list[tuple[float, int]], k: int
) -> tuple[list[_Hypothesis], list[tuple[int, int]]]:
    """Keep the k best of ``finished`` and the ``new`` (score, candidate) hypotheses.

    New ones come back as placeholders without ids, with (position, candidate) pairs saying
    which to fill in: ids are read from the engine only for hypotheses that are kept.
    """
    if not new:
        return finished, []
    merged = [(h.score, -1, h) for h in finished] + [(s, c, None) for s, c in new]
    merged.sort(key=lambda m: -m[0])  # stable: older hypotheses win exact ties
    kept: list[_Hypothesis] = []
    taken: list[tuple[int, int]] = []
    for score, c, h in merged[:k]:
        if h is None:
            taken.append((len(kept), c))
            h = _Hypothesis(score, [])
        kept.append(h)
    return kept, taken


def _regrow(
    engine: Engine,
    rows: list[Branch],
    parents: list[int],
    tokens: list[int],
    mine: dict[int, Branch],
) -> tuple[list[Branch], list[int]]:
    """Turn each slot's (parent row, token) into a branch; returns the new rows and slot map.

    Rows chosen by no slot are freed; a row chosen once continues as itself; a row chosen
    ``n`` times is forked ``n - 1`` times (O(1), its KV shared). Rows are ordered by their
    best slot, so the best child of a source appends first and writes into the source's
    partial last page in place (the others copy that one page).
    """
    by_parent: dict[int, list[int]] = {}  # row -> its slots, best first
    for slot, r in enumerate(parents):
        if r != _DEAD:
            by_parent.setdefault(r, []).append(slot)
    for r, branch in enumerate(rows):
        if r not in by_parent:
            engine.free(branch)
            del mine[branch.id]
    new_rows: list[Branch] = []
    slot_row = [_DEAD] * len(parents)
    for r, slots in by_parent.items():
        for slot in slots:
            branch = rows[r] if slot == slots[-1] else engine.fork(rows[r])
            mine[branch.id] = branch
            slot_row[slot] = len(new_rows)
            new_rows.append(branch)
    for slot, r_new in enumerate(slot_row):
        if r_new != _DEAD:
            engine.extend(new_rows[r_new], [tokens[slot]])
    return new_rows, slot_row


class _PageMeter:
    """Pages this search holds after each forward, next to the copy-per-beam baseline."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.page_size = engine.config.page_size
        self.base = engine.stats()
        self.peak = self.copy_peak = self.min_at_peak = self.read_at_peak = 0
        self.paged_min_at_peak = 0

    def measure(self, rows: list[Branch], slot_row: list[int]) -> None:
        lens = [len(rows[r]) for r in slot_row if r != _DEAD]  # each slot: a full copy
        self.copy_peak = max(self.copy_peak, sum(-(-n // self.page_size) for n in lens))
        used = self.engine.pool.num_used - self.base.used_pages  # O(1); the walks only at peaks
        if used > self.peak:
            self.peak = used
            unique = self.engine.stats().unique_tokens - self.base.unique_tokens
            self.min_at_peak = -(-unique // self.page_size)
            tree = self.engine.tree
            self.read_at_peak = len({p for b in rows for p in tree.page_list(b.kv)})
            branches = [b.kv for b in rows]
            counted = tree_paged_minimum(branches, self.page_size)
            if counted is None:  # the segments are not a trie of the beams: count tokens
                counted = paged_minimum([tree.token_ids(b) for b in branches], self.page_size)
            self.paged_min_at_peak = counted

    def result(self) -> tuple[int, int, int, int, int]:
        return (
            self.peak, self.copy_peak, self.min_at_peak, self.read_at_peak,
            self.paged_min_at_peak,
        )  # fmt: skip


def paged_minimum(sequences: list[list[int]], page_size: int) -> int:
    """The fewest pages any paged KV cache can hold ``sequences`` in, when page ``j`` of a
    sequence holds its positions ``[j * P, (j + 1) * P)`` (the layout paged attention kernels
    read): one page per distinct (j, tokens up to the end of page j) among the sequences,
    where a partly filled page that another sequence's page extends is that page::

        P = 4, sequences  a b c d e f    and    a b c d e g
        page 0: (a b c d) shared -> 1;   page 1: (..e f) and (..e g) differ -> 2;   total 3
        while ceil(unique tokens / P) = ceil(7 / 4) = 2
    """
    # every distinct prefix is one trie node; a page's block is the node where it ends
    children: dict[tuple[int, int], int] = {}
    continued: set[int] = set()  # nodes some sequence goes on past
    ends: dict[int, bool] = {}  # node ending a page's block -> whether the block is full
    for ids in sequences:
        node = 0
        for i, token in enumerate(ids):
            if i:
                continued.add(node)
            node = children.setdefault((node, token), len(children) + 1)
            if (i + 1) % page_size == 0 or i + 1 == len(ids):
                ends[node] = (i + 1) % page_size == 0
    # a partly filled block that another sequence's block extends is that block
    count = sum(1 for node, full in ends.items() if full or node not in continued)
    return count


def tree_paged_minimum(branches: Sequence[KVBranch], page_size: int) -> int | None:
    """:func:`paged_minimum` of the branches' token sequences, read off their KV tree in
    O(segments on their paths) instead of O(tokens): a page's block ends at a position ``p``
    with ``(p + 1) % P == 0`` inside some segment (one block per segment and such position),
    or at a branch's end when that is not a page end and no segment continues past it.

    That holds when the segments are a trie of the sequences: no two segments that go on from
    the same point begin with the same token. Beam search's are (its candidates are distinct
    (beam, token) pairs); where they are not, this returns None."""
    seen: set[int] = set()
    segments: list[Segment] = []
    for b in branches:
        seg: Segment | None = b.leaf
        while seg is not None and seg.id not in seen:
            seen.add(seg.id)
            segments.append(seg)
            seg = seg.parent

    def solid(seg: Segment | None) -> Segment | None:
        """``seg`` or its nearest ancestor that holds tokens."""
        while seg is not None and not seg.tokens:
            seg = seg.parent
        return seg

    blocks = 0
    continued: set[int] = set()  # segments some other segment goes on from
    starts: set[tuple[int, int]] = set()  # (where a segment goes on from, its first token)
    for seg in segments:
        if not seg.tokens:
            continue
        blocks += seg.end // page_size - seg.start // page_size
        up = solid(seg.parent)
        start = (-1 if up is None else up.id, seg.tokens[0])
        if start in starts:
            return None
        starts.add(start)
        if up is not None:
            continued.add(up.id)
    ends = {e.id for b in branches if len(b) % page_size and (e := solid(b.leaf)) is not None}
    return blocks + len(ends - continued)
