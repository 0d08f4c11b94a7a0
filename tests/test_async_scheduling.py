"""Async scheduling (issue 14): Engine(async_scheduling=True) launches iteration i + 1 before
it reads back iteration i, and must give the tokens of the synchronous engine: greedy and
seeded sampling, stop ids and EOS seen one iteration late, max_tokens, aborts, preemption on
a tiny KV cache, logprobs, penalties, both layouts, and the executor's stream and graph paths
(SimulatedStreams: random interleavings of the streams). Then the overlap itself, with
stand-ins for the host's and the device's work.

Where every request runs to max_tokens, both engines run the same batches, so the same
arithmetic: exactly equal. A request that stops or is aborted runs one iteration more in the
async engine (its token dropped), so its batch-mates' batches, and arithmetic, differ there:
their tokens are the synchronous engine's, or differ first at a near-tie of the logits
(tests/tokens.py), after which neither their tokens nor their finish reason are compared."""

from __future__ import annotations

import statistics
import time

import pytest
import torch
from tokens import assert_same_tokens

from nanorun import LLM, Engine, SamplingParams
from nanorun.backends import SimulatedStreams
from nanorun.backends.graphs import IterationGraphs

MODEL = "tiny-llama"
LAYOUTS = ("sequential", "overlap")


def _engine(async_scheduling: bool, layout: str = "sequential", **kw) -> Engine:
    kw = {"max_batch_tokens": 48, **kw}
    return Engine(MODEL, weights="random", layout=layout, async_scheduling=async_scheduling,
                  **kw)


def _params(i: int, **kw) -> SamplingParams:
    """Request i's: greedy and seeded sampling alternate; lengths differ."""
    how = dict(temperature=0.0) if i % 2 else dict(temperature=0.9, top_p=0.9, seed=100 + i)
    return SamplingParams(**{"max_tokens": 4 + 3 * (i % 5), "ignore_eos": True, **how, **kw})


def _prompt(i: int) -> list[int]:
    return [(7 * i + j) % 200 + 1 for j in range(3 + 5 * (i % 4))]


def _serve(engine: Engine, requests, abort_at: dict[str, int] | None = None) -> dict:
    """Run every (id, prompt, params[, eos]) to the end; abort a request once an output shows
    abort_at[id] tokens. Returns id -> (token ids, finish reason, logprobs, prompt logprobs)."""
    for rid, prompt, sp, *eos in requests:
        engine.enqueue(engine.new_request(rid, prompt, sp,
                                          eos_token_ids=eos[0] if eos else None))
    done, aborts, preempted = {}, dict(abort_at or {}), 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            if out.finished:
                done[out.request_id] = (c.token_ids, c.finish_reason, c.logprobs,
                                        out.prompt_logprobs)
                preempted += out.metrics.num_preemptions
            elif out.request_id in aborts and len(c.token_ids) >= aborts[out.request_id]:
                del aborts[out.request_id]
                engine.abort_request(out.request_id)
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages, "KV pages leaked"
    assert all(r.num_pending == 0 for r in engine.requests.values())
    engine.shutdown()
    return done, preempted


def _both(requests, abort_at=None, setup=None, **kw):
    """The same requests through a synchronous and an async engine."""
    results = []
    for mode in (False, True):
        engine = _engine(mode, **kw)
        if setup is not None:
            setup(engine)
        results.append(_serve(engine, requests, abort_at))
    return results


def _assert_same(fast: dict, sync: dict, requests) -> None:
    """The async engine's tokens and finish reasons are the synchronous one's, up to a
    near-tie (see the module docstring)."""
    assert fast.keys() == sync.keys()
    reference = _engine(False, kv_cache_tokens=1024)
    for rid, prompt, sp, *eos in requests:
        if assert_same_tokens(fast[rid][0], sync[rid][0], prompt=prompt, params=sp,
                              eos_token_ids=eos[0] if eos else reference.eos_token_ids,
                              logits_of=reference.prompt_logits, what=rid) is None:
            assert fast[rid][1] == sync[rid][1], rid


def _stop_ids(n: int) -> dict[int, int]:
    """Request i's third greedy token (an unignored sync run): a stop id the request meets."""
    done, _ = _serve(_engine(False), [(str(i), _prompt(i), _params(i)) for i in range(n)])
    return {i: done[str(i)][0][2] for i in range(n)}


