"""Whole iterations as CUDA graphs: one per padded batch size, captured on first use.

A graph replays fixed kernels on fixed addresses, so an iteration is captured once per size
over fixed buffers (StaticBatch) and every later batch of that size is copied in first.

Padding rule: a batch of T tokens runs as the smallest captured size >= T. Sizes are the powers
of two from 8 below an eighth of the dense batch, then every eighth of it: a few decode tokens
pad to at most twice their count, a large batch by at most an eighth of the dense batch (1024:
8, 16, 32, 64, 128, 256, 384, ..., 1024). Padding rows read token 0 at position 0 of a padding
sequence whose one page is page 0, and write no KV (slot -1); their outputs are never read.

One plan serves every batch of a size: the StaticBatch view marks all its rows as one
sequence, so the planner orders attention after the KV appends of every earlier row, which
covers wherever the real sequences start.

The logits stay outside the graph: their row count (the sampled tokens) differs per batch, and
the executor computes them right after the replay, on MAIN, from the caller's batch.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ..batch import Batch, StaticBatch
from ..planner import Launch, Planner
from .streams import MAIN, Streams, issue

logger = logging.getLogger("nanorun")


def graph_sizes(batch_tokens: int) -> tuple[int, ...]:
    """The padded batch sizes graphs are captured for (see the module docstring)."""
    eighth = -(-batch_tokens // 8)
    small = [1 << k for k in range(3, batch_tokens.bit_length()) if (1 << k) < eighth]
    return tuple(sorted(set(small) | {min(batch_tokens, eighth * i) for i in range(1, 9)}))


def padded_size(num_tokens: int, sizes: tuple[int, ...]) -> int:
    for size in sizes:
        if size >= num_tokens:
            return size
    raise ValueError(f"a batch of {num_tokens} tokens is larger than the dense batch "
                     f"({sizes[-1]} tokens) graphs were sized for")


class IterationGraphs:
    """Enqueues whole iterations (all launches but the logits) on `streams` as graphs.

    `launcher(batch)` gives the function that enqueues one op of that batch (the executor's).
    """

    def __init__(self, streams: Streams, planner: Planner, max_tokens: int, device,
                 launcher: Callable[[Batch], Callable[[Launch], None]]) -> None:
        self.streams, self.planner, self.device = streams, planner, torch.device(device)
        self.sizes = graph_sizes(max_tokens)
        self.launcher = launcher
        self.static: StaticBatch | None = None
        self.graphs: dict[int, Any] = {}
        self.failure: str | None = None     # why graphs were given up, if they were

    def enqueue(self, batch: Batch) -> None:
        """Copy `batch` into the fixed buffers on MAIN, then replay the graph of its padded
        size after it (on first use: run the iteration eagerly and capture it)."""
        size = padded_size(batch.num_tokens, self.sizes)
        static = self._static_for(batch)
        view = static.view(size)
        self.streams.enqueue(MAIN, lambda: static.load(batch, size))
        graph = self.graphs.get(size)
        if graph is None:
            self._warm_up_and_capture(size, view)
        else:
            self.streams.replay(graph)

    def _warm_up_and_capture(self, size: int, view: Batch) -> None:
        """Run the iteration eagerly (this batch's result, and every stream's library state
        made before capture), then capture the same launches."""
        plan = self.planner.plan(view)

        def enqueue_all() -> None:
            issue(plan, self.streams, self.launcher(view))

        enqueue_all()
        try:
            self.graphs[size] = self.streams.capture(enqueue_all)
        except RuntimeError as e:
            self.failure = f"capturing a {size}-token iteration failed: {e}"
            logger.warning("nanorun: CUDA graphs off, running eagerly from now on: %s",
                           self.failure)

    def _static_for(self, batch: Batch) -> StaticBatch:
        """The fixed buffers, grown (and every graph dropped) when a page table outgrows them."""
        pages = batch.block_tables.shape[1]
        if self.static is None or pages > self.static.max_pages:
            if self.static is not None:
                logger.info("nanorun: page tables grew past %d columns; recapturing graphs",
                            self.static.max_pages)
            self.graphs.clear()
            self.static = StaticBatch(self.sizes[-1], 1 << max(4, (pages - 1).bit_length()),
                                      self.device)
        return self.static
