"""Llama-family, mixture-of-experts and Gemma model descriptions (configs, presets) and weights."""

from __future__ import annotations

import dataclasses
import os

# The registry first: it registers every family's architectures, which any ModelConfig (the
# presets' included) is checked against.
from .registry import (MODEL_CLASSES, NETWORK_OPS, SUPPORTED_ARCHITECTURES, build_model,
                       declared_ops, family, model_frame_ops, model_layer_ops, op_spec)
from .config import (ModelConfig, ModelConfigError, RopeScaling, UnknownModelError,
                     UnsupportedModelError)
from .loader import (WeightLoadError, check_tensor_parallel, load_weights, random_weights,
                     shard_config, shard_ranges, shard_weights, weight_shapes)
from .presets import PRESETS, get_preset, list_presets, suggest_preset
from .gguf import gguf_config, is_gguf
from .hub import model_path, repo_id_of

from .op import ATTENTION, GEMM, KINDS, MEMORY, NETWORK, SIDES, OpSpec, OpWork, Shapes
from .llama import LAYER_OPS, TP_LAYER_OPS, LlamaModel, TPWorkspace, Workspace, layer_ops
from .moe import MoEModel, MoEWorkspace, moe_layer_ops
from .gemma import GemmaModel, gemma_layer_ops
from .qwen3 import Qwen3Model, qwen3_layer_ops
from .phi3 import Phi3Model, longrope_tables


def resolve_model(model: str, revision: str | None = None) -> tuple[ModelConfig, str | None]:
    """(config, where its weights are) of a model argument: a preset name -> (its config, None);
    a directory holding config.json -> (config, the directory); a GGUF file -> (the config in
    its metadata, the file); a Hugging Face Hub id "org/name" -> (config, its snapshot
    directory in the Hugging Face cache, downloaded where missing; see models.hub).
    Preset names win over same-named directories."""
    if model in PRESETS and revision is None:
        return get_preset(model), None
    path = model_path(model, revision)
    if is_gguf(path):
        return gguf_config(path), path
    if os.path.isfile(os.path.join(path, "config.json")):
        config = ModelConfig.from_pretrained(path)
        repo = repo_id_of(path)     # a snapshot is named after its commit: use the model's name
        return (dataclasses.replace(config, name=repo.rsplit("/", 1)[1]) if repo else config), path
    if os.path.isfile(path):
        raise UnknownModelError(f"{model!r} is a file but not a GGUF file; pass a GGUF file, a "
                                f"Hugging Face model directory or a preset name")
    raise UnknownModelError(f"{model!r} is not a preset name nor a directory containing "
                            f"config.json (nor a GGUF file, nor a Hugging Face Hub id org/name)."
                            f"{suggest_preset(model)} Presets: {', '.join(list_presets())}")


__all__ = [
    "LAYER_OPS", "TP_LAYER_OPS", "MODEL_CLASSES", "LlamaModel", "OpSpec", "TPWorkspace",
    "Workspace", "build_model", "layer_ops", "MoEModel", "MoEWorkspace", "moe_layer_ops",
    "GemmaModel", "gemma_layer_ops", "Qwen3Model", "qwen3_layer_ops", "Phi3Model",
    "longrope_tables",
    "model_layer_ops", "model_frame_ops", "declared_ops", "family", "op_spec", "NETWORK_OPS",
    "OpWork", "Shapes", "KINDS", "SIDES", "GEMM", "MEMORY", "ATTENTION", "NETWORK",
    "PRESETS", "SUPPORTED_ARCHITECTURES", "ModelConfig", "ModelConfigError", "RopeScaling",
    "UnknownModelError", "UnsupportedModelError", "WeightLoadError", "get_preset", "list_presets",
    "load_weights", "random_weights", "resolve_model", "weight_shapes", "check_tensor_parallel",
    "shard_config", "shard_ranges", "shard_weights",
]
