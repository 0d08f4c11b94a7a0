"""Llama-family and mixture-of-experts model descriptions (configs, presets) and weights."""

from __future__ import annotations

import os

from .config import (SUPPORTED_ARCHITECTURES, ModelConfig, ModelConfigError, RopeScaling,
                     UnknownModelError, UnsupportedModelError)
from .loader import (WeightLoadError, check_tensor_parallel, load_weights, random_weights,
                     shard_config, shard_ranges, shard_weights, weight_shapes)
from .presets import PRESETS, get_preset, list_presets, suggest_preset

from .llama import LAYER_OPS, TP_LAYER_OPS, LlamaModel, OpSpec, TPWorkspace, Workspace, layer_ops
from .moe import MoEModel, MoEWorkspace, moe_layer_ops
from .registry import MODEL_CLASSES, build_model, model_layer_ops


def resolve_model(model: str) -> tuple[ModelConfig, str | None]:
    """A preset name -> (its config, None); a directory holding config.json -> (config, the
    directory, to load weights from). Preset names win over same-named directories."""
    if model in PRESETS:
        return get_preset(model), None
    if os.path.isfile(os.path.join(model, "config.json")):
        return ModelConfig.from_pretrained(model), model
    if _looks_like_hub_id(model):
        raise UnknownModelError(
            f"{model!r} looks like a Hugging Face Hub id, but nanorun does not download models "
            f"and there is no directory of that name here. Download it first, e.g. `hf download "
            f"{model} --local-dir DIR` (or `huggingface-cli download ...`), and pass DIR")
    raise UnknownModelError(f"{model!r} is not a preset name nor a directory containing config.json."
                            f"{suggest_preset(model)} Presets: {', '.join(list_presets())}")


def _looks_like_hub_id(model: str) -> bool:
    """ORG/NAME with no other path parts, not a path that exists."""
    parts = str(model).split("/")
    return (len(parts) == 2 and all(parts) and not os.path.exists(model)
            and not str(model).startswith((".", "~")))


__all__ = [
    "LAYER_OPS", "TP_LAYER_OPS", "MODEL_CLASSES", "LlamaModel", "OpSpec", "TPWorkspace",
    "Workspace", "build_model", "layer_ops", "MoEModel", "MoEWorkspace", "moe_layer_ops",
    "model_layer_ops",
    "PRESETS", "SUPPORTED_ARCHITECTURES", "ModelConfig", "ModelConfigError", "RopeScaling",
    "UnknownModelError", "UnsupportedModelError", "WeightLoadError", "get_preset", "list_presets",
    "load_weights", "random_weights", "resolve_model", "weight_shapes", "check_tensor_parallel",
    "shard_config", "shard_ranges", "shard_weights",
]
