"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) against Hugging Face transformers:
logits and greedy tokens under sequential, overlap and a random valid layout, with chunked
prefill and preemption, and at tensor parallel 2 over gloo; plus their configs, weights, cost
model, search and bench.

The tensor-parallel test starts this file as a script twice, with the environment torchrun would
give each rank, as tests/test_tensor_parallel.py does.

Tokens compared with HF's, or across layouts, come from other arithmetic: they are the
reference's, or differ first at a near-tie of the reference's logits (tests/tokens.py), after
which they are not compared.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from nanorun import LLM, SamplingParams
from nanorun.layout import Layout, OpLayout, Partition
from nanorun.models import (ModelConfig, UnsupportedModelError, build_model, get_preset,
                            model_layer_ops, random_weights)
from nanorun.ops import kv_append, paged_attention
from ranks import join_ranks, start_ranks
from tokens import assert_same_tokens, hf_logits_of

MOE_PRESETS = ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"]
CHUNK = 16                       # < the longest prompts: prefill runs in chunks
GREEDY_LENGTHS = [1, 5, 17, 40]
N_NEW = 12
WORKER_TIMEOUT_S = 180


def _prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]
    return prompts      # no token 0: HF's generate would take it for padding (pad_token_id=0)


def _write_hf(preset: str, path: Path):
    """A random-weight HF model of the preset, saved with save_pretrained; the model."""
    transformers = pytest.importorskip("transformers")
    hf_dict = get_preset(preset).to_hf_dict()
    hf_dict["initializer_range"] = 0.1        # spread logits and router scores: no near-ties
    config = transformers.AutoConfig.for_model(**hf_dict)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, torch_dtype=torch.float32, attn_implementation="eager").eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="module", params=MOE_PRESETS)
def hf_moe(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, _write_hf(request.param, path)


def _hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def random_layout(specs, batch_tokens: int, seed: int) -> Layout:
    """A random valid layout: every op cut into 1-3 nano-batches at random points, on one of
    three partitions at random, issued in a random dependency-respecting order."""
    from test_planner import _random_order

    rng = random.Random(seed)
    parts = tuple(Partition(f"p{i}") for i in range(3))
    ops = []
    for op in specs:
        k = rng.randint(1, 3)
        cuts = sorted(rng.sample(range(1, batch_tokens), k - 1))
        edges = [0, *cuts, batch_tokens]
        ops.append((op.name, OpLayout(tuple(b - a for a, b in zip(edges, edges[1:])),
                                      f"p{rng.randrange(3)}")))
    layout = Layout("random", batch_tokens, parts, tuple(ops))
    return dataclasses.replace(layout, order=_random_order(layout, rng,
                                                           tuple(op.name for op in specs)))


def _layout(kind: str, preset: str, batch_tokens: int):
    if kind != "random":
        return kind
    return random_layout(model_layer_ops(get_preset(preset)), batch_tokens, seed=7)


# -- HF parity --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["sequential", "overlap", "random"])
def test_prompt_logits_match_hf_in_chunks(hf_moe, layout):
    """A 77-token prompt prefilled in chunks of 16 (earlier chunks' KV read back from pages)."""
    preset, path, hf = hf_moe
    llm = LLM(str(path), max_batch_tokens=CHUNK, kv_cache_tokens=2048,
              layout=_layout(layout, preset, CHUNK))
    prompt = _prompts(hf.config.vocab_size, [77])[0]
    ours = llm.engine.prompt_logits(prompt)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-4, f"{preset} under {layout}: relative error {rel:.2e}"


@pytest.mark.parametrize("layout", ["overlap", "random"])
def test_greedy_tokens_match_hf_with_chunks_and_preemption(hf_moe, layout):
    """Four requests through a KV pool of 6 pages of 16 tokens, batches of 16 tokens: prompts
    are chunked and requests preempted and recomputed, and every token is still HF's."""
    preset, path, hf = hf_moe
    llm = LLM(str(path), max_batch_tokens=CHUNK, kv_cache_tokens=96, page_size=16,
              layout=_layout(layout, preset, CHUNK))
    prompts = _prompts(hf.config.vocab_size, GREEDY_LENGTHS)
    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0, "the pool was not small enough"
    for prompt, out in zip(prompts, outputs):
        assert_same_tokens(out.token_ids, _hf_greedy(hf, prompt, N_NEW), prompt=prompt,
                           params=params, logits_of=hf_logits_of(hf),
                           what=f"{preset}, prompt {len(prompt)}")


# -- tensor parallel 2 over gloo, all three families in one pair of processes ---------------------
def test_two_gloo_ranks_match_hf_for_every_family(tmp_path):
    models = {p: _write_hf(p, tmp_path / p) for p in MOE_PRESETS}
    procs = start_ranks(__file__, tmp_path, 2, args=(str(tmp_path),))
    results = join_ranks(procs, WORKER_TIMEOUT_S)
    params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)   # the ranks'
    for preset, hf in models.items():
        prompts = _prompts(hf.config.vocab_size, GREEDY_LENGTHS)
        want_tokens = [_hf_greedy(hf, p, N_NEW) for p in prompts]
        with torch.no_grad():
            want_logits = hf(torch.tensor([prompts[-1]])).logits[0].float()
        for rank, got in enumerate(results):
            assert len(got[preset]["greedy"]) == len(prompts)
            for prompt, mine, want in zip(prompts, got[preset]["greedy"], want_tokens):
                assert_same_tokens(mine, want, prompt=prompt, params=params,
                                   logits_of=hf_logits_of(hf),
                                   what=f"{preset}: rank {rank}'s tokens of prompt {len(prompt)}")
            logits = torch.tensor(got[preset]["logits"])
            rel = (logits - want_logits).norm() / want_logits.norm()
            assert rel < 1e-4, f"{preset}: rank {rank}'s logits, relative error {rel:.2e}"
        assert results[0][preset]["ops"][-1] == "moe_allreduce"
    assert all(r["race_detector_ok"] for r in results)


