"""The host time of one engine step, phase by phase, with the device's work taken away.

    python bench/host_overhead.py [--requests 64 256 512 1024] [--steps 48] [--warmup 8]
                                  [--out bench/results/cpu/host_overhead.json]

A Llama-3-8B-shaped model (32 layers, the real op list, so the real launch and event counts)
whose ops cost nothing: `NullModel.run_op` returns at once, the KV cache has the real page
counts but one head of dimension 1, and the logits are a fixed [N, V_small] block (--vocab).
What is left, and timed, is the host path of `Engine.step()`:
    schedule   Scheduler.schedule(), first-scheduled stamps, spread_order
    batch      build_batch()
    plan       Planner.plan() (cached per batch shape; misses are counted)
    issue      Executor.run_plan(): issue() onto `HostStreams`, which runs each enqueued
               closure at once and counts enqueues, records and waits. Not in it: the CUDA
               API calls (a stream switch and SM budget per enqueue, event record/wait) and
               each op's own torch dispatch inside run_op, which on a GPU are host time too;
               what is timed is nanorun's own issue path around them
    sample     the Sampler over the stand-in logits: its tensor ops on a small vocabulary
               cost their dispatch, not V's arithmetic (which is the device's on a GPU)
    bookkeeping num_computed_tokens, append_token, retiring finished requests, the outputs
`_step` mirrors Engine.step (nanorun/engine.py) phase for phase and no more; should Engine
grow a hook for timing its phases, that hook should replace this mirror.

Workload: R requests already decoding (prompts of 128..2048 tokens, outlasting the run) and a
queue of prompts (64..1024 tokens) that end with their first token: every step is R decode
tokens (as many as the dense batch holds) plus prompt chunks filling the rest, as Dynamic
SplitFuse forms it, and the prompts it completes retire; the running count stays at R.
Medians (and minima) over the served steps after a warm-up; the machine may be shared, so the
spread is reported too. Before/after a change: run it on both trees and pass the first result
as --before to the second, which keeps it in a "before" section.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

PHASES = ("schedule", "batch", "plan", "issue", "sample", "bookkeeping")


class NullModel:
    """The model's interface (layer_ops, config, workspace, embed, run_op, logits) at zero
    device cost: every op returns at once, the logits are a fixed block sliced per batch."""

    def __init__(self, config, vocab: int, max_rows: int) -> None:
        from nanorun.models import layer_ops

        self.config = config
        self.layer_ops = layer_ops(1)
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self._logits = torch.randn(max_rows, vocab, generator=torch.Generator().manual_seed(0))

    def new_workspace(self, max_tokens: int):
        return None

    def embed(self, ws, batch, t0: int, t1: int) -> None:
        pass

    def run_op(self, name: str, layer: int, ws, batch, kv, t0: int, t1: int) -> None:
        pass

    def logits(self, ws, batch) -> torch.Tensor:
        return self._logits[: batch.sample_indices.shape[0]]


def kv_pages(tokens: int, page: int) -> int:
    return -(-tokens // page)


class HostStreams:
    """Streams that run work at once and count what issue() asks of a GPU's streams."""

    def __init__(self) -> None:
        self.enqueues = self.records = self.waits = 0

    def enqueue(self, stream: int, fn) -> None:
        self.enqueues += 1
        fn()

    def record(self, stream: int):
        self.records += 1
        return self.records

    def wait(self, stream: int, event) -> None:
        self.waits += 1

    def flush(self) -> None:
        pass


class GraphProbe(HostStreams):
    """Streams whose captures are only counted: fed every served batch through the CUDA
    backend's IterationGraphs (untimed), they say how often graphs would be captured (a
    padded size first seen, or page tables outgrowing the fixed buffers)."""

    def __init__(self) -> None:
        super().__init__()
        self.captures = 0

    def capture(self, fn):
        self.captures += 1
        return self.captures

    def replay(self, graph) -> None:
        pass


def _layouts(tuned_path: Path):
    """(name, layout, dense batch): the built-ins at 1024, the tuned one at its own size."""
    from nanorun.layout import Layout

    out = [("sequential", "sequential", 1024), ("overlap", "overlap", 1024)]
    if tuned_path.exists():
        tuned = Layout.from_dict(json.loads(tuned_path.read_text())["layout"])
        out.append(("tuned", tuned, tuned.batch_tokens))
    return out


