"""Weights in nanorun's fused layout, loaded from Hugging Face safetensors or made up at random.

Fused names and shapes (D = hidden, I = intermediate, V = vocab, Q = q_size, K = kv_size):

    embed                 [V, D]
    layers.{i}.attn_norm  [D]
    layers.{i}.qkv        [Q + 2K, D]   rows: q, then k, then v   (one GEMM instead of three)
    layers.{i}.qkv_bias   [Q + 2K]      only when config.qkv_bias
    layers.{i}.o_proj     [D, Q]
    layers.{i}.mlp_norm   [D]
    layers.{i}.gate_up    [2I, D]       rows: gate, then up       (one GEMM instead of two)
    layers.{i}.down       [D, I]
    norm                  [D]
    lm_head               [V, D]        the very same tensor as `embed` when tied
"""

from __future__ import annotations

import json
import os
import re
from typing import NamedTuple

import torch
from safetensors import safe_open

from .config import ModelConfig


class WeightLoadError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape, or needs an unsupported feature."""


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Fused name -> shape, in a fixed order; lm_head is listed even when tied."""
    d, i, qkv = config.hidden_size, config.intermediate_size, config.q_size + 2 * config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"embed": (config.vocab_size, d)}
    for n in range(config.num_layers):
        p = f"layers.{n}."
        shapes[p + "attn_norm"] = (d,)
        shapes[p + "qkv"] = (qkv, d)
        if config.qkv_bias:
            shapes[p + "qkv_bias"] = (qkv,)
        shapes[p + "o_proj"] = (d, config.q_size)
        shapes[p + "mlp_norm"] = (d,)
        shapes[p + "gate_up"] = (2 * i, d)
        shapes[p + "down"] = (d, i)
    shapes["norm"] = (d,)
    shapes["lm_head"] = (config.vocab_size, d)
    return shapes


# ---- random weights ---------------------------------------------------------------------------

