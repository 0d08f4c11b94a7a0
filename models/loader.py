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

With tensor parallelism over tp ranks (Megatron-style), rank r holds only its part of the four
matrices around the attention heads and the MLP's intermediate units; everything else is
replicated on every rank:

    layers.{i}.qkv        rows of r's q heads, then of its kv heads (k), then of the same (v)
    layers.{i}.qkv_bias   the same rows                                   (column-parallel)
    layers.{i}.o_proj     columns of r's q heads                          (row-parallel)
    layers.{i}.gate_up    rows of r's intermediate units (gate), then the same (up)
    layers.{i}.down       columns of r's intermediate units               (row-parallel)

A layer's tensors up to mlp_norm are listed here for every family; from there on each family
declares its own in its file (Family.layer_shapes), and its checkpoint's names for every tensor
of a layer but input_layernorm (Family.layer_weight_names), which this module reaches through
the family registered for config.architecture. The layout the families use today:

Gemma 2 / 3 (models/gemma.py) add two norms a layer, and Gemma 3 the per-head q/k norms:

    layers.{i}.post_attn_norm  [D]      of the attention's output (HF's post_attention_layernorm;
                                        mlp_norm is then HF's pre_feedforward_layernorm)
    layers.{i}.post_mlp_norm   [D]      of the MLP's output
    layers.{i}.q_norm, k_norm  [Dh]     Gemma 3

Qwen3 (models/qwen3.py) adds the same per-head q_norm and k_norm (HF's self_attn.q_norm /
k_norm, replicated on every rank). Phi-3's checkpoint already holds qkv and gate_up fused in
this layout (self_attn.qkv_proj, mlp.gate_up_proj): each fills its tensor whole, and a rank
keeps its rows of it as above.

Mixture-of-experts models (models/moe.py; E experts of I units, S shared-expert units) replace
gate_up and down by the router, every expert's weights stacked into one 2-D tensor (so an HF
expert tensor is a block of rows, like q in qkv), and the optional shared expert:

    layers.{i}.q_norm, k_norm        [Dh]           Qwen3: per-head RMSNorm of q and k
    layers.{i}.router                [E, D]
    layers.{i}.expert_gate_up        [E * 2I, D]    expert e: rows e*2I + (gate, then up)
    layers.{i}.expert_down           [E * D, I]     expert e: rows e*D .. (e+1)*D
    layers.{i}.shared_gate_up        [2S, D]        Qwen2-MoE: as gate_up
    layers.{i}.shared_down           [D, S]
    layers.{i}.shared_gate           [1, D]         sigmoid gate of the shared expert