@pytest.fixture(scope="module")
def stops():
    return _stop_ids(10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_tokens_with_stop_ids_eos_and_max_tokens(layout, stops):
    requests = []
    for i in range(10):
        if i % 3 == 0:      # a stop id, seen one iteration late
            requests.append((str(i), _prompt(i), _params(i, stop_token_ids=[stops[i]])))
        elif i % 3 == 1:    # EOS (the request's own), likewise
            requests.append((str(i), _prompt(i), _params(i, ignore_eos=False), (stops[i],)))
        else:               # max_tokens: known ahead, never overrun
            requests.append((str(i), _prompt(i), _params(i)))
    (sync, _), (fast, _) = _both(requests, layout=layout)
    _assert_same(fast, sync, requests)
    reasons = {r[1] for r in sync.values()}
    assert reasons == {"stop", "length"}, reasons


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_tokens_under_preemption(layout, stops):
    requests = [(str(i), _prompt(i), _params(i, max_tokens=12 + i,
                                             stop_token_ids=[stops[i]] if i % 4 == 0 else []))
                for i in range(10)]
    (sync, pre_sync), (fast, pre_fast) = _both(requests, layout=layout, kv_cache_tokens=96,
                                               page_size=8)
    _assert_same(fast, sync, requests)
    assert pre_sync > 0 and pre_fast > 0, "the tiny KV cache preempted nobody"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_tokens_with_aborts(layout):
    requests = [(str(i), _prompt(i), _params(i, max_tokens=14)) for i in range(8)]
    abort_at = {"1": 1, "2": 3, "5": 6}
    (sync, _), (fast, _) = _both(requests, abort_at=abort_at, layout=layout)
    _assert_same(fast, sync, requests)
    assert {rid for rid, r in sync.items() if r[1] == "abort"} == set(abort_at)
    assert [len(sync[rid][0]) for rid in sorted(abort_at)] == [1, 3, 6]


def test_same_tokens_with_logprobs_prompt_logprobs_and_penalties():
    requests = [
        ("lp", _prompt(1), _params(1, logprobs=3)),
        ("plp", _prompt(3) * 6, _params(2, prompt_logprobs=2)),     # chunked: 66 > 48 tokens
        ("pen", _prompt(5), _params(5, presence_penalty=0.8, repetition_penalty=1.3)),
        ("min", _prompt(6), _params(6, min_tokens=3, ignore_eos=False), (5, 9, 17)),
        *[(str(i), _prompt(i), _params(i)) for i in range(4)],
    ]
    (sync, _), (fast, _) = _both(requests)
    # Every request runs to max_tokens ("min" meets none of its EOS ids): the same batches,
    # so the same tokens and logprobs to the last bit.
    assert all(r[1] == "length" for r in sync.values())
    assert fast == sync
    assert len(sync["plp"][3]) == len(_prompt(3) * 6) and len(sync["lp"][2]) == 7


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("graphs", [False, True])
def test_same_tokens_on_simulated_streams_and_graphs(layout, graphs, stops):
    """The pending tokens are read on MAIN before the streams fork (or the graph's buffers
    are loaded): any interleaving the events allow gives the synchronous tokens."""
    def on_streams(engine):
        ex = engine.executor
        ex.streams = SimulatedStreams(seed=3)
        if graphs:
            ex.graphs = IterationGraphs(ex.streams, ex.planner, engine.config.max_batch_tokens,
                                        "cpu", ex._launcher)

    requests = [(str(i), _prompt(i), _params(i, stop_token_ids=[stops[i]] if i % 2 else []))
                for i in range(6)]
    (sync, _), (fast, _) = _both(requests, setup=on_streams, layout=layout)
    _assert_same(fast, sync, requests)


def test_the_next_batch_reads_pending_tokens_from_the_device():
    """After the first step, decode tokens are not on the host when their batch is built."""
    engine = _engine(True)
    built = []
    real = engine.executor.run

    def spy(batch, *a, **kw):
        built.append(batch.pending is not None and len(batch.pending[0]))
        return real(batch, *a, **kw)

    engine.executor.run = spy
    for i in range(3):
        engine.add_request(str(i), _prompt(i), _params(i, max_tokens=5))
    first = engine.step()
    assert first == [], "the first async step returns before anything is read back"
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()
    assert built[0] is False and all(n == 3 for n in built[1:4]), built


def test_llm_and_config_take_the_flag():
    prompts = [_prompt(i) for i in range(4)]
    sp = SamplingParams(max_tokens=6, temperature=0.8, seed=5)
    got = [LLM(MODEL, weights="random", async_scheduling=a).generate(
        [{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False) for a in (False, True)]
    # All run to max_tokens (none draws EOS): the same batches, exactly the same tokens.
    assert all(o.outputs[0].finish_reason == "length" for o in got[0])
    assert [o.outputs[0].token_ids for o in got[0]] == [o.outputs[0].token_ids for o in got[1]]
    with pytest.raises(TypeError, match="async_scheduling must be True or False"):
        Engine(MODEL, weights="random", async_scheduling="yes")


# -- the overlap is real ------------------------------------------------------------------------
HOST_S = DEVICE_S = 0.06


def _step_seconds(async_scheduling: bool, steps: int = 7) -> float:
    """Median wall time of a step whose host work (scheduling) holds the GIL for HOST_S and
    whose device work (the executor) takes DEVICE_S more, releasing the GIL (a sleep)."""
    engine = _engine(async_scheduling)
    schedule = engine.scheduler.schedule

    def busy_schedule():
        end = time.perf_counter() + HOST_S
        while time.perf_counter() < end:
            pass
        return schedule()

    vocab = engine.model_config.vocab_size

    def slow_run(batch, *a, **kw):     # the device: a fixed time, the GIL released
        time.sleep(DEVICE_S)
        return torch.zeros(batch.sample_indices.shape[0], vocab)

    engine.scheduler.schedule, engine.executor.run = busy_schedule, slow_run
    for i in range(4):
        engine.add_request(str(i), _prompt(i), _params(1, max_tokens=steps + 4))
    engine.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    engine.shutdown()
    return statistics.median(times)


def test_an_async_step_takes_max_not_sum_of_host_and_device():
    for attempt in range(2):        # a loaded 2-core machine: one retry
        sync, fast = _step_seconds(False), _step_seconds(True)
        if fast < 0.8 * sync:
            break
    assert sync > 0.95 * (HOST_S + DEVICE_S), sync
    assert fast < 0.8 * sync, (fast, sync)
