"""The paged KV cache: page bookkeeping in the C++ core, page storage as torch tensors."""

from __future__ import annotations

import torch

from . import _core
from .request import Request


class KVCache:
    """K and V pages for every layer, plus the allocator that hands pages to requests.

    Storage per layer is [num_pages, page_size, num_kv_heads, head_dim]: one page holds
    page_size consecutive positions of one sequence, so a token's slot is
    `page * page_size + offset` and a sequence is read through its page table.
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
    ) -> None:
        self.page_size = page_size
        self.allocator = _core.PageAllocator(num_pages)
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def extra_pages_needed(self, request: Request, num_tokens: int) -> int:
        """Pages `request` lacks to hold the KV of its first num_tokens tokens."""
        return max(0, self.pages_for(num_tokens) - len(request.pages))

    def can_grow(self, request: Request, num_tokens: int) -> bool:
        return self.extra_pages_needed(request, num_tokens) <= self.allocator.num_free

    def grow(self, request: Request, num_tokens: int) -> None:
        """Give `request` pages for num_tokens tokens (raises OutOfPagesError, changing nothing)."""
        need = self.extra_pages_needed(request, num_tokens)
        if need:
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

    def share(self, pages: list[int], fork: Request, num_pages: int) -> None:
        """Give `fork`, which holds no pages, a reference to each of the first num_pages of
        `pages` (another sequence's; read-only from then on: see nanorun.scheduler)."""
        if fork.pages:
            raise ValueError(f"request {fork.request_id!r} already holds pages")
        if len(pages) < num_pages:
            raise ValueError(f"{len(pages)} pages given, not the {num_pages} to share")
        pages = pages[:num_pages]
        self.allocator.incref(pages)
        fork.pages = list(pages)

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
        if request.pages:
            self.allocator.free(request.pages)
            request.pages = []
