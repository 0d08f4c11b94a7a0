"""ModelConfig parsing/validation, presets, and round trips through transformers' configs."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nanorun.models import (PRESETS, ModelConfig, ModelConfigError, RopeScaling, UnknownModelError,
                            UnsupportedModelError, get_preset, list_presets, resolve_model)

TINY = ["tiny-llama", "tiny-llama2", "tiny-mistral", "tiny-qwen2"]

# Published parameter counts (model cards / safetensors metadata).
PUBLISHED = {
    "llama-2-7b": 6.74e9, "llama-2-13b": 13.0e9, "llama-2-70b": 69.0e9, "llama-3-8b": 8.03e9,
    "llama-3-70b": 70.6e9, "mistral-7b": 7.24e9, "qwen2-7b": 7.6e9, "qwen2-72b": 72.7e9,
}


def hf_dict(**overrides):
    """A minimal valid Llama config.json dict, with overrides (None values delete the key)."""
    d = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
         "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 256, "hidden_act": "silu"}
    d.update(overrides)
    return {k: v for k, v in d.items() if v is not None}


# ---- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_parses_and_validates(name):
    cfg = get_preset(name)
    assert cfg.name == name and isinstance(cfg, ModelConfig)
    assert cfg.num_heads % cfg.num_kv_heads == 0
    assert cfg.q_size == cfg.num_heads * cfg.head_dim
    assert 0 < cfg.num_active_params_per_token <= cfg.num_params + cfg.vocab_size * cfg.hidden_size
    assert name in list_presets()


@pytest.mark.parametrize("name,published", sorted(PUBLISHED.items()))
def test_real_preset_sizes_match_published(name, published):
    assert get_preset(name).num_params == pytest.approx(published, rel=0.02)


def test_real_preset_details():
    l3 = get_preset("llama-3-8b")
    assert l3.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert (l3.rope_theta, l3.max_position_embeddings) == (500000.0, 131072)
    assert (l3.vocab_size, l3.num_kv_heads) == (128256, 8)
    assert l3.eos_token_ids == (128001, 128008, 128009)
    assert get_preset("mistral-7b").sliding_window == 4096
    q = get_preset("qwen2-7b")
    assert q.qkv_bias and q.sliding_window is None and q.vocab_size == 152064
    assert get_preset("tiny-qwen2").tie_word_embeddings


def test_derived_sizes_llama2_7b():
    c = get_preset("llama-2-7b")
    assert c.head_dim == 128 and c.kv_size == 4096
    assert c.kv_bytes_per_token(2) == 2 * 32 * 4096 * 2  # K and V, 32 layers, fp16
    per_layer = 4096 * 3 * 4096 + 4096 * 4096 + 3 * 4096 * 11008
    assert c.num_active_params_per_token == 32 * per_layer + 32000 * 4096
    assert c.num_params == c.num_active_params_per_token + 32000 * 4096 + (2 * 32 + 1) * 4096


def test_tied_lm_head_counted_once():
    c = get_preset("tiny-qwen2")
    untied = dataclasses.replace(c, tie_word_embeddings=False)
    assert untied.num_params - c.num_params == c.vocab_size * c.hidden_size
    assert untied.num_active_params_per_token == c.num_active_params_per_token


def test_unknown_preset_suggests_closest():
    with pytest.raises(UnknownModelError, match="Did you mean 'tiny-llama'") as e:
        get_preset("tiny-lama")
    assert "llama-2-7b" in str(e.value)


# ---- round trips -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_dict_round_trips(name):
    cfg = get_preset(name)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict(), name=name) == cfg


@pytest.mark.parametrize("name", TINY + ["llama-3-8b", "mistral-7b", "qwen2-7b"])
def test_round_trip_through_transformers(name):
    transformers = pytest.importorskip("transformers")
    cfg = get_preset(name)
    d = cfg.to_hf_dict()
    hf = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    assert type(hf).__name__ == cfg.architecture.replace("ForCausalLM", "Config")
    assert (hf.num_key_value_heads, hf.head_dim) == (cfg.num_kv_heads, cfg.head_dim)
    back = hf.to_dict()
    back["architectures"] = [cfg.architecture]  # for_model does not record the head class
    assert ModelConfig.from_hf_dict(back, name=name) == cfg


@settings(max_examples=60, deadline=None)
@given(arch=st.sampled_from(["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]),
       kv=st.integers(1, 4), group=st.integers(1, 4), head_dim=st.sampled_from([8, 16, 64, 128]),
       layers=st.integers(1, 6), tied=st.booleans(), window=st.one_of(st.none(), st.integers(1, 512)),
       scaling=st.sampled_from([None, RopeScaling("linear", 2.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 64)]),
       eos=st.lists(st.integers(0, 99), max_size=3).map(tuple))
def test_hf_dict_round_trip_property(arch, kv, group, head_dim, layers, tied, window, scaling, eos):
    cfg = ModelConfig(name="m", architecture=arch, vocab_size=100, hidden_size=kv * group * head_dim,
                      intermediate_size=3 * head_dim, num_layers=layers, num_heads=kv * group,
                      num_kv_heads=kv, head_dim=head_dim, max_position_embeddings=512, rope_scaling=scaling,
                      qkv_bias=arch == "Qwen2ForCausalLM", tie_word_embeddings=tied,
                      sliding_window=None if arch == "LlamaForCausalLM" else window, eos_token_ids=eos)
    assert ModelConfig.from_hf_dict(json.loads(json.dumps(cfg.to_hf_dict())), name="m") == cfg


# ---- from_hf_dict parsing --------------------------------------------------------------------

def test_defaults_for_absent_head_dim_and_kv_heads():
    c = ModelConfig.from_hf_dict(hf_dict(), name="m")
    assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.rope_scaling) == (16, 4, 10000.0, None)
    assert c.eos_token_ids == () and c.bos_token_id is None and not c.qkv_bias
    assert ModelConfig.from_hf_dict(hf_dict(head_dim=32, num_key_value_heads=2), name="m").q_size == 128


@pytest.mark.parametrize("eos,expected", [(2, (2,)), ([2, 7], (2, 7)), (None, ())])
def test_eos_forms(eos, expected):
    assert ModelConfig.from_hf_dict(hf_dict(eos_token_id=eos), name="m").eos_token_ids == expected


def test_dtype_from_either_key():
    assert ModelConfig.from_hf_dict(hf_dict(torch_dtype="bfloat16"), name="m").dtype == "bfloat16"
    assert ModelConfig.from_hf_dict(hf_dict(dtype="float16"), name="m").dtype == "float16"


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


@pytest.mark.parametrize("keys", [
    {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **LLAMA3}},          # transformers 4.x
    {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **LLAMA3}},               # older "type" key
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **LLAMA3}},       # transformers 5
])
def test_llama3_rope_forms(keys):
    c = ModelConfig.from_hf_dict(hf_dict(**keys), name="m")
    assert c.rope_theta == 5e5 and c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 64)


def test_linear_and_default_rope():
    c = ModelConfig.from_hf_dict(hf_dict(rope_scaling={"type": "linear", "factor": 4.0}), name="m")
    assert c.rope_scaling == RopeScaling("linear", 4.0)
    default = {"rope_type": "default", "rope_theta": 1e6}
    c = ModelConfig.from_hf_dict(hf_dict(rope_parameters=default), name="m")
    assert c.rope_scaling is None and c.rope_theta == 1e6


def test_sliding_window_rules():
    mistral = hf_dict(architectures=["MistralForCausalLM"])
    assert ModelConfig.from_hf_dict({**mistral, "sliding_window": 128}, name="m").sliding_window == 128
    assert ModelConfig.from_hf_dict({**mistral, "sliding_window": None}, name="m").sliding_window is None
    qwen = hf_dict(architectures=["Qwen2ForCausalLM"], sliding_window=128, max_window_layers=0)
    assert ModelConfig.from_hf_dict({**qwen, "use_sliding_window": False}, name="m").sliding_window is None
    assert ModelConfig.from_hf_dict({**qwen, "use_sliding_window": True}, name="m").sliding_window == 128
    with pytest.raises(UnsupportedModelError, match="only some layers"):
        ModelConfig.from_hf_dict({**qwen, "use_sliding_window": True, "max_window_layers": 1}, name="m")


# ---- errors --------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,match", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"'GPT2LMHeadModel' is not supported.*LlamaForCausalLM"),
    ({"architectures": None}, "exactly one entry"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "o_proj bias"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn' is not supported"),
])
def test_unsupported_features(overrides, match):
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf_dict(hf_dict(**overrides), name="m")


@pytest.mark.parametrize("overrides,match", [
    ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ({"hidden_size": 0}, "hidden_size must be a positive integer"),
    ({"head_dim": 15}, "head_dim must be even"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"eos_token_id": 128}, "outside the vocabulary"),
    ({"torch_dtype": "int8"}, "dtype must be one of"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0}},
     "low_freq_factor < high_freq_factor"),
    ({"rope_scaling": {"rope_type": "linear"}}, "needs a 'factor'"),
    ({"vocab_size": None}, "lacks required key 'vocab_size'"),
])
def test_invalid_configs_say_what_to_change(overrides, match):
    with pytest.raises(ModelConfigError, match=match):
        ModelConfig.from_hf_dict(hf_dict(**overrides), name="m")


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(ModelConfigError, match="does not exist"):
        ModelConfig.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelConfigError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)


def test_from_pretrained_and_resolve_model(tmp_path):
    cfg = get_preset("tiny-mistral")
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    loaded = ModelConfig.from_pretrained(model_dir)
    assert loaded.name == "my-model" and loaded == dataclasses.replace(cfg, name="my-model")
    assert resolve_model("tiny-mistral") == (cfg, None)
    assert resolve_model(str(model_dir)) == (loaded, str(model_dir))
    with pytest.raises(UnknownModelError, match="not a preset name nor a directory containing config.json"):
        resolve_model(str(tmp_path / "elsewhere"))
