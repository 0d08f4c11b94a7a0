"""Qwen3 (dense) and Phi-3 against Hugging Face transformers' own Qwen3ForCausalLM and
Phi3ForCausalLM on random weights: logits and greedy tokens under sequential and overlap with
chunked prefill and preemption, tied and untied embeddings, explicit head_dim, sliding windows,
longrope across original_max_position_embeddings with partial rotary (Phi-4-mini's shape), and
tensor parallel 2 over gloo for Phi-3 (its fused qkv and gate_up cut per rank); plus their
configs, refusals, presets and checkpoint shards.

Longrope's factors follow the engine's max_model_len, as vLLM's do (models/phi3.py says why
and where that is transformers' choice too): the tests compare where the two agree exactly,
and show where they do not. Reference logits of a generation are transformers' generate's own
(output_logits). Tokens come from other arithmetic: they are HF's, or differ first at a
near-tie of HF's logits there (tests/tokens.py).

The tensor-parallel test starts this file as a script twice, as tests/test_moe.py does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from ranks import join_ranks, start_ranks
from tokens import assert_same_tokens

from nanorun import LLM, SamplingParams
from nanorun.models import (ModelConfig, ModelConfigError, UnsupportedModelError, get_preset,
                            model_layer_ops)

CHUNK = 16                       # < the longest prompts: prefill runs in chunks
N_NEW = 12
LENGTHS = [1, 6, 17, 40]
# tiny-phi3's original_max_position_embeddings is 32, its max_position_embeddings 2048: an
# engine of the default max_model_len takes the long factors, as transformers does for a
# prompt longer than 32; one of max_model_len 32 the short ones, as transformers does for a
# sequence that never outgrows 32.
ORIGINAL = 32
LONG_LENGTHS = [33, 40, 47, 60]
SHORT_LENGTHS = [1, 6, 19]      # + N_NEW tokens stay within 32
WORKER_TIMEOUT_S = 180

# name -> (preset, changes to its HF config dict)
MODELS = {
    "qwen3-tied": ("tiny-qwen3", {}),
    # untied, a window of 24 on every layer (max_window_layers 0)
    "qwen3-window": ("tiny-qwen3", {"tie_word_embeddings": False, "use_sliding_window": True,
                                    "sliding_window": 24, "max_window_layers": 0}),
    # longrope, partial rotary 0.75, tied: Phi-4-mini's options
    "phi3-longrope": ("tiny-phi3", {}),
    # Phi-3-mini-4k's: no rope scaling, every dim rotated, untied, a window that binds
    "phi3-window": ("tiny-phi3", {"rope_scaling": None, "partial_rotary_factor": 1.0,
                                  "tie_word_embeddings": False, "sliding_window": 24}),
}


def _hf_dict(name: str) -> dict:
    preset, change = MODELS[name]
    return {**get_preset(preset).to_hf_dict(), **change}


def _write_hf(name: str, path: Path):
    """A random-weight transformers model of MODELS[name], saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    hf_dict = {**_hf_dict(name), "initializer_range": 0.1}    # spread logits: fewer near-ties
    config = transformers.AutoConfig.for_model(**hf_dict)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, torch_dtype=torch.float32, attn_implementation="eager").eval()
    assert type(model).__name__ == hf_dict["architectures"][0]
    with torch.no_grad():        # norms start at exactly 1: perturb them, so a mix-up shows
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=list(MODELS))
def hf_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, _write_hf(request.param, path)


def _prompts(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(1, 2048, (n,), generator=g).tolist() for n in lengths]   # no pad 0


def _lengths(name: str) -> list[int]:
    """Prompt lengths where the default engine is transformers' exactly (longrope: past 32)."""
    return LONG_LENGTHS if name == "phi3-longrope" else LENGTHS


def _hf_generate(hf, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens and the logits [n, V] it chose each from."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None,
                          output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits).float()


def _step_logits(prompt: list[int], logits: torch.Tensor):
    """logits_of for assert_same_tokens: generate's logits after prompt + its first k tokens."""
    return lambda ids: logits[len(ids) - len(prompt)]


