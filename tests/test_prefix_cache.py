"""Automatic prefix caching (nanorun.prefix_cache): the tokens are those of the same requests
with prefix caching off, while shared prefixes are computed once.

A request that takes a cached prefix computes fewer tokens, in other batches than with the
cache off, so the two runs do not do the same arithmetic: a request's tokens are the cache-off
run's, or differ first at a near-tie of a reference engine's logits (tests/tokens.py), after
which they are not compared.
"""

from __future__ import annotations

import functools
import random

import pytest
import torch
from tokens import assert_same_tokens, first_divergence

from nanorun import Engine, SamplingParams
from nanorun.kv_cache import KVCache
from nanorun.prefix_cache import page_hash, root_key
from nanorun.request import Request

MODEL = "tiny-llama"
PAGE = 4


def _engine(caching: bool = True, **kw) -> Engine:
    kw = {"max_batch_tokens": 32, "page_size": PAGE, "kv_cache_tokens": 512, **kw}
    return Engine(MODEL, weights="random", enable_prefix_caching=caching, **kw)


@functools.cache
def _reference() -> Engine:
    """The idle engine whose prompt_logits explain a difference between two runs' tokens."""
    return _engine(False)


def _same(got: list[int], want: list[int], prompt, params, what) -> int | None:
    return assert_same_tokens(got, want, prompt=prompt, params=params,
                              logits_of=_reference().prompt_logits, what=str(what))


# -- the cache alone ------------------------------------------------------------------------------
def _kv(pages: int = 8) -> KVCache:
    return KVCache(num_layers=1, num_pages=pages, page_size=PAGE, num_kv_heads=1, head_dim=2,
                   dtype=torch.float32, device=torch.device("cpu"))


def _computed(kv: KVCache, rid: str, prompt: list[int], salt: str | None = None) -> Request:
    """A request whose whole prompt's KV is computed, in pages of its own."""
    r = Request(rid, prompt, SamplingParams(max_tokens=4), 0.0, ())
    r.cache_salt = salt
    kv.grow(r, len(prompt))
    r.num_computed_tokens = len(prompt)
    return r


def test_a_page_is_named_by_its_tokens_and_every_page_before_it():
    root = root_key(None)
    a = page_hash(root, [1, 2, 3, 4])
    assert a == page_hash(root, [1, 2, 3, 4])
    assert page_hash(a, [5, 6, 7, 8]) != page_hash(page_hash(root, [9, 2, 3, 4]), [5, 6, 7, 8])
    assert root_key("tenant-a") != root_key("tenant-b") != root


def test_a_freed_prefix_is_found_again_up_to_the_last_token():
    kv = _kv()
    r = _computed(kv, "a", list(range(10)))           # pages 0-1 full, page 2 holds 8, 9
    pages = list(r.pages)
    kv.release(r)
    assert kv.num_free_pages == kv.num_pages and kv.allocator.num_free == kv.num_pages - 3
    again = Request("b", list(range(10)) + [99], SamplingParams(max_tokens=2), 0.0, ())
    hit = kv.match_prefix(again, again.num_tokens - 1)
    assert hit.pages == tuple(pages[:2]) and (hit.copy_from, hit.copy_tokens) == (pages[2], 2)
    same = Request("c", list(range(10)), SamplingParams(max_tokens=2), 0.0, ())
    hit = kv.match_prefix(same, same.num_tokens - 1)      # its last token is computed
    assert hit.num_tokens(PAGE) == 9
    other = Request("d", [0, 1, 2, 7, 8], SamplingParams(max_tokens=2), 0.0, ())
    hit = kv.match_prefix(other, 4)                  # diverges in page 0: copy 3 of it
    assert hit.pages == () and (hit.copy_from, hit.copy_tokens) == (pages[0], 3)


def test_salted_requests_share_only_with_their_own_salt():
    kv = _kv()
    kv.release(_computed(kv, "a", list(range(8)), salt="x"))
    for salt, found in ((None, 0), ("y", 0), ("x", 7)):
        r = Request("b", list(range(8)), SamplingParams(max_tokens=2), 0.0, ())
        r.cache_salt = salt
        assert kv.match_prefix(r, 7).num_tokens(PAGE) == found, salt


