"""A model family is one file of models/ plus its entry in models/registry.py's FAMILIES.

What one family reads of a Hugging Face config.json, checks, writes back and names in a
checkpoint is declared by its model class (models.config.Family) and reached by architecture
name; models/config.py and models/loader.py hold only what every family shares. These tests
keep it so: no Hugging Face architecture name outside the file of the family that declares it
(and the tables that map other names to it), and a family defined in one place runs through the
shared reading, checking and loading without either shared file knowing it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from nanorun.models import (MODEL_CLASSES, SUPPORTED_ARCHITECTURES, LlamaModel, ModelConfig,
                            UnsupportedModelError, get_preset, random_weights, weight_shapes)
from nanorun.models import config as model_config
from nanorun.models.loader import _hf_plan
from nanorun.models.registry import FAMILIES

MODELS = Path(__file__).resolve().parents[1] / "models"
# Files that name architectures of every family by design: the registry's users that map other
# names onto them (GGUF's general.architecture, the Hub) and the presets, which are configs.
TABLES = {"presets.py", "gguf.py", "hub.py", "registry.py"}
ARCH_NAME = re.compile(r"\b[A-Za-z0-9]+ForCausalLM\b")


def _declaring_file(arch: str) -> str:
    return Path(MODEL_CLASSES[arch].__module__.replace(".", "/")).name + ".py"


def test_an_architecture_name_appears_only_in_the_file_of_its_family():
    found = []
    for path in sorted(MODELS.glob("*.py")):
        if path.name in TABLES:
            continue
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for arch in ARCH_NAME.findall(line):
                if arch not in MODEL_CLASSES or _declaring_file(arch) != path.name:
                    found.append(f"models/{path.name}:{line_no}: {arch}")
    assert not found, ("an architecture name outside its family's file (declare what the family "
                       "reads in its Family methods instead):\n" + "\n".join(found))


def test_every_registered_architecture_is_declared_by_exactly_one_family():
    declared = [arch for cls in FAMILIES for arch in cls.__dict__.get("MODEL_TYPES", {})]
    assert sorted(declared) == sorted(set(declared)) == sorted(SUPPORTED_ARCHITECTURES)
    for arch, cls in MODEL_CLASSES.items():
        assert model_config.family_of(arch) is cls


class _ToyModel(LlamaModel):
    """A family declared in one place: Llama's decoder under a new name, whose config adds one
    key it refuses and whose checkpoint names its MLP otherwise."""

    MODEL_TYPES = {"ToyForCausalLM": "toy"}

    @classmethod
    def read_hf(cls, d, arch):
        if d.get("toy_bias"):
            raise UnsupportedModelError("toy_bias is not supported")
        return {}

    @classmethod
    def hf_fields(cls, config):
        return {"toy_bias": False}

    @classmethod
    def layer_weight_names(cls, config, hf, p):
        names = super().layer_weight_names(config, hf, p)
        return {k.replace(".mlp.", ".ffn."): v for k, v in names.items()}


@pytest.fixture
def toy_family():
    model_config.register_family("ToyForCausalLM", _ToyModel)
    yield
    del model_config._FAMILIES["ToyForCausalLM"]


def test_a_family_in_one_file_runs_through_the_shared_config_and_loader(toy_family):
    llama = get_preset("tiny-llama")
    d = {**llama.to_hf_dict(), "architectures": ["ToyForCausalLM"], "model_type": "toy"}
    del d["attention_bias"], d["mlp_bias"]
    toy = ModelConfig.from_hf_dict(d, name="toy")
    assert toy.to_hf_dict()["toy_bias"] is False and toy.to_hf_dict()["model_type"] == "toy"
    assert ModelConfig.from_hf_dict(toy.to_hf_dict(), name="toy") == toy
    with pytest.raises(UnsupportedModelError, match="toy_bias"):
        ModelConfig.from_hf_dict({**d, "toy_bias": True}, name="toy")
    assert weight_shapes(toy) == weight_shapes(llama)
    plan = _hf_plan(toy)
    assert "model.layers.0.ffn.down_proj.weight" in plan
    assert not any(".mlp." in name for name in plan)
    w = random_weights(toy, dtype=torch.float32, device="cpu")
    assert set(w) == set(weight_shapes(toy))


def test_an_unregistered_architecture_is_refused_naming_the_supported_ones():
    d = {**get_preset("tiny-llama").to_hf_dict(), "architectures": ["ToyForCausalLM"]}
    with pytest.raises(UnsupportedModelError, match=r"'ToyForCausalLM' is not supported.*Llama"):
        ModelConfig.from_hf_dict(d, name="toy")


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3", "tiny-qwen3-moe", "tiny-gemma3"])
def test_a_key_only_another_family_reads_is_refused_not_ignored(preset):
    """partial_rotary_factor is Phi-3's (Phi3Model.read_hf): every other family refuses it
    (Qwen3's reading once dropped it silently)."""
    d = {**get_preset(preset).to_hf_dict(), "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedModelError, match="partial_rotary_factor=0.5 is not implemented"):
        ModelConfig.from_hf_dict(d, name=preset)