def _rank_main(root: str, out_path: str) -> None:
    """One rank: each family's HF directory at tp 2 under "overlap" (the all-reduces on their
    own stream), greedy tokens with chunked prefill, prompt logits, and the plan run in random
    dependency-respecting orders (the same seeds on both ranks, so collectives pair up)."""
    torch.set_num_threads(1)
    result: dict = {}
    llm = None
    for preset in MOE_PRESETS:
        llm = LLM(str(Path(root) / preset), max_batch_tokens=CHUNK, kv_cache_tokens=1024,
                  layout="overlap", tensor_parallel_size=2)
        prompts = _prompts(2048, GREEDY_LENGTHS)
        params = SamplingParams(max_tokens=N_NEW, temperature=0.0, ignore_eos=True)
        result[preset] = {"greedy": [o.token_ids for o in llm.generate(prompts, params)],
                          "logits": llm.engine.prompt_logits(prompts[-1]).tolist(),
                          "ops": [op.name for op in llm.engine.model.layer_ops]}
    result["race_detector_ok"] = _random_orders_agree(llm.engine)
    Path(out_path).write_text(json.dumps(result))
    llm.shutdown()


def _random_orders_agree(engine) -> bool:
    from executor_rig import workspace_buffers

    from nanorun.batch import build_batch

    prompts = _prompts(2048, [3, 17, 40, 9])
    for i, prompt in enumerate(prompts):
        engine.add_request(f"race{i}", prompt, SamplingParams(max_tokens=8, temperature=0.0,
                                                              ignore_eos=True))
    for _ in range(4):
        engine.step()
    batch = build_batch(engine.scheduler.schedule().chunks, engine.kv_cache.page_size,
                        engine.device, logits_for_all=True)
    runs = []
    for seed in (None, 0, 1, 2):
        for buf in workspace_buffers(engine.executor.ws):
            buf.fill_(float("nan"))
        for cache in (engine.kv_cache.k, engine.kv_cache.v):
            cache.view(cache.shape[0], -1, *cache.shape[3:])[:, batch.slot_mapping] = float("nan")
        runs.append(engine.executor.run(batch, order_seed=seed))
    engine.abort_request([f"race{i}" for i in range(len(prompts))])
    engine.step()
    return all(bool(torch.isfinite(r).all()) and torch.equal(r, runs[0]) for r in runs)


