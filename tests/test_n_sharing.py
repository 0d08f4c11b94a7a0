"""n > 1 shares its prompt's KV through the prefix cache (see nanorun.scheduler): the n
sequences of one request give what n separate requests with the per-sequence seeds give with
prefix caching off (token ids; logprobs to float tolerance), while the prompt is computed once
(P + n - 1 prompt tokens scheduled, not n * P) and held about once. Every iteration is
checked on the way: each page a batch writes is held by its writer alone (refcount 1), and
every page is free at the end.

Shared and separate runs batch the sequences differently, so they do not do the same
arithmetic: a sequence's tokens are the separate request's, or differ first at a near-tie of
a reference engine's logits (tests/tokens.py); after that neither its tokens, logprobs nor
finish reason are compared."""

from __future__ import annotations

import functools
from dataclasses import fields, replace

import pytest
import torch
from text_model import write_text_model
from tokens import assert_same_logprobs, assert_same_tokens, first_divergence

from nanorun import Engine, SamplingParams, TextEngine
from nanorun.disagg import prefill_engine
from nanorun.kv_cache import KVCache
from nanorun.kv_connector import InProcessConnector
from nanorun.request import Request
from nanorun.scheduler import Scheduler, SchedulerOutput
from nanorun.text_engine import _child_params

MODEL = "tiny-llama"
LAYOUTS = ("sequential", "overlap")


def _prompt(n: int, salt: int = 0) -> list[int]:
    return [(13 * j + 7 * salt) % 250 + 3 for j in range(n)]


class _Watch:
    """Wraps the engine's scheduler: counts the prompt tokens scheduled, the most pages held,
    and checks that no batch writes a page that is shared."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.prompt_tokens, self.peak_pages, self.copies = engine, 0, 0, 0
        self.preempted = 0
        kv, schedule = engine.kv_cache, engine.scheduler.schedule

        def watched():
            out = schedule()
            self.peak_pages = max(self.peak_pages, kv.num_pages - kv.num_free_pages)
            self.copies += len(out.copies)
            self.preempted += len(out.preempted)
            for chunk in out.chunks:
                r = chunk.request
                self.prompt_tokens += max(0, min(chunk.start + chunk.length,
                                                 len(r.prompt_token_ids)) - chunk.start)
                written = {r.pages[p // kv.page_size]
                           for p in range(chunk.start, chunk.start + chunk.length)}
                shared = [p for p in written if kv.allocator.refcount(p) != 1]
                assert not shared, f"{r.request_id} writes shared pages {shared}"
            for _, dst in out.copies:
                assert kv.allocator.refcount(dst) == 1
            return out

        engine.scheduler.schedule = watched


def _engine(layout="sequential", **kw) -> Engine:
    kw = {"max_batch_tokens": 32, "page_size": 4, "kv_cache_tokens": 512, **kw}
    return Engine(MODEL, weights="random", layout=layout, **kw)


@functools.cache
def _reference() -> Engine:
    """The engine whose prompt_logits explain a difference between two runs' tokens."""
    return _engine()


def _same_tokens(got: list[int], want: list[int], prompt, params: SamplingParams,
                 what) -> int | None:
    return assert_same_tokens(got, want, prompt=prompt, params=params,
                              logits_of=_reference().prompt_logits, what=str(what))


def _drain(te: TextEngine, abort_at: dict | None = None) -> dict:
    """Run to the end; abort a core request once its sequence shows abort_at[(id, i)] tokens.
    Returns (id, index) -> (token ids, logprobs, finish reason)."""
    done, aborts = {}, dict(abort_at or {})
    while te.has_unfinished_requests():
        for out in te.step():
            for c in out.outputs:
                key = (out.request_id, c.index)
                if key in aborts and len(c.token_ids) >= aborts[key] and not c.finish_reason:
                    del aborts[key]
                    te.engine.abort_request(te._requests[out.request_id].sequences[c.index]
                                            .core_id)
            if out.finished:
                for c in out.outputs:
                    done[(out.request_id, c.index)] = (c.token_ids, c.logprobs, c.finish_reason)
    kv = te.engine.kv_cache
    assert kv.num_free_pages == kv.num_pages, "KV pages leaked"
    return done


