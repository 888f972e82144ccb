"""The KV tree: segments of tokens whose pages branches share, with O(1) fork.

A *segment* is a run of tokens owned by one node of the tree; a *branch* (a live sequence)
is a path root -> leaf, and its KV is the concatenation of the segments on that path.

A handle sits on the segment its KV ends at. Fork (``fork``) freezes that segment and puts
a second handle on it: it touches no page, copies no page table, does not walk the path and
creates no segment, so it costs the same at any context length and tree depth. A handle whose
segment is frozen hangs a new child segment under it at its next append; when a frozen
segment is left with one handle and no children it is unfrozen again. New branches are
handles on the (empty, frozen) root.

Copy-on-write, constant size. Only the partially filled last page of a frozen segment can be
wanted by two writers. Each page keeps a *claim*: how many of its slots are spoken for. A
child whose first token falls on slot ``j`` of its parent's last page writes there in place
when the claim is exactly ``j`` (nobody went further yet) and copies the page's first ``j``
slots to a fresh page otherwise (at most ``page_size - 1`` tokens x layers)::

    page size 4, parent P holds tokens a b c (claim 3), children X and Y
    X appends x:   [a b c x]  in place, claim 4            X reads P's page
    Y appends y:   [a b c y]  copy of slots 0..2 + y       Y reads its own copy instead

So a fork plus one token on each side costs exactly one extra page, and a fork at a page
boundary costs none.

Reference counts live on segments: children + live handles. Freeing a branch releases its
leaf's pages and climbs only while counts drop to zero. The per-page count shown by the
dashboards (how many live branches read a page) is derived from the tree
(:meth:`KVTree.page_refcounts`).

Page lists for kernels: a frozen segment never changes, so it caches its full root-to-end
page list on first use; a leaf's list is its parent's cached list plus its own pages.

Prefix cache (``enable_cache``, ``prefix.py``): freed segments are kept with a count of zero
(trimmed to whole pages) instead of released, ``new_branch_matching`` starts a branch on the
longest prefix of a prompt already in the tree, and ``append_batch`` evicts cached segments
least-recently-used before it would run out of pages. Without a cache nothing changes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from dendrite.errors import BranchError, PoolExhaustedError
from dendrite.kv.pool import PagePool

if TYPE_CHECKING:
    from dendrite.kv.prefix import PrefixCache


class Segment:
    """A run of tokens and the pages that hold them (see the module docstring)."""

    __slots__ = (
        "_path_pages",
        "children",
        "depth",
        "frozen",
        "handles",
        "head_copied",
        "id",
        "inplace_page",
        "last_access",
        "logprobs",
        "pages",
        "parent",
        "start",
        "tail_dead",
        "tail_page",
        "tokens",
    )

    def __init__(self, seg_id: int, parent: Segment | None, start: int, depth: int) -> None:
        self.id = seg_id
        self.parent = parent
        self.children: dict[int, Segment] = {}
        self.start = start  # absolute position of this segment's first token
        self.depth = depth
        self.tokens: list[int] = []
        self.logprobs: list[float] = []  # log-prob of each token when it was sampled (nan: given)
        self.pages: list[int] = []  # pages this segment owns, in order
        self.head_copied = False  # pages[0] replaces the parent's partial last page
        self.inplace_page: int | None = None  # parent's partial page this segment writes into
        self.tail_page: int | None = None  # physical page of the last token
        self.tail_dead = False  # that partial page was released: every child reads a copy
        self.handles = 0  # live branch handles whose leaf this is
        self.frozen = False
        self.last_access = 0
        self._path_pages: list[int] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def refcount(self) -> int:
        return len(self.children) + self.handles

    def __repr__(self) -> str:
        return (
            f"Segment(id={self.id}, start={self.start}, tokens={len(self.tokens)}, "
            f"pages={self.pages}, refcount={self.refcount}, frozen={self.frozen})"
        )


class KVBranch:
    """A live handle on a root -> leaf path. Cheap; all state is in the tree."""

    __slots__ = ("alive", "id", "leaf")

    def __init__(self, branch_id: int, leaf: Segment) -> None:
        self.id = branch_id
        self.leaf = leaf
        self.alive = True

    def __len__(self) -> int:
        return self.leaf.end

    def __repr__(self) -> str:
        return f"KVBranch(id={self.id}, len={self.leaf.end}, alive={self.alive})"


class TreeStats(NamedTuple):
    total_pages: int
    free_pages: int
    used_pages: int
    shared_pages: int  # pages read by two or more live branches
    page_bytes: int
    used_bytes: int
    shared_bytes: int
    live_branches: int
    segments: int
    logical_tokens: int  # sum of live branch lengths (what copy-per-branch would store)
    unique_tokens: int  # tokens stored in live segments
    cached_pages: int = 0  # used pages no live branch reads (with a prefix cache: cached)


class KVTree:
    """Segments, branches, fork, copy-on-write and free over one :class:`PagePool`."""

    def __init__(self, pool: PagePool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.telemetry = pool.telemetry
        self._next_seg = 1
        self._next_branch = 0
        self._clock = 0
        self.root = Segment(0, None, 0, 0)
        self.root.frozen = True
        self.root._path_pages = []
        self.branches: dict[int, KVBranch] = {}
        self.cache: PrefixCache | None = None  # enable_cache(): keep freed segments
        # claim[p]: how many leading slots of page p are written or reserved
        self._claim = [0] * pool.num_pages

    # ------------------------------------------------------------------ lifecycle

    def _new_segment(self, parent: Segment) -> Segment:
        seg = Segment(self._next_seg, parent, parent.end, parent.depth + 1)
        self._next_seg += 1
        parent.children[seg.id] = seg
        return seg

    def _new_handle(self, leaf: Segment) -> KVBranch:
        b = KVBranch(self._next_branch, leaf)
        self._next_branch += 1
        leaf.handles += 1
        self.branches[b.id] = b
        return b

    def new_branch(self) -> KVBranch:
        """An empty branch (a handle on the root)."""
        return self._new_handle(self.root)

    def enable_cache(self, watermark: int = 0) -> PrefixCache:
        """Keep freed segments for prefix reuse (see ``prefix.py``); returns the cache."""
        from dendrite.kv.prefix import PrefixCache

        if self.cache is None:
            self.cache = PrefixCache(self, watermark)
        return self.cache

    def new_branch_matching(self, ids: Sequence[int]) -> tuple[KVBranch, int]:
        """A branch on the longest cached prefix of ``ids`` (at most ``len(ids) - 1`` tokens,
        split at page granularity); returns it and how many tokens of ``ids`` it holds."""
        if self.cache is None or len(ids) < 2:
            return self.new_branch(), 0
        seg, n = self.cache.match(ids)
        self.cache.revive(seg)
        if seg is not self.root and (seg.handles or seg.children):
            seg.frozen = True  # shared from now on, as after a fork
        return self._new_handle(seg), n

    def clear_cache(self) -> None:
        """Release every cached segment (live branches keep theirs)."""
        if self.cache is not None:
            self.cache.clear()

    def check_branch(self, b: KVBranch) -> None:
        if not isinstance(b, KVBranch) or self.branches.get(b.id) is not b:
            raise BranchError(f"{b!r} is not a live branch of this tree")

    def fork(self, b: KVBranch) -> KVBranch:
        """A new branch with the same KV as ``b``. O(1): freeze b's segment, add a handle."""
        t0 = time.perf_counter_ns()
        if self.branches.get(b.id) is not b:
            raise BranchError(f"{b!r} is not a live branch of this tree")
        seg = b.leaf
        seg.frozen = True
        child = KVBranch(self._next_branch, seg)
        self._next_branch += 1
        seg.handles += 1
        self.branches[child.id] = child
        self.telemetry.fork(t0, b.id, child.id, seg.end, seg.depth, time.perf_counter_ns() - t0)
        return child

    def free(self, b: KVBranch) -> None:
        """Drop the handle; release every segment whose count falls to zero."""
        self.check_branch(b)
        b.alive = False
        del self.branches[b.id]
        seg = b.leaf
        seg.handles -= 1
        self._settle(seg)

    def _settle(self, seg: Segment) -> None:
        """``seg`` lost a handle or a child: release (or cache) what nobody reads any more.

        Climbs while counts drop to zero. With a prefix cache a segment whose count drops to
        zero is kept (trimmed to its last full page) instead, and the climb stops there.
        """
        while seg is not self.root and seg.refcount == 0:
            if self.cache is not None and self.cache.keep(seg):
                return
            parent = seg.parent
            assert parent is not None
            self._release_segment(seg)
            del parent.children[seg.id]
            seg = parent
        self._drop_dead_tail(seg)
        if seg is not self.root and seg.handles == 0 and len(seg.children) == 1:
            (only,) = seg.children.values()
            if not only.children:
                seg = self._absorb_parent(only)
        if seg is not self.root and seg.handles == 1 and not seg.children:
            seg.frozen = False  # one writer again: it may extend in place
            seg._path_pages = None

    def _drop_dead_tail(self, seg: Segment) -> None:
        """Release the partial page ``seg`` ends on once no live branch reads it.

        The page ``t`` belongs to its owner segment and to the chain of segments written in
        place on it below the owner. It is dead when none of them has a handle, none spills
        past ``t`` and every other child copied ``t`` (the in-place writers died): the copies
        hold everything ``t`` held. The owner and the chain are marked ``tail_dead``.
        """
        P = self.page_size
        t = seg.tail_page
        if seg is self.root or seg.tail_dead or t is None or seg.end % P == 0:
            return
        owner = seg
        while not (owner.pages and owner.pages[-1] == t):
            if owner.inplace_page != t or owner.parent is None or owner.parent is self.root:
                return
            owner = owner.parent
        members: list[Segment] = []
        stack = [owner]
        while stack:
            x = stack.pop()
            if x.handles or x.tail_page != t or x.end % P == 0:
                return  # read by a handle, or by what follows on the same page
            members.append(x)
            for c in x.children.values():
                if c.inplace_page == t:
                    stack.append(c)
                elif not c.head_copied:
                    return
        owner.pages.pop()
        self._claim[t] = 0
        self.pool.release([t])
        for x in members:
            x.tail_dead = True
            x._path_pages = None  # descendants' cached lists stay right: they skip this page

    def _absorb_parent(self, child: Segment) -> Segment:
        """Merge a leaf into its parent's place when it is the parent's only reader.

        Without this, a parent whose in-place child died keeps its partial last page although
        its one remaining child reads its own copy of it: one dead page per such fork, which
        beam search (forks and frees every step) would pile up. O(parent's tokens).
        """
        parent = child.parent
        assert parent is not None and parent.parent is not None
        grand = parent.parent
        # What the merged segment owns and how its head sits (see the module docstring).
        if parent.tail_dead and parent.inplace_page == parent.tail_page:
            pages, head_copied, inplace = [], True, None  # the child's copy replaces the page
        elif not child.head_copied or parent.tail_dead:  # nothing of the parent's dies now
            pages, head_copied, inplace = parent.pages, parent.head_copied, parent.inplace_page
        elif parent.pages and parent.tail_page == parent.pages[-1]:
            dead = parent.pages[-1]  # the parent's partial page: the child reads its copy
            self._claim[dead] = 0
            self.pool.release([dead])
            pages, head_copied, inplace = parent.pages[:-1], parent.head_copied, parent.inplace_page
        else:  # the parent lived in place in the grandparent's page; the child's copy replaces it
            ip = parent.inplace_page
            assert ip is not None and not parent.pages
            self._claim[ip] = parent.start % self.page_size
            pages, head_copied, inplace = [], True, None
        child.pages = pages + child.pages
        child.head_copied = head_copied
        child.inplace_page = inplace
        child.tokens = parent.tokens + child.tokens
        child.logprobs = parent.logprobs + child.logprobs
        child.start = parent.start
        child.depth = parent.depth
        child.parent = grand
        child._path_pages = None
        grand.children = {
            (child.id if k == parent.id else k): (child if k == parent.id else v)
            for k, v in grand.children.items()
        }
        return child

    def _release_segment(self, seg: Segment) -> None:
        if seg.inplace_page is not None and not (
            seg.tail_dead and seg.inplace_page == seg.tail_page
        ):
            # Only this segment's descendants could have claimed past its slots, and they
            # are gone; give the slots back so a sibling can write in place.
            self._claim[seg.inplace_page] = seg.start % self.page_size
        for p in seg.pages:
            self._claim[p] = 0
        if seg.pages:
            self.pool.release(seg.pages)
        seg.pages = []
        seg._path_pages = None

    # ------------------------------------------------------------------ append

    def _new_pages_needed(self, seg: Segment, n: int, sim: dict[int, int]) -> int:
        """Pages an append of ``n`` tokens to a handle on ``seg`` takes; updates ``sim`` claims."""
        if n == 0:
            return 0
        P = self.page_size
        e = seg.end
        need = (e + n - 1) // P - (e - 1) // P if e > 0 else (n + P - 1) // P
        if e % P and seg.frozen:  # a new child segment starting on seg's partial last page
            tail = seg.tail_page
            assert tail is not None
            if sim.get(tail, self._claim[tail]) == e % P:
                sim[tail] = min(P, e % P + n)
            else:
                need += 1  # copy-on-write of the parent's partial page
        return need

    def append(self, b: KVBranch, tokens: Sequence[int]) -> list[int]:
        """Append tokens to a branch; returns one flat slot (page * page_size + offset) each."""
        return self.append_batch([(b, tokens)])[0]

    def append_batch(self, items: Sequence[tuple[KVBranch, Sequence[int]]]) -> list[list[int]]:
        """Append to several branches at once, all or nothing.

        Raises :class:`PoolExhaustedError` (changing nothing) when the pool cannot hold all.
        """
        seen: set[int] = set()
        for b, _ in items:
            self.check_branch(b)
            if b.id in seen:
                raise BranchError(f"branch {b.id} appears twice in one batch")
            seen.add(b.id)
        while True:
            sim: dict[int, int] = {}
            need = sum(self._new_pages_needed(b.leaf, len(t), sim) for b, t in items)
            # Evicting may settle a frozen leaf or free a claim: count again after it.
            if self.cache is None or need + self.cache.watermark <= self.pool.num_free:
                break
            if not self.cache.evict_until(need + self.cache.watermark):
                break
        if need > self.pool.num_free:
            raise PoolExhaustedError(
                f"this step needs {need} new KV pages but only {self.pool.num_free} of "
                f"{self.pool.num_pages} are free"
                + (" (the prefix cache holds none: all were evicted)" if self.cache else "")
                + "; free some branches or use a larger num_pages"
            )
        fresh = self.pool.allocate(need)
        fresh.reverse()
        self._clock += 1
        for b, t in items:
            if t and b.leaf.frozen:  # a shared segment: this handle gets a child of its own
                seg = self._new_segment(b.leaf)
                b.leaf.handles -= 1
                seg.handles = 1
                b.leaf = seg
        return [self._append(b.leaf, list(t), fresh) for b, t in items]

    def _append(self, seg: Segment, tokens: list[int], fresh: list[int]) -> list[int]:
        P = self.page_size
        claim = self._claim
        seg.last_access = self._clock
        n = len(tokens)
        pos = seg.start + len(seg.tokens)
        if n == 1 and pos % P and seg.pages and seg.tail_page != seg.inplace_page:
            # a decode step's token on the segment's own partial page (15 steps in 16): the
            # loop's second case below, without the loop
            page, off = seg.pages[-1], pos % P
            assert claim[page] == off, (page, claim[page], off)
            claim[page] = off + 1
            seg.tail_page = page
            seg.tokens.append(tokens[0])
            seg.logprobs.append(float("nan"))
            return [page * P + off]
        slots: list[int] = []
        # token by token up to a page boundary (a partial page: own, the parent's, or a copy
        # of it); from there the rest fills fresh pages in order, written out in bulk (a
        # 4,096-token prompt's append took about 1 ms of host time token by token)
        while len(slots) < n and (seg.end + len(slots)) % P:
            pos = seg.end + len(slots)
            off = pos % P
            if off == 0:
                page = fresh.pop()
                seg.pages.append(page)
            elif seg.pages and (seg.inplace_page is None or seg.tail_page != seg.inplace_page):
                page = seg.pages[-1]  # own partial page
            elif seg.inplace_page is not None:
                page = seg.inplace_page  # continuing in the parent's page
            else:  # first token of this segment, on the parent's partial page
                parent = seg.parent
                assert parent is not None and parent.tail_page is not None
                src = parent.tail_page
                if claim[src] == off:
                    page = seg.inplace_page = src
                else:
                    page = fresh.pop()
                    self.pool.request_copy(src, page, off)  # batched: see PagePool.flush_copies
                    claim[page] = off
                    seg.pages.append(page)
                    seg.head_copied = True
            assert claim[page] == off, (page, claim[page], off)
            claim[page] = off + 1
            seg.tail_page = page
            slots.append(page * P + off)
        rest = n - len(slots)
        if rest:  # from a page boundary: whole fresh pages, the last one filled in part
            pages = [fresh.pop() for _ in range(-(-rest // P))]
            assert all(claim[p] == 0 for p in pages), "a fresh page already holds tokens"
            for p in pages:
                claim[p] = P
            claim[pages[-1]] = rest - (len(pages) - 1) * P
            seg.pages.extend(pages)
            seg.tail_page = pages[-1]
            slots.extend([p * P + o for p in pages for o in range(P)][:rest])
        seg.tokens.extend(tokens)
        seg.logprobs.extend([float("nan")] * len(tokens))
        return slots

    def truncate(self, b: KVBranch, n: int) -> None:
        """Undo the last ``n`` appends of a branch's leaf (used to roll back a failed step)."""
        self.check_branch(b)
        seg = b.leaf
        if n and seg.frozen:
            raise BranchError(f"branch {b.id} ends on a shared segment; nothing to truncate")
        if n > len(seg.tokens):
            raise BranchError(f"cannot truncate {n} tokens from a leaf holding {len(seg.tokens)}")
        P = self.page_size
        for _ in range(n):
            pos = seg.end - 1
            off = pos % P
            page = seg.tail_page
            assert page is not None
            self._claim[page] = off
            seg.tokens.pop()
            seg.logprobs.pop()
            # An own page that held nothing of ours before this token goes back to the pool:
            # a fresh page (slot 0) or the head copy of the parent's partial page.
            if page != seg.inplace_page and (off == 0 or (seg.head_copied and pos == seg.start)):
                seg.pages.pop()
                self._claim[page] = 0
                self.pool.release([page])
                seg.head_copied = seg.head_copied and bool(seg.pages)
            if seg.tokens:
                seg.tail_page = self._page_of(seg, seg.end - 1)
            else:
                seg.inplace_page = None
                seg.tail_page = None
        if not seg.tokens and seg is not self.root:
            # The append created this segment under a frozen one: put the handle back there.
            parent = seg.parent
            assert parent is not None and parent.frozen and seg.refcount == 1
            del parent.children[seg.id]
            parent.handles += 1
            b.leaf = parent

    def _page_of(self, seg: Segment, pos: int) -> int:
        """Physical page of a position inside ``seg`` (which must hold it)."""
        P = self.page_size
        first_own = seg.start // P
        if seg.start % P and not seg.head_copied:
            if pos // P == first_own:
                assert seg.inplace_page is not None
                return seg.inplace_page
            first_own += 1
        return seg.pages[pos // P - first_own]

    def patch_last(self, b: KVBranch, token: int, logprob: float) -> None:
        """Give the leaf's last token its value (a pipelined decode appends a placeholder
        before the sample it stands for has reached the host)."""
        seg = b.leaf
        seg.tokens[-1] = token
        seg.logprobs[-1] = logprob

    def set_logprobs(self, b: KVBranch, logprobs: Sequence[float]) -> None:
        """Record the sampling log-probs of the leaf's last ``len(logprobs)`` tokens."""
        seg = b.leaf
        if logprobs:
            seg.logprobs[-len(logprobs) :] = list(logprobs)

    # ------------------------------------------------------------------ reading

    def path(self, b: KVBranch) -> list[Segment]:
        """Segments root-exclusive -> leaf (walks the path; not for hot loops)."""
        out: list[Segment] = []
        seg: Segment | None = b.leaf
        while seg is not None and seg is not self.root:
            out.append(seg)
            seg = seg.parent
        out.reverse()
        return out

    def _cached_pages(self, seg: Segment) -> list[int]:
        """Full page list of a frozen segment, cached; never mutate the result."""
        if seg._path_pages is not None:
            return seg._path_pages
        stack: list[Segment] = []
        s: Segment = seg
        while s._path_pages is None:
            stack.append(s)
            assert s.parent is not None
            s = s.parent
        pages = s._path_pages
        while stack:
            s = stack.pop()
            pages = self._extend(pages, s)
            s._path_pages = pages
        return pages

    @staticmethod
    def _extend(base: list[int], seg: Segment) -> list[int]:
        """``seg``'s page list from its parent's (``base``): a head copy replaces the parent's
        partial last page, unless that page is already gone from the parent (``tail_dead``)."""
        parent = seg.parent
        if seg.head_copied and not (parent is not None and parent.tail_dead):
            return base[:-1] + seg.pages
        return base + seg.pages

    def page_list(self, b: KVBranch) -> list[int]:
        """Physical pages holding positions 0..len(b)-1, in order."""
        leaf = b.leaf
        if leaf.frozen:
            return list(self._cached_pages(leaf))
        assert leaf.parent is not None
        return self._extend(self._cached_pages(leaf.parent), leaf)

    def _page_list_uncached(self, b: KVBranch) -> list[int]:
        pages: list[int] = []
        for seg in self.path(b):
            pages = self._extend(pages, seg)
        return pages

    def token_ids(self, b: KVBranch) -> list[int]:
        out: list[int] = []
        for seg in self.path(b):
            out.extend(seg.tokens)
        return out

    def logprobs(self, b: KVBranch) -> list[float]:
        out: list[float] = []
        for seg in self.path(b):
            out.extend(seg.logprobs)
        return out

    def segments(self) -> Iterator[Segment]:
        """Every live segment, depth-first, root excluded."""
        stack = list(reversed(self.root.children.values()))
        while stack:
            seg = stack.pop()
            yield seg
            stack.extend(reversed(seg.children.values()))

    def page_refcounts(self) -> dict[int, int]:
        """How many live branches read each used page (derived, for display)."""
        counts: dict[int, int] = {}
        for b in self.branches.values():
            for p in self.page_list(b):
                counts[p] = counts.get(p, 0) + 1
        return counts

    def stats(self) -> TreeStats:
        refs = self.page_refcounts()
        shared = sum(1 for c in refs.values() if c >= 2)
        pb = self.pool.config.page_bytes
        used = self.pool.num_used
        segs = list(self.segments())
        return TreeStats(
            total_pages=self.pool.num_pages,
            free_pages=self.pool.num_free,
            used_pages=used,
            shared_pages=shared,
            page_bytes=pb,
            used_bytes=used * pb,
            shared_bytes=shared * pb,
            live_branches=len(self.branches),
            segments=len(segs),
            logical_tokens=sum(len(b) for b in self.branches.values()),
            unique_tokens=sum(len(s.tokens) for s in segs),
            cached_pages=used - len(refs),
        )

    # ------------------------------------------------------------------ invariants

    def check_integrity(self) -> None:
        """Assert every invariant of pool and tree; raises AssertionError naming the first break.

        - every page is free xor owned by exactly one live segment; nothing leaks;
        - segment refcounts equal children + handles; count 0 only for cached segments, which
          end on a page boundary and are exactly the prefix cache's list;
        - no segment is empty; a segment with children or two handles is frozen;
        - children start where their parent ends; own pages match the token count;
        - page claims match what the owners and in-place writers hold;
        - every branch's page list covers exactly its length.
        """
        P = self.page_size
        owner: dict[int, int] = {}
        expected_claim = [0] * self.pool.num_pages
        handles: dict[int, int] = {}
        for b in self.branches.values():
            assert b.alive, f"dead branch {b.id} registered"
            handles[b.leaf.id] = handles.get(b.leaf.id, 0) + 1
        assert self.root.handles == handles.get(0, 0), "root handle count wrong"
        n_cached = 0
        for seg in self.segments():
            parent = seg.parent
            assert parent is not None
            assert parent.children.get(seg.id) is seg, f"segment {seg.id} detached from parent"
            assert seg.start == parent.end, (
                f"segment {seg.id} starts at {seg.start}, parent ends {parent.end}"
            )
            assert seg.handles == handles.get(seg.id, 0), f"segment {seg.id} handle count wrong"
            if seg.refcount == 0:  # only a cached segment: own pages, whole pages, indexed
                assert self.cache is not None and self.cache.cached.get(seg.id) is seg, (
                    f"segment {seg.id} is live with refcount 0"
                )
                assert seg.end % P == 0 and not seg.frozen, f"cached segment {seg.id} not trimmed"
                n_cached += 1
            else:
                assert self.cache is None or seg.id not in self.cache.cached, (
                    f"segment {seg.id} is referenced but listed as cached"
                )
            if seg.children or seg.handles > 1:
                assert seg.frozen, f"segment {seg.id} is shared but not frozen"
            assert len(seg.logprobs) == len(seg.tokens)
            for p in seg.pages:
                assert p not in owner, f"page {p} owned by segments {owner[p]} and {seg.id}"
                assert not self.pool.is_free(p), f"page {p} owned by {seg.id} but on the free list"
                owner[p] = seg.id
            n = len(seg.tokens)
            s, e = seg.start, seg.end
            assert n > 0, f"segment {seg.id} is empty"
            inherited = s % P != 0
            if inherited and not seg.head_copied:
                ip = seg.inplace_page
                assert ip is not None and ip == parent.tail_page, (
                    f"segment {seg.id} in-place page wrong"
                )
                own_first = s // P + 1
                if not (seg.tail_dead and ip == seg.tail_page):  # a dead page claims nothing
                    expected_claim[ip] = max(expected_claim[ip], min(P, s % P + n))
            else:
                assert seg.inplace_page is None
                own_first = s // P
            own_last = (e - 1) // P
            want = max(0, own_last - own_first + 1)
            want -= seg.tail_dead and own_last >= own_first  # the owner's dead page is gone
            assert len(seg.pages) == want, (
                f"segment {seg.id} owns {len(seg.pages)} pages, needs {want}"
            )
            for i, p in enumerate(seg.pages):
                last = min(e, (own_first + i + 1) * P) - 1  # our last position on this page
                expected_claim[p] = max(expected_claim[p], last % P + 1)
            if seg.tail_dead:
                assert seg.handles == 0 and seg.children, f"segment {seg.id}: dead tail, readers"
                for c in seg.children.values():  # a copy, or the in-place chain (dead too)
                    chain = c.tail_dead and c.inplace_page == seg.tail_page
                    assert c.head_copied or chain, f"{seg.id} dead tail read by {c.id}"
            else:
                assert seg.tail_page == self._page_of(seg, e - 1), (
                    f"segment {seg.id} tail page wrong"
                )
        if self.cache is not None:
            assert n_cached == len(self.cache.cached), "a cached segment is not in the tree"
        used = self.pool.num_pages - self.pool.num_free
        assert len(owner) == used, f"{used} pages in use but {len(owner)} owned: leak"
        for p in range(self.pool.num_pages):
            if self.pool.is_free(p):
                assert self._claim[p] == 0, f"free page {p} has claim {self._claim[p]}"
            else:
                assert self._claim[p] == expected_claim[p], (
                    f"page {p} claim {self._claim[p]} != {expected_claim[p]}"
                )
        for b in self.branches.values():
            pages = self.page_list(b)
            assert len(pages) == (len(b) + P - 1) // P, f"branch {b.id} page list length wrong"
            assert pages == self._page_list_uncached(b), f"branch {b.id} cached page list stale"
            assert all(not self.pool.is_free(p) for p in pages), f"branch {b.id} reads a free page"
