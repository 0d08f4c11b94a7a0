"""Penalties under async scheduling: the engine's sampler counts each penalised request's
tokens on the device (nanorun.sampler.TokenCounts), so iteration i + 1 counts the token i
sampled without reading it back, and a penalised request no longer makes the engine retire
an iteration before forming the next.

Every run here is checked three ways: the reference (a synchronous engine whose sampler
rebuilds the counts from the host lists every step, as apply_penalties does), the
synchronous engine and the async one (both counting on the device); over mixed batches
(greedy and seeded, some penalised, with min_tokens, stop ids, chunked prefill), under
preemption, with forks sharing a prompt (n > 1) and with aborts.

The two synchronous engines run the same batches, so the same arithmetic: exactly equal. The
async one runs a request that stopped or was aborted one iteration more, and schedules
otherwise under preemption: where its batches differ, so does its arithmetic, and its tokens
are the reference's or differ first at a near-tie of the logits, penalties applied
(tests/tokens.py), after which neither its tokens nor its finish reason are compared."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tokens import assert_same_tokens

from nanorun import Engine, SamplingParams
from nanorun.request import Request
from nanorun.sampler import Sampler, TokenCounts, _token_counts, apply_penalties, seed_key

MODEL = "tiny-llama"
MODES = ("reference", "sync", "async")
PENALTIES = (dict(repetition_penalty=1.6), dict(frequency_penalty=1.5),
             dict(presence_penalty=1.2, repetition_penalty=0.8),
             dict(frequency_penalty=-0.7, presence_penalty=0.9, repetition_penalty=1.3))


def _engine(mode: str, **kw) -> Engine:
    engine = Engine(MODEL, weights="random", async_scheduling=mode == "async",
                    **{"max_batch_tokens": 48, **kw})
    if mode == "reference":
        engine.sampler = Sampler()          # counts rebuilt from the host lists every step
    return engine


def _params(i: int, penalised: bool, **kw) -> SamplingParams:
    """Request i's: greedy and seeded alternate; penalised ones cycle through PENALTIES."""
    how = dict(temperature=0.0) if i % 2 else dict(temperature=0.9, top_p=0.9, seed=40 + i)
    pen = PENALTIES[i % len(PENALTIES)] if penalised else {}
    return SamplingParams(**{"max_tokens": 6 + 2 * (i % 4), "ignore_eos": True, **how, **pen,
                             **kw})


def _prompt(i: int, length: int | None = None) -> list[int]:
    # Few distinct tokens: greedy decoding of random weights repeats, and penalties bite.
    return [(5 * i + j % 4) % 60 + 1 for j in range(length or 4 + 3 * (i % 3))]


def _serve(engine: Engine, requests, share: bool = False,
           abort_at: dict[str, int] | None = None) -> tuple[dict, int]:
    """Run every (id, prompt, params) to the end (share: as forks of one prompt); abort a
    request once an output shows abort_at[id] tokens. Returns (id -> (token ids, finish
    reason), preemptions)."""
    reqs = [engine.new_request(rid, prompt, sp) for rid, prompt, sp in requests]
    engine.enqueue_all(reqs, share_prompt=share)
    done, aborts, preempted = {}, dict(abort_at or {}), 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            c = out.outputs[0]
            if out.finished:
                done[out.request_id] = (c.token_ids, c.finish_reason)
                preempted += out.metrics.num_preemptions
            elif out.request_id in aborts and len(c.token_ids) >= aborts[out.request_id]:
                del aborts[out.request_id]
                engine.abort_request(out.request_id)
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages, "KV pages leaked"
    if engine.sampler.counts is not None:
        assert len(engine.sampler.counts) == 0, "count rows outlived their requests"
    engine.shutdown()
    return done, preempted


def _three_ways(requests, share=False, abort_at=None, **kw) -> list[tuple[dict, int]]:
    return [_serve(_engine(mode, **kw), requests, share, abort_at) for mode in MODES]


def _assert_async_as_reference(fast: dict, ref: dict, requests) -> None:
    """Up to a near-tie of a reference engine's logits (see the module docstring)."""
    assert fast.keys() == ref.keys()
    engine = _engine("reference", kv_cache_tokens=1024)
    for rid, prompt, sp in requests:
        if assert_same_tokens(fast[rid][0], ref[rid][0], prompt=prompt, params=sp,
                              eos_token_ids=engine.eos_token_ids,
                              logits_of=engine.prompt_logits, what=rid) is None:
            assert fast[rid][1] == ref[rid][1], rid