def random_weights(config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights (same names/shapes as `load_weights`): matrices ~ N(0, 0.02),
    norm scales ~ 1 + N(0, 0.02), biases ~ N(0, 0.02). Drawn on the CPU so that a seed gives the
    same numbers on every device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(config).items():
        if name == "lm_head" and config.tie_word_embeddings:
            out[name] = out["embed"]
            continue
        t = torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02
        if name == "norm" or name.endswith("_norm"):
            t += 1.0
        out[name] = t.to(device=device, dtype=dtype)
    return out


# ---- Hugging Face checkpoints -----------------------------------------------------------------

class _Slot(NamedTuple):
    """Where one HF tensor goes: rows [start, start + shape[0]) of fused tensor `name`."""
    name: str
    start: int
    shape: tuple[int, ...]


def _hf_plan(config: ModelConfig) -> dict[str, _Slot]:
    """HF tensor name -> slot in the fused layout."""
    d, i, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    plan = {"model.embed_tokens.weight": _Slot("embed", 0, (config.vocab_size, d)),
            "model.norm.weight": _Slot("norm", 0, (d,))}
    if not config.tie_word_embeddings:
        plan["lm_head.weight"] = _Slot("lm_head", 0, (config.vocab_size, d))
    for n in range(config.num_layers):
        hf, p = f"model.layers.{n}.", f"layers.{n}."
        plan[hf + "input_layernorm.weight"] = _Slot(p + "attn_norm", 0, (d,))
        plan[hf + "post_attention_layernorm.weight"] = _Slot(p + "mlp_norm", 0, (d,))
        for proj, start, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
            plan[f"{hf}self_attn.{proj}_proj.weight"] = _Slot(p + "qkv", start, (rows, d))
            if config.qkv_bias:
                plan[f"{hf}self_attn.{proj}_proj.bias"] = _Slot(p + "qkv_bias", start, (rows,))
        plan[hf + "self_attn.o_proj.weight"] = _Slot(p + "o_proj", 0, (d, q))
        plan[hf + "mlp.gate_proj.weight"] = _Slot(p + "gate_up", 0, (i, d))
        plan[hf + "mlp.up_proj.weight"] = _Slot(p + "gate_up", i, (i, d))
        plan[hf + "mlp.down_proj.weight"] = _Slot(p + "down", 0, (d, i))
    return plan


# Biases nanorun has nowhere to put: skipping them would silently change the model's output.
_UNSUPPORTED = re.compile(r"\.(o_proj|gate_proj|up_proj|down_proj|q_proj|k_proj|v_proj)\.bias$")
# Tensors that are redundant by construction and safe to skip without telling anyone.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)|(^lm_head\.weight$)")


def _checkpoint_files(path: str) -> tuple[dict[str, str], str]:
    """(HF tensor name -> safetensors file, description used in errors). An empty map means
    "a single file holding everything"."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightLoadError(f"{index} is not a valid safetensors index "
                                  f"(needs 'weight_map'): {e}") from e
        return {k: os.path.join(path, v) for k, v in weight_map.items()}, index
    if os.path.isfile(single):
        return {}, single
    raise WeightLoadError(f"{path!r} holds neither model.safetensors nor model.safetensors.index.json")


def load_weights(config: ModelConfig, path: str | os.PathLike, *, dtype: torch.dtype,
                 device: torch.device | str, unused: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read a HF checkpoint directory into the fused layout (see module docstring), cast to
    `dtype` on `device`. Files are read one at a time and each tensor is copied straight into
    its slice of the preallocated fused tensor, so host memory stays at about one tensor.

    Tensors the model does not use are skipped; their names are appended to `unused` if given.
    Raises WeightLoadError for a missing tensor, a wrong shape or an unsupported bias."""
    path = os.fspath(path)
    plan = _hf_plan(config)
    where, source = _checkpoint_files(path)
    files = sorted(set(where.values())) if where else [source]
    for hf_name in plan:
        if where and hf_name not in where:
            raise WeightLoadError(f"tensor {hf_name!r} is missing from {source}")

    shapes = weight_shapes(config)
    out = {n: torch.empty(shapes[n], dtype=dtype, device=device)
           for n in {slot.name for slot in plan.values()}}
    found: set[str] = set()
    for file in files:
        found |= _load_file(file, plan, out, unused)
    for hf_name in plan:
        if hf_name not in found:
            raise WeightLoadError(f"tensor {hf_name!r} is missing from {where.get(hf_name, source)}")
    if config.tie_word_embeddings:
        out["lm_head"] = out["embed"]
    return {n: out[n] for n in shapes if n in out}


def _load_file(file: str, plan: dict[str, _Slot], out: dict[str, torch.Tensor],
               unused: list[str] | None) -> set[str]:
    """Copy every planned tensor in `file` into `out`; returns the HF names it held."""
    if not os.path.isfile(file):
        raise WeightLoadError(f"checkpoint file {file} (named in the index) does not exist")
    found = set()
    with safe_open(file, framework="pt") as f:
        for hf_name in f.keys():
            slot = plan.get(hf_name)
            if slot is None:
                _skip(hf_name, file, unused)
                continue
            t = f.get_tensor(hf_name)
            if tuple(t.shape) != slot.shape:
                raise WeightLoadError(f"tensor {hf_name!r} in {file} has shape {tuple(t.shape)}, "
                                      f"expected {slot.shape}")
            out[slot.name][slot.start:slot.start + slot.shape[0]].copy_(t)  # casts and moves
            found.add(hf_name)
    return found


def _skip(hf_name: str, file: str, unused: list[str] | None) -> None:
    if _UNSUPPORTED.search(hf_name):
        raise WeightLoadError(f"tensor {hf_name!r} in {file} is a bias nanorun does not support "
                              "for this model (only Qwen2-style q/k/v biases are)")
    if not _IGNORED.search(hf_name) and unused is not None:
        unused.append(hf_name)