# -- HF parity --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sequential", "overlap"])
def test_prompt_logits_match_hf_in_chunks(hf_model, layout):
    """A 40-token prompt prefilled in chunks of 16 (earlier chunks' KV read back from pages);
    for phi3-longrope past the original 32 positions, so with the long factors in both."""
    name, path, hf = hf_model
    prompt = _prompts([40])[0]
    llm = LLM(str(path), max_batch_tokens=CHUNK, kv_cache_tokens=1024, layout=layout)
    ours = llm.engine.prompt_logits(prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-4, f"{name} under {layout}: relative error {rel:.2e}"


def test_greedy_tokens_match_hf_with_chunks_and_preemption(hf_model):
    """Four requests through 6 pages of 16 tokens in batches of 16 under "overlap": prompts
    are chunked, requests preempted and recomputed, and every token is still HF's."""
    name, path, hf = hf_model
    llm = LLM(str(path), max_batch_tokens=CHUNK, kv_cache_tokens=96, page_size=16,
              layout="overlap")
    _assert_greedy_is_hf(llm, hf, _prompts(_lengths(name)), name)
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages


def _assert_greedy_is_hf(llm: LLM, hf, prompts: list[list[int]], what: str,
                         preempts: bool = True) -> None:
    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    if preempts:
        assert sum(o.metrics.num_preemptions for o in outputs) > 0, "the pool was not small enough"
    for prompt, out in zip(prompts, outputs):
        want, logits = _hf_generate(hf, prompt, N_NEW)
        assert_same_tokens(out.token_ids, want, prompt=prompt, params=params,
                           logits_of=_step_logits(prompt, logits),
                           what=f"{what}, prompt {len(prompt)}")


# -- longrope: which factors ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    path = tmp_path_factory.mktemp("phi3-longrope")
    return path, _write_hf("phi3-longrope", path)


def test_longrope_short_factors_within_the_original_length(longrope):
    """max_model_len 32: the short factors, transformers' for any sequence of at most 32
    tokens (tokens and logits); the long factors give other logits (the test can fail)."""
    path, hf = longrope
    short = LLM(str(path), max_model_len=ORIGINAL, max_batch_tokens=CHUNK, kv_cache_tokens=1024)
    _assert_greedy_is_hf(short, hf, _prompts(SHORT_LENGTHS), "max_model_len 32",
                         preempts=False)
    prompt = _prompts([ORIGINAL - 1])[0]      # prompt_logits samples one more: 32 in all
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    ours = short.engine.prompt_logits(prompt)
    assert (ours - ref).norm() / ref.norm() < 1e-4
    long = LLM(str(path), max_batch_tokens=CHUNK, kv_cache_tokens=1024).engine.prompt_logits(prompt)
    assert (long - ref).norm() > 1e-2 * ref.norm()


def test_longrope_generation_past_the_original_length(longrope):
    """A 24-token prompt generating 12: once the sequence outgrows 32, transformers' generate
    recomputes it with the long factors, and from then on every step's logits are the default
    engine's (teacher-forced on generate's tokens); before that it used the short ones."""
    path, hf = longrope
    prompt = _prompts([24])[0]
    tokens, ref = _hf_generate(hf, prompt, N_NEW)
    llm = LLM(str(path), max_batch_tokens=CHUNK, kv_cache_tokens=1024, layout="overlap")
    ours = llm.engine.prompt_logits(prompt + tokens[:-1])[len(prompt) - 1:]     # [N_NEW, V]
    past = len(prompt) + torch.arange(N_NEW) > ORIGINAL       # the steps of sequences over 32
    assert past.any() and not past.all()
    rel = (ours[past] - ref[past]).norm() / ref[past].norm()
    assert rel < 1e-4, f"past the original length: relative error {rel:.2e}"
    assert (ours[~past] - ref[~past]).norm() > 1e-2 * ref[~past].norm()


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-phi3"])
def test_race_detector_finds_every_dependency_of_the_new_ops(preset):
    """The overlap plan of a mixed batch (decode tokens beside a split prompt) run in random
    dependency-respecting orders, workspace and KV slots poisoned first, gives the issue-order
    logits: qk_norm's and the partial rope's declared reads and writes are all the planner
    needs."""
    from test_moe import _random_orders_agree

    llm = LLM(preset, layout="overlap", max_batch_tokens=CHUNK, kv_cache_tokens=1024)
    assert _random_orders_agree(llm.engine)


# -- tensor parallel 2 over gloo: Phi-3 (fused qkv and gate_up cut per rank) ---------------------
TP_MODELS = ["phi3-longrope"]      # longrope, partial rotary, tied: all Phi-4-mini has


@pytest.mark.slow
def test_two_gloo_ranks_match_hf_for_phi3(tmp_path):
    models = {name: _write_hf(name, tmp_path / name) for name in TP_MODELS}
    procs = start_ranks(__file__, tmp_path, 2, args=(str(tmp_path),))
    results = join_ranks(procs, WORKER_TIMEOUT_S)
    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    for name, hf in models.items():
        for i, prompt in enumerate(_prompts(_lengths(name))):
            want, logits = _hf_generate(hf, prompt, N_NEW)
            for rank, got in enumerate(results):
                assert_same_tokens(got[name][i], want, prompt=prompt, params=params,
                                   logits_of=_step_logits(prompt, logits),
                                   what=f"{name}: rank {rank}'s tokens of prompt {len(prompt)}")
    assert all(r["race_detector_ok"] for r in results)


def _rank_main(root: str, out_path: str) -> None:
    """One rank: each Phi-3 directory at tp 2 under "overlap" (the all-reduces on their own
    stream), greedy tokens with chunked prefill, then the last plan in random
    dependency-respecting orders (the same seeds on both ranks, so collectives pair up)."""
    from test_moe import _random_orders_agree

    torch.set_num_threads(1)
    result: dict = {}
    for name in TP_MODELS:
        llm = LLM(str(Path(root) / name), max_batch_tokens=CHUNK, kv_cache_tokens=1024,
                  layout="overlap", tensor_parallel_size=2)
        params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
        result[name] = [o.token_ids for o in llm.generate(_prompts(_lengths(name)), params)]
    result["race_detector_ok"] = _random_orders_agree(llm.engine)
    Path(out_path).write_text(json.dumps(result))
    llm.shutdown()


# -- configs, weights, presets ----------------------------------------------------------------
def test_layers_run_qk_norm_and_rotate_part_of_each_head():
    qwen3, phi3 = get_preset("tiny-qwen3"), get_preset("tiny-phi3")
    names = [op.name for op in model_layer_ops(qwen3)]
    assert names[names.index("qkv") + 1] == "qk_norm"
    assert "qk_norm" not in [op.name for op in model_layer_ops(phi3)]
    assert qwen3.head_dim * qwen3.num_heads != qwen3.hidden_size      # explicit head_dim
    assert phi3.rotary_dim == phi3.head_dim * 3 // 4
    rope = next(op for op in model_layer_ops(phi3) if op.name == "rope")
    whole = dataclasses.replace(phi3, partial_rotary_factor=1.0, rope_scaling=None)
    assert rope.work(phi3).flops_per_token == pytest.approx(
        0.75 * rope.work(whole).flops_per_token)


@pytest.mark.parametrize("preset", ["tiny-qwen3", "tiny-phi3", "qwen3-8b", "phi-3-mini"])
def test_config_round_trips_through_the_hf_dict(preset):
    cfg = get_preset(preset)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict(), name=cfg.name) == cfg


