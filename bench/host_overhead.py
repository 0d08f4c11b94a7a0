"""The host time of one engine step, phase by phase, with the device's work taken away, and
what of it the device would wait for, synchronous and with async scheduling.

    python bench/host_overhead.py [--requests 64 256 512 1024] [--steps 48] [--warmup 8]
                                  [--async-scheduling off on] [--device-ms 21]
                                  [--out bench/results/cpu/host_overhead.json]

A Llama-3-8B-shaped model (32 layers, the real op list, so the real launch and event counts)
whose ops cost nothing: `NullModel.run_op` returns at once, the KV cache has the real page
counts but one head of dimension 1, and the logits are a fixed [N, V_small] block (--vocab).
What is left, and timed, is the host path of the real `Engine.step()` (launch, then retire;
async: launch i + 1, then retire i), phase by phase through wrappers around its parts:
    schedule   Scheduler.schedule()
    batch      build_batch()
    plan       Planner.plan() (cached per batch shape; misses are counted)
    issue      Executor.run_plan(): issue() onto `HostStreams`, which runs each enqueued
               closure at once and counts enqueues, records and waits. Not in it: the CUDA
               API calls (a stream switch and SM budget per enqueue, event record/wait) and
               each op's own torch dispatch inside run_op, which on a GPU are host time too;
               what is timed is nanorun's own issue path around them
    sample     the Sampler over the stand-in logits: its tensor ops on a small vocabulary
               cost their dispatch, not V's arithmetic (which is the device's on a GPU)
               (prepare on the host, the device ops' dispatch, the read-back and lists)
    bookkeeping the rest of step(): first-scheduled stamps, spread_order, the pending counts,
               append_token, retiring finished requests, the outputs
host_ms is their sum: the step's wall time less the time asleep in the sync.

The device is a clock (`DeviceTimeline`): an iteration takes --device-ms, starting once the
device is free and the host has issued it; the host's sync sleeps until it ends. The
device's idle time before each iteration is `exposed_host_ms`: all of the host path when
step() is synchronous, only what does not fit behind the running iteration with async
scheduling. (The sync's own cost on a GPU, an event wait on a pinned copy, is not in it.)

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
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from types import SimpleNamespace

import torch

from nanorun.backends.inflight import DeviceQueue, InFlight

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


class DeviceTimeline(DeviceQueue):
    """A device that takes device_ms per iteration, kept as a clock. submit() runs the
    (zero-cost) work at once, then books the iteration on the timeline: it starts when the
    device is free and the host has issued it (the end of the issue loop and the sampler's
    launches, so a device that runs dry waits for all of them), and ends device_ms later.
    result() sleeps until that end: the host's sync. gaps: how long the device sat idle before
    each iteration, which is what the host made it wait for; waited: the host's time asleep."""

    def __init__(self, device_ms: float) -> None:
        self.device_s = device_ms / 1e3
        self.free: float | None = None
        self.gaps: list[float] = []
        self.waited = 0.0

    def submit(self, work) -> InFlight:
        out = work()
        now = time.perf_counter()
        start = now if self.free is None else max(now, self.free)
        if self.free is not None:
            self.gaps.append(start - self.free)
        self.free = start + self.device_s
        return _Booked(self, out, self.free)


class _Booked(InFlight):
    def __init__(self, timeline: DeviceTimeline, out, end: float) -> None:
        self.timeline, self.out, self.end = timeline, out, end

    def result(self):
        t = time.perf_counter()
        if self.end > t:
            time.sleep(self.end - t)
        self.timeline.waited += time.perf_counter() - t
        self.out.host_tokens, self.out.host_ok = self.out.tokens, self.out.ok
        return self.out


class PhaseClock:
    """Milliseconds spent in each phase, from wrappers around the engine's parts."""

    def __init__(self) -> None:
        self.ms = dict.fromkeys(PHASES, 0.0)

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.ms[phase] += (time.perf_counter() - t) * 1e3
        return timed


