"""Model configuration: `ModelConfig`, nanorun's own, validated view of a Hugging Face
`config.json`, and what every model family shares in reading and writing one.

It reads both the transformers 4.x layout (`rope_theta` + `rope_scaling`, `torch_dtype`) and
the 5.x one (`rope_parameters`, `dtype`), and rejects features the runtime does not implement
instead of silently computing something different from the reference model.

What one family reads beyond that (its extra keys, its checks and refusals, its part of
`to_hf_dict`, its checkpoint's tensor names) is its `Family`, declared by its model class in
its own file of models/ and registered by Hugging Face architecture name in models/registry.py
(which `nanorun.models` imports first, so every architecture is known before any config is
built).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

_LAYER_TYPES = ("sliding_attention", "full_attention")
_ROPE_TYPES = ("llama3", "linear", "longrope")
_DTYPES = ("float16", "bfloat16", "float32")
# ModelConfig fields beyond a Llama decoder's, with the value that means "not used": a family
# acts on those it names in Family.FEATURES, and every other family must leave them so.
_FEATURE_DEFAULTS: dict[str, Any] = {
    "num_experts": 0, "shared_expert_intermediate_size": 0, "qk_norm": False,
    "query_pre_attn_scalar": None, "attn_logit_softcapping": None,
    "final_logit_softcapping": None, "layer_types": (), "rope_local_theta": None}


class ModelConfigError(ValueError):
    """A model configuration is invalid; the message says what to change."""


class UnsupportedModelError(ModelConfigError):
    """The configuration is valid for Hugging Face but uses a feature nanorun does not implement."""


class UnknownModelError(ModelConfigError):
    """A model name is neither a preset nor a directory holding a config.json."""


class WeightLoadError(ValueError):
    """A checkpoint is missing a tensor, has a wrong shape, or needs an unsupported feature."""


class Family:
    """What one model family knows of Hugging Face configs and checkpoints beyond what every
    family shares. A family's model class (models/llama.py, moe.py, qwen3.py, phi3.py,
    gemma.py) is one, overriding what it needs; models/registry.py registers it under each
    architecture of its MODEL_TYPES. The defaults are a family that reads nothing extra."""

    # Hugging Face architecture name -> its config.json's model_type, for each it runs.
    MODEL_TYPES: dict[str, str] = {}
    # The MLP activation its configs name (HF's hidden_act).
    HIDDEN_ACT = "silu"
    # The fields of _FEATURE_DEFAULTS it acts on ("num_experts": a mixture of experts).
    FEATURES: frozenset[str] = frozenset()
    # Norm weight vectors of [hidden_size] a layer (for ModelConfig.num_params).
    NORMS_PER_LAYER = 2

    @classmethod
    def text_part(cls, d: dict[str, Any]) -> dict[str, Any]:
        """The causal-LM config inside `d` where `d` is an image-text model of this family
        that nanorun runs as its text model; any other config as it is."""
        return d

    @classmethod
    def read_hf(cls, d: dict[str, Any], arch: str) -> dict[str, Any]:
        """ModelConfig fields of config.json `d` (of architecture `arch`) that this family
        reads its own way (they win over the shared reading; "rope" gives (rope_theta,
        rope_scaling)); raises UnsupportedModelError for what the family does not compute."""
        return {}

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        """Raise ModelConfigError where `config` is invalid for this family beyond the shared
        checks."""

    @classmethod
    def hf_fields(cls, config: ModelConfig) -> dict[str, Any]:
        """This family's keys of config.json for `config` (to_hf_dict's family part)."""
        return {}

    @classmethod
    def layer_shapes(cls, config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
        """Fused name -> shape of layer `p`'s tensors after mlp_norm (models/loader.py
        lists the ones before), in order."""
        raise NotImplementedError(f"{cls.__name__} declares no layer tensors")

    @classmethod
    def layer_weight_names(cls, config: ModelConfig, hf: str, p: str) -> dict[str, Any]:
        """Checkpoint tensor name -> loader.Slot of layer `p` (HF prefix `hf`), every tensor
        but input_layernorm (models/loader.py maps that one and the model's frame)."""
        raise NotImplementedError(f"{cls.__name__} declares no checkpoint names")


_FAMILIES: dict[str, type[Family]] = {}


def register_family(architecture: str, family: type[Family]) -> None:
    """Make `architecture` (a Hugging Face architecture name) one `family` runs
    (models/registry.py calls this for every registered family)."""
    if architecture not in family.MODEL_TYPES:
        raise ValueError(f"{family.__name__} does not declare {architecture!r} in MODEL_TYPES")
    if _FAMILIES.get(architecture, family) is not family:
        raise ValueError(f"{architecture!r} is registered to {_FAMILIES[architecture].__name__}")
    _FAMILIES[architecture] = family


def family_of(architecture: str) -> type[Family]:
    """The registered family running `architecture`."""
    try:
        return _FAMILIES[architecture]
    except KeyError:
        raise UnsupportedModelError(_unsupported_arch_message(architecture)) from None


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
    # Generic, though only some families act on them (Family.FEATURES; Gemma 2 / 3 today,
    # None / () elsewhere). The attention scale is query_pre_attn_scalar ** -0.5 (None:
    # head_dim ** -0.5); the soft-caps bound attention scores and final logits by
    # cap * tanh(x / cap); layer_types says per layer whether sliding_window applies (empty: it
    # applies to every layer); rope_local_theta is the rope base of sliding layers (Gemma 3's),
    # which take no rope scaling.
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float | None = None

    def __post_init__(self) -> None:
        family = family_of(self.architecture)
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
        self._check_experts(family)
        self._check_features(family)
        self._check_windows()
        family.check(self)

    def _check_features(self, family: type[Family]) -> None:
        if self.hidden_act != family.HIDDEN_ACT:
            raise UnsupportedModelError(f"{self.name}: hidden activation {self.hidden_act!r} is not "
                                        f"supported for {self.architecture}; only "
                                        f"{family.HIDDEN_ACT!r} is")
        unused = [name for name, default in _FEATURE_DEFAULTS.items()
                  if name not in family.FEATURES and getattr(self, name) != default]
        if unused:
            raise ModelConfigError(f"{self.name}: {unused} {'is' if len(unused) == 1 else 'are'} "
                                   f"not implemented for {self.architecture} "
                                   f"({family.__name__}); leave "
                                   + ", ".join(f"{n}={_FEATURE_DEFAULTS[n]!r}" for n in unused))
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping",
                     "final_logit_softcapping", "rope_local_theta"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ModelConfigError(f"{self.name}: {name} must be > 0 or None, got {value}")

    def _check_windows(self) -> None:
        """layer_types (empty: the window, if any, applies to every layer)."""
        if not self.layer_types:
            return
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

    def _check_experts(self, family: type[Family]) -> None:
        moe = "num_experts" in family.FEATURES
        if moe != (self.num_experts > 0):
            raise ModelConfigError(
                f"{self.name}: {self.architecture} " + ("needs num_experts > 0" if moe else
                "is a dense architecture; num_experts must be 0"))
        if not moe:
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
        norms = family_of(self.architecture).NORMS_PER_LAYER * d
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
        for family in dict.fromkeys(_FAMILIES.values()):
            d = family.text_part(d)
        arch = _architecture(d)
        try:
            return cls._from_hf_fields(d, name, arch, **family_of(arch).read_hf(d, arch))
        except KeyError as e:
            raise ModelConfigError(f"{name}: config lacks required key {e.args[0]!r}") from None

    @classmethod
    def _from_hf_fields(cls, d: dict[str, Any], name: str, arch: str, **extra: Any) -> ModelConfig:
        """The fields every family reads alike, under `extra`: the family's own reading."""
        heads = d["num_attention_heads"]
        rope_theta, rope_scaling = extra.pop("rope", None) or rope_from_hf(d, arch)
        if "partial_rotary_factor" not in extra and partial_rotary_factor(d) != 1.0:
            raise UnsupportedModelError(f"partial_rotary_factor={partial_rotary_factor(d)} is not "
                                        f"implemented for {arch}; remove it")
        fields: dict[str, Any] = dict(
            name=name,
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=extra.pop("intermediate_size", None) or d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            max_position_embeddings=d["max_position_embeddings"],
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=_eos_ids(d.get("eos_token_id")),
            dtype=d.get("dtype") or d.get("torch_dtype"),
        )
        return cls(**{**fields, **extra})     # a family's own reading wins

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
        family = family_of(self.architecture)
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": family.MODEL_TYPES[self.architecture],
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
            "hidden_act": self.hidden_act,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _eos_hf(self.eos_token_ids),
            "torch_dtype": self.dtype,
        }
        d.update(family.hf_fields(self))
        return d


