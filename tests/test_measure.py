"""Measuring on a device (search/measure.py): the rig's synthetic batches, `nanorun profile`,
calibration by a measured profile, and `tune --measure`. On the CPU here; the same code times
on a GPU with CUDA events and SM partitions (tests marked gpu)."""

from __future__ import annotations

import json

import pytest
import torch

from nanorun.cli import main
from nanorun.layout import overlap, sequential
from nanorun.search import CostModel, IterationMix, Profile, get_device
from nanorun.search.measure import Rig, Timing, measure_layouts, profile, sm_grid
from nanorun.search.evaluate import Predictor

QUICK = Timing(warmup=1, reps=1, rounds=1)
MIX = IterationMix(decode_contexts=(5, 17, 40, 33), prompt_chunks=((0, 9), (16, 11)))


@pytest.fixture(scope="module")
def rig() -> Rig:
    return Rig("tiny-llama", "cpu", max_tokens=64, max_context=128, kv_tokens=2048)


def test_rig_batch_is_the_mix(rig):
    b = rig.batch(MIX)
    assert b.num_tokens == MIX.num_tokens == 24 and b.num_decode_tokens == 4
    # As the engine lays out batches: decode tokens spread among the prompt chunks.
    assert b.seq_starts == (0, 1, 10, 11, 12, 23, 24)
    assert b.positions.tolist() == [4, *range(9), 16, 39, *range(16, 27), 32]
    # Each token's slot is on its own sequence's pages, at its position.
    page = rig.kv.page_size
    for t in range(b.num_tokens):
        s, p = int(b.seq_ids[t]), int(b.positions[t])
        assert int(b.slot_mapping[t]) == int(b.block_tables[s, p // page]) * page + p % page
    assert b.sample_indices.tolist() == [0, 9, 10, 11, 22, 23]
    with pytest.raises(ValueError, match="max_tokens >= 70"):
        rig.batch(IterationMix((3,) * 70, ()))
    with pytest.raises(ValueError, match="max_context >= 200"):
        rig.batch(IterationMix((200,), ()))


def test_overlap_on_a_rig_batch_equals_sequential(rig):
    """The synthetic batches drive the real executor: nano-batched equals sequential there."""
    from nanorun.executor import Executor

    names = tuple(op.name for op in rig.model.layer_ops)
    b = rig.batch(MIX)
    kv = (rig.kv.k.clone(), rig.kv.v.clone())
    out = []
    for layout in (sequential(names, 24), overlap(names, 24, rig.spec)):
        rig.kv.k.copy_(kv[0])
        rig.kv.v.copy_(kv[1])
        out.append(Executor(rig.model, rig.kv, 24, layout, rig.spec).run(b))
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-4)


def test_profile_calibrates_the_cost_model_to_what_it_measured(rig, tmp_path):
    prof = profile(rig, "cpu", tokens=(4, 16), context=32, timing=QUICK, log=lambda _: None)
    assert set(prof.ops) == {op.name for op in rig.model.layer_ops} | {"logits",
                                                                       "attention_prefill"}
    assert prof.ops["attention"].context == 32 and prof.ops["qkv"].sms == (1,)
    assert prof.gemm_tflops > 0 and prof.copy_gbps > 0 and prof.interference is None
    assert "torch" in prof.provenance and "date" in prof.provenance
    path = tmp_path / "cpu.json"
    prof.save(path)
    loaded = Profile.load(path)
    # Calibrated, the model predicts each profiled point exactly as measured.
    cost = CostModel(rig.config, get_device("cpu"), profile=loaded)
    from nanorun.search.costmodel import TokenStats, prefill_context

    decode, prompt = TokenStats(16, 16 * 32), TokenStats(prompt_tokens=4,
                                                         prompt_context=prefill_context(4))
    for entry, op, tokens, stats in (("qkv", "qkv", 16, None), ("gate_up", "gate_up", 4, None),
                                     ("attention", "attention", 16, decode),
                                     ("attention_prefill", "attention", 4, prompt)):
        i = loaded.ops[entry].tokens.index(tokens)
        assert cost.launch(op, tokens, None, stats).seconds == \
            pytest.approx(loaded.ops[entry].seconds[i][0], rel=1e-9)
    # A mixed range is its decode part plus its prompt part, each calibrated by its own entry.
    mixed = TokenStats(16, 16 * 32, 4, prefill_context(4))
    assert cost.launch("attention", 20, None, mixed).seconds == pytest.approx(
        cost.launch("attention", 16, None, decode).seconds
        + cost.launch("attention", 4, None, prompt).seconds, rel=1e-9)


def test_sm_grid_is_granular_and_ends_at_the_whole_device():
    assert sm_grid(132, 8) == (32, 64, 96, 132)
    assert sm_grid(108, 2) == (26, 54, 80, 108)
    assert sm_grid(16, 8) == (8, 16)


def test_measure_layouts_reports_predicted_and_measured_per_mix(rig):
    names = tuple(op.name for op in rig.model.layer_ops)
    full = Rig("tiny-llama", "cpu", max_tokens=64, max_context=128, kv_tokens=2048)
    predictor = Predictor(CostModel(full.config, get_device("cpu")))
    layouts = [sequential(names, 24), overlap(names, 24, full.spec)]
    rows = measure_layouts(predictor, full, layouts, lambda b: [MIX], 1.0, QUICK,
                           log=lambda _: None)
    assert [r["layout"] for r in rows] == ["sequential", "overlap"]
    for r in rows:
        (m,) = r["mixes"]
        assert m["tokens"] == 24 and m["decode_tokens"] == 4
        assert m["measured_ms"] > 0 and m["predicted_ms"] > 0
        assert m["error_percent"] == pytest.approx(100 * (m["predicted_ms"] / m["measured_ms"]
                                                          - 1), abs=0.05)
        assert r["measured_tokens_per_s"] == pytest.approx(24 / (m["measured_ms"] * 1e-3),
                                                           rel=1e-3)


def test_profile_cli_writes_a_profile_tune_can_load(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert main(["profile", "tiny-llama", "--device", "cpu", "--tokens", "4,8",
                 "--context", "16", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["device"] == "cpu" and doc["model"] == "tiny-llama"
    assert doc["provenance"]["command"].startswith("nanorun profile tiny-llama")
    assert str(tmp_path) not in out.read_text()        # no machine paths
    assert main(["plan", "tiny-llama", "--gpu", "cpu", "--profile", str(out),
                 "--batch-tokens", "8", "--decode-context", "16"]) == 0
    assert main(["profile", "tiny-llama", "--device", "cpu", "--tokens", "4,x"]) == 2
    assert "--tokens takes comma-separated integers" in capsys.readouterr().err


def test_profile_cli_times_prompt_chunks_longer_than_the_context(tmp_path):
    """attention_prefill runs a prompt's first max(tokens) positions, past --context."""
    out = tmp_path / "cpu.json"
    assert main(["profile", "tiny-llama", "--device", "cpu", "--tokens", "4,40",
                 "--context", "16", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["ops"]["attention_prefill"]["tokens"] == [4, 40]


def test_tune_measure_keeps_the_measured_winner(tmp_path, capsys):
    out = tmp_path / "tuned.json"
    assert main(["tune", "tiny-llama", "--gpu", "cpu", "--trace", "const:24x8",
                 "--max-batch-tokens", "32", "--trials", "8", "--measure", "3",
                 "--device", "cpu", "--no-plot", "--no-progress", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    m = doc["measured"]
    tuned = [r for r in m["candidates"] if r["layout"] != "sequential"]
    assert 1 <= len(tuned) <= 3 and any(r["layout"] == "sequential" for r in m["candidates"])
    best = max(tuned, key=lambda r: r["measured_tokens_per_s"])
    assert m["tokens_per_s"] == best["measured_tokens_per_s"]
    assert doc["batch_tokens"] == best["batch_tokens"] == 32
    assert m["speedup_vs_sequential"] > 0 and m["percent_of_optimal"] > 0
    assert set(doc["predicted"]) >= {"tokens_per_s", "speedup_vs_sequential"}
    assert "measured winner" in capsys.readouterr().out


def test_profile_pairs_take_partitions_green_contexts_can_make(rig, monkeypatch):
    """On an H100 (132 SMs, groups of 8) the overlapping pair's two partitions must fit the
    16 whole groups the driver splits the device into, or both fall back to plain streams."""
    from types import SimpleNamespace

    from nanorun.backends.partitions import assign_groups
    from nanorun.benchmark.ceilings import Ceilings
    from nanorun.search import measure

    h100 = get_device("h100")
    asked = []

    def time_pair(a, b, context, timing):
        asked.append((a[2], b[2]))
        return {"alone_s": [1.0, 1.0], "together_s": [1.5, 1.5]}

    fake = SimpleNamespace(max_tokens=64, is_cuda=True, device_sms=h100.sm_count, spec=h100,
                           model=rig.model, config=rig.config, dtype=rig.dtype,
                           device=rig.device, partitions_how="green contexts",
                           time_op=lambda *args: 1e-3, time_pair=time_pair)
    monkeypatch.setattr(measure, "measure_ceilings", lambda *_: Ceilings(1.0, "bf16", 8, 1.0))
    monkeypatch.setattr(measure, "environment", lambda _: {})
    profile(fake, "h100", tokens=(16,), sms=(64, 132), log=lambda _: None)
    assert asked and all(a % 8 == 0 and b % 8 == 0 for a, b in asked)
    for a, b in asked:
        assign_groups({"gemm": a, "attn": b}, 8, h100.sm_count // 8)   # raises if they do not fit


def test_measuring_on_cuda_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(RuntimeError, match="use --device cpu"):
        Rig("tiny-llama", "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_profile_times_partitions_and_pairs():
    """On a GPU: fewer SMs never make a large GEMM faster, and the pair is measured."""
    rig = Rig("llama-3-8b", "cuda", num_layers=1, max_tokens=2048, max_context=2048,
              kv_tokens=2048 * 1100)
    prof = profile(rig, rig.spec.name, tokens=(256, 2048), context=1024,
                   pairs=(("gate_up", "attention"),), log=print)
    print("partitions:", rig.partitions_how)
    gemm = prof.ops["gate_up"].seconds[-1]          # 2048 tokens, over the SM grid
    assert gemm[0] > gemm[-1]                       # a quarter of the SMs is slower than all
    (pair,) = prof.pairs
    assert all(t > 0 for t in pair["together_s"]) and prof.interference is not None


def test_calibration_report_on_the_cpu(tmp_path):
    """bench/calibration.py end to end on the CPU: every layout's mixes predicted and measured."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "bench" / "calibration.py"
    prof, out = tmp_path / "cpu.json", tmp_path / "calibration.json"
    assert main(["profile", "tiny-llama", "--device", "cpu", "--tokens", "8,32",
                 "--context", "32", "--out", str(prof)]) == 0
    subprocess.run([sys.executable, str(script), "tiny-llama", "--gpu", "cpu", "--profile",
                    str(prof), "--device", "cpu", "--trace", "const:24x8", "--batch-tokens",
                    "32", "--mixes", "1", "--out", str(out)], check=True)
    doc = json.loads(out.read_text())
    assert [r["layout"] for r in doc["layouts"]] == ["sequential", "overlap"]
    assert doc["profile"] == "cpu.json" and doc["tuned_within_target"] is None
    assert doc["worst_abs_error_percent"] == max(r["max_abs_error_percent"]
                                                 for r in doc["layouts"])
    assert str(tmp_path) not in out.read_text()        # no machine paths


def test_timeline_times_every_launch_of_the_plan(rig):
    names = tuple(op.name for op in rig.model.layer_ops)
    schedule = rig.timeline(overlap(names, 24, rig.spec), MIX, warmup=1)
    launches = schedule.plan.launches
    assert len(schedule.start) == len(schedule.end) == len(launches)
    assert all(0 <= s <= e for s, e in zip(schedule.start, schedule.end))
    assert launches[-1].op == "logits" and schedule.end[-1] == schedule.makespan


def test_plan_measure_draws_the_measured_pipeline(tmp_path, capsys):
    png = tmp_path / "plan.png"
    assert main(["plan", "tiny-llama", "--gpu", "cpu", "--layout", "overlap",
                 "--batch-tokens", "16", "--decode-context", "20", "--measure", "--device",
                 "cpu", "--plot", str(png)]) == 0
    assert "measured on cpu" in capsys.readouterr().out and png.stat().st_size > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_timeline_shows_partitions_running_at_once():
    """On a GPU, "overlap" really overlaps: some attention launch runs while a GEMM of the
    other nano-batch runs. Prints the measured busy time of each partition."""
    rig = Rig("llama-3-8b", "cuda", max_tokens=1024, max_context=1100, kv_tokens=600 * 1100)
    names = tuple(op.name for op in rig.model.layer_ops)
    mix = IterationMix((1024,) * 512, ((0, 512),))
    schedule = rig.timeline(overlap(names, 1024, rig.spec), mix)
    launches = schedule.plan.launches
    per_stream: dict[int, list[int]] = {}
    for i, launch in enumerate(launches):
        per_stream.setdefault(launch.stream, []).append(i)
    for ids in per_stream.values():           # a stream runs its launches in order
        assert all(schedule.end[a] <= schedule.start[b] + 1e-6 for a, b in zip(ids, ids[1:]))
    gemm = [i for i, launch in enumerate(launches) if launch.op in ("qkv", "o_proj", "gate_up")]
    attn = [i for i, launch in enumerate(launches) if launch.op == "attention"]
    overlapped = sum(max(0.0, min(schedule.end[a], schedule.end[g]) -
                         max(schedule.start[a], schedule.start[g])) for a in attn for g in gemm)
    print(f"makespan {schedule.makespan * 1e3:.3f} ms, attention overlapped with GEMMs for "
          f"{overlapped * 1e3:.3f} ms; {rig.partitions_how}")
    assert overlapped > 0