def _engine(layout, batch_tokens: int, running: int, sampled: bool, vocab: int, seed: int,
            steps: int, async_scheduling: bool, device_ms: float):
    """An Engine (the real step(), launch() and retire()) over parts built around `running`
    decoding requests that outlast `steps` steps, and prompts that finish as they are
    prefilled (max_tokens=1), so that the running count stays at `running` (plus the prompts
    in flight) while every step still mixes decode tokens, prompt chunks and retirements.
    Engine.__init__ would build a real model: the parts are set here instead, under the
    attribute names Engine.__init__ gives them."""
    from nanorun.config import EngineConfig
    from nanorun.engine import Engine
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
        sched.add(r)                # queued in arrival order, then moved to the running batch
        sched.waiting.remove(r)
        sched.running.append(r)
    for r in queued:
        sched.add(r)
    streams = HostStreams()
    engine = object.__new__(Engine)
    engine.config = EngineConfig(model=cfg.name, max_batch_tokens=batch_tokens,
                                 async_scheduling=async_scheduling)
    engine.device = torch.device("cpu")
    engine.model_config = SimpleNamespace(vocab_size=vocab)      # the stand-in logits' width
    engine.kv_cache, engine.scheduler, engine.sampler = kv, sched, Sampler()
    engine.executor = Executor(NullModel(cfg, vocab, batch_tokens), kv, batch_tokens, layout,
                               get_device("h100"), streams=streams, graphs=False)
    engine.requests = {r.request_id: r for r in (*decoding, *queued)}
    engine._aborted, engine._in_flight, engine.kv_sender = [], None, None
    engine._device_queue = DeviceTimeline(device_ms)
    return engine, streams


def _instrument(engine):
    """Time the engine's parts phase by phase; returns the clock, lists that collect each
    step's plans and batches, and what undoes the one module-level wrapper (build_batch)."""
    import nanorun.engine as engine_module

    clock, plans, batches = PhaseClock(), [], []
    sched, ex, sampler = engine.scheduler, engine.executor, engine.sampler
    sched.schedule = clock.wrap("schedule", sched.schedule)
    build = engine_module.build_batch

    def build_batch(*args, **kwargs):
        batch = build(*args, **kwargs)
        batches.append(batch)
        return batch

    engine_module.build_batch = clock.wrap("batch", build_batch)
    plan = ex.planner.plan

    def planned(batch):
        plans.append(plan(batch))
        return plans[-1]

    ex.planner.plan = clock.wrap("plan", planned)
    ex.run_plan = clock.wrap("issue", ex.run_plan)
    for name in ("prepare", "sample", "finish"):
        setattr(sampler, name, clock.wrap("sample", getattr(sampler, name)))
    return clock, plans, batches, lambda: setattr(engine_module, "build_batch", build)