def _mixed(stops: list[int], n: int = 8) -> list:
    """Every other request penalised; one with min_tokens and stop ids it meets before and
    after it, one with a prompt over max_batch_tokens (chunked prefill)."""
    requests = [(str(i), _prompt(i), _params(i, penalised=i % 2 == 0 or i % 3 == 0))
                for i in range(n)]
    requests.append(("min", _prompt(3), _min_params(stops)))
    requests.append(("chunked", _prompt(7, length=70), _params(4, True)))
    return requests


def _min_params(stops: list[int]) -> SamplingParams:
    return _params(3, True, min_tokens=3, stop_token_ids=stops)      # greedy


def _min_stops() -> list[int]:
    """Stop ids for _min_params: its second greedy token (masked there by min_tokens), and
    the fourth token it draws with that one masked (allowed there: it stops)."""
    def alone(stops):
        done, _ = _serve(_engine("reference"), [("min", _prompt(3), _min_params(stops))])
        return done["min"][0]

    first = alone([])[1]
    masked = alone([first])
    assert masked[1] != first and masked[3] not in masked[:3] + [first], masked
    return [first, masked[3]]


def _unpenalised(sp: SamplingParams) -> SamplingParams:
    return replace(sp, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0)


def test_mixed_batch_same_tokens_as_the_host_reference():
    stops = _min_stops()
    (ref, _), (sync, _), (fast, _) = _three_ways(_mixed(stops))
    assert sync == ref
    _assert_async_as_reference(fast, ref, _mixed(stops))
    assert ref["min"][1] == "stop" and len(ref["min"][0]) == 4, ref["min"]
    # The penalties change what the model would say, or this test could not fail.
    plain, _ = _serve(_engine("sync"), [(rid, p, _unpenalised(sp))
                                        for rid, p, sp in _mixed(stops)])
    changed = [rid for rid in ref if ref[rid] != plain[rid]]
    assert len(changed) >= 3, changed


def test_same_tokens_under_preemption():
    requests = [(str(i), _prompt(i), _params(i, penalised=i % 3 != 1, max_tokens=12 + i))
                for i in range(10)]
    (ref, p_ref), (sync, p_sync), (fast, p_fast) = _three_ways(
        requests, kv_cache_tokens=96, page_size=8)
    assert sync == ref
    _assert_async_as_reference(fast, ref, requests)
    assert p_ref > 0 and p_sync > 0 and p_fast > 0, "the tiny KV cache preempted nobody"


def test_forks_of_one_prompt_count_their_own_tokens():
    """n > 1 as the TextEngine runs it: forks share the prompt's KV; each counts its own
    output (and the shared prompt) in its own row."""
    prompt = _prompt(2, length=11)
    requests = [(f"s{i}", prompt, _params(2 * i, penalised=i != 1, seed=7 + i, max_tokens=10))
                for i in range(4)]
    (ref, _), (sync, _), (fast, _) = _three_ways(requests, share=True, page_size=4)
    assert sync == ref and fast == ref      # nothing stops early: the same batches all three
    assert len({tuple(ids) for ids, _ in ref.values()}) == 4, "the forks drew alike"


def test_aborts_free_rows_that_others_then_reuse():
    """Aborted penalised requests give their rows back while their last token may still be
    in flight; requests admitted later take those rows and must start from clean counts."""
    requests = [(str(i), _prompt(i), _params(i, penalised=True, max_tokens=14))
                for i in range(12)]
    abort_at = {"0": 1, "2": 3, "5": 2, "6": 4}
    (ref, _), (sync, _), (fast, _) = _three_ways(requests, abort_at=abort_at,
                                                 max_batch_tokens=24)
    assert sync == ref
    _assert_async_as_reference(fast, ref, requests)
    assert {rid for rid, r in ref.items() if r[1] == "abort"} == set(abort_at)


def test_async_does_not_retire_a_penalised_iteration_before_forming_the_next():
    """Every decode batch of an all-penalised async run is formed while the previous
    iteration's tokens are still on the device (Batch.pending), and the first step returns
    before anything is read back."""
    engine = _engine("async")
    pending = []
    run = engine.executor.run

    def spy(batch, *a, **kw):
        pending.append(0 if batch.pending is None else len(batch.pending[0]))
        return run(batch, *a, **kw)

    engine.executor.run = spy
    for i in range(4):
        engine.add_request(str(i), _prompt(i), _params(i, penalised=True, max_tokens=6))
    assert engine.step() == [], "the first async step read an iteration back"
    while engine.has_unfinished_requests():
        engine.step()
    engine.shutdown()
    assert pending[0] == 0 and pending[1:5] == [4, 4, 4, 4], pending


