"""GGUF files: config, weights and tokenizer from the file, checked against the Hugging Face
directory the file was written from (tests/gguf_files.py writes it as llama.cpp's converter
does) and against transformers' own GGUF tokenizer. The real SmolLM2 GGUF is in
test_real_weights.py."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf_files import (gguf_from_dir, gguf_from_fused, gguf_metadata,  # noqa: E402
                        gguf_tensors, write_gguf)
from text_model import CORPUS, write_text_model  # noqa: E402

from nanorun import LLM, SamplingParams  # noqa: E402
from nanorun.gguf_tokenizer import gguf_tokenizer  # noqa: E402
from nanorun.models import (ModelConfigError, UnknownModelError,  # noqa: E402
                            UnsupportedModelError, WeightLoadError, get_preset, load_weights,
                            random_weights, resolve_model, shard_weights)
from nanorun.models.gguf import _llama3_factors  # noqa: E402

Q = gguf.GGMLQuantizationType
F32 = torch.float32
TEXTS = CORPUS + ["  two leading spaces", "x  y   ", "\n\nz",
                  "<s>hi</s> <|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {kind: write_text_model(root / kind, tokenizer_kind=kind)
            for kind in ("bpe", "sentencepiece")}


@pytest.fixture(scope="module")
def llama(hf_dirs, tmp_path_factory):
    """(HF directory, the same model as an F32 GGUF file)."""
    path = tmp_path_factory.mktemp("f32") / "tiny.gguf"
    return hf_dirs["bpe"], gguf_from_dir(hf_dirs["bpe"], path)


@pytest.fixture(scope="module")
def qwen2(hf_dirs, tmp_path_factory):
    """The tiny model as a Qwen2 (q/k/v biases; llama.cpp does not permute its rows)."""
    d = tmp_path_factory.mktemp("qwen2")
    src = hf_dirs["bpe"]
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file
    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    for n in range(cfg["num_hidden_layers"]):
        for proj in "qkv":
            rows = sd[f"model.layers.{n}.self_attn.{proj}_proj.weight"].shape[0]
            sd[f"model.layers.{n}.self_attn.{proj}_proj.bias"] = torch.randn(rows, generator=g)
    save_file(sd, str(d / "model.safetensors"))
    return d, gguf_from_dir(d, d.parent / "qwen2.gguf")


def _weights(path, **kw):
    config, where = resolve_model(str(path))
    return load_weights(config, where, dtype=F32, device="cpu", **kw)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- config and weights -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_config_is_the_directorys(family, request):
    hf_dir, path = request.getfixturevalue(family)
    ours, ref = resolve_model(str(path))[0], resolve_model(str(hf_dir))[0]
    # GGUF stores eps as float32; generation_config.json's extra EOS is not in the file.
    assert ours.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-6)
    assert ours.name == path.stem
    same = dataclasses.replace(ours, name=ref.name, rms_norm_eps=ref.rms_norm_eps, dtype=ref.dtype,
                               eos_token_ids=ref.eos_token_ids[:1])
    assert same == dataclasses.replace(ref, eos_token_ids=ref.eos_token_ids[:1])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_f32_weights_equal_the_directorys(family, request):
    """Exactly equal: llama's q/k rows are put back in HF's order, qwen2's left as they are."""
    hf_dir, path = request.getfixturevalue(family)
    _assert_same(_weights(path), _weights(hf_dir))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F16, Q.BF16])
def test_quantized_weights_are_gguf_dequantized(llama, tmp_path, qtype):
    """A quantized matrix loads as the gguf package dequantizes it; quantizing a row-permuted
    matrix permutes its quantized rows, so the expectation needs no permutation at all."""
    hf_dir, _ = llama
    path = gguf_from_dir(hf_dir, tmp_path / "q.gguf", qtype)
    ours, ref = _weights(path), _weights(hf_dir)
    for name, w in ref.items():
        expect = w if w.ndim == 1 else torch.from_numpy(
            gguf.dequantize(gguf.quantize(w.numpy(), qtype), qtype).reshape(w.shape))
        assert torch.equal(ours[name], expect), name


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-mixtral", "tiny-qwen2-moe",
                                    "tiny-qwen3-moe"])
