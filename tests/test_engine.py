"""Engine behaviour on CPU: SplitFuse chunking, preemption, sampling, bad input.

Chunking, preemption and batching change the batches a request runs in, so its arithmetic:
its tokens are the reference run's, or differ first at a near-tie of the reference engine's
logits (tests/tokens.py), after which they are not compared.
"""

from __future__ import annotations

import pytest

from conftest import random_prompts
from tokens import assert_same_tokens, first_divergence
from nanorun import LLM, Engine, SamplingParams

MODEL = "tiny-llama"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LENGTHS = [3, 16, 31, 50, 7, 64, 1, 45]


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(2048, LENGTHS)


@pytest.fixture(scope="module")
def reference():
    """The engine that gave reference_tokens (idle again: its prompt_logits explain a
    difference)."""
    return LLM(MODEL, max_batch_tokens=1024, kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def reference_tokens(prompts, reference):
    """Every prompt prefilled in one piece, nothing preempted."""
    return [o.token_ids for o in reference.generate(prompts, GREEDY)]


def _assert_reference_tokens(outputs, prompts, reference_tokens, reference, params=GREEDY):
    for i, (out, want) in enumerate(zip(outputs, reference_tokens, strict=True)):
        assert_same_tokens(out.token_ids, want, prompt=prompts[i], params=params,
                           logits_of=reference.engine.prompt_logits, what=f"prompt {i}")


@pytest.mark.parametrize("budget", [1, 7, 16, 33, 100])
def test_chunked_prefill_gives_same_tokens(prompts, reference_tokens, reference, budget):
    llm = LLM(MODEL, max_batch_tokens=budget, kv_cache_tokens=8192)
    _assert_reference_tokens(llm.generate(prompts, GREEDY), prompts, reference_tokens,
                             reference)


def test_tiny_kv_pool_preempts_and_still_completes(prompts, reference_tokens, reference):
    # 6 pages of 16 tokens: room for about one long request at a time.
    llm = LLM(MODEL, max_batch_tokens=64, kv_cache_tokens=96, page_size=16)
    outputs = llm.generate(prompts, GREEDY)
    _assert_reference_tokens(outputs, prompts, reference_tokens, reference)
    assert sum(o.metrics.num_preemptions for o in outputs) > 0, "pool was not small enough"
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages


def test_outputs_in_input_order_with_metrics(prompts):
    llm = LLM(MODEL, max_batch_tokens=32)
    outputs = llm.generate(prompts, GREEDY)
    assert [list(o.prompt_token_ids) for o in outputs] == prompts
    for o in outputs:
        m = o.metrics
        assert o.finished and len(o.token_ids) == GREEDY.max_tokens
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert len(m.token_times) == len(o.token_ids)


def test_seeded_sampling_is_reproducible_and_batch_independent(prompts):
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=50, top_p=0.9, seed=7,
                            ignore_eos=True)
    llm = LLM(MODEL)
    alone = llm.generate(prompts[:1], params)[0].token_ids
    batched = LLM(MODEL, max_batch_tokens=16).generate(prompts, params)[0].token_ids
    assert_same_tokens(batched, alone, prompt=prompts[0], params=params,
                       logits_of=llm.engine.prompt_logits)


def test_stop_token_ends_request(prompts, reference_tokens, reference):
    stop = reference_tokens[0][4]
    first = reference_tokens[0].index(stop)
    params = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop],
                            ignore_eos=True)
    out = LLM(MODEL).generate(prompts[:1], params)[0]
    # Alone here, batched with the other prompts there: up to a near-tie, after which the
    # stop token may never come.
    if first_divergence(out.token_ids, reference_tokens[0], prompt=prompts[0], params=params,
                        logits_of=reference.engine.prompt_logits) is None:
        assert out.finish_reason == "stop"
        assert out.token_ids == reference_tokens[0][: first + 1]


def test_engine_step_api_and_abort(prompts):
    engine = Engine(MODEL, max_batch_tokens=32)
    engine.add_request("a", prompts[3], GREEDY)
    engine.add_request("b", prompts[5], GREEDY)
    engine.step()
    engine.abort_request("a")
    engine.abort_request("no-such-request")       # ignored
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert finished["a"].finish_reason == "abort"
    assert finished["b"].finish_reason == "length" and len(finished["b"].token_ids) == 12
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


# -- bad input: a clear exception, nothing queued, the engine keeps serving ---------------------
@pytest.fixture(scope="module")
def engine():
    return Engine(MODEL, max_batch_tokens=32, kv_cache_tokens=512, max_model_len=256)


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "empty"),
    ([1, 2, 2048], GREEDY, "outside the vocabulary"),
    ([-1], GREEDY, "outside the vocabulary"),
    ([1] * 250, SamplingParams(max_tokens=10), "exceeds the model's context"),
    ("hello", GREEDY, "not text"),
])
def test_bad_requests_are_rejected(engine, prompts, prompt, params, match):
    engine.add_request("good", prompts[0], GREEDY)
    with pytest.raises((ValueError, TypeError), match=match):
        engine.add_request("bad", prompt, params)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert [o.request_id for o in outputs if o.finished] == ["good"]


def test_bad_sampling_params():
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


def test_duplicate_request_id(engine, prompts):
    engine.add_request("dup", prompts[0], GREEDY)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", prompts[1], GREEDY)
    engine.abort_request("dup")
    engine.step()


def test_request_larger_than_kv_cache():
    engine = Engine(MODEL, kv_cache_tokens=64, page_size=16)
    with pytest.raises(ValueError, match="raise kv_cache_tokens"):
        engine.add_request("big", [1] * 60, SamplingParams(max_tokens=10))


def test_generate_checks_every_prompt_first(prompts):
    llm = LLM(MODEL)
    with pytest.raises(ValueError, match="prompt 2: .*empty"):
        llm.generate([prompts[0], prompts[1], []], GREEDY)
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_batch_tokens=0), "max_batch_tokens"),
    (dict(page_size=-4), "page_size"),
    (dict(dtype="float8"), "unknown dtype"),
    (dict(weights="pretrained"), "weights must be"),
    (dict(layout="no-such-layout"), "layout"),
])
def test_bad_engine_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(MODEL, **kwargs)


def test_unknown_model():
    with pytest.raises(ValueError, match="tiny-llama"):
        LLM("tiny-lama")
