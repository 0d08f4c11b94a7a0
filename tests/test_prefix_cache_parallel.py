"""The prefix cache where requests fork, move or split: n > 1 seeded sequences, a prefill/decode
pair whose decode engine recomputes preempted requests, and two tensor-parallel gloo ranks each
give the tokens of the same requests with the cache off, on workloads that take cached pages.

As in tests/test_prefix_cache.py, the two runs compute in other batches, so a sequence's tokens
are the cache-off run's or differ first at a near-tie of a reference engine's logits
(tests/tokens.py), after which they are not compared. Two tensor-parallel ranks see the same
logits (all-reduce), so each rank's outputs are the other's exactly.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from ranks import join_ranks, start_ranks
from test_prefix_cache import PAGE, SYSTEM, _reference
from tokens import assert_same_tokens, first_divergence

from nanorun import LLM, Engine, SamplingParams
from nanorun.disagg import KVReceiver, TraceRequest, prefill_engine, run_local
from nanorun.kv_connector import InProcessConnector

MODEL = "tiny-llama"
ENGINE = {"page_size": PAGE, "max_batch_tokens": 16, "kv_cache_tokens": 512}  # chunked prefill
QUESTIONS = [[31, 7, 200], [9, 9, 41, 77, 5], [150], [3, 60, 61, 62, 18, 2, 240]]
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=5, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
N_SEEDED = SamplingParams(n=3, max_tokens=4, temperature=0.8, seed=21, ignore_eos=True)
PARAMS = [N_SEEDED, GREEDY, SEEDED, N_SEEDED]
WORKER_TIMEOUT_S = 180


def _same(got: list[int], want: list[int], prompt, params: SamplingParams, what: str) -> None:
    """got is want, or differs first at a near-tie; where they agree, their lengths too."""
    assert_same_tokens(got, want, prompt=prompt, params=params,
                       logits_of=_reference().prompt_logits, what=what)


# -- n > 1 and seeded sampling through LLM, two turns of each conversation ------------------------
def _conversations(llm: LLM) -> list[list[dict]]:
    """Turn 1: a shared system prompt (five full pages) with four questions; turn 2: each
    conversation so far (sequence 0's reply) and a new line. Per turn, per prompt: its ids,
    num_cached_tokens and each sequence's tokens."""
    turns, prompts = [], [SYSTEM + q for q in QUESTIONS]
    for _ in range(2):
        outs = llm.generate(prompts, PARAMS)
        turns.append([{"prompt": list(o.prompt_token_ids), "cached": o.num_cached_tokens,
                       "tokens": [c.token_ids for c in o.outputs]} for o in outs])
        prompts = [t["prompt"] + t["tokens"][0] + [11, 12, 13] for t in turns[-1]]
    return turns


def _assert_cache_off_tokens(on: list[list[dict]], off: list[list[dict]], what: str) -> None:
    """Each sequence of each prompt against the cache-off run's: sequence j of n draws as a
    request of its own with seed + j."""
    for turn, (mine, theirs) in enumerate(zip(on, off)):
        for i, (got, want) in enumerate(zip(mine, theirs)):
            if got["prompt"] != want["prompt"]:       # its first turn diverged at a near-tie
                continue
            params = PARAMS[i]
            assert len(got["tokens"]) == len(want["tokens"]) == params.n
            for j, (a, b) in enumerate(zip(got["tokens"], want["tokens"])):
                child = dataclasses.replace(params, n=1, seed=params.seed + j
                                            if params.seed is not None else None)
                _same(a, b, got["prompt"], child, f"{what}turn {turn + 1}, prompt {i}, seq {j}")


def _assert_cached(on: list[list[dict]], off: list[list[dict]]) -> None:
    """The cache was taken: after the first prompt computed the system prompt, the others
    took its full pages; the second turns took their first turn's prompt."""
    assert all(p["cached"] == 0 for turn in off for p in turn)
    first, second = on
    assert first[0]["cached"] == 0 and all(p["cached"] >= 20 for p in first[1:])
    assert all(p["cached"] >= len(q["prompt"]) - PAGE for p, q in zip(second, first))


@pytest.mark.slow
def test_n_sampled_sequences_and_seeded_requests_give_the_cache_off_tokens():
    """n = 3 seeded sequences (which share their prompt's pages through the cache), a seeded
    top-p request and a greedy one, under the overlap layout and async scheduling, with chunked
    prefill."""
    runs = {}
    for caching in (True, False):
        llm = LLM(MODEL, layout="overlap", async_scheduling=True,
                  enable_prefix_caching=caching, **ENGINE)
        runs[caching] = _conversations(llm)
        kv = llm.engine.kv_cache
        assert kv.num_free_pages == kv.num_pages, "KV pages leaked"
        llm.shutdown()
    _assert_cached(runs[True], runs[False])
    _assert_cache_off_tokens(runs[True], runs[False], "")
    # The n sequences of one seeded request differ (seed + j), or this proves little.
    assert len({tuple(s) for s in runs[True][0][0]["tokens"]}) > 1


# -- a prefill/decode pair -----------------------------------------------------------------------
def _pair_trace() -> list[TraceRequest]:
    """Greedy and seeded requests on the shared system prompt, long enough to preempt each other
    in a small decode cache."""
    out = []
    for i, q in enumerate(QUESTIONS * 2):
        params = (dataclasses.replace(GREEDY, max_tokens=12) if i % 2 else
                  dataclasses.replace(SEEDED, max_tokens=12, seed=40 + i))
        out.append(TraceRequest(f"r{i}", SYSTEM + q, params))
    return out


def _pair_run(caching: bool) -> tuple[dict, Engine]:
    producer, consumer = InProcessConnector.pair(num_layers=2)
    prefill = prefill_engine(MODEL, producer, **ENGINE)
    decode = Engine(MODEL, role="decode", enable_prefix_caching=caching,
                    **{**ENGINE, "kv_cache_tokens": 64})
    decode.step = _bounded(decode.step, 2000)
    final = run_local(prefill, decode, KVReceiver(decode, consumer), _pair_trace())
    for engine in (prefill, decode):
        assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages, "KV pages leaked"
    return final, decode


def _bounded(step, limit: int):
    """The engine's step, failing the test past `limit` calls (a deadlock, rather than a hang:
    a decode engine's placed requests once waited for ever behind a preempted one)."""
    calls = 0

    def bounded_step():
        nonlocal calls
        calls += 1
        assert calls <= limit, f"the decode engine made no end in {limit} steps: a deadlock?"
        return step()
    return bounded_step


def test_a_decode_engine_recomputes_preempted_requests_from_its_own_cache():
    """The decode engine of a pair, short of pages, preempts requests; with its cache on, a
    re-admitted one takes back the pages it computed (or was sent) and recomputes less, with the
    cache-off tokens."""
    (on, decode), (off, _) = _pair_run(True), _pair_run(False)
    assert on.keys() == off.keys() == {r.request_id for r in _pair_trace()}
    assert sum(o.metrics.num_preemptions for o in off.values()) > 0, "make the decode cache smaller"
    assert sum(o.metrics.num_preemptions for o in on.values()) > 0
    assert decode.kv_cache.prefix_cache.hits > 0, "no re-admitted request took a cached page"
    recomputed = [sum(o.metrics.num_recomputed_tokens for o in run.values()) for run in (on, off)]
    assert recomputed[0] < recomputed[1], recomputed
    for r in _pair_trace():
        got, want = on[r.request_id], off[r.request_id]
        if first_divergence(got.outputs[0].token_ids, want.outputs[0].token_ids,
                            prompt=r.prompt_token_ids, params=r.sampling_params,
                            logits_of=_reference().prompt_logits, what=r.request_id) is None:
            assert got.outputs[0].token_ids == want.outputs[0].token_ids, r.request_id
            assert got.finish_reason == want.finish_reason, r.request_id


# -- tensor parallel 2 ---------------------------------------------------------------------------
@pytest.mark.slow
def test_two_gloo_ranks_with_the_cache_give_their_cache_off_tokens(tmp_path):
    """Each of two gloo ranks runs the conversations with the cache on and off (every rank must
    find, take and evict alike, or the collectives no longer pair up)."""
    procs = start_ranks(__file__, tmp_path, 2)
    _reference()                                 # while the ranks run
    ranks = join_ranks(procs, WORKER_TIMEOUT_S)
    assert ranks[0] == ranks[1], "two ranks returned different outputs"
    on, off = ranks[0]["on"], ranks[0]["off"]
    _assert_cached(on, off)
    _assert_cache_off_tokens(on, off, "tp 2: ")
    assert ranks[0]["hits"] > 0 and ranks[0]["all_free"]


def _rank_main(out_path: str) -> None:
    """One rank: the conversations on a tensor-parallel LLM with the cache on, then off."""
    torch.set_num_threads(1)
    result, llms = {}, []
    for caching in (True, False):
        llm = LLM(MODEL, layout="overlap", tensor_parallel_size=2,
                  enable_prefix_caching=caching, **ENGINE)
        llms.append(llm)
        result["on" if caching else "off"] = _conversations(llm)
        kv = llm.engine.kv_cache
        if caching:
            result["hits"] = kv.prefix_cache.hits
            result["all_free"] = kv.num_free_pages == kv.num_pages
    Path(out_path).write_text(json.dumps(result))
    llms[0].shutdown()                  # the first initialised the process group


if __name__ == "__main__":
    _rank_main(sys.argv[1])
