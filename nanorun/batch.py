"""One iteration's dense batch, as the tensors the model's ops read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .scheduler import ScheduledChunk


@dataclass(frozen=True)
class Batch:
    """The T tokens of one iteration, sequence by sequence (decode tokens first).

    Token t belongs to sequence seq_ids[t] (a row of block_tables) at absolute position
    positions[t]; its K/V go to slot_mapping[t] = page * page_size + offset. The logits of the
    tokens at sample_indices are sampled, one per sequence whose chunk reaches its last token.
    seq_starts (host ints) gives each sequence's first token and ends with T, so a planner can
    split the batch on sequence boundaries without touching device memory.
    """

    token_ids: torch.Tensor        # [T] int64
    positions: torch.Tensor        # [T] int64
    seq_ids: torch.Tensor          # [T] int32
    slot_mapping: torch.Tensor     # [T] int64
    block_tables: torch.Tensor     # [S, max_pages] int32, padded with -1
    sample_indices: torch.Tensor   # [N] int64
    seq_starts: tuple[int, ...]    # [S + 1]
    num_decode_tokens: int

    @property
    def num_tokens(self) -> int:
        return self.seq_starts[-1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_starts) - 1


def build_batch(chunks: list[ScheduledChunk], page_size: int, device: torch.device,
                *, logits_for_all: bool = False) -> Batch:
    """Lay out the scheduled chunks as one batch. Host work only, then one copy per tensor.

    logits_for_all asks for the logits of every token (scoring a prompt) instead of only the
    sampling ones.
    """
    lengths = np.array([c.length for c in chunks], dtype=np.int64)
    seq_starts = np.concatenate(([0], np.cumsum(lengths)))
    num_tokens = int(seq_starts[-1])
    max_pages = max(len(c.request.pages) for c in chunks)

    token_ids = np.empty(num_tokens, dtype=np.int64)
    positions = np.empty(num_tokens, dtype=np.int64)
    block_tables = np.full((len(chunks), max_pages), -1, dtype=np.int32)
    for s, c in enumerate(chunks):
        lo, hi = seq_starts[s], seq_starts[s + 1]
        token_ids[lo:hi] = c.request.token_at(c.start, c.start + c.length)
        positions[lo:hi] = np.arange(c.start, c.start + c.length)
        block_tables[s, : len(c.request.pages)] = c.request.pages
    seq_ids = np.repeat(np.arange(len(chunks), dtype=np.int32), lengths)
    pages = block_tables[seq_ids, positions // page_size].astype(np.int64)
    slot_mapping = pages * page_size + positions % page_size
    if logits_for_all:
        sample_indices = np.arange(num_tokens, dtype=np.int64)
    else:
        sample_indices = np.array(
            [seq_starts[s + 1] - 1 for s, c in enumerate(chunks) if c.samples], dtype=np.int64)
    num_decode = sum(c.length for c in chunks if c.request.is_decoding)

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
    )