# -- configs and weights ----------------------------------------------------------------------
def test_parameter_counts_are_total_and_active():
    """NanoFlow's figures: Mixtral 8x7B has 46.7 B parameters, about 12.9 B active per token
    (12.75 B of matmul weights plus the 0.13 B embedding table, which is a gather)."""
    mixtral = get_preset("mixtral-8x7b")
    assert mixtral.num_params == pytest.approx(46.70e9, rel=1e-3)
    assert mixtral.num_active_params_per_token == pytest.approx(12.75e9, rel=1e-3)
    embed = mixtral.vocab_size * mixtral.hidden_size
    assert mixtral.num_active_params_per_token + embed == pytest.approx(12.9e9, rel=0.01)
    assert get_preset("qwen2-57b-a14b").num_params == pytest.approx(57.4e9, rel=1e-2)
    assert get_preset("qwen3-30b-a3b").num_params == pytest.approx(30.5e9, rel=1e-2)


@pytest.mark.parametrize("preset", MOE_PRESETS + ["qwen2-57b-a14b", "qwen3-30b-a3b"])
def test_config_round_trips_through_the_hf_dict(preset):
    cfg = get_preset(preset)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict(), name=cfg.name) == cfg


@pytest.mark.parametrize("preset, change, match", [
    ("tiny-qwen2-moe", {"decoder_sparse_step": 2}, "decoder_sparse_step=2"),
    ("tiny-qwen3-moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("tiny-qwen3-moe", {"attention_bias": True}, "o_proj bias"),
    ("tiny-qwen2-moe", {"shared_expert_intermediate_size": 0}, "without a shared expert"),
    ("tiny-mixtral", {"num_experts_per_tok": 9}, "num_experts_per_tok must be in"),
])
def test_unsupported_moe_configs_are_refused(preset, change, match):
    d = {**get_preset(preset).to_hf_dict(), **change}
    with pytest.raises(UnsupportedModelError if "must be" not in match else ValueError,
                       match=match):
        ModelConfig.from_hf_dict(d, name=preset)


def test_loading_a_checkpoint_shard_equals_sharding_the_loaded_model(tmp_path):
    _write_hf("tiny-qwen2-moe", tmp_path)
    from test_loader import load_shards_as_shard_weights

    load_shards_as_shard_weights(ModelConfig.from_pretrained(tmp_path), tmp_path)


def test_grouped_mm_equals_the_loop_over_experts():
    """torch's grouped_mm (CPU, fp32) and the per-expert loop fallback give the same experts
    output, for a token range that leaves some experts without tokens."""
    cfg = get_preset("tiny-qwen3-moe")
    model = build_model(cfg, random_weights(cfg, dtype=torch.float32, device="cpu"),
                        max_model_len=64, attention_fn=paged_attention, kv_append_fn=kv_append)
    ws = model.new_workspace(8)
    ws.x.normal_()
    model.run_op("router", 0, ws, None, None, 0, 8)
    model.run_op("topk", 0, ws, None, None, 0, 8)
    assert model.grouped_mm
    outs = []
    for grouped in (True, False):
        model.grouped_mm = grouped
        ws.expert_out.fill_(float("nan"))
        model.run_op("experts", 0, ws, None, None, 2, 5)
        outs.append(ws.expert_out[2 * 4:5 * 4].clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    assert torch.isnan(ws.expert_out[:8]).all()      # rows outside [2, 5) untouched


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_memory_estimate_counts_the_moe_workspace(preset):
    """nanorun.memory's workspace bytes are the MoE workspace's buffers (plus the fp32 logits
    and rope tables it adds for every model)."""
    from nanorun import memory

    cfg = get_preset(preset)
    model = build_model(cfg, random_weights(cfg, dtype=torch.float32, device="cpu"),
                        max_model_len=64, attention_fn=paged_attention, kv_append_fn=kv_append)
    ws = model.new_workspace(100)
    buffers = sum(getattr(ws, f.name).nbytes for f in dataclasses.fields(ws))
    est = memory.estimate(cfg, torch.float32, max_batch_tokens=100, kv_tokens=0, max_model_len=64)
    extra = 100 * 4 * cfg.vocab_size + 2 * 64 * (cfg.head_dim // 2) * 4
    assert est.workspace == buffers + extra
    assert est.weights == cfg.num_params * 4
    assert sum(w.numel() for w in model.w.values()) == cfg.num_params    # none tied here


# -- cost model, search, bench ----------------------------------------------------------------
def test_cost_model_prices_routing_imbalance_and_active_parameters():
    from search.costmodel import CostModel, expert_load
    from search.hardware import get_device

    cfg = get_preset("mixtral-8x7b")
    cost = CostModel(cfg, get_device("h200"))
    assert cost.optimal_tokens_per_s() == pytest.approx(
        cost.gemm_rate / (2 * cfg.num_active_params_per_token))
    # 4 tokens x top-2 over 8 experts: the mean says every expert gets one; a multinomial
    # leaves about 8 (1 - (7/8)^8) = 5.25 of them with any.
    touched, _ = expert_load(4, 8, 2)
    assert 4.5 < touched < 6.0
    assert expert_load(2048, 8, 2)[0] == 8.0
    # Decode-sized launches are bound by the weights of the experts they touch.
    one, four = (cost.launch("experts", n, None).seconds for n in (1, 4))
    assert 1.0 < four / one < 4.0
    assert cost.launch("experts", 4, None).memory_share > 0.95


def test_tune_command_on_mixtral_writes_layout_and_gantt(tmp_path):
    from nanorun.cli import main

    out = tmp_path / "mixtral.json"
    assert main(["tune", "mixtral-8x7b", "--gpu", "h200", "--trials", "30", "--out", str(out),
                 "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    ops = {"moe_norm", "router", "topk", "experts", "combine"}
    assert ops <= set(doc["ops"])
    cfg = get_preset("mixtral-8x7b")
    assert doc["predicted"]["optimal_tokens_per_s"] < 989e12 / (2 * cfg.num_active_params_per_token)
    assert 0 < doc["predicted"]["percent_of_optimal"] < 100
    assert out.with_suffix(".png").stat().st_size > 1000


def test_tuned_tiny_moe_layout_runs_and_equals_sequential(tmp_path):
    from nanorun.cli import main

    out = tmp_path / "tiny.json"
    assert main(["tune", "tiny-mixtral", "--gpu", "h100", "--trace", "const:256x64", "--tp", "1",
                 "--trials", "20", "--out", str(out), "--no-plot", "--no-progress"]) == 0
    layout = Layout.load(out)
    prompts = [[1, 2, 3, 4, 5] * 7, [9, 8, 7] * 20, [4] * 3]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    llms = [LLM("tiny-mixtral", layout=lay, max_batch_tokens=layout.batch_tokens)
            for lay in (layout, "sequential")]
    got, want = [[o.token_ids for o in llm.generate(prompts, params)] for llm in llms]
    for prompt, mine, theirs in zip(prompts, got, want, strict=True):
        # nano-batches cut the GEMMs otherwise: up to a near-tie of sequential's logits
        assert_same_tokens(mine, theirs, prompt=prompt, params=params,
                           eos_token_ids=llms[1].engine.eos_token_ids,
                           logits_of=llms[1].engine.prompt_logits)


def test_profile_rig_times_the_moe_ops_on_real_routing():
    """`nanorun profile`'s rig fills the workspace and routes its rows before timing, so the
    expert GEMM it times sees real expert ids (not the random floats of the other buffers)."""
    from search.measure import Rig, Timing

    rig = Rig("tiny-mixtral", "cpu", num_layers=1, max_tokens=16, max_context=32, kv_tokens=512)
    ids = rig.ws.topk[:, 2:]
    assert torch.equal(ids, ids.round()) and 0 <= ids.min() and ids.max() < 8
    for op in ("router", "topk", "experts", "combine"):
        assert rig.time_op(op, 8, context=16, timing=Timing(warmup=1, reps=1, rounds=1)) > 0


def test_bench_runs_a_tiny_moe_preset_on_the_cpu(tmp_path):
    from nanorun.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "tiny-mixtral", "--trace", "sharegpt", "--num-requests", "4",
                 "--filter", "40,8,48", "--layout", "overlap", "--kv-cache-tokens", "4096",
                 "--request-rate", "inf", "--repeats", "1", "--result-json", str(out),
                 "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["nanorun"]["model"] == "tiny-mixtral"
    run = report["runs"][-1]
    assert run["completed"] == 4 and run["failed"] == 0 and run["total_output_tokens"] > 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _rank_main(sys.argv[1], sys.argv[2])
