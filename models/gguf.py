"""GGUF files (llama.cpp's format): a model's config, weights and tokenizer in one file.

The metadata (`general.architecture`, then `<arch>.block_count`, `<arch>.embedding_length`, ...)
becomes a Hugging Face config dict, so `ModelConfig.from_hf_dict` checks it as it checks a
config.json; the tensors (`token_embd`, `blk.N.attn_q`, ...) are mapped to their HF names and
dequantized with the `gguf` package into the same fused layout as a safetensors checkpoint
(models/loader.py copies them in). The tokenizer is built from the same metadata by
nanorun.gguf_tokenizer.

llama.cpp's converter reorders the rows of q and k in "llama" files: within each head it
interleaves the two rotary halves (GPT-J style pairs), where HF keeps them as two halves
(rotate_half). `_unpermute_rows` undoes that, as transformers' GGUF loader does; the other
families (qwen2, qwen2moe, qwen3moe, gemma2, gemma3) are written unpermuted. Gemma files store
each norm's weight as 1 + weight, which is undone at load (`_minus_one`).

Reading the metadata of a 50k-token vocabulary with `gguf.GGUFReader` as it is takes seconds
(it slices a numpy memmap once per string); `_Reader` slices a plain ndarray view of the same
mapping instead, and `read_gguf` caches the result per file, so the config, the weights and
the tokenizer read it once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .config import ModelConfig, ModelConfigError, UnsupportedModelError, WeightLoadError

GGUF_MAGIC = b"GGUF"
# general.architecture -> the HF architecture nanorun runs it as. "llama" with experts is Mixtral.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
_GEMMA = ("gemma2", "gemma3")
# Per-layer GGUF tensor -> its HF module name, for the dense families.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Gemma's layer norms: four a layer, and ffn_norm is the MLP's input norm (HF's
# pre_feedforward_layernorm), not Llama's post_attention_layernorm.
_GEMMA_LAYER_TENSORS = {
    **_LAYER_TENSORS, "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether `path` is a file that starts with the GGUF magic."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


# ---- reading ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor's bytes are: `shape` outermost first (torch's order, not ggml's)."""

    name: str
    tensor_type: Any            # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int                 # from the start of the file
    n_bytes: int

    def data(self, path: str) -> np.ndarray:
        """The raw bytes, mapped from the file for as long as the array lives, shaped as
        gguf.dequantize takes them. (The cached GGUFFile keeps no mapping: a model's pages
        are not held after its weights are loaded.)"""
        import gguf

        shape = gguf.quant_shape_to_byte_shape(self.shape, self.tensor_type)
        return np.memmap(path, dtype=np.uint8, mode="r", offset=self.offset, shape=shape)


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: `metadata` key -> Python value (str, int, float, bool or a list of
    them), `tensors` name -> GGUFTensor, in file order."""

    path: str
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def require(self, key: str) -> Any:
        """metadata[key]; a ModelConfigError naming the key where the file lacks it."""
        if key not in self.metadata:
            raise ModelConfigError(f"{self.path}: GGUF metadata lacks {key!r}, which nanorun needs")
        return self.metadata[key]


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """The parsed file, cached per (path, size, modification time)."""
    path = os.path.realpath(path)
    st = os.stat(path)
    return _read(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=2)
def _read(path: str, size: int, mtime_ns: int) -> GGUFFile:
    try:
        reader = _reader_class()(path)
    except (ValueError, KeyError, IndexError) as e:
        raise ModelConfigError(f"{path} is not a GGUF file nanorun can read: {e}") from e
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: GGUFTensor(t.name, t.tensor_type, tuple(int(n) for n in reversed(
        t.shape.tolist())), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    return GGUFFile(path, metadata, tensors)


@lru_cache(maxsize=1)
def _reader_class():
    import gguf

    class _Reader(gguf.GGUFReader):
        """GGUFReader over a plain ndarray view of its memmap: the same bytes, without
        np.memmap's per-slice bookkeeping (most of the time of reading a vocabulary)."""

        def _get(self, offset, dtype, count=1, override_order=None):
            if isinstance(self.data, np.memmap):
                self.data = self.data.view(np.ndarray)
            return super()._get(offset, dtype, count, override_order)

    return _Reader


# ---- config -----------------------------------------------------------------------------------

