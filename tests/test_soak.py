"""A randomized soak of the serving loop: requests arrive at random steps, some are aborted
(while running, after they finished, or never existed), bad requests are interleaved, and the KV
cache is small enough that requests preempt each other. Under both built-in layouts and both
admission policies, every accepted request must end exactly once, with its solo run's tokens and
finish reason, and no KV page may leak.

The solo runs (max_batch_tokens 128, one request at a time) and the soak (32, batched) do not do
the same arithmetic: a request's tokens are its solo run's, or differ first at a near-tie of the
solo engine's logits (tests/tokens.py), after which its tokens and finish reason are not
compared."""

from __future__ import annotations

import random

import pytest

from tokens import first_divergence

from nanorun import Engine, SamplingParams

MODEL = "tiny-llama"
VOCAB = 2048
KV_TOKENS = 256          # 16 pages of 16: a handful of requests at a time
STEPS = 220


def _pool(rng: random.Random, n: int) -> list[tuple[list[int], SamplingParams]]:
    """Distinct requests: greedy (EOS ignored or honoured) and seeded sampling, so that every
    one has a single right answer."""
    pool = []
    for i in range(n):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 70))]
        kind = i % 3
        params = SamplingParams(
            max_tokens=rng.randint(1, 24), temperature=0.0 if kind < 2 else 0.8,
            top_k=0 if kind < 2 else 40, seed=None if kind < 2 else rng.randrange(1 << 30),
            ignore_eos=kind == 0, stop_token_ids=[rng.randrange(VOCAB)] if kind == 1 else [])
        pool.append((prompt, params))
    return pool


BAD_REQUESTS = [
    ([], None),                                   # empty prompt
    ([VOCAB], None),                              # outside the vocabulary
    ([1.5, 2], None),                             # floats
    ("text", None),
    ([1] * 250, SamplingParams(max_tokens=20)),   # more KV than the engine has
    ([1, 2], "not params"),
]


def _solo_runs(pool) -> tuple[Engine, list[tuple[list[int], str]]]:
    """The solo engine (idle again, for the reference logits) and each request's tokens and
    finish reason run alone."""
    engine = Engine(MODEL, weights="random", kv_cache_tokens=KV_TOKENS, max_batch_tokens=128)
    results = []
    for i, (prompt, params) in enumerate(pool):
        engine.add_request(str(i), prompt, params)
        out = None
        while engine.has_unfinished_requests():
            out = next((o for o in engine.step() if o.finished), out)
        results.append((out.token_ids, out.finish_reason))
    return engine, results


@pytest.fixture(scope="module")
def pool_and_reference():
    pool = _pool(random.Random(1234), 30)
    return pool, *_solo_runs(pool)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sequential", "overlap"])
@pytest.mark.parametrize("policy", ["fcfs", "hrrn"])
def test_soak(pool_and_reference, layout, policy):
    pool, solo, reference = pool_and_reference
    rng = random.Random(f"{layout}-{policy}")
    engine = Engine(MODEL, weights="random", layout=layout, scheduling_policy=policy,
                    max_batch_tokens=32, kv_cache_tokens=KV_TOKENS, page_size=16)
    accepted: dict[str, int] = {}      # request id -> index in the pool
    aborted: set[str] = set()
    ended: dict[str, object] = {}
    preemptions = 0
    for step in range(STEPS):
        for _ in range(rng.choice([0, 0, 1, 2])):
            if rng.random() < 0.2:
                prompt, params = rng.choice(BAD_REQUESTS)
                with pytest.raises((ValueError, TypeError)):
                    engine.add_request(f"bad{step}", prompt, params)
                continue
            i = rng.randrange(len(pool))
            rid = f"r{step}-{i}-{len(accepted)}"
            engine.add_request(rid, *pool[i])
            accepted[rid] = i
        if accepted and rng.random() < 0.08:
            target = rng.choice([rng.choice(list(accepted)), "unknown-id",
                                 rng.choice(list(ended)) if ended else "none"])
            engine.abort_request(target)
            aborted.add(target)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in ended, f"{out.request_id} ended twice"
                ended[out.request_id] = out
                preemptions += out.metrics.num_preemptions
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in ended, f"{out.request_id} ended twice"
                ended[out.request_id] = out
                preemptions += out.metrics.num_preemptions

    assert set(ended) == set(accepted), "a request was lost or one never sent came back"
    for rid, i in accepted.items():
        out, (tokens, reason) = ended[rid], reference[i]
        prompt, params = pool[i]
        diverged = first_divergence(out.token_ids, tokens, prompt=prompt, params=params,
                                    logits_of=solo.prompt_logits,
                                    eos_token_ids=solo.eos_token_ids, what=rid)
        if out.finish_reason == "abort":
            assert rid in aborted
            assert diverged is not None or len(out.token_ids) <= len(tokens), rid
        elif diverged is None:
            assert (out.token_ids, out.finish_reason) == (tokens, reason), rid
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages, "KV pages leaked"
    assert preemptions > 0, "the KV cache was not small enough to preempt anything"
    assert sum(o.finish_reason == "abort" for o in ended.values()) > 0