def test_least_recently_used_is_evicted_first_and_held_pages_never():
    kv = _kv(pages=6)
    a, b = (_computed(kv, rid, [k] * 8) for rid, k in (("a", 1), ("b", 2)))
    kv.release(a)
    kv.release(b)                                    # a's pages are the older
    held = _computed(kv, "held", [3] * 8)            # 2 free pages left: takes them
    assert kv.allocator.num_free == 0 and kv.num_free_pages == 4
    kv.grow(_computed(kv, "c", [4] * 4), 8)          # 2 more pages: a's go

    def probe(k: int):
        return kv.match_prefix(Request("p", [k] * 9, SamplingParams(), 0.0, ()), 8)

    assert probe(1).num_tokens(PAGE) == 0 and probe(2).num_tokens(PAGE) == 8
    taker = Request("t", [2] * 9, SamplingParams(max_tokens=2), 0.0, ())
    kv.take_prefix(taker, probe(2))                  # b's pages are held again
    assert kv.num_free_pages == 0 and not kv.can_grow(_computed(kv, "e", []), 4)
    assert [kv.allocator.refcount(p) for p in held.pages + taker.pages] == [1, 1, 2, 2]


def test_clearing_the_cache_frees_every_page_no_request_holds():
    kv = _kv()
    kv.release(_computed(kv, "a", list(range(11))))
    held = _computed(kv, "b", list(range(50, 58)))
    kv.cache_computed(held)
    kv.clear_prefix_cache()
    assert kv.allocator.num_free == kv.num_pages - 2         # b's own two
    kv.release(held)
    kv.clear_prefix_cache()
    assert kv.allocator.num_free == kv.num_pages


# -- the engine: the tokens of the cache-off run ---------------------------------------------------
SYSTEM = [(7 * j) % 200 + 5 for j in range(23)]


def _workload(rng: random.Random) -> list[tuple[str, list[int], SamplingParams]]:
    """A shared system prompt with different questions, a prompt asked twice, and a second
    turn for each (added when its first turn ends: the conversation so far + a new line)."""
    out = []
    for i in range(5):
        question = [rng.randrange(2, 250) for _ in range(rng.randint(1, 9))]
        params = (SamplingParams(max_tokens=rng.randint(3, 8), temperature=0.0, ignore_eos=True)
                  if i % 2 else SamplingParams(max_tokens=6, temperature=0.9, top_k=40,
                                                seed=100 + i, ignore_eos=True))
        out.append((f"q{i}", SYSTEM + question, params))
    out.append(("again", out[1][1], out[1][2]))
    return out


