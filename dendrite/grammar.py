"""Grammar-constrained generation with llguidance: JSON schemas, regexes and Lark grammars.

A :class:`Grammar` is compiled once (and checked then: a grammar that does not compile raises
:class:`~dendrite.errors.GrammarError` before any token is generated) and is immutable; every
branch gets its own :class:`GrammarMatcher`, a ``deep_copy`` of the compiled prototype, which
implements :class:`~dendrite.grammar_base.BranchConstraint`. Forking a branch forks its matcher
(``deep_copy`` again: about a microsecond, independent of how much text it has matched).

Each engine step asks :func:`fill_masks` for the allowed tokens of the whole batch: one call to
llguidance's ``fill_next_token_bitmask_par``, which computes every row's bitmask in parallel
on llguidance's own thread pool (it releases the GIL), then one ``numpy.unpackbits`` into the
``[B, V]`` bool mask the sampler wants::

    bitmask  int32 [R, ceil(n/32)]    token t is bit (t % 32) of word t // 32 (little-endian)
    unpack   uint8 [R, 32*ceil(n/32)] bytes in memory order, bits least significant first
    allowed  bool  [B, V]             constrained rows <- unpack[:, :n]; ids n..V-1 -> False;
                                      rows without a constraint stay all True

where ``n`` is the tokenizer's vocabulary and ``V`` the model's (often padded larger).

Example::

    g = Grammar.regex(r"[0-9]{3}-[a-z]{2,4}", engine.tokenizer)
    b = engine.add("", SamplingParams(temperature=1.0), constraint=g.matcher())
    engine.run([b])
    engine.text(b)  # '042-xyz'
    g.stats         # forks, masks and the time spent in each

State: the llguidance tokenizer (about a second to build for a 128k vocabulary) is cached on
the :class:`~dendrite.model.tokenizer.Tokenizer` object itself, so it lives and dies with it;
the only module-level object is the llguidance thread pool, created on first use and
stateless between calls, so re-running notebook cells is harmless.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.numpy as llg_np
import numpy as np
import torch

from dendrite.errors import GrammarError
from dendrite.grammar_base import BranchConstraint
from dendrite.model.tokenizer import Tokenizer
from dendrite.sampling import SamplingParams

if TYPE_CHECKING:
    from dendrite.engine import Branch, Engine

_LLG_ATTR = "_llguidance_tokenizer"  # where the LLTokenizer is cached on a Tokenizer


@dataclass
class GrammarStats:
    """Running counters of one grammar's matchers, for benchmarks (``reset()`` zeroes them).

    A :func:`fill_masks` call is charged, in full, to each grammar with rows in its batch.
    """

    forks: int = 0
    fork_s: float = 0.0
    mask_calls: int = 0
    mask_rows: int = 0
    mask_s: float = 0.0
    tokens: int = 0  # consumed
    consume_s: float = 0.0

    def reset(self) -> None:
        for f in self.__dataclass_fields__:
            setattr(self, f, type(getattr(self, f))())


@dataclass(frozen=True, eq=False)
class Grammar:
    """A compiled grammar over one tokenizer. Build with :meth:`json_schema`, :meth:`regex`
    or :meth:`lark`; call :meth:`matcher` once per branch."""

    kind: str  # json_schema | regex | lark
    source: str  # what the user gave (the schema as JSON text)
    llg_grammar: str  # llguidance's grammar text
    llg_tokenizer: llguidance.LLTokenizer
    warnings: tuple[str, ...]
    _proto: llguidance.LLMatcher = field(repr=False)  # compiled, never advanced
    stats: GrammarStats = field(default_factory=GrammarStats, repr=False)

    @classmethod
    def json_schema(
        cls, schema: dict[str, Any] | str, tokenizer: Tokenizer, *, compact: bool = True
    ) -> Grammar:
        """JSON matching ``schema`` (a dict or JSON text).

        ``compact`` allows no whitespace between tokens (``{"a":1,"b":[2]}``): shorter outputs,
        and a weak model cannot wander off into spaces. A schema's own ``x-guidance`` options
        override it.
        """
        source = schema if isinstance(schema, str) else json.dumps(schema)
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": not compact}
            )
        except (ValueError, TypeError) as e:
            raise GrammarError(f"the JSON schema is not a JSON object: {e}") from None
        return cls._compile("json_schema", source, text, tokenizer)

    @classmethod
    def regex(cls, pattern: str, tokenizer: Tokenizer) -> Grammar:
        """Text matching the whole of ``pattern`` (Rust regex syntax, anchored at both ends)."""
        text = llguidance.LLMatcher.grammar_from_regex(pattern)
        return cls._compile("regex", pattern, text, tokenizer)

    @classmethod
    def lark(cls, text: str, tokenizer: Tokenizer) -> Grammar:
        """Text in the language of a Lark grammar (llguidance's dialect; rule ``start``)."""
        llg = llguidance.LLMatcher.grammar_from_lark(text)
        return cls._compile("lark", text, llg, tokenizer)

    @classmethod
    def _compile(cls, kind: str, source: str, text: str, tokenizer: Tokenizer) -> Grammar:
        lt = llg_tokenizer(tokenizer)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, lt)
        if is_error:
            raise GrammarError(f"the {kind} grammar does not compile: {messages[0]}")
        proto = llguidance.LLMatcher(lt, text, log_level=0)
        if proto.is_error():
            raise GrammarError(f"the {kind} grammar does not compile: {proto.get_error()}")
        return cls(kind, source, text, lt, tuple(messages), proto)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary (the model's may be larger: those ids are never allowed)."""
        return int(self.llg_tokenizer.vocab_size)

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar, for one branch."""
        return GrammarMatcher(self, self._proto.deep_copy())

    def __repr__(self) -> str:
        src = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"Grammar.{self.kind}({src!r})"


class GrammarMatcher:
    """One branch's position in a :class:`Grammar` (a :class:`BranchConstraint`).

    EOS is special: it is allowed whenever the text so far is accepted, consuming it stops the
    matcher, and consuming more EOS tokens after the matcher has stopped is a no-op (they are
    counted, so :meth:`rollback` still undoes exactly what :meth:`consume` took).
    """

    __slots__ = ("_extra_eos", "grammar", "ll")

    def __init__(self, grammar: Grammar, ll: llguidance.LLMatcher, extra_eos: int = 0) -> None:
        self.grammar = grammar
        self.ll = ll  # the llguidance matcher (public for inspection; advance it via consume)
        self._extra_eos = extra_eos  # EOS tokens consumed after the matcher had stopped

    def fork(self) -> GrammarMatcher:
        t0 = time.perf_counter()
        child = GrammarMatcher(self.grammar, self.ll.deep_copy(), self._extra_eos)
        stats = self.grammar.stats
        stats.fork_s += time.perf_counter() - t0
        stats.forks += 1
        return child

    def consume(self, tokens: Sequence[int]) -> None:
        """Advance over ``tokens``; GrammarError, with nothing consumed, if any is not allowed."""
        toks = [int(t) for t in tokens]
        if not toks:
            return
        t0 = time.perf_counter()
        ll, lt = self.ll, self.grammar.llg_tokenizer
        if ll.is_error():
            raise GrammarError(f"the grammar matcher failed earlier: {_first_line(ll.get_error())}")
        bad = [t for t in toks if not 0 <= t < lt.vocab_size]
        if bad:
            raise GrammarError(
                f"token id(s) {bad[:5]} outside the grammar tokenizer's {lt.vocab_size} tokens"
            )
        n = ll.validate_tokens(toks)
        if n < len(toks):
            eos = set(lt.eos_tokens)
            if all(t in eos for t in toks[n:]):  # EOS after a complete match: stop there
                probe = ll.deep_copy()
                if probe.consume_tokens(toks[:n]) and probe.is_stopped():
                    self.ll = probe
                    self._extra_eos += len(toks) - n
                    self._count(len(toks), t0)
                    return
            state = f"stopped ({ll.stop_reason()})" if ll.is_stopped() else "here"
            raise GrammarError(
                f"the {self.grammar.kind} grammar does not allow token {toks[n]} "
                f"{lt.dbg_tokens([toks[n]])} at position {n} of {len(toks)} "
                f"(the grammar is {state}); nothing was consumed"
            )
        if not ll.consume_tokens(toks):  # validated above: only an llguidance fault gets here
            raise GrammarError(f"the grammar matcher failed: {_first_line(ll.get_error())}")
        self._count(len(toks), t0)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` consumed (e.g. when a step fails after consuming)."""
        if num_tokens < 0:
            raise GrammarError(f"cannot roll back {num_tokens} tokens")
        extra = min(num_tokens, self._extra_eos)
        rest = num_tokens - extra
        if rest:
            probe = self.ll.deep_copy()  # a failed rollback leaves llguidance in an error state
            if not probe.rollback(rest):
                raise GrammarError(
                    f"cannot roll back {num_tokens} tokens: {_first_line(probe.get_error())}"
                )
            self.ll = probe
        self._extra_eos -= extra

    def _count(self, n: int, t0: float) -> None:
        stats = self.grammar.stats
        stats.consume_s += time.perf_counter() - t0
        stats.tokens += n

    def is_finished(self) -> bool:
        """True when the grammar admits nothing more (EOS was taken, or no extension exists)."""
        return bool(self.ll.is_stopped())

    def is_accepting(self) -> bool:
        """True when the text so far is a complete match."""
        ll = self.ll
        if ll.is_error():
            return False
        return bool(ll.is_accepting() or ll.stop_reason() == "EndOfSentence")

    @property
    def error(self) -> str:
        """llguidance's error message, or "" while the matcher is healthy."""
        return str(self.ll.get_error())

    def __repr__(self) -> str:
        state = "finished" if self.is_finished() else "accepting" if self.is_accepting() else ""
        return f"GrammarMatcher({self.grammar!r}{', ' + state if state else ''})"


def llg_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """llguidance's view of ``tokenizer`` (built once, then cached on the tokenizer object)."""
    if tokenizer is None:
        raise GrammarError("a grammar needs the model's tokenizer, and this engine has none")
    cached = getattr(tokenizer, _LLG_ATTR, None)
    if cached is None:
        import llguidance.hf

        try:
            cached = llguidance.hf.from_tokenizer(tokenizer.hf)
        except ValueError as e:
            fixed = _with_byte_decoder(tokenizer.hf)
            if fixed is None:
                raise GrammarError(f"llguidance cannot use this tokenizer: {e}") from None
            cached = llguidance.hf.from_tokenizer(fixed)
        setattr(tokenizer, _LLG_ATTR, cached)
    return cached


def _with_byte_decoder(hf: Any) -> Any:
    """A character-level tokenizer whose decoder is a bare ``Fuse`` (the shipped model's):
    llguidance needs a decoder it knows. ``Replace("▁", " ") + ByteFallback + Fuse`` decodes
    the same text for such a vocabulary (no ``▁`` or ``<0xNN>`` tokens), so use that copy."""
    from tokenizers import Tokenizer as RawTokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(hf.backend_tokenizer.to_str())
    if (spec.get("decoder") or {}).get("type") != "Fuse":
        return None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
        ],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=RawTokenizer.from_str(json.dumps(spec)),
        bos_token=hf.bos_token,
        eos_token=hf.eos_token,
        unk_token=hf.unk_token,
        pad_token=hf.pad_token,
    )