With tensor parallelism every rank holds a slice of every expert (vLLM's default MoE TP): the
rows of its intermediate units in each expert's gate and up, the same columns of its down;
the router and shared_gate are replicated, the shared expert is cut like the dense MLP.

Each of those is a few contiguous ranges of the full tensor (`shard_ranges`), which is how
`random_weights`, `load_weights` and `shard_weights` all cut it: a rank never holds more than
one full tensor at a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import NamedTuple

import torch
from safetensors import safe_open

from .config import ModelConfig, ModelConfigError, WeightLoadError, family_of


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Fused name -> shape, in a fixed order; lm_head is listed even when tied. A layer's
    tensors after mlp_norm are its family's (Family.layer_shapes)."""
    d, qkv = config.hidden_size, config.q_size + 2 * config.kv_size
    family = family_of(config.architecture)
    shapes: dict[str, tuple[int, ...]] = {"embed": (config.vocab_size, d)}
    for n in range(config.num_layers):
        p = f"layers.{n}."
        shapes[p + "attn_norm"] = (d,)
        shapes[p + "qkv"] = (qkv, d)
        if config.qkv_bias:
            shapes[p + "qkv_bias"] = (qkv,)
        shapes[p + "o_proj"] = (d, config.q_size)
        shapes[p + "mlp_norm"] = (d,)
        shapes.update(family.layer_shapes(config, p))
    shapes["norm"] = (d,)
    shapes["lm_head"] = (config.vocab_size, d)
    return shapes


# ---- tensor parallelism -----------------------------------------------------------------------

def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Raise ModelConfigError unless `config` splits evenly over `tp` ranks."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ModelConfigError(f"tensor parallel size must be a positive int, got {tp!r}")
    heads, kv, inter = config.num_heads, config.num_kv_heads, config.intermediate_size
    if heads % tp:
        raise ModelConfigError(f"{config.name}: {heads} attention heads do not split over {tp} "
                               f"ranks; use a tensor parallel size that divides {heads}")
    if kv % tp and tp % kv:
        raise ModelConfigError(
            f"{config.name}: {kv} KV heads do not split over {tp} ranks (nor replicate evenly); "
            f"use a tensor parallel size that divides {kv} or is a multiple of it")
    if inter % tp:
        raise ModelConfigError(f"{config.name}: intermediate_size {inter} does not split over "
                               f"{tp} ranks; use a tensor parallel size that divides it")
    shared = config.shared_expert_intermediate_size
    if shared % tp:
        raise ModelConfigError(f"{config.name}: shared_expert_intermediate_size {shared} does not "
                               f"split over {tp} ranks; use a tensor parallel size that divides it")


def shard_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config of one rank's shard: heads, KV heads and intermediate size divided by tp. With
    more ranks than KV heads each rank keeps one KV head, replicated over tp / num_kv_heads ranks
    (as vLLM does). tp == 1 returns `config` itself."""
    check_tensor_parallel(config, tp)
    if tp == 1:
        return config
    return dataclasses.replace(config, num_heads=config.num_heads // tp,
                               num_kv_heads=max(1, config.num_kv_heads // tp),
                               intermediate_size=config.intermediate_size // tp,
                               shared_expert_intermediate_size=(
                                   config.shared_expert_intermediate_size // tp))


def shard_ranges(config: ModelConfig, name: str, rank: int, tp: int
                 ) -> tuple[int, tuple[tuple[int, int], ...]] | None:
    """(dim, ranges): rank's shard of fused tensor `name` is the ranges [lo, hi) of the full
    tensor along `dim`, concatenated in order. None: the rank holds all of it (a replicated
    tensor, or tp == 1)."""
    _check_rank(rank, tp)
    if tp == 1:
        return None
    local = shard_config(config, tp)
    kind = name.rsplit(".", 1)[-1]
    q, kv, hd = config.q_size, config.kv_size, config.head_dim
    q_lo = rank * local.q_size
    kv_lo = _first_kv_head(config, rank, tp) * hd
    i_lo, inter = rank * local.intermediate_size, config.intermediate_size
    q_rows = (q_lo, q_lo + local.q_size)
    kv_rows = (kv_lo, kv_lo + local.kv_size)
    i_rows = (i_lo, i_lo + local.intermediate_size)
    if kind in ("qkv", "qkv_bias"):
        return 0, (q_rows, _shift(kv_rows, q), _shift(kv_rows, q + kv))
    if kind == "o_proj":
        return 1, (q_rows,)
    if kind == "gate_up":
        return 0, (i_rows, _shift(i_rows, inter))
    if kind == "down":
        return 1, (i_rows,)
    return _moe_shard_ranges(config, kind, rank, local)


def _moe_shard_ranges(config: ModelConfig, kind: str, rank: int, local: ModelConfig
                      ) -> tuple[int, tuple[tuple[int, int], ...]] | None:
    """The expert and shared-expert cuts (module docstring); None for replicated tensors."""
    inter, n = config.intermediate_size, local.intermediate_size
    if kind == "expert_gate_up":    # per expert: its gate rows, then its up rows
        return 0, tuple(_shift((rank * n, (rank + 1) * n), e * 2 * inter + half * inter)
                        for e in range(config.num_experts) for half in (0, 1))
    if kind == "expert_down":
        return 1, ((rank * n, (rank + 1) * n),)
    shared, m = config.shared_expert_intermediate_size, local.shared_expert_intermediate_size
    rows = (rank * m, (rank + 1) * m)
    if kind == "shared_gate_up":
        return 0, (rows, _shift(rows, shared))
    if kind == "shared_down":
        return 1, (rows,)
    return None


def _check_rank(rank: int, tp: int) -> None:
    if not 0 <= rank < tp:
        raise ValueError(f"tensor parallel rank {rank} is outside [0, {tp})")


def _first_kv_head(config: ModelConfig, rank: int, tp: int) -> int:
    kv = config.num_kv_heads
    return rank * (kv // tp) if tp <= kv else rank // (tp // kv)


def _shift(rows: tuple[int, int], by: int) -> tuple[int, int]:
    return rows[0] + by, rows[1] + by


def _copy_into_shard(dst: torch.Tensor, src: torch.Tensor, src_row: int, dim: int,
                     ranges: tuple[tuple[int, int], ...]) -> None:
    """Copy what `src` holds of a shard into `dst` (the shard). `src` is rows
    [src_row, src_row + len(src)) of the full tensor, every column: a whole fused tensor, or
    the slice of it one Hugging Face tensor fills."""
    at = 0      # where the current range starts in the shard, along dim
    for lo, hi in ranges:
        if dim == 1:
            dst[src_row:src_row + src.shape[0], at:at + hi - lo].copy_(src[:, lo:hi])
        else:
            a, b = max(lo, src_row), min(hi, src_row + src.shape[0])
            if a < b:
                dst[at + a - lo:at + b - lo].copy_(src[a - src_row:b - src_row])
        at += hi - lo


def shard_weights(config: ModelConfig, weights: dict[str, torch.Tensor], rank: int,
                  tp: int) -> dict[str, torch.Tensor]:
    """Rank's shard of full fused weights (replicated tensors are shared, not copied)."""
    shapes = weight_shapes(shard_config(config, tp))
    out: dict[str, torch.Tensor] = {}
    for name, full in weights.items():
        out[name] = _shard_tensor(config, name, full, shapes[name], rank, tp)
    if config.tie_word_embeddings:
        out["lm_head"] = out["embed"]
    return out


def _shard_tensor(config: ModelConfig, name: str, full: torch.Tensor, shape: tuple[int, ...],
                  rank: int, tp: int) -> torch.Tensor:
    split = shard_ranges(config, name, rank, tp)
    if split is None:
        return full
    dim, ranges = split
    shard = full.new_empty(shape)
    _copy_into_shard(shard, full, 0, dim, ranges)
    return shard


# ---- random weights ---------------------------------------------------------------------------

def random_weights(config: ModelConfig, *, dtype: torch.dtype, device: torch.device | str,
                   seed: int = 0, tp_rank: int = 0, tp_size: int = 1) -> dict[str, torch.Tensor]:
    """Deterministic random weights (same names/shapes as `load_weights`): matrices ~ N(0, 0.02),
    norm scales ~ 1 + N(0, 0.02), biases ~ N(0, 0.02). With tp_size > 1, rank tp_rank's shard
    of those very numbers: every full tensor is drawn, then cut.

    Where they are drawn: on the CPU for a CPU device, so a seed gives the same numbers on every
    machine; on the GPU itself for a CUDA device, with a CUDA generator (the same numbers on
    every rank and every run with one torch build), because the CPU draw of an 8B model takes
    most of a minute, too long for benchmarks that build several engines."""
    draw = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    gen = torch.Generator(device=draw).manual_seed(seed)
    shapes = weight_shapes(shard_config(config, tp_size))
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(config).items():
        if name == "lm_head" and config.tie_word_embeddings:
            out[name] = out["embed"]
            continue
        t = torch.randn(shape, generator=gen, dtype=torch.float32, device=draw).mul_(0.02)
        if name == "norm" or name.endswith("_norm"):
            t += 1.0
        t = _shard_tensor(config, name, t, shapes[name], tp_rank, tp_size)
        out[name] = t.to(device=device, dtype=dtype)
    return out


# ---- Hugging Face checkpoints -----------------------------------------------------------------

class Slot(NamedTuple):
    """Where one HF tensor goes: rows [start, start + shape[0]) of fused tensor `name`."""
    name: str
    start: int
    shape: tuple[int, ...]


def _hf_plan(config: ModelConfig) -> dict[str, Slot]:
    """HF tensor name -> slot in the fused layout: the frame and input_layernorm here, every
    other tensor of a layer as its family names it (Family.layer_weight_names)."""
    d = config.hidden_size
    family = family_of(config.architecture)
    plan = {"model.embed_tokens.weight": Slot("embed", 0, (config.vocab_size, d)),
            "model.norm.weight": Slot("norm", 0, (d,))}
    if not config.tie_word_embeddings:
        plan["lm_head.weight"] = Slot("lm_head", 0, (config.vocab_size, d))
    for n in range(config.num_layers):
        hf, p = f"model.layers.{n}.", f"layers.{n}."
        plan[hf + "input_layernorm.weight"] = Slot(p + "attn_norm", 0, (d,))
        plan.update(family.layer_weight_names(config, hf, p))
    return plan


# Biases nanorun has nowhere to put: skipping them would silently change the model's output.
_UNSUPPORTED = re.compile(
    r"\.(o_proj|gate_proj|up_proj|down_proj|q_proj|k_proj|v_proj|qkv_proj|gate_up_proj)\.bias$")
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
        return {_text_model_name(k): os.path.join(path, v) for k, v in weight_map.items()}, index
    if os.path.isfile(single):
        return {}, single
    raise WeightLoadError(f"{path!r} holds neither model.safetensors nor model.safetensors.index.json")


def load_weights(config: ModelConfig, path: str | os.PathLike, *, dtype: torch.dtype,
                 device: torch.device | str, unused: list[str] | None = None, tp_rank: int = 0,
                 tp_size: int = 1) -> dict[str, torch.Tensor]:
    """Read a HF checkpoint directory, or a GGUF file (models/gguf.py), into the fused layout
    (see module docstring), cast to `dtype` on `device`. Tensors are read one at a time and
    each is copied straight into its slice of the preallocated fused tensor, so host memory
    stays at about one tensor. With tp_size > 1 only rank tp_rank's shard is kept (see the
    module docstring).

    Tensors the model does not use are skipped; their names are appended to `unused` if given.
    Raises WeightLoadError for a missing tensor, a wrong shape or an unsupported bias."""
    path = os.fspath(path)
    plan = _hf_plan(config)
    if os.path.isfile(path):
        from .gguf import hf_tensors

        where, source, tensors = {}, path, ((name, path, read)
                                            for name, read in hf_tensors(config, path))
    else:
        where, source = _checkpoint_files(path)
        for hf_name in plan:
            if where and hf_name not in where:
                raise WeightLoadError(f"tensor {hf_name!r} is missing from {source}")
        tensors = _safetensors(sorted(set(where.values())) if where else [source])

    shapes = weight_shapes(shard_config(config, tp_size))
    names = {slot.name for slot in plan.values()}
    out = {n: torch.empty(shapes[n], dtype=dtype, device=device) for n in names}
    splits = {n: _split_or_whole(config, n, shapes[n], tp_rank, tp_size) for n in names}
    found = _fill(tensors, plan, out, splits, unused)
    for hf_name in plan:
        if hf_name not in found:
            raise WeightLoadError(f"tensor {hf_name!r} is missing from {where.get(hf_name, source)}")
    if config.tie_word_embeddings:
        out["lm_head"] = out["embed"]
    return {n: out[n] for n in shapes if n in out}


def _split_or_whole(config: ModelConfig, name: str, shape: tuple[int, ...], rank: int, tp: int):
    """shard_ranges, with a tensor held whole as one range covering all its rows."""
    return shard_ranges(config, name, rank, tp) or (0, ((0, shape[0]),))


def _safetensors(files: list[str]):
    """(HF name, file, read) for every tensor of `files`, one file open at a time."""
    for file in files:
        if not os.path.isfile(file):
            raise WeightLoadError(f"checkpoint file {file} (named in the index) does not exist")
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                yield _text_model_name(hf_name), file, lambda f=f, n=hf_name: f.get_tensor(n)


def _text_model_name(hf_name: str) -> str:
    """An image-text checkpoint's text model under its causal-LM name (Gemma 3 4B-27B keep it
    under language_model.); its vision tower's tensors keep their names, and are unused."""
    return hf_name.removeprefix("language_model.")


def _fill(tensors, plan: dict[str, Slot], out: dict[str, torch.Tensor], splits,
          unused: list[str] | None) -> set[str]:
    """Copy every planned tensor of `tensors` ((HF name, file, read) triples) into its place in
    `out` (this rank's shard, cut as `splits` says); returns the HF names it held."""
    found = set()
    for hf_name, file, read in tensors:
        slot = plan.get(hf_name)
        if slot is None:
            _skip(hf_name, file, unused)
            continue
        t = read()
        if tuple(t.shape) != slot.shape:
            raise WeightLoadError(f"tensor {hf_name!r} in {file} has shape {tuple(t.shape)}, "
                                  f"expected {slot.shape}")
        _copy_into_shard(out[slot.name], t, slot.start, *splits[slot.name])  # casts, moves
        found.add(hf_name)
    return found


# An image-text checkpoint's image side (Gemma 3 4B-27B): not the text model's, so never refused.
_IMAGE_SIDE = ("vision_tower.", "multi_modal_projector.")


def _skip(hf_name: str, file: str, unused: list[str] | None) -> None:
    if _UNSUPPORTED.search(hf_name) and not hf_name.startswith(_IMAGE_SIDE):
        raise WeightLoadError(f"tensor {hf_name!r} in {file} is a bias nanorun does not support "
                              "for this model (only Qwen2-style q/k/v biases are)")
    if not _IGNORED.search(hf_name) and unused is not None:
        unused.append(hf_name)
