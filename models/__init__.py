"""Llama-family model descriptions (configs, presets) and weights for nanorun."""

from __future__ import annotations

import os

from .config import (SUPPORTED_ARCHITECTURES, ModelConfig, ModelConfigError, RopeScaling,
                     UnknownModelError, UnsupportedModelError)
from .loader import WeightLoadError, load_weights, random_weights, weight_shapes
from .presets import PRESETS, get_preset, list_presets, suggest_preset

from .llama import LAYER_OPS, LlamaModel, OpSpec, Workspace
from .registry import MODEL_CLASSES, build_model


def resolve_model(model: str) -> tuple[ModelConfig, str | None]:
    """A preset name -> (its config, None); a directory holding config.json -> (config, the
    directory, to load weights from). Preset names win over same-named directories."""
    if model in PRESETS:
        return get_preset(model), None
    if os.path.isfile(os.path.join(model, "config.json")):
        return ModelConfig.from_pretrained(model), model
    raise UnknownModelError(f"{model!r} is not a preset name nor a directory containing config.json."
                            f"{suggest_preset(model)} Presets: {', '.join(list_presets())}")


__all__ = [
    "LAYER_OPS", "MODEL_CLASSES", "LlamaModel", "OpSpec", "Workspace", "build_model",
    "PRESETS", "SUPPORTED_ARCHITECTURES", "ModelConfig", "ModelConfigError", "RopeScaling",
    "UnknownModelError", "UnsupportedModelError", "WeightLoadError", "get_preset", "list_presets",
    "load_weights", "random_weights", "resolve_model", "weight_shapes",
]
