"""The host tier of the prefix cache: cached pages evicted from device memory are kept in a
bounded pool of host memory, by name, and copied back when a later request's prefix needs
them, instead of being recomputed (NanoFlow keeps finished turns' KV in host memory so).

The pool's table (name -> slot, least recently used dropped first) is host bookkeeping that
the scheduler changes as it forms an iteration; the copies themselves are device work of
that iteration (KVCache.move_pages: saves, then loads, before its page copies and its model):
a page being evicted may still be written by an iteration in flight, and a page being loaded
into may still be read by one, so neither may be touched from the host before the device
gets there. A slot a load reads is given back only when the next iteration is formed, so no
save of the same iteration overwrites it first.

Two implementations of the copies, behind HostKVPool: on the CPU plain copies; on CUDA,
pinned host memory and copies on a stream of their own, which waits for the iterations
before it and which the iteration's compute waits for.
"""

from __future__ import annotations

import collections
from abc import ABC, abstractmethod

import torch


class HostKVPool(ABC):
    """num_pages pages of K and V (every layer) in host memory, each named by a page hash."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"a host KV pool needs at least one page, got {num_pages}")
        # [slot, layer, page_size, kv_heads, head_dim]: a slot is one page of every layer.
        shape = (num_pages, k.shape[0], *k.shape[2:])
        self.k, self.v = (self._host_buffer(shape, k.dtype) for _ in range(2))
        self.num_pages = num_pages
        self._slots: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self._free = list(range(num_pages - 1, -1, -1))
        self._busy: list[int] = []          # slots loaded from in the iteration being formed
        # Prompt tokens of requests admitted while there is a host tier, and those of them
        # that came back from it (vLLM's external prefix cache queries and hits).
        self.queries = 0
        self.hits = 0

    def __contains__(self, key: bytes) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def reserve(self, key: bytes) -> int | None:
        """A slot to save the page named `key` to (dropping the least recently used page when
        the pool is full); None when it is there already."""
        if key in self._slots:
            self._slots.move_to_end(key)
            return None
        if self._free:
            slot = self._free.pop()
        elif self._slots:
            _, slot = self._slots.popitem(last=False)
        else:
            return None             # every slot is being loaded from this iteration
        self._slots[key] = slot
        return slot

    def take(self, key: bytes) -> int:
        """The slot holding `key`, which leaves the pool (the page goes back to the device)."""
        slot = self._slots.pop(key)
        self._busy.append(slot)
        return slot

    def next_iteration(self) -> None:
        """The iteration that loaded from the busy slots is submitted: later saves run after
        its loads, so those slots may be reused."""
        self._free += self._busy
        self._busy = []

    @abstractmethod
    def _host_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host memory for the pool."""

    @abstractmethod
    def copy(self, kv_k: torch.Tensor, kv_v: torch.Tensor, saves: list[tuple[int, int]],
             loads: list[tuple[int, int]]) -> None:
        """Device work: each (device page, slot) of saves into the pool, then each (slot,
        device page) of loads out of it, every layer, K and V."""


class CpuHostKVPool(HostKVPool):
    """The CPU backend's: the device is host memory, so plain copies."""

    def _host_buffer(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype)

    def copy(self, kv_k, kv_v, saves, loads):
        for cache, pool in ((kv_k, self.k), (kv_v, self.v)):
            if saves:
                pages, slots = (torch.tensor(col) for col in zip(*saves))
                pool.index_copy_(0, slots, cache.index_select(1, pages).transpose(0, 1))
            if loads:
                slots, pages = (torch.tensor(col) for col in zip(*loads))
                cache.index_copy_(1, pages, pool.index_select(0, slots).transpose(0, 1))


class CudaHostKVPool(HostKVPool):
    """Pinned host memory, and the copies on a stream of their own: it starts after the work
    already on the compute stream (the iterations that wrote the pages saved, or read the
    pages loaded into), and the compute stream waits for it before the iteration's model."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, num_pages: int) -> None:
        super().__init__(k, v, num_pages)
        self.stream = torch.cuda.Stream(device=k.device)

    def _host_buffer(self, shape, dtype):
        return torch.zeros(shape, dtype=dtype, pin_memory=True)

    def copy(self, kv_k, kv_v, saves, loads):
        if not saves and not loads:
            return
        compute = torch.cuda.current_stream(kv_k.device)
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            for cache, pool in ((kv_k, self.k), (kv_v, self.v)):
                for page, slot in saves:        # one page of every layer: [L, P, H, D]
                    pool[slot].copy_(cache[:, page], non_blocking=True)
                for slot, page in loads:
                    cache[:, page].copy_(pool[slot], non_blocking=True)
        compute.wait_stream(self.stream)


def host_kv_pool(k: torch.Tensor, v: torch.Tensor, num_pages: int) -> HostKVPool:
    """The host pool for a KV cache's tensors on their device."""
    if k.device.type == "cuda":
        return CudaHostKVPool(k, v, num_pages)
    return CpuHostKVPool(k, v, num_pages)
