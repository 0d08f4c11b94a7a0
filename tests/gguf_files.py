"""GGUF files written from a Hugging Face model directory, as llama.cpp's converter writes them.

`write_gguf(hf_dir, path)` turns tests/text_model.py's tiny Llama (or a Qwen2 made from it) into
a GGUF file with the `gguf` package's writer: the config as `<arch>.*` metadata, the tokenizer
as `tokenizer.ggml.*` metadata, q and k rows permuted for "llama" as convert_hf_to_gguf.py
permutes them, and every matrix stored as `qtype` (F32 by default, so a test can compare
exactly with the directory). `metadata` and `tensors` can be edited before writing, to make
files nanorun must refuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight",
           "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: each head's two rotary halves interleaved."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_metadata(hf_dir: Path) -> dict:
    """The `<arch>.*` and `tokenizer.*` metadata of the model in `hf_dir`."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = _ARCH[cfg["architectures"][0]]
    meta = {
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": cfg["num_attention_heads"],
        f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": float(cfg["rms_norm_eps"]),
        f"{arch}.rope.freq_base": float(cfg["rope_theta"]),
        f"{arch}.rope.dimension_count": cfg["head_dim"],
        f"{arch}.vocab_size": cfg["vocab_size"],
    }
    meta.update(tokenizer_metadata(hf_dir))
    return meta


def tokenizer_metadata(hf_dir: Path) -> dict:
    """tokenizer.json + tokenizer_config.json as llama.cpp stores them: a byte-level vocabulary
    as "gpt2" with its merges; a SentencePiece one as "llama" with scores and no merges (as
    llama.cpp writes from tokenizer.model), so the merges must come from the scores."""
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tj["added_tokens"] if t["special"]}
    byte_level = tj["model"].get("byte_fallback") is not True
    types = [CONTROL if t in special and t != tc["unk_token"] else
             UNKNOWN if t == tc["unk_token"] else
             BYTE if not byte_level and t.startswith("<0x") else NORMAL for t in tokens]
    ids = {t: i for i, t in enumerate(tokens)}
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": ids[tc["bos_token"]],
            "tokenizer.ggml.eos_token_id": ids[tc["eos_token"]],
            "tokenizer.ggml.unknown_token_id": ids[tc["unk_token"]],
            "tokenizer.ggml.padding_token_id": ids[tc["pad_token"]],
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": tc["chat_template"]}
    if byte_level:
        merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
        meta.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
                     "tokenizer.ggml.merges": merges})
    else:   # a learned token's score: the earlier it was learned, the better
        scores = [-float(i) if k == NORMAL else 0.0 for i, k in enumerate(types)]
        meta.update({"tokenizer.ggml.model": "llama", "tokenizer.ggml.scores": scores,
                     "tokenizer.ggml.add_space_prefix": True})
    return meta


def gguf_tensors(hf_dir: Path) -> dict[str, np.ndarray]:
    """The directory's safetensors under GGUF names (q, k permuted for "llama"), float32."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    llama = _ARCH[cfg["architectures"][0]] == "llama"
    heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    out = {}
    for name, w in load_file(str(hf_dir / "model.safetensors")).items():
        gguf_name = _gguf_name(name)
        kind = gguf_name.split(".")[-2]
        if llama and kind in heads:
            w = llama_cpp_permute(w, heads[kind])
        out[gguf_name] = w.astype(np.float32)
    return out


def _gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, suffix = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER[module]}.{suffix}"


def write_gguf(path: Path, arch: str, metadata: dict, tensors: dict[str, np.ndarray],
               qtype=None) -> Path:
    """Write a GGUF file: every matrix as `qtype` (a gguf.GGMLQuantizationType; F32 if None),
    vectors (norms, biases) as F32, as llama.cpp keeps them."""
    qtype = qtype or gguf.GGMLQuantizationType.F32
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        _add(w, key, value)
    for name, t in tensors.items():
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(w, key: str, value) -> None:
    t = gguf.GGUFValueType
    if isinstance(value, list):
        w.add_array(key, value)
    elif isinstance(value, bool):
        w.add_key_value(key, value, t.BOOL)
    elif isinstance(value, int):
        w.add_key_value(key, value, t.UINT32)
    elif isinstance(value, float):
        w.add_key_value(key, value, t.FLOAT32)
    else:
        w.add_key_value(key, value, t.STRING)


def gguf_from_dir(hf_dir: Path, path: Path, qtype=None) -> Path:
    """`hf_dir` (a Llama or Qwen2 directory) as a GGUF file at `path`."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    return write_gguf(path, _ARCH[cfg["architectures"][0]], gguf_metadata(hf_dir),
                      gguf_tensors(hf_dir), qtype)


# ---- any nanorun family, from fused weights ---------------------------------------------------

_FAMILY = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
           "Qwen2MoeForCausalLM": "qwen2moe", "Qwen3MoeForCausalLM": "qwen3moe"}