def test_longrope_config_as_transformers_reads_it():
    """factor from max_position_embeddings / original (none given), the attention factor from
    it, the legacy "su" name, the top-level original_max_position_embeddings winning."""
    d = _hf_dict("phi3-longrope")
    rs = {k: d["rope_scaling"][k] for k in ("short_factor", "long_factor")}
    d.update(rope_scaling={**rs, "type": "su", "original_max_position_embeddings": 64},
             max_position_embeddings=128, original_max_position_embeddings=32)
    got = ModelConfig.from_hf_dict(d, name="m").rope_scaling
    assert (got.rope_type, got.factor, got.original_max_position_embeddings) == ("longrope", 4.0, 32)
    assert got.attention_factor == pytest.approx((1 + torch.log(torch.tensor(4.0)).item()
                                                  / torch.log(torch.tensor(32.0)).item()) ** 0.5)


@pytest.mark.parametrize("name, change, error, match", [
    ("qwen3-tied", {"attention_bias": True}, UnsupportedModelError, "o_proj bias"),
    ("qwen3-tied", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1},
     UnsupportedModelError, "sliding window on only some layers"),
    ("phi3-longrope", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     UnsupportedModelError, "rope scaling type 'dynamic'"),
    ("phi3-longrope", {"partial_rotary_factor": 0.5}, ModelConfigError,
     "short_factor and long_factor need 8"),
    ("phi3-longrope", {"partial_rotary_factor": 0.3}, ModelConfigError,
     "partial_rotary_factor must be in"),
    ("phi3-window", {"hidden_act": "gelu"}, UnsupportedModelError, "hidden_act 'gelu'"),
    ("phi3-window", {"mlp_bias": True}, UnsupportedModelError, "mlp_bias"),
])
def test_unsupported_configs_are_refused_naming_the_field(name, change, error, match):
    with pytest.raises(error, match=match):
        ModelConfig.from_hf_dict({**_hf_dict(name), **change}, name=name)