def gguf_config(path: str | os.PathLike, name: str | None = None) -> ModelConfig:
    """nanorun's ModelConfig of a GGUF file, named after the file unless `name` is given.
    Raises UnsupportedModelError naming the metadata key or tensor nanorun cannot run."""
    f = read_gguf(path)
    name = name or os.path.basename(f.path).removesuffix(".gguf")
    d = hf_config_dict(f)
    try:
        return ModelConfig.from_hf_dict(d, name=name)
    except ModelConfigError as e:
        raise type(e)(f"{f.path}: {e}") from e


def hf_config_dict(f: GGUFFile) -> dict[str, Any]:
    """The config.json transformers would have for this file's model."""
    arch = f.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{f.path}: general.architecture {arch!r} is not supported; nanorun runs GGUF "
            f"architectures {sorted(ARCHITECTURES)}")
    key = _keys(f, arch)
    heads = _uniform(f, arch + ".attention.head_count")
    if not isinstance(heads, int) or heads <= 0:
        raise ModelConfigError(f"{f.path}: {arch}.attention.head_count must be a positive "
                               f"integer, got {heads!r}")
    kv_heads = _uniform(f, arch + ".attention.head_count_kv", heads)
    head_dim = key("attention.key_length", None) or key("embedding_length") // heads
    _check_attention_dims(f, arch, head_dim)
    if arch == "llama" and "blk.0.attn_q.bias" in f.tensors:
        raise UnsupportedModelError(
            f"{f.path}: tensor blk.0.attn_q.bias: a Llama with attention biases (HF's "
            f"attention_bias, which also biases o_proj) is not supported")
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": key("vocab_size", None) or _rows(f, "token_embd.weight"),
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(f, arch, head_dim),
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "bos_token_id": f.metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(eos_token_ids(f)),
    }
    d.update(_moe_config(f, arch, key))
    if arch in _GEMMA:
        d.update(_gemma_config(f, arch, key, heads, head_dim))
    return d


def _gemma_config(f: GGUFFile, arch: str, key, heads: int, head_dim: int) -> dict[str, Any]:
    """What a Gemma file's metadata holds beyond the common keys, and what llama.cpp assumes
    where it holds nothing: the layer pattern (every other layer local for Gemma 2, five of six
    for Gemma 3), Gemma 3's local rope base (10k) and no soft-capping. The attention scale is
    llama.cpp's too: 1/sqrt(head_dim), but 1/sqrt(hidden / heads) for the 27B models (46 and
    62 layers), which is what their query_pre_attn_scalar says in the published configs."""
    layers, hidden = key("block_count"), key("embedding_length")
    big = layers == (46 if arch == "gemma2" else 62)
    d: dict[str, Any] = {
        "model_type": "gemma2" if arch == "gemma2" else "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": key("attention.sliding_window"),
        "query_pre_attn_scalar": hidden // heads if big else head_dim,
        "attn_logit_softcapping": key("attn_logit_softcapping", None),
        "final_logit_softcapping": key("final_logit_softcapping", None),
    }
    if arch == "gemma3":
        d["rope_local_base_freq"] = 10_000.0
    return d


def eos_token_ids(f: GGUFFile) -> tuple[int, ...]:
    """The tokens that end generation: eos, and end-of-turn / end-of-message where the file
    names them (llama.cpp stops on all of them)."""
    keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    ids = (f.metadata.get(f"tokenizer.ggml.{k}") for k in keys)
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int)))


def _keys(f: GGUFFile, arch: str) -> Callable[..., Any]:
    """key(name[, default]): metadata `<arch>.<name>`; without a default it is required."""
    missing = object()

    def key(name: str, default: Any = missing) -> Any:
        if default is missing:
            return f.require(f"{arch}.{name}")
        return f.metadata.get(f"{arch}.{name}", default)
    return key


def _uniform(f: GGUFFile, key: str, default: int | None = None) -> int:
    """A per-model count that some files give per layer: the same for every layer, or refused."""
    value = f.metadata.get(key, default) if default is not None else f.require(key)
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{f.path}: {key} differs between layers ({value}); "
                                        f"nanorun needs the same count in every layer")
        value = value[0]
    return value


def _rows(f: GGUFFile, tensor: str) -> int:
    if tensor not in f.tensors:
        raise ModelConfigError(f"{f.path}: GGUF file has no tensor {tensor!r}")
    return f.tensors[tensor].shape[0]