def test_every_family_round_trips(preset, tmp_path):
    """Each family nanorun runs, written as llama.cpp lays it out (Mixtral as "llama" with
    experts, the experts stacked, Qwen2-MoE's shared expert, Qwen3-MoE's q/k norms, Llama 3.1
    rope scaling as rope_freqs.weight, an end-of-turn EOS): the same config, the same weights."""
    config = get_preset(preset)
    fused = random_weights(config, dtype=F32, device="cpu", seed=3)
    path = gguf_from_fused(tmp_path / f"{preset}.gguf", config, fused)
    ours, where = resolve_model(str(path))
    assert ours.rms_norm_eps == pytest.approx(config.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(ours, name=config.name, rms_norm_eps=config.rms_norm_eps,
                               dtype=config.dtype) == config
    _assert_same(load_weights(ours, where, dtype=F32, device="cpu"), fused)


def test_tensor_parallel_shards(llama):
    """Each rank reads only its shard, the same numbers shard_weights cuts from the whole."""
    _, path = llama
    config = resolve_model(str(path))[0]
    full = _weights(path)
    for rank in range(2):
        _assert_same(_weights(path, tp_rank=rank, tp_size=2),
                     shard_weights(config, full, rank, 2))


def test_llm_runs_the_gguf_as_the_directory(llama):
    """Same weights, same tokenizer, same arithmetic: the same tokens and logprobs."""
    hf_dir, path = llama
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=2, prompt_logprobs=1)
    prompts = ["hello world, the quick", "你好，世界", "def main():"]
    ours = LLM(str(path), kv_cache_tokens=1024).generate(prompts, params)
    ref = LLM(str(hf_dir), kv_cache_tokens=1024).generate(prompts, params)
    for a, b in zip(ours, ref):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
        assert a.outputs[0].logprobs == b.outputs[0].logprobs
        assert a.prompt_logprobs == b.prompt_logprobs


# ---- tokenizer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers(hf_dirs, tmp_path_factory):
    """kind -> (our GGUF tokenizer, transformers' tokenizer of the same GGUF file)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tok")
    out = {}
    for kind, d in hf_dirs.items():
        path = gguf_from_dir(d, root / f"{kind}.gguf")
        ref = transformers.AutoTokenizer.from_pretrained(str(root), gguf_file=path.name)
        out[kind] = gguf_tokenizer(path), ref
    return out


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tokenizer_encodes_and_decodes_as_transformers(tokenizers, kind):
    """Byte-level BPE with the file's merges; SentencePiece with merges made from the scores
    (the file has none), byte fallback and the prefix space."""
    ours, ref = tokenizers[kind]
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("kind", ["bpe", "sentencepiece"])
def test_tokenizer_special_tokens_and_chat_template(tokenizers, hf_dirs, kind):
    ours, ref = tokenizers[kind]
    assert ours.bos_token_id == ref.bos_token_id and ours.eos_token_id == ref.eos_token_id
    assert ours.special_tokens["bos_token"] == ref.bos_token
    assert ours.encode("hi")[0] == ours.bos_token_id      # tokenizer.ggml.add_bos_token
    messages = [{"role": "user", "content": "hello world"}]
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


# ---- what nanorun refuses ---------------------------------------------------------------------

def _write(tmp_path, hf_dir, edit_meta=None, edit_tensors=None, arch="llama"):
    meta, tensors = gguf_metadata(hf_dir), gguf_tensors(hf_dir)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    return write_gguf(tmp_path / "bad.gguf", arch, meta, tensors)


def _rename_arch(meta, new):
    for k in [k for k in meta if k.startswith("llama.")]:
        meta[new + k[len("llama"):]] = meta.pop(k)


@pytest.mark.parametrize("edit, arch, error, field", [
    (lambda m: _rename_arch(m, "gptneox"), "gptneox", UnsupportedModelError,
     "general.architecture"),
    (lambda m: m.pop("llama.block_count"), "llama", ModelConfigError, "llama.block_count"),
    (lambda m: m.update({"llama.rope.dimension_count": 8}), "llama", UnsupportedModelError,
     "llama.rope.dimension_count"),
    (lambda m: m.update({"llama.attention.head_count_kv": [2, 4]}), "llama", UnsupportedModelError,
     "llama.attention.head_count_kv"),
    (lambda m: m.update({"llama.rope.scaling.type": "yarn"}), "llama", UnsupportedModelError,
     "llama.rope.scaling.type"),
])
def test_refuses_a_config_naming_the_field(llama, tmp_path, edit, arch, error, field):
    path = _write(tmp_path, llama[0], edit, arch=arch)
    with pytest.raises(error, match=field.replace(".", r"\.")):
        resolve_model(str(path))


def test_refuses_llama_attention_bias(llama, tmp_path):
    """HF's Llama attention_bias also means an o_proj bias nanorun does not have."""
    def add_bias(t):
        t["blk.0.attn_q.bias"] = np.zeros(t["blk.0.attn_q.weight"].shape[0], np.float32)
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.attn_q\.bias"):
        resolve_model(str(_write(tmp_path, llama[0], edit_tensors=add_bias)))


