"""Qwen3, dense (Qwen/Qwen3-0.6B to Qwen3-32B): the Llama decoder plus Qwen3's QK norm.

What differs from Llama 3, and where it lives:
  * a per-head RMSNorm of q and of k (over head_dim, weights q_norm / k_norm) between the qkv
    GEMM and rope: the `qk_norm` op (models.llama declares it; Qwen3-MoE runs it too)
  * an explicit head_dim (128 in every published size, not hidden_size / heads), no qkv bias,
    tied embeddings in the small sizes: config only, which LlamaModel reads
  * a sliding window on every layer or on none (use_sliding_window, max_window_layers), as
    Qwen2; a window on only some layers is refused with a message (Qwen3Model.read_hf), and so
    is attention_bias=true (it adds an o_proj bias nanorun does not have)

The checkpoint names are Llama's plus self_attn.q_norm / k_norm (Qwen3Model's
layer_weight_names). With tensor parallelism each rank normalises its own heads with the
replicated [head_dim] weights, so the op needs no communication.
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig
from .llama import (QK_NORM, QKV, LlamaModel, attention_weight_names, layer_ops,
                    mlp_norm_weight_name, mlp_shapes, mlp_weight_names, qk_norm_shapes,
                    qk_norm_weight_names, qwen_sliding_window, qwen_window_hf,
                    refuse_unsupported)
from .loader import Slot
from .op import OpSpec


def qwen3_layer_ops(tp: int, kv_send: bool = False) -> tuple[OpSpec, ...]:
    """Llama's layer on `tp` ranks (models.llama.layer_ops) with qk_norm right after qkv: it
    rewrites the q and k columns of qkv in place, before rope rotates them."""
    ops = layer_ops(tp, kv_send)
    at = ops.index(QKV) + 1
    return ops[:at] + (QK_NORM,) + ops[at:]


class Qwen3Model(LlamaModel):
    """LlamaModel whose layers run qk_norm after qkv (LlamaModel._qk_norm); same constructor
    and workspace."""

    OPS: tuple[OpSpec, ...] = tuple(dict.fromkeys(LlamaModel.OPS + (QK_NORM,)))

    @classmethod
    def layer_ops_for(cls, config: ModelConfig, tp: int = 1,
                      kv_send: bool = False) -> tuple[OpSpec, ...]:
        return qwen3_layer_ops(tp, kv_send)

    # -- the family's Hugging Face configs and checkpoints (models.config.Family) -----------
    MODEL_TYPES = {"Qwen3ForCausalLM": "qwen3"}
    FEATURES = frozenset({"qk_norm"})

    @classmethod
    def read_hf(cls, d: dict[str, Any], arch: str) -> dict[str, Any]:
        refuse_unsupported(d, arch, attention_bias=True)
        return {"qkv_bias": False, "sliding_window": qwen_sliding_window(d), "qk_norm": True}

    @classmethod
    def hf_fields(cls, config: ModelConfig) -> dict[str, Any]:
        return qwen_window_hf(config)

    @classmethod
    def layer_shapes(cls, config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
        return {**qk_norm_shapes(config, p), **mlp_shapes(config, p)}

    @classmethod
    def layer_weight_names(cls, config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
        return {**mlp_norm_weight_name(config, hf, p), **attention_weight_names(config, hf, p),
                **qk_norm_weight_names(config, hf, p), **mlp_weight_names(config, hf, p)}