def _shared_and_separate(n: int, prompt, sp: SamplingParams, requests: int = 1, **kw):
    """The same work twice: `requests` requests of n sequences (prompt salted per request),
    and the n * requests separate requests with each sequence's own params. Returns both
    results and both watches."""
    results, watches, sp = [], [], replace(sp, n=n)
    asked = {(f"r{k}", i): (prompt(k) if callable(prompt) else prompt, _child_params(sp, i))
             for k in range(requests) for i in range(n)}
    for share in (True, False):
        # Separate requests of one prompt would share it through the prefix cache too.
        engine = _engine(**kw) if share else _engine(enable_prefix_caching=False, **kw)
        watch = _Watch(engine)
        te = TextEngine(engine, None)
        for k in range(requests):
            ids = prompt(k) if callable(prompt) else prompt
            if share:
                te.add_request(f"r{k}", ids, sp)
            else:
                for i in range(n):
                    te.add_request(f"r{k}.{i}", ids, _child_params(sp, i))
        done = _drain(te)
        engine.shutdown()
        if not share:
            done = {(rid.split(".")[0], int(rid.split(".")[1])): v for (rid, _), v in done.items()}
            done = {key: (*v, *asked[key]) for key, v in done.items()}    # + prompt, params
        results.append(done)
        watches.append(watch)
    return results, watches


def _assert_same(shared: dict, separate: dict) -> None:
    assert shared.keys() == separate.keys()
    for key, (ids, logprobs, reason) in shared.items():
        want_ids, want_logprobs, want_reason, prompt, params = separate[key]
        diverged = _same_tokens(ids, want_ids, prompt, params, key)
        if diverged is None:
            assert reason == want_reason, key
        if want_logprobs is not None:
            for got, want in zip(logprobs[:diverged], want_logprobs[:diverged], strict=True):
                assert_same_logprobs(got, want, what=str(key))


def _params(kind: str, **kw) -> SamplingParams:
    how = dict(temperature=0.0) if kind == "greedy" else dict(temperature=1.0, seed=11)
    return SamplingParams(**{"max_tokens": 6, "ignore_eos": True, "logprobs": 2, **how, **kw})


# -- the same tokens as separate requests ---------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
@pytest.mark.parametrize("n,prompt_len", [(2, 10), (3, 9), (4, 23)])
def test_shared_equals_separate(layout, kind, n, prompt_len):
    """page_size 4: P - 1 = 9 and 22 land mid-page (a copy), 8 at a page boundary (none)."""
    (shared, separate), (ws, _) = _shared_and_separate(n, _prompt(prompt_len), _params(kind),
                                                       layout=layout)
    _assert_same(shared, separate)
    assert ws.prompt_tokens == prompt_len + n - 1
    assert ws.copies == (n - 1 if (prompt_len - 1) % 4 else 0)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunked_prefill_saves_the_prompt(async_scheduling):
    """A 70-token prompt in chunks of 32: computed once for n = 4, P + 3 prompt tokens."""
    (shared, separate), (ws, wn) = _shared_and_separate(
        4, _prompt(70), _params("seeded", max_tokens=5), async_scheduling=async_scheduling)
    _assert_same(shared, separate)
    assert ws.prompt_tokens == 70 + 3
    assert wn.prompt_tokens == 4 * 70


