"""The search: cost model, simulator over the engine's plans, Optuna tuning, `nanorun tune`."""

from __future__ import annotations

import json
import pytest

from nanorun.layout import Layout
from nanorun.models import get_preset
from nanorun.planner import Launch, Plan
from nanorun.search import (CostModel, IterationMix, Predictor, Profile, Workload,
                            estimate_iteration, get_device)
from nanorun.search.costmodel import LaunchCost, TokenStats
from nanorun.search.simulate import simulate
from nanorun.search.tune import SearchSpace, Tuner, exhaustive, tune

H100 = get_device("h100")
LLAMA3_8B = get_preset("llama-3-8b")


def _cost(**kw) -> CostModel:
    return CostModel(LLAMA3_8B, H100, **kw)


# -- cost model ---------------------------------------------------------------------------------
def test_gemm_cost_grows_with_tokens_and_shrinks_with_sms():
    c = _cost()
    times = [c.launch("gate_up", n, None).seconds for n in (16, 256, 1024, 4096)]
    assert times == sorted(times)
    assert c.launch("gate_up", 4096, 32).seconds > 3 * c.launch("gate_up", 4096, 132).seconds
    # A large GEMM is compute-bound: within 30 % of flops / (peak x efficiency).
    flops = 2 * 4096 * LLAMA3_8B.hidden_size * 2 * LLAMA3_8B.intermediate_size
    ideal = flops / (H100.bf16_tflops * 1e12 * c.params.gemm_efficiency)
    assert ideal < c.launch("gate_up", 4096, None).seconds < 1.3 * ideal


def test_decode_attention_is_bandwidth_bound_and_keeps_bandwidth_on_few_sms():
    c = _cost()
    stats = TokenStats(decode_tokens=256, decode_context=256 * 2048)
    whole = c.launch("attention", 256, None, stats)
    kv_bytes = 256 * 2048 * 2 * LLAMA3_8B.kv_size * 2
    assert whole.seconds == pytest.approx(kv_bytes / c.bandwidth, rel=0.05)
    assert whole.memory_share > 0.99 and whole.demand > 0.9   # launch overhead aside
    # Half the SMs keep most of the bandwidth; a quarter of the SMs keep well over a quarter.
    assert c.launch("attention", 256, 64, stats).seconds < 1.15 * whole.seconds
    assert c.launch("attention", 256, 32, stats).seconds < 2.0 * whole.seconds


def test_unknown_op_and_bad_tp_are_clear_errors():
    with pytest.raises(ValueError, match="no formula for op 'mystery'"):
        _cost().launch("mystery", 8, None)
    with pytest.raises(ValueError, match="tp=3 does not divide"):
        _cost(tp=3)


def test_profile_calibrates_each_op_by_its_measured_factor():
    base = _cost()
    grid = (64, 1024)
    measured = {"qkv": [[2 * base.launch("qkv", n, s).seconds for s in (64, 132)] for n in grid]}
    profile = Profile.from_dict({"version": 1, "device": "h100", "model": "llama-3-8b", "tp": 1,
                                 "interference": 0.2, "ops": {
                                     "qkv": {"tokens": list(grid), "sms": [64, 132],
                                             "seconds": measured["qkv"]}}})
    calibrated = _cost(profile=profile)
    for n, s in ((64, 64), (300, 100), (1024, 132), (8000, 132)):   # inside and beyond the grid
        assert calibrated.launch("qkv", n, s).seconds == pytest.approx(
            2 * base.launch("qkv", n, s).seconds, rel=1e-9)
    assert calibrated.launch("down", 300, 100).seconds == base.launch("down", 300, 100).seconds
    assert calibrated.params.interference == 0.2
    with pytest.raises(ValueError, match="measured on 'h100', not 'a100'"):
        CostModel(LLAMA3_8B, get_device("a100"), profile=profile)


# -- simulator ----------------------------------------------------------------------------------
def _plan(*launches) -> Plan:
    return Plan(tuple(Launch("op", 0, 0, 0, 1, s, w) for s, w in launches), 2)


def test_simulator_streams_overlap_and_respect_waits():
    cost = [LaunchCost(1.0, 0.0, 0.0), LaunchCost(2.0, 0.0, 0.0), LaunchCost(1.0, 0.0, 0.0)]
    free = simulate(_plan((0, ()), (1, ()), (0, ())), cost)
    assert free.makespan == pytest.approx(2.0)
    waited = simulate(_plan((0, ()), (1, ()), (0, (1,))), cost)
    assert waited.start[2] == pytest.approx(2.0) and waited.makespan == pytest.approx(3.0)


