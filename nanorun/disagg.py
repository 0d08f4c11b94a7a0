"""Splitwise's phase split: a prefill engine and a decode engine, the KV streamed layer by layer.

Prompt computation is compute-bound and token generation memory-bound, so Splitwise (Patel et
al., ISCA 2024) runs them on different machines. Here that is two Engines and a KVConnector
(nanorun.kv_connector) between them:

  prefill engine (role="prefill")  every layer has a kv_send op after kv_append; the planner
      puts it on the network partition, so layer l's KV leaves while layer l + 1 computes. The
      op sends the rows of every prompt chunk as it is computed (chunked prefill streams chunk
      by chunk). When a prompt's last chunk has sampled the first token, the request is handed
      off (KVSender.hand_off): its state follows its KV, and its pages are freed once every
      send has completed.
  decode engine (role="decode")  KVReceiver takes the requests that arrived whole, places
      their KV in the engine's own pages (its own page ids, KVCache.place) and admits them
      (Engine.admit_transferred); they continue as if prefilled here: the same tokens, the
      sampler's key and output position carried over. A decode engine short of pages leaves
      them waiting, in arrival order, in the connector's staging area; nothing is dropped, and
      one it preempts later is recomputed here.

Two drivers: run_local() steps both engines of one process in turn (InProcessConnector), and
run_rank() runs one side of a torchrun pair (TorchDistributedConnector; rank 0 prefills, rank 1
decodes). `python -m nanorun.disagg MODEL --trace azure-code` serves a trace that way:

    torchrun --nproc-per-node 2 -m nanorun.disagg tiny-llama --trace azure-code \\
        --num-requests 16 --out disagg.json
"""

from __future__ import annotations

import argparse
import bisect
import collections
import json
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .engine import Engine
from .kv_connector import Handoff, KVConnector, TorchDistributedConnector
from .outputs import RequestOutput
from .request import Request
from .sampling_params import SamplingParams

PREFILL_RANK, DECODE_RANK = 0, 1


@dataclass(frozen=True)
class TraceRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams


# -- the prefill side --------------------------------------------------------------------------
class KVSender:
    """What a prefill Engine calls (its `kv_sender`): the body of the kv_send op, and the
    hand-off after sampling. Maps the batch's rows to requests and positions."""

    def __init__(self, connector: KVConnector) -> None:
        self.connector = connector
        self._chunks = self._batch = None

    def begin_iteration(self, chunks, batch) -> None:
        """The next executor run is `batch`, made of `chunks` in this order."""
        self._chunks, self._batch = chunks, batch

    def send_layer(self, layer: int, batch, kv, t0: int, t1: int) -> None:
        """kv_send of rows [t0, t1): each sequence's rows there, as positions of its request.
        A run outside step() (prompt_logits) hands nothing over."""
        if batch is not self._batch:
            return
        starts = batch.seq_starts
        s = bisect.bisect_right(starts, t0) - 1
        k_pages, v_pages = (cache[layer].view(-1, *cache.shape[3:]) for cache in (kv.k, kv.v))
        while s < len(starts) - 1 and starts[s] < t1:
            a, b = max(t0, starts[s]), min(t1, starts[s + 1])
            chunk = self._chunks[s]
            slots = batch.slot_mapping[a:b]
            self.connector.save_kv_layer(chunk.request.request_id, layer,
                                         chunk.start + a - starts[s],
                                         k_pages.index_select(0, slots),
                                         v_pages.index_select(0, slots))
            s += 1

    def hand_off(self, requests: list[Request]) -> None:
        """The iteration is over; `requests` finished their prompts: send their state and
        return once everything sent so far has left, so the engine may free their pages."""
        self._chunks = self._batch = None
        for request in requests:
            self.connector.request_finished(handoff_of(request))
        if requests:
            self.connector.wait_for_save()

    def close(self) -> None:
        """No more requests: tell the decode side."""
        self.connector.close()


def handoff_of(request: Request) -> Handoff:
    """A prefilled request's state, as the decode engine continues it."""
    m = request.metrics
    return Handoff(
        request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
        output_token_ids=tuple(request.output_token_ids),
        sampling_params=request.sampling_params, sampling_key=request.sampling_key,
        eos_token_ids=request.eos_token_ids, num_kv_tokens=request.num_computed_tokens,
        arrival_time=m.arrival_time, first_token_time=m.first_token_time,
        logprobs=None if request.logprobs is None else tuple(request.logprobs),
        cumulative_logprob=request.cumulative_logprob,
        prompt_logprobs=None if request.prompt_logprobs is None else
        tuple(request.prompt_logprobs))


def prefill_engine(model: str, connector: KVConnector, **kwargs) -> Engine:
    """An Engine that prefills and hands every request to the decode side of `connector`."""
    return Engine(model, role="prefill", kv_sender=KVSender(connector), **kwargs)


