"""Model families by their Hugging Face architecture name.

A family is one file of models/ whose model class declares its ops and, as a
models.config.Family, its Hugging Face configs and checkpoints (MODEL_TYPES names the
architectures it runs). Registering it here is its one line outside that file: FAMILIES below.
"""

from __future__ import annotations

from .config import ModelConfig, UnsupportedModelError, register_family
from .gemma import GemmaModel
from .llama import TORCH_POINTWISE, LlamaModel, PointwiseOps
from .moe import MoEModel
from .phi3 import Phi3Model
from .qwen3 import Qwen3Model
from .op import NETWORK, OpSpec

# Llama 2/3, Mistral and Qwen2 (LlamaModel); Qwen3 (the qk_norm op); Phi-3 (LongRoPE tables;
# partial rotary is config); Mixtral, Qwen2-MoE and Qwen3-MoE (MoEModel); Gemma 2 and 3 text.
FAMILIES: tuple[type[LlamaModel], ...] = (LlamaModel, Qwen3Model, Phi3Model, MoEModel,
                                          GemmaModel)

MODEL_CLASSES: dict[str, type[LlamaModel]] = {
    arch: cls for cls in FAMILIES for arch in cls.__dict__.get("MODEL_TYPES", {})}
for _arch, _cls in MODEL_CLASSES.items():
    register_family(_arch, _cls)
SUPPORTED_ARCHITECTURES = frozenset(MODEL_CLASSES)


def family(config: ModelConfig) -> type:
    """The model class of `config`'s architecture."""
    try:
        return MODEL_CLASSES[config.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"no model class for architecture {config.architecture!r}; supported: "
            f"{sorted(MODEL_CLASSES)}") from None


def model_layer_ops(config: ModelConfig, tp: int = 1, kv_send: bool = False
                    ) -> tuple[OpSpec, ...]:
    """The ops of one layer of `config`'s model on `tp` ranks, without building it (what the
    planner, the cost model and the search work on); kv_send: a prefill engine's layer."""
    return family(config).layer_ops_for(config, tp, kv_send)


def model_frame_ops(config: ModelConfig) -> tuple[OpSpec, ...]:
    """The iteration's frame of `config`'s model (embed, logits), whose costs its family
    declares."""
    return family(config).FRAME_OPS


def declared_ops() -> tuple[OpSpec, ...]:
    """Every layer op the registered families declare (an op of several declarations, such as
    o_proj with and without tensor parallelism, appears once per declaration)."""
    return tuple(dict.fromkeys(op for cls in MODEL_CLASSES.values() for op in cls.OPS))


def op_spec(name: str) -> OpSpec | None:
    """A declaration of the layer op `name` among the registered families, None if none
    declares it. Its placement facts (kind, side, history) are the same in every declaration
    of the name (tests/test_op_facts.py), which is what a lookup by name may rely on."""
    return _BY_NAME.get(name)


_BY_NAME: dict[str, OpSpec] = {}
for _op in declared_ops():
    _BY_NAME.setdefault(_op.name, _op)

# The collectives and transfers of the registered families (ops of kind network).
NETWORK_OPS: tuple[str, ...] = tuple(dict.fromkeys(
    op.name for op in declared_ops() if op.kind == NETWORK))


def build_model(config: ModelConfig, weights, *, max_model_len: int, attention_fn, kv_append_fn,
                tp_group=None, pointwise: PointwiseOps = TORCH_POINTWISE, kv_sink=None):
    """The model of `config` over `weights`; with `tp_group` (a torch.distributed process group),
    this rank's tensor-parallel shard of it (`weights` must then be the shard). `pointwise`: the
    element-wise ops (RMSNorm, rope, SiLU-and-mul) the backend runs them with. `kv_sink`: a
    prefill engine's KV transport, which gives the layers the kv_send op (models.llama)."""
    return family(config)(config, weights, max_model_len=max_model_len, attention_fn=attention_fn,
               kv_append_fn=kv_append_fn, tp_group=tp_group, pointwise=pointwise,
               kv_sink=kv_sink)
