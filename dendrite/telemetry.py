"""Telemetry: what the engine did, as pandas DataFrames.

The KV tree and the engine append small tuples to bounded deques (cheap enough to leave on
in the fork hot path); the frames are built only when a view or a researcher asks for them.
Three streams:

- ``forks``: one row per fork (branch ids, context length, depth, latency in ns);
- ``pages``: page events (``alloc``, ``free``, ``cow``) with the page ids' count and the
  pool's free pages after the event;
- ``steps``: one row per engine step (branches, tokens, prefill/decode split, wall time);
- ``prefix``: one row per prompt looked up in the prefix cache (its tokens, tokens reused).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import pandas as pd

FORK_COLUMNS = ("t_ns", "parent", "child", "context_len", "depth", "latency_ns")
PAGE_COLUMNS = ("t_ns", "event", "pages", "free_after")
STEP_COLUMNS = ("t_ns", "branches", "tokens", "prefill_tokens", "decode_tokens", "seconds")
PREFIX_COLUMNS = ("t_ns", "prompt_tokens", "matched_tokens")


class Telemetry:
    """Bounded event log of one engine (or one bare KV tree)."""

    def __init__(self, max_events: int = 1_000_000) -> None:
        self.forks: deque[tuple[Any, ...]] = deque(maxlen=max_events)
        self.pages: deque[tuple[Any, ...]] = deque(maxlen=max_events)
        self.steps: deque[tuple[Any, ...]] = deque(maxlen=max_events)
        self.prefix: deque[tuple[Any, ...]] = deque(maxlen=max_events)
        self.enabled = True

    def fork(
        self, t_ns: int, parent: int, child: int, context_len: int, depth: int, latency_ns: int
    ) -> None:
        if self.enabled:
            self.forks.append((t_ns, parent, child, context_len, depth, latency_ns))

    def page(self, event: str, count: int, free_after: int) -> None:
        if self.enabled and count:
            self.pages.append((time.perf_counter_ns(), event, count, free_after))

    def step(self, branches: int, tokens: int, prefill: int, decode: int, seconds: float) -> None:
        if self.enabled:
            self.steps.append((time.perf_counter_ns(), branches, tokens, prefill, decode, seconds))

    def clear(self) -> None:
        self.forks.clear()
        self.pages.clear()
        self.steps.clear()
        self.prefix.clear()

    def forks_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.forks), columns=list(FORK_COLUMNS))

    def pages_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.pages), columns=list(PAGE_COLUMNS))

    def prefix_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.prefix), columns=list(PREFIX_COLUMNS))

    def steps_frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.steps), columns=list(STEP_COLUMNS))