# -- the decode side ---------------------------------------------------------------------------
class KVReceiver:
    """Admits into a decode Engine the requests arriving over `connector`, as pages allow.

    pending: handoffs arrived whole and not yet placed (the engine was short of pages);
    waited: how many times a handoff found no room at once."""

    def __init__(self, engine: Engine, connector: KVConnector) -> None:
        if engine.config.role == "prefill":
            raise ValueError("a KVReceiver feeds a decode (or 'both') engine, not a prefill one")
        self.engine, self.connector = engine, connector
        self.pending: collections.deque[Handoff] = collections.deque()
        self.waited = 0

    @property
    def done(self) -> bool:
        """The prefill side closed and every request it sent was admitted."""
        return not self.pending and self.connector.closed

    def poll(self, wait: bool = False) -> int:
        """Take what has arrived (wait: block until something has) and admit what fits, in
        arrival order. Returns how many were admitted."""
        self.pending.extend(self.connector.start_load_kv(wait=wait and not self.pending))
        admitted = 0
        while self.pending and self._place(self.pending[0]):
            self.pending.popleft()
            admitted += 1
        if self.pending and not admitted:
            self.waited += 1
        return admitted

    def _place(self, handoff: Handoff) -> bool:
        engine, kv = self.engine, self.engine.kv_cache
        request = _continued_request(engine, handoff)
        # Room for the KV and the next token's, so the request can take its next step at once
        # (otherwise requests holding their prompts could fill every page and wait for ever).
        need = handoff.num_kv_tokens + 1
        if not kv.can_grow(request, need):
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"request {handoff.request_id!r} needs {kv.pages_for(need)} "
                                   f"KV pages but the decode engine has {kv.num_pages} in all; "
                                   f"give it at least the prefill engine's kv_cache_tokens")
            return False
        kv.grow(request, need)
        for layer in range(engine.model_config.num_layers):
            k, v = self.connector.wait_for_layer_load(handoff.request_id, layer)
            kv.place(request, layer, 0, k, v)
        request.num_computed_tokens = handoff.num_kv_tokens
        engine.admit_transferred(request)
        return True


def _continued_request(engine: Engine, h: Handoff) -> Request:
    """The decode engine's Request for a handoff: validated as new_request does, then given
    the prefill side's outputs and sampling key."""
    request = engine.new_request(h.request_id, list(h.prompt_token_ids), h.sampling_params,
                                 h.arrival_time, eos_token_ids=h.eos_token_ids)
    request.sampling_key = h.sampling_key
    request.output_token_ids = list(h.output_token_ids)
    request.metrics.first_token_time = h.first_token_time
    if h.first_token_time is not None:
        request.metrics.token_times.append(h.first_token_time)
    if h.logprobs is not None:
        request.logprobs = list(h.logprobs)
    request.cumulative_logprob = h.cumulative_logprob
    if h.prompt_logprobs is not None:
        request.prompt_logprobs = list(h.prompt_logprobs)
    return request


# -- drivers -----------------------------------------------------------------------------------
def run_local(prefill: Engine, decode: Engine, receiver: KVReceiver,
              requests: list[TraceRequest]) -> dict[str, RequestOutput]:
    """Serve `requests` on a prefill and a decode engine of this process, one step of each in
    turn. Returns every request's final output (from the decode engine, or from the prefill
    engine for those that ended on their first token)."""
    for r in requests:
        prefill.add_request(r.request_id, r.prompt_token_ids, r.sampling_params)
    final: dict[str, RequestOutput] = {}
    closed = False
    while not (closed and receiver.done and not decode.has_unfinished_requests()):
        if prefill.has_unfinished_requests():
            _keep_finished(prefill.step(), final)
        elif not closed:
            prefill.kv_sender.close()
            closed = True
        receiver.poll()
        if decode.has_unfinished_requests():
            _keep_finished(decode.step(), final)
    return final


def run_rank(engine: Engine, requests: list[TraceRequest],
             receiver: KVReceiver | None = None) -> dict[str, RequestOutput]:
    """One side of a pair in its own process: the prefill engine serves `requests` and closes
    its link; the decode engine (given its `receiver`) serves what arrives until the prefill
    side closed and everything ended. Returns the final outputs of the requests that ended on
    this side."""
    final: dict[str, RequestOutput] = {}
    if engine.config.role == "prefill":
        for r in requests:
            engine.add_request(r.request_id, r.prompt_token_ids, r.sampling_params)
        while engine.has_unfinished_requests():
            _keep_finished(engine.step(), final)
        engine.kv_sender.close()
        return final
    while True:
        receiver.poll(wait=not engine.has_unfinished_requests())
        if engine.has_unfinished_requests():
            _keep_finished(engine.step(), final)
        elif receiver.done:
            return final


def _keep_finished(outputs: list[RequestOutput], final: dict[str, RequestOutput]) -> None:
    final.update((o.request_id, o) for o in outputs if o.finished)