def gguf_from_fused(path: Path, config, weights: dict) -> Path:
    """A GGUF file of `config` holding `weights` (nanorun's fused layout, models/loader.py's
    docstring), cut into llama.cpp's tensors here: q, k, v out of qkv; gate and up out of
    gate_up; each expert's gate, up and down stacked into [E, rows, cols] ffn_*_exps."""
    arch = _FAMILY[config.architecture]
    meta = _config_metadata(config, arch)
    tensors = {"token_embd.weight": weights["embed"], "output_norm.weight": weights["norm"]}
    if not config.tie_word_embeddings:
        tensors["output.weight"] = weights["lm_head"]
    for n in range(config.num_layers):
        tensors.update(_layer_tensors(config, arch, n, weights))
    if config.rope_scaling is not None:          # Llama 3.1: the factors, as llama.cpp stores them
        tensors["rope_freqs.weight"] = _llama3_rope_factors(config)
    tensors = {k: v.numpy().astype(np.float32) if hasattr(v, "numpy") else v
               for k, v in tensors.items()}
    return write_gguf(path, arch, meta, tensors)


def _config_metadata(config, arch: str) -> dict:
    meta = {
        f"{arch}.block_count": config.num_layers,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_heads,
        f"{arch}.attention.head_count_kv": config.num_kv_heads,
        f"{arch}.attention.key_length": config.head_dim,
        f"{arch}.attention.value_length": config.head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": config.rms_norm_eps,
        f"{arch}.rope.freq_base": config.rope_theta,
        f"{arch}.rope.dimension_count": config.head_dim,
        f"{arch}.vocab_size": config.vocab_size,
        "tokenizer.ggml.bos_token_id": config.bos_token_id,
        "tokenizer.ggml.eos_token_id": config.eos_token_ids[0],
    }
    if len(config.eos_token_ids) > 1:
        meta["tokenizer.ggml.eot_token_id"] = config.eos_token_ids[1]
    if config.rope_scaling is not None:
        meta[f"{arch}.rope.scaling.original_context_length"] = (
            config.rope_scaling.original_max_position_embeddings)
    if config.is_moe:
        meta[f"{arch}.expert_count"] = config.num_experts
        meta[f"{arch}.expert_used_count"] = config.num_experts_per_tok
        meta[f"{arch}.expert_feed_forward_length"] = config.intermediate_size
    if config.shared_expert_intermediate_size:
        meta[f"{arch}.expert_shared_feed_forward_length"] = config.shared_expert_intermediate_size
    return meta


def _layer_tensors(config, arch: str, n: int, w: dict) -> dict:
    p, b = f"layers.{n}.", f"blk.{n}."
    q, kv, i, e = config.q_size, config.kv_size, config.intermediate_size, config.num_experts
    out = {b + "attn_norm.weight": w[p + "attn_norm"], b + "ffn_norm.weight": w[p + "mlp_norm"],
           b + "attn_output.weight": w[p + "o_proj"]}
    qkv = w[p + "qkv"].numpy()
    heads = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    for name, rows in (("attn_q", qkv[:q]), ("attn_k", qkv[q:q + kv]), ("attn_v", qkv[q + kv:])):
        out[f"{b}{name}.weight"] = (llama_cpp_permute(rows, heads[name])
                                    if arch == "llama" and name in heads else rows)
    if config.qkv_bias:
        bias = w[p + "qkv_bias"]
        out.update({b + "attn_q.bias": bias[:q], b + "attn_k.bias": bias[q:q + kv],
                    b + "attn_v.bias": bias[q + kv:]})
    if config.qk_norm:
        out.update({b + "attn_q_norm.weight": w[p + "q_norm"],
                    b + "attn_k_norm.weight": w[p + "k_norm"]})
    if not config.is_moe:
        return out | {b + "ffn_gate.weight": w[p + "gate_up"][:i],
                      b + "ffn_up.weight": w[p + "gate_up"][i:], b + "ffn_down.weight": w[p + "down"]}
    gate_up = w[p + "expert_gate_up"].reshape(e, 2, i, -1)
    out |= {b + "ffn_gate_inp.weight": w[p + "router"], b + "ffn_gate_exps.weight": gate_up[:, 0],
            b + "ffn_up_exps.weight": gate_up[:, 1],
            b + "ffn_down_exps.weight": w[p + "expert_down"].reshape(e, config.hidden_size, i)}
    s = config.shared_expert_intermediate_size
    if s:
        out |= {b + "ffn_gate_shexp.weight": w[p + "shared_gate_up"][:s],
                b + "ffn_up_shexp.weight": w[p + "shared_gate_up"][s:],
                b + "ffn_down_shexp.weight": w[p + "shared_down"],
                b + "ffn_gate_inp_shexp.weight": w[p + "shared_gate"].reshape(-1)}
    return out


def _llama3_rope_factors(config) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for llama3 rope scaling."""
    import math

    s, dim = config.rope_scaling, config.head_dim
    lo_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    hi_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    factors = []
    for k in range(0, dim, 2):
        wavelen = 2 * math.pi * config.rope_theta ** (k / dim)
        if wavelen < hi_wavelen:
            factors.append(1.0)
        elif wavelen > lo_wavelen:
            factors.append(s.factor)
        else:
            smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                      / (s.high_freq_factor - s.low_freq_factor))
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(factors, dtype=np.float32)