def test_simulator_shares_bandwidth_between_concurrent_launches():
    both_memory = [LaunchCost(1.0, 1.0, 1.0), LaunchCost(1.0, 1.0, 1.0)]
    assert simulate(_plan((0, ()), (1, ())), both_memory).makespan == pytest.approx(2.0)
    interference = simulate(_plan((0, ()), (1, ())), [LaunchCost(1.0, 0.0, 0.1)] * 2, 0.1)
    assert interference.makespan == pytest.approx(1.1)


def test_sequential_prediction_is_the_sum_of_its_launches():
    p = Predictor(_cost())
    mix = IterationMix((1000,) * 64, ((0, 192),))
    schedule = p.schedule(p.resolve("sequential", mix.num_tokens), mix)
    assert schedule.plan.num_streams == 1
    assert schedule.makespan == pytest.approx(sum(e - s for s, e in zip(schedule.start,
                                                                        schedule.end)))


def test_estimate_iteration():
    decode = estimate_iteration("llama-3-8b", "h100", decode_seqs=256, decode_context=2048)
    longer = estimate_iteration("llama-3-8b", "h100", decode_seqs=256, decode_context=4096)
    assert 0 < decode < longer
    mixed = estimate_iteration("llama-3-8b", "h100", prefill_tokens=512, decode_seqs=512,
                               decode_context=1024, layout="overlap")
    assert mixed > 0
    with pytest.raises(ValueError, match="decode_context"):
        estimate_iteration("llama-3-8b", "h100", decode_seqs=4)
    with pytest.raises(ValueError, match="give a batch"):
        estimate_iteration("llama-3-8b", "h100")


# -- workload -----------------------------------------------------------------------------------
def test_workload_steady_state():
    w = Workload.from_lengths("const", [1024] * 4, [512] * 4)
    assert w.decode_share == pytest.approx(511 / 1535)
    assert w.decode_context == pytest.approx(1024 + 512 / 2)   # mean of 1025 .. 1535
    mix = w.mix(1024)
    assert mix.num_tokens == 1024 and len(mix.decode_contexts) == w.decode_seqs(1024)
    batch = mix.batch()
    assert batch.seq_starts[-1] == 1024 and batch.is_decode.sum() == len(mix.decode_contexts)
    import numpy as np
    sampled = w.sample_mix(1024, np.random.default_rng(0))
    assert sampled.num_tokens == 1024


# -- the search ---------------------------------------------------------------------------------
def _tuner(model="llama-3-8b", gpu="h100") -> Tuner:
    config = get_preset(model)
    return Tuner(Predictor(CostModel(config, get_device(gpu))),
                 Workload.from_lengths("const", [1024] * 4, [512] * 4), num_mixes=2)


def _small_space(t: Tuner) -> SearchSpace:
    return SearchSpace(batch_tokens=(512, 1024), gemm_splits=(1, 2, 4), attn_splits=(1, 2),
                       gemm_sms=(64, 96, 112), balance=("tokens", "cost"), skew=(0.0, 2.0))


def test_tpe_finds_a_layout_within_3_percent_of_the_exhaustive_optimum():
    t = _tuner()
    space = _small_space(t)
    best = exhaustive(t, space)
    found = tune(t, trials=60, seed=0, space=space)
    assert found.tokens_per_s >= 0.97 * best.tokens_per_s, (found.predicted(), best.predicted())
    assert found.layout.batch_tokens in space.batch_tokens
    assert found.speedup_vs_sequential >= 1.0 - 1e-9   # sequential is inside the space


def test_search_is_reproducible_and_resumes_from_sqlite(tmp_path):
    t = _tuner()
    space = _small_space(t)
    a = tune(t, trials=15, seed=3, space=space)
    b = tune(t, trials=15, seed=3, space=space)
    assert a.layout == b.layout and a.tokens_per_s == b.tokens_per_s
    url = f"sqlite:///{tmp_path / 'study.db'}"
    tune(t, trials=8, seed=1, space=space, storage=url, study_name="s")
    resumed = tune(t, trials=12, seed=1, space=space, storage=url, study_name="s")
    assert resumed.trials == 12