def _run(engine: Engine, workload, second_turn: bool = True, clear: bool = True) -> dict:
    """Serve the workload; returns id -> (prompt, params, output). clear: then empty the
    prefix cache, and check that every page is free."""
    asked = {rid: (prompt, params) for rid, prompt, params in workload}
    for rid, prompt, params in workload:
        engine.add_request(rid, prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if not out.finished:
                continue
            done[out.request_id] = (*asked[out.request_id], out)
            if second_turn and not out.request_id.endswith("+"):
                prompt, params = asked[out.request_id]
                follow = list(prompt) + out.token_ids + [11, 12, 13]
                asked[out.request_id + "+"] = (follow, params)
                engine.add_request(out.request_id + "+", follow, params)
    kv = engine.kv_cache
    assert kv.num_free_pages == kv.num_pages, "KV pages leaked"
    if clear:
        kv.clear_prefix_cache()
        assert kv.allocator.num_free == kv.num_pages, "a cached page leaked"
    return done


def _assert_cache_off_tokens(on: dict, off: dict) -> None:
    assert on.keys() == off.keys()
    for rid, (prompt, params, out) in on.items():
        want_prompt, _, want = off[rid]
        if list(prompt) != list(want_prompt):     # its first turn diverged at a near-tie
            continue
        if _same(out.token_ids, want.token_ids, prompt, params, rid) is None:
            assert out.finish_reason == want.finish_reason, rid


def _computed_prompt_tokens(done: dict) -> int:
    return sum(len(p) - (o.num_cached_tokens or 0) for p, _, o in done.values())


@pytest.mark.slow
@pytest.mark.parametrize("layout,async_scheduling", [("sequential", False), ("overlap", True)])
def test_cached_prefixes_give_the_cache_off_tokens(layout, async_scheduling):
    workload = _workload(random.Random(layout))
    kw = dict(layout=layout, async_scheduling=async_scheduling)
    on, off = _run(_engine(True, **kw), workload), _run(_engine(False, **kw), workload)
    _assert_cache_off_tokens(on, off)
    assert all(o.num_cached_tokens == 0 for _, _, o in off.values())
    assert on["again"][2].num_cached_tokens == len(workload[1][1]) - 1
    assert all(on[f"q{i}"][2].num_cached_tokens >= 20 for i in range(1, 5))
    assert all(on[f"q{i}+"][2].num_cached_tokens >= len(on[f"q{i}"][0]) for i in range(5))
    assert _computed_prompt_tokens(on) < _computed_prompt_tokens(off) / 2


@pytest.mark.slow
def test_preempted_and_chunked_requests_recompute_only_what_was_evicted():
    """A 64-token cache and 8-token chunks: requests are preempted; with the cache, what they
    computed stays cached and is taken back on re-admission unless it was evicted."""
    workload = _workload(random.Random(3))
    kw = dict(kv_cache_tokens=64, max_batch_tokens=8)
    on, off = _run(_engine(True, **kw), workload), _run(_engine(False, **kw), workload)
    _assert_cache_off_tokens(on, off)
    preempted = [o.metrics.num_preemptions for _, _, o in off.values()]
    assert sum(preempted) > 0, "nothing was preempted: make the cache smaller"
    on_recomputed, off_recomputed = (sum(o.metrics.num_recomputed_tokens
                                         for _, _, o in done.values()) for done in (on, off))
    assert on_recomputed < off_recomputed


def test_prompt_logprobs_are_computed_not_taken():
    """The positions a request wants prompt logprobs for are computed, so they are the cache-off
    run's (the same batches: the same arithmetic)."""
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=2)
    prompt = SYSTEM + [3, 4]
    runs = []
    for caching in (True, False):
        engine = _engine(caching)
        engine.add_request("warm", prompt, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
        engine.add_request("p", prompt, params)
        outs = [o for _ in range(8) for o in engine.step() if o.finished]
        runs.append(outs[0])
    on, off = runs
    assert on.num_cached_tokens == 0
    assert on.prompt_logprobs == off.prompt_logprobs and on.token_ids == off.token_ids


def test_queries_and_hits_are_counted_in_tokens():
    engine = _engine()
    for rid in ("a", "b"):
        engine.add_request(rid, SYSTEM, SamplingParams(max_tokens=1))
        while engine.has_unfinished_requests():
            engine.step()
    cache = engine.kv_cache.prefix_cache
    assert (cache.queries, cache.hits) == (2 * len(SYSTEM), len(SYSTEM) - 1)


def test_a_prefill_engine_and_a_disabled_cache_take_nothing():
    from nanorun.disagg import prefill_engine
    from nanorun.kv_connector import InProcessConnector

    producer, _ = InProcessConnector.pair(num_layers=2)
    assert prefill_engine(MODEL, producer, kv_cache_tokens=256).kv_cache.prefix_cache is None
    assert _engine(False).kv_cache.prefix_cache is None


# -- a soak ----------------------------------------------------------------------------------------
def _soak(caching: bool, seed: int) -> tuple[dict, set, Engine]:
    """Requests with random shared prefixes arrive at random steps, some are aborted, in a cache
    small enough to preempt. Each step checks that every page a running request holds is
    allocated and not evictable, and that no request ends twice."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(2, 250) for _ in range(rng.randint(3, 30))] for _ in range(4)]
    engine = _engine(caching, kv_cache_tokens=64, max_batch_tokens=16)
    kv, asked, ended, aborted = engine.kv_cache, {}, {}, set()
    for step in range(400):
        if step < 60 and rng.random() < 0.5:
            rid = f"r{step}"
            prompt = rng.choice(prefixes) + [rng.randrange(2, 250)
                                             for _ in range(rng.randint(0, 12))]
            params = SamplingParams(max_tokens=rng.randint(1, 10), ignore_eos=True,
                                    temperature=rng.choice([0.0, 0.8]), seed=step)
            asked[rid] = (prompt, params)
            engine.add_request(rid, prompt, params)
        if asked and rng.random() < 0.05:
            rid = rng.choice(list(asked))
            engine.abort_request(rid)
            aborted.add(rid)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in ended, f"{out.request_id} ended twice"
                ended[out.request_id] = out
        for r in engine.scheduler.running:
            assert all(kv.allocator.refcount(p) > 0 for p in r.pages), r.request_id
            if kv.prefix_cache is not None:
                assert not set(r.pages) & set(kv.prefix_cache._evictable), r.request_id
        if step >= 60 and not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    assert set(ended) == set(asked), "a request was lost"
    assert kv.num_free_pages == kv.num_pages, "KV pages leaked"
    kv.clear_prefix_cache()
    assert kv.allocator.num_free == kv.num_pages, "a cached page leaked"
    return {rid: (*asked[rid], ended[rid]) for rid in asked}, aborted, engine


@pytest.mark.slow
def test_soak_with_shared_prefixes_aborts_and_pressure():
    on, aborted, engine = _soak(True, 7)
    off, _, _ = _soak(False, 7)
    cache = engine.kv_cache.prefix_cache
    assert cache.hits > 0 and sum(o.metrics.num_preemptions for *_, o in on.values()) > 0
    for rid, (prompt, params, out) in on.items():
        want = off[rid][2]
        if rid in aborted or want.finish_reason == "abort":
            continue              # aborted at the same step: not at the same token
        if first_divergence(out.token_ids, want.token_ids, prompt=prompt, params=params,
                            logits_of=_reference().prompt_logits, what=rid) is None:
            assert out.finish_reason == want.finish_reason, rid


# -- what a server's client sees ---------------------------------------------------------------
@pytest.mark.slow
def test_the_usage_gives_cached_prompt_tokens_as_vllm_does(tmp_path):
    """With --enable-prompt-tokens-details, a repeated prompt's usage has
    prompt_tokens_details.cached_tokens (vLLM leaves it out when none were cached); and the
    prefix cache's counters, and its host tier's, reach /metrics."""
    pytest.importorskip("fastapi")
    from test_server import MODEL as SERVED
    from test_server import _get, _post, _start_server, _stop
    from text_model import write_text_model

    proc, url = _start_server(write_text_model(tmp_path), "--enable-prompt-tokens-details",
                              "--kv-offload-tokens", "256")
    try:
        body = {"model": SERVED, "prompt": list(range(40, 90)), "max_tokens": 2}
        usages = [_post(f"{url}/v1/completions", body)[1]["usage"] for _ in range(2)]
        metrics = _get(f"{url}/metrics")[1]
    finally:
        _stop(proc)
    assert "prompt_tokens_details" not in usages[0]
    assert usages[1]["prompt_tokens_details"] == {"cached_tokens": 49}    # all but the last
    assert usages[1]["prompt_tokens"] == 50
    value = {line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines()
             if line.startswith("vllm:") and "_total{" in line}
    assert value["vllm:prefix_cache_hits_total"] == 49
    assert value["vllm:prefix_cache_queries_total"] == 100
    # The host tier's pair: asked about both, nothing evicted to it yet.
    assert (value["vllm:external_prefix_cache_queries_total"],
            value["vllm:external_prefix_cache_hits_total"]) == (100, 0)


# -- the host tier ---------------------------------------------------------------------------------
def test_the_host_pool_keeps_pages_by_name_and_gives_them_back():
    """CPU copies: a page saved to a slot comes back into another page, every layer, K and V;
    the pool drops its least recently used name when full, and a slot loaded from is not
    reused before the next iteration (its load runs in this one's device work)."""
    from nanorun.kv_offload import CpuHostKVPool

    kv = KVCache(num_layers=3, num_pages=6, page_size=PAGE, num_kv_heads=2, head_dim=3,
                 dtype=torch.float32, device=torch.device("cpu"))
    kv.k.normal_()
    kv.v.normal_()
    pool = CpuHostKVPool(kv.k, kv.v, 2)
    a, b = pool.reserve(b"a"), pool.reserve(b"b")
    pool.copy(kv.k, kv.v, [(1, a), (4, b)], [])
    want = kv.k[:, 1].clone(), kv.v[:, 1].clone()
    slot = pool.take(b"a")
    pool.copy(kv.k, kv.v, [], [(slot, 2)])
    assert torch.equal(kv.k[:, 2], want[0]) and torch.equal(kv.v[:, 2], want[1])
    assert pool.reserve(b"c") == b and b"b" not in pool     # the full pool drops b; a is busy
    pool.next_iteration()
    assert pool.reserve(b"d") == a


@pytest.mark.slow
def test_evicted_prefixes_come_back_from_host_memory():
    """A device cache that holds one conversation at a time, and a host tier that holds them
    all: asked again, each takes its prefix back from host memory, with the cache-off
    tokens."""
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 250) for _ in range(30)] for _ in range(3)]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    workload = [(f"{rep}-{i}", p, params) for rep in range(2) for i, p in enumerate(prompts)]
    runs = {}
    for name, kw in (("off", dict(enable_prefix_caching=False)), ("device", {}),
                     ("host", dict(kv_offload_tokens=256))):
        engine = Engine(MODEL, weights="random", page_size=PAGE, kv_cache_tokens=64,
                        max_batch_tokens=16, **kw)
        done = {}
        for rid, prompt, p in workload:         # one at a time: the cache holds one
            done.update(_run(engine, [(rid, prompt, p)], second_turn=False, clear=False))
        runs[name] = done
        if name == "host":
            host = engine.kv_cache.prefix_cache.host
            assert host.hits > 0 and len(host) > 0
    for name in ("device", "host"):
        _assert_cache_off_tokens(runs[name], runs["off"])
    cached = {name: [runs[name][f"1-{i}"][2].num_cached_tokens for i in range(3)]
              for name in ("device", "host")}
    assert cached["host"] == [28, 28, 28]              # 7 full pages of 4 back from the host
    assert sum(cached["device"]) < sum(cached["host"])


