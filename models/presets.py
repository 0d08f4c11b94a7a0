"""Named model configurations, as Hugging Face config.json dicts.

The real presets copy the published shapes, so a preset's `num_params` and FLOP/KV figures
match the checkpoint; they carry no weights. The tiny presets are for tests and demos: with
`random_weights` they run anywhere in milliseconds.
"""

from __future__ import annotations

import difflib
from typing import Any

from .config import ModelConfig, UnknownModelError

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}


def _cfg(arch: str, model_type: str, *, vocab: int, hidden: int, inter: int, layers: int, heads: int,
         kv_heads: int, max_pos: int, eps: float, theta: float | None, **extra: Any) -> dict[str, Any]:
    """A config.json dict with the keys every Llama-family config shares (theta=None: the
    transformers 5 layout, where rope_theta lives in `rope_parameters` passed via extra)."""
    d = {"architectures": [arch], "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
         "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
         "num_key_value_heads": kv_heads, "max_position_embeddings": max_pos, "rms_norm_eps": eps,
         "hidden_act": "silu", "tie_word_embeddings": False}
    if theta is not None:
        d["rope_theta"] = theta
    d.update(extra)
    return d


def _llama2(**kw: Any) -> dict[str, Any]:
    # Llama 2 (meta-llama/Llama-2-*-hf): 32000-token vocab, 4k context, no rope scaling.
    return _cfg("LlamaForCausalLM", "llama", vocab=32000, max_pos=4096, eps=1e-5, theta=10000.0,
                rope_scaling=None, bos_token_id=1, eos_token_id=2, torch_dtype="float16", **kw)


def _llama31(**kw: Any) -> dict[str, Any]:
    # Llama 3.1 (meta-llama/Llama-3.1-*-Instruct): 128k vocab and context, llama3 rope scaling.
    return _cfg("LlamaForCausalLM", "llama", vocab=128256, max_pos=131072, eps=1e-5, theta=500000.0,
                kv_heads=8, rope_scaling=dict(_LLAMA31_ROPE), bos_token_id=128000,
                eos_token_id=[128001, 128008, 128009], torch_dtype="bfloat16", **kw)


def _qwen2(**kw: Any) -> dict[str, Any]:
    # Qwen2 (Qwen/Qwen2-*-Instruct): q/k/v biases; the sliding window is configured but disabled.
    return _cfg("Qwen2ForCausalLM", "qwen2", vocab=152064, max_pos=32768, eps=1e-6, theta=1000000.0,
                use_sliding_window=False, sliding_window=32768, bos_token_id=151643,
                eos_token_id=151645, torch_dtype="bfloat16", **kw)


