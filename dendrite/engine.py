"""The engine: model + KV tree + attention backend + sampler, one batched forward per step.

A :class:`Branch` is a live sequence: a handle on the KV tree plus the tokens it has not fed
to the model yet (``pending``: the prompt at first, then the last sampled token). ``step``
takes every given branch with pending tokens into one ragged batch (prompt chunks and decode
tokens mixed), runs the model once, and samples every branch's next token in one vectorised
draw with its own parameters, its noise keyed by its seed and position. ``fork`` is O(1): the
KV tree forks its handle and the new branch shares the (immutable) pending tuple; seeds of
forks are derived, so trees are reproducible.

On CUDA with FlashInfer, decode-only steps replay CUDA graphs bucketed by batch size
(``cuda_graphs.py``) and the model uses FlashInfer's fused small kernels; prefill and mixed
steps run eagerly. Either way one step is one forward. A float32 model on CUDA takes the
FlashInfer backend's float32 mode: the same graphs, their attention and GEMMs on Triton
kernels at fp32 precision (3xTF32 products: ``skinny.py``, ``gemm32.py``), the torch
reference's attention for eager steps (for results that round as an fp32 reference does:
HF's fp32 beams).

Every call validates before it changes anything; a step that fails part-way (an exception in
sampling, a KeyboardInterrupt) rolls its appends back, so the pool and tree stay consistent.

With ``EngineConfig(prefix_cache=True)`` freed branches stay cached in the KV tree and ``add``
reuses the longest cached prefix of a prompt (``dendrite/kv/prefix.py``). Public methods hold
``engine.lock`` (re-entrant), so a search may run in a background thread while a notebook
inspects the engine (see :class:`Engine`).
"""

from __future__ import annotations

import functools
import importlib.util
import operator
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, TypeVar, cast

import torch

from dendrite.attention.base import PREFILL_KERNELS, AttentionBackend, build_layout
from dendrite.attention.cascade import CASCADE_MAX_DEPTH, PREFIX_KERNELS
from dendrite.attention.torch_ref import TorchBackend
from dendrite.errors import (
    BranchError,
    ConfigError,
    ContextLengthError,
    InvalidTokenError,
    PoolExhaustedError,
)
from dendrite.grammar_base import BranchConstraint
from dendrite.kv.pool import PagePool, PoolConfig
from dendrite.kv.prefix import PrefixCache, PrefixStats
from dendrite.kv.tree import KVBranch, KVTree, Segment, TreeStats
from dendrite.model.config import ModelConfig
from dendrite.model.loader import load_model
from dendrite.model.tokenizer import Tokenizer, load_tokenizer
from dendrite.model.transformer import Transformer
from dendrite.sampling import SamplingParams, derive_seed, noise_keys, sample, sample_packed
from dendrite.telemetry import Telemetry

if TYPE_CHECKING:
    from dendrite.cuda_graphs import DecodeGraphs