def _check_attention_dims(f: GGUFFile, arch: str, head_dim: int) -> None:
    rot = f.metadata.get(f"{arch}.rope.dimension_count", head_dim)
    if rot != head_dim:
        raise UnsupportedModelError(
            f"{f.path}: {arch}.rope.dimension_count={rot} rotates part of each head "
            f"(head_dim {head_dim}); nanorun rotates whole heads only")
    value_dim = f.metadata.get(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(
            f"{f.path}: {arch}.attention.value_length={value_dim} differs from the key length "
            f"{head_dim}; nanorun needs them equal")


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int) -> dict[str, Any] | None:
    """rope.scaling.* metadata, or Llama 3.1's scaling that llama.cpp stores as per-dimension
    factors in the tensor rope_freqs.weight (checked against the llama3 formula)."""
    kind = f.metadata.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:
        return _llama3_rope_scaling(f, arch, head_dim)
    if kind == "none":
        return None
    if kind != "linear":
        raise UnsupportedModelError(f"{f.path}: {arch}.rope.scaling.type={kind!r} is not "
                                    f"supported; nanorun runs 'none', 'linear' and Llama 3.1's")
    return {"rope_type": "linear", "factor": f.require(f"{arch}.rope.scaling.factor")}


def _llama3_rope_scaling(f: GGUFFile, arch: str, head_dim: int) -> dict[str, Any]:
    import gguf

    t = f.tensors["rope_freqs.weight"]
    stored = gguf.dequantize(t.data(f.path), t.tensor_type).astype(np.float64).reshape(-1)
    original = f.metadata.get(f"{arch}.rope.scaling.original_context_length", 8192)
    params = {"rope_type": "llama3", "factor": float(stored.max()), "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    theta = f.metadata.get(f"{arch}.rope.freq_base", 10000.0)
    if not np.allclose(stored, _llama3_factors(theta, head_dim, params), rtol=1e-5):
        raise UnsupportedModelError(
            f"{f.path}: tensor rope_freqs.weight holds rope factors nanorun cannot match to "
            f"Llama 3.1's scaling (factor {params['factor']}, low/high frequency factors 1/4, "
            f"original context {original})")
    return params


def _llama3_factors(theta: float, head_dim: int, p: dict[str, Any]) -> np.ndarray:
    """What llama.cpp's converter divides each rotary frequency by, for llama3 scaling."""
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    ctx, lo, hi = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"]
    smooth = np.clip((ctx / wavelen - lo) / (hi - lo), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / p["factor"] + smooth)


def _moe_config(f: GGUFFile, arch: str, key) -> dict[str, Any]:
    experts = key("expert_count", 0)
    if not experts:
        if arch in ("qwen2moe", "qwen3moe"):
            f.require(f"{arch}.expert_count")
        return {}
    d: dict[str, Any] = {"num_experts_per_tok": key("expert_used_count")}
    if arch == "llama":
        return {**d, "architectures": ["MixtralForCausalLM"], "num_local_experts": experts}
    d.update(num_experts=experts, moe_intermediate_size=key("expert_feed_forward_length"),
             norm_topk_prob=arch == "qwen3moe")    # what llama.cpp computes for each family
    if arch == "qwen2moe":
        d["shared_expert_intermediate_size"] = key("expert_shared_feed_forward_length")
    return d


# ---- weights ----------------------------------------------------------------------------------

def hf_tensors(config: ModelConfig, path: str | os.PathLike
               ) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(HF name, read) for every tensor of the file, in file order; read() dequantizes it to
    float32 in HF's layout. An expert-stacked tensor (ffn_*_exps) yields one entry per expert;
    a tensor nanorun has no HF name for is refused (WeightLoadError)."""
    f = read_gguf(path)
    llama_rows = f.architecture == "llama"
    gemma = f.architecture in _GEMMA
    for gguf_name, t in f.tensors.items():
        if gguf_name == "rope_freqs.weight":
            continue                           # read into the config's rope scaling
        read = _reader(f.path, t, config, llama_rows)
        if gemma and gguf_name.endswith("norm.weight"):
            read = _minus_one(read)
        yield from _hf_entries(config, gguf_name, read, gemma)


def _minus_one(read) -> Callable[[], torch.Tensor]:
    """llama.cpp's converter stores a Gemma norm's weight as 1 + weight (the scale it applies);
    HF's Gemma RMSNorm takes the weight itself (transformers' GGUF loader subtracts 1 too)."""
    return lambda: read() - 1.0


def _reader(path: str, t: GGUFTensor, config: ModelConfig,
            llama_rows: bool) -> Callable[[], torch.Tensor]:
    """Dequantize `t` once, on first use."""
    cache: list[torch.Tensor] = []

    def read() -> torch.Tensor:
        if not cache:
            cache.append(_dequantize(path, t, config, llama_rows))
        return cache[0]
    return read


def _dequantize(path: str, t: GGUFTensor, config: ModelConfig, llama_rows: bool) -> torch.Tensor:
    import gguf

    try:
        data = gguf.dequantize(t.data(path), t.tensor_type)
    except NotImplementedError as e:
        raise UnsupportedModelError(f"tensor {t.name!r} is of GGUF type {t.tensor_type.name}, "
                                    f"which the gguf package cannot dequantize: {e}") from e
    data = np.asarray(data, dtype=np.float32)
    if not data.flags.writeable:               # an F32 tensor is a view of the read-only map
        data = data.copy()
    w = torch.from_numpy(data.reshape(t.shape))
    if llama_rows and t.name.endswith((".attn_q.weight", ".attn_k.weight")):
        heads = config.num_heads if ".attn_q." in t.name else config.num_kv_heads
        w = _unpermute_rows(w, heads)
    return w


def _unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order: each head's rows go from interleaved pairs
    (r0, r_h, r1, r_h+1, ...) back to two halves (r0..r_h-1, r_h..), h = head_dim / 2."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _hf_entries(config: ModelConfig, gguf_name: str, read, gemma: bool = False):
    """The HF names `gguf_name` fills. A tensor llama.cpp's layout of this family does not
    have is refused: it would be part of a variant nanorun does not compute."""
    if gguf_name in _GLOBAL_TENSORS:
        return [(_GLOBAL_TENSORS[gguf_name], read)]
    parts = gguf_name.split(".")
    entries = None
    layer_tensors = _GEMMA_LAYER_TENSORS if gemma else _LAYER_TENSORS
    if len(parts) == 4 and parts[0] == "blk":
        _, layer, kind, suffix = parts
        p = f"model.layers.{layer}."
        entries = ([(f"{p}{layer_tensors[kind]}.{suffix}", read)] if kind in layer_tensors
                   else None if gemma else _moe_entries(config, p, kind, suffix, read))
    if entries is None:

        raise WeightLoadError(f"tensor {gguf_name!r} is not one nanorun reads for "
                              f"{config.architecture}; this variant is not supported")
    return entries


def _moe_entries(config: ModelConfig, p: str, kind: str, suffix: str, read):
    """The HF names of a MoE layer's tensors (models/moe.py's MoEModel.layer_weight_names), per
    expert for the stacked [E, rows, cols] expert tensors."""
    mixtral = config.architecture == "MixtralForCausalLM"
    block = p + ("block_sparse_moe." if mixtral else "mlp.")
    if kind == "ffn_gate_inp":
        return [(f"{block}gate.{suffix}", read)]
    stacked = {"ffn_gate_exps": "w1" if mixtral else "gate_proj",
               "ffn_up_exps": "w3" if mixtral else "up_proj",
               "ffn_down_exps": "w2" if mixtral else "down_proj"}
    if kind in stacked:
        return [(f"{block}experts.{e}.{stacked[kind]}.{suffix}", _expert(read, e))
                for e in range(config.num_experts)]
    shared = {"ffn_gate_shexp": "shared_expert.gate_proj", "ffn_up_shexp": "shared_expert.up_proj",
              "ffn_down_shexp": "shared_expert.down_proj"}
    if kind in shared:
        return [(f"{block}{shared[kind]}.{suffix}", read)]
    if kind == "ffn_gate_inp_shexp":          # stored as [D]; HF's is a [1, D] linear
        return [(f"{block}shared_expert_gate.{suffix}", lambda: read().reshape(1, -1))]
    return None


def _expert(read, e: int) -> Callable[[], torch.Tensor]:
    return lambda: read()[e]
