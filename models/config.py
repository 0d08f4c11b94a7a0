"""Model configuration for Llama-family decoders (Llama 2/3/3.1, Mistral, Qwen2, Qwen3, Phi-3),
their mixture-of-experts relatives (Mixtral, Qwen2-MoE, Qwen3-MoE) and Gemma 2 / 3.

`ModelConfig` is nanorun's own, validated view of a Hugging Face `config.json`. It reads both
the transformers 4.x layout (`rope_theta` + `rope_scaling`, `torch_dtype`) and the 5.x one
(`rope_parameters`, `dtype`), and rejects features the runtime does not implement instead of
silently computing something different from the reference model.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                "Qwen3MoeForCausalLM": "qwen3_moe", "Gemma2ForCausalLM": "gemma2",
                "Gemma3ForCausalLM": "gemma3_text",
                "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3"}
SUPPORTED_ARCHITECTURES = frozenset(_MODEL_TYPES)
# The mixture-of-experts families (models/moe.py). HF names the expert count differently.
MOE_ARCHITECTURES = frozenset({"MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"})
_NUM_EXPERTS_KEY = {"MixtralForCausalLM": "num_local_experts", "Qwen2MoeForCausalLM": "num_experts",
                    "Qwen3MoeForCausalLM": "num_experts"}
# Gemma 2 and Gemma 3 text (models/gemma.py): sandwich norms, GeGLU, per-layer sliding windows.
GEMMA_ARCHITECTURES = frozenset({"Gemma2ForCausalLM", "Gemma3ForCausalLM"})
_LAYER_TYPES = ("sliding_attention", "full_attention")
_ROPE_TYPES = ("llama3", "linear", "longrope")
_DTYPES = ("float16", "bfloat16", "float32")


class ModelConfigError(ValueError):
    """A model configuration is invalid; the message says what to change."""


class UnsupportedModelError(ModelConfigError):
    """The configuration is valid for Hugging Face but uses a feature nanorun does not implement."""


class UnknownModelError(ModelConfigError):
    """A model name is neither a preset nor a directory holding a config.json."""


class WeightLoadError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape, or needs an unsupported feature."""


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. "linear" divides positions by `factor`; "llama3" rescales the
    low-frequency bands (Llama 3.1) using low/high_freq_factor and
    original_max_position_embeddings; "longrope" (Phi-3) divides frequency i by short_factor[i]
    or long_factor[i] (models/phi3.py says which) and scales cos and sin by attention_factor."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in _ROPE_TYPES:
            raise UnsupportedModelError(
                f"rope scaling type {self.rope_type!r} is not supported; use one of {list(_ROPE_TYPES)} "
                "or remove rope_scaling")
        if not self.factor > 0:
            raise ModelConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ModelConfigError(
                    "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                    f"low={self.low_freq_factor}, high={self.high_freq_factor}")
            if self.original_max_position_embeddings <= 0:
                raise ModelConfigError("rope scaling original_max_position_embeddings must be > 0, "
                                       f"got {self.original_max_position_embeddings}")
        if self.rope_type == "longrope":
            self._check_longrope()

    def _check_longrope(self) -> None:
        short, long = self.short_factor, self.long_factor
        if not short or len(short) != len(long) or not all(f > 0 for f in short + long):
            raise ModelConfigError("longrope rope scaling needs short_factor and long_factor: "
                                   "one positive number per rotary frequency each, as many of "
                                   f"one as of the other; got {len(short)} and {len(long)}")
        if self.original_max_position_embeddings <= 0 or not self.attention_factor > 0:
            raise ModelConfigError("longrope rope scaling needs original_max_position_embeddings "
                                   f"> 0 and attention_factor > 0, got "
                                   f"{self.original_max_position_embeddings} and "
                                   f"{self.attention_factor}")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and hyper-parameters of one decoder. Sizes are element counts, not bytes.

    Mixture-of-experts models (num_experts > 0) replace the MLP by `num_experts` SwiGLU experts
    of `intermediate_size` units each (HF's moe_intermediate_size for the Qwen families), of
    which a router picks `num_experts_per_tok` per token; `shared_expert_intermediate_size` > 0
    adds Qwen2-MoE's sigmoid-gated shared expert; `norm_topk_prob` renormalises the picked
    routing weights to sum to one (always so for Mixtral); `qk_norm` is Qwen3's per-head RMSNorm
    of q and k before rope. `partial_rotary_factor` < 1 (Phi-3 only: Phi-4-mini's 0.75) rotates
    only the first `rotary_dim` dims of each head."""

    name: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    dtype: str | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    qk_norm: bool = False
    partial_rotary_factor: float = 1.0
    # Gemma 2 / 3 (models/gemma.py; None / () elsewhere). The attention scale is
    # query_pre_attn_scalar ** -0.5; the soft-caps bound attention scores and final logits by
    # cap * tanh(x / cap); layer_types says per layer whether sliding_window applies (empty: it
    # applies to every layer); rope_local_theta is Gemma 3's rope base of sliding layers, which
    # take no rope scaling.
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(_unsupported_arch_message(self.architecture))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ModelConfigError(f"{self.name}: {name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"{self.name}: num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads}); set num_kv_heads to a divisor of {self.num_heads}")
        if self.head_dim % 2:
            raise ModelConfigError(f"{self.name}: head_dim must be even for rotary embeddings, "
                                   f"got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ModelConfigError(f"{self.name}: rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ModelConfigError(f"{self.name}: rope_theta must be > 0, got {self.rope_theta}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ModelConfigError(f"{self.name}: rope_scaling must be a RopeScaling or None")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ModelConfigError(f"{self.name}: sliding_window must be a positive integer or None, "
                                   f"got {self.sliding_window}")
        if not isinstance(self.eos_token_ids, tuple):
            raise ModelConfigError(f"{self.name}: eos_token_ids must be a tuple of ints")
        for tok in (self.bos_token_id, *self.eos_token_ids):
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ModelConfigError(f"{self.name}: special token id {tok} is outside the "
                                       f"vocabulary [0, {self.vocab_size}); fix the token id or vocab_size")
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ModelConfigError(f"{self.name}: dtype must be one of {list(_DTYPES)} or None, "
                                   f"got {self.dtype!r}")
        self._check_rotary()
        self._check_experts()
        self._check_gemma()

    def _check_gemma(self) -> None:
        gemma = self.architecture in GEMMA_ARCHITECTURES
        act = "gelu_pytorch_tanh" if gemma else "silu"
        if self.hidden_act != act:
            raise UnsupportedModelError(f"{self.name}: hidden activation {self.hidden_act!r} is not "
                                        f"supported for {self.architecture}; only {act!r} is")
        gemma_only = dict(query_pre_attn_scalar=self.query_pre_attn_scalar,
                          attn_logit_softcapping=self.attn_logit_softcapping,
                          final_logit_softcapping=self.final_logit_softcapping,
                          rope_local_theta=self.rope_local_theta)
        if not gemma:
            if any(v is not None for v in gemma_only.values()) or self.layer_types:
                raise ModelConfigError(f"{self.name}: {sorted(gemma_only)} and layer_types are "
                                       "implemented for the Gemma architectures only")
            return
        for name, value in gemma_only.items():
            if value is not None and not value > 0:
                raise ModelConfigError(f"{self.name}: {name} must be > 0 or None, got {value}")
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(_LAYER_TYPES):
            raise ModelConfigError(f"{self.name}: layer_types must give one of {list(_LAYER_TYPES)} "
                                   f"for each of the {self.num_layers} layers, got {list(self.layer_types)}")
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ModelConfigError(f"{self.name}: layer_types has sliding layers but sliding_window "
                                   "is None; set sliding_window")

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (None: it attends to the whole context)."""
        if self.layer_types and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def _check_rotary(self) -> None:
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ModelConfigError(
                f"{self.name}: partial_rotary_factor must be in (0, 1] and give an even, positive "
                f"number of rotary dims (of head_dim {self.head_dim}), got "
                f"{self.partial_rotary_factor}")
        rs = self.rope_scaling
        longrope = rs is not None and rs.rope_type == "longrope"
        if longrope and len(rs.short_factor) != self.rotary_dim // 2:
            raise ModelConfigError(
                f"{self.name}: longrope short_factor and long_factor need {self.rotary_dim // 2} "
                f"numbers (one per rotary frequency), got {len(rs.short_factor)}")

    def _check_experts(self) -> None:
        moe = self.architecture in MOE_ARCHITECTURES
        if moe != (self.num_experts > 0):
            raise ModelConfigError(
                f"{self.name}: {self.architecture} " + ("needs num_experts > 0" if moe else
                "is a dense architecture; num_experts must be 0"))
        if not moe:
            if (self.qk_norm and self.architecture not in ("Gemma3ForCausalLM",
                                                                   "Qwen3ForCausalLM")
                    or self.shared_expert_intermediate_size):
                raise ModelConfigError(f"{self.name}: qk_norm and a shared expert are implemented "
                                       "for the mixture-of-experts architectures only")
            return
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ModelConfigError(f"{self.name}: num_experts_per_tok must be in [1, num_experts="
                                   f"{self.num_experts}], got {self.num_experts_per_tok}")
        if self.shared_expert_intermediate_size < 0:
            raise ModelConfigError(f"{self.name}: shared_expert_intermediate_size must be >= 0")

    @property
    def is_moe(self) -> bool:
        """Whether the MLP is a mixture of experts (models/moe.py)."""
        return self.num_experts > 0

    # ---- derived sizes ---------------------------------------------------------------------

    @property
    def q_size(self) -> int:
        """Width of the query projection output: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Dims of each head that rope rotates: the first int(head_dim x partial_rotary_factor),
        as transformers counts them."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_size(self) -> int:
        """Width of the key (and of the value) projection output: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    def _matmul_params_per_layer(self, experts: int | None = None) -> int:
        """Matmul parameters of one layer, counting `experts` routed experts (None: all)."""
        d, i = self.hidden_size, self.intermediate_size
        attention = d * (self.q_size + 2 * self.kv_size) + self.q_size * d
        if not self.is_moe:
            return attention + 3 * d * i
        experts = self.num_experts if experts is None else experts
        shared = 3 * d * self.shared_expert_intermediate_size
        shared_gate = d if self.shared_expert_intermediate_size else 0
        return attention + self.num_experts * d + experts * 3 * d * i + shared + shared_gate

    @property
    def num_params(self) -> int:
        """Total parameter count: embeddings, all layers (incl. norms and biases), final norm and
        lm_head (counted once when tied to the embeddings)."""
        d = self.hidden_size
        bias = self.q_size + 2 * self.kv_size if self.qkv_bias else 0
        qk_norm = 2 * self.head_dim if self.qk_norm else 0
        norms = 4 * d if self.architecture in GEMMA_ARCHITECTURES else 2 * d   # Gemma's sandwich
        per_layer = self._matmul_params_per_layer() + bias + norms + qk_norm
        lm_head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + lm_head

    @property
    def num_active_params_per_token(self) -> int:
        """Matmul parameters each token touches: every linear layer plus lm_head. The embedding
        lookup is a gather, not a matmul, so it is excluded; so are norms and biases. A token costs
        about 2 x this many FLOPs, which gives the "optimal" bound peak_flops / (2 x this).

        A mixture of experts counts the router, the shared expert and only the
        num_experts_per_tok experts a token is routed to (NanoFlow's active parameters): 12.75 B
        of Mixtral 8x7B's 46.7 B (the quoted "12.9 B active" also counts the embedding table)."""
        routed = self.num_experts_per_tok if self.is_moe else None
        return (self.num_layers * self._matmul_params_per_layer(routed)
                + self.vocab_size * self.hidden_size)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of KV cache one token occupies across all layers (K and V)."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    # ---- Hugging Face interchange ---------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str) -> ModelConfig:
        """Build from a Hugging Face config.json dict (transformers 4.x or 5.x layout)."""
        d = _text_part(d)
        arch = _architecture(d)
        _reject_unsupported(d, arch)
        try:
            if arch in GEMMA_ARCHITECTURES:
                return cls._from_hf_fields(d, name, arch, **_gemma_fields(d, arch))
            return cls._from_hf_fields(d, name, arch)
        except KeyError as e:
            raise ModelConfigError(f"{name}: config lacks required key {e.args[0]!r}") from None

    @classmethod
    def _from_hf_fields(cls, d: dict[str, Any], name: str, arch: str, **extra: Any) -> ModelConfig:
        heads = d["num_attention_heads"]
        rope_theta, rope_scaling = extra.pop("rope", None) or _rope(d, arch)
        moe = _moe_fields(d, arch)
        fields: dict[str, Any] = dict(
            name=name,
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=moe.pop("intermediate_size", None) or d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d["max_position_embeddings"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            # Llama and Qwen3-MoE attention_bias=true was rejected above
            qkv_bias=arch == "Qwen2ForCausalLM" or (arch == "Qwen2MoeForCausalLM"
                                                    and bool(d.get("qkv_bias", True))),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(d, arch),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_eos_ids(d.get("eos_token_id")),
            dtype=d.get("dtype") or d.get("torch_dtype"),
            **moe,
            **_dense_fields(d, arch),
        )
        return cls(**{**fields, **extra})     # a family's own reading wins (Gemma's window)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read `<path>/config.json`; the config is named after the directory."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise ModelConfigError(f"model directory {path!r} does not exist (or is not a directory)")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise ModelConfigError(f"{path!r} has no config.json; point at a Hugging Face model directory")
        try:
            with open(cfg_file, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ModelConfigError(f"{cfg_file} is not valid JSON: {e}") from e
        if not isinstance(d, dict):
            raise ModelConfigError(f"{cfg_file} must hold a JSON object, got {type(d).__name__}")
        config = cls.from_hf_dict(d, name=os.path.basename(os.path.abspath(path)))
        extra = _generation_eos_ids(path)
        if extra:
            merged = tuple(dict.fromkeys(config.eos_token_ids + extra))
            config = replace(config, eos_token_ids=merged)
        return config

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict transformers (4.x and 5.x) loads as the same architecture. Uses the
        legacy rope_theta/rope_scaling/torch_dtype keys that published checkpoints use."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _rope_scaling_dict(self.rope_scaling),
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _eos_hf(self.eos_token_ids),
            "torch_dtype": self.dtype,
        }
        if self.architecture in GEMMA_ARCHITECTURES:
            d.update(self._gemma_hf_fields())
        elif self.architecture == "LlamaForCausalLM":
            d.update(attention_bias=False, mlp_bias=False)
        elif self.architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
            d["sliding_window"] = self.sliding_window
        elif self.architecture == "Phi3ForCausalLM":
            d.update(self._phi3_hf_fields())
        else:  # Qwen2: the window is only active with use_sliding_window, from layer max_window_layers on
            d.update(use_sliding_window=self.sliding_window is not None,
                     sliding_window=self.sliding_window,
                     max_window_layers=0 if self.sliding_window is not None else self.num_layers)
        if self.is_moe:
            d.update(self._moe_hf_fields())
        return d

    def _gemma_hf_fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "hidden_activation": self.hidden_act, "hidden_act": self.hidden_act,
            "attention_bias": False,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "sliding_window": self.sliding_window, "layer_types": list(self.layer_types)}
        if self.architecture == "Gemma3ForCausalLM":
            d["rope_local_base_freq"] = self.rope_local_theta
        return d

    def _phi3_hf_fields(self) -> dict[str, Any]:
        # transformers' Phi3Config reads original_max_position_embeddings at the top level (its
        # default, 4096, overrides the one in rope_scaling); pad_token_id's default, 32000, is
        # outside a small vocabulary, and nanorun does not pad.
        rs = self.rope_scaling
        return {"sliding_window": self.sliding_window,
                "partial_rotary_factor": self.partial_rotary_factor, "pad_token_id": None,
                "original_max_position_embeddings": (rs.original_max_position_embeddings if rs
                                                     else self.max_position_embeddings)}

    def _moe_hf_fields(self) -> dict[str, Any]:
        arch = self.architecture
        d: dict[str, Any] = {_NUM_EXPERTS_KEY[arch]: self.num_experts,
                             "num_experts_per_tok": self.num_experts_per_tok}
        if arch == "MixtralForCausalLM":
            return d
        d.update(moe_intermediate_size=self.intermediate_size, norm_topk_prob=self.norm_topk_prob,
                 decoder_sparse_step=1, mlp_only_layers=[])
        if arch == "Qwen2MoeForCausalLM":
            d.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                     qkv_bias=self.qkv_bias)
        else:
            d["attention_bias"] = False
        return d


# ---- helpers for from_hf_dict -------------------------------------------------------------

def _unsupported_arch_message(arch: Any) -> str:
    return (f"architecture {arch!r} is not supported; nanorun supports "
            f"{sorted(SUPPORTED_ARCHITECTURES)}")


# Gemma 3 4B-27B are published as image-text models; nanorun runs their text model, whose
# config is text_config, with transformers' Gemma3TextConfig defaults for what it leaves out
# (as the published ones leave out heads, head_dim and vocab_size).
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "bos_token_id": 2,
    "eos_token_id": 1, "tie_word_embeddings": True}


def _text_part(d: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of a Gemma3ForConditionalGeneration checkpoint (its images are
    not nanorun's: image tokens in a prompt are only tokens); any other config as it is."""
    if (d.get("architectures") or []) != ["Gemma3ForConditionalGeneration"]:
        return d
    top = {k: d[k] for k in ("bos_token_id", "eos_token_id", "dtype", "torch_dtype")
           if d.get(k) is not None}
    return {**_GEMMA3_TEXT_DEFAULTS, **top, **(d.get("text_config") or {}),
            "architectures": ["Gemma3ForCausalLM"]}


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    if len(archs) != 1:
        raise UnsupportedModelError(
            f"config.json must list exactly one entry in 'architectures', got {archs!r}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(_unsupported_arch_message(archs[0]))
    return archs[0]


def _reject_unsupported(d: dict[str, Any], arch: str) -> None:
    if arch in GEMMA_ARCHITECTURES:
        return          # _gemma_fields checks what Gemma configs may set
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU MLP) is")
    if d.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported (MLP projections must be bias-free)")
    if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM") and d.get("attention_bias"):
        raise UnsupportedModelError(f"attention_bias=true is not supported for {arch}: it implies "
                                    "an o_proj bias, which nanorun does not implement")
    if arch == "LlamaForCausalLM" and d.get("attention_bias"):
        # HF's Llama attention_bias also adds an o_proj bias, which nanorun's fused layout lacks.
        raise UnsupportedModelError("attention_bias=true is not supported for Llama: it implies an "
                                    "o_proj bias, which nanorun does not implement")


def _gemma_fields(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """ModelConfig's Gemma fields from a Gemma 2 or Gemma 3 text config (transformers' defaults
    where a key is absent), refusing what models/gemma.py does not compute."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"hidden_activation {act!r} is not supported for {arch}; only "
                                    "'gelu_pytorch_tanh' (GeGLU, as every published Gemma) is")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if d.get(key):
            raise UnsupportedModelError(f"{key}=true is not supported for {arch}; set it to false")
    gemma3 = arch == "Gemma3ForCausalLM"
    n, pattern = d["num_hidden_layers"], d.get("sliding_window_pattern", 6 if gemma3 else 2)
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(n)]
    attn_cap = d.get("attn_logit_softcapping", None if gemma3 else 50.0)
    if gemma3 and attn_cap is not None:
        # transformers' Gemma 3 attention does not apply it: running it would not be Gemma 3
        raise UnsupportedModelError(f"attn_logit_softcapping={attn_cap} is not supported for "
                                    f"{arch} (transformers ignores it there); set it to null")
    out: dict[str, Any] = dict(
        hidden_act=act, layer_types=tuple(types), attn_logit_softcapping=attn_cap,
        final_logit_softcapping=d.get("final_logit_softcapping", None if gemma3 else 30.0),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        qk_norm=gemma3, tie_word_embeddings=bool(d.get("tie_word_embeddings", True)))
    d = {**d, "sliding_window": d.get("sliding_window", 4096)}
    if gemma3:
        out["rope"], out["rope_local_theta"] = _gemma3_rope(d)
    return {**out, "sliding_window": d["sliding_window"]}


def _gemma3_rope(d: dict[str, Any]) -> tuple[tuple[float, RopeScaling | None], float]:
    """((global rope_theta, its scaling), the sliding layers' rope base): from transformers 5's
    per-layer-type rope_parameters, or the legacy rope_theta / rope_scaling /
    rope_local_base_freq keys."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"rope_parameters.sliding_attention.rope_type "
                                        f"{local['rope_type']!r} is not supported; only 'default'")
        return ((float(full.get("rope_theta", 1_000_000.0)), _rope_scaling(full)),
                float(local.get("rope_theta", 10_000.0)))
    theta, scaling = _rope({**d, "rope_theta": d.get("rope_theta", 1_000_000.0)})
    return (theta, scaling), float(d.get("rope_local_base_freq", 10_000.0))


def _dense_fields(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """Qwen3's QK norm and Phi-3's partial rotary factor (transformers 5 keeps it in
    rope_parameters, 4.x at the top level); another architecture with partial rotary is
    refused, since only Phi-3's rope is known to rotate part of each head that way."""
    if arch == "Qwen3ForCausalLM":
        return {"qk_norm": True}
    factor = float((d.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                         d.get("partial_rotary_factor") or 1.0))
    if arch == "Phi3ForCausalLM":
        return {"partial_rotary_factor": factor}
    if factor != 1.0:
        raise UnsupportedModelError(f"partial_rotary_factor={factor} is implemented for "
                                    f"Phi3ForCausalLM only, not {arch}; remove it")
    return {}


def _moe_fields(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig from a HF config (empty for dense models).
    Only models whose every layer is sparse are supported: Qwen's decoder_sparse_step and
    mlp_only_layers (dense MLP layers between the sparse ones) are refused."""
    if arch not in MOE_ARCHITECTURES:
        return {}
    if d.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError(f"decoder_sparse_step={d['decoder_sparse_step']} (dense MLP "
                                    "layers between sparse ones) is not supported; only 1 is")
    if d.get("mlp_only_layers"):
        raise UnsupportedModelError(f"mlp_only_layers={d['mlp_only_layers']} (dense MLP layers) "
                                    "is not supported; every layer must be a mixture of experts")
    # Published configs use _NUM_EXPERTS_KEY; transformers 5 saves Qwen3-MoE's as num_local_experts.
    experts = d.get(_NUM_EXPERTS_KEY[arch]) or d.get("num_local_experts") or d.get("num_experts")
    if not experts:
        raise ModelConfigError(f"{arch} config lacks {_NUM_EXPERTS_KEY[arch]!r} (the expert count)")
    out: dict[str, Any] = {"num_experts": experts,
                           "num_experts_per_tok": d["num_experts_per_tok"]}
    if arch == "MixtralForCausalLM":
        return out      # Mixtral's intermediate_size is its experts'; top-k always renormalised
    out.update(intermediate_size=d["moe_intermediate_size"],
               norm_topk_prob=bool(d.get("norm_topk_prob", False)),
               qk_norm=arch == "Qwen3MoeForCausalLM")
    if arch == "Qwen2MoeForCausalLM":
        out["shared_expert_intermediate_size"] = d["shared_expert_intermediate_size"]
        if not out["shared_expert_intermediate_size"]:
            raise UnsupportedModelError("Qwen2-MoE without a shared expert "
                                        "(shared_expert_intermediate_size=0) is not supported")
    return out


def _rope(d: dict[str, Any], arch: str = "") -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either `rope_parameters` (transformers 5) or the legacy
    `rope_theta` + `rope_scaling` keys (`arch`: whose longrope, models/phi3.py)."""
    params = d.get("rope_parameters")
    if params is not None and "rope_type" not in params and "type" not in params:
        # Per-layer-type dicts ({"full_attention": {...}, ...}) belong to hybrid models.
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    scaling = params if params is not None else d.get("rope_scaling")
    theta = (params or {}).get("rope_theta", d.get("rope_theta", 10000.0))
    return float(theta), _rope_scaling(scaling, d, arch)


def _rope_scaling(s: dict[str, Any] | None, d: dict[str, Any] | None = None,
                  arch: str = "") -> RopeScaling | None:
    if not s:
        return None
    rope_type = s.get("rope_type", s.get("type", "default"))
    if rope_type == "default":
        return None
    # LongRoPE's first name; transformers' Phi3Config also reads "yarn" as longrope.
    if rope_type == "su" or (rope_type == "yarn" and arch == "Phi3ForCausalLM"):
        rope_type = "longrope"
    if rope_type == "longrope":
        return _longrope(s, d or {}, arch)
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported; "
                                    f"supported: {list(_ROPE_TYPES)}")
    if "factor" not in s:
        raise ModelConfigError(f"rope scaling {rope_type!r} needs a 'factor'")
    kw = {k: s[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
          if k in s and rope_type == "llama3"}
    return RopeScaling(rope_type=rope_type, factor=float(s["factor"]), **kw)


def _longrope(s: dict[str, Any], d: dict[str, Any], arch: str) -> RopeScaling:
    """Phi-3's longrope as transformers reads it: original_max_position_embeddings from the
    top level (Phi3Config's, default 4096) over rope_scaling's, factor = max_position_embeddings
    / that when not given, attention_factor = sqrt(1 + ln(factor) / ln(original)) when not
    given (1 for factor <= 1)."""
    if arch != "Phi3ForCausalLM":
        raise UnsupportedModelError(f"rope scaling type 'longrope' is implemented for "
                                    f"Phi3ForCausalLM only (models/phi3.py), not {arch}")
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


def _sliding_window(d: dict[str, Any], arch: str) -> int | None:
    window = d.get("sliding_window")
    if arch == "LlamaForCausalLM" or window is None:
        return None
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return window
    if arch == "Phi3ForCausalLM":       # on every layer; one past every position never binds
        return window if window < d["max_position_embeddings"] else None
    # Qwen2 (and its MoE relatives): layer i slides iff use_sliding_window and i >= max_window_layers (or per layer_types).
    if not d.get("use_sliding_window"):
        return None
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", n)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return window
    raise UnsupportedModelError("sliding window on only some layers (max_window_layers / layer_types) "
                                "is not supported; use it on all layers or none")


def _generation_eos_ids(path: str) -> tuple[int, ...]:
    """EOS ids from generation_config.json, which Llama-3 instruct models use to add <|eot_id|>
    to config.json's <|end_of_text|>; HF generate and vLLM stop on both."""
    gen_file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_file):
        return ()
    try:
        with open(gen_file, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{gen_file} is not valid JSON: {e}") from e
    eos = d.get("eos_token_id") if isinstance(d, dict) else None
    if eos is None:
        return ()
    ids = _eos_ids(eos)
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise ModelConfigError(f"{gen_file}: eos_token_id must be a token id or a list of them, "
                               f"got {eos!r}")
    return ids


def _eos_ids(eos: int | list[int] | None) -> tuple[int, ...]:
    if eos is None:
        return ()
    return (eos,) if isinstance(eos, int) else tuple(eos)


def _eos_hf(ids: tuple[int, ...]) -> int | list[int] | None:
    if not ids:
        return None
    return ids[0] if len(ids) == 1 else list(ids)


def _rope_scaling_dict(s: RopeScaling | None) -> dict[str, Any] | None:
    if s is None:
        return None
    if s.rope_type == "linear":
        return {"rope_type": "linear", "factor": s.factor}
    if s.rope_type == "longrope":
        return {"rope_type": "longrope", "factor": s.factor, "attention_factor": s.attention_factor,
                "short_factor": list(s.short_factor), "long_factor": list(s.long_factor),
                "original_max_position_embeddings": s.original_max_position_embeddings}
    return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}
