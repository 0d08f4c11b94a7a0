"""Gemma 2 and Gemma 3 (text) against Hugging Face transformers, which nobody here wrote.

Random-weight tiny models built with transformers' own Gemma2ForCausalLM / Gemma3ForCausalLM
(eager attention, float32) and saved with save_pretrained; nanorun loads the directory. The
configs make every Gemma feature bind: soft-caps small enough that tanh is far from linear,
sliding windows shorter than the prompts, head_dim and query_pre_attn_scalar independent of
hidden / heads, Gemma 3's 2:1 local/global pattern with linear rope scaling on global layers,
norm weights far from zero (so 1 + weight is not 1). Each test first checks, on HF's side, that
the feature changes HF's logits, so the comparison cannot pass with the feature left out.

Compared: prompt logits under "sequential", "overlap" and a random valid layout with chunked
prefill (chunks of 16 positions, shorter than the prompt and than the window), greedy tokens
with preemption against HF's greedy
choice after the same prefix (teacher-forced: HF's argmax at every position; tokens are HF's,
or differ first at a near-tie of HF's logits: tests/tokens.py), and the same at tensor
parallel 2 over gloo (this file started as two ranks, as tests/test_moe.py does); the overlap
plan under the race detector.
Also: the attention kernels' soft-capping against their fp32 reference, and the configs
nanorun refuses, each naming the field to change.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from nanorun import LLM, SamplingParams
from nanorun.models import (ModelConfig, ModelConfigError, UnsupportedModelError, get_preset,
                            model_layer_ops)
from nanorun.ops import (paged_attention, paged_attention_numba, paged_attention_reference,
                         paged_attention_torch)
from ranks import join_ranks, start_ranks
from test_moe import random_layout
from tokens import assert_same_tokens, hf_logits_of

VOCAB = 1024
CHUNK = 16                      # prefill in chunks shorter than the prompts and the windows
WINDOW = 24
PROMPT_LEN = 77                 # > WINDOW: sliding layers drop most of the context
GREEDY_LENGTHS = [1, 5, 30, 60]
N_NEW = 10
GREEDY = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
WORKER_TIMEOUT_S = 180

_COMMON = dict(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_attention_heads=4,
               num_key_value_heads=2, head_dim=40, query_pre_attn_scalar=56, rms_norm_eps=1e-6,
               max_position_embeddings=1024, sliding_window=WINDOW, bos_token_id=2,
               eos_token_id=1, pad_token_id=0, initializer_range=0.1)
# Gemma 2: every other layer local; caps that bind (scores and logits reach several times them).
GEMMA2 = dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], num_hidden_layers=4,
              attn_logit_softcapping=1.5, final_logit_softcapping=2.5, **_COMMON)
# Gemma 3: layers 0, 1 local (rope base 10k), 2 global (rope base 1M, linear scaling 4), x 2.
GEMMA3 = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], num_hidden_layers=6,
              sliding_window_pattern=3, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
              rope_scaling={"rope_type": "linear", "factor": 4.0}, **_COMMON)
FAMILIES = {"gemma2": GEMMA2, "gemma3": GEMMA3}


def _prompts(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # no token 0: HF's generate would take it for padding (pad_token_id=0)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


def _hf_model(hf_dict: dict):
    transformers = pytest.importorskip("transformers")
    d = dict(hf_dict)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():       # HF starts Gemma's norm weights at 0, i.e. a scale of 1 + 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    return model


def _hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _write(name: str, path: Path):
    model = _hf_model(FAMILIES[name])
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def hf_gemma(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, _write(request.param, path)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def hf_reference_logits() -> dict[str, torch.Tensor]:
    prompt = _prompts([PROMPT_LEN])[0]
    return {name: _hf_logits(_hf_model(d), prompt) for name, d in FAMILIES.items()}


# -- the features bind: HF's own logits move when each is taken away ------------------------------
@pytest.mark.parametrize("name, change", [
    ("gemma2", {"attn_logit_softcapping": None}), ("gemma2", {"final_logit_softcapping": None}),
    ("gemma2", {"sliding_window": 4096}), ("gemma3", {"sliding_window": 4096}),
    ("gemma3", {"rope_local_base_freq": 1_000_000.0}), ("gemma3", {"rope_scaling": None}),
])
def test_each_feature_changes_hf_logits(hf_reference_logits, name, change):
    prompt = _prompts([PROMPT_LEN])[0]
    changed = _hf_logits(_hf_model({**FAMILIES[name], **change}), prompt)
    assert _rel(changed, hf_reference_logits[name]) > 1e-2


# -- parity --------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout, chunk", [("sequential", 256), ("sequential", CHUNK),
                                           ("overlap", CHUNK), ("random", CHUNK)])
def test_prompt_logits_match_hf(hf_gemma, layout, chunk):
    name, path, hf = hf_gemma
    prompt = _prompts([PROMPT_LEN])[0]
    if layout == "random":      # every op cut at random points, on random partitions and order
        layout = random_layout(model_layer_ops(_config(FAMILIES[name])), chunk, seed=7)
    llm = LLM(str(path), max_batch_tokens=chunk, kv_cache_tokens=2048, layout=layout)
    ours = llm.engine.prompt_logits(prompt)
    assert _rel(ours, _hf_logits(hf, prompt)) < 1e-5, (name, layout, chunk)


def test_greedy_tokens_match_hf_with_chunks_and_preemption(hf_gemma):
    """A batch whose prompts straddle the window and the page size, decoded past the window
    under "overlap" (sequential's arithmetic is the logits test's), in chunks of 16 tokens
    through a KV pool of 6 pages of 16: requests are preempted and recomputed."""
    name, path, hf = hf_gemma
    prompts = _prompts(GREEDY_LENGTHS)
    llm = LLM(str(path), max_batch_tokens=CHUNK, kv_cache_tokens=96, page_size=16,
              layout="overlap")
    outputs = llm.generate(prompts, GREEDY)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0, "the pool was not small enough"
    for prompt, out in zip(prompts, outputs):
        _assert_hf_greedy(hf, prompt, out.token_ids, f"{name}, prompt {len(prompt)}")


@pytest.mark.parametrize("seed", [1])
def test_race_detector_finds_the_plan_complete(hf_gemma, seed):
    """The plan of a random layout (ops on three streams) for a mixed batch (prompt chunks
    beside decode tokens) run in random orders that respect only its streams and waits, on
    NaN-poisoned buffers, gives the logits of the issue order: every dependency of the Gemma
    ops (the post norms reading o_out / mlp_out and the residual) is declared. Seed 1 puts
    o_proj and post_attn_norm, and down and post_mlp_norm, on different streams: dropping
    "o_out" or "mlp_out" from a post norm's reads fails this test (checked by hand)."""
    from executor_rig import workspace_buffers

    from nanorun.batch import build_batch

    name, path, _ = hf_gemma
    layout = random_layout(model_layer_ops(_config(FAMILIES[name])), CHUNK, seed=seed)
    engine = LLM(str(path), max_batch_tokens=CHUNK, kv_cache_tokens=1024, layout=layout).engine
    for i, prompt in enumerate(_prompts([3, 17, 40, 9])):
        engine.add_request(f"r{i}", prompt, GREEDY)
    for _ in range(4):
        engine.step()
    batch = build_batch(engine.scheduler.schedule().chunks, engine.kv_cache.page_size,
                        engine.device, logits_for_all=True)
    runs = []
    for order in (None, 0, 1, 2):       # issue order, then three random ones
        for buf in workspace_buffers(engine.executor.ws):
            buf.fill_(float("nan"))
        for cache in (engine.kv_cache.k, engine.kv_cache.v):
            cache.view(cache.shape[0], -1, *cache.shape[3:])[:, batch.slot_mapping] = float("nan")
        runs.append(engine.executor.run(batch, order_seed=order))
    assert all(bool(torch.isfinite(r).all()) and torch.equal(r, runs[0]) for r in runs), name


