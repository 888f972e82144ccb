"""Token-level beam search on the engine that returns exactly the beams HF ``generate`` returns.

Two paths, one set of rules (:class:`_Rules`), the same beams:

- *Beams are branches* (:func:`_search_tree`; on CPU, and wherever a grammar constrains the
  beams). Every step feeds all live beams in one :meth:`Engine.forward`, scores
  ``num_beams x vocab`` continuations, and turns the chosen ones into the next beams by
  forking their source branch (O(1), the prefix KV stays shared) and extending it with the
  new token. A source chosen once is reused as is; a source chosen by nobody is freed at
  once, so the pages held are the KV tree of the surviving beams, not ``num_beams`` copies
  of the context.
- *Pipelined* (:func:`_search_pipelined`; the default on CUDA): the beams live on pages each
  beam slot owns, the device chooses them and builds the next step's page tables, and the
  host runs one step ahead instead of waiting for every choice.

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
from collections.abc import Callable, Sequence
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
    steps: int  # batched engine forwards run (<= max_new_tokens; pipelined: one more than the
    # tree path where the search stops early, the step launched before the stop was known)
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
    pipelined: bool | None = None,
) -> BeamResult:
    """Beam search from ``prompt`` (text or ids); the same beams as HF ``generate(num_beams=k)``.

    ``eos_token_ids`` defaults to the engine's; pass ``()`` to search without EOS.
    ``constraint`` (a grammar matcher) restricts every beam; it forks with the beams. One batched
    :meth:`Engine.forward` per generated token. Every branch the search creates is freed
    before it returns (or raises).

    ``pipelined`` (default: on CUDA without a constraint) keeps the beams on the device, off
    the KV tree: see :func:`_search_pipelined`. Same rules, same beams; the host prepares each
    step while the device runs the one before.

    Example
    -------
    >>> res = beam_search(engine, [1, 42, 7], num_beams=4, max_new_tokens=32)  # doctest: +SKIP
    >>> res.beams[0].output_ids, res.beams[0].score, res.pages_ratio  # doctest: +SKIP
    """
    eos = tuple(engine.eos_token_ids if eos_token_ids is None else eos_token_ids)
    _check_settings(
        engine, num_beams, max_new_tokens, length_penalty, early_stopping, num_return_sequences, eos
    )
    if pipelined and constraint is not None:
        raise SearchError("a pipelined beam search cannot follow a grammar: pass pipelined=False")
    prompt_ids = engine.encode(prompt)
    if pipelined is None:  # where it pays, and where the pool has the slots' pages to spare
        P = engine.pool.page_size
        need = -(-len(prompt_ids) // P) + num_beams * _slot_pages(
            len(prompt_ids), max_new_tokens, P
        )
        pipelined = (
            engine.device.type == "cuda" and constraint is None and engine.pool.num_free >= need
        )
    limit = engine.model_config.max_position_embeddings
    if len(prompt_ids) + max_new_tokens - 1 > limit:
        raise ContextLengthError(
            f"a prompt of {len(prompt_ids)} tokens plus {max_new_tokens} new tokens exceeds the "
            f"model's maximum context of {limit}: shorten the prompt or lower max_new_tokens"
        )
    rules = _Rules(num_beams, eos, max_new_tokens, length_penalty, early_stopping)
    mine: dict[int, Branch] = {}  # every live branch this search owns (freed in `finally`)
    try:
        root = engine.add(prompt_ids, constraint=constraint)
        mine[root.id] = root
        search = _search_pipelined if pipelined else _search_tree
        steps, page_stats = search(engine, root, rules, mine)
        n_return = num_beams if num_return_sequences is None else num_return_sequences
        beams = [
            Beam(h.ids, h.score, "eos" if h.ids and h.ids[-1] in eos else "length")
            for h in rules.finished[:n_return]
        ]
        return BeamResult(beams, steps, *page_stats, rules.eos_kept)
    finally:
        for branch in mine.values():
            engine.free(branch)


class _Rules:
    """HF's bookkeeping of one search (the module docstring's rules): which candidates finish,
    which run on, when to stop. Both search paths feed it each step's candidates."""

    def __init__(
        self,
        k: int,
        eos: tuple[int, ...],
        max_new_tokens: int,
        length_penalty: float,
        early_stopping: bool | str,
    ) -> None:
        self.k, self.eos, self.max_new_tokens = k, eos, max_new_tokens
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.num_cand = max(2, 1 + len(eos)) * k  # enough that k candidates never end on EOS
        self.eos_set = frozenset(eos)
        self.finished: list[_Hypothesis] = []  # best first, at most k
        self.heuristic_open = True  # HF's "is_early_stop_heuristic_unsatisfied"
        self.eos_kept = 0

    def step(
        self,
        step: int,
        cand_scores: torch.Tensor,
        cand_tok: list[int],
        ids_of: Callable[[int], list[int]],
        next_c: list[int] | None = None,
    ) -> tuple[list[int], torch.Tensor, bool]:
        """Take step ``step``'s candidates (scores [K] fp32 on the host, best first; tokens;
        ``ids_of(c)``: candidate ``c``'s new ids). Returns the next running beams' candidates
        (``next_c``: already chosen by the device), their scores [k], and whether to stop."""
        k, lp = self.k, self.length_penalty
        gen_len = step + 1  # new tokens in every candidate, this one included
        last = gen_len >= self.max_new_tokens
        hit = [last or t in self.eos_set for t in cand_tok]  # ends: an EOS or the last token
        adjusted = cand_scores  # [K] (most steps nothing ends: no tensor work)
        if any(hit[:k]):
            # Finished hypotheses: the hitting candidates among the first k, length-penalised
            # (fp32, as HF's).
            fin_scores = cand_scores / (gen_len**lp)
            new = [
                (float(fin_scores[c]), c)
                for c in range(k)
                if hit[c] and math.isfinite(float(fin_scores[c]))
            ]
            self.finished, taken = _merge_finished(self.finished, new, k)
            for i, c in taken:
                self.finished[i] = _Hypothesis(self.finished[i].score, ids_of(c))
                self.eos_kept += cand_tok[c] in self.eos_set
        if any(hit):  # next running beams: the k best candidates that did not hit
            adjusted = cand_scores + torch.tensor(hit, dtype=torch.float32) * _NEG
        if next_c is None:
            next_c = torch.topk(adjusted.view(1, -1), k).indices[0].tolist()
        run_scores = adjusted[next_c]

        # Stop? HF's early-stop heuristic (sticky), early_stopping=True, or all hit.
        never = self.early_stopping == "never" and lp > 0.0
        best_len = self.max_new_tokens if never else gen_len
        best_possible = float(run_scores[0] / (best_len**lp))
        worst_finished = min(h.score for h in self.finished) if len(self.finished) == k else _NEG
        self.heuristic_open = self.heuristic_open and best_possible > worst_finished
        all_finished = len(self.finished) == k and self.early_stopping is True
        stop = not self.heuristic_open or all_finished or all(hit)
        return next_c, run_scores, stop


