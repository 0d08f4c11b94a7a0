"""Model classes by their Hugging Face architecture name."""

from __future__ import annotations

from .config import SUPPORTED_ARCHITECTURES, ModelConfig, UnsupportedModelError
from .llama import TORCH_POINTWISE, LlamaModel, OpSpec, PointwiseOps, layer_ops
from .moe import MoEModel, moe_layer_ops

# Llama 2/3, Mistral and Qwen2 share one decoder: they differ only in config (GQA, rope
# scaling, sliding window, qkv bias), which LlamaModel reads.
MODEL_CLASSES = {
    "LlamaForCausalLM": LlamaModel,
    "MistralForCausalLM": LlamaModel,
    "Qwen2ForCausalLM": LlamaModel,
    # The mixture-of-experts families share one decoder too (router, top-k, grouped experts;
    # Qwen2-MoE's shared expert and Qwen3-MoE's QK norm are config switches).
    "MixtralForCausalLM": MoEModel,
    "Qwen2MoeForCausalLM": MoEModel,
    "Qwen3MoeForCausalLM": MoEModel,
}
assert set(MODEL_CLASSES) == set(SUPPORTED_ARCHITECTURES)


def model_layer_ops(config: ModelConfig, tp: int = 1) -> tuple[OpSpec, ...]:
    """The ops of one layer of `config`'s model on `tp` ranks, without building it (what the
    planner, the cost model and the search work on)."""
    return moe_layer_ops(config, tp) if config.is_moe else layer_ops(tp)


def build_model(config: ModelConfig, weights, *, max_model_len: int, attention_fn, kv_append_fn,
                tp_group=None, pointwise: PointwiseOps = TORCH_POINTWISE, kv_sink=None):
    """The model of `config` over `weights`; with `tp_group` (a torch.distributed process group),
    this rank's tensor-parallel shard of it (`weights` must then be the shard). `pointwise`: the
    element-wise ops (RMSNorm, rope, SiLU-and-mul) the backend runs them with. `kv_sink`: a
    prefill engine's KV transport, which gives the layers the kv_send op (models.llama)."""
    try:
        cls = MODEL_CLASSES[config.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"no model class for architecture {config.architecture!r}; supported: "
            f"{sorted(MODEL_CLASSES)}") from None
    return cls(config, weights, max_model_len=max_model_len, attention_fn=attention_fn,
               kv_append_fn=kv_append_fn, tp_group=tp_group, pointwise=pointwise,
               kv_sink=kv_sink)
