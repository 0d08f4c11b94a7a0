"""Phi-3 (Phi-3-mini / medium, Phi-3.5-mini, Phi-4-mini): the Llama decoder with LongRoPE.

What differs from Llama, and where it lives:
  * the checkpoint fuses q/k/v into qkv_proj [Q + 2K, D] and gate/up into gate_up_proj [2I, D]:
    nanorun's own fused layout, so each fills its fused tensor whole (Phi3Model's
    layer_weight_names), cut for tensor parallelism like any fused tensor
  * partial rotary (Phi-4-mini: partial_rotary_factor 0.75): rope turns only the first
    config.rotary_dim dims of each head (models.llama's rope op reads rotary_dim)
  * rope scaling "longrope" (alias "su"): here, `longrope_tables`
  * an optional sliding window on every layer (Phi-3-mini-4k: 2047), as Mistral's; one at or
    past max_position_embeddings can never bind and is dropped (Phi3Model.read_hf)

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

import math
from typing import Any

import torch

from .config import (ModelConfig, ModelConfigError, RopeScaling, partial_rotary_factor,
                     rope_from_hf)
from .llama import LlamaModel, mlp_norm_weight_name, mlp_shapes, refuse_unsupported
from .loader import Slot


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


def _read_longrope(s: dict[str, Any], d: dict[str, Any]) -> RopeScaling:
    """Phi-3's longrope as transformers reads it: original_max_position_embeddings from the
    top level (Phi3Config's, default 4096) over rope_scaling's, factor = max_position_embeddings
    / that when not given, attention_factor = sqrt(1 + ln(factor) / ln(original)) when not
    given (1 for factor <= 1)."""
    for key in ("short_factor", "long_factor"):
        if not isinstance(s.get(key), list):
            raise ModelConfigError(f"longrope rope scaling needs {key!r}: a list of numbers")
    original = int(d.get("original_max_position_embeddings", 4096))
    factor = s.get("factor") or d["max_position_embeddings"] / original
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RopeScaling("longrope", float(factor), original_max_position_embeddings=original,
                       short_factor=tuple(map(float, s["short_factor"])),
                       long_factor=tuple(map(float, s["long_factor"])),
                       attention_factor=float(attention))


class Phi3Model(LlamaModel):
    """LlamaModel with LongRoPE's tables (module docstring); same ops, constructor and
    workspace."""

    # -- the family's Hugging Face configs and checkpoints (models.config.Family) -----------
    MODEL_TYPES = {"Phi3ForCausalLM": "phi3"}

    @classmethod
    def read_hf(cls, d: dict[str, Any], arch: str) -> dict[str, Any]:
        refuse_unsupported(d, arch, attention_bias=False)
        window = d.get("sliding_window")     # on every layer; one past every position never binds
        # transformers' Phi3Config also reads "yarn" as longrope.
        rope = rope_from_hf(d, arch, longrope=lambda s: _read_longrope(s, d),
                            longrope_names=("longrope", "su", "yarn"))
        return {"qkv_bias": False, "rope": rope, "partial_rotary_factor": partial_rotary_factor(d),
                "sliding_window": (window if window is not None
                                   and window < d["max_position_embeddings"] else None)}

    @classmethod
    def hf_fields(cls, config: ModelConfig) -> dict[str, Any]:
        # transformers' Phi3Config reads original_max_position_embeddings at the top level (its
        # default, 4096, overrides the one in rope_scaling); pad_token_id's default, 32000, is
        # outside a small vocabulary, and nanorun does not pad.
        rs = config.rope_scaling
        return {"sliding_window": config.sliding_window,
                "partial_rotary_factor": config.partial_rotary_factor, "pad_token_id": None,
                "original_max_position_embeddings": (rs.original_max_position_embeddings if rs
                                                     else config.max_position_embeddings)}

    @classmethod
    def layer_shapes(cls, config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
        return mlp_shapes(config, p)

    @classmethod
    def layer_weight_names(cls, config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
        """The checkpoint fuses q/k/v and gate/up as nanorun does (same row order), so each
        fills its fused tensor whole (cut per rank like any fused tensor); o_proj and down are
        named as Llama's."""
        d, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
        return {**mlp_norm_weight_name(config, hf, p),
                hf + "self_attn.qkv_proj.weight": Slot(p + "qkv", 0, (q + 2 * kv, d)),
                hf + "self_attn.o_proj.weight": Slot(p + "o_proj", 0, (d, q)),
                hf + "mlp.gate_up_proj.weight": Slot(p + "gate_up", 0, (2 * i, d)),
                hf + "mlp.down_proj.weight": Slot(p + "down", 0, (d, i))}

    def rope_tables(self, max_model_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        rs = self.config.rope_scaling
        if rs is not None and rs.rope_type == "longrope":
            return longrope_tables(self.config, max_model_len, self.device)
        return super().rope_tables(max_model_len)