_PageStats = tuple[int, int, int, int, int]  # BeamResult's page fields


def _search_tree(
    engine: Engine, root: Branch, rules: _Rules, mine: dict[int, Branch]
) -> tuple[int, _PageStats]:
    """Beams as branches of the KV tree: forked, extended and freed as they are chosen."""
    k = rules.k
    pages = _PageMeter(engine)
    rows: list[Branch] = [root]  # the distinct branches fed together each step
    slot_row = [0] * k  # beam slot -> row in `rows` (_DEAD: masked out, no branch)
    run_scores = torch.full((k,), _NEG, dtype=torch.float32)  # [k] sums of log-probs
    run_scores[0] = 0.0  # the k initial slots are all the prompt: only the first counts
    steps = 0
    for step in range(rules.max_new_tokens):
        logits = engine.forward(rows)  # [R, V] fp32; rows now have nothing pending
        steps += 1
        pages.measure(rows, slot_row)
        logp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
        allowed = engine.allowed_tokens(rows)
        if allowed is not None:
            logp = logp.masked_fill(~allowed.to(logp.device), float("-inf"))
        cand_scores, cand_slot, cand_tok = _top_candidates(
            logp, slot_row, run_scores, rules.num_cand
        )
        ids_of = _branch_ids(engine, rows, slot_row, cand_slot, cand_tok)
        next_c, run_scores, stop = rules.step(step, cand_scores, cand_tok, ids_of)
        if stop:
            break
        parents = [
            slot_row[cand_slot[c]] if math.isfinite(float(run_scores[s])) else _DEAD
            for s, c in enumerate(next_c)
        ]
        if all(p == _DEAD for p in parents):
            break  # every continuation is masked out: nothing can grow
        rows, slot_row = _regrow(engine, rows, parents, [cand_tok[c] for c in next_c], mine)
    return steps, pages.result()


