"""nanorun bench: traces, arrivals, the metric math, and a CPU smoke run through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nanorun import Engine
from nanorun.benchmark import arrivals
from nanorun.benchmark.ceilings import optimal_tokens_per_s
from nanorun.benchmark.environment import git_commit
from nanorun.benchmark.metrics import RequestResult, compute_metrics, parse_goodput
from nanorun.benchmark.runner import Workload, drive, request_result, warm_up
from nanorun.benchmark.traces import (
    NANOFLOW_FILTER, TRACES, LengthFilter, Trace, load_trace, parse_length_filter)
from nanorun.cli import main
from nanorun.outputs import CompletionOutput, RequestMetrics, RequestOutput

# ---- traces ---------------------------------------------------------------------------------

# Rows, and whether the trace has timestamps, as traces/README.md gives them.
SHIPPED = {"azure-code": (8819, True), "azure-conv": (19366, True),
           "sharegpt": (58787, False), "lmsys": (100000, False)}
# NanoFlow's paper: mean prompt / output tokens after its filter (about).
NANOFLOW_MEANS = {"azure-conv": (850, 225), "lmsys": (92, 206), "sharegpt": (224, 318)}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_each_named_trace_loads_whole(name):
    rows, timed = SHIPPED[name]
    trace = load_trace(name)
    assert len(trace) == rows and trace.name == name
    assert (trace.arrivals is not None) == timed
    assert trace.source == TRACES[name].source
    assert ("CC-BY-4.0" if timed else "Apache-2.0") in trace.source
    assert trace.prompt_lens.min() >= 1 and trace.output_lens.min() >= 1
    assert not trace.prompt_lens.flags.writeable


@pytest.mark.parametrize("name", sorted(NANOFLOW_MEANS))
def test_nanoflow_filter_reproduces_the_papers_averages(name):
    trace = load_trace(name, length_filter=NANOFLOW_FILTER)
    full = load_trace(name)
    assert len(trace) < len(full)
    assert trace.prompt_lens.max() <= 3072 and trace.output_lens.max() <= 1024
    assert (trace.prompt_lens + trace.output_lens).max() <= 4096
    prompt, output = NANOFLOW_MEANS[name]
    assert trace.prompt_lens.mean() == pytest.approx(prompt, rel=0.02)
    assert trace.output_lens.mean() == pytest.approx(output, rel=0.02)


def test_filter_counts_match_a_direct_count():
    full = load_trace("azure-code")
    f = LengthFilter(2000, 50, 2020)
    expected = sum(1 for p, o in zip(full.prompt_lens, full.output_lens)
                   if p <= 2000 and o <= 50 and p + o <= 2020)
    assert len(load_trace("azure-code", length_filter=f)) == expected


def test_azure_timestamps_parse_to_seconds():
    trace = load_trace("azure-code")
    # First rows: 18:17:03.9799600 and 18:17:04.0319600 (7 fractional digits).
    assert trace.arrivals[0] == 0.0
    assert trace.arrivals[1] == pytest.approx(0.052, abs=1e-6)
    assert np.all(np.diff(trace.arrivals) >= 0)
    assert 3000 < trace.arrivals[-1] < 3600     # a one-hour trace


def test_window_is_contiguous_seeded_and_rebased():
    full = load_trace("azure-conv", length_filter=NANOFLOW_FILTER)
    a = load_trace("azure-conv", num_requests=50, seed=3, length_filter=NANOFLOW_FILTER)
    again = load_trace("azure-conv", num_requests=50, seed=3, length_filter=NANOFLOW_FILTER)
    other = load_trace("azure-conv", num_requests=50, seed=4, length_filter=NANOFLOW_FILTER)
    assert np.array_equal(a.prompt_lens, again.prompt_lens)
    assert not np.array_equal(a.prompt_lens, other.prompt_lens)
    starts = [s for s in range(len(full) - 49)
              if np.array_equal(full.prompt_lens[s:s + 50], a.prompt_lens)]
    assert starts, "the window is not a contiguous slice of the filtered trace"
    s = starts[0]
    assert np.array_equal(a.output_lens, full.output_lens[s:s + 50])
    assert a.arrivals[0] == 0.0
    np.testing.assert_allclose(a.arrivals, full.arrivals[s:s + 50] - full.arrivals[s])


def test_const_form():
    t = load_trace("const:1024x512", num_requests=5)
    assert len(t) == 5 and set(t.prompt_lens) == {1024} and set(t.output_lens) == {512}
    assert t.arrivals is None and t.name == "const:1024x512"
    assert len(load_trace("const:1024x512", num_requests=2, length_filter=NANOFLOW_FILTER)) == 2
    with pytest.raises(ValueError, match="num_requests"):
        load_trace("const:8x8")
    with pytest.raises(ValueError, match="outside the length filter"):
        load_trace("const:4000x512", num_requests=2, length_filter=NANOFLOW_FILTER)


@pytest.mark.parametrize("spec", ["nope", "azure", "const:", "const:10", "const:0x5",
                                  "const:axb", "missing/file.csv"])
def test_bad_specs_name_the_known_forms(spec):
    with pytest.raises(ValueError) as e:
        load_trace(spec, num_requests=4)
    if not spec.startswith("const:"):
        msg = str(e.value)
        assert all(name in msg for name in TRACES) and "const:PxO" in msg


def test_too_many_requests_and_bad_counts():
    with pytest.raises(ValueError, match="has 6967 requests after the filter"):
        load_trace("azure-code", num_requests=7000, length_filter=NANOFLOW_FILTER)
    with pytest.raises(ValueError, match="no request of trace 'azure-code' is left"):
        load_trace("azure-code", length_filter=LengthFilter(1, 1, 2))
    assert len(load_trace("lmsys", num_requests=np.int64(3))) == 3
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="num_requests"):
            load_trace("lmsys", num_requests=bad)


def write_csv(tmp_path: Path, rows: list[str], header="TIMESTAMP,ContextTokens,GeneratedTokens"):
    path = tmp_path / "my_trace.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return str(path)


def test_csv_path_form(tmp_path):
    path = write_csv(tmp_path, ["2024-01-01 00:00:00.5000000,10,3",
                                "2024-01-01 00:00:02.0000001,20,4",
                                "2024-01-01 00:00:02.2500000,30,5"])
    t = load_trace(path)
    assert t.name == "my_trace" and t.source == "user CSV my_trace.csv"
    assert list(t.prompt_lens) == [10, 20, 30] and list(t.output_lens) == [3, 4, 5]
    np.testing.assert_allclose(t.arrivals, [0.0, 1.5, 1.75], atol=1e-6)
    assert len(load_trace(path, length_filter=LengthFilter(25, 10, 100))) == 2
    untimed = write_csv(tmp_path, ["XXX,10,3", "XXX,20,4"])
    assert load_trace(untimed).arrivals is None


@pytest.mark.parametrize("rows, header, match", [
    (["XXX,10,3", "2024-01-01 00:00:00,20,4"], None, "give every row a time or none"),
    (["2024-01-01 00:00:05,10,3", "2024-01-01 00:00:01,20,4"], None, "line 3: timestamps go"),
    (["XXX,ten,3"], None, "line 2: ContextTokens and GeneratedTokens must be integers"),
    (["XXX,10,0"], None, "at least one token"),
    (["yesterday,10,3"], None, "neither an ISO date-time"),
    ([], None, "holds no requests"),
    (["XXX,10"], "TIMESTAMP,ContextTokens", "missing column"),
])
def test_malformed_csv_says_what_is_wrong(tmp_path, rows, header, match):
    path = write_csv(tmp_path, rows, *([header] if header else []))
    with pytest.raises(ValueError, match=match):
        load_trace(path)


def test_length_filter_forms():
    assert parse_length_filter("nanoflow") == NANOFLOW_FILTER == LengthFilter(3072, 1024, 4096)
    assert parse_length_filter("NONE") is None
    assert parse_length_filter("100,20,110") == LengthFilter(100, 20, 110)
    for bad in ("1,2", "a,b,c", "0,1,1", "nanoflo"):
        with pytest.raises(ValueError, match="nanoflow"):
            parse_length_filter(bad)


def test_trace_validates_its_arrays():
    with pytest.raises(ValueError, match="one length"):
        Trace("t", np.array([1, 2]), np.array([1]), None, "")
    with pytest.raises(ValueError, match="at least one token"):
        Trace("t", np.array([1, 0]), np.array([1, 1]), None, "")


# ---- arrivals -------------------------------------------------------------------------------

def test_poisson_arrivals_are_seeded_and_have_the_asked_mean_rate():
    a = arrivals.gamma_arrivals(20000, 5.0, seed=1)
    assert np.array_equal(a, arrivals.gamma_arrivals(20000, 5.0, seed=1))
    assert not np.array_equal(a, arrivals.gamma_arrivals(20000, 5.0, seed=2))
    assert a[0] == 0.0 and np.all(np.diff(a) >= 0)
    assert arrivals.offered_rate(a) == pytest.approx(5.0, rel=0.03)
    gaps = np.diff(a)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)    # exponential: CV 1


def test_burstiness_keeps_the_rate_and_changes_the_spread():
    gaps = np.diff(arrivals.gamma_arrivals(20000, 2.0, burstiness=0.25, seed=0))
    assert 1 / gaps.mean() == pytest.approx(2.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.08)     # gamma: CV 1/sqrt(k)


def test_offline_and_trace_schedules():
    trace = load_trace("azure-conv", num_requests=10)
    assert np.array_equal(arrivals.schedule(trace, math.inf), np.zeros(10))
    assert arrivals.offered_rate(np.zeros(10)) == math.inf
    assert np.array_equal(arrivals.schedule(trace, "trace"), trace.arrivals)
    with pytest.raises(ValueError, match="no timestamps"):
        arrivals.schedule(load_trace("lmsys", num_requests=3), "trace")


def test_request_rate_forms():
    assert arrivals.parse_request_rate("inf") == math.inf
    assert arrivals.parse_request_rate("Trace") == "trace"
    assert arrivals.parse_request_rate("2.5") == 2.5
    for bad in ("0", "-1", "fast", "nan"):
        with pytest.raises(ValueError, match="requests/s"):
            arrivals.parse_request_rate(bad)
    with pytest.raises(ValueError, match="burstiness"):
        arrivals.gamma_arrivals(3, 1.0, burstiness=0)


# ---- metrics --------------------------------------------------------------------------------

# A: 3 tokens at 0.10, 0.15, 0.25 s after arrival; B: one token at 0.20 s; C failed.
A = RequestResult(10, 3, ttft=0.10, e2el=0.25, itls=(0.05, 0.10))
B = RequestResult(20, 1, ttft=0.20, e2el=0.20)
C = RequestResult(30, 0, error="not added: too long")


def test_metrics_match_hand_computed_values():
    m = compute_metrics([A, B, C], 0.5)
    assert (m["completed"], m["failed"]) == (2, 1)
    assert (m["total_input_tokens"], m["total_output_tokens"]) == (30, 4)
    assert m["request_throughput"] == pytest.approx(4.0)
    assert m["output_throughput"] == pytest.approx(8.0)
    assert m["total_token_throughput"] == pytest.approx(68.0)
    assert m["request_goodput"] is None
    expected = {
        # ttft 100, 200 ms: p99 by linear interpolation = 100 + 0.99 * 100
        "ttft": (150.0, 150.0, 50.0, 199.0),
        # tpot only for A: (250 - 100) / 2
        "tpot": (75.0, 75.0, 0.0, 75.0),
        # itl pooled: 50, 100
        "itl": (75.0, 75.0, 25.0, 99.5),
        "e2el": (225.0, 225.0, 25.0, 249.5),
    }
    for name, (mean, median, std, p99) in expected.items():
        got = [m[f"{s}_{name}_ms"] for s in ("mean", "median", "std", "p99")]
        assert got == pytest.approx([mean, median, std, p99]), name


def test_goodput_counts_requests_meeting_every_objective():
    def goodput(**slos):
        return compute_metrics([A, B, C], 0.5, goodput=slos)["request_goodput"]
    assert goodput(ttft=120) == pytest.approx(2.0)           # A only
    assert goodput(tpot=70) == pytest.approx(2.0)            # B only (one token: TPOT 0)
    assert goodput(ttft=300, tpot=80) == pytest.approx(4.0)  # both
    assert goodput(ttft=150, e2el=240) == pytest.approx(0.0)
    assert parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    for bad in (["ttft"], ["itl:5"], ["ttft:-1"], ["ttft:fast"]):
        with pytest.raises(ValueError, match="NAME:MS"):
            parse_goodput(bad)


def test_metrics_of_nothing_are_none_and_percentile_keys_follow_vllm():
    m = compute_metrics([B, C], 1.0, percentiles=(50, 99.9))
    assert m["mean_tpot_ms"] is None and m["p99.9_tpot_ms"] is None
    assert m["p50_ttft_ms"] == pytest.approx(200.0) and "p99_ttft_ms" not in m
    with pytest.raises(ValueError, match="duration"):
        compute_metrics([A], 0.0)


def test_request_result_checks_the_output_length():
    metrics = RequestMetrics(arrival_time=1.0, first_token_time=1.1, finished_time=1.4,
                             token_times=[1.1, 1.2, 1.4])
    def output(reason: str) -> RequestOutput:
        return RequestOutput("0", None, (5,) * 7, None,
                             [CompletionOutput(0, "", [1, 2, 3], None, None, reason)], True,
                             metrics)

    out = output("length")
    r = request_result(out, 3)
    assert r.success and r.prompt_len == 7 and r.output_len == 3
    assert (r.ttft, r.e2el) == pytest.approx((0.1, 0.4))
    assert r.itls == pytest.approx((0.1, 0.2)) and r.tpot == pytest.approx(0.15)
    assert "expected 4" in request_result(out, 4).error
    stopped = output("stop")
    assert "finish_reason 'stop'" in request_result(stopped, 3).error


def test_optimal_bound():
    assert optimal_tokens_per_s(1.0, 10**6) == pytest.approx(5e5)    # 1e12 / (2 * 1e6)


# ---- the run loop ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    e = Engine("tiny-llama", kv_cache_tokens=4096)
    warm_up(e)
    return e


def workload_of(engine, trace):
    return Workload.fit(trace, engine, seed=0)


def test_drive_runs_every_request_to_its_length(engine):
    trace = load_trace("sharegpt", num_requests=5, length_filter=LengthFilter(48, 9, 64))
    done = drive(engine, workload_of(engine, trace), arrivals.gamma_arrivals(5, 200.0))
    assert [r.output_len for r in done.results] == list(trace.output_lens)
    assert all(r.success for r in done.results) and done.duration > 0
    assert done.engine_steps >= trace.output_lens.max()
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


def test_a_request_that_cannot_be_added_fails_alone(engine, monkeypatch):
    trace = load_trace("const:16x3", num_requests=4)
    real = engine.add_request

    def add(request_id, *args, **kwargs):
        if request_id == "2":
            raise ValueError("rejected for the test")
        return real(request_id, *args, **kwargs)
    monkeypatch.setattr(engine, "add_request", add)
    done = drive(engine, workload_of(engine, trace), np.zeros(4))
    assert [r.success for r in done.results] == [True, True, False, True]
    assert done.results[2].error == "not added: rejected for the test"


def test_a_failing_step_fails_the_requests_in_flight_and_ends_the_run(engine, monkeypatch):
    trace = load_trace("const:16x6", num_requests=4)
    real, calls = engine.step, []

    def step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return real()
    monkeypatch.setattr(engine, "step", step)
    done = drive(engine, workload_of(engine, trace), np.array([0.0, 0.0, 0.0, 60.0]))
    assert [r.success for r in done.results] == [False] * 4
    assert all("engine step failed: RuntimeError: device lost" in r.error
               for r in done.results)
    monkeypatch.undo()
    while engine.has_unfinished_requests():     # the aborted requests come out once more
        engine.step()
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


def test_requests_that_can_never_fit_are_skipped_with_a_warning(engine, caplog):
    trace = Trace("t", np.array([10, 5000, 20]), np.array([2, 10, 3]), None, "test")
    with caplog.at_level("WARNING", logger="nanorun"):
        w = workload_of(engine, trace)
    assert w.num_skipped == 1 and list(w.trace.prompt_lens) == [10, 20]
    assert "skipping 1 of 3 requests" in caplog.text
    with pytest.raises(ValueError, match="every request"):
        workload_of(engine, Trace("t", np.array([5000]), np.array([1]), None, "test"))


# ---- the command ----------------------------------------------------------------------------

SMOKE_TRACE = ("sharegpt", 6, "40,8,48")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One CPU run of the CLI: two layouts, two rates, goodput, JSON and plot."""
    out = tmp_path_factory.mktemp("bench")
    name, n, filt = SMOKE_TRACE
    rc = main(["bench", "tiny-llama", "--trace", name, "--num-requests", str(n), "--filter",
               filt, "--layout", "overlap", "--kv-cache-tokens", "8192",
               "--request-rate", "inf", "100",
               "--goodput", "ttft:60000", "tpot:60000", "--metric-percentiles", "50,99",
               "--result-json", str(out / "r.json"), "--plot", str(out / "r.png"),
               "--repeats", "1", "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "r.json").read_text())


def test_smoke_report_has_vllm_fields_and_nanorun_header(smoke):
    out, report = smoke
    h = report["nanorun"]
    for key in ("device", "driver_version", "cuda_version", "torch_version", "nanorun_version",
                "git_commit", "date", "model", "dtype", "layouts", "trace", "length_filter",
                "gemm_tflops", "copy_gbps", "optimal_tokens_per_s"):
        assert key in h, key
    assert h["device_type"] == "cpu" and h["ceilings_measured_on"] == "cpu"
    assert h["model"] == "tiny-llama" and h["dtype"] == "float32"
    assert h["kv_cache_tokens"] == 8192 and h["num_skipped"] == 0
    assert h["scheduling_policy"] == "fcfs" and h["length_predictor"] is None
    assert h["kv_reservation"] == "none"
    assert h["layouts"] == ["sequential", "overlap"] and h["request_rates"] == ["inf", 100.0]
    assert h["length_filter"] == "prompt <= 40, output <= 8, prompt + output <= 48"
    assert h["gemm_tflops"] > 0 and h["copy_gbps"] > 0
    assert h["optimal_tokens_per_s"] == pytest.approx(
        h["gemm_tflops"] * 1e12 / (2 * h["num_active_params_per_token"]))
    assert (out / "r.png").stat().st_size > 10_000
    assert [(r["nanorun"]["layout"], r["request_rate"]) for r in report["runs"]] == [
        ("sequential", "inf"), ("sequential", 100.0), ("overlap", "inf"), ("overlap", 100.0)]
    for run in report["runs"]:
        for key in ("duration", "completed", "failed", "total_input_tokens",
                    "total_output_tokens", "request_throughput", "request_goodput",
                    "output_throughput", "total_token_throughput"):
            assert isinstance(run[key], (int, float)), key
        for name in ("ttft", "tpot", "itl", "e2el"):
            for stat in ("mean", "median", "std", "p50", "p99"):
                assert run[f"{stat}_{name}_ms"] >= 0
        assert run["request_goodput"] == pytest.approx(run["request_throughput"])


def test_smoke_every_request_produced_its_trace_length(smoke):
    _, report = smoke
    name, n, filt = SMOKE_TRACE
    trace = load_trace(name, num_requests=n, length_filter=parse_length_filter(filt))
    for run in report["runs"]:
        assert run["completed"] == n and run["failed"] == 0
        assert run["errors"] == [""] * n
        assert run["output_lens"] == trace.output_lens.tolist()
        assert run["input_lens"] == trace.prompt_lens.tolist()
        assert run["total_output_tokens"] == int(trace.output_lens.sum())


def test_smoke_ratio_and_percent_of_optimal(smoke):
    _, report = smoke
    h, runs = report["nanorun"], report["runs"]
    for run in runs:
        seq = next(r for r in runs if r["nanorun"]["layout"] == "sequential"
                   and r["request_rate"] == run["request_rate"])
        assert run["nanorun"]["throughput_ratio_to_sequential"] == pytest.approx(
            run["total_token_throughput"] / seq["total_token_throughput"])
        assert run["nanorun"]["percent_of_optimal"] == pytest.approx(
            100 * run["total_token_throughput"] / h["optimal_tokens_per_s"])
    assert runs[0]["nanorun"]["throughput_ratio_to_sequential"] == pytest.approx(1.0)


def test_smoke_report_holds_no_path_of_this_machine(smoke):
    out, report = smoke
    text = json.dumps(report)
    assert str(out) not in text and str(Path(__file__).parents[1]) not in text
    commit, _ = git_commit()
    assert report["nanorun"]["git_commit"] == commit
    assert commit is None or len(commit) == 40


def test_bad_command_lines_fail_with_a_message(capsys):
    assert main(["bench", "--trace", "nope", "--no-progress"]) == 2
    assert "unknown trace 'nope'" in capsys.readouterr().err
    assert main(["bench", "--trace", "lmsys", "--request-rate", "trace", "--no-progress"]) == 2
    assert "no timestamps" in capsys.readouterr().err
    assert main(["bench", "--filter", "1,2", "--no-progress"]) == 2
    assert "nanoflow" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--request-rate", "0"])
    assert "requests/s" in capsys.readouterr().err


def test_one_dense_batch_size_for_every_layout(tmp_path, monkeypatch):
    """--max-batch-tokens unset: the first layout with a size of its own sets it for all, so
    "sequential" runs at the tuned size it is compared with."""
    from nanorun.benchmark.runner import BenchConfig
    from nanorun.config import DEFAULT_MAX_BATCH_TOKENS
    from nanorun.layout import LAYOUT_DIR_ENV, overlap, tuned_layout_path
    from nanorun.models import layer_ops
    from nanorun.search import get_device

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(LAYOUT_DIR_ENV, raising=False)
    ops = tuple(op.name for op in layer_ops(1))
    config = BenchConfig(layouts=("overlap", "auto"))
    assert config.dense_batch_tokens() == DEFAULT_MAX_BATCH_TOKENS      # nothing tuned yet
    path = tuned_layout_path("tiny-llama", "cpu", 96)
    path.parent.mkdir(parents=True)
    overlap(ops, 96, get_device("cpu")).save(path)
    assert config.dense_batch_tokens() == 96
    overlap(ops, 80, get_device("cpu")).save(tmp_path / "mine.json")
    assert BenchConfig(layouts=(str(tmp_path / "mine.json"), "auto")).dense_batch_tokens() == 80
    assert BenchConfig(layouts=("auto",), max_batch_tokens=64).dense_batch_tokens() == 64


def test_bench_engines_take_the_scheduling_policy():
    from nanorun.benchmark.runner import BenchConfig, engine_facts

    engine = BenchConfig(engine_options=dict(
        scheduling_policy="hrrn", length_predictor="azure-code", kv_reservation="predicted",
        kv_cache_tokens=1024)).engine("sequential", 64)
    facts = engine_facts(engine)
    assert facts["scheduling_policy"] == "hrrn" and facts["kv_reservation"] == "predicted"
    assert facts["length_predictor"] == "bucketed:azure-code"
    with pytest.raises(SystemExit):
        main(["bench", "--scheduling-policy", "sjf", "--no-progress"])
    assert main(["bench", "--scheduling-policy", "hrrn", "--length-predictor", "oracle",
                 "--no-progress"]) == 2


def test_command_lines_in_results_hold_no_path_of_this_machine(tmp_path, monkeypatch):
    from nanorun.benchmark.environment import command_line

    monkeypatch.chdir(tmp_path)
    inside, outside = str(tmp_path / "bench" / "x.py"), "/somewhere/else/out.json"
    assert command_line([inside, "--out", outside, "--n", "3", "a b", f"--plot={outside}"]) == \
        "python bench/x.py --out out.json --n 3 'a b' --plot=out.json"


# ---- repeats: interleaved, ceilings once, spread -------------------------------------------

@pytest.fixture(scope="module")
def repeated(tmp_path_factory):
    """Two traces, two layouts, three interleaved passes on the CPU, recording what was built
    and how often the ceilings were measured."""
    from nanorun.benchmark import ceilings, runner
    from nanorun.benchmark.report import build_report

    built, measured = [], []
    real_engine, real_measure = runner.BenchConfig.engine, ceilings.measure

    def engine(self, layout, batch):
        built.append(layout)
        return real_engine(self, layout, batch)

    def measure(*args):
        measured.append(args)
        return real_measure(*args)

    mp = pytest.MonkeyPatch()
    mp.setattr(runner.BenchConfig, "engine", engine)
    mp.setattr(ceilings, "measure", measure)
    try:
        config = runner.BenchConfig(layouts=("overlap",), max_batch_tokens=64,
                                    engine_options={"kv_cache_tokens": 4096}, repeats=3,
                                    show_progress=False,
                                    length_filter=LengthFilter(40, 6, 48))
        ms = runner.run_traces(config, ("const:24x4", "sharegpt"), num_requests=(3, 3))
    finally:
        mp.undo()
    return built, measured, ms, [build_report(m) for m in ms]


def test_repeats_interleave_layouts_and_measure_the_ceilings_once(repeated):
    built, measured, ms, _ = repeated
    # A B A B A B, one engine per (pass, layout) serving both traces; never A A A B B B.
    assert built == ["sequential", "overlap"] * 3
    assert len(measured) == 1
    for m in ms:
        assert [(r.layout, r.repeat) for r in m.runs] == [
            (layout, k) for k in range(3) for layout in ("sequential", "overlap")]
    assert [m.config.trace for m in ms] == ["const:24x4", "sharegpt"]
    assert ms[0].measured is ms[1].measured


def test_repeats_report_spread_and_paired_ratios(repeated):
    _, _, ms, reports = repeated
    for m, report in zip(ms, reports):
        assert report["nanorun"]["repeats"] == 3
        assert [r["nanorun"]["layout"] for r in report["runs"]] == ["sequential", "overlap"]
        seq = [r.metrics["total_token_throughput"] for r in m.runs if r.layout == "sequential"]
        ovl = [r.metrics["total_token_throughput"] for r in m.runs if r.layout == "overlap"]
        for row, passes in zip(report["runs"], (seq, ovl)):
            rep = row["nanorun"]["repeats"]
            assert rep["n"] == 3 and rep["total_token_throughput"]["values"] == passes
            t = rep["total_token_throughput"]
            assert (t["min"], t["median"], t["max"]) == (min(passes), sorted(passes)[1],
                                                          max(passes))
            # The vLLM fields are the median pass's.
            assert row["total_token_throughput"] == sorted(passes)[1]
        ratios = report["runs"][1]["nanorun"]["repeats"]["ratio_to_sequential"]
        assert ratios["values"] == pytest.approx([o / s for o, s in zip(ovl, seq)])
        assert report["runs"][1]["nanorun"]["throughput_ratio_to_sequential"] == \
            pytest.approx(sorted(ratios["values"])[1])
        assert report["runs"][0]["nanorun"]["repeats"]["ratio_to_sequential"]["values"] == [
            1.0] * 3


def test_the_summary_labels_cpu_figures_and_shows_the_spread(repeated):
    from nanorun.benchmark.summary import CPU_LABEL, format_summary

    _, _, _, reports = repeated
    text = format_summary(reports[0])
    assert text.splitlines()[0] == CPU_LABEL
    assert "tok/s min" in text and "vs seq range" in text and "3 passes" in text
    gpu = json.loads(json.dumps(reports[0]))
    gpu["nanorun"]["device_type"] = "cuda"
    assert "CPU FIGURES" not in format_summary(gpu)
    with pytest.raises(ValueError, match="repeats"):
        from nanorun.benchmark.runner import BenchConfig
        BenchConfig(repeats=0)
    assert main(["bench", "--repeats", "0", "--no-progress"]) == 2


# ---- the spread over passes: default, JSON, warning, figure --------------------------------

def test_bench_runs_three_passes_unless_told(monkeypatch):
    from nanorun.benchmark import runner

    asked = []

    def run_benchmark(config):
        asked.append(config.repeats)
        raise ValueError("stop before anything runs")
    monkeypatch.setattr(runner, "run_benchmark", run_benchmark)
    assert main(["bench", "--no-progress"]) == 2
    assert main(["bench", "--repeats", "1", "--no-progress"]) == 2
    assert asked == [3, 1]


@pytest.mark.parametrize("ratios, resolved", [
    ([3.53, 0.79], False),              # issue 25: one pass 3.53x, the next 0.79x
    ([3.53, 0.79, 1.10], False),
    ([1.30, 1.32, 1.31], True),
    ([0.80, 0.82, 0.81], True),         # a resolved loss is resolved too
    ([1.05, 1.10, 1.30], False),        # every pass above 1.0, but the spread (0.25) > 0.10
    ([0.99, 1.00, 1.01], False),        # no difference from sequential is shown
    ([1.31], None),                     # one pass: no spread known
    ([], None),
])
def test_ratio_resolved_is_spread_against_distance_from_one(ratios, resolved):
    from nanorun.benchmark.report import ratio_resolved

    assert ratio_resolved(ratios) is resolved


def _with_passes(m, throughputs: dict) -> object:
    """The measurement m with made-up total_token_throughput, pass by pass, per layout."""
    import copy
    from dataclasses import replace

    runs = []
    for run in m.runs:
        run = copy.copy(run)
        run.metrics = {**run.metrics,
                       "total_token_throughput": throughputs[run.layout][run.repeat]}
        runs.append(run)
    return replace(m, runs=runs)


def test_a_wide_spread_is_warned_in_the_json_summary_and_figure(repeated):
    from nanorun.benchmark.plot import draw_report
    from nanorun.benchmark.report import build_report
    from nanorun.benchmark.summary import format_summary

    _, _, ms, _ = repeated
    report = json.loads(json.dumps(build_report(_with_passes(
        ms[0], {"sequential": [100.0, 100.0, 100.0], "overlap": [353.0, 79.0, 110.0]}))))
    seq, ovl = report["runs"]
    assert seq["nanorun"]["repeats"]["ratio_resolved"] is None
    rep = ovl["nanorun"]["repeats"]
    assert rep["ratio_resolved"] is False
    assert rep["ratio_to_sequential"]["values"] == pytest.approx([3.53, 0.79, 1.10])
    assert ovl["nanorun"]["throughput_ratio_to_sequential"] == pytest.approx(1.10)
    for key in ("total_token_throughput", "mean_ttft_ms", "mean_tpot_ms"):
        assert rep[key]["min"] <= ovl[key] <= rep[key]["max"]
    warning = ("overlap at rate inf: its ratio to sequential ranged 0.79-3.53x over 3 passes, "
               "a spread of 2.74x, wider than the 0.10x its median 1.10x lies from 1.00x: the "
               "difference from sequential is not resolved")
    assert len(report["nanorun"]["warnings"]) == 1
    assert report["nanorun"]["warnings"][0].startswith(warning)
    text = format_summary(report)
    assert f"warning: {warning}" in text and " 1.10x?" in text

    fig = draw_report(report)
    figure_text = " ".join(t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text")))
    assert warning in figure_text and "(0.79-3.53x)" in figure_text
    # A min-max whisker on every bar: from the lowest pass to the highest.
    throughput = fig.axes[0]
    (whiskers,) = [c for c in throughput.containers if type(c).__name__ == "ErrorbarContainer"]
    spans = sorted((float(s[0][1]), float(s[1][1]))
                   for s in whiskers.lines[2][0].get_segments())
    assert [v for span in spans for v in span] == pytest.approx([79.0, 353.0, 100.0, 100.0])


def test_a_tight_spread_is_not_warned_and_one_pass_is(repeated):
    from dataclasses import replace

    from nanorun.benchmark.plot import draw_report
    from nanorun.benchmark.report import build_report
    from nanorun.benchmark.summary import format_summary

    _, _, ms, _ = repeated
    tight = _with_passes(ms[0], {"sequential": [100.0, 101.0, 99.0],
                                 "overlap": [130.0, 133.0, 129.0]})
    report = build_report(tight)
    assert report["nanorun"]["warnings"] == []
    assert report["runs"][1]["nanorun"]["repeats"]["ratio_resolved"] is True
    assert "warning" not in format_summary(report) and "?" not in format_summary(report)
    figure_text = " ".join(t.get_text() for t in draw_report(report).findobj(
        lambda a: hasattr(a, "get_text")))
    assert "warning" not in figure_text and "(1.30-1.32x)" in figure_text

    one = build_report(replace(tight, config=replace(tight.config, repeats=1),
                               runs=[r for r in tight.runs if r.repeat == 0]))
    (warning,) = one["nanorun"]["warnings"]
    assert warning.startswith("only one pass (--repeats 1): the spread over passes is unknown")
    assert all(r["nanorun"]["repeats"]["ratio_resolved"] is None for r in one["runs"])
    assert f"warning: {warning}" in format_summary(one)
    fig = draw_report(one)
    assert warning in " ".join(t.get_text() for t in fig.findobj(
        lambda a: hasattr(a, "get_text")))
    assert not any(type(c).__name__ == "ErrorbarContainer" for c in fig.axes[0].containers)


# ---- --base-url: the HTTP client against a scripted server ----------------------------------

class _ScriptedServer:
    """An OpenAI-style streaming server on loopback (aiohttp.web, in a thread): each completion
    streams max_tokens one-token chunks GAP_S apart, then usage and [DONE]; a prompt whose
    first id is even gets one token too few, and max_tokens 13 an HTTP 400. With
    return_token_ids each chunk carries its token's id (prompt length + position); the usage's
    cached_tokens is the longest prefix the prompt shares with an earlier one (`cached`)."""

    GAP_S = 0.01

    def __init__(self) -> None:
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        self.bodies: list[dict] = []
        self.cached: list[int] = []
        started = threading.Event()
        threading.Thread(target=self._serve, args=(started,), daemon=True).start()
        assert started.wait(10)

    def _serve(self, started) -> None:
        import asyncio

        from aiohttp import web

        async def models(_):
            return web.json_response({"object": "list", "data": [
                {"id": "scripted", "object": "model", "max_model_len": 4096}]})

        async def completions(request):
            body = await request.json()
            self.bodies.append(body)
            if body["max_tokens"] == 13:
                return web.json_response({"error": {"message": "no"}}, status=400)
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            prompt = body["prompt"]
            cached = max((next((k for k, (a, b) in enumerate(zip(prompt, b["prompt"]))
                                if a != b), min(len(prompt), len(b["prompt"])))
                          for b in self.bodies[:-1]), default=0)
            self.cached.append(cached)
            n = body["max_tokens"] - (prompt[0] % 2 == 0)
            for i in range(n):
                await asyncio.sleep(self.GAP_S)
                chunk = {"choices": [{"index": 0, "text": "x", "finish_reason": None}],
                         "usage": None}
                if body.get("return_token_ids"):
                    chunk["choices"][0]["token_ids"] = [len(prompt) + i]
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            usage = {"prompt_tokens": len(prompt), "completion_tokens": n,
                     "prompt_tokens_details": {"cached_tokens": cached}}
            await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
                             f": a comment\n\ndata: [DONE]\n\n".encode())
            return resp

        async def start():
            app = web.Application()
            app.router.add_get("/v1/models", models)
            app.router.add_post("/v1/completions", completions)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(start())
        started.set()
        self.loop.run_forever()


@pytest.fixture(scope="module")
def scripted():
    pytest.importorskip("aiohttp")
    return _ScriptedServer()


def test_base_url_drives_a_server_and_times_its_stream(scripted, tmp_path, capsys):
    from nanorun.benchmark.http_client import HttpBenchConfig, run_http_benchmark

    config = HttpBenchConfig(base_url=f"http://127.0.0.1:{scripted.port}", model="tiny-llama",
                             trace="const:5x6", num_requests=12, request_rates=(math.inf, 50.0))
    scripted.bodies.clear()
    report = run_http_benchmark(config)
    assert report["nanorun"]["served_model"] == "scripted"
    sent = [b for b in scripted.bodies if len(b["prompt"]) == 5]
    assert len(sent) == 24 and all(b["stream"] and b["ignore_eos"] and b["max_tokens"] == 6
                                   and b["temperature"] == 0 and b["model"] == "scripted"
                                   and b["stream_options"] == {"include_usage": True}
                                   for b in sent)
    # The same seeded prompts as the in-process runner draws for this trace.
    trace = load_trace("const:5x6", num_requests=12)
    want = Workload.fit_limits(trace, 4096, Engine("tiny-llama", kv_cache_tokens=64).
                               model_config.vocab_size, 0, "").prompts
    # (All 12 go at once, so they may reach the server in any order.)
    assert sorted(b["prompt"] for b in sent[:12]) == sorted(p.tolist() for p in want)
    for run in report["runs"]:
        short = [w[0] % 2 == 0 for w in want]
        assert 0 < sum(short) < 12
        assert run["failed"] == sum(short) and run["completed"] == 12 - sum(short)
        for err, is_short in zip(run["errors"], short):
            assert ("produced 5 tokens" in err) == is_short and (not err) == (not is_short)
        # Five gaps of ~GAP_S between six chunks per request.
        assert run["mean_itl_ms"] >= 0.9 * scripted.GAP_S * 1e3
        assert run["mean_ttft_ms"] >= 0.9 * scripted.GAP_S * 1e3
        assert run["mean_e2el_ms"] >= 6 * 0.9 * scripted.GAP_S * 1e3
        assert run["total_output_tokens"] == 6 * run["completed"]
    assert report["runs"][0]["request_rate"] == "inf" and report["runs"][1]["request_rate"] == 50


def test_base_url_runs_conversations_on_the_answers_token_ids(scripted):
    """Each turn resends the conversation so far with the answer's ids as the server returned
    them; a conversation whose turn fails sends nothing more; the hit rate is the server's
    cached tokens over the prompt tokens."""
    from nanorun.benchmark.http_client import HttpBenchConfig, run_http_benchmark
    from nanorun.benchmark.workload import Prefixes

    config = HttpBenchConfig(base_url=f"http://127.0.0.1:{scripted.port}", model="tiny-llama",
                             trace="const:5x4", num_requests=12,
                             prefixes=Prefixes(turns=3, think_time=0.005))
    scripted.bodies.clear()
    scripted.cached.clear()
    report = run_http_benchmark(config)
    run = report["runs"][0]
    assert report["nanorun"]["num_conversations"] == 4
    bodies = [(b, c) for b, c in zip(scripted.bodies, scripted.cached)
              if b.get("return_token_ids")]
    firsts = [b for b, _ in bodies if len(b["prompt"]) == 5]
    assert len(firsts) == 4
    for first in firsts:
        turns = [b for b, _ in bodies if b["prompt"][:5] == first["prompt"]]
        if first["prompt"][0] % 2 == 0:     # one token short: the conversation ends there
            assert len(turns) == 1
            continue
        assert [len(b["prompt"]) for b in turns] == [5, 14, 23]
        for before, after in zip(turns, turns[1:]):
            answer = [len(before["prompt"]) + i for i in range(4)]
            assert after["prompt"][:len(before["prompt"]) + 4] == before["prompt"] + answer
    failed = [e for e in run["errors"] if e]
    assert run["completed"] + len(failed) == 12
    assert sum("earlier turn" in e for e in failed) == 2 * sum("produced 3" in e for e in failed)
    done = [(b, c) for b, c in bodies if b["prompt"][0] % 2]
    assert run["total_cached_tokens"] == sum(c for _, c in done) > 0
    assert run["prefix_cache_hit_rate"] == pytest.approx(
        sum(c for _, c in done) / sum(len(b["prompt"]) for b, _ in done))


def test_base_url_cli_writes_vllm_json_and_records_http_errors(scripted, tmp_path, capsys):
    out = tmp_path / "http.json"
    assert main(["bench", "--base-url", f"http://127.0.0.1:{scripted.port}", "--trace",
                 "const:3x13", "--num-requests", "3", "--result-json", str(out)]) == 0
    report = json.loads(out.read_text())
    run = report["runs"][0]
    assert run["completed"] == 0 and run["failed"] == 3
    assert all(e.startswith("HTTP 400") for e in run["errors"])
    for key in ("duration", "request_throughput", "mean_ttft_ms", "p99_itl_ms", "input_lens"):
        assert key in run
    assert "--base-url" in capsys.readouterr().out


def test_sse_events_are_read_whole_however_the_bytes_arrive():
    """The client reads a block at a time: an event split across blocks, CRLF line ends,
    comments and other fields, and a last line without its newline all read as the server
    framed them."""
    import asyncio

    from nanorun.benchmark.http_client import _sse_events

    body = (b'data: {"a": 1}\n\n: a comment\r\n\r\nevent: x\ndata: {"b": "two\\nlines"}\r\n\r\n'
            b"data:[DONE]")

    class Content:          # aiohttp's StreamReader.iter_any, in blocks of `size` bytes
        def __init__(self, size: int) -> None:
            self.size = size

        async def iter_any(self):
            for i in range(0, len(body), self.size):
                yield body[i:i + self.size]

    async def read(size: int) -> list[str]:
        return [data async for _, data in _sse_events(Content(size))]

    for size in (1, 2, 7, len(body)):
        assert asyncio.run(read(size)) == ['{"a": 1}', '{"b": "two\\nlines"}', "[DONE]"]