def test_multi_objective_returns_a_pareto_front():
    t = _tuner()
    r = tune(t, trials=30, seed=0, space=_small_space(t), multi_objective=True)
    front = r.pareto
    assert front
    for p in front:   # no point of the front dominates another
        assert not any(q["tokens_per_s"] > p["tokens_per_s"] and
                       q["iteration_ms"] < p["iteration_ms"] for q in front)


def test_batch_size_is_capped_by_kv_memory():
    t = _tuner()
    top = t.max_batch_tokens()
    per_token = LLAMA3_8B.kv_bytes_per_token(2)
    free = H100.memory_gib * 2**30 * 0.9 - LLAMA3_8B.num_params * 2
    assert t.workload.kv_tokens(top) * per_token <= free < t.workload.kv_tokens(top + 64) * per_token


# -- the command --------------------------------------------------------------------------------
def test_tune_command_writes_a_layout_the_engine_runs(tmp_path, monkeypatch):
    """`nanorun tune` on the CPU spec for a tiny model: the JSON has the layout, predictions and
    provenance (no machine paths); the engine runs it and gives sequential's tokens."""
    from nanorun import LLM, SamplingParams
    from nanorun.cli import main

    out = tmp_path / "tiny.json"
    assert main(["tune", "tiny-llama", "--gpu", "h100", "--trace", "const:256x64",
                 "--trials", "25", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads(out.read_text())
    assert {"tokens_per_s", "percent_of_optimal", "speedup_vs_sequential"} <= set(doc["predicted"])
    assert doc["provenance"]["model"] == "tiny-llama" and doc["provenance"]["trials"] == 25
    assert str(tmp_path) not in out.read_text()
    assert out.with_suffix(".png").stat().st_size > 1000
    layout = Layout.load(out)   # its SM counts are for the H100; the CPU backend ignores them
    prompts = [[1, 2, 3, 4, 5] * 7, [9, 8, 7] * 20, [4] * 3]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    got, want = [
        [o.token_ids for o in LLM("tiny-llama", layout=lay, weights="random", seed=0,
                                  max_batch_tokens=layout.batch_tokens).generate(prompts, params)]
        for lay in (layout, "sequential")]
    assert got == want


def test_plan_command_prints_and_draws(tmp_path, capsys):
    from nanorun.cli import main

    png = tmp_path / "g.png"
    assert main(["plan", "llama-3-8b", "--layout", "overlap", "--batch-tokens", "1024",
                 "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "predicted iteration" in text and "attn" in text
    assert png.stat().st_size > 1000


def test_tensor_parallel_search_has_network_ops_and_sequential_in_its_space():
    """At tp 4 the plans carry the all-reduces, a network partition is a choice (not forced),
    so the best layout is never predicted slower than sequential."""
    t = Tuner(Predictor(CostModel(get_preset("llama-3-70b"), H100, tp=4)),
              Workload.from_lengths("const", [1024] * 4, [512] * 4), num_mixes=1)
    assert None in t.space().net_sms
    space = SearchSpace(batch_tokens=(1024,), gemm_splits=(1, 2), attn_splits=(1,),
                        attn_partition=(False, True), gemm_sms=(96,), net_sms=(None, 8),
                        balance=("tokens",), skew=(0.0,), pipeline=(False,))
    best = exhaustive(t, space)
    assert best.speedup_vs_sequential >= 1.0 - 1e-9
    plan = t.predictor.schedule(t.layout(next(iter(space.candidates()))),
                                t.mixes(1024)[0]).plan
    assert {"attn_allreduce", "mlp_allreduce"} <= {launch.op for launch in plan.launches}


def test_tune_finds_the_pipelined_layouts_the_model_favours():
    """Throughput is dominated by the batch size, so a search started anywhere spent its trials
    on large sequential-like points and returned sequential, while the model predicts
    NanoFlow's pipeline 1.1x faster at the same batch. Seeded with that shape, 60 trials find
    it (llama-3-8b, h100, const:1024x512)."""
    t = Tuner(Predictor(_cost()), Workload.from_trace("const:1024x512"))
    result = tune(t, trials=60, seed=0)
    assert result.speedup_vs_sequential > 1.1
    names = [p.name for p in result.layout.partitions]
    assert names == ["gemm", "attn"]
    assert any(len(entry) > 2 and entry[2] for entry in result.layout.order)   # pipelined