def _branch_ids(
    engine: Engine,
    rows: list[Branch],
    slot_row: list[int],
    cand_slot: list[int],
    cand_tok: list[int],
) -> Callable[[int], list[int]]:
    """``ids_of`` for :meth:`_Rules.step`: candidate ``c`` extends the branch of its slot
    (looked up only for the candidates that finish)."""
    return lambda c: [*engine.output_ids(rows[slot_row[cand_slot[c]]]), cand_tok[c]]


def _search_pipelined(
    engine: Engine, root: Branch, rules: _Rules, mine: dict[int, Branch]
) -> tuple[int, _PageStats]:
    """Beams kept on the device, off the KV tree: the host prepares step ``t + 1`` while the
    device runs step ``t``, and reads each step's candidates one step late.

    The tree path waits for every step's candidates before it can fork, free and extend the
    branches the next step reads; on the H200 that host work (~0.65 ms) ran serialised with
    each step's ~1.3 ms of GPU. Here the next step needs nothing from the host:

    - Each beam *slot* ``s`` owns one page ``own[s][j]`` per page index ``j`` its new tokens
      can reach (taken from the pool for the whole search). Slot ``s`` writes its token at
      position ``p`` into ``own[s][p // P]``, whichever beam it holds.
    - A row reads the prompt's full pages (shared: level 0 of the cascade), then its full
      generated pages ``gen[s]``, then its own last page. After the device picks the next
      beams (``par``: each slot's source slot), ``gen = gen[par]``; a page that just filled
      joins ``gen`` (``own[par][j]``); a partial one is copied from the source slot's page
      (``PagePool.copy_slots``, every source read before any page is written).
    - The device picks candidates and beams as the tree path does (log-softmax, one top-k of
      ``K`` over ``k x V``, the ``k`` best that do not end) and queues the step's candidates
      to pinned host memory. The host feeds them to the same :class:`_Rules` one step late;
      when those say stop, the step already launched is dropped.

    Beam ids come from the recorded (source slot, token) pairs. The page statistics are taken
    after the last step (the pages held are constant: the prompt's and the slots' own).
    """
    engine_dev = engine.device
    k, K, P = rules.k, rules.num_cand, engine.pool.page_size
    max_new = rules.max_new_tokens
    logits = engine.forward([root])  # step 0: the prompt; its KV stays in the tree
    n = len(root)
    j0 = n // P
    root_pages = engine.tree.page_list(root.kv)
    shared = root_pages[:j0]
    J = _slot_pages(n, max_new, P)
    with engine.lock:
        taken = engine.pool.allocate(k * J)
    try:
        own = [taken[s * J : (s + 1) * J] for s in range(k)]
        own_dev = torch.tensor(own, dtype=torch.int32).reshape(k, J).to(engine_dev)
        gen = torch.zeros((k, J), dtype=torch.int32, device=engine_dev)
        if n % P and J:  # every slot's first page starts as the prompt's partial last page
            engine.pool.copy_pages([root_pages[j0]] * k, [o[0] for o in own], [n % P] * k)
        eos_dev = torch.tensor(rules.eos, dtype=torch.long, device=engine_dev)
        scores = torch.full((k,), _NEG, dtype=torch.float32, device=engine_dev)
        scores[0] = 0.0
        rows = torch.zeros(k, dtype=torch.long, device=engine_dev)  # step 0: all read row 0
        cuda = engine_dev.type == "cuda"
        record = torch.empty((max_new, 3 * K + k), dtype=torch.float64, pin_memory=cuda)
        ready: list[torch.cuda.Event | None] = []

        def select(logits: torch.Tensor, step: int) -> tuple[torch.Tensor, ...]:
            """The step's candidates and next beams on the device; queued to ``record``."""
            logp = torch.log_softmax(logits.float(), dim=-1)
            top_scores, slot, tok = _best_continuations(logp[rows] + scores[:, None], K)
            hits = torch.isin(tok, eos_dev) | (step + 1 >= max_new)
            adjusted = top_scores + hits.to(torch.float32) * _NEG
            next_c = torch.topk(adjusted.view(1, -1), k).indices[0]
            row = torch.cat([top_scores.double(), slot.double(), tok.double(), next_c.double()])
            record[step].copy_(row, non_blocking=cuda)
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                event.record()
            ready.append(event)
            return tok[next_c], slot[next_c], adjusted[next_c]

        lineage: list[tuple[list[int], list[int]]] = []  # per step: beams' (source, token)

        def ids_of_slot(s: int, step: int) -> list[int]:
            """New ids of the beam in slot ``s`` after step ``step``'s choice."""
            out: list[int] = []
            for par, tok in reversed(lineage[: step + 1]):
                out.append(tok[s])
                s = par[s]
            return out[::-1]

        def take(step: int) -> bool:
            """Feed step ``step``'s recorded candidates to the rules; whether to stop."""
            event = ready[step]
            if event is not None:
                event.synchronize()
            rec = record[step].tolist()
            cand_scores = torch.tensor(rec[:K], dtype=torch.float32)  # fp32 values: exact
            cand_slot = [int(x) for x in rec[K : 2 * K]]
            cand_tok = [int(x) for x in rec[2 * K : 3 * K]]
            next_c = [int(x) for x in rec[3 * K :]]
            prev = step - 1
            ids_of = lambda c: [*ids_of_slot(cand_slot[c], prev), cand_tok[c]]  # noqa: E731
            _, _, stop = rules.step(step, cand_scores, cand_tok, ids_of, next_c)
            lineage.append(([cand_slot[c] for c in next_c], [cand_tok[c] for c in next_c]))
            return stop

        tok, par, scores = select(logits, 0)
        rows = torch.arange(k, device=engine_dev)  # from now on row s is slot s
        steps = 1
        tables: list[torch.Tensor] = []  # each forward's own pages [k, j + 1]
        for t in range(1, max_new):
            p = n + t - 1  # the fed token's position
            j = p // P - j0
            own_now = torch.cat([gen[:, :j], own_dev[:, j : j + 1]], dim=1)
            tables.append(own_now)
            logits = engine._decode_pages(tok, p + 1, shared, [o[: j + 1] for o in own], own_now)
            steps += 1
            tok, par, scores = select(logits, t)
            if t + 1 < max_new:  # the pages the next step reads, by the new beams' sources
                gen = gen[par]
                if p % P == P - 1:  # the last page is full: it joins the shared ones
                    gen[:, j] = own_dev[par, j]
                else:  # whole pages (one kernel each way): the slots past the source's
                    # last token are rewritten by the slot's own steps before any reads them
                    engine.pool.copy_slots(own_dev[par, j], own_dev[:, j], P)
            if take(t - 1):  # the record of the step before (the device is past it)
                break
        else:
            take(max_new - 1)
        T = len(lineage)  # steps the rules took; the last fed the beams chosen at T - 2
        last = tables[T - 2] if T >= 2 else None
        beams = [ids_of_slot(s, T - 2) for s in range(k)] if T >= 2 else [[]]
        prompt = engine.tree.token_ids(root.kv)
        held = len(root_pages) + len(taken)
        return steps, _pipelined_pages(prompt, beams, lineage, held, last, P, k)
    finally:
        with engine.lock:
            engine.pool.release(taken)


