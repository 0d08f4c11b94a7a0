"""Phi-3 (Phi-3-mini / medium, Phi-3.5-mini, Phi-4-mini): the Llama decoder with LongRoPE.

What differs from Llama, and where it lives:
  * the checkpoint fuses q/k/v into qkv_proj [Q + 2K, D] and gate/up into gate_up_proj [2I, D]:
    nanorun's own fused layout, so models/loader.py takes them whole (and cuts them for tensor
    parallelism like any fused tensor)
  * partial rotary (Phi-4-mini: partial_rotary_factor 0.75): rope turns only the first
    config.rotary_dim dims of each head (models.llama's rope op reads rotary_dim)
  * rope scaling "longrope" (alias "su"): here, `longrope_tables`
  * an optional sliding window on every layer (Phi-3-mini-4k: 2047), as Mistral's; one at or
    past max_position_embeddings can never bind and is dropped (models/config.py)

LongRoPE, as transformers computes it (modeling_rope_utils._compute_longrope_parameters):
inv_freq[i] = 1 / (ext[i] * theta ** (2i / rotary_dim)), ext the short or the long factors,
and cos and sin scaled by attention_factor (default sqrt(1 + ln(factor) / ln(original)),
factor = max_position_embeddings / original_max_position_embeddings, 1 when factor <= 1).

Which factors: the engine's max_model_len chooses, once, as vLLM does: the long factors for
every position when it exceeds original_max_position_embeddings, else the short ones.
transformers chooses per sequence as it grows: short while the sequence fits in the original
length, and when it first outgrows it, generate drops the KV cache and recomputes the whole
sequence with the long factors (Phi3ForCausalLM.prepare_inputs_for_generation). Rotating some
of a sequence's cached keys one way and the rest the other is what that recompute avoids
("better than current failure"), so nanorun does not mix them either. The two agree exactly
(tests/test_families_qwen3_phi3.py) on: everything when max_model_len <= the original length
(no sequence can outgrow it), any prompt longer than it, and every step after a sequence
outgrows it; they differ on a sequence's steps before that when max_model_len is longer (long
factors where transformers still uses the short ones), the price vLLM pays too. Matching
transformers there would take the scheduler recomputing a sequence when it crosses the length,
with a per-sequence choice of tables. A prefill engine and its decode engine (nanorun.disagg)
must share max_model_len, or the keys handed over were rotated with the other factors.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .llama import LlamaModel


def longrope_tables(config: ModelConfig, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, rotary_dim / 2] in fp32 by absolute position, from the long
    factors if max_len exceeds original_max_position_embeddings, else the short ones, scaled by
    attention_factor (module docstring)."""
    rs, dim = config.rope_scaling, config.rotary_dim
    factors = rs.long_factor if max_len > rs.original_max_position_embeddings else rs.short_factor
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (torch.tensor(factors, dtype=torch.float32) * config.rope_theta ** shape)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return ((freqs.cos() * rs.attention_factor).to(device),
            (freqs.sin() * rs.attention_factor).to(device))


class Phi3Model(LlamaModel):
    """LlamaModel with LongRoPE's tables (module docstring); same ops, constructor and
    workspace."""

    def rope_tables(self, max_model_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rs = self.config.rope_scaling
        if rs is not None and rs.rope_type == "longrope":
            return longrope_tables(self.config, max_model_len, self.device)
        return super().rope_tables(max_model_len)