def _assert_hf_greedy(hf, prompt: list[int], tokens: list[int], what: str) -> None:
    """`tokens` are HF's greedy continuation of `prompt`: teacher-forced, HF's argmax at each
    position is our token (what its generate would pick after the same prefix), or the first
    that is not is a near-tie of HF's logits there (tests/tokens.py)."""
    assert len(tokens) == N_NEW
    picks = _hf_logits(hf, prompt + tokens)[len(prompt) - 1:-1].argmax(-1).tolist()
    k = next((i for i, (a, b) in enumerate(zip(tokens, picks)) if a != b), None)
    if k is not None:
        assert_same_tokens(tokens, tokens[:k] + picks[k:k + 1], prompt=prompt, params=GREEDY,
                           logits_of=hf_logits_of(hf), what=what)


# -- on a GPU: bf16 through the CUDA kernels, against HF in fp32 (not run where it was written) -----
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gpu_bf16_logits_are_as_close_to_fp32_as_hf_bf16(tmp_path, name):
    """head_dim 64: Gemma 3's attention runs on nanorun's CUDA kernel with a window per layer;
    Gemma 2's soft-capped attention takes the torch fallback. Our bf16 prompt logits, chunked
    under "overlap", must be as close to HF's fp32 logits as HF's own bf16 run is."""
    import copy

    hf = _hf_model({**FAMILIES[name], "head_dim": 64})
    hf.save_pretrained(tmp_path)
    prompt = _prompts([PROMPT_LEN])[0]

    def hf_logits(dtype):
        with torch.no_grad():
            model = copy.deepcopy(hf).to("cuda", dtype)
            return model(torch.tensor([prompt], device="cuda")).logits[0].float()

    ref, hf_bf16 = hf_logits(torch.float32), hf_logits(torch.bfloat16)
    llm = LLM(str(tmp_path), device="cuda", dtype="bfloat16", layout="overlap",
              max_batch_tokens=CHUNK, kv_cache_tokens=2048)
    ours = llm.engine.prompt_logits(prompt).float()
    print(f"{name}: ours {_rel(ours, ref):.2e}, HF bf16 {_rel(hf_bf16, ref):.2e}")
    assert _rel(ours, ref) <= 2 * _rel(hf_bf16, ref) + 1e-3