def pair_engine(model: str, rank: int, tag: int = 0, **kwargs) -> tuple[Engine, KVReceiver | None]:
    """This rank's engine of a torchrun pair (PREFILL_RANK prefills, DECODE_RANK decodes) over
    a TorchDistributedConnector and, on the decode rank, its receiver. torch.distributed must
    be initialised; `tag` keeps apart several pairs of the same two ranks."""
    if rank == PREFILL_RANK:
        device = torch.device(kwargs.get("device", "cpu"))
        producer = TorchDistributedConnector(role="producer", peer=DECODE_RANK, device=device,
                                             tag=tag)
        return prefill_engine(model, producer, **kwargs), None
    engine = Engine(model, role="decode", **kwargs)
    kv = engine.kv_cache
    consumer = TorchDistributedConnector(
        role="consumer", peer=PREFILL_RANK, device=kv.k.device, tag=tag,
        num_layers=engine.model_config.num_layers, kv_shape=tuple(kv.k.shape[3:]),
        dtype=kv.k.dtype)
    return engine, KVReceiver(engine, consumer)


# -- python -m nanorun.disagg ------------------------------------------------------------------
def trace_requests(trace: str, num_requests: int, vocab_size: int, max_prompt: int,
                   max_output: int, seed: int = 0) -> list[TraceRequest]:
    """A trace's prompt and output lengths (capped) with random prompt tokens; greedy,
    ignore_eos, so every request produces exactly its trace output length."""
    from .benchmark.traces import load_trace

    t = load_trace(trace, num_requests=num_requests, seed=seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, o) in enumerate(zip(t.prompt_lens, t.output_lens)):
        prompt = torch.randint(0, vocab_size, (min(int(p), max_prompt),), generator=g).tolist()
        sp = SamplingParams(max_tokens=min(int(o), max_output), temperature=0.0,
                            ignore_eos=True)
        out.append(TraceRequest(f"r{i}", prompt, sp))
    return out


def _one_engine_tokens(model: str, requests: list[TraceRequest], kwargs) -> dict[str, list[int]]:
    engine = Engine(model, **kwargs)
    for r in requests:
        engine.add_request(r.request_id, r.prompt_token_ids, r.sampling_params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        tokens.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
    return tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanorun.disagg",
        description="Serve a trace on a prefill engine (rank 0) and a decode engine (rank 1), "
                    "the KV sent layer by layer. Launch with torchrun --nproc-per-node 2.")
    parser.add_argument("model")
    parser.add_argument("--trace", default="azure-code")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=256, help="cap on prompt lengths")
    parser.add_argument("--max-output", type=int, default=32, help="cap on output lengths")
    parser.add_argument("--layout", default="overlap")
    parser.add_argument("--max-batch-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--check", action="store_true",
                        help="rank 0 then serves the trace on one 'both' engine and reports "
                             "whether the pair produced exactly its tokens")
    parser.add_argument("--out", help="JSON file for the results (rank 0 writes it)")
    args = parser.parse_args(argv)
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank = dist.get_rank()
    if dist.get_world_size() != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2: rank 0 prefills, rank 1 decodes")
    device = f"cuda:{rank}" if backend == "nccl" else args.device
    kwargs = dict(layout=args.layout, device=device, max_batch_tokens=args.max_batch_tokens,
                  kv_cache_tokens=args.kv_cache_tokens)
    engine, receiver = pair_engine(args.model, rank, **kwargs)
    requests = trace_requests(args.trace, args.num_requests, engine.model_config.vocab_size,
                              args.max_prompt, args.max_output)
    start = time.perf_counter()
    final = run_rank(engine, requests, receiver)
    seconds = time.perf_counter() - start
    kv = engine.kv_cache
    mine = {"role": engine.config.role, "seconds": seconds, "finished": len(final),
            "output_tokens": sum(len(o.outputs[0].token_ids) for o in final.values()),
            "pages": kv.num_pages, "free_pages_at_end": kv.num_free_pages,
            "waited_for_pages": receiver.waited if receiver else 0}
    tokens = {k: o.outputs[0].token_ids for k, o in final.items()}
    both: list = [None, None]
    dist.all_gather_object(both, (mine, tokens))
    both, tokens = [m for m, _ in both], {k: t for _, side in both for k, t in side.items()}
    if rank == PREFILL_RANK:
        report = {"command": "torchrun --nproc-per-node 2 -m nanorun.disagg "
                             + " ".join(sys.argv[1:] if argv is None else argv),
                  "model": args.model, "trace": args.trace, "requests": len(requests),
                  "layout": engine.executor.layout_name, "ranks": both,
                  "pages_conserved": all(r["free_pages_at_end"] == r["pages"] for r in both),
                  "all_finished": sorted(tokens) == sorted(r.request_id for r in requests)}
        if args.check:
            report["tokens_match_one_engine"] = tokens == _one_engine_tokens(
                args.model, requests, kwargs)
        print(json.dumps(report, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