def test_refuses_a_tensor_of_another_variant(llama, tmp_path):
    """A tensor llama.cpp's llama layout lacks (here Gemma's post-attention norm) means a
    model nanorun would compute wrongly: refused, named."""
    def add(t):
        t["blk.1.post_attention_norm.weight"] = np.ones(64, np.float32)
    with pytest.raises(WeightLoadError, match=r"blk\.1\.post_attention_norm\.weight"):
        _weights(_write(tmp_path, llama[0], edit_tensors=add))


def test_refuses_an_unknown_bias_tensor(llama, tmp_path):
    def add_bias(t):
        t["blk.1.ffn_down.bias"] = np.zeros(t["blk.1.ffn_down.weight"].shape[0], np.float32)
    with pytest.raises(WeightLoadError, match="down_proj.bias"):
        _weights(_write(tmp_path, llama[0], edit_tensors=add_bias))


@pytest.mark.parametrize("key, value", [("tokenizer.ggml.model", "bert"),
                                        ("tokenizer.ggml.pre", "no-such-pre")])
def test_refuses_a_tokenizer_naming_the_field(llama, tmp_path, key, value):
    path = _write(tmp_path, llama[0], lambda m: m.update({key: value}))
    with pytest.raises(UnsupportedModelError, match=key.replace(".", r"\.")):
        gguf_tokenizer(path)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"not a model")
    with pytest.raises(UnknownModelError, match="not a GGUF file"):
        resolve_model(str(tmp_path / "model.bin"))


# ---- Llama 3.1 rope scaling, stored as rope_freqs.weight --------------------------------------

_LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_llama3_rope_scaling_from_rope_freqs(llama, tmp_path):
    """llama.cpp stores Llama 3.1's scaling as per-dimension factors; nanorun reads it back
    into the llama3 parameters, which must reproduce every factor."""
    factors = _llama3_factors(10000.0, 16, _LLAMA31).astype(np.float32)

    def add(t):
        t["rope_freqs.weight"] = factors
    path = _write(tmp_path, llama[0], lambda m: m.update(
        {"llama.rope.scaling.original_context_length": 64}), add)
    scaling = resolve_model(str(path))[0].rope_scaling
    assert (scaling.rope_type, scaling.factor, scaling.original_max_position_embeddings) == (
        "llama3", 8.0, 64)
    _weights(path)     # rope_freqs is not a weight

    def other(t):
        t["rope_freqs.weight"] = factors[::-1].copy()
    with pytest.raises(UnsupportedModelError, match="rope_freqs.weight"):
        resolve_model(str(_write(tmp_path, llama[0], edit_tensors=other)))