# -- tensor parallel 2 over gloo, both families in one pair of processes ---------------------------
@pytest.mark.slow
def test_two_gloo_ranks_match_hf(tmp_path):
    models = {name: _write(name, tmp_path / name) for name in FAMILIES}
    results = join_ranks(start_ranks(__file__, tmp_path, 2, args=(str(tmp_path),)),
                         WORKER_TIMEOUT_S)
    prompts = _prompts(GREEDY_LENGTHS)
    for name, hf in models.items():
        want = _hf_logits(hf, prompts[-1])
        for rank, got in enumerate(results):
            assert _rel(torch.tensor(got[name]["logits"]), want) < 1e-5, (name, rank)
            for prompt, mine in zip(prompts, got[name]["greedy"]):
                _assert_hf_greedy(hf, prompt, mine, f"{name}: rank {rank}, prompt {len(prompt)}")
            assert "mlp_out_allreduce" in got[name]["ops"]


def _rank_main(root: str, out_path: str) -> None:
    torch.set_num_threads(1)
    result = {}
    for name in FAMILIES:
        llm = LLM(str(Path(root) / name), max_batch_tokens=CHUNK, kv_cache_tokens=1024,
                  layout="overlap", tensor_parallel_size=2)
        prompts = _prompts(GREEDY_LENGTHS)
        result[name] = {"greedy": [o.token_ids for o in llm.generate(prompts, GREEDY)],
                        "logits": llm.engine.prompt_logits(prompts[-1]).tolist(),
                        "ops": [op.name for op in llm.engine.model.layer_ops]}
        llm.shutdown()
    Path(out_path).write_text(json.dumps(result))


# -- the kernels' soft-capping against the fp32 reference -----------------------------------------
def _attention_inputs(seed: int = 0):
    """A mixed batch over a paged cache: a 19-token prompt chunk (torch path) beside 3 decode
    tokens (numba path), 5 query heads over 1 kv head, head dim 24, contexts up to 99."""
    g = torch.Generator().manual_seed(seed)
    page, pages, heads, kv_heads, dim = 8, 64, 5, 1, 24
    k_cache = torch.randn(pages, page, kv_heads, dim, generator=g)
    v_cache = torch.randn(pages, page, kv_heads, dim, generator=g)
    block_tables = torch.randperm(pages, generator=g)[:4 * 13].view(4, 13).to(torch.int32)
    seq_ids = torch.tensor([0] * 19 + [1, 2, 3], dtype=torch.int32)
    positions = torch.tensor(list(range(40, 59)) + [98, 3, 60], dtype=torch.int64)
    q = torch.randn(len(seq_ids), heads, dim, generator=g) * 2.0
    return q, k_cache, v_cache, block_tables, seq_ids, positions


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("kernel", [paged_attention, paged_attention_numba, paged_attention_torch])
def test_softcapped_attention_matches_reference(kernel, window):
    q, k, v, tables, seq_ids, positions = _attention_inputs()
    scale, cap = 0.4, 2.0
    want = paged_attention_reference(q, k, v, tables, seq_ids, positions, scale, window, cap)
    uncapped = paged_attention_reference(q, k, v, tables, seq_ids, positions, scale, window)
    assert (want - uncapped).abs().max() > 0.1          # the cap binds
    out = torch.full_like(q, float("nan"))
    kernel(q, k, v, tables, seq_ids, positions, scale, out, window, cap)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_attention_refuses_a_bad_softcap():
    q, k, v, tables, seq_ids, positions = _attention_inputs()
    for bad in (0.0, -1.0, True):
        with pytest.raises(ValueError, match="logit_softcap"):
            paged_attention(q, k, v, tables, seq_ids, positions, 0.5, torch.empty_like(q), None,
                            bad)


