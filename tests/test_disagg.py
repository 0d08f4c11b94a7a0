"""Prefill and decode engines (Splitwise, issue 18): a pair produces the tokens of one "both"
engine, in one process (InProcessConnector) and as two gloo processes
(TorchDistributedConnector); every page is free on both sides at the end; kv_send is an
ordinary network op of the plan, and every wait the planner gives it is needed.

A pair's batches are not the one engine's, so neither is its arithmetic: each request's tokens
are the one engine's, or differ first at a near-tie of its logits (tests/tokens.py), after
which they are not compared.

The two-process test starts this file as a script twice, with the environment torchrun would
give each rank, as tests/test_tensor_parallel.py does (no launcher start-up cost).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nanorun import SamplingParams
from nanorun.config import EngineConfig
from nanorun.disagg import (KVReceiver, TraceRequest, pair_engine, prefill_engine, run_local,
                            run_rank)
from nanorun.engine import Engine
from nanorun.executor import Executor
from nanorun.kv_connector import Handoff, InProcessConnector
from nanorun.layout import overlap
from nanorun.models import build_model, layer_ops
from nanorun.ops import kv_append, paged_attention
from nanorun.planner import Plan
from nanorun.search import get_device

from executor_rig import BATCH, Rig, close
from ranks import join_ranks, start_ranks
from tokens import assert_same_tokens

PROMPT_LENGTHS = [3, 17, 40, 1, 25, 9]
BATCH_TOKENS = 16                      # < the longest prompts: prefill runs in chunks
LAYOUTS = ("sequential", "overlap")
ENGINE = dict(max_batch_tokens=BATCH_TOKENS, kv_cache_tokens=1024)
# Small enough that the decode engine runs out of pages and requests wait for them.
DECODE_KV_TOKENS = 128
WORKER_TIMEOUT_S = 180


def _trace(seeded_only: bool = False) -> list[TraceRequest]:
    """Greedy, seeded (top_k) and unseeded (no filter) sampled requests over the same prompts;
    one ends on the token the prefill engine samples. A pair's batches are not the single
    engine's, so this also needs each row's draw to be independent of its batch-mates'
    filters (every row draws in vocabulary order: nanorun.sampler._sample_rows).
    seeded_only: without the unseeded ones."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i, n in enumerate(PROMPT_LENGTHS):
        prompt = torch.randint(0, 2048, (n,), generator=g).tolist()
        out += [
            TraceRequest(f"greedy{i}", prompt,
                         SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)),
            TraceRequest(f"seeded{i}", prompt, SamplingParams(
                max_tokens=8, temperature=0.9, top_k=40, seed=3 + i, ignore_eos=True)),
            TraceRequest(f"unseeded{i}", prompt, SamplingParams(
                max_tokens=1 if i == 2 else 6, temperature=1.0, ignore_eos=True)),
        ]
    return [r for r in out if not r.request_id.startswith("unseeded")] if seeded_only else out


@functools.lru_cache(maxsize=None)     # two tests compare with it; neither changes it
def _one_engine(layout: str, model: str = "tiny-llama", seeded_only: bool = False):
    """One "both" engine (idle again, for the reference logits) that ran the trace, with
    each request's tokens and sampling key (an unseeded one's is the engine's to give)."""
    engine = Engine(model, layout=layout, **ENGINE)
    keys = {}
    for r in _trace(seeded_only):
        request = engine.new_request(r.request_id, r.prompt_token_ids, r.sampling_params)
        engine.enqueue(request)
        keys[r.request_id] = request.sampling_key
    tokens = {}
    while engine.has_unfinished_requests():
        tokens.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return engine, tokens, keys


