"""One iteration's dense batch, as the tensors the model's ops read, and the fixed buffers a
captured CUDA graph reads them from."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .request import PENDING, Request
from .scheduler import ScheduledChunk


@dataclass(frozen=True)
class Batch:
    """The T tokens of one iteration, sequence by sequence (in `spread_order`).

    Token t belongs to sequence seq_ids[t] (a row of block_tables) at absolute position
    positions[t]; its K/V go to slot_mapping[t] = page * page_size + offset. The logits of the
    tokens at sample_indices are sampled, one per sequence whose chunk reaches its last token.
    seq_starts (host ints) gives each sequence's first token and ends with T, so a planner can
    split the batch on sequence boundaries without touching device memory.

    pending (async scheduling): the tokens not yet read back to the host, as (index [P] into
    token_ids, rows [P], the previous iteration's sampled ids [N']): token_ids[index] is
    filled from sampled[rows] on the device by read_pending(), in stream order before the
    embedding reads them; until then those entries hold PENDING.
    """

    token_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64
    seq_ids: torch.Tensor          # [T] int32
    slot_mapping: torch.Tensor     # [T] int64
    block_tables: torch.Tensor     # [S, max_pages] int32, padded with -1
    sample_indices: torch.Tensor   # [N] int64
    seq_starts: tuple[int, ...]    # [S + 1]
    num_decode_tokens: int
    pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def read_pending(self) -> None:
        """Copy the pending tokens in from the previous iteration's output (device work, on
        the current stream; no host sync)."""
        if self.pending is not None:
            index, rows, sampled = self.pending
            self.token_ids.index_copy_(0, index, sampled.index_select(0, rows))

    @property
    def num_tokens(self) -> int:
        return self.seq_starts[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_starts) - 1


def spread_order(is_decode: list[bool], lengths: list[int]) -> list[int]:
    """The order of one iteration's sequences in its batch: decode tokens spread evenly among
    the prompt chunks, so every contiguous nano-batch of the layout gets its share of both
    kinds of work. (Decode tokens first would give the first nano-batch all the attention and
    the last all the GEMM-heavy prompt tokens, and each nano-batch's chain of GEMMs, then
    attention, then GEMMs could not hide behind the other's.)

    Each sequence is placed at the middle of its share of its own kind: the i-th of D decode
    tokens at (i + 0.5) / D, a prompt chunk at the middle of the prompt tokens it covers.
    Returns indices into the inputs; the order within each kind is kept.
    """
    decode = [i for i, d in enumerate(is_decode) if d]
    prompt = [i for i, d in enumerate(is_decode) if not d]
    if not decode or not prompt:
        return list(range(len(is_decode)))
    keys = {i: (k + 0.5) / len(decode) for k, i in enumerate(decode)}
    total = sum(lengths[i] for i in prompt)
    before = 0
    for i in prompt:
        keys[i] = (before + lengths[i] / 2) / total
        before += lengths[i]
    return sorted(range(len(is_decode)), key=lambda i: (keys[i], i))


def build_batch(chunks: list[ScheduledChunk], page_size: int, device: torch.device,
                *, logits_for_all: bool = False,
                all_logits: Sequence[bool] | None = None,
                previous: tuple[torch.Tensor, Mapping[Request, int]] | None = None) -> Batch:
    """Lay out the scheduled chunks as one batch. Host work only, then one copy per tensor.

    logits_for_all asks for the logits of every token (scoring a prompt) instead of only the
    sampling ones; all_logits (one flag per chunk) asks for every token's logits of the chunks
    flagged (prompt logprobs) and the sampling token's of the others, chunk by chunk.
    previous: (the previous iteration's sampled ids on the device, each request's row in
    them), where requests' last tokens are still pending (async scheduling): see
    Batch.pending.
    """
    # Whole-batch numpy ops over flat lists: per-chunk numpy calls cost ~1 us each, and an
    # iteration has a chunk per running request.
    S = len(chunks)
    lengths = np.fromiter((c.length for c in chunks), dtype=np.int64, count=S)
    starts = np.fromiter((c.start for c in chunks), dtype=np.int64, count=S)
    seq_starts = np.concatenate(([0], np.cumsum(lengths)))
    num_tokens = int(seq_starts[-1])
    ids: list[int] = []
    for c in chunks:
        ids += c.request.token_at(c.start, c.start + c.length)
    token_ids = np.array(ids, dtype=np.int64)
    positions = np.arange(num_tokens, dtype=np.int64) + np.repeat(starts - seq_starts[:-1],
                                                                  lengths)
    block_tables = _block_tables([c.request.pages for c in chunks])
    seq_ids = np.repeat(np.arange(len(chunks), dtype=np.int32), lengths)
    pages = block_tables[seq_ids, positions // page_size].astype(np.int64)
    slot_mapping = pages * page_size + positions % page_size
    if logits_for_all:
        sample_indices = np.arange(num_tokens, dtype=np.int64)
    elif all_logits is not None:
        sample_indices = np.concatenate([np.zeros(0, dtype=np.int64)] + [
            np.arange(seq_starts[s], seq_starts[s + 1]) if every
            else np.array([seq_starts[s + 1] - 1] if c.samples else [], dtype=np.int64)
            for s, (c, every) in enumerate(zip(chunks, all_logits))]).astype(np.int64)
    else:
        samples = np.fromiter((c.samples for c in chunks), dtype=bool, count=S)
        sample_indices = seq_starts[1:][samples] - 1
    num_decode = sum(c.length for c in chunks if c.request.is_decoding)
    pending = _pending(chunks, seq_starts, token_ids, previous, device)

    def to_dev(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).to(device, non_blocking=True)

    return Batch(
        token_ids=to_dev(token_ids),
        positions=to_dev(positions),
        seq_ids=to_dev(seq_ids),
        slot_mapping=to_dev(slot_mapping),
        block_tables=to_dev(block_tables),
        sample_indices=to_dev(sample_indices),
        seq_starts=tuple(int(x) for x in seq_starts),
        num_decode_tokens=num_decode,
        pending=pending,
    )


def _block_tables(pages: list[list[int]]) -> np.ndarray:
    """[S, max pages] int32, each row a page table padded with -1."""
    n = np.fromiter(map(len, pages), dtype=np.int64, count=len(pages))
    table = np.full((len(pages), int(n.max())), -1, dtype=np.int32)
    table[np.arange(table.shape[1])[None, :] < n[:, None]] = np.fromiter(
        itertools.chain.from_iterable(pages), dtype=np.int32, count=int(n.sum()))
    return table


def _pending(chunks: list[ScheduledChunk], seq_starts: np.ndarray, token_ids: np.ndarray,
             previous, device: torch.device):
    """Batch.pending for the PENDING entries of token_ids: a request's only pending token is
    its last (one iteration in flight), sampled in the previous iteration's row for it."""
    index = np.flatnonzero(token_ids == PENDING)
    if not len(index):
        return None
    if previous is None:
        raise ValueError("the batch has tokens not yet read back but no previous iteration's "
                         "output to read them from")
    sampled, rows_of = previous
    seqs = np.searchsorted(seq_starts, index, side="right") - 1
    rows = [rows_of[chunks[s].request] for s in seqs.tolist()]
    return (torch.from_numpy(index).to(device, non_blocking=True),
            torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True), sampled)