def _first_line(message: str) -> str:
    """llguidance's runtime errors append a dump of the parser state; keep the sentence."""
    return message.strip().split("\n", 1)[0]


@functools.cache
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for batched masks (stateless between calls)."""
    return llguidance.LLExecutor()


def fill_masks(constraints: Sequence[BranchConstraint | None], vocab_size: int) -> torch.Tensor:
    """Allowed next tokens of a batch: bool ``[B, vocab_size]``, True = allowed.

    Rows whose constraint is None are all True. Every other constraint must be a
    :class:`GrammarMatcher`; their masks are computed together, in parallel, by llguidance.
    """
    t0 = time.perf_counter()
    # numpy, not torch: torch's intra-op threads stall for milliseconds on a busy CPU, and
    # these are a few microseconds of single-threaded work
    allowed = np.ones((len(constraints), vocab_size), dtype=np.bool_)  # [B, V]
    groups: dict[int, list[tuple[int, GrammarMatcher]]] = {}  # tokenizer vocab -> rows
    for i, c in enumerate(constraints):
        if c is None:
            continue
        if not isinstance(c, GrammarMatcher):
            raise GrammarError(
                f"fill_masks handles GrammarMatcher constraints only, got {type(c).__name__}"
            )
        groups.setdefault(c.grammar.vocab_size, []).append((i, c))
    for n, rows in groups.items():  # one group unless the batch mixes tokenizers
        bitmask = llg_np.allocate_token_bitmask(len(rows), n)  # int32 [R, ceil(n/32)]
        llg_np.fill_next_token_bitmask_par(
            _executor(), [(c.ll, r) for r, (_, c) in enumerate(rows)], bitmask
        )
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")  # [R, 32*W]
        k = min(n, vocab_size)
        idx = np.array([i for i, _ in rows], dtype=np.intp)  # [R]
        allowed[idx, :k] = bits[:, :k].view(np.bool_)
        allowed[idx, k:] = False
        empty = np.flatnonzero(~allowed[idx].any(axis=1))
        if empty.size:
            i, c = rows[int(empty[0])]
            raise GrammarError(
                f"the grammar of row {i} allows no token of the model's {vocab_size} "
                f"({_first_line(c.error) or 'no token of the tokenizer fits'})"
            )
    dt = time.perf_counter() - t0
    for rows in groups.values():
        for g in {id(c.grammar): c.grammar for _, c in rows}.values():
            g.stats.mask_calls += 1
            g.stats.mask_rows += sum(c.grammar is g for _, c in rows)
            g.stats.mask_s += dt
    return torch.from_numpy(allowed)


def grammar_timings(
    engine: Engine,
    grammar: Grammar,
    n: int = 50,
    *,
    batch_sizes: Sequence[int] = (1, 25),
    prompt: str | Sequence[int] | None = None,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Median cost of a matcher fork and of one step's masks, measured on real generation.

    For each batch size B it keeps B sampled branches (temperature 1) generating under
    ``grammar``, replacing each one that finishes, and before each of ``n`` steps times one
    :func:`fill_masks` over the batch and one ``fork()`` of every matcher (the copies are
    dropped). Returns microseconds: ``fork_us`` (median over all forks), ``mask_us_b{B}`` (per
    call) and ``mask_us_per_row_b{B}``. The engine's branches are freed afterwards.
    """
    params = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)
    vocab = engine.model_config.vocab_size
    forks: list[float] = []
    out: dict[str, Any] = {"grammar": repr(grammar), "n": n}
    next_seed = seed
    for size in batch_sizes:
        live: list[Branch] = []
        masks: list[float] = []
        try:
            while len(masks) < n:
                while len(live) < size:
                    m = grammar.matcher()
                    live.append(engine.add(prompt, params, seed=next_seed, constraint=m))
                    next_seed += 1
                cons = [b.constraint for b in live]
                t0 = time.perf_counter()
                fill_masks(cons, vocab)
                masks.append(time.perf_counter() - t0)
                for c in cons:
                    assert c is not None
                    t0 = time.perf_counter()
                    c.fork()
                    forks.append(time.perf_counter() - t0)
                engine.step(live)
                for b in [b for b in live if b.finished]:
                    engine.free(b)
                    live.remove(b)
        finally:
            for b in live:
                engine.free(b)
        out[f"mask_us_b{size}"] = statistics.median(masks) * 1e6
        out[f"mask_us_per_row_b{size}"] = out[f"mask_us_b{size}"] / size
    out["fork_us"] = statistics.median(forks) * 1e6
    return out


__all__ = [
    "Grammar",
    "GrammarMatcher",
    "GrammarStats",
    "fill_masks",
    "grammar_timings",
    "llg_tokenizer",
]