def _assert_tokens_of_one_engine(got: dict[str, list[int]], layout: str,
                                 model: str = "tiny-llama", seeded_only: bool = False,
                                 what: str = "") -> None:
    engine, want, keys = _one_engine(layout, model, seeded_only)
    assert got.keys() == want.keys(), what
    for r in _trace(seeded_only):
        assert_same_tokens(got[r.request_id], want[r.request_id], prompt=r.prompt_token_ids,
                           params=r.sampling_params, key=keys[r.request_id],
                           logits_of=engine.prompt_logits, what=f"{what}{r.request_id}")


def _all_free(engine: Engine) -> bool:
    return engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


# -- in one process ------------------------------------------------------------------------------
def test_in_process_pair_generates_the_tokens_of_one_engine_and_frees_every_page():
    producer, consumer = InProcessConnector.pair(num_layers=2)
    prefill = prefill_engine("tiny-llama", producer, layout="overlap", **ENGINE)
    # The decode side schedules asynchronously here (the two-rank test runs it synchronously).
    decode = Engine("tiny-llama", role="decode", layout="overlap", async_scheduling=True,
                    **{**ENGINE, "kv_cache_tokens": DECODE_KV_TOKENS})
    receiver = KVReceiver(decode, consumer)
    final = run_local(prefill, decode, receiver, _trace())
    _assert_tokens_of_one_engine({k: o.outputs[0].token_ids for k, o in final.items()}, "overlap")
    assert all(o.finished for o in final.values())
    assert receiver.waited > 0, "the decode engine never ran short of pages: make it smaller"
    assert _all_free(prefill) and _all_free(decode)
    assert not prefill.requests and not decode.requests


def test_a_mixture_of_experts_prefill_engine_hands_off_like_a_dense_one():
    # kv_send sits in the MoE layer too (models.moe.moe_layer_ops): same tokens, pages freed.
    one, _, _ = _one_engine("overlap", "tiny-qwen3-moe", seeded_only=True)
    producer, consumer = InProcessConnector.pair(num_layers=one.model_config.num_layers)
    prefill = prefill_engine("tiny-qwen3-moe", producer, layout="overlap", **ENGINE)
    assert "kv_send" in [op.name for op in prefill.model.layer_ops]
    decode = Engine("tiny-qwen3-moe", role="decode", layout="overlap", **ENGINE)
    final = run_local(prefill, decode, KVReceiver(decode, consumer), _trace(seeded_only=True))
    _assert_tokens_of_one_engine({k: o.outputs[0].token_ids for k, o in final.items()},
                                 "overlap", "tiny-qwen3-moe", seeded_only=True)
    assert _all_free(prefill) and _all_free(decode)


def test_a_handed_off_request_keeps_its_first_token_logprobs_and_times():
    producer, consumer = InProcessConnector.pair(num_layers=2)
    prefill = prefill_engine("tiny-llama", producer, **ENGINE)
    decode = Engine("tiny-llama", role="decode", **ENGINE)
    sp = SamplingParams(max_tokens=4, temperature=0.0, logprobs=2, prompt_logprobs=1,
                        ignore_eos=True)
    prefill.add_request("a", list(range(1, 30)), sp)
    first = []
    while prefill.has_unfinished_requests():
        first += prefill.step()
    handoffs = consumer.start_load_kv()
    assert [h.request_id for h in handoffs] == ["a"] and not prefill.requests
    h = handoffs[0]
    assert h.num_kv_tokens == 29 and len(h.output_token_ids) == 1
    assert h.output_token_ids == tuple(first[-1].outputs[0].token_ids)
    assert len(h.logprobs) == 1 and len(h.prompt_logprobs) == 29
    receiver = KVReceiver(decode, consumer)
    receiver.pending.append(h)
    assert receiver.poll() == 1
    request = decode.requests["a"]
    assert request.metrics.first_token_time == h.first_token_time
    assert request.sampling_key == h.sampling_key
    while decode.has_unfinished_requests():
        out = decode.step()
    assert len(out[0].outputs[0].logprobs) == 4 and len(out[0].prompt_logprobs) == 29
    assert _all_free(prefill) and _all_free(decode)


