"""Runs one iteration of the model over a batch."""

from __future__ import annotations

import torch

from .batch import Batch
from .kv_cache import KVCache


class Executor:
    """Owns the fixed workspace and runs every op of every layer over the batch."""

    def __init__(self, model, kv_cache: KVCache, max_batch_tokens: int, layout="sequential"):
        if layout != "sequential":
            raise ValueError(f"unknown layout {layout!r}: this build knows 'sequential'")
        self.layout_name = "sequential"
        self.model = model
        self.kv = kv_cache
        self.ws = model.new_workspace(max_batch_tokens)

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Returns [N, V] float32 logits of the batch's sampled tokens."""
        m, ws, T = self.model, self.ws, batch.num_tokens
        m.embed(ws, batch, 0, T)
        for layer in range(m.config.num_layers):
            for op in m.layer_ops:
                m.run_op(op.name, layer, ws, batch, self.kv, 0, T)
        return m.logits(ws, batch)