def _mixtral(**kw: Any) -> dict[str, Any]:
    # Mixtral (mistralai/Mixtral-8x*-v0.1): 8 experts, top-2; intermediate_size is an expert's.
    return _cfg("MixtralForCausalLM", "mixtral", vocab=32000, max_pos=32768, eps=1e-5, theta=1000000.0,
                kv_heads=8, sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16", **kw)


def _qwen_moe(arch: str, model_type: str, **kw: Any) -> dict[str, Any]:
    # Qwen2-MoE / Qwen3-MoE: every layer sparse (decoder_sparse_step 1, no mlp_only_layers).
    return _cfg(arch, model_type, vocab=151936, eps=1e-6, theta=1000000.0, use_sliding_window=False,
                sliding_window=None, decoder_sparse_step=1, mlp_only_layers=[],
                bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16", **kw)


def _qwen3(**kw: Any) -> dict[str, Any]:
    # Qwen3 dense (Qwen/Qwen3-*): QK norm, head_dim 128 in every size, no window, 40k context.
    return _cfg("Qwen3ForCausalLM", "qwen3", vocab=151936, kv_heads=8, head_dim=128, max_pos=40960,
                eps=1e-6, theta=1000000.0, attention_bias=False, use_sliding_window=False,
                sliding_window=None, bos_token_id=151643, eos_token_id=151645,
                torch_dtype="bfloat16", **kw)


def _phi3(**kw: Any) -> dict[str, Any]:
    # Phi-3 4k-context models (microsoft/Phi-3-*-4k-instruct): fused qkv and gate_up in the
    # checkpoint, no rope scaling, a 2047-token window on every layer.
    return _cfg("Phi3ForCausalLM", "phi3", vocab=32064, max_pos=4096, eps=1e-5, theta=10000.0,
                original_max_position_embeddings=4096, rope_scaling=None, sliding_window=2047,
                bos_token_id=1, eos_token_id=32000, pad_token_id=32000, torch_dtype="bfloat16",
                **kw)


def _gemma(arch: str, model_type: str, **kw: Any) -> dict[str, Any]:
    # Gemma 2 / Gemma 3 text: GeGLU, tied embeddings, head_dim and query_pre_attn_scalar given.
    return _cfg(arch, model_type, eps=1e-6, hidden_act="gelu_pytorch_tanh",
                hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                attention_bias=False, bos_token_id=2, **kw)


PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": _llama2(hidden=4096, inter=11008, layers=32, heads=32, kv_heads=32),
    "llama-2-13b": _llama2(hidden=5120, inter=13824, layers=40, heads=40, kv_heads=40),
    "llama-2-70b": _llama2(hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8),
    "llama-3-8b": _llama31(hidden=4096, inter=14336, layers=32, heads=32),
    "llama-3-70b": _llama31(hidden=8192, inter=28672, layers=80, heads=64),
    # Mistral-7B-v0.1 (v0.3 differs only in a 32768 vocab and no sliding window).
    "mistral-7b": _cfg("MistralForCausalLM", "mistral", vocab=32000, hidden=4096, inter=14336, layers=32,
                       heads=32, kv_heads=8, max_pos=32768, eps=1e-5, theta=10000.0, sliding_window=4096,
                       bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16"),
    "qwen2-7b": _qwen2(hidden=3584, inter=18944, layers=28, heads=28, kv_heads=4, max_window_layers=28),
    "qwen2-72b": _qwen2(hidden=8192, inter=29568, layers=80, heads=64, kv_heads=8, max_window_layers=80),
    # Mixture of experts: Mixtral-8x7B-v0.1, Qwen2-57B-A14B (a gated shared expert; intermediate_size
    # is the dense MLP's, unused when every layer is sparse), Qwen3-30B-A3B (QK norm).
    "mixtral-8x7b": _mixtral(hidden=4096, inter=14336, layers=32, heads=32),
    "qwen2-57b-a14b": _qwen_moe("Qwen2MoeForCausalLM", "qwen2_moe", hidden=3584, inter=18944, layers=28,
                                heads=28, kv_heads=4, max_pos=32768, max_window_layers=28,
                                num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                                shared_expert_intermediate_size=20480, norm_topk_prob=False,
                                qkv_bias=True),
    "qwen3-30b-a3b": _qwen_moe("Qwen3MoeForCausalLM", "qwen3_moe", hidden=2048, inter=6144, layers=48,
                               heads=32, kv_heads=4, head_dim=128, max_pos=40960, max_window_layers=48,
                               num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                               norm_topk_prob=True, attention_bias=False),
    # Qwen3 dense: the small sizes tie their embeddings.
    "qwen3-0.6b": _qwen3(hidden=1024, inter=3072, layers=28, heads=16, max_window_layers=28,
                         tie_word_embeddings=True),
    "qwen3-4b": _qwen3(hidden=2560, inter=9728, layers=36, heads=32, max_window_layers=36,
                       tie_word_embeddings=True),
    "qwen3-8b": _qwen3(hidden=4096, inter=12288, layers=36, heads=32, max_window_layers=36),
    "qwen3-14b": _qwen3(hidden=5120, inter=17408, layers=40, heads=40, max_window_layers=40),
    "qwen3-32b": _qwen3(hidden=5120, inter=25600, layers=64, heads=64, max_window_layers=64),
    # Phi-3-mini-4k-instruct (3.8 B) and Phi-3-medium-4k-instruct (14 B).
    "phi-3-mini": _phi3(hidden=3072, inter=8192, layers=32, heads=32, kv_heads=32),
    "phi-3-medium": _phi3(hidden=5120, inter=17920, layers=40, heads=40, kv_heads=10),
    # google/gemma-2-9b-it: soft-capping, every other layer a 4096-token window.
    "gemma-2-9b": _gemma("Gemma2ForCausalLM", "gemma2", vocab=256000, hidden=3584, inter=14336,
                         layers=42, heads=16, kv_heads=8, head_dim=256, max_pos=8192, theta=10000.0,
                         query_pre_attn_scalar=256, sliding_window=4096,
                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                         eos_token_id=[1, 107], torch_dtype="bfloat16"),
    # The text model of google/gemma-3-12b-it: 5 local layers (1024-token window, rope base 10k)
    # to 1 global (rope base 1M, linear scaling 8), QK norm, no soft-capping.
    "gemma-3-12b": _gemma("Gemma3ForCausalLM", "gemma3_text", vocab=262208, hidden=3840,
                          inter=15360, layers=48, heads=16, kv_heads=8, head_dim=256,
                          max_pos=131072, theta=1000000.0, rope_local_base_freq=10000.0,
                          rope_scaling={"rope_type": "linear", "factor": 8.0},
                          query_pre_attn_scalar=256, sliding_window=1024, sliding_window_pattern=6,
                          attn_logit_softcapping=None, final_logit_softcapping=None,
                          eos_token_id=[1, 106], torch_dtype="bfloat16"),
    # Tiny models: same code paths as the real ones (GQA, rope scaling, window, biases, tying).
    "tiny-llama": _cfg("LlamaForCausalLM", "llama", vocab=2048, hidden=256, inter=688, layers=4, heads=8,
                       kv_heads=2, head_dim=32, max_pos=4096, eps=1e-5, theta=500000.0,
                       rope_scaling={**_LLAMA31_ROPE, "original_max_position_embeddings": 512},
                       bos_token_id=1, eos_token_id=[2, 3], torch_dtype="float32"),
    "tiny-llama2": _cfg("LlamaForCausalLM", "llama", vocab=2048, hidden=256, inter=688, layers=4, heads=8,
                        kv_heads=8, max_pos=2048, eps=1e-5, theta=10000.0, rope_scaling=None,
                        bos_token_id=1, eos_token_id=2, torch_dtype="float32"),
    "tiny-mistral": _cfg("MistralForCausalLM", "mistral", vocab=2048, hidden=256, inter=688, layers=4,
                         heads=8, kv_heads=2, head_dim=32, max_pos=1024, eps=1e-5, theta=10000.0,
                         sliding_window=64, bos_token_id=1, eos_token_id=2, torch_dtype="float32"),
    # transformers 5 layout (rope_parameters) on purpose, to exercise that parser path.
    "tiny-qwen2": _cfg("Qwen2ForCausalLM", "qwen2", vocab=2048, hidden=256, inter=688, layers=4, heads=8,
                       kv_heads=2, max_pos=2048, eps=1e-6, theta=None, tie_word_embeddings=True,
                       use_sliding_window=False, sliding_window=None, max_window_layers=4,
                       bos_token_id=1, eos_token_id=2, dtype="float32",
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Tiny mixtures of experts: more experts than top-k, so routing picks; few layers, for speed.
    "tiny-mixtral": _cfg("MixtralForCausalLM", "mixtral", vocab=2048, hidden=128, inter=96, layers=2,
                         heads=4, kv_heads=2, head_dim=32, max_pos=2048, eps=1e-5, theta=1000000.0,
                         sliding_window=None, num_local_experts=8, num_experts_per_tok=2,
                         bos_token_id=1, eos_token_id=2, torch_dtype="float32"),
    "tiny-qwen2-moe": _cfg("Qwen2MoeForCausalLM", "qwen2_moe", vocab=2048, hidden=128, inter=256, layers=2,
                           heads=4, kv_heads=2, max_pos=2048, eps=1e-6, theta=1000000.0,
                           use_sliding_window=False, sliding_window=None, max_window_layers=2,
                           num_experts=8, num_experts_per_tok=4, moe_intermediate_size=64,
                           shared_expert_intermediate_size=96, norm_topk_prob=False, qkv_bias=True,
                           decoder_sparse_step=1, mlp_only_layers=[], bos_token_id=1, eos_token_id=2,
                           torch_dtype="float32"),
    "tiny-qwen3-moe": _cfg("Qwen3MoeForCausalLM", "qwen3_moe", vocab=2048, hidden=128, inter=256, layers=2,
                           heads=4, kv_heads=2, head_dim=32, max_pos=2048, eps=1e-6, theta=1000000.0,
                           use_sliding_window=False, sliding_window=None, max_window_layers=2,
                           num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
                           norm_topk_prob=True, attention_bias=False, decoder_sparse_step=1,
                           mlp_only_layers=[], bos_token_id=1, eos_token_id=2, torch_dtype="float32"),
    # Tiny Qwen3: tied, head_dim (32) independent of hidden / heads (24).
    "tiny-qwen3": _cfg("Qwen3ForCausalLM", "qwen3", vocab=2048, hidden=96, inter=192, layers=2, heads=4,
                       kv_heads=2, head_dim=32, max_pos=2048, eps=1e-6, theta=1000000.0,
                       tie_word_embeddings=True, attention_bias=False, use_sliding_window=False,
                       sliding_window=None, max_window_layers=2, bos_token_id=1, eos_token_id=2,
                       torch_dtype="float32"),
    # Tiny Phi-4-mini: longrope over an original 32 positions (factor 2048 / 32 = 64), partial
    # rotary 0.75 (24 of 32 dims: 12 factors each), tied. Long factors far from the short ones,
    # so which a position gets shows in the logits.
    "tiny-phi3": _cfg("Phi3ForCausalLM", "phi3", vocab=2048, hidden=128, inter=256, layers=2, heads=4,
                      kv_heads=2, max_pos=2048, eps=1e-5, theta=10000.0, tie_word_embeddings=True,
                      original_max_position_embeddings=32, partial_rotary_factor=0.75,
                      rope_scaling={"type": "longrope",
                                    "short_factor": [1.0 + 0.05 * i for i in range(12)],
                                    "long_factor": [1.0 + 2.5 * i for i in range(12)]},
                      sliding_window=None, bos_token_id=1, eos_token_id=2, pad_token_id=None,
                      torch_dtype="float32"),
    # Tiny Gemmas: head_dim (64) and query_pre_attn_scalar (48) independent of hidden / heads,
    # windows of 32 positions, Gemma 3's rope scaling on its global layers.
    "tiny-gemma2": _gemma("Gemma2ForCausalLM", "gemma2", vocab=2048, hidden=128, inter=256, layers=4,
                          heads=4, kv_heads=2, head_dim=64, max_pos=2048, theta=10000.0,
                          query_pre_attn_scalar=48, sliding_window=32, attn_logit_softcapping=50.0,
                          final_logit_softcapping=30.0, eos_token_id=1, torch_dtype="float32"),
    "tiny-gemma3": _gemma("Gemma3ForCausalLM", "gemma3_text", vocab=2048, hidden=128, inter=256,
                          layers=6, heads=4, kv_heads=2, head_dim=64, max_pos=2048,
                          theta=1000000.0, rope_local_base_freq=10000.0,
                          rope_scaling={"rope_type": "linear", "factor": 2.0},
                          query_pre_attn_scalar=48, sliding_window=32, sliding_window_pattern=3,
                          attn_logit_softcapping=None, final_logit_softcapping=None,
                          eos_token_id=1, torch_dtype="float32"),
}


def list_presets() -> list[str]:
    """Names accepted by `get_preset`, sorted."""
    return sorted(PRESETS)


def suggest_preset(name: str) -> str:
    """' Did you mean 'x'?' for the closest preset name, or '' when none is close."""
    close = difflib.get_close_matches(name, PRESETS, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def get_preset(name: str) -> ModelConfig:
    """The validated `ModelConfig` of a preset; `UnknownModelError` (with a suggestion) otherwise."""
    if name not in PRESETS:
        raise UnknownModelError(f"unknown model preset {name!r}.{suggest_preset(name)} "
                                f"Available: {', '.join(list_presets())}")
    return ModelConfig.from_hf_dict(PRESETS[name], name=name)