# -- Gemma 3 4B-27B: the text model of an image-text checkpoint -----------------------------------
def test_image_text_checkpoint_runs_its_text_model(tmp_path):
    """A Gemma3ForConditionalGeneration directory (its text model under language_model., a
    vision tower beside it) runs as its text model: prompt logits equal HF's image-text
    model's on a text prompt."""
    transformers = pytest.importorskip("transformers")
    text = {k: v for k, v in GEMMA3.items() if k not in ("model_type", "architectures")}
    config = transformers.Gemma3Config(
        text_config=text, mm_tokens_per_image=4,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14))
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.5)
    hf.save_pretrained(tmp_path)
    prompt = _prompts([PROMPT_LEN])[0]
    llm = LLM(str(tmp_path), max_batch_tokens=CHUNK, kv_cache_tokens=2048, layout="overlap")
    assert llm.engine.model_config.architecture == "Gemma3ForCausalLM"
    assert _rel(llm.engine.prompt_logits(prompt), _hf_logits(hf, prompt)) < 1e-5


def test_gemma_3_12b_preset_is_the_published_text_model():
    """google/gemma-3-12b-it's config.json (its text_config leaves heads' head_dim, vocabulary
    and window pattern to transformers' defaults) reads as the gemma-3-12b preset."""
    published = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                 "eos_token_id": [1, 106], "torch_dtype": "bfloat16",
                 "text_config": {"hidden_size": 3840, "intermediate_size": 15360,
                                 "model_type": "gemma3_text", "num_attention_heads": 16,
                                 "num_hidden_layers": 48, "num_key_value_heads": 8,
                                 "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                                 "sliding_window": 1024},
                 "vision_config": {"model_type": "siglip_vision_model"}}
    assert ModelConfig.from_hf_dict(published, name="gemma-3-12b") == get_preset("gemma-3-12b")


# -- a Gemma 2 GGUF file, as llama.cpp's converter writes one -------------------------------------
def test_gemma2_gguf_reads_as_its_directory(tmp_path):
    """The tiny Gemma 2 written as llama.cpp lays it out (norm weights stored as 1 + weight,
    ffn_norm the MLP's input norm, the soft-caps and window as gemma2.* metadata): nanorun
    reads the directory's config and weights back from it. (Gemma 3 runs from a real file in
    tests/test_real_weights.py.) query_pre_attn_scalar is head_dim here: a GGUF does not carry
    it, and llama.cpp takes head_dim for these sizes."""
    from gguf_files import write_gguf

    from nanorun.models import load_weights, resolve_model

    hf = _hf_model({**GEMMA2, "query_pre_attn_scalar": GEMMA2["head_dim"]})
    hf.save_pretrained(tmp_path / "hf")
    want, hf_dir = resolve_model(str(tmp_path / "hf"))
    weights = load_weights(want, hf_dir, dtype=torch.float32, device="cpu")
    path = write_gguf(tmp_path / "gemma2.gguf", "gemma2", _gemma2_metadata(want),
                      _gemma2_tensors(want, weights))
    got, where = resolve_model(str(path))
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(got, name=want.name, rms_norm_eps=want.rms_norm_eps,
                               dtype=want.dtype) == want
    read = load_weights(got, where, dtype=torch.float32, device="cpu")
    assert read.keys() == weights.keys()
    for name, w in weights.items():      # (1 + w) - 1 in fp32: equal up to its rounding
        torch.testing.assert_close(read[name], w, atol=5e-7, rtol=0, msg=name)