def measure(name: str, layout, batch_tokens: int, running: int, sampled: bool, *, steps: int,
            warmup: int, vocab: int, async_scheduling: bool = False, device_ms: float = 21.0,
            seed: int = 0) -> dict:
    """One row: per-phase medians over `steps` served steps after `warmup` unmeasured ones."""
    engine, streams = _engine(layout, batch_tokens, running, sampled, vocab, seed,
                              warmup + steps, async_scheduling, device_ms)
    from nanorun.backends.graphs import IterationGraphs
    from nanorun.planner import Planner

    executor, timeline = engine.executor, engine._device_queue
    probe = GraphProbe()
    graphs = IterationGraphs(probe, Planner(executor.model.layer_ops, executor.model.config
                                            .num_layers, executor.layout),
                             batch_tokens, "cpu", executor._launcher)
    clock, plans, batches, restore = _instrument(engine)
    seen: dict[int, object] = {}        # plans by id, kept alive so that ids stay unique
    rows, misses, miss_ms, hit_ms, sizes = [], 0, [], [], set()
    try:
        with torch.inference_mode():
            for i in range(warmup + steps):
                before = (streams.enqueues, streams.records, streams.waits)
                clock.ms = dict.fromkeys(PHASES, 0.0)
                gaps, waited = len(timeline.gaps), timeline.waited
                t = time.perf_counter()
                engine.step()
                total = (time.perf_counter() - t) * 1e3
                if i < warmup:
                    for plan in plans:
                        seen.setdefault(id(plan), plan)
                    continue
                phases = dict(clock.ms)
                host = total - (timeline.waited - waited) * 1e3
                phases["bookkeeping"] = host - sum(phases.values())
                plan, batch = plans[-1], batches[-1]
                miss = id(plan) not in seen
                seen.setdefault(id(plan), plan)
                sizes.add(batch.num_tokens)
                misses += miss
                (miss_ms if miss else hit_ms).append(phases["plan"])
                counts = [a - b for a, b in zip((streams.enqueues, streams.records,
                                                 streams.waits), before)]
                gap = sum(timeline.gaps[gaps:]) * 1e3
                rows.append((phases, len(plan.launches), counts, batch.num_tokens,
                             len(engine.scheduler.running), host, gap))
            # Afterwards, so that the probe's work does not run between (and cool the caches
            # of) the timed steps.
            for i, batch in enumerate(batches):
                if i == warmup:
                    captures = -probe.captures
                graphs.enqueue(batch)
            captures += probe.captures
    finally:
        restore()
    host = [r[5] for r in rows]
    med = lambda xs: round(statistics.median(xs), 3)  # noqa: E731
    return {
        "layout": name, "batch_tokens": batch_tokens, "running_requests": running,
        "sampling": "sampled" if sampled else "greedy", "async_scheduling": async_scheduling,
        "host_ms": med(host), "host_ms_min": round(min(host), 3),
        "host_ms_p90": round(sorted(host)[int(0.9 * (len(host) - 1))], 3),
        # On a loaded machine the OS takes the CPU for a time slice (~4 ms) in many steps, in
        # whichever phase is running: each phase's median mostly misses it, so their sum
        # estimates the unloaded step where the median of whole steps may not.
        "phase_medians_sum_ms": round(sum(statistics.median(p[ph] for p, *_ in rows)
                                          for ph in PHASES), 3),
        # The device's idle time before each iteration, on the DeviceTimeline.
        "exposed_host_ms": med([r[6] for r in rows]),
        "exposed_host_ms_p90": round(sorted(r[6] for r in rows)[int(0.9 * (len(rows) - 1))], 3),
        "device_ms": device_ms,
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
                           for r in [*engine.scheduler.running, *engine.scheduler.waiting]),
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
    ap.add_argument("--async-scheduling", nargs="+", default=["off", "on"],
                    choices=["off", "on"], help="Engine(async_scheduling=...) to run")
    ap.add_argument("--device-ms", type=float, default=21.0,
                    help="the device's time per iteration on the DeviceTimeline (issue 14's "
                         "estimate: Llama-3-8B, 1024 tokens, 790 TFLOP/s)")
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

    from nanorun.benchmark.environment import write_result

    rows = []
    for name, layout, batch_tokens in _layouts(Path(args.tuned)):
        if name not in args.layouts:
            continue
        for running in args.requests:
            for sampling, mode in itertools.product(args.sampling, args.async_scheduling):
                row = measure(name, layout, batch_tokens, running, sampling == "sampled",
                              steps=args.steps, warmup=args.warmup, vocab=args.vocab,
                              async_scheduling=mode == "on", device_ms=args.device_ms)
                rows.append(row)
                b = row["breakdown_ms"]
                print(f"{name:10s} R={running:5d} {sampling:7s} async {mode:3s} host "
                      f"{row['host_ms']:7.2f} ms exposed {row['exposed_host_ms']:6.2f} ms "
                      f"(" + " ".join(f"{k} {v:.2f}" for k, v in b.items()) + f") "
                      f"{row['launches_per_step']:.0f} launches "
                      f"{row['issue_us_per_launch']:.2f} us/launch, plan misses "
                      f"{row['plan_cache']['misses']}/{args.steps}", flush=True)
    doc = {
        "model": "llama-3-8b (32 layers, 10 ops a layer; ops of zero cost)",
        "device_spec": "h100 (layouts validated against it)",
        "stand_in_vocab": args.vocab, "steps": args.steps, "warmup": args.warmup,
        "torch_threads": args.threads,
        "load_average_before": [round(x, 2) for x in load_before],
        "device_ms": args.device_ms,
        "notes": "host_ms: the whole host path of one Engine.step; exposed_host_ms: the "
                 "device's idle time before an iteration, on a device that takes device_ms an "
                 "iteration (the median; see the bench's docstring): with async_scheduling "
                 "false it is the whole host path, with true what does not hide behind the "
                 "running iteration. issue is nanorun's own "
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
    write_result(doc, args.out, argv=None if argv is None else ["bench/host_overhead.py", *argv])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
