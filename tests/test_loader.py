"""load_weights against real (tiny) Hugging Face checkpoints, and random_weights."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanorun.models import (ModelConfig, WeightLoadError, get_preset, load_weights, random_weights,
                            weight_shapes)

transformers = pytest.importorskip("transformers")

TINY = ["tiny-llama", "tiny-llama2", "tiny-mistral", "tiny-qwen2"]


def load_shards_as_shard_weights(cfg, path, tp: int = 2) -> dict:
    """Each rank's load_weights(tp_rank=r) of the checkpoint at `path` equals shard_weights of
    the whole loaded model (asserted); returns the last rank's loaded weights."""
    from nanorun.models import shard_weights

    full = load_weights(cfg, path, dtype=torch.float32, device="cpu")
    for rank in range(tp):
        mine = load_weights(cfg, path, dtype=torch.float32, device="cpu", tp_rank=rank,
                            tp_size=tp)
        want = shard_weights(cfg, full, rank, tp)
        assert mine.keys() == want.keys()
        assert all(torch.equal(mine[n], want[n]) for n in want), (cfg.name, rank)
    return mine


def build_hf_checkpoint(preset: str, out_dir, *, shard: bool = False, seed: int = 0):
    """Save a randomly initialised HF model of `preset` to out_dir; returns (config, HF state dict)."""
    cfg = get_preset(preset)
    d = cfg.to_hf_dict()
    hf_cfg = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg).to(torch.float32)
    assert type(model).__name__ == cfg.architecture
    # Norm weights start at exactly 1 in HF; perturb them so a mixed-up norm would be caught.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, **({"max_shard_size": "300KB"} if shard else {}))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return ModelConfig.from_pretrained(out_dir), state