@pytest.mark.parametrize("change, match", [
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0] * 16,
                       "long_factor": [2.0] * 16, "original_max_position_embeddings": 64}},
     "longrope"),
])
def test_phi3_options_are_refused_for_llama(change, match):
    d = {**get_preset("tiny-llama").to_hf_dict(), **change}
    with pytest.raises(ModelConfigError, match=match):
        ModelConfig.from_hf_dict(d, name="llama")


def test_a_window_that_cannot_bind_is_dropped():
    d = {**_hf_dict("phi3-window"), "sliding_window": 262144}     # Phi-3.5-mini's
    assert ModelConfig.from_hf_dict(d, name="m").sliding_window is None
    assert ModelConfig.from_hf_dict(_hf_dict("phi3-window"), name="m").sliding_window == 24


@pytest.mark.parametrize("name", ["phi3-window", "qwen3-window"])
def test_loading_a_checkpoint_shard_equals_sharding_the_loaded_model(tmp_path, name):
    """Phi-3's fused qkv_proj and gate_up_proj, Qwen3's q_norm / k_norm: each rank's load is
    its cut of the whole model (tests/test_loader.py)."""
    from test_loader import load_shards_as_shard_weights

    _write_hf(name, tmp_path)
    cfg = ModelConfig.from_pretrained(tmp_path)
    weights = load_shards_as_shard_weights(cfg, tmp_path)
    assert weights["layers.0.qkv"].shape[0] == (cfg.q_size + 2 * cfg.kv_size) // 2


def test_tune_places_qk_norm_with_the_other_ops(tmp_path):
    """The search prices and places the new op from its declaration alone (few trials: the
    brief's full `nanorun tune qwen3-8b --gpu h200` is measured, not run, here)."""
    from nanorun.cli import main

    out = tmp_path / "qwen3.json"
    assert main(["tune", "qwen3-8b", "--gpu", "h200", "--trials", "12", "--out", str(out),
                 "--no-plot", "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert "qk_norm" in doc["ops"]
    assert 0 < doc["predicted"]["percent_of_optimal"] < 100


@pytest.mark.parametrize("preset, params", [("qwen3-8b", 8.19e9), ("qwen3-0.6b", 0.596e9),
                                            ("phi-3-mini", 3.82e9)])
def test_presets_have_the_published_parameter_counts(preset, params):
    assert get_preset(preset).num_params == pytest.approx(params, rel=5e-3)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _rank_main(sys.argv[1], sys.argv[2])
    # The rank's work is done and its results written. Interpreter finalization after this
    # gloo run aborts about one time in four ("terminate called without an active exception",
    # no Python frame left: a native destructor), which is not what this test is about: leave
    # without finalizing. The abort itself is noted for whoever looks at ranks' exit codes.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
