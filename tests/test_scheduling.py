"""Scheduling policies (FCFS, Magnus's HRRN) and output-length predictors.

The scheduler tests drive a Scheduler over a real KVCache with a budget that admits one prompt
per iteration, so the order of admission is the policy's order and nothing else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokens import assert_same_tokens

from nanorun import LLM, Engine, SamplingParams
from nanorun.config import EngineConfig
from nanorun.kv_cache import KVCache
from nanorun.lengths import (BucketedLengthPredictor, LengthPredictor, MaxTokensPredictor,
                             get_length_predictor)
from nanorun.request import Request, RequestStatus
from nanorun.scheduler import Scheduler

PROMPT = 8          # tokens per prompt, and the budget: one prompt a iteration


def _scheduler(policy: str, predictor=None, pages: int = 64) -> Scheduler:
    kv = KVCache(num_layers=1, num_pages=pages, page_size=4, num_kv_heads=1, head_dim=4,
                 dtype=torch.float32, device=torch.device("cpu"))
    return Scheduler(kv, PROMPT, policy, predictor)


def _request(rid: str, max_tokens: int, prompt_len: int = PROMPT) -> Request:
    return Request(rid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), 0.0, ())


def _admitted(out) -> list[str]:
    """Ids of the requests whose first chunk this iteration scheduled."""
    return [c.request.request_id for c in out.chunks if c.start == 0]


def _run(sched: Scheduler, iterations: int, arrivals=None) -> list[str]:
    """Admission order over some iterations; arrivals[i] are added before iteration i. Every
    admitted request is treated as finishing at once, so the budget is free again."""
    order = []
    for i in range(iterations):
        for r in (arrivals or {}).get(i, []):
            sched.add(r)
        out = sched.schedule()
        order += _admitted(out)
        for chunk in out.chunks:
            sched.remove(chunk.request)
    return order


# -- policies -----------------------------------------------------------------------------------
def test_fcfs_admits_in_arrival_order():
    sched = _scheduler("fcfs")
    for rid, n in (("long", 50), ("short", 2), ("mid", 10)):
        sched.add(_request(rid, n))
    assert _run(sched, 3) == ["long", "short", "mid"]


def test_hrrn_runs_an_offline_batch_shortest_first():
    """Requests that arrive together wait alike, so the highest ratio 1 + W/S is the shortest S."""
    sched = _scheduler("hrrn")
    for rid, n in (("long", 50), ("short", 2), ("mid", 10)):
        sched.add(_request(rid, n))
    assert _run(sched, 3) == ["short", "mid", "long"]


def test_hrrn_ratio_is_waiting_plus_service_over_service():
    sched = _scheduler("hrrn")
    r = _request("a", 11, prompt_len=20)          # 3 prompt iterations of 8, then 10 more
    sched.add(r)
    assert sched.predicted_service(r) == 3 + 10
    sched.iteration += 13
    assert sched.response_ratio(r) == pytest.approx((13 + 13) / 13)


def test_hrrn_does_not_starve_a_long_request():
    """A short request arrives every iteration. Shortest-first would never run the long one;
    HRRN runs it once it has waited about S_long / S_short iterations."""
    def arrivals():
        shorts = {i: [_request(f"s{i}", 4)] for i in range(60)}
        shorts[0].insert(0, _request("long", 40))
        return shorts

    order = _run(_scheduler("hrrn"), 60, arrivals())
    assert 8 <= order.index("long") <= 12         # S_long / S_short = 40 / 4 = 10
    assert len(order) == 60
    fcfs = _run(_scheduler("fcfs"), 60, arrivals())
    assert fcfs.index("long") == 0


def test_preempted_requests_go_before_higher_ratios():
    sched = _scheduler("hrrn")
    victim = _request("victim", 100)
    victim.metrics.num_preemptions = 1
    sched.add(_request("short", 1))
    sched.add(victim)
    assert _run(sched, 2) == ["victim", "short"]


def test_hrrn_admission_stops_at_the_first_request_that_does_not_fit():
    """Strict order: the ranked head waits for pages; nothing behind it jumps ahead."""
    sched = _scheduler("hrrn", pages=2)             # 8 tokens of KV
    holder = _request("holder", 100, prompt_len=3)
    holder.output_token_ids.append(5)
    sched.running.append(holder)
    sched.kv.grow(holder, 3)
    holder.num_computed_tokens = 3                  # decoding: will hold one page
    sched.add(big := _request("big", 3, prompt_len=7))     # its 7-token chunk needs 2 pages
    sched.add(_request("late", 50, prompt_len=2))          # would fit in the free page
    sched.iteration += 5
    assert sched.response_ratio(big) > sched.response_ratio(sched.waiting[1])
    out = sched.schedule()
    assert [c.request.request_id for c in out.chunks] == ["holder"]
    assert _admitted(out) == []                     # big (ratio first) does not fit
    assert [r.request_id for r in sched.waiting] == ["big", "late"]


def test_policies_give_the_same_tokens():
    """A policy changes when a request runs, never what it produces: up to a near-tie of the
    logits (tests/tokens.py), since when it runs decides what it is batched with."""
    prompts = [[3 + i] * (5 + 7 * i) for i in range(6)]
    params = [SamplingParams(max_tokens=2 + 5 * (i % 3), temperature=0.0, ignore_eos=True)
              for i in range(6)]
    llms = {policy: LLM("tiny-llama", weights="random", kv_cache_tokens=256,
                        max_batch_tokens=24, scheduling_policy=policy)
            for policy in ("fcfs", "hrrn")}
    outs = {policy: llm.generate(prompts, params) for policy, llm in llms.items()}
    for i, (got, want) in enumerate(zip(outs["hrrn"], outs["fcfs"], strict=True)):
        assert_same_tokens(got.token_ids, want.token_ids, prompt=prompts[i], params=params[i],
                           logits_of=llms["fcfs"].engine.prompt_logits, what=f"prompt {i}")
    assert [len(o.token_ids) for o in outs["hrrn"]] == [p.max_tokens for p in params]


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_policy_says_what_to_use():
    with pytest.raises(ValueError, match="scheduling_policy 'sjf'.*fcfs.*hrrn"):
        EngineConfig(model="tiny-llama", scheduling_policy="sjf")
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        _scheduler("lifo")


class _Broken:
    def __init__(self, value):
        self.value = value

    def predict(self, prompt_token_ids, sampling_params):
        if self.value == "raise":
            raise RuntimeError("model offline")
        return self.value


@pytest.mark.parametrize("value", [0.0, float("nan"), "12", None])
def test_a_bad_prediction_queues_nothing_and_the_engine_serves_on(value):
    engine = Engine("tiny-llama", weights="random", kv_cache_tokens=256,
                    scheduling_policy="hrrn", length_predictor=_Broken(value))
    with pytest.raises(ValueError, match="predicted .* output tokens for request 'x'"):
        engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2))
    assert not engine.has_unfinished_requests()
    engine.scheduler.predictor.value = 3.0
    engine.add_request("x", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


def test_length_predictor_forms():
    assert isinstance(get_length_predictor(None), MaxTokensPredictor)
    assert isinstance(get_length_predictor("max_tokens"), MaxTokensPredictor)
    fitted = get_length_predictor("azure-code")
    assert isinstance(fitted, BucketedLengthPredictor) and fitted.name == "bucketed:azure-code"
    mine = _Broken(5.0)
    assert get_length_predictor(mine) is mine and isinstance(mine, LengthPredictor)
    with pytest.raises(ValueError, match="length predictor 'oracle'.*sharegpt.*unknown trace"):
        get_length_predictor("oracle")
    with pytest.raises(ValueError, match="nothing to learn"):
        get_length_predictor("const:10x10")
    with pytest.raises(TypeError, match="predict"):
        get_length_predictor(42)


# -- the bucketed predictor -----------------------------------------------------------------------
def test_a_request_log_csv_fits_a_predictor(tmp_path):
    log = tmp_path / "my_log.csv"
    rows = [f"XXX,{p},{o}" for p, o in [(10, 5)] * 200 + [(600, 90)] * 200]
    log.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    p = get_length_predictor(str(log))
    assert p.name == "bucketed:my_log"
    assert p.predict([0] * 9, SamplingParams(max_tokens=500)) == 5.0
    assert p.predict([0] * 700, SamplingParams(max_tokens=500)) == 90.0


def test_bucketed_predictor_learns_medians_per_prompt_length():
    rng = np.random.default_rng(0)
    short = rng.integers(1, 5, 300)                     # prompts 1..4 -> about 10 tokens
    long = rng.integers(100, 129, 300)                  # prompts 100..128 -> about 500 tokens
    prompts = np.concatenate([short, long])
    outputs = np.concatenate([rng.integers(8, 13, 300), rng.integers(490, 511, 300)])
    p = BucketedLengthPredictor.fit(prompts, outputs, min_samples=50)
    unlimited = SamplingParams(max_tokens=10_000)
    assert p.predict([0] * 3, unlimited) == pytest.approx(np.median(outputs[prompts == 3]),
                                                          abs=2)
    assert 490 <= p.predict([0] * 120, unlimited) <= 510
    assert 490 <= p.predict([0] * 5000, unlimited) <= 510      # beyond the data: last bucket
    assert p.predict([0] * 120, SamplingParams(max_tokens=7)) == 7.0  # capped at max_tokens


def test_bucketed_predictor_merges_sparse_buckets():
    prompts = np.array([1] * 10 + [3] * 10 + [1000] * 3)
    outputs = np.array([5] * 10 + [7] * 10 + [900] * 3)
    p = BucketedLengthPredictor.fit(prompts, outputs, min_samples=10)
    assert p.upper_bounds == (1, 1024)                 # 3 and 1000: 13 requests, one bucket
    assert p.medians == (5.0, 7.0)
    whole = BucketedLengthPredictor.fit(prompts, outputs, min_samples=1000)
    assert whole.upper_bounds == (1024,) and whole.medians == (7.0,)


@pytest.mark.parametrize("prompts, outputs, match", [
    ([], [], "not empty"),
    ([1, 2], [3], "of one length"),
    ([0, 2], [3, 4], ">= 1"),
])
def test_bucketed_predictor_rejects_bad_data(prompts, outputs, match):
    with pytest.raises(ValueError, match=match):
        BucketedLengthPredictor.fit(prompts, outputs)
    with pytest.raises(ValueError, match="increasing"):
        BucketedLengthPredictor((4, 2), (1.0, 1.0))


# -- bench/scheduling.py ----------------------------------------------------------------------------
def _bench_scheduling():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "scheduling.py"
    spec = importlib.util.spec_from_file_location("bench_scheduling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spearman_ranks_ties_by_their_average():
    spearman = _bench_scheduling().spearman
    assert spearman([1, 2, 3, 4], [10, 20, 30, 99]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1.5, 1.5, 3, 4) against (1, 2, 3, 4): Pearson of the ranks
    assert spearman([7, 7, 8, 9], [1, 2, 3, 4]) == pytest.approx(
        np.corrcoef([1.5, 1.5, 3, 4], [1, 2, 3, 4])[0, 1])


def test_latency_in_steps_is_deterministic_and_hrrn_cuts_the_queue():
    """Long requests first in arrival order and a budget of one prompt per iteration: FCFS
    makes the short ones wait behind the long ones, HRRN with exact lengths does not."""
    from nanorun.benchmark.runner import Workload
    from nanorun.benchmark.traces import Trace

    bench = _bench_scheduling()
    trace = Trace("t", np.array([8] * 6), np.array([30, 30, 2, 2, 2, 2]), None, "test")
    runs = {}
    for policy in ("fcfs", "hrrn"):
        # No prefix cache: the rerun would find the first run's prompts cached.
        engine = Engine("tiny-llama", weights="random", kv_cache_tokens=96, max_batch_tokens=8,
                        scheduling_policy=policy, enable_prefix_caching=False)
        workload = Workload.fit(trace, engine, seed=0)
        arrivals = np.zeros(6, dtype=np.int64)
        runs[policy] = bench.run_in_steps(engine, workload, arrivals)
        again = bench.run_in_steps(engine, workload, arrivals)
        assert {k: v for k, v in again.items() if k != "wall_seconds"} == \
            {k: v for k, v in runs[policy].items() if k != "wall_seconds"}
    for run in runs.values():
        assert 1 <= run["mean_ttft_steps"] <= run["mean_e2el_steps"] <= run["steps"]
        assert run["mean_longest_itl_steps"] >= 1 and run["preemptions"] == 0
    assert runs["hrrn"]["mean_e2el_steps"] < runs["fcfs"]["mean_e2el_steps"]
    assert runs["hrrn"]["mean_ttft_steps"] < runs["fcfs"]["mean_ttft_steps"]


# -- KV reservation by predicted length -----------------------------------------------------------
def _offline(kv_reservation: str, predictor=None, policy: str = "fcfs"):
    """Eight requests at once into a KV cache that holds about three of them whole."""
    engine = Engine("tiny-llama", weights="random", kv_cache_tokens=160, max_batch_tokens=32,
                    scheduling_policy=policy, kv_reservation=kv_reservation,
                    length_predictor=predictor)
    for i in range(8):
        engine.add_request(str(i), [5 + i] * (10 + 3 * i), SamplingParams(
            max_tokens=20 + 4 * i, temperature=0.0, ignore_eos=True))
    outs, preemptions = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.token_ids
                preemptions += out.metrics.num_preemptions
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages
    return outs, preemptions


def test_exact_predictions_reserve_away_every_preemption():
    greedy, preempted = _offline("none")
    assert preempted > 0                             # the workload does run out of pages
    for policy in ("fcfs", "hrrn"):
        reserved, none = _offline("predicted", policy=policy)
        assert none == 0
        assert reserved == greedy                    # and it changes no token


def test_under_predictions_still_serve_everyone():
    """A predictor that says 1 token reserves too little: preemption catches the rest."""
    outs, _ = _offline("predicted", _Broken(1.0))
    assert outs == _offline("none")[0]


def test_unknown_kv_reservation_says_what_to_use():
    with pytest.raises(ValueError, match="kv_reservation 'all'.*none.*predicted"):
        EngineConfig(model="tiny-llama", kv_reservation="all")


def _serve(sched: Scheduler, iterations: int, arrivals) -> dict[str, int]:
    """Run the scheduler as the engine would (every computed chunk that reaches the last token
    samples one); returns the iteration each request was admitted at."""
    admitted = {}
    for t in range(iterations):
        for r in arrivals(t):
            sched.add(r)
        out = sched.schedule()
        for c in out.chunks:
            # (its first chunk: it may start past 0, at a prefix the cache held)
            admitted.setdefault(c.request.request_id, t)
            c.request.num_computed_tokens += c.length
        for c in out.chunks:
            r = c.request
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(7, float(t))
                if r.finished:
                    sched.remove(r)
    return admitted


@pytest.mark.parametrize("policy", ["fcfs", "hrrn"])
def test_a_request_blocked_on_memory_keeps_its_place(policy):
    """Short requests keep arriving; a long one's predicted peak does not fit beside them. Once
    admission stops at it, no re-ranking may put the short ones before it again."""
    kv = KVCache(num_layers=1, num_pages=100, page_size=4, num_kv_heads=1, head_dim=4,
                 dtype=torch.float32, device=torch.device("cpu"))
    sched = Scheduler(kv, 64, policy, None, "predicted")

    def arrivals(t):
        new = [_request(f"s{t}", 40)] if t % 8 == 0 else []
        return new + ([_request("big", 300)] if t == 20 else [])

    admitted = _serve(sched, 400, arrivals)
    assert admitted["big"] < 80


def test_predicted_peak_leaves_out_the_last_tokens_kv():
    sched = _scheduler("hrrn")
    r = _request("a", 5, prompt_len=4)
    sched.add(r)
    assert sched.predicted_peak_tokens(r) == 4 + 5 - 1


def test_generate_queues_nothing_when_a_prediction_is_refused():
    class ShortPromptsOnly:
        def predict(self, prompt_token_ids, sampling_params):
            return 4.0 if len(prompt_token_ids) < 4 else 0.0

    llm = LLM("tiny-llama", weights="random", kv_cache_tokens=256, scheduling_policy="hrrn",
              length_predictor=ShortPromptsOnly())
    with pytest.raises(ValueError, match="prompt 1: .*predicted 0.0"):
        llm.generate([[1, 2, 3], [1, 2, 3, 4]], SamplingParams(max_tokens=4, ignore_eos=True))
    outs = llm.generate([[5, 6]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(outs[0].token_ids) == 3
    assert not llm.engine.requests and not llm.engine.scheduler.waiting


# -- preemption ---------------------------------------------------------------------------------
def test_the_latest_arrival_is_preempted_even_when_scheduled_first():
    """Decode tokens are scheduled before prompt chunks; when the prompt chunk of an earlier
    arrival finds no page, the later arrival gives its pages back, though it was scheduled
    first in this iteration (its chunk is taken out of the batch, its budget given back)."""
    sched = _scheduler("fcfs", pages=4)                  # 16 tokens in pages of 4
    early, late = _request("early", 4, prompt_len=16), _request("late", 8, prompt_len=3)
    sched.add(early)
    sched.add(late)
    sched.waiting.clear()            # as if: early has computed 8 of its prompt, late decodes
    for request, computed in ((early, 8), (late, 3)):
        sched.kv.grow(request, computed)
        request.advance(computed)
        request.status = RequestStatus.RUNNING
        sched.running.append(request)
    late.num_pending = 1
    out = sched.schedule()           # late's decode token first; early's next 7 need 2 pages
    assert [r.request_id for r in out.preempted] == ["late"]
    assert [(c.request.request_id, c.start, c.length) for c in out.chunks] == [("early", 8, 7)]
    assert list(sched.waiting) == [late] and late.pages == [] and late.num_computed_tokens == 0


def test_a_preempted_long_prompt_recomputes_less_than_it_needs():
    """A long prompt that arrives behind 12 short requests in a KV cache too small for all of
    them: it is the latest arrival, so the first victim of their growth. It used to be
    re-admitted as soon as its next chunk fit, to be evicted again part way through its
    prompt (730 tokens computed again for the 327 it needed here). It now comes back only
    when its whole context fits beside what the earlier requests grow by meanwhile."""
    llm = LLM("tiny-llama", max_batch_tokens=32, kv_cache_tokens=352, page_size=16)
    long = [(7 * i) % 200 + 3 for i in range(320)]
    shorts = [[(3 * i + j) % 100 + 5 for j in range(8 + i)] for i in range(12)]
    outs = llm.generate(shorts + [long],
                        [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)] * 12
                        + [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [40] * 12 + [8]
    m = outs[-1].metrics
    needed = len(long) + 8 - 1
    assert m.num_preemptions >= 1                       # the pressure is real
    assert 0 < m.num_recomputed_tokens < needed
    assert sum(o.metrics.num_preemptions for o in outs) < 2 * len(outs)