def expected_fused(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fused layout built directly from an HF state dict (the loader's specification)."""
    out = {"embed": sd["model.embed_tokens.weight"], "norm": sd["model.norm.weight"],
           "lm_head": sd["model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"]}
    for i in range(cfg.num_layers):
        h = f"model.layers.{i}."
        attn = [h + f"self_attn.{p}_proj" for p in "qkv"]
        out[f"layers.{i}.attn_norm"] = sd[h + "input_layernorm.weight"]
        out[f"layers.{i}.qkv"] = torch.cat([sd[a + ".weight"] for a in attn])
        if cfg.qkv_bias:
            out[f"layers.{i}.qkv_bias"] = torch.cat([sd[a + ".bias"] for a in attn])
        out[f"layers.{i}.o_proj"] = sd[h + "self_attn.o_proj.weight"]
        out[f"layers.{i}.mlp_norm"] = sd[h + "post_attention_layernorm.weight"]
        out[f"layers.{i}.gate_up"] = torch.cat([sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"]])
        out[f"layers.{i}.down"] = sd[h + "mlp.down_proj.weight"]
    return out


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("preset", TINY)
def test_fused_tensors_equal_hf_concatenation(preset, shard, tmp_path):
    cfg, sd = build_hf_checkpoint(preset, tmp_path, shard=shard)
    assert (tmp_path / "model.safetensors.index.json").exists() == shard
    unused: list[str] = []
    w = load_weights(cfg, tmp_path, dtype=torch.float32, device="cpu", unused=unused)
    want = expected_fused(cfg, sd)
    assert list(w) == list(weight_shapes(cfg)) and set(w) == set(want)
    for name, t in w.items():
        assert t.shape == weight_shapes(cfg)[name], name
        assert torch.equal(t, want[name]), name
    assert unused == []


def test_cast_to_dtype(tmp_path):
    cfg, sd = build_hf_checkpoint("tiny-llama", tmp_path)
    w = load_weights(cfg, tmp_path, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert all(t.dtype == torch.bfloat16 for t in w.values())
    assert torch.equal(w["layers.1.down"], sd["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16))


def test_tied_embeddings_share_one_tensor(tmp_path):
    cfg, _ = build_hf_checkpoint("tiny-qwen2", tmp_path)
    assert cfg.tie_word_embeddings
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    w = load_weights(cfg, tmp_path, dtype=torch.float32, device="cpu")
    assert w["lm_head"] is w["embed"]


def test_untied_model_without_lm_head_is_an_error(tmp_path):
    cfg, _ = build_hf_checkpoint("tiny-qwen2", tmp_path)
    untied = dataclasses.replace(cfg, tie_word_embeddings=False)
    with pytest.raises(WeightLoadError, match=r"'lm_head.weight' is missing from .*model.safetensors"):
        load_weights(untied, tmp_path, dtype=torch.float32, device="cpu")


def edit_file(path, edit):
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_single_file(tmp_path):
    cfg, _ = build_hf_checkpoint("tiny-llama", tmp_path)
    edit_file(tmp_path / "model.safetensors", lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"'model.layers.2.self_attn.k_proj.weight' is missing from "
                                              r".*model.safetensors"):
        load_weights(cfg, tmp_path, dtype=torch.float32, device="cpu")


def test_missing_tensor_sharded(tmp_path):
    cfg, _ = build_hf_checkpoint("tiny-llama", tmp_path, shard=True)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.3.mlp.up_proj.weight"
    shard = index["weight_map"][name]
    edit_file(tmp_path / shard, lambda t: t.pop(name))  # listed in the index, absent from the shard
    with pytest.raises(WeightLoadError, match=f"'{name}' is missing from .*{shard}"):
        load_weights(cfg, tmp_path, dtype=torch.float32, device="cpu")
    del index["weight_map"][name]  # absent from the index too
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightLoadError, match=f"'{name}' is missing from .*index.json"):
        load_weights(cfg, tmp_path, dtype=torch.float32, device="cpu")


def test_wrong_shape(tmp_path):
    cfg, _ = build_hf_checkpoint("tiny-qwen2", tmp_path)
    name = "model.layers.0.self_attn.v_proj.bias"
    edit_file(tmp_path / "model.safetensors", lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(WeightLoadError, match=rf"'{name}' in .* has shape \(63,\), expected \(64,\)"):
        load_weights(cfg, tmp_path, dtype=torch.float32, device="cpu")


def test_extra_tensors_collected_and_unsupported_bias_rejected(tmp_path):
    cfg, _ = build_hf_checkpoint("tiny-mistral", tmp_path)
    extra = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(16),
             "model.some_adapter.weight": torch.ones(2)}
    edit_file(tmp_path / "model.safetensors", lambda t: t.update(extra))
    unused: list[str] = []
    load_weights(cfg, tmp_path, dtype=torch.float32, device="cpu", unused=unused)
    assert unused == ["model.some_adapter.weight"]  # inv_freq is a known, ignorable buffer
    edit_file(tmp_path / "model.safetensors",
              lambda t: t.__setitem__("model.layers.1.self_attn.o_proj.bias", torch.zeros(cfg.hidden_size)))
    with pytest.raises(WeightLoadError, match="o_proj.bias.*does not support"):
        load_weights(cfg, tmp_path, dtype=torch.float32, device="cpu")


def test_directory_without_safetensors(tmp_path):
    with pytest.raises(WeightLoadError, match="neither model.safetensors nor"):
        load_weights(get_preset("tiny-llama"), tmp_path, dtype=torch.float32, device="cpu")


# ---- random weights --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", TINY)
def test_random_weights_shapes_and_param_count(preset):
    cfg = get_preset(preset)
    w = random_weights(cfg, dtype=torch.float16, device="cpu")
    assert {n: tuple(t.shape) for n, t in w.items()} == weight_shapes(cfg)
    assert all(t.dtype == torch.float16 for t in w.values())
    distinct = {id(t): t for t in w.values()}.values()
    assert sum(t.numel() for t in distinct) == cfg.num_params
    assert (w["lm_head"] is w["embed"]) == cfg.tie_word_embeddings
    assert abs(w["norm"].float().mean().item() - 1.0) < 0.01
    assert w["layers.0.qkv"].float().std().item() == pytest.approx(0.02, rel=0.1)


def test_random_weights_deterministic():
    cfg = get_preset("tiny-qwen2")
    a, b = (random_weights(cfg, dtype=torch.float32, device="cpu", seed=3) for _ in range(2))
    c = random_weights(cfg, dtype=torch.float32, device="cpu", seed=4)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["layers.0.qkv_bias"], c["layers.0.qkv_bias"])