def test_device_counts_match_the_host_lists_and_unpenalised_batches_take_no_rows():
    engine = _engine("sync")
    counts = engine.sampler.counts
    for i in range(3):
        engine.add_request(f"plain{i}", _prompt(i), _params(i, penalised=False))
    while engine.has_unfinished_requests():
        engine.step()
    assert counts._handed_out == 0 and counts._output.shape[0] == 0, "no-penalty batch paid"
    for i in range(10):     # more than the first allocation's 8 rows: the rows grow
        engine.add_request(str(i), _prompt(i), _params(i, penalised=i != 4, max_tokens=30))
    V = engine.model_config.vocab_size
    for _ in range(5):
        engine.step()
        for request in engine.requests.values():
            got = counts.counts_of(request)
            if not request.sampling_params.has_penalties or not request.output_token_ids:
                assert got is None
                continue
            want = _token_counts([request.output_token_ids], V, engine.device)[0]
            assert torch.equal(got[0], want)
            assert torch.equal(got[1], _token_counts([request.prompt_token_ids], V,
                                                     engine.device)[0] > 0)
    assert len(counts) == 9 and counts._output.shape[0] >= 9
    engine.shutdown()


# -- the sampler alone ----------------------------------------------------------------------------
V = 16


def _request(rid: str, sp: SamplingParams, prompt=(1, 2, 3, 3)) -> Request:
    return Request(rid, tuple(prompt), sp, 0.0, (V - 1,),
                   sampling_key=seed_key(sp.seed or 0))


def test_device_counts_include_the_pending_token_the_host_path_refuses():
    """Step by step with a token left pending (as the async engine leaves it): the device
    counts give the draws of the host path run on the read-back lists."""
    params = [SamplingParams(temperature=0.0, frequency_penalty=1.1, repetition_penalty=1.4),
              SamplingParams(temperature=1.0, seed=3, presence_penalty=1.5),
              SamplingParams(temperature=0.0)]
    device_reqs = [_request(str(i), sp) for i, sp in enumerate(params)]
    host_reqs = [_request(str(i), sp) for i, sp in enumerate(params)]
    sampler, reference = Sampler(TokenCounts(V, "cpu")), Sampler()
    gen = torch.Generator().manual_seed(0)
    last = None
    for _ in range(12):
        logits = torch.randn(3, V, generator=gen)
        if last is not None:        # the previous draw is still pending on the device side
            with pytest.raises(RuntimeError, match="read back"):
                reference.prepare(device_reqs, V, torch.device("cpu"))
        prepared = sampler.prepare(device_reqs, V, torch.device("cpu"))
        tokens, ok = sampler.sample(logits, prepared)
        for r in device_reqs:
            r.num_pending += 1
        if last is not None:
            for r, t in zip(device_reqs, last):
                r.num_pending -= 1
                r.output_token_ids.append(t)
        last = tokens.tolist()
        want = reference(logits, host_reqs).tokens
        for r, t in zip(host_reqs, want):
            r.output_token_ids.append(t)
        assert last == want
    assert len(set(host_reqs[0].output_token_ids)) > 3, "the penalties did not bite"


def test_apply_penalties_is_the_reference_of_the_device_rows():
    sps = [SamplingParams(repetition_penalty=1.7, frequency_penalty=0.3),
           SamplingParams(temperature=0.0), SamplingParams(presence_penalty=-1.0)]
    reqs = [_request(str(i), sp, prompt=(i, 5, 5, 9)) for i, sp in enumerate(sps)]
    for r, outs in zip(reqs, ([4, 4, 7], [1], [])):
        r.output_token_ids = list(outs)
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(1))
    prepared = Sampler(TokenCounts(V, "cpu")).prepare(reqs, V, torch.device("cpu"))
    z = logits.clone()
    prepared.penalties.apply(z)
    assert torch.equal(z, apply_penalties(logits.clone(), reqs))
    assert not torch.equal(z, logits)


def test_counts_grown_under_inference_mode_update_outside_it():
    """A caller may run steps inside torch.inference_mode() or not (the CPU's async worker
    does, the synchronous engine does not): the rows grown in one are updated in the other."""
    sampler = Sampler(TokenCounts(V, "cpu"))
    sp = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    reqs = [_request(str(i), sp) for i in range(12)]      # past the first 8 rows: a growth
    gen = torch.Generator().manual_seed(2)
    for step, inference in enumerate([True, False, True, False]):
        with torch.inference_mode(inference):
            out = sampler(torch.randn(len(reqs), V, generator=gen), reqs[:3 + 3 * step])
        for r, t in zip(reqs, out.tokens):
            r.output_token_ids.append(t)
    for r in reqs:
        assert torch.equal(sampler.counts.counts_of(r)[0],
                           _token_counts([r.output_token_ids], V, torch.device("cpu"))[0])
