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

    def release(self, request: Request) -> None:
        if request.pages:
            self.allocator.free(request.pages)
            request.pages = []
