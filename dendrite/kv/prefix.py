"""The prefix index: freed segments stay cached, new prompts reuse them, LRU eviction.

Radix matching over the KV tree itself, as SGLang's RadixAttention does over its radix tree.
With a :class:`PrefixCache` attached, freeing a branch does not release a segment whose count
falls to zero: it is *cached* (refcount 0, pages kept, tokens kept), trimmed to its last full
page so that it ends on a page boundary. :meth:`PrefixCache.match` walks a new prompt down from
the root through every segment (cached or live) whose tokens it repeats, and splits the
segment it diverges in at the last page boundary inside the match::

    page size 4; cached segment S = [a b c d | e f g h | i j]   (trimmed on free to 8 tokens)
    prompt a b c d e f x ...        matches 6 tokens: split S at 4, the handle sits on
    upper = [a b c d]  (new, frozen) -> lower = S [e f g h] (same object, same id, cached)
    pending = e f x ...             the page holding "e f" is not shared: matching is per page

The handle always lands at the end of a segment (a split makes one) and the matched length is
at most ``len(prompt) - 1``: the last prompt token stays pending so the next step has logits.

Eviction: a cached segment has no handles and no children, so no live branch reads it. When
free pages fall under ``watermark`` (and always before an append would raise
:class:`PoolExhaustedError`) cached leaves are released least-recently-used first; a parent left
with a count of zero becomes a cached leaf in turn. A segment on a live branch's path always
has a count above zero, so it is never evicted.

The index is the tree: a segment's children are its index entries, matched by their first
token (:meth:`match` looks only at children whose first token is the next prompt token).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import pandas as pd

from dendrite.kv.tree import Segment

if TYPE_CHECKING:
    from dendrite.kv.tree import KVTree


class PrefixStats(NamedTuple):
    lookups: int
    prompt_tokens: int  # tokens of every prompt looked up
    hit_tokens: int  # of which reused from the tree (not prefilled again)
    cached_segments: int
    evicted_segments: int
    evicted_pages: int


class PrefixCache:
    """Keeps freed segments of one :class:`KVTree`; matches prompts; evicts LRU."""

    def __init__(self, tree: KVTree, watermark: int = 0) -> None:
        self.tree = tree
        self.watermark = watermark  # evict cached pages while fewer than this are free
        self.cached: dict[int, Segment] = {}  # segment id -> segment with refcount 0
        self.events = tree.telemetry.prefix  # hit / reuse figures live in the telemetry
        self.lookups = 0
        self.prompt_tokens = 0
        self.hit_tokens = 0
        self.evicted_segments = 0
        self.evicted_pages = 0

    # ------------------------------------------------------------------ matching

    def match(self, ids: Sequence[int]) -> tuple[Segment, int]:
        """The segment a new branch for ``ids`` should sit on, and how many tokens it holds.

        Splits a segment when the match ends inside it past a page boundary. Touches no page.
        """
        tree, P = self.tree, self.tree.page_size
        limit = len(ids) - 1  # keep the last token pending
        seg, pos = tree.root, 0
        tree._clock += 1
        while pos < limit:
            best, best_n = None, 0
            want = ids[pos]
            for c in seg.children.values():
                if c.tokens[0] == want:
                    n = _common(c.tokens, ids, pos, limit)
                    if n > best_n:
                        best, best_n = c, n
            if best is None:
                break
            best.last_access = tree._clock
            if best_n == len(best.tokens):
                seg, pos = best, pos + best_n
                continue
            k = (pos + best_n) // P * P  # last page boundary inside the match
            if k > best.start:
                seg, pos = self._split(best, k), k
            break
        while seg is not tree.root and seg.tail_dead:  # its partial page is gone: go up
            k = seg.end // P * P
            if k > seg.start:
                seg = self._split(seg, k)
            else:
                assert seg.parent is not None
                seg = seg.parent
        pos = seg.end
        self.lookups += 1
        self.prompt_tokens += len(ids)
        self.hit_tokens += pos
        self.events.append((time.perf_counter_ns(), len(ids), pos))
        return seg, pos

    def _split(self, seg: Segment, k: int) -> Segment:
        """Cut ``seg`` at absolute position ``k`` (a page boundary inside it); returns the new
        upper part. The lower part keeps the object (handles, children, id); pages divide."""
        tree, P = self.tree, self.tree.page_size
        assert k % P == 0 and seg.start < k < seg.end
        parent = seg.parent
        assert parent is not None
        up = Segment(tree._next_seg, parent, seg.start, seg.depth)
        tree._next_seg += 1
        n = k - seg.start
        first_own = seg.start // P + (1 if seg.start % P and not seg.head_copied else 0)
        n_pages = k // P - first_own
        up.tokens, seg.tokens = seg.tokens[:n], seg.tokens[n:]
        up.logprobs, seg.logprobs = seg.logprobs[:n], seg.logprobs[n:]
        up.pages, seg.pages = seg.pages[:n_pages], seg.pages[n_pages:]
        up.head_copied, up.inplace_page = seg.head_copied, seg.inplace_page
        seg.head_copied, seg.inplace_page = False, None
        up.frozen = True
        up.last_access = seg.last_access
        up.children = {seg.id: seg}
        up.tail_page = tree._page_of(up, k - 1)
        parent.children = {(up.id if i == seg.id else i): (up if i == seg.id else c)
                           for i, c in parent.children.items()}  # fmt: skip
        seg.parent = up
        seg.start = k
        seg._path_pages = None
        stack = [seg]
        while stack:  # one level deeper now (depth is for display and telemetry)
            s = stack.pop()
            s.depth += 1
            stack.extend(s.children.values())
        return up

    # ------------------------------------------------------------------ keeping and evicting

    def keep(self, seg: Segment) -> bool:
        """Cache a segment whose count fell to zero, trimmed to its last full page.

        Returns False (changing nothing) when no full page of its own would be left: the
        caller releases it as without a cache.
        """
        tree, P = self.tree, self.tree.page_size
        a = seg.end // P * P
        if a <= seg.start:
            return False
        drop = seg.end - a
        if drop:
            if not seg.tail_dead:  # the partial last page is its own (the in-place one is full)
                t = seg.pages.pop()
                assert t == seg.tail_page
                tree._claim[t] = 0
                tree.pool.release([t])
            del seg.tokens[-drop:]
            del seg.logprobs[-drop:]
        seg.tail_dead = False
        seg.tail_page = tree._page_of(seg, a - 1)
        seg.frozen = False
        seg._path_pages = None
        seg.last_access = tree._clock
        self.cached[seg.id] = seg
        return True

    def revive(self, seg: Segment) -> None:
        """A handle is about to sit on ``seg``: it is no longer cached."""
        self.cached.pop(seg.id, None)

    def evict_one(self) -> bool:
        """Release the least-recently-used cached segment; False when none is cached."""
        if not self.cached:
            return False
        seg = min(self.cached.values(), key=lambda s: (s.last_access, s.id))
        del self.cached[seg.id]
        parent = seg.parent
        assert parent is not None and seg.refcount == 0
        self.evicted_pages += len(seg.pages)
        self.evicted_segments += 1
        self.tree._release_segment(seg)
        del parent.children[seg.id]
        self.tree._settle(parent)
        return True

    def evict_until(self, free_pages: int) -> bool:
        """Evict until ``free_pages`` pages are free or nothing is cached; True if any went."""
        pool = self.tree.pool
        any_evicted = False
        while pool.num_free < free_pages and self.evict_one():
            any_evicted = True
        return any_evicted

    def clear(self) -> None:
        """Evict every cached segment."""
        while self.evict_one():
            pass

    # ------------------------------------------------------------------ reporting

    def stats(self) -> PrefixStats:
        return PrefixStats(
            self.lookups,
            self.prompt_tokens,
            self.hit_tokens,
            len(self.cached),
            self.evicted_segments,
            self.evicted_pages,
        )

    def frame(self) -> pd.DataFrame:
        """One row per lookup: prompt tokens and tokens matched in the tree."""
        return self.tree.telemetry.prefix_frame()


def _common(tokens: list[int], ids: Sequence[int], pos: int, limit: int) -> int:
    """Length of the common prefix of ``tokens`` and ``ids[pos:limit]``."""
    n = min(len(tokens), limit - pos)
    i = 0
    while i < n and tokens[i] == ids[pos + i]:
        i += 1
    return i