@pytest.mark.gpu
def test_the_cuda_host_pool_copies_on_its_own_stream():
    """CUDA: pinned host memory, copies on the pool's stream ordered after the compute stream's
    work (a page written just before is saved as written) and before what follows (a page
    loaded is read as loaded); then the engine's tokens with the tier are the cache-off run's."""
    from nanorun.kv_offload import CudaHostKVPool

    kv = KVCache(num_layers=2, num_pages=8, page_size=PAGE, num_kv_heads=2, head_dim=8,
                 dtype=torch.float16, device=torch.device("cuda"))
    pool = CudaHostKVPool(kv.k, kv.v, 4)
    assert pool.k.is_pinned() and pool.stream != torch.cuda.current_stream()
    kv.k[:, 3].normal_()                        # queued on the compute stream
    want = kv.k[:, 3].clone()
    slot = pool.reserve(b"p")
    pool.copy(kv.k, kv.v, [(3, slot)], [])
    pool.copy(kv.k, kv.v, [], [(pool.take(b"p"), 5)])
    assert torch.equal(kv.k[:, 5], want)        # read on the compute stream, after the load
    rng = random.Random(5)
    prompts = [[rng.randrange(2, 250) for _ in range(30)] for _ in range(3)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    runs, engines = [], []
    for kw in (dict(enable_prefix_caching=False), dict(kv_offload_tokens=256)):
        engine = Engine(MODEL, weights="random", device="cuda", dtype="float32",
                        page_size=PAGE, kv_cache_tokens=64, max_batch_tokens=16, **kw)
        engines.append(engine)
        outs = {}
        for rep in range(2):
            for i, prompt in enumerate(prompts):
                engine.add_request(f"{rep}-{i}", prompt, params)
                while engine.has_unfinished_requests():
                    outs.update((o.request_id, o) for o in engine.step() if o.finished)
        runs.append(outs)
    off, host = runs
    assert all(host[f"1-{i}"].num_cached_tokens == 28 for i in range(3))
    for rid, out in host.items():
        i = int(rid.split("-")[1])
        assert_same_tokens(out.token_ids, off[rid].token_ids, prompt=prompts[i], params=params,
                           logits_of=engines[0].prompt_logits, what=rid)


# -- a real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_with_the_cache_gives_the_tokens_of_computing_everything():
    """SmolLM2-135M-Instruct's real weights: prompts that share a long prefix, generated in one
    batch (the later ones wait for the first to compute the prefix, then take it), give the
    greedy tokens of the whole context computed afresh (prompt_logits, which takes nothing
    from the cache), up to a near-tie."""
    from real_models import SMOLLM2, FetchError, fetch
    from test_real_weights import LONG

    from nanorun import LLM

    try:
        path = str(fetch(SMOLLM2))
    except FetchError as e:
        pytest.skip(f"SmolLM2-135M-Instruct GGUF cannot be had: {e}")
    prompts = [LONG, LONG + " Its frame", LONG[:600] + " Nobody expected"]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    llm = LLM(path, kv_cache_tokens=4096)
    outs = llm.generate(prompts, params)
    assert outs[0].num_cached_tokens == 0 and outs[1].num_cached_tokens >= 300
    assert outs[2].num_cached_tokens >= 100
    logits_of = llm.engine.prompt_logits
    for out in outs:
        # Greedy from the afresh logits, up to the first token that differs from what the run
        # took (one pass over the prompt and its tokens: a row per position).
        ids, got = list(out.prompt_token_ids), out.outputs[0].token_ids
        want = logits_of(ids + got[:-1])[len(ids) - 1:].argmax(-1).tolist()
        assert_same_tokens(got, want, prompt=ids, params=params, logits_of=logits_of,
                           what=out.prompt[-20:])