class StaticBatch:
    """Fixed device buffers for batches of up to max_tokens tokens, for CUDA graphs.

    A captured graph reads its metadata at fixed addresses, so each batch is copied in (on the
    current stream) before a replay, padded to the graph's size. view(size) is the Batch the
    graph of that size was captured with; it is the same tensors every time. Its seq_starts
    mark all rows as one sequence, the most ordering any batch of that size can need (the
    planner reads them; the ops do not). Its sample_indices are empty: logits are taken from
    the caller's batch. Padding rows (see load) run through every op and are never read back.
    """

    def __init__(self, max_tokens: int, max_pages: int, device) -> None:
        long = dict(dtype=torch.int64, device=device)
        self.pad_row = max_tokens                   # block-table row of the padding sequence
        self.token_ids = torch.zeros(max_tokens, **long)
        self.positions = torch.zeros(max_tokens, **long)
        self.slot_mapping = torch.full((max_tokens,), -1, **long)
        self.seq_ids = torch.zeros(max_tokens, dtype=torch.int32, device=device)
        self.block_tables = torch.full((max_tokens + 1, max_pages), -1, dtype=torch.int32,
                                       device=device)
        self.block_tables[self.pad_row, 0] = 0      # the padding sequence reads page 0
        self._no_samples = torch.zeros(0, **long)

    @property
    def max_pages(self) -> int:
        return self.block_tables.shape[1]

    def view(self, size: int) -> Batch:
        return Batch(
            token_ids=self.token_ids[:size],
            positions=self.positions[:size],
            seq_ids=self.seq_ids[:size],
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables,
            sample_indices=self._no_samples,
            seq_starts=(0, size),
            num_decode_tokens=0,
        )

    def load(self, batch: Batch, size: int) -> None:
        """Copy `batch` into rows [0, T) and pad rows [T, size): token 0 at position 0 of the
        padding sequence, writing no KV (slot -1). Device copies only, no host sync."""
        T, S = batch.num_tokens, batch.num_seqs
        pages = batch.block_tables.shape[1]
        if not T <= size <= self.token_ids.shape[0] or pages > self.max_pages:
            raise ValueError(f"a batch of {T} tokens and {pages} page-table columns does not "
                             f"fit a {size}-token view of buffers for "
                             f"{self.token_ids.shape[0]} tokens and {self.max_pages} columns")
        for buf, src, pad in ((self.token_ids, batch.token_ids, 0),
                              (self.positions, batch.positions, 0),
                              (self.seq_ids, batch.seq_ids, self.pad_row),
                              (self.slot_mapping, batch.slot_mapping, -1)):
            buf[:T].copy_(src, non_blocking=True)
            buf[T:size].fill_(pad)
        self.block_tables[:S, :pages].copy_(batch.block_tables, non_blocking=True)
        self.block_tables[:S, pages:].fill_(-1)
