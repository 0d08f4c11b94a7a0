"""The paged KV cache: page bookkeeping in the C++ core, page storage as torch tensors, and
the prefix cache over both (nanorun.prefix_cache)."""

from __future__ import annotations

import torch

from . import _core
from .kv_offload import host_kv_pool
from .prefix_cache import PrefixCache, PrefixHit
from .request import Request


class KVCache:
    """K and V pages for every layer, plus the allocator that hands pages to requests.

    Storage per layer is [num_pages, page_size, num_kv_heads, head_dim]: one page holds
    page_size consecutive positions of one sequence, so a token's slot is
    `page * page_size + offset` and a sequence is read through its page table.

    prefix_caching: pages whose KV is computed stay named by their prefix when their request
    lets them go, and a new request starts from the longest prefix cached (see
    nanorun.prefix_cache); such pages count as free until they are evicted for new ones.
    host_pages: the host tier's size (nanorun.kv_offload): evicted pages go there, and come
    back from there instead of being recomputed (0: none).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        prefix_caching: bool = True,
        host_pages: int = 0,
    ) -> None:
        self.page_size = page_size
        self.allocator = _core.PageAllocator(num_pages)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        host = host_kv_pool(self.k, self.v, host_pages) if prefix_caching and host_pages else None
        self.prefix_cache = (PrefixCache(self.allocator, page_size, host) if prefix_caching
                             else None)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free_pages(self) -> int:
        """Pages a request may be given: free ones, and cached ones no request holds."""
        cached = self.prefix_cache.num_evictable if self.prefix_cache is not None else 0
        return self.allocator.num_free + cached

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def extra_pages_needed(self, request: Request, num_tokens: int) -> int:
        """Pages `request` lacks to hold the KV of its first num_tokens tokens."""
        return max(0, self.pages_for(num_tokens) - len(request.pages))

    def can_grow(self, request: Request, num_tokens: int) -> bool:
        return self.extra_pages_needed(request, num_tokens) <= self.num_free_pages

    def grow(self, request: Request, num_tokens: int) -> None:
        """Give `request` pages for num_tokens tokens (raises OutOfPagesError, changing nothing)."""
        need = self.extra_pages_needed(request, num_tokens)
        if need:
            short = need - self.allocator.num_free
            if short > 0 and self.prefix_cache is not None:
                self.prefix_cache.evict(short)
            request.pages.extend(self.allocator.allocate(need))

    def place(self, request: Request, layer: int, start: int, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Write K and V [n, num_kv_heads, head_dim] of positions [start, start + n) of
        `request` into its pages of `layer`: the KV another engine computed (nanorun.disagg),
        landing in this cache's own page ids. The request must already hold the pages."""
        n = k.shape[0]
        want = (n, *self.k.shape[3:])
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want or t.dtype != self.k.dtype:
                raise ValueError(f"received {name} of shape {tuple(t.shape)} {t.dtype} does not "
                                 f"fit this cache's {want} {self.k.dtype}: the prefill and decode "
                                 f"engines must run the same model, dtype and tensor parallelism")
        if self.pages_for(start + n) > len(request.pages):
            raise ValueError(f"request {request.request_id!r} holds {len(request.pages)} pages, "
                             f"too few for positions [{start}, {start + n}); grow() it first")
        device = self.k.device
        positions = torch.arange(start, start + n, device=device)
        pages = torch.tensor(request.pages, dtype=torch.int64, device=device)
        slots = pages[positions // self.page_size] * self.page_size + positions % self.page_size
        flat = lambda cache: cache[layer].view(-1, *cache.shape[3:])  # noqa: E731  [slots, H, D]
        flat(self.k).index_copy_(0, slots, k.to(device))
        flat(self.v).index_copy_(0, slots, v.to(device))

    def host_moves(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The iteration's copies to and from the host tier: (device page, slot) saved and
        (slot, device page) loaded, for move_pages; once per iteration."""
        if self.prefix_cache is None:
            return [], []
        return self.prefix_cache.moves()

    def move_pages(self, copies: list[tuple[int, int]], saves: list[tuple[int, int]] = (),
                   loads: list[tuple[int, int]] = ()) -> None:
        """An iteration's page work, before its model (device work, in stream order): pages
        evicted to the host tier saved, pages taken from it loaded, then page copies."""
        if saves or loads:
            self.prefix_cache.host.copy(self.k, self.v, list(saves), list(loads))
        self.copy_pages(copies)

    def copy_pages(self, copies: list[tuple[int, int]]) -> None:
        """Copy page source to page destination, K and V, every layer, for each pair (device
        work, in stream order: no host sync)."""
        if not copies:
            return
        src, dst = (torch.tensor(col, dtype=torch.int64).to(self.k.device, non_blocking=True)
                    for col in zip(*copies))
        for cache in (self.k, self.v):
            cache.index_copy_(1, dst, cache.index_select(1, src))

    def release(self, request: Request) -> None:
        """Take the request's pages back; with prefix caching, those whose KV it computed stay
        cached (their tokens known: under async scheduling the last may not be read back)."""
        if self.prefix_cache is not None:
            self.prefix_cache.release(request, self.computed_known(request))
        elif request.pages:
            self.allocator.free(request.pages)
        request.pages = []

    @staticmethod
    def computed_known(request: Request) -> int:
        """Leading tokens of the request whose KV is computed (by iterations launched) and
        whose ids are known on the host."""
        known = len(request.prompt_token_ids) + len(request.output_token_ids)
        return min(request.num_computed_tokens, known)

    def cache_computed(self, request: Request) -> None:
        """Name the request's newly computed full pages in the prefix cache; while it is still
        computing its prompt, its partial last page too (where the rest of its prompt, or a
        sibling's, may be copied from)."""
        cache = self.prefix_cache
        if cache is None:
            return
        n = self.computed_known(request)
        cache.cache_full_pages(request, n)
        if n <= len(request.prompt_token_ids):
            cache.cache_partial_page(request, n)

    def match_prefix(self, request: Request, limit: int) -> PrefixHit | None:
        """The longest cached prefix of the request's first `limit` tokens (None without
        prefix caching)."""
        if self.prefix_cache is None or limit <= 0:
            return None
        return self.prefix_cache.match(request, limit)

    def take_prefix(self, request: Request, hit: PrefixHit) -> PrefixHit:
        """Give `request` (which holds no pages) a reference to each of the hit's full pages
        and start it after the hit; pin the page the rest is copied from; bring back the
        host tier's pages, as many as there are free pages for. Returns the hit as taken.
        Then finish_take (once its pages have grown), or drop_prefix (to undo)."""
        if request.pages:
            raise ValueError(f"request {request.request_id!r} already holds pages")
        cache = self.prefix_cache
        cache.pin(list(hit.pages) + ([hit.copy_from] if hit.copy_from is not None else []))
        request.pages = list(hit.pages)
        request.num_pages_cached = len(hit.pages)
        if hit.host:    # into new pages (they stay cached if the request is not admitted)
            n = min(len(hit.host), self.num_free_pages)
            # Their slots first: the evictions growing may cause save to the host tier.
            slots = [cache.host.take(key) for key in hit.host[:n]]
            self.grow(request, (len(hit.pages) + n) * self.page_size)
            cache.load(request, hit.host[:n], slots, request.pages[len(hit.pages):])
            if n < len(hit.host):
                hit = PrefixHit(hit.pages, host=hit.host[:n])
        request.num_computed_tokens = hit.num_tokens(self.page_size)
        return hit

    def drop_prefix(self, request: Request, hit: PrefixHit) -> None:
        """Undo take_prefix, before anything was computed (pages loaded from the host tier
        stay cached)."""
        if hit.copy_from is not None:
            self.prefix_cache.unpin([hit.copy_from])
        request.num_computed_tokens = len(request.pages) * self.page_size
        self.release(request)
        request.num_computed_tokens = 0

    def finish_take(self, request: Request, hit: PrefixHit) -> list[tuple[int, int]]:
        """The request took `hit` and its pages have grown: the page copy to make before it
        computes (source, destination), the source unpinned (the copy runs before any later
        write of it, in stream order). Counts the lookup: queries and hits, in tokens."""
        cache = self.prefix_cache
        cache.queries += request.num_tokens
        cache.hits += hit.num_tokens(self.page_size)
        if cache.host is not None:      # vLLM's external prefix cache counts, in tokens
            cache.host.queries += request.num_tokens
            cache.host.hits += len(hit.host) * self.page_size
        if hit.copy_from is None:
            return []
        cache.unpin([hit.copy_from])
        return [(hit.copy_from, request.pages[len(hit.pages)])]

    def clear_prefix_cache(self) -> None:
        """Free every cached page no request holds."""
        if self.prefix_cache is not None:
            self.prefix_cache.clear()