def _parts(layout, batch_tokens: int, running: int, sampled: bool, vocab: int, seed: int,
           steps: int):
    """The engine's pieces around `running` decoding requests that outlast `steps` steps, and
    prompts that finish as they are prefilled (max_tokens=1), so that the running count stays
    at `running` (plus the prompts in flight) while every step still mixes decode tokens,
    prompt chunks and retirements."""
    from nanorun.executor import Executor
    from nanorun.kv_cache import KVCache
    from nanorun.models import get_preset
    from nanorun.request import Request, RequestStatus
    from nanorun.sampler import Sampler
    from nanorun.sampling_params import SamplingParams
    from nanorun.scheduler import Scheduler
    from nanorun.search import get_device

    cfg, rng, page = get_preset("llama-3-8b"), random.Random(seed), 16
    how = dict(temperature=0.8, top_k=20, top_p=0.95) if sampled else dict(temperature=0.0)
    prompt = lambda lo, hi: [rng.randrange(cfg.vocab_size)] * rng.randint(lo, hi)  # noqa: E731
    decoding = [Request(f"d{i}", prompt(128, 2048), SamplingParams(max_tokens=steps + 16, **how),
                        0.0, ()) for i in range(running)]
    queued = [Request(f"q{i}", prompt(64, 1024), SamplingParams(max_tokens=1, **how), 0.0, ())
              for i in range(steps * max(0, batch_tokens - running) // 64 + 8)]
    # Decoders' whole lives, plus what prompts in flight can hold at once (at most a batch of
    # tokens, and a partial page each).
    pages = sum(kv_pages(len(r.prompt_token_ids) + r.sampling_params.max_tokens, page)
                for r in decoding) + 2 * batch_tokens // page + batch_tokens // 64 + 16
    kv = KVCache(num_layers=cfg.num_layers, num_pages=pages, page_size=page, num_kv_heads=1,
                 head_dim=1, dtype=torch.float32, device=torch.device("cpu"))
    sched = Scheduler(kv, batch_tokens)
    for r in decoding:          # prefilled already: its first token sampled, its KV cached
        r.append_token(0, 0.0)
        kv.grow(r, r.num_tokens)
        r.num_computed_tokens = len(r.prompt_token_ids)
        r.status = RequestStatus.RUNNING
        sched.running.append(r)
    for r in queued:
        sched.add(r)
    model = NullModel(cfg, vocab, batch_tokens)
    streams = HostStreams()
    executor = Executor(model, kv, batch_tokens, layout, get_device("h100"), streams=streams,
                        graphs=False)
    try:
        sampler = Sampler()
    except TypeError:           # the per-row host sampler of before issue 14 took a seed
        sampler = Sampler(0)
    return sched, kv, executor, streams, sampler


def _step(sched, kv, executor, sampler, requests_done: list) -> tuple[dict, object, int]:
    """One Engine.step, phase by phase (see the module docstring). Returns the phase times in
    ms, the plan and the batch."""
    from nanorun.batch import build_batch, spread_order

    t = [time.perf_counter()]
    out = sched.schedule()
    for chunk in out.chunks:
        if chunk.request.metrics.first_scheduled_time is None:
            chunk.request.metrics.first_scheduled_time = t[0]
    chunks = [out.chunks[i] for i in spread_order([c.request.is_decoding for c in out.chunks],
                                                  [c.length for c in out.chunks])]
    t.append(time.perf_counter())
    batch = build_batch(chunks, kv.page_size, executor.model.device)
    t.append(time.perf_counter())
    plan = executor.planner.plan(batch)
    t.append(time.perf_counter())
    logits = executor.run_plan(plan, batch)
    t.append(time.perf_counter())
    sampling = [c.request for c in chunks if c.samples]
    sampled = sampler(logits, sampling)
    tokens, errors = (sampled.tokens, sampled.errors) if hasattr(sampled, "tokens") else sampled
    t.append(time.perf_counter())
    now = time.perf_counter()
    for chunk in out.chunks:
        chunk.request.num_computed_tokens += chunk.length
    for row, (request, token) in enumerate(zip(sampling, tokens)):
        if row in errors:
            request.finish("error", now, errors[row])
        else:
            request.append_token(token, now)
        if request.finished:
            sched.remove(request)
            requests_done.append(request)
    outputs = [r.to_output() for r in sampling]
    t.append(time.perf_counter())
    assert len(outputs) == len(sampling)
    return {p: (b - a) * 1e3 for p, a, b in zip(PHASES, t, t[1:])}, plan, batch


def measure(name: str, layout, batch_tokens: int, running: int, sampled: bool, *, steps: int,
            warmup: int, vocab: int, seed: int = 0) -> dict:
    """One row: per-phase medians over `steps` served steps after `warmup` unmeasured ones."""
    sched, kv, executor, streams, sampler = _parts(layout, batch_tokens, running, sampled,
                                                   vocab, seed, warmup + steps)
    from nanorun.backends.graphs import IterationGraphs
    from nanorun.planner import Planner

    probe = GraphProbe()
    graphs = IterationGraphs(probe, Planner(executor.model.layer_ops, executor.model.config
                                            .num_layers, executor.layout),
                             batch_tokens, "cpu", executor._launcher)
    done: list = []
    seen: dict[int, object] = {}        # plans by id, kept alive so that ids stay unique
    rows, misses, miss_ms, hit_ms, batches, sizes = [], 0, [], [], [], set()
    with torch.inference_mode():
        for i in range(warmup + steps):
            before = (streams.enqueues, streams.records, streams.waits)
            phases, plan, batch = _step(sched, kv, executor, sampler, done)
            miss = id(plan) not in seen
            seen.setdefault(id(plan), plan)
            batches.append(batch)
            if i < warmup:
                continue
            sizes.add(batch.num_tokens)
            misses += miss
            (miss_ms if miss else hit_ms).append(phases["plan"])
            counts = [a - b for a, b in zip((streams.enqueues, streams.records, streams.waits),
                                            before)]
            rows.append((phases, len(plan.launches), counts, batch.num_tokens,
                         len(sched.running)))
        # Afterwards, so that the probe's work does not run between (and cool the caches of)
        # the timed steps.
        for i, batch in enumerate(batches):
            if i == warmup:
                captures = -probe.captures
            graphs.enqueue(batch)
        captures += probe.captures
    host = [sum(p.values()) for p, *_ in rows]
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    return {
        "layout": name, "batch_tokens": batch_tokens, "running_requests": running,
        "sampling": "sampled" if sampled else "greedy", "async_scheduling": False,
        "host_ms": med(host), "host_ms_min": round(min(host), 3),
        "host_ms_p90": round(sorted(host)[int(0.9 * (len(host) - 1))], 3),
        # On a loaded machine the OS takes the CPU for a time slice (~4 ms) in many steps, in
        # whichever phase is running: each phase's median mostly misses it, so their sum
        # estimates the unloaded step where the median of whole steps may not.
        "phase_medians_sum_ms": round(sum(statistics.median(p[ph] for p, *_ in rows)
                                          for ph in PHASES), 3),
        # step() is synchronous: the device waits through the whole host path.
        "exposed_host_ms": med(host),
        "breakdown_ms": {ph: med([p[ph] for p, *_ in rows]) for ph in PHASES},
        "breakdown_min_ms": {ph: round(min(p[ph] for p, *_ in rows), 3) for ph in PHASES},
        "launches_per_step": med([n for _, n, *_ in rows]),
        "enqueues_per_step": med([c[0] for _, _, c, *_ in rows]),
        "events_per_step": med([c[1] for _, _, c, *_ in rows]),
        "waits_per_step": med([c[2] for _, _, c, *_ in rows]),
        "issue_us_per_launch": round(1e3 * statistics.median(
            p["issue"] / n for p, n, *_ in rows), 2),
        "issue_us_per_launch_min": round(1e3 * min(p["issue"] / n for p, n, *_ in rows), 2),
        "tokens_per_step": med([r[3] for r in rows]),
        "running_mean": round(statistics.mean(r[4] for r in rows), 1),
        "preemptions": sum(r.metrics.num_preemptions
                           for r in [*sched.running, *sched.waiting]),
        "plan_cache": {"steps": steps, "misses": misses, "miss_rate": round(misses / steps, 3),
                       "miss_plan_ms": med(miss_ms) if miss_ms else None,
                       "hit_plan_ms": med(hit_ms) if hit_ms else None},
        # What CUDA graphs would do with these batches (captured on the warm-up's first use):
        # a capture is a miss that runs eagerly and then captures.
        "graph_cache": {"steps": steps, "captures": captures,
                        "miss_rate": round(captures / steps, 3),
                        "batch_sizes": sorted(sizes)},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[64, 256, 512, 1024])
    ap.add_argument("--layouts", nargs="+", default=["sequential", "overlap", "tuned"])
    ap.add_argument("--sampling", nargs="+", default=["greedy", "sampled"])
    ap.add_argument("--steps", type=int, default=48, help="measured steps per row")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32,
                    help="the stand-in logits' width: the sampler's [N, V] arithmetic is the "
                         "device's on a GPU, so V is kept small enough that what is left is its "
                         "dispatch and per-request work (at 256, CPU sorting added ~6 ms a step "
                         "at 512 sampled rows)")
    ap.add_argument("--tuned", default="bench/results/cpu/tune_speed.json",
                    help="the JSON bench/tune_speed.py wrote; its layout is 'tuned'")
    ap.add_argument("--before", help="a previous result of this bench to keep as 'before'")
    ap.add_argument("--before-code", default=None,
                    help="what code the --before result measured (say which commit)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch's CPU threads: the stand-in's tensor ops stand for device work, "
                         "and on a shared machine a second thread only adds contention")
    ap.add_argument("--out", default="bench/results/cpu/host_overhead.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    from nanorun.benchmark.environment import command_line, describe

    rows = []
    for name, layout, batch_tokens in _layouts(Path(args.tuned)):
        if name not in args.layouts:
            continue
        for running in args.requests:
            for sampling in args.sampling:
                row = measure(name, layout, batch_tokens, running, sampling == "sampled",
                              steps=args.steps, warmup=args.warmup, vocab=args.vocab)
                rows.append(row)
                b = row["breakdown_ms"]
                print(f"{name:10s} R={running:5d} {sampling:7s} host {row['host_ms']:7.2f} ms "
                      f"(" + " ".join(f"{k} {v:.2f}" for k, v in b.items()) + f") "
                      f"{row['launches_per_step']:.0f} launches "
                      f"{row['issue_us_per_launch']:.2f} us/launch, plan misses "
                      f"{row['plan_cache']['misses']}/{args.steps}", flush=True)
    doc = {
        "command": command_line(argv if argv is None else ["bench/host_overhead.py", *argv]),
        "environment": describe(torch.device("cpu")),
        "model": "llama-3-8b (32 layers, 10 ops a layer; ops of zero cost)",
        "device_spec": "h100 (layouts validated against it)",
        "stand_in_vocab": args.vocab, "steps": args.steps, "warmup": args.warmup,
        "torch_threads": args.threads,
        "load_average_before": [round(x, 2) for x in load_before],
        "notes": "host_ms: the whole host path of one Engine.step; exposed_host_ms: what the "
                 "device waits for (all of it: step() is synchronous). issue is nanorun's own "
                 "issue path: it excludes the CUDA API calls (enqueues_per_step stream "
                 "switches, events_per_step records, waits_per_step waits) and the ops' torch "
                 "dispatch. Built-in layouts at a 1024-token dense batch, 'tuned' at its own "
                 "(the layout in bench/results/cpu/tune_speed.json). One torch thread: the "
                 "stand-in's small tensor ops stand for device work. The machine is shared "
                 "(see load_average_*): host_ms is the median of whole steps, which includes "
                 "the OS's time slices for other processes; host_ms_min and "
                 "phase_medians_sum_ms estimate the step on a quiet core.",
        "rows": rows,
    }
    doc["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if args.before:
        prev = json.loads(Path(args.before).read_text())
        doc["before"] = {k: prev[k] for k in ("command", "environment", "rows")}
        doc["before"]["code"] = args.before_code
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