def test_pages_held_once():
    """n = 4 on a 64-token prompt (16 pages of 4): the peak is the parent's pages plus each
    fork's own (the page of P - 1 onward), not four prompts."""
    P, max_tokens = 64, 4
    (shared, separate), (ws, wn) = _shared_and_separate(
        4, _prompt(P), _params("greedy", max_tokens=max_tokens), max_batch_tokens=64)
    _assert_same(shared, separate)
    whole = -(-(P + max_tokens - 1) // 4)            # one sequence's pages at its end
    own = whole - (P - 1) // 4                        # of which a fork holds itself
    assert ws.peak_pages <= whole + 3 * own
    assert wn.peak_pages > 3 * whole
    assert ws.peak_pages < wn.peak_pages / 2


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption(async_scheduling):
    """Two requests of n = 3 in a 48-token cache: sequences are preempted, re-fork or
    recompute alone, and still give the separate requests' tokens."""
    (shared, separate), (ws, _) = _shared_and_separate(
        3, lambda k: _prompt(10, k), _params("seeded", max_tokens=12), requests=2,
        kv_cache_tokens=48, async_scheduling=async_scheduling)
    _assert_same(shared, separate)
    assert ws.preempted > 0, "nothing was preempted: make the cache smaller"


def test_many_requests_hrrn_and_predicted_reservation():
    (shared, separate), _ = _shared_and_separate(
        3, lambda k: _prompt(5 + 4 * k, k), _params("seeded", max_tokens=8), requests=4,
        kv_cache_tokens=96, scheduling_policy="hrrn", kv_reservation="predicted")
    _assert_same(shared, separate)


# -- sequences that leave early ---------------------------------------------------------------
def _abort_run(abort_at, sp, n=3, prompt_len=10, **kw):
    engine = _engine(**kw)
    watch = _Watch(engine)
    te = TextEngine(engine, None)
    te.add_request("r", _prompt(prompt_len), replace(sp, n=n))
    return _drain(te, abort_at), watch


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_one_sibling_leaves_the_others_as_they_were(async_scheduling):
    """The others' batches lose a row: their tokens are as they were up to a near-tie."""
    sp = _params("seeded", max_tokens=8)
    whole, _ = _abort_run({}, sp, async_scheduling=async_scheduling)
    for victim in range(3):
        cut, _ = _abort_run({("r", victim): 2}, sp, async_scheduling=async_scheduling)
        for i in range(3):
            got, want, what = cut[("r", i)][0], whole[("r", i)][0], (victim, i)
            if i == victim:
                assert cut[("r", i)][2] == "abort"
                diverged = first_divergence(got, want, prompt=_prompt(10),
                                            params=_child_params(sp, i),
                                            logits_of=_reference().prompt_logits, what=what)
                assert diverged is not None or len(got) <= len(want), what
            else:
                _same_tokens(got, want, _prompt(10), _child_params(sp, i), what)


def test_parent_aborted_before_the_forks_fork():
    """The parent leaves after its first prompt chunk: the forks compute the rest of the
    prompt, one after the other."""
    sp = _params("greedy", max_tokens=4)
    engine = _engine(max_batch_tokens=8)
    watch = _Watch(engine)
    te = TextEngine(engine, None)
    te.add_request("r", _prompt(20), replace(sp, n=3))
    te.step()                                # the parent's first 8 prompt tokens
    engine.abort_request("r#0")
    done = _drain(te)
    assert done[("r", 0)][2] == "abort"
    alone = _engine(max_batch_tokens=8)
    te = TextEngine(alone, None)
    te.add_request("s", _prompt(20), _child_params(sp, 1))
    want = _drain(te)[("s", 0)][0]
    for i in (1, 2):        # greedy: sp's tokens, each in batches of its own
        _same_tokens(done[("r", i)][0], want, _prompt(20), sp, f"fork {i} vs alone")
    # The first fork takes the parent's 8 from the cache, the second all but the last token.
    assert watch.prompt_tokens == 8 + 12 + 1 and watch.copies == 1


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_parent_ending_on_its_first_token_still_shares(async_scheduling):
    """max_tokens=1: the parent leaves before its forks fork (synchronously, at once); the
    pages of its prompt are kept for them, then freed."""
    (shared, separate), (ws, _) = _shared_and_separate(
        3, _prompt(10), _params("seeded", max_tokens=1), async_scheduling=async_scheduling)
    _assert_same(shared, separate)
    assert ws.prompt_tokens == 10 + 2 and ws.copies == 2


def test_one_token_prompt_and_prompt_logprobs():
    """A 1-token prompt has nothing to share; prompt logprobs still come from sequence 0."""
    (shared, separate), (ws, _) = _shared_and_separate(3, _prompt(1), _params("seeded"))
    _assert_same(shared, separate)
    assert ws.prompt_tokens == 3
    engine = _engine()
    te = TextEngine(engine, None)
    te.add_request("r", _prompt(9), _params("seeded", prompt_logprobs=1, n=3))
    te.add_request("s", _prompt(9), _params("seeded", prompt_logprobs=1))
    outs = {}
    while te.has_unfinished_requests():
        outs.update((o.request_id, o) for o in te.step() if o.finished)
    # r#0 and s: the same prompt and params, rows of the same batches: the same arithmetic.
    got, want = outs["r"].prompt_logprobs, outs["s"].prompt_logprobs
    assert len(got) == 9 and got[0] is None
    assert [d.keys() for d in got[1:]] == [d.keys() for d in want[1:]]
    assert outs["r"].outputs[0].token_ids == outs["s"].outputs[0].token_ids


def test_enqueue_all_share_prompt_checks_its_requests():
    engine = _engine()
    a = engine.new_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
    b = engine.new_request("b", [1, 2, 4], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="same prompt"):
        engine.enqueue_all([a, b], share_prompt=True)
    assert not engine.requests and not engine.scheduler.has_work()


def test_prefill_engine_does_not_share():
    """A prefill engine hands each request's whole prompt KV over: it queues them unshared."""
    producer, _ = InProcessConnector.pair(num_layers=2)
    engine = prefill_engine(MODEL, producer, max_batch_tokens=32, kv_cache_tokens=256)
    a, b = (engine.new_request(rid, _prompt(9), SamplingParams(max_tokens=2)) for rid in "ab")
    engine.enqueue_all([a, b], share_prompt=True)
    assert engine.kv_cache.prefix_cache is None


# -- a stop string ends one sibling early -----------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("bpe"), tokenizer_kind="bpe")


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_stop_string_ends_one_sibling(model_dir, async_scheduling):
    sp = SamplingParams(n=3, max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)

    def run(params_of, stop=None):
        te = TextEngine.from_model(str(model_dir), kv_cache_tokens=1024, max_batch_tokens=32,
                                   page_size=4, async_scheduling=async_scheduling)
        watch = _Watch(te.engine)
        for rid, p in params_of(stop):
            te.add_request(rid, "hello world, a longer prompt", p)
        outs = {}
        while te.has_unfinished_requests():
            outs.update((o.request_id, o) for o in te.step() if o.finished)
        assert te.engine.kv_cache.num_free_pages == te.engine.kv_cache.num_pages
        te.engine.shutdown()
        return outs, watch

    def shared(stop):
        return [("r", sp if stop is None else SamplingParams(**{**_fields(sp), "stop": stop}))]

    free, _ = run(shared)
    text = free["r"].outputs[1].text
    stop = next((text[i:i + 2] for i in range(len(text) // 3, len(text) - 1)
                 if "\ufffd" not in text[i:i + 2] and text[i:i + 2] not in free["r"].outputs[0]
                 .text), None)
    if stop is None:
        pytest.skip("no stop string only sequence 1 has")
    cut, watch = run(shared, stop)
    assert watch.prompt_tokens < 3 * len(cut["r"].prompt_token_ids)

    def separate(stop):
        base = SamplingParams(**{**_fields(sp), "stop": stop})
        return [(f"s{i}", replace_n1(base, i)) for i in range(3)]

    alone, _ = run(separate, stop)
    reference = Engine(str(model_dir), kv_cache_tokens=1024, max_batch_tokens=32, page_size=4)
    same = dict(prompt=cut["r"].prompt_token_ids, logits_of=reference.prompt_logits)
    for i, c in enumerate(cut["r"].outputs):
        want = alone[f"s{i}"].outputs[0]
        if assert_same_tokens(c.token_ids, want.token_ids, params=_child_params(sp, i), **same,
                              what=f"sequence {i}") is None:
            assert c.text == want.text
            assert c.finish_reason == want.finish_reason
    # Unless sequence 1 diverged from the run the stop string was taken from (its siblings'
    # stops change its batches before it meets the string).
    if first_divergence(cut["r"].outputs[1].token_ids, free["r"].outputs[1].token_ids,
                        params=_child_params(sp, 1), **same) is None:
        assert cut["r"].outputs[1].finish_reason == "stop"


def _fields(sp: SamplingParams) -> dict:
    return {f.name: getattr(sp, f.name) for f in fields(sp) if f.init}


def replace_n1(sp: SamplingParams, i: int) -> SamplingParams:
    """Sequence i's params as a request of its own, stop strings kept (they are text)."""
    return replace(_child_params(sp, i), stop=sp.stop)


# -- the scheduler's side, step by step -----------------------------------------------------------
def _scheduler(pages: int = 32, budget: int = 8) -> Scheduler:
    kv = KVCache(num_layers=1, num_pages=pages, page_size=4, num_kv_heads=1, head_dim=4,
                 dtype=torch.float32, device=torch.device("cpu"))
    return Scheduler(kv, budget)


def _request(rid: str, prompt_len: int = 10, max_tokens: int = 5) -> Request:
    return Request(rid, _prompt(prompt_len), SamplingParams(max_tokens=max_tokens), 0.0, ())


def _siblings(prompt_len: int, pages: int = 32) -> tuple[Scheduler, Request, Request]:
    """A scheduler with sequence "p" and its sibling "f" queued, both of prompt_len tokens."""
    sched = _scheduler(pages=pages)
    parent, fork = _request("p", prompt_len), _request("f", prompt_len)
    sched.add(parent)
    sched.add(fork)
    return sched, parent, fork


def _launch(out) -> None:
    """What the engine does with an iteration: computed tokens, a token for each sample."""
    for chunk in out.chunks:
        chunk.request.num_computed_tokens += chunk.length
    for chunk in out.chunks:
        if chunk.samples:
            chunk.request.output_token_ids.append(1)


def test_a_sibling_waits_for_the_prompt_without_blocking_others():
    sched = _scheduler()
    parent, fork, other = _request("p", 12), _request("f", 12), _request("o", 3)
    for r in (parent, fork, other):
        sched.add(r)
    out = sched.schedule()                      # budget 8: the parent's first chunk only
    assert [(c.request.request_id, c.start, c.length) for c in out.chunks] == [("p", 0, 8)]
    _launch(out)
    out = sched.schedule()                      # the prompt is being computed: the fork waits
    assert [c.request.request_id for c in out.chunks] == ["p", "o"]
    assert list(sched.waiting) == [fork]
    _launch(out)
    out = sched.schedule()                      # now it takes pages 0-1 and copies page 2
    chunk = next(c for c in out.chunks if c.request is fork)
    assert (chunk.start, chunk.length) == (11, 1)
    assert fork.pages[:2] == parent.pages[:2] and fork.pages[2] != parent.pages[2]
    assert out.copies == [(parent.pages[2], fork.pages[2])]
    # The parent's, the cache's and the fork's references; the cache's and the parent's.
    assert [sched.kv.allocator.refcount(p) for p in parent.pages[:3]] == [3, 3, 2]
    assert fork.num_cached_tokens == 11 and parent.num_cached_tokens == 0


def test_a_preempted_request_takes_its_cached_pages_back():
    sched, parent, fork = _siblings(9)
    _launch(sched.schedule())
    out = sched.schedule()
    _launch(out)
    shared = parent.pages[:2]
    assert fork.pages[:2] == shared and not out.copies      # P - 1 = 8 starts a page
    sched._preempt(fork, SchedulerOutput())     # as the scheduler does when short of pages
    assert [sched.kv.allocator.refcount(p) for p in shared] == [2, 2]   # the parent's, cache's
    assert fork.num_computed_tokens == 0 and not fork.pages
    out = sched.schedule()                           # re-admitted: from the cache again
    chunk = next(c for c in out.chunks if c.request is fork)
    assert chunk.start == 9 and fork.pages[:2] == shared   # its own page 2 is cached too
    sched._preempt(parent, out)
    assert [sched.kv.allocator.refcount(p) for p in shared] == [2, 2]   # the fork's, cache's
    sched.remove(fork)
    sched.remove(parent)
    assert sched.kv.num_free_pages == sched.kv.num_pages
    sched.kv.clear_prefix_cache()
    assert sched.kv.allocator.num_free == sched.kv.num_pages


def test_a_sibling_whose_parent_left_takes_what_it_computed():
    sched, parent, fork = _siblings(12)
    _launch(sched.schedule())                   # 8 of 12 prompt tokens
    sched.remove(parent)
    out = sched.schedule()
    assert [(c.request, c.start) for c in out.chunks] == [(fork, 8)] and not out.copies


def test_copy_pages_copies_every_layer_k_and_v_and_nothing_else():
    kv = KVCache(num_layers=3, num_pages=5, page_size=4, num_kv_heads=2, head_dim=3,
                 dtype=torch.float32, device=torch.device("cpu"))
    kv.k.normal_()
    kv.v.normal_()
    k, v = kv.k.clone(), kv.v.clone()
    kv.copy_pages([(1, 3), (4, 0)])
    want_k, want_v = k.clone(), v.clone()
    for src, dst in [(1, 3), (4, 0)]:
        want_k[:, dst], want_v[:, dst] = k[:, src], v[:, src]
    assert torch.equal(kv.k, want_k) and torch.equal(kv.v, want_v)


def test_a_parent_that_left_leaves_its_prompt_pages_cached():
    sched, parent, fork = _siblings(10)
    _launch(sched.schedule())
    _launch(sched.schedule())                   # the parent's prompt is in: 10 of 10
    assert fork.status.value == "waiting" and not fork.pages   # it takes them next iteration
    prompt_pages = parent.pages[:3]             # positions 0-8 (page 2 holds P - 1 = 9)
    sched.remove(parent)                        # it ended on its first token
    assert sched.kv.num_free_pages == sched.kv.num_pages       # cached, and evictable
    out = sched.schedule()
    assert [(c.request, c.start) for c in out.chunks] == [(fork, 9)]
    assert fork.pages[:2] == prompt_pages[:2] and out.copies == [(prompt_pages[2], fork.pages[2])]
    sched.remove(fork)
    assert sched.kv.num_free_pages == sched.kv.num_pages


def test_cached_pages_are_evicted_when_nothing_else_can_run():
    """3 pages: the parent's cached prompt holds them all, so its sibling (which needs one of
    its own) takes two, and computes what the third holds in a page evicted for it."""
    sched, parent, fork = _siblings(10, pages=3)
    _launch(sched.schedule())
    _launch(sched.schedule())
    third = parent.pages[2]
    sched.remove(parent)
    assert sched.kv.allocator.num_free == 0 and sched.kv.num_free_pages == 3
    out = sched.schedule()
    assert [(c.request, c.start, c.length) for c in out.chunks] == [(fork, 8, 2)]
    assert fork.pages[2] == third and not out.copies
    sched.remove(fork)
    assert sched.kv.num_free_pages == sched.kv.num_pages