Prompt = str | Sequence[int] | None

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _locked(fn: Callable[Concatenate[Engine, _P], _R]) -> Callable[Concatenate[Engine, _P], _R]:
    """Run an :class:`Engine` method holding the engine's re-entrant lock."""

    @functools.wraps(fn)
    def wrapper(self: Engine, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        with self.lock:
            return fn(self, *args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int | None = None  # None: fill kv_memory_bytes
    kv_memory_bytes: int = 512 * 2**20
    backend: str = "auto"  # auto | torch | flashinfer
    cuda_graphs: bool = True  # decode steps as CUDA graphs (CUDA + FlashInfer only)
    pipeline: str = "auto"  # run(): prepare step n + 1 while n runs (auto: with CUDA graphs)
    fused_kernels: bool = True  # FlashInfer norms / RoPE / SiLU, Triton GEMVs and GEMMs (CUDA)
    prefix_cache: bool = False  # keep freed segments; add() reuses the longest cached prefix
    cache_watermark: int = 0  # evict cached pages (LRU) while fewer than this many are free
    cascade: bool = True  # decode over shared prefixes as a cascade (FlashInfer backend only)
    cascade_min_saved_pages: int | None = None  # when a step's cascade pays (None: what
    cascade_min_group_pages: int | None = None  # bench gpu --part cascade measured, cascade.py)
    cascade_prefix_kernel: str = "triton"  # level 0: triton (split states, one merge) | flashinfer
    cascade_max_depth: int | None = None  # shared levels by depth (None: cascade.py's; 1: two)
    prefill_kernel: str = "auto"  # FlashInfer's prompts: auto (FA3 on Hopper) | fa2 | fa3

    def __post_init__(self) -> None:
        if not isinstance(self.page_size, int) or self.page_size < 1:
            raise ConfigError(f"page_size must be a positive int, got {self.page_size!r}")
        if self.num_pages is not None and (
            not isinstance(self.num_pages, int) or self.num_pages < 1
        ):
            raise ConfigError(f"num_pages must be a positive int, got {self.num_pages!r}")
        if not isinstance(self.cache_watermark, int) or self.cache_watermark < 0:
            raise ConfigError(
                f"cache_watermark must be a non-negative int, got {self.cache_watermark!r}"
            )
        for name in ("cascade_min_saved_pages", "cascade_min_group_pages"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive int or None, got {value!r}")
        if self.pipeline not in ("auto", "on", "off"):
            raise ConfigError(f"pipeline must be auto, on or off, got {self.pipeline!r}")
        if self.backend not in ("auto", "torch", "flashinfer"):
            raise ConfigError(f"backend must be auto, torch or flashinfer, got {self.backend!r}")
        if self.cascade_max_depth is not None and (
            not isinstance(self.cascade_max_depth, int)
            or not 1 <= self.cascade_max_depth <= CASCADE_MAX_DEPTH
        ):
            raise ConfigError(
                f"cascade_max_depth must be 1..{CASCADE_MAX_DEPTH} or None, got "
                f"{self.cascade_max_depth!r}"
            )
        if self.prefill_kernel not in PREFILL_KERNELS:
            raise ConfigError(
                f"prefill_kernel must be one of {PREFILL_KERNELS}, got {self.prefill_kernel!r}"
            )
        if self.cascade_prefix_kernel not in PREFIX_KERNELS:
            raise ConfigError(
                f"cascade_prefix_kernel must be one of {PREFIX_KERNELS}, got "
                f"{self.cascade_prefix_kernel!r}"
            )


class Branch:
    """One live sequence. Create with :meth:`Engine.add` or :meth:`Engine.fork`."""

    __slots__ = (
        "_seed",
        "_seed_src",
        "constraint",
        "finish_reason",
        "forks",
        "id",
        "kv",
        "num_generated",
        "params",
        "pending",
        "pending_logprobs",
        "prompt_len",
    )

    def __init__(
        self,
        kv: KVBranch,
        pending: tuple[int, ...],
        pending_logprobs: tuple[float, ...],
        params: SamplingParams,
        seed: int | None,
        prompt_len: int,
        num_generated: int = 0,
    ) -> None:
        self.id = kv.id
        self.kv = kv
        self.pending = pending
        self.pending_logprobs = pending_logprobs
        self.params = params
        self._seed = seed
        self._seed_src: tuple[Branch, int] | None = None
        self.prompt_len = prompt_len
        self.num_generated = num_generated
        self.finish_reason: str | None = None
        self.forks = 0
        self.constraint: BranchConstraint | None = None  # grammar state, forks with the branch

    @property
    def seed(self) -> int:
        """This branch's sampling seed (a fork's is derived from its parent's on first use)."""
        if self._seed is None:
            assert self._seed_src is not None
            parent, index = self._seed_src
            self._seed = derive_seed(parent.seed, index)
            self._seed_src = None
        return self._seed

    @property
    def alive(self) -> bool:
        return self.kv.alive

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __len__(self) -> int:
        """Tokens in the sequence (in KV plus pending)."""
        return len(self.kv) + len(self.pending)

    def __repr__(self) -> str:
        return (
            f"Branch(id={self.id}, len={len(self)}, generated={self.num_generated}, "
            f"finish={self.finish_reason})"
        )


def _take(x: torch.Tensor, index: list[int]) -> torch.Tensor:
    """``x[index]`` without waiting for the GPU: ``torch.tensor(..., device=cuda)`` copies
    synchronously (the stream drains first), a pinned buffer's copy does not."""
    if index == list(range(len(x))):
        return x
    idx = torch.tensor(index)
    if x.is_cuda:
        idx = idx.pin_memory().to(x.device, non_blocking=True)
    return x.index_select(0, idx)


def _row_keys(rows: list[Branch]) -> list[int | None]:
    """Each row's noise key for the token it draws now (None for greedy rows, whose seed is
    not read: a fork's is derived only when it samples)."""
    sampled = [b for b in rows if not b.params.greedy]
    keys = iter(noise_keys([b.seed for b in sampled], [len(b.kv) for b in sampled]))
    return [None if b.params.greedy else next(keys) for b in rows]


class _InFlight:
    """A launched pipelined decode step whose samples the host has not read yet."""

    __slots__ = ("dead", "done", "event", "host", "logged", "rows", "t0", "tokens")

    def __init__(
        self,
        rows: list[Branch],
        tokens: torch.Tensor,
        host: torch.Tensor,
        event: torch.cuda.Event | None,
        t0: float,
    ) -> None:
        self.rows = rows
        self.tokens = tokens  # [B] samples on the device: the next step's input
        self.host = host  # [2, B] tokens and log-probs, copied over asynchronously
        self.event = event  # set when `host` holds them (None on CPU: it already does)
        self.t0 = t0
        self.dead: set[int] = set()  # rows that finished before this step: results dropped
        self.done: set[int] = set()  # rows whose sample has been applied
        self.logged = False


class StepOutput(NamedTuple):
    branch: int
    token: int
    logprob: float
    finish_reason: str | None
    logits: torch.Tensor | None = None  # [V] fp32, when step(keep_logits=True)


class Generation(NamedTuple):
    prompt_ids: list[int]
    output_ids: list[int]
    text: str | None
    logprobs: list[float]
    finish_reason: str | None


class Score(NamedTuple):
    logprob: float  # sum over the continuation
    token_logprobs: list[float]


class Engine:
    """Batched generation over a KV tree. Build with :meth:`from_pretrained`.

    Threads: every public method that reads or changes branches, the KV tree or the pool
    holds ``engine.lock`` (a :class:`threading.RLock`) for its whole call, so a search running
    in a background thread and a notebook's UI calls (``stats``, ``fork``/``free`` of other
    branches, ``check_integrity``) interleave between whole calls, never inside one. The lock
    is re-entrant: methods call each other freely, and a caller may hold ``with engine.lock:``
    around several calls to make them one atomic unit. ``run`` and ``generate`` hold it for
    their whole call too: other threads get in once they return. Objects built on the engine (a
    ``SearchTree``) are not covered: read them from another thread only where a lost race
    is harmless (``to_frame`` of a tree that only grows). ``engine.tree`` and ``engine.pool``
    read directly bypass the lock; call them inside ``with engine.lock:``.

    Prefix cache (``EngineConfig(prefix_cache=True)``): freed branches' segments stay in the
    KV tree, ``add`` starts a new branch on the longest cached prefix of its prompt (at page
    granularity; see ``dendrite/kv/prefix.py``) and feeds only the rest. Unreferenced cached
    pages are evicted least-recently-used when fewer than ``cache_watermark`` pages are free
    and always before a step would run out of pages; :meth:`clear_cache` drops them all.
    A step that cannot get its pages even with the cache empty raises
    :class:`~dendrite.errors.PoolExhaustedError` having changed nothing (the cache may have
    been evicted: that changes no live branch).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer | None = None,
        config: EngineConfig | None = None,
        backend: AttentionBackend | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.model_config: ModelConfig = model.config
        mc = self.model_config
        self.device = model.device
        self.dtype = model.dtype
        pool_cfg = PoolConfig(
            num_layers=mc.num_layers,
            num_pages=1,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            page_size=self.config.page_size,
            dtype=self.dtype,
            device=self.device,
        )
        num_pages = self.config.num_pages or max(
            64, self.config.kv_memory_bytes // pool_cfg.page_bytes
        )
        pool_cfg = PoolConfig(**{**pool_cfg.__dict__, "num_pages": int(num_pages)})
        self.telemetry = Telemetry()
        self.lock = threading.RLock()  # see the class docstring
        self.pool = PagePool(pool_cfg, self.telemetry)
        self.tree = KVTree(self.pool)
        self.prefix: PrefixCache | None = None
        if self.config.prefix_cache:
            self.prefix = self.tree.enable_cache(self.config.cache_watermark)
        self.backend: AttentionBackend = backend or _make_backend(
            self.config.backend, self.pool, mc, self.config
        )
        self.branches: dict[int, Branch] = {}
        self.num_steps = 0  # batched forwards run so far
        # seconds the host has waited for a pipelined step's samples (the GPU was behind);
        # the rest of a pipelined run's time the host was preparing and launching steps
        self.sample_wait_s = 0.0
        on_flashinfer = self.backend.name == "flashinfer" and self.device.type == "cuda"
        if on_flashinfer and self.config.fused_kernels:
            model.use_flashinfer_kernels()
        if self.device.type == "cuda" and self.config.fused_kernels:
            model.use_gemv_kernels()  # one-row steps: Triton GEMVs (fp16/bf16 only)
            model.use_skinny_kernels()  # steps of 2-16 rows: split-K Triton GEMMs (fp32: all)
        # the pick of a step without grammar in Triton kernels: greedy rows (dendrite.greedy),
        # top-k / temperature sampled rows (dendrite.sampled_pick)
        self._fused_pick = (
            self.device.type == "cuda"
            and self.config.fused_kernels
            and importlib.util.find_spec("triton") is not None
        )
        self._use_graphs = on_flashinfer and self.config.cuda_graphs
        self._graphs: DecodeGraphs | None = None  # built at the first decode step
        self.graphs_error: str | None = None  # why CUDA graphs were turned off, if they were
        eos: set[int] = set(mc.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids: tuple[int, ...] = tuple(sorted(eos))
        self.bos_token_id = mc.bos_token_id
        if tokenizer is not None and tokenizer.bos_token_id is not None:
            self.bos_token_id = tokenizer.bos_token_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        page_size: int = 16,
        num_pages: int | None = None,
        backend: str = "auto",
        cuda_graphs: bool = True,
        fused_kernels: bool = True,
        prefix_cache: bool = False,
        cache_watermark: int = 0,
        cascade: bool = True,
        cascade_min_saved_pages: int | None = None,
        cascade_min_group_pages: int | None = None,
        cascade_prefix_kernel: str = "triton",
        cascade_max_depth: int | None = None,
    ) -> Engine:
        """Load an HF LLaMA-family checkpoint directory (config.json + safetensors)."""
        config = EngineConfig(
            page_size=page_size,
            num_pages=num_pages,
            backend=backend,
            cuda_graphs=cuda_graphs,
            fused_kernels=fused_kernels,
            prefix_cache=prefix_cache,
            cache_watermark=cache_watermark,
            cascade=cascade,
            cascade_min_saved_pages=cascade_min_saved_pages,
            cascade_min_group_pages=cascade_min_group_pages,
            cascade_prefix_kernel=cascade_prefix_kernel,
            cascade_max_depth=cascade_max_depth,
        )
        dev = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
        model = load_model(path, dtype=dtype, device=dev)
        return cls(model, load_tokenizer(path), config)

    # ------------------------------------------------------------------ branches

    def encode(self, prompt: Prompt, *, chat: bool = False) -> list[int]:
        """Token ids of a prompt: text (through the tokenizer), ids, or ``None``/"" for BOS only."""
        if prompt is None or (isinstance(prompt, str) and prompt == ""):
            if self.bos_token_id is None:
                raise ConfigError("an empty prompt needs a BOS token, and this model has none")
            return [self.bos_token_id]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("this model directory has no tokenizer: pass token ids instead")
            return self.tokenizer.encode(prompt, chat=chat)
        ids = []
        for t in prompt:
            try:
                ids.append(operator.index(t))
            except TypeError:
                raise InvalidTokenError(f"token ids must be integers, got {t!r}") from None
        if not ids:
            raise ConfigError("a prompt of token ids must not be empty")
        return ids

    def _check_tokens(self, ids: Sequence[int]) -> None:
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidTokenError(
                f"token id(s) {bad[:5]} outside the vocabulary of {vocab} tokens"
            )

    def _check_length(self, n: int) -> None:
        limit = self.model_config.max_position_embeddings
        if n > limit:
            raise ContextLengthError(
                f"a sequence of {n} tokens exceeds the model's maximum context of {limit}"
            )

    @_locked
    def add(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        seed: int = 0,
        chat: bool = False,
        constraint: BranchConstraint | None = None,
    ) -> Branch:
        """A new branch holding ``prompt`` as pending tokens (prefilled by the next step).

        ``constraint`` (e.g. a :class:`dendrite.grammar.Grammar` matcher) restricts the tokens
        generated after the prompt; it forks with the branch.
        """
        ids = self.encode(prompt, chat=chat)
        self._check_tokens(ids)
        self._check_length(len(ids))
        kv, n = self.tree.new_branch_matching(ids)  # n = 0 without a prefix cache
        nan = float("nan")
        rest = tuple(ids[n:])
        b = Branch(kv, rest, (nan,) * len(rest), params or SamplingParams(), seed, len(ids))
        b.constraint = constraint
        self.branches[b.id] = b
        return b

    def _live(self, b: Branch) -> Branch:
        if not isinstance(b, Branch) or self.branches.get(b.id) is not b:
            raise BranchError(f"{b!r} is not a live branch of this engine")
        return b

    def fork(
        self, b: Branch, params: SamplingParams | None = None, *, seed: int | None = None
    ) -> Branch:
        """A copy of ``b`` sharing all its KV. O(1): no page, no page list, no path walk.

        The child's seed is ``seed`` if given, else derived from ``b``'s seed and fork count
        (when first needed), so the same tree of forks draws the same tokens.
        """
        lock = self.lock  # acquire/release, not `with` or @_locked: fork is the hot path
        lock.acquire()  # (~70 ns uncontended against ~160 ns for `with`)
        try:
            if self.branches.get(b.id) is not b:
                raise BranchError(f"{b!r} is not a live branch of this engine")
            kv = self.tree.fork(b.kv)
            b.forks += 1
            child = Branch(
                kv,
                b.pending,
                b.pending_logprobs,
                params or b.params,
                None,
                b.prompt_len,
                b.num_generated,
            )
            if seed is None:
                child._seed_src = (b, b.forks)
            else:
                child._seed = seed
            child.finish_reason = b.finish_reason
            if b.constraint is not None:
                child.constraint = b.constraint.fork()
            self.branches[kv.id] = child
            return child
        finally:
            lock.release()

    @_locked
    def extend(self, b: Branch, tokens: Prompt) -> None:
        """Teacher-force ``tokens`` (text without BOS, or ids) onto ``b``; the next step feeds them.

        A finished branch becomes unfinished again (its stop reason no longer holds).
        """
        self._live(b)
        ids = self._encode_plain(tokens) if isinstance(tokens, str) else self.encode(tokens)
        self._check_tokens(ids)
        self._check_length(len(b) + len(ids))
        if b.constraint is not None:
            b.constraint.consume(ids)  # raises GrammarError, changing nothing, if not allowed
        b.pending = b.pending + tuple(ids)
        b.pending_logprobs = b.pending_logprobs + (float("nan"),) * len(ids)
        b.finish_reason = None

    @_locked
    def free(self, b: Branch) -> None:
        """Release a branch; pages no other branch reads go back to the pool."""
        self._live(b)
        self.tree.free(b.kv)
        del self.branches[b.id]

    @_locked
    def free_all(self) -> None:
        for b in list(self.branches.values()):
            self.free(b)

    @_locked
    def token_ids(self, b: Branch) -> list[int]:
        """The whole sequence: prompt and generated tokens."""
        self._live(b)
        return self.tree.token_ids(b.kv) + list(b.pending)

    @_locked
    def tail_ids(self, b: Branch, n: int) -> list[int]:
        """The last ``n`` tokens of the sequence, walking up only as far as needed."""
        self._live(b)
        return _tail(b.kv.leaf, b.pending, n, "tokens")

    @_locked
    def output_ids(self, b: Branch) -> list[int]:
        """The tokens after the prompt (read from the leaf up: a long prompt is not copied)."""
        self._live(b)
        return _tail(b.kv.leaf, b.pending, len(b) - b.prompt_len, "tokens")

    @_locked
    def output_logprobs(self, b: Branch) -> list[float]:
        self._live(b)
        return _tail(b.kv.leaf, b.pending_logprobs, len(b) - b.prompt_len, "logprobs")

    @_locked
    def text(self, b: Branch) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(self.output_ids(b))

    # ------------------------------------------------------------------ the step

    def _forward(
        self,
        items: list[tuple[Branch, tuple[int, ...]]],
        all_logits: bool,
        ids: torch.Tensor | None = None,
        overlapped: bool = False,
    ) -> tuple[torch.Tensor, list[int]]:
        """Append ``items``' tokens to their branches' KV and run the model once.

        Returns logits [R, V] (last row per branch, or every row when ``all_logits``) and the
        row offsets per branch. On any exception the appends are rolled back. ``ids``: the
        tokens as a device tensor (a pipelined step: still being sampled; the KV holds
        placeholders); ``overlapped``: the previous step may still run, so the eager path
        waits before ``plan`` (FlashInfer reuses one pinned buffer); and the logits may be a
        CUDA graph's own buffer, to be read (in stream order) before the next forward.
        """
        for b, toks in items:
            self._check_length(len(b.kv) + len(toks))
        slots = self.tree.append_batch([(b.kv, toks) for b, toks in items])
        try:
            q_lens = [len(t) for _, t in items]
            kv_lens = [len(b.kv) for b, _ in items]
            pages = [self.tree.page_list(b.kv) for b, _ in items]
            self.pool.flush_copies()  # this step's copy-on-writes, one indexed copy
            graphs = self._decode_graphs(q_lens, pages)
            if graphs is not None:
                try:
                    with torch.inference_mode():
                        tokens = [t for _, (t,) in items] if ids is None else ids
                        # overlapped: sampled at once, so the graph's own buffer will do
                        logits = graphs.forward(tokens, kv_lens, pages, copy=not overlapped)
                    return logits, list(range(len(items) + 1))
                except Exception as e:  # cannot capture here: say so once, run eagerly
                    self._disable_graphs(e)
            if overlapped and self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            # the token ids ride in the layout's one host->device copy
            new_ids = chain.from_iterable(t for _, t in items) if ids is None else None
            layout = build_layout(
                q_lens, kv_lens, pages, slots, self.pool.page_size, self.device, new_ids
            )
            self.backend.plan(layout)
            if ids is None:
                ids = layout.token_ids
            offsets = [0]
            for q in q_lens:
                offsets.append(offsets[-1] + q)
            rows = None if all_logits else layout.last_rows
            with torch.inference_mode():
                logits = self.model(ids, layout.positions, self.backend, rows)
            return logits, offsets
        except BaseException:
            for b, toks in items:
                self.tree.truncate(b.kv, len(toks))
            raise

    @_locked
    def _decode_pages(
        self,
        tokens: torch.Tensor,
        kv_len: int,
        shared: list[int],
        own: list[list[int]],
        own_pages: torch.Tensor,
    ) -> torch.Tensor:
        """One decode step of ``B`` rows that live outside the KV tree, on pages their owner
        took from the pool (a pipelined beam search's beams): logits [B, V] fp32.

        Row ``i`` feeds ``tokens[i]`` (a device tensor, not waited for) at position
        ``kv_len - 1`` and reads pages ``shared + own_pages[i]``; ``own[i]`` (host) has
        ``own_pages``' shape and the row's true last page, where the new K/V go; its other
        entries are placeholders, distinct per row (the device's ``own_pages`` are not read on
        the host, so the step can be prepared while the previous one still runs). With CUDA
        graphs the logits are the graph's own buffer: read them (in stream order) before the
        next step.
        """
        t0 = time.perf_counter()
        B, P = len(own), self.pool.page_size
        self._check_length(kv_len)
        pages = [shared + row for row in own]
        self.pool.flush_copies()
        graphs = self._decode_graphs([1] * B, pages)
        logits = None
        if graphs is not None:
            try:
                with torch.inference_mode():
                    logits = graphs.forward(tokens, [kv_len] * B, pages, copy=False, own=own_pages)
            except Exception as e:  # cannot capture here: say so once, run eagerly
                self._disable_graphs(e)
        if logits is None:
            pages = [shared + row for row in own_pages.tolist()]  # waits for the device
            slots = [[row[-1] * P + (kv_len - 1) % P] for row in pages]
            layout = build_layout([1] * B, [kv_len] * B, pages, slots, P, self.device)
            self.backend.plan(layout)
            with torch.inference_mode():
                logits = self.model(tokens, layout.positions, self.backend, None)
        self.num_steps += 1
        self.telemetry.step(B, B, 0, B, time.perf_counter() - t0)
        return logits

    def _decode_graphs(self, q_lens: list[int], pages: list[list[int]]) -> DecodeGraphs | None:
        """The CUDA graphs to replay this step with, or ``None`` to run it eagerly."""
        if not self._use_graphs or any(q != 1 for q in q_lens):
            return None
        if self._graphs is None:
            from dendrite.attention.flashinfer import FlashInferBackend
            from dendrite.cuda_graphs import DecodeGraphs

            assert isinstance(self.backend, FlashInferBackend)
            self._graphs = DecodeGraphs(self.model, self.backend)
        if not self._graphs.fits(len(q_lens), sum(len(p) for p in pages)):
            return None
        return self._graphs

    @_locked
    def use_gemv_kernels(self, enable: bool = True) -> bool:
        """Switch one-row steps to (or off) the Triton GEMV path on CUDA (see
        ``Transformer.use_gemv_kernels``). Returns whether the path is in use."""
        return self._switch_path(self.model.use_gemv_kernels, enable)

    @_locked
    def use_skinny_kernels(self, enable: bool = True) -> bool:
        """Switch steps of 2-16 rows to (or off) the split-K Triton GEMMs on CUDA, and for a
        float32 model its longer steps to ``gemm32`` (see ``Transformer.use_skinny_kernels``).
        Returns whether the path is in use."""
        return self._switch_path(self.model.use_skinny_kernels, enable)

    def _switch_path(self, switch: Callable[[bool], bool], enable: bool) -> bool:
        """A model path on or off (CUDA only); the CUDA graphs captured so far are dropped and
        the next decode steps capture new ones."""
        on = self.device.type == "cuda" and switch(enable)
        self._graphs = None
        return on

    def _disable_graphs(self, error: Exception) -> None:
        import warnings

        self._use_graphs, self._graphs = False, None
        self.graphs_error = f"{type(error).__name__}: {error}"
        warnings.warn(f"CUDA graphs are off, decode steps run eagerly: {error}", stacklevel=3)

    def _select(self, branches: Iterable[Branch]) -> list[Branch]:
        todo = [self._live(b) for b in branches]
        if len({b.id for b in todo}) != len(todo):
            raise BranchError("a branch appears twice in one step")
        return todo

    def _feed(
        self, todo: list[Branch], keep_last: bool = False
    ) -> tuple[torch.Tensor, list[tuple[Branch, tuple[int, ...]]]]:
        """Run the pending tokens of ``todo`` (all but the last with ``keep_last``) through the
        model, rolled back on failure."""
        items = [(b, b.pending[:-1] if keep_last else b.pending) for b in todo]
        logits, _ = self._forward(items, all_logits=False)
        self.num_steps += 1
        return logits, items

    def _commit(self, items: list[tuple[Branch, tuple[int, ...]]], t0: float) -> None:
        """The fed tokens are now KV: record their log-probs, drop them from pending, log it."""
        prefill = 0
        for b, toks in items:
            n = len(toks)
            self.tree.set_logprobs(b.kv, b.pending_logprobs[:n])
            if n > 1:
                prefill += n
            b.pending = b.pending[n:]
            b.pending_logprobs = b.pending_logprobs[n:]
        n_tok = sum(len(t) for _, t in items)
        self.telemetry.step(len(items), n_tok, prefill, n_tok - prefill, time.perf_counter() - t0)

    @_locked
    def allowed_tokens(self, branches: Sequence[Branch]) -> torch.Tensor | None:
        """[B, V] bool mask of the tokens each branch's grammar allows (None: no grammar)."""
        if all(b.constraint is None for b in branches):
            return None
        from dendrite.grammar import fill_masks

        return fill_masks([b.constraint for b in branches], self.model_config.vocab_size).to(
            self.device
        )

    @_locked
    def prefill(self, branches: Iterable[Branch]) -> None:
        """Feed all pending tokens but the last of each branch (one batched forward).

        Do this before forking a fresh prompt k ways: the forks then share the prompt's KV and
        each feeds only the last token, instead of each prefilling the whole prompt.
        """
        todo = [b for b in self._select(branches) if len(b.pending) > 1]
        if not todo:
            return
        t0 = time.perf_counter()
        _, items = self._feed(todo, keep_last=True)
        self._commit(items, t0)

    @_locked
    def forward(self, branches: Iterable[Branch]) -> torch.Tensor:
        """Feed each branch's pending tokens in one batched forward; next-token logits [B, V].

        Afterwards the branches have nothing pending: search algorithms choose the next token
        themselves and :meth:`extend` the branch (or a fork of it) with it. Logits are fp32 and
        unmasked; :meth:`allowed_tokens` gives the grammar masks.
        """
        todo = self._select(branches)
        for b in todo:
            if not b.pending:
                raise BranchError(f"branch {b.id} has no pending tokens to feed")
        t0 = time.perf_counter()
        logits, items = self._feed(todo)
        self._commit(items, t0)
        return logits

    @_locked
    def step(
        self, branches: Iterable[Branch] | None = None, *, keep_logits: bool = False
    ) -> list[StepOutput]:
        """One batched forward over the given (default: all unfinished) branches; samples each.

        ``keep_logits`` returns each branch's next-token logits in its :class:`StepOutput`.
        """
        if branches is None:
            todo = [b for b in self.branches.values() if not b.finished]
        else:
            todo = self._select(branches)
        todo = [b for b in todo if b.pending and not b.finished]
        if not todo:
            return []
        t0 = time.perf_counter()
        logits, items = self._feed(todo)
        return self._sample(todo, logits, items, t0, keep_logits)

    @_locked
    def branch_out(self, b: Branch, n: int, *, keep_logits: bool = False) -> list[StepOutput]:
        """Fork ``b`` into ``n`` branches (``b`` and ``n - 1`` forks) that each sample their
        next token from one forward of ``b``'s pending tokens.

        This is :meth:`step` on ``n`` copies of ``b`` without feeding its last token ``n``
        times: the forks are made after the forward, so they share all of ``b``'s KV, full
        pages included, and none copies a partial page. Each draws with its own seed (noise
        keyed by seed and position), as a step of the ``n`` forks would. Returns one
        :class:`StepOutput` per branch, ``b``'s first; the branches are ``b`` and the forks
        with the ids they name.
        """
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"branch_out needs n >= 1 branches, got {n!r}")
        (b,) = self._select([b])
        if not b.pending:
            raise BranchError(f"branch {b.id} has no pending tokens to feed")
        if b.finished:
            raise BranchError(f"branch {b.id} has finished ({b.finish_reason})")
        return self._branch_out([b], n, keep_logits)

    def _branch_out(
        self, todo: list[Branch], n: int, keep_logits: bool = False
    ) -> list[StepOutput]:
        """:meth:`branch_out` of several branches, their pending tokens fed in one forward."""
        t0 = time.perf_counter()
        logits, items = self._feed(todo)  # their KV now holds their pending tokens
        rows = self._forks_after_feed(todo, n, items)
        logits = logits.expand(n, -1) if len(todo) == 1 else logits.repeat_interleave(n, dim=0)
        return self._sample(
            rows, logits, items, t0, keep_logits, lambda: self._unfeed_forks(rows, n, items)
        )

    def _forks_after_feed(
        self, todo: list[Branch], n: int, items: list[tuple[Branch, tuple[int, ...]]]
    ) -> list[Branch]:
        """Each of ``todo`` (just fed ``items``) followed by ``n - 1`` forks sharing all its
        KV; on failure the forks and the feed are taken back."""
        rows: list[Branch] = []
        try:
            for b in todo:
                rows.append(b)
                for _ in range(n - 1):
                    rows.append(self.fork(b))
        except BaseException:
            self._unfeed_forks(rows, n, items)
            raise
        return rows

    def _unfeed_forks(
        self, rows: list[Branch], n: int, items: list[tuple[Branch, tuple[int, ...]]]
    ) -> None:
        """Undo :meth:`_forks_after_feed` and the feed: the forks go first (then each fed
        branch's segment is its own again), then the fed tokens leave the KV."""
        for i in range(0, len(rows), n):
            b, forks = rows[i], rows[i + 1 : i + n]
            for f in forks:
                self.free(f)
            b.forks -= len(forks)
        for b, toks in items:
            self.tree.truncate(b.kv, len(toks))

    def _sample(
        self,
        todo: list[Branch],
        logits: torch.Tensor,
        items: list[tuple[Branch, tuple[int, ...]]],
        t0: float,
        keep_logits: bool,
        rollback: Callable[[], None] | None = None,
    ) -> list[StepOutput]:
        """Sample each branch's next token from ``logits`` [B, V]; commit the fed ``items``.
        If sampling fails, the grammar states and the feed are rolled back (``rollback``, or
        truncating each fed branch)."""
        consumed: list[BranchConstraint] = []
        try:
            allowed = self.allowed_tokens(todo)
            # noise keyed by (seed, position of the token drawn): independent of the batch
            keys = _row_keys(todo)
            fused = self._fused_pick
            tokens, logps = sample(logits, [b.params for b in todo], keys, allowed, fused=fused)
            for b, tok in zip(todo, tokens, strict=True):
                if b.constraint is not None:
                    b.constraint.consume([tok])
                    consumed.append(b.constraint)
        except BaseException:
            for c in consumed:
                c.rollback(1)  # grammar states back to where the step found them
            if rollback is not None:
                rollback()
            else:
                for b, toks in items:
                    self.tree.truncate(b.kv, len(toks))
            raise
        self._commit(items, t0)
        out: list[StepOutput] = []
        for i, (b, tok, lp) in enumerate(zip(todo, tokens, logps, strict=True)):
            b.pending = (tok,)
            b.pending_logprobs = (lp,)
            b.num_generated += 1
            b.finish_reason = self._finish_reason(b, tok)
            row = logits[i].clone() if keep_logits else None
            out.append(StepOutput(b.id, tok, lp, b.finish_reason, row))
        return out

    def _finish_reason(self, b: Branch, tok: int) -> str | None:
        p = b.params
        stop_ids = self.eos_token_ids if p.stop_token_ids is None else p.stop_token_ids
        if not p.ignore_eos and tok in stop_ids:
            return "eos"
        if p.stop and self.tokenizer is not None:
            n = min(b.num_generated, 16 + max(len(s) for s in p.stop))
            tail = self.tokenizer.decode(self.tail_ids(b, n))
            if any(s in tail for s in p.stop):
                return "stop"
        if b.constraint is not None and b.constraint.is_finished():
            return "grammar"
        if b.num_generated >= p.max_new_tokens:
            return "length"
        if len(b) >= self.model_config.max_position_embeddings:
            return "context"
        return None

    @_locked
    def run(self, branches: Sequence[Branch], *, n: int = 1) -> list[Branch]:
        """Step the given branches together until every one has finished.

        ``n > 1``: each unfinished branch is first branched out ``n`` ways (as
        :meth:`branch_out`: its pending tokens fed once, then ``n - 1`` forks sharing all its
        KV, each drawing its first token with its own seed). Returns the branches run, each
        followed by its forks. If it raises, the forks it made are freed (the caller holds no
        handle on them); the given branches are left as stepping leaves them, to run again.

        With CUDA graphs (``pipeline="auto"``) the steps are pipelined: step n + 1 is
        prepared (KV append, page tables, ``plan``) and launched, its input the samples of
        step n still on the GPU, before the host reads step n's tokens; so the host's work
        overlaps the GPU's. The first step may feed prompts (and branch out): its samples
        stay on the GPU too. A branch that stops on EOS or a stop string has its speculative
        token taken back, so tokens, KV and branch states are those of stepping, up to the
        rounding of one different batch: such a branch rides along one step more. Not with
        a prefix cache (a speculative append could evict), and a step whose speculation
        finds the pool short is confirmed and stepping goes on.
        """
        return [r for group in self._run_groups(branches, n) for r in group]

    def _run_groups(self, branches: Sequence[Branch], n: int) -> list[list[Branch]]:
        """:meth:`run`, returning each given branch with its forks (just the branch when it
        was finished: nothing to branch out)."""
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"run needs n >= 1 branches per branch, got {n!r}")
        branches = list(branches)
        for b in branches:
            self._live(b)
        for b in branches:
            if b.params.max_new_tokens == 0:
                b.finish_reason = b.finish_reason or "length"
        groups = {b.id: [b] for b in branches}  # each branch and its forks
        todo = [b for b in branches if not b.finished]
        self._check_pending(todo)
        try:
            if todo and (n > 1 or any(len(b.pending) > 1 for b in todo)):
                if self._can_pipeline(todo, first=True):
                    first_rows, first = self._launch_first(todo, n)
                    for i, b in enumerate(todo):
                        groups[b.id] = first_rows[i * n : (i + 1) * n]
                    self._run_pipelined(first_rows, first)
                elif n > 1:
                    out = self._branch_out(todo, n)
                    for i, b in enumerate(todo):
                        groups[b.id] = [self.branches[o.branch] for o in out[i * n : (i + 1) * n]]
            self._run([r for b in branches for r in groups[b.id]])
        except BaseException:
            for group in groups.values():
                for f in group[1:]:
                    if self.branches.get(f.id) is f:
                        self.free(f)
            raise
        return [groups[b.id] for b in branches]

    @staticmethod
    def _check_pending(todo: list[Branch]) -> None:
        if stuck := [b.id for b in todo if not b.pending]:
            raise BranchError(
                f"branches {stuck} have nothing pending to feed: extend them or step them "
                "after forward()"
            )

    def _run(self, branches: list[Branch]) -> None:
        while True:
            todo = [b for b in branches if not b.finished]
            if not todo:
                return
            self._check_pending(todo)
            if self._can_pipeline(todo):
                self._run_pipelined(todo)
            else:
                self.step(todo)

    # ------------------------------------------------------------------ pipelined decode

    def _can_pipeline(self, todo: list[Branch], first: bool = False) -> bool:
        """Whether ``todo`` can step pipelined (``first``: its first step may feed several
        pending tokens a branch: prompts)."""
        mode = self.config.pipeline
        if mode == "off" or (mode == "auto" and not self._use_graphs):
            return False
        if self.prefix is not None:  # a speculative append could evict what stepping keeps
            return False
        ok = (lambda k: k >= 1) if first else (lambda k: k == 1)
        return all(ok(len(b.pending)) and b.constraint is None for b in todo)

    def _sample_async(self, rows: list[Branch], logits: torch.Tensor, t0: float) -> _InFlight:
        """Sample every row on the device and start copying the samples to the host (the
        step in flight, begun at ``t0``)."""
        with torch.inference_mode():
            keys = _row_keys(rows)
            params = [b.params for b in rows]
            tok, both = sample_packed(logits, params, keys, fused=self._fused_pick)
            host = torch.empty(both.shape, dtype=both.dtype, pin_memory=both.is_cuda)
            host.copy_(both, non_blocking=True)
            event = torch.cuda.Event() if both.is_cuda else None
            if event is not None:
                event.record()
        return _InFlight(rows, tok, host, event, t0)

    def _launch_first(self, todo: list[Branch], n: int) -> tuple[list[Branch], _InFlight]:
        """The first step of a pipelined run: every branch's pending tokens (a prompt, or one
        token) fed in one forward, then ``n - 1`` forks of each (sharing all its KV), every
        row sampled on the device. Nothing waits for the GPU: the host makes the forks and
        launches the next step while it runs. Returns the rows (each branch followed by its
        forks) and the step in flight. On failure nothing has changed."""
        t0 = time.perf_counter()
        items = [(b, b.pending) for b in todo]
        logits, _ = self._forward(items, all_logits=False)
        rows = self._forks_after_feed(todo, n, items)
        try:
            if n > 1:
                logits = logits.repeat_interleave(n, dim=0)
            step = self._sample_async(rows, logits, t0)
        except BaseException:
            self._unfeed_forks(rows, n, items)
            raise
        self.num_steps += 1
        self._commit(items, t0)  # logs the step: _confirm does not again
        for f in rows:  # the forks copied their parent's pending tokens: fed now
            f.pending, f.pending_logprobs = (), ()
        step.logged = True
        return rows, step

    def _launch(self, rows: list[Branch], ids: torch.Tensor, known: bool) -> _InFlight:
        """Append one token per row to the KV (its value: ``known`` -> each row's pending
        token; else a placeholder until the previous step is confirmed), run the forward and
        the sampler, and start copying the samples to the host. Nothing waits for the GPU
        (except on the eager path: FlashInfer's plan reuses one pinned buffer). On failure
        nothing has changed."""
        t0 = time.perf_counter()
        items: list[tuple[Branch, tuple[int, ...]]] = [
            (b, (b.pending[0] if known else 0,)) for b in rows
        ]
        logits, _ = self._forward(items, all_logits=False, ids=ids, overlapped=True)
        try:
            step = self._sample_async(rows, logits, t0)
            if known:  # the pending tokens are KV now
                for b in rows:
                    self.tree.set_logprobs(b.kv, b.pending_logprobs)
        except BaseException:
            for b in rows:
                self.tree.truncate(b.kv, 1)
            raise
        if known:
            for b in rows:
                b.pending, b.pending_logprobs = (), ()
        self.num_steps += 1
        return step

    def _confirm(self, step: _InFlight, fed: set[int]) -> None:
        """Read ``step``'s samples and apply them as :meth:`step` would (once per row: it may
        be called again after a fault). Rows in ``fed`` were already fed their sample (the
        next step is in flight): the placeholder in their KV takes its value, and one that
        has now finished gets it back as pending, as after a step."""
        if step.event is not None:
            t = time.perf_counter()
            step.event.synchronize()
            self.sample_wait_s += time.perf_counter() - t
        ids, lps = step.host.tolist()
        for b, t, lp in zip(step.rows, ids, lps, strict=True):
            if b.id in step.dead or b.id in step.done:
                continue  # dead: it finished before this step, its sample is dropped
            step.done.add(b.id)  # first: a second call never applies a sample twice
            tok = int(t)
            if b.id in fed:
                self.tree.patch_last(b.kv, tok, lp)
            else:
                b.pending, b.pending_logprobs = (tok,), (lp,)
            b.num_generated += 1
            b.finish_reason = self._finish_reason(b, tok)
            if b.finished and b.id in fed:
                self._unfeed(b)
        if not step.logged:
            step.logged = True
            n = len(step.rows)
            self.telemetry.step(n, n, 0, n, time.perf_counter() - step.t0)

    def _unfeed(self, b: Branch) -> None:
        """Take the last fed token back out of the KV: it is pending again."""
        leaf = b.kv.leaf
        tok, lp = leaf.tokens[-1], leaf.logprobs[-1]
        self.tree.truncate(b.kv, 1)
        b.pending, b.pending_logprobs = (tok,), (lp,)

    def _run_pipelined(self, todo: list[Branch], first: _InFlight | None = None) -> None:
        """Decode ``todo`` (one pending token each, no grammar) pipelined, until every branch
        has finished or a speculative step finds the pool short (then stepping goes on).
        ``first``: ``todo``'s first step, already in flight (:meth:`_launch_first`)."""
        limit = self.model_config.max_position_embeddings
        if first is None:
            ids = torch.tensor([b.pending[0] for b in todo], device=self.device)
            first = self._launch(todo, ids, known=True)  # on failure it changed nothing
        prev = first
        nxt: _InFlight | None = None
        try:
            while True:
                # who surely goes on after prev: not finished, not at max_new_tokens, context
                # left (an EOS or a stop string only shows in the samples: see _confirm)
                keep = [
                    i
                    for i, b in enumerate(prev.rows)
                    if b.id not in prev.dead
                    and b.num_generated + 1 < b.params.max_new_tokens
                    and len(b.kv) + 1 < limit
                ]
                if keep:
                    rows = [prev.rows[i] for i in keep]
                    try:
                        nxt = self._launch(rows, _take(prev.tokens, keep), known=False)
                    except PoolExhaustedError:
                        # Speculation would need pages stepping may not: confirm and step on.
                        self._confirm(prev, set())
                        return
                self._confirm(prev, {b.id for b in nxt.rows} if nxt is not None else set())
                if nxt is None:
                    return
                nxt.dead.update(b.id for b in nxt.rows if b.finished)
                prev, nxt = nxt, None
                if len(prev.dead) == len(prev.rows):
                    self._confirm(prev, set())  # (waits for it: its writes are garbage)
                    return
        except BaseException:
            # Back to a state stepping would leave: apply what ran, take back what ran ahead.
            try:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self._confirm(prev, {b.id for b in nxt.rows} if nxt is not None else set())
            finally:
                if nxt is not None:
                    for b in nxt.rows:
                        if not b.pending and b.kv.alive:
                            self._unfeed(b)
            raise

    @_locked
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | None = None,
        *,
        seed: int = 0,
        n: int = 1,
    ) -> list[Generation]:
        """Generate for one prompt or a list of prompts (batched); frees its branches.

        ``n``: samples per prompt (as HF's ``num_return_sequences``): each prompt is fed once
        and branched out ``n`` ways (:meth:`run`); its ``n`` generations are consecutive.
        """
        many = isinstance(prompts, list | tuple) and not (prompts and isinstance(prompts[0], int))
        plist = cast(list[Prompt], list(prompts) if many else [prompts])  # type: ignore[arg-type]
        params = params or SamplingParams()
        encoded = [self.encode(p) for p in plist]
        for ids in encoded:
            self._check_tokens(ids)
            self._check_length(len(ids))
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"generate needs n >= 1 samples per prompt, got {n!r}")
        before = set(self.branches)
        try:
            branches = [self.add(ids, params, seed=seed + i) for i, ids in enumerate(encoded)]
            # a finished branch (max_new_tokens=0) was not branched out: its n results are one
            return [
                self.result(r)
                for group in self._run_groups(branches, n)
                for r in (group if len(group) == n else group * n)
            ]
        finally:  # every branch made here, forks included, even after a failure
            for b in [b for i, b in self.branches.items() if i not in before]:
                self.free(b)

    @_locked
    def result(self, b: Branch) -> Generation:
        ids = self.token_ids(b)
        out = ids[b.prompt_len :]
        text = None if self.tokenizer is None else self.tokenizer.decode(out)
        return Generation(ids[: b.prompt_len], out, text, self.output_logprobs(b), b.finish_reason)

    # ------------------------------------------------------------------ scoring

    def score(self, b: Branch, continuation: Prompt) -> Score:
        """Log-prob of ``continuation`` (text or ids) following ``b``; ``b`` is unchanged."""
        return self.score_many([(b, continuation)])[0]

    @_locked
    def score_many(self, requests: Sequence[tuple[Branch, Prompt]]) -> list[Score]:
        """Score several continuations in one batched forward (each on a temporary fork)."""
        conts: list[list[int]] = []
        for b, c in requests:
            self._live(b)
            if not b.pending:
                raise BranchError(f"branch {b.id} has no pending token to score from")
            ids = self.encode(c) if not isinstance(c, str) else self._encode_plain(c)
            self._check_tokens(ids)
            self._check_length(len(b) + len(ids))
            conts.append(ids)
        fork_counts = [b.forks for b, _ in requests]
        forks = [self.fork(b, seed=0) for b, _ in requests]  # seeds unused: nothing is sampled
        for (b, _), n in zip(requests, fork_counts, strict=True):
            b.forks = n  # scoring leaves b as it was, its future forks' seeds included
        try:
            items = [(f, f.pending + tuple(ids[:-1])) for f, ids in zip(forks, conts, strict=True)]
            logits, offsets = self._forward(items, all_logits=True)
            logp = torch.log_softmax(logits, dim=-1)
            scores = []
            for i, ids in enumerate(conts):
                start = offsets[i] + len(forks[i].pending) - 1
                rows = torch.arange(start, start + len(ids), device=logp.device)
                tok = torch.tensor(ids, device=logp.device)
                vals = logp[rows, tok].tolist()
                scores.append(Score(float(sum(vals)), vals))
            return scores
        finally:
            for f in forks:
                self.free(f)

    def _encode_plain(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("this model directory has no tokenizer: pass token ids instead")
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ConfigError("the continuation to score is empty")
        return ids

    # ------------------------------------------------------------------ inspection

    @_locked
    def stats(self) -> TreeStats:
        return self.tree.stats()

    @_locked
    def prefix_stats(self) -> PrefixStats | None:
        """Prefix-cache figures (lookups, prompt and reused tokens, evictions); None if off."""
        return None if self.prefix is None else self.prefix.stats()

    @_locked
    def clear_cache(self) -> None:
        """Release every cached segment; live branches keep their pages."""
        self.tree.clear_cache()

    @_locked
    def check_integrity(self) -> None:
        self.tree.check_integrity()
        assert set(self.branches) == set(self.tree.branches), "engine and tree branches differ"
        for b in self.branches.values():
            assert b.kv.alive and self.tree.branches[b.id] is b.kv


def _tail(seg: Segment | None, pending: Sequence[Any], n: int, field: str) -> list[Any]:
    """The last ``n`` entries of ``field`` ("tokens" or "logprobs") along the path that ends
    in segment ``seg`` and then ``pending``: only the segments that hold them are read."""
    if n <= 0:
        return []
    out = list(pending[-n:])
    while len(out) < n and seg is not None:
        values = getattr(seg, field)
        out[:0] = values[-(n - len(out)) :]
        seg = seg.parent
    return out


def _make_backend(
    name: str, pool: PagePool, config: ModelConfig, engine_config: EngineConfig
) -> AttentionBackend:
    """FlashInfer on CUDA when installed and able to serve the model, else the torch reference."""
    if name in ("auto", "flashinfer") and pool.kv[0].is_cuda:
        try:
            from dendrite.attention.flashinfer import FlashInferBackend, unsupported_reason
        except ImportError:
            if name == "flashinfer":
                raise ConfigError(
                    "backend='flashinfer' needs flashinfer-python (pip install .[gpu])"
                ) from None
        else:
            reason = unsupported_reason(pool, config)
            if reason is None:
                return FlashInferBackend(
                    pool,
                    config,
                    cascade=engine_config.cascade,
                    min_saved_pages=engine_config.cascade_min_saved_pages,
                    min_group_pages=engine_config.cascade_min_group_pages,
                    prefix_kernel=engine_config.cascade_prefix_kernel,
                    max_depth=engine_config.cascade_max_depth,
                    prefill_backend=engine_config.prefill_kernel,
                )
            if name == "flashinfer":
                raise ConfigError(f"backend='flashinfer' cannot run this model: {reason}")
    if name == "flashinfer":
        raise ConfigError("backend='flashinfer' needs a CUDA device")
    return TorchBackend(pool, sliding_window=config.sliding_window)