def test_the_decode_side_refuses_what_it_can_never_hold():
    producer, consumer = InProcessConnector.pair(num_layers=2)
    prefill = prefill_engine("tiny-llama", producer, **ENGINE)
    decode = Engine("tiny-llama", role="decode", max_batch_tokens=BATCH_TOKENS,
                    kv_cache_tokens=64)
    prefill.add_request("long", list(range(1, 60)), SamplingParams(max_tokens=10))
    while prefill.has_unfinished_requests():
        prefill.step()
    receiver = KVReceiver(decode, consumer)
    with pytest.raises(ValueError, match="needs more KV cache"):
        receiver.poll()


def test_placed_kv_lands_in_the_requests_own_pages():
    from nanorun.kv_cache import KVCache
    from nanorun.request import Request

    kv = KVCache(num_layers=2, num_pages=8, page_size=4, num_kv_heads=2, head_dim=3,
                 dtype=torch.float32, device=torch.device("cpu"))
    other, request = (Request(i, (1,) * 9, SamplingParams(), 0.0, ()) for i in ("o", "r"))
    kv.grow(other, 5)                        # the request's pages are not the first ones
    kv.grow(request, 9)
    k = torch.arange(9 * 6, dtype=torch.float32).view(9, 2, 3)
    kv.place(request, 1, 0, k, -k)
    for pos in range(9):
        page, offset = request.pages[pos // 4], pos % 4
        assert torch.equal(kv.k[1, page, offset], k[pos])
        assert torch.equal(kv.v[1, page, offset], -k[pos])
    assert not kv.k[0].any() and not kv.k[1, other.pages].any()
    with pytest.raises(ValueError, match="same model, dtype"):
        kv.place(request, 0, 0, k.double(), k.double())
    with pytest.raises(ValueError, match=r"grow\(\) it first"):
        kv.place(request, 0, 8, k[:5], k[:5])


# -- roles: what each engine accepts ---------------------------------------------------------------
def test_roles_are_validated_and_each_engine_takes_what_its_role_takes():
    with pytest.raises(ValueError, match="unknown role"):
        EngineConfig(model="tiny-llama", role="prompt")
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        EngineConfig(model="tiny-llama", role="prefill", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="use async_scheduling=False"):
        EngineConfig(model="tiny-llama", role="prefill", async_scheduling=True)
    EngineConfig(model="tiny-llama", role="decode", async_scheduling=True)
    with pytest.raises(ValueError, match="needs a kv_sender"):
        Engine("tiny-llama", role="prefill", **ENGINE)
    decode = Engine("tiny-llama", role="decode", **ENGINE)
    with pytest.raises(ValueError, match="admit_transferred"):
        decode.add_request("x", [1, 2], SamplingParams(max_tokens=2))
    producer, _ = InProcessConnector.pair(num_layers=2)
    prefill = prefill_engine("tiny-llama", producer, **ENGINE)
    assert [op.name for op in prefill.model.layer_ops][3:5] == ["kv_append", "kv_send"]
    assert prefill.executor.graphs is None
    with pytest.raises(ValueError, match="takes none"):
        prefill.admit_transferred(prefill.new_request("y", [1], SamplingParams()))
    with pytest.raises(ValueError, match="not a prefill one"):
        KVReceiver(prefill, producer)


def test_the_consumer_checks_that_every_layer_arrived():
    producer, consumer = InProcessConnector.pair(num_layers=2)
    k = torch.zeros(3, 2, 4)
    producer.save_kv_layer("r", 0, 0, k, k)
    producer.request_finished(Handoff("r", (1, 2, 3), (4,), SamplingParams(), 0, (), 3, 0.0))
    with pytest.raises(RuntimeError, match="without the KV of layers \\[1\\]"):
        consumer.start_load_kv()


def test_a_resent_prompt_overwrites_and_a_gap_is_refused():
    producer, consumer = InProcessConnector.pair(num_layers=1)
    ones, twos = torch.ones(4, 1, 2), torch.full((4, 1, 2), 2.0)
    producer.save_kv_layer("r", 0, 0, ones, ones)
    producer.save_kv_layer("r", 0, 2, twos, twos)       # a recompute, cut differently
    producer.request_finished(Handoff("r", tuple(range(6)), (9,), SamplingParams(), 0, (), 6,
                                      0.0))
    producer.save_kv_layer("gap", 0, 0, ones[:2], ones[:2])
    producer.save_kv_layer("gap", 0, 3, ones[:2], ones[:2])
    producer.request_finished(Handoff("gap", tuple(range(5)), (9,), SamplingParams(), 0, (), 5,
                                      0.0))
    producer.close()
    assert [h.request_id for h in consumer.start_load_kv()] == ["r", "gap"]
    k, _ = consumer.wait_for_layer_load("r", 0)
    assert k[:, 0, 0].tolist() == [1, 1, 2, 2, 2, 2]
    with pytest.raises(RuntimeError, match="lacks position 2 of 5"):
        consumer.wait_for_layer_load("gap", 0)
    assert consumer.closed


# -- kv_send is an op of the plan: on "net", after kv_append, every wait needed --------------------
class _Recorder:
    """A kv_sink that keeps what the kv_send launches read: per layer, K and V [2, T, H, D] of
    the batch's rows (NaN where no launch sent)."""

    def __init__(self) -> None:
        self.sent: dict[int, torch.Tensor] = {}
        self.batch = None

    def __call__(self, layer, batch, kv, t0, t1) -> None:
        if batch is not self.batch:
            self.sent, self.batch = {}, batch
        slots = batch.slot_mapping[t0:t1]
        rows = torch.stack([cache[layer].view(-1, *cache.shape[3:]).index_select(0, slots)
                            for cache in (kv.k, kv.v)])
        if layer not in self.sent:
            self.sent[layer] = rows.new_full((2, batch.num_tokens, *rows.shape[2:]), math.nan)
        self.sent[layer][:, t0:t1] = rows


@pytest.fixture(scope="module")
def send_rig():
    rig = Rig()
    rig.recorder = _Recorder()
    rig.model = build_model(rig.model.config, rig.model.w, max_model_len=512,
                            attention_fn=paged_attention, kv_append_fn=kv_append,
                            kv_sink=rig.recorder)
    rig.sequential = Executor(rig.model, rig.kv, BATCH, "sequential", rig.spec, graphs=False)
    return rig


def _poisoned(rig, ex, batch, plan, order_seed):
    """Logits and sent rows of a run of `plan`, the workspace and the batch's KV slots NaN
    first, so a launch that runs before what it needs reads NaN."""
    for buf in dataclasses.astuple(ex.ws):
        buf.fill_(float("nan"))
    for cache in (rig.kv.k, rig.kv.v):
        cache.view(cache.shape[0], -1, *cache.shape[3:])[:, batch.slot_mapping] = math.nan
    rig.recorder.sent, rig.recorder.batch = {}, batch
    logits = ex.run_plan(plan, batch, order_seed)
    return logits, dict(rig.recorder.sent)


def _same(a, b) -> bool:
    (la, sa), (lb, sb) = a, b
    return close(la, lb) and sa.keys() == sb.keys() and all(close(sa[k], sb[k]) for k in sa)


def test_overlap_puts_kv_send_on_net_after_kv_append(send_rig):
    ops = tuple(op.name for op in layer_ops(1, kv_send=True))
    layout = overlap(ops, BATCH, get_device("h100"))
    assert [p.name for p in layout.partitions] == ["gemm", "attn", "net"]
    assert dict(layout.ops)["kv_send"].partition == "net"
    ex = send_rig.executor("overlap")
    batch, = send_rig.batches([[(0, 30), (5, 18)]], seed=2)
    plan = ex.planner.plan(batch)
    at = {(x.op, x.layer, x.nano_batch): i for i, x in enumerate(plan.launches)}
    for layer in range(2):
        for nb in range(2):
            send = plan.launches[at[("kv_send", layer, nb)]]
            assert at[("kv_append", layer, nb)] in send.waits
    assert not any(at[("kv_send", 0, 0)] in x.waits for x in plan.launches)


def test_dropping_any_wait_of_a_plan_with_kv_send_is_caught(send_rig):
    rig = send_rig
    ex = rig.executor("overlap")
    # A prompt chunk straddles the nano-batch boundary; another continues an earlier chunk.
    batch, = rig.batches([[(0, 30), (11, 8), (2, 10)]], seed=3)
    plan = ex.planner.plan(batch)
    expected = _poisoned(rig, rig.sequential, batch, rig.sequential.planner.plan(batch), None)
    assert len(expected[1]) == 2, "kv_send sent nothing under the sequential layout"
    assert _same(_poisoned(rig, ex, batch, plan, 0), expected)
    waits = [(i, w) for i, launch in enumerate(plan.launches) for w in launch.waits]
    assert any(plan.launches[i].op == "kv_send" for i, _ in waits)
    uncaught = []
    for i, w in waits:
        mutant = _drop_wait(plan, i, w)
        if all(_same(_poisoned(rig, ex, batch, mutant, s), expected) for s in range(40)):
            uncaught.append((plan.launches[i], plan.launches[w]))
    assert not uncaught, f"dropping these waits went unnoticed: {uncaught}"


def _drop_wait(plan: Plan, i: int, w: int) -> Plan:
    launches = list(plan.launches)
    launch = launches[i]
    launches[i] = dataclasses.replace(launch, waits=tuple(x for x in launch.waits if x != w))
    return Plan(tuple(launches), plan.num_streams)


# -- two gloo processes == one engine ------------------------------------------------------------
def test_two_gloo_ranks_prefill_and_decode_the_tokens_of_one_engine(tmp_path):
    procs = start_ranks(__file__, tmp_path, 2, cwd=lambda rank: tmp_path)
    for layout in LAYOUTS:
        _one_engine(layout)                 # while the ranks run
    prefill, decode = join_ranks(procs, WORKER_TIMEOUT_S,
                                 "a send or receive that never matched?")
    for layout in LAYOUTS:
        got = {**prefill[layout]["tokens"], **decode[layout]["tokens"]}
        _assert_tokens_of_one_engine(got, layout, what=f"{layout}: ")
        assert list(prefill[layout]["tokens"]) == ["unseeded2"], "only it ends on the prefill side"
        assert prefill[layout]["kv_send_on"] == ("net" if layout == "overlap" else "device")
        for side in (prefill, decode):
            assert side[layout]["free_pages"] == side[layout]["pages"], (layout, side)


def _rank_main(out_path: str) -> None:
    """Rank 0 prefills, rank 1 decodes (with a small cache: whether requests wait for its pages
    depends on the two processes' timing here, so the in-process test checks that), the trace
    once per layout, each pair on its own tag."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {}
    for tag, layout in enumerate(LAYOUTS):
        kwargs = {**ENGINE, "layout": layout}
        if rank == 1:
            kwargs["kv_cache_tokens"] = DECODE_KV_TOKENS
        engine, receiver = pair_engine("tiny-llama", rank, tag, **kwargs)
        final = run_rank(engine, _trace(), receiver)
        kv = engine.kv_cache
        result[layout] = {
            "tokens": {k: o.outputs[0].token_ids for k, o in final.items()},
            "pages": kv.num_pages, "free_pages": kv.num_free_pages,
            "kv_send_on": dict(engine.executor.layout.ops)["kv_send"].partition
            if rank == 0 else None}
    Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main(sys.argv[1])