def _gemma2_metadata(c: ModelConfig) -> dict:
    a = "gemma2."
    return {a + "block_count": c.num_layers, a + "context_length": c.max_position_embeddings,
            a + "embedding_length": c.hidden_size, a + "feed_forward_length": c.intermediate_size,
            a + "attention.head_count": c.num_heads, a + "attention.head_count_kv": c.num_kv_heads,
            a + "attention.key_length": c.head_dim, a + "attention.value_length": c.head_dim,
            a + "attention.layer_norm_rms_epsilon": c.rms_norm_eps,
            a + "attention.sliding_window": c.sliding_window, a + "rope.freq_base": c.rope_theta,
            a + "attn_logit_softcapping": c.attn_logit_softcapping,
            a + "final_logit_softcapping": c.final_logit_softcapping,
            "tokenizer.ggml.bos_token_id": c.bos_token_id,
            "tokenizer.ggml.eos_token_id": c.eos_token_ids[0]}


def _gemma2_tensors(c: ModelConfig, w: dict) -> dict:
    q, kv, i = c.q_size, c.kv_size, c.intermediate_size
    out = {"token_embd.weight": w["embed"], "output_norm.weight": w["norm"] + 1}
    norms = {"attn_norm": "attn_norm", "post_attention_norm": "post_attn_norm",
             "ffn_norm": "mlp_norm", "post_ffw_norm": "post_mlp_norm"}
    for n in range(c.num_layers):
        p, b = f"layers.{n}.", f"blk.{n}."
        out.update({f"{b}{g}.weight": w[p + ours] + 1 for g, ours in norms.items()})
        qkv, gate_up = w[p + "qkv"], w[p + "gate_up"]
        out.update({b + "attn_q.weight": qkv[:q], b + "attn_k.weight": qkv[q:q + kv],
                    b + "attn_v.weight": qkv[q + kv:], b + "attn_output.weight": w[p + "o_proj"],
                    b + "ffn_gate.weight": gate_up[:i], b + "ffn_up.weight": gate_up[i:],
                    b + "ffn_down.weight": w[p + "down"]})
    return {k: v.numpy().astype("float32") for k, v in out.items()}


# -- configs --------------------------------------------------------------------------------------
def _config(base: dict, **change) -> ModelConfig:
    d = {k: v for k, v in {**base, **change}.items() if k not in ("model_type",)}
    return ModelConfig.from_hf_dict(d, name="m")


def test_config_reads_each_family():
    g2, g3 = _config(GEMMA2), _config(GEMMA3)
    assert g2.layer_types == ("sliding_attention", "full_attention") * 2
    assert [g2.layer_window(i) for i in range(4)] == [WINDOW, None, WINDOW, None]
    assert (g2.attn_logit_softcapping, g2.final_logit_softcapping) == (1.5, 2.5)
    assert g2.tie_word_embeddings and not g2.qk_norm and g2.rope_local_theta is None
    assert g3.layer_types == ("sliding_attention",) * 2 + ("full_attention",) + \
        ("sliding_attention",) * 2 + ("full_attention",)
    assert (g3.rope_theta, g3.rope_local_theta, g3.rope_scaling.factor) == (1e6, 1e4, 4.0)
    assert g3.qk_norm and g3.attn_logit_softcapping is None
    assert _config(GEMMA2, sliding_window_pattern=None, layer_types=["full_attention"] * 4
                   ).layer_window(0) is None


@pytest.mark.parametrize("base, change, field", [
    (GEMMA2, {"hidden_activation": "gelu"}, "hidden_activation"),
    (GEMMA3, {"hidden_activation": "silu"}, "hidden_activation"),
    (GEMMA2, {"attention_bias": True}, "attention_bias"),
    (GEMMA3, {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    (GEMMA3, {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    (GEMMA2, {"sliding_window": None}, "sliding_window"),
    (GEMMA2, {"layer_types": ["sliding_attention"] * 3}, "layer_types"),
    (GEMMA2, {"layer_types": ["chunked_attention"] * 4}, "layer_types"),
    (GEMMA2, {"final_logit_softcapping": -1.0}, "final_logit_softcapping"),
    (GEMMA3, {"rope_parameters": {"sliding_attention": {"rope_type": "linear", "factor": 2.0},
                                  "full_attention": {"rope_type": "default"}}},
     "sliding_attention.rope_type"),
    (GEMMA3, {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
])
def test_config_refusals_name_the_field(base, change, field):
    with pytest.raises((UnsupportedModelError, ModelConfigError), match=field):
        _config(base, **change)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _rank_main(sys.argv[1], sys.argv[2])