# ---- helpers for from_hf_dict -------------------------------------------------------------

def _unsupported_arch_message(arch: Any) -> str:
    return (f"architecture {arch!r} is not supported; nanorun supports "
            f"{sorted(_FAMILIES)}")


def _architecture(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    if len(archs) != 1:
        raise UnsupportedModelError(
            f"config.json must list exactly one entry in 'architectures', got {archs!r}; "
            f"supported: {sorted(_FAMILIES)}")
    family_of(archs[0])
    return archs[0]


# ---- readings a family may share --------------------------------------------------------------

def partial_rotary_factor(d: dict[str, Any]) -> float:
    """The fraction of each head rope rotates (transformers 5 keeps it in rope_parameters, 4.x
    at the top level); ModelConfig.from_hf_dict refuses one other than 1 unless the family
    reads it (Family.read_hf returns it)."""
    return float((d.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                       d.get("partial_rotary_factor") or 1.0))


def rope_from_hf(d: dict[str, Any], arch: str, longrope=None,
                 longrope_names: tuple[str, ...] = ("longrope", "su")
                 ) -> tuple[float, RopeScaling | None]:
    """(rope_theta, scaling) from either `rope_parameters` (transformers 5) or the legacy
    `rope_theta` + `rope_scaling` keys; `longrope`, `longrope_names`: as rope_scaling_from_hf."""
    params = d.get("rope_parameters")
    if params is not None and "rope_type" not in params and "type" not in params:
        # Per-layer-type dicts ({"full_attention": {...}, ...}) belong to hybrid models.
        raise UnsupportedModelError("per-layer-type rope_parameters are not supported")
    scaling = params if params is not None else d.get("rope_scaling")
    theta = (params or {}).get("rope_theta", d.get("rope_theta", 10000.0))
    return float(theta), rope_scaling_from_hf(scaling, arch, longrope, longrope_names)


def rope_scaling_from_hf(s: dict[str, Any] | None, arch: str, longrope=None,
                         longrope_names: tuple[str, ...] = ("longrope", "su")
                         ) -> RopeScaling | None:
    """The RopeScaling of a HF rope_scaling / rope_parameters dict. A rope type among
    `longrope_names` ("su": LongRoPE's first name) is read by `longrope` (a function of the
    dict), given by the family that computes it; without one it is refused."""
    if not s:
        return None
    rope_type = s.get("rope_type", s.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type in longrope_names:
        if longrope is None:
            raise UnsupportedModelError(f"rope scaling type 'longrope' is not implemented for "
                                        f"{arch} (models/phi3.py's family computes it); remove it")
        return longrope(s)
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"rope scaling type {rope_type!r} is not supported; "
                                    f"supported: {list(_ROPE_TYPES)}")
    if "factor" not in s:
        raise ModelConfigError(f"rope scaling {rope_type!r} needs a 'factor'")
    kw = {k: s[k] for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
          if k in s and rope_type == "llama3"}
    return RopeScaling(rope_type=rope_type, factor=float(s["factor"]), **kw)


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