def _slot_pages(prompt_len: int, max_new_tokens: int, page_size: int) -> int:
    """Pages each beam slot of a pipelined search owns: the page indices its fed tokens
    (positions ``prompt_len`` to ``prompt_len + max_new_tokens - 2``) reach."""
    if max_new_tokens < 2:
        return 0
    return (prompt_len + max_new_tokens - 2) // page_size - prompt_len // page_size + 1


def _pipelined_pages(
    prompt: list[int],
    beams: list[list[int]],
    lineage: list[tuple[list[int], list[int]]],
    held: int,
    last: torch.Tensor | None,
    page_size: int,
    k: int,
) -> _PageStats:
    """BeamResult's page fields for the pipelined path, after its last step: ``beams`` the new
    ids of the rows that step fed (``[[]]``: the prompt alone), ``last`` their own pages
    [k, c] (None: the prompt's pages), ``held`` the pages the search held throughout."""
    P, n = page_size, len(prompt)
    steps_fed = len(beams[0])  # new tokens in each fed row
    copy = k * -(-(n + steps_fed) // P)  # what a copy per beam would hold
    if steps_fed:  # distinct (step, slot) nodes on the fed rows' paths: one token each
        nodes: set[tuple[int, int]] = set()
        for s in range(k):
            for u in range(steps_fed - 1, -1, -1):
                if (u, s) in nodes:
                    break
                nodes.add((u, s))
                s = lineage[u][0][s]
        unique = n + len(nodes)
    else:
        unique = n
    j0 = n // P
    if last is None:
        read = -(-n // P)
    else:
        read = j0 + len(set(last.flatten().tolist()))
    tails = [prompt[j0 * P :] + b for b in beams]  # full prompt pages: shared by every row
    return held, copy, -(-unique // P), read, j0 + paged_minimum(tails, P)


def _top_candidates(
    logp: torch.Tensor, slot_row: list[int], run_scores: torch.Tensor, num_cand: int
) -> tuple[torch.Tensor, list[int], list[int]]:
    """The ``num_cand`` best (slot, token) continuations: scores [K] (sorted, on CPU), slots,
    tokens.

    ``logp`` is [R, V] per distinct branch; slot ``s`` reads row ``slot_row[s]``, so the first
    step scores the prompt's single row for all k slots, as HF's k identical copies would.
    """
    dead = torch.tensor([r == _DEAD for r in slot_row])
    scores = run_scores.masked_fill(dead, float("-inf")).to(logp.device)  # [k]
    rows = torch.tensor([max(r, 0) for r in slot_row], device=logp.device)
    top_scores, slot, tok = _best_continuations(logp[rows] + scores[:, None], num_cand)
    return top_scores.cpu(), slot.tolist(), tok.tolist()


def _best_continuations(acc: torch.Tensor, num_cand: int) -> tuple[torch.Tensor, ...]:
    """The ``num_cand`` best entries of ``acc`` [k, V] (scores, sorted; their rows; their
    columns): HF's one top-k over the flattened ``[1, k * V]``, taken as each row's best
    ``num_cand`` and then the best of those (the same entries; on the GPU a few kernels
    instead of a radix select's many). Equal scores at the cut may come in another order,
    as they may from one flat top-k on another device."""
    n = min(num_cand, acc.shape[-1])
    row_scores, row_idx = torch.topk(acc, n, dim=-1)  # [k, n]
    top_scores, pick = torch.topk(row_scores.view(1, -1), num_cand)  # [1, K]
    pick = pick[0]
    return top_scores[0], pick // n, row_idx.view(-1)[pick]


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
