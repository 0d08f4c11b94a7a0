"""Automatic prefix caching: the KV of a page, once computed, is found again by what it holds.

Each full page of a sequence is named by a hash chained from its parent page's hash and its
token ids (vLLM v1's hash_block_tokens); the chain starts at a root key that holds the
request's cache_salt, so that only requests with the same salt share. A table maps hash ->
page. A new request takes every cached full page of its longest cached prefix (a reference
each) and computes only from there. Where the prefix goes on inside a page (the page is not
full, or it diverges half way), the best-matching cached page under the same parent is copied
into a page of the request's own (copy-on-write, done at once: the request writes that page in
its very first chunk), so the n sequences of one request (n > 1) share the whole prompt but its
last token.

Reference counts stay with the C++ PageAllocator: the cache holds one reference of its own to
each full page it has named (so that page outlives the requests that computed it), and takes
over the last reference of a request's partial last page when the request lets it go. A page
whose only reference is the cache's is evictable: it counts as free memory, and is freed,
least recently used first, only when a new page is needed (vLLM's free-block queue; nano-vllm's
block_manager). Pages a running request holds are never evicted: their refcount is above 1.

A page is cached only once the iteration computing its KV has been launched (the scheduler
registers them at the start of the next iteration, or when the request leaves): a request
reading it then runs in a later iteration, which the device runs after. Within one iteration
the planner orders only a sequence's own reads after its writes, so a page must never be
shared with the iteration that writes it.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from .kv_offload import HostKVPool
from .request import Request

# The newest cached pages under one parent and first token scanned for a partial match: a
# partial match saves less than a page, and many prompts share a first token (BOS).
_PARTIAL_CANDIDATES = 32


def root_key(cache_salt: str | None) -> bytes:
    """The parent key of a sequence's first page: sequences with different salts share
    nothing."""
    return hashlib.sha256(b"nanorun-prefix-root\0" + (cache_salt or "").encode()).digest()


def page_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The name of a full page: its parent's hash and its token ids (sha256: the same on every
    tensor-parallel rank and every process, and collisions are not a concern)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


@dataclass(frozen=True)
class PrefixHit:
    """What the cache holds of a request's prefix: `pages` (full pages, in order) hold its first
    len(pages) * page_size tokens; `copy_from`, if not None, is a page whose first
    `copy_tokens` tokens continue that prefix (to be copied into a page of the request's
    own). `host`: the names of the full pages after `pages` that the host tier holds (to be
    copied back into new pages), before the copy."""

    pages: tuple[int, ...] = ()
    copy_from: int | None = None
    copy_tokens: int = 0
    host: tuple[bytes, ...] = ()

    def num_tokens(self, page_size: int) -> int:
        return (len(self.pages) + len(self.host)) * page_size + self.copy_tokens


@dataclass
class _Entry:
    parent: bytes
    tokens: tuple[int, ...]
    hash: bytes | None          # None: a partial page (a copy source only)


class PrefixCache:
    """The table of cached pages beside a PageAllocator (see the module's docstring)."""

    def __init__(self, allocator, page_size: int, host: HostKVPool | None = None) -> None:
        self.allocator = allocator
        self.page_size = page_size
        # The host tier (nanorun.kv_offload), and this iteration's copies to and from it:
        # (device page, slot) saved, (slot, device page) loaded.
        self.host = host
        self.saves: list[tuple[int, int]] = []
        self.loads: list[tuple[int, int]] = []
        self._by_hash: dict[bytes, int] = {}
        self._entries: dict[int, _Entry] = {}
        # (parent key, first token) -> {page: None}, newest last: partial-match candidates.
        self._children: dict[tuple[bytes, int], dict[int, None]] = {}
        self._held: set[int] = set()     # pages the cache holds a reference to
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        # Prompt tokens looked up and found (vLLM's prefix_cache_queries / _hits, in tokens).
        self.queries = 0
        self.hits = 0

    # -- what a request's pages are called --------------------------------------------------
    def parent_key(self, request: Request, page: int) -> bytes:
        return root_key(request.cache_salt) if page == 0 else self.hashes(request, page)[-1]

    def hashes(self, request: Request, num_pages: int) -> list[bytes]:
        """The hashes of the request's first num_pages pages (their tokens must be known),
        computed once per request."""
        hashes, ps = request.block_hashes, self.page_size
        while len(hashes) < num_pages:
            i = len(hashes)
            parent = root_key(request.cache_salt) if i == 0 else hashes[-1]
            hashes.append(page_hash(parent, request.token_at(i * ps, (i + 1) * ps)))
        return hashes[:num_pages]

    # -- looking up --------------------------------------------------------------------------
    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def match(self, request: Request, limit: int) -> PrefixHit:
        """The longest cached prefix of the request's first `limit` tokens."""
        ps = self.page_size
        pages: list[int] = []
        hashes = self.hashes(request, limit // ps)
        for h in hashes:
            page = self._by_hash.get(h)
            if page is None:
                break
            pages.append(page)
        host = self._in_host(hashes[len(pages):])
        full = len(pages) + len(host)
        want = request.token_at(full * ps, min(limit, (full + 1) * ps))
        if not want or host:     # (a page to copy from after host pages: rare, not sought)
            return PrefixHit(tuple(pages), host=host)
        best, best_n = None, 0
        for page in self._candidates(self.parent_key(request, len(pages)), want[0]):
            n = _common_prefix(self._entries[page].tokens, want)
            if n > best_n:
                best, best_n = page, n
        return PrefixHit(tuple(pages), best, best_n)

    def _in_host(self, hashes: list[bytes]) -> tuple[bytes, ...]:
        """The leading names of `hashes` that the host tier holds."""
        if self.host is None or not hashes:
            return ()
        found = 0
        while found < len(hashes) and hashes[found] in self.host:
            found += 1
        return tuple(hashes[:found])

    def _candidates(self, parent: bytes, first: int) -> list[int]:
        children = self._children.get((parent, first))
        if not children:
            return []
        newest = reversed(children)
        return [p for _, p in zip(range(_PARTIAL_CANDIDATES), newest)]

    def pin(self, pages: Sequence[int]) -> None:
        """Take a reference to each of `pages` (cached ones): they are no longer evictable."""
        self.allocator.incref(list(pages))
        for page in pages:
            self._evictable.pop(page, None)

    def unpin(self, pages: Sequence[int]) -> None:
        """Drop references pin() took (or that requests held); a cached page left with only
        the cache's reference becomes evictable, as the most recently used."""
        self.allocator.free(list(pages))
        self._mark_evictable(pages)

    def _mark_evictable(self, pages: Sequence[int]) -> None:
        for page in pages:
            if page in self._held and self.allocator.refcount(page) == 1:
                self._evictable[page] = None
                self._evictable.move_to_end(page)

    def load(self, request: Request, keys: tuple[bytes, ...], slots: list[int],
             pages: list[int]) -> None:
        """Bring the host tier's pages named `keys` (the request's next full pages, taken from
        `slots`) back into the new device pages `pages`, the request's last: named in the
        cache again, copied in by this iteration's device work."""
        start = len(request.pages) - len(pages)
        for i, (key, slot, page) in enumerate(zip(keys, slots, pages)):
            self.loads.append((slot, page))
            n = start + i
            tokens = tuple(request.token_at(n * self.page_size, (n + 1) * self.page_size))
            self._add(page, _Entry(self.parent_key(request, n), tokens, key))
            self._by_hash[key] = page
            self.allocator.incref([page])
            self._held.add(page)
        request.num_pages_cached = len(request.pages)

    def moves(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """This iteration's (saves, loads) to and from the host tier, handed to its device
        work once; from now on the slots loaded from may be reused."""
        saves, loads, self.saves, self.loads = self.saves, self.loads, [], []
        if self.host is not None:
            self.host.next_iteration()
        return saves, loads

    # -- caching -----------------------------------------------------------------------------
    def cache_full_pages(self, request: Request, num_tokens: int) -> None:
        """Name the request's full pages among its first num_tokens tokens (their KV computed
        by launched iterations, their tokens known). A page whose hash is cached already (the
        same prefix computed twice at once) stays the request's own."""
        ps = self.page_size
        n = min(num_tokens // ps, len(request.pages))
        done = request.num_pages_cached
        if n <= done:
            return
        hashes = self.hashes(request, n)
        for i in range(done, n):
            page, h = request.pages[i], hashes[i]
            if h in self._by_hash or page in self._entries and self._entries[page].hash:
                continue
            tokens = tuple(request.token_at(i * ps, (i + 1) * ps))
            self._forget(page)           # a partial entry of the page it was before
            self._add(page, _Entry(self.parent_key(request, i), tokens, h))
            self._by_hash[h] = page
            if page not in self._held:
                self.allocator.incref([page])
                self._held.add(page)
        request.num_pages_cached = n

    def cache_partial_page(self, request: Request, num_tokens: int) -> None:
        """Name the partial page holding positions [k * page_size, num_tokens) of the request
        (k = num_tokens // page_size) as a copy source, while the request still holds it (no
        reference of the cache's: the request goes on writing its later positions)."""
        ps = self.page_size
        i, n = divmod(num_tokens, ps)
        if not n or i >= len(request.pages):
            return
        page = request.pages[i]
        entry = self._entries.get(page)
        if entry is not None and (entry.hash is not None or len(entry.tokens) >= n):
            return
        self._forget(page)
        self._add(page, _Entry(self.parent_key(request, i),
                               tuple(request.token_at(i * ps, i * ps + n)), None))

    def release(self, request: Request, num_tokens: int) -> None:
        """The request lets its pages go, the KV of its first num_tokens tokens computed: its
        full pages stay cached, the cache keeps its partial last page (as a copy source), the
        rest are freed."""
        self.cache_full_pages(request, num_tokens)
        self.cache_partial_page(request, num_tokens)
        i, n = divmod(num_tokens, self.page_size)
        keep = request.pages[i] if n and i < len(request.pages) else None
        drop = [p for p in request.pages if p != keep]
        if keep is not None and keep not in self._held:
            self._held.add(keep)       # the request's reference becomes the cache's
        elif keep is not None:
            drop.append(keep)
        for page in drop:
            if page not in self._held:
                self._forget(page)     # a partial entry of a page that is freed
        self.allocator.free(drop)
        self._mark_evictable(drop + ([keep] if keep is not None else []))
        request.pages = []
        request.num_pages_cached = 0

    # -- evicting ----------------------------------------------------------------------------
    def evict(self, n: int) -> int:
        """Free up to n evictable pages, least recently used first; returns how many."""
        freed = []
        while len(freed) < n and self._evictable:
            page, _ = self._evictable.popitem(last=False)
            entry = self._entries.get(page)
            if self.host is not None and entry is not None and entry.hash is not None \
                    and all(page != p for _, p in self.loads):   # (else not there yet)
                slot = self.host.reserve(entry.hash)
                if slot is not None:
                    self.saves.append((page, slot))
            self._forget(page)
            self._held.discard(page)
            freed.append(page)
        if freed:
            self.allocator.free(freed)
        return len(freed)

    def clear(self) -> None:
        """Evict every evictable page (vLLM's reset_prefix_cache): pages that running requests
        hold stay, with their names. Nothing goes to the host tier."""
        host, self.host = self.host, None
        self.evict(len(self._evictable))
        self.host = host

    def _add(self, page: int, entry: _Entry) -> None:
        self._entries[page] = entry
        if entry.tokens:
            self._children.setdefault((entry.parent, entry.tokens[0]), {})[page] = None

    def _forget(self, page: int) -> None:
        entry = self._entries.pop(page, None)
        if entry is None:
            return
        if entry.hash is not None and self._by_hash.get(entry.hash) == page:
            del self._by_hash[entry.hash]
        key = (entry.parent, entry.tokens[0])
        children = self._children.get(key)
        if children is not None:
            children.pop(page, None)
            if not children:
                del self._children[key]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def worth_waiting(request: Request, hit: int, computing: list[Request], page_size: int,
                  limit: int) -> bool:
    """Whether a request that has computed nothing should wait for one of `computing` (running
    requests still computing their prompt) rather than compute what that one is computing:
    once that prompt's pages are cached, the request would find at least a page more of its
    first `limit` tokens than the `hit` it finds now (or all it needs). So the n sequences of
    one request compute their prompt once."""
    want = min(limit - hit, page_size)
    if want <= 0:
        return False
    tokens = request.prompt_token_ids[:limit]
    for other in computing:
        gain = _common_prefix(other.prompt_token_ids, tokens)
        if gain - hit >= want and other.num_computed_tokens < gain:
            return True
    return False
