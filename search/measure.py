"""Measuring on a real device: what calibrates the cost model and checks what it predicts.

Three uses, one rig:
  * `nanorun profile` (`profile()`): each layer op timed over token counts x SM counts, decode
    attention at a stated context, two ops overlapping on disjoint partitions (interference),
    and the device's own large-GEMM rate and copy bandwidth. Written as a search.profile
    Profile, which the cost model loads with `--profile`.
  * `nanorun tune --measure` (`measure_layouts()`): whole iterations of the best candidate
    layouts timed on the engine's own executor; the measured winner is kept.
  * the calibration report (bench/calibration.py, same function): predicted against measured
    iteration times, per layout and mix.

The rig runs the engine's model code (random weights, the kernels `select_kernels` picks) on
synthetic batches built from an IterationMix: decode tokens at their contexts and prompt chunks,
over a paged KV cache filled with random values (never all zeros). SM counts are real
partitions: the CUDA backend's own `CudaStreams` (green contexts where the driver allows, else
plain streams with SM budgets; `Rig.partitions_how` says which). Timing: CUDA events around
`reps` back-to-back launches after warm-up, queued behind a short GPU sleep so that the host's
launch rate is not what gets timed, the median of `rounds` such timings (whole iterations are
timed end to end, host included, as the engine runs them); on the CPU, perf_counter (no SM
partitions: one column, and no pairs).
"""

from __future__ import annotations

import dataclasses

import datetime
import math
import platform
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import torch

from nanorun.benchmark.ceilings import measure as measure_ceilings, median_seconds
from nanorun.layout import Layout, Partition
from nanorun.models import GEMM, NETWORK, ModelConfig, OpSpec, resolve_model
from nanorun.planner import LOGITS

from .costmodel import prefill_entry
from .profile import OpProfile, Profile
from .workload import IterationMix

DEFAULT_TOKENS = (16, 64, 256, 1024, 4096)
DEFAULT_CONTEXT = 1024
PAGE_SIZE = 16
# Message sizes of the collective sweep at tp > 1: 4 KiB (a decode batch's all-reduce is tens
# of KiB) to 64 MiB (a 4096-token prefill chunk of an 8192-wide model), every factor of 4.
DEFAULT_COLLECTIVE_BYTES = tuple(4**k for k in range(6, 14))
# GPU clock cycles (~10 ms) the main stream sleeps before each timed round of op launches.
HOLD_CYCLES = 20_000_000


@dataclass(frozen=True)
class Timing:
    """How long to time: `reps` launches back to back per timing, the median of `rounds`."""

    warmup: int = 3
    reps: int = 10
    rounds: int = 5


class Rig:
    """One model with random weights on one device, a random paged KV cache and a workspace:
    times single ops on SM partitions, overlapping pairs, and whole iterations under a layout.

    `num_layers` builds fewer layers than the model has (an op's time does not depend on how
    many layers follow it: profiling needs one); iteration timing needs them all.
    `kv_tokens`: KV cache size; sequences beyond it reuse pages (same bytes read, so the same
    time). Default: enough for `max_tokens` decode tokens at `max_context`, capped at half the
    free memory on a GPU.
    """

    def __init__(self, model: str | ModelConfig, device: str | torch.device = "cuda", *,
                 dtype: torch.dtype | None = None, num_layers: int | None = None,
                 max_tokens: int = 4096, max_context: int = 8192,
                 kv_tokens: int | None = None, seed: int = 0, tp: int = 1) -> None:
        from nanorun.device import device_spec
        from nanorun.kernels import select_kernels, select_pointwise
        from nanorun.kv_cache import KVCache
        from nanorun.models import build_model, random_weights

        from nanorun.distributed import setup_tensor_parallel

        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("measuring on device 'cuda' needs a CUDA device, but torch "
                                   f"{torch.__version__} sees none; use --device cpu")
        # tp > 1: one process per rank, started by torchrun (gloo on the CPU, NCCL on GPUs
        # under nanorun's CTA bound), each timing its own shard; the collectives are real.
        self.tensor_parallel = setup_tensor_parallel(tp, self.device)
        self.tp = tp
        if tp > 1:
            self.device = self.tensor_parallel.device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        config = model if isinstance(model, ModelConfig) else resolve_model(model)[0]
        self.full_config = config
        if num_layers is not None:
            if not 1 <= num_layers <= config.num_layers:
                raise ValueError(f"num_layers must be 1..{config.num_layers}, got {num_layers}")
            config = replace(config, num_layers=num_layers)
        self.config = config
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.spec = device_spec(self.device)
        self.max_tokens, self.max_context = max_tokens, max_context
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.kernels = select_kernels(self.device)
        tpc = self.tensor_parallel
        weights = random_weights(config, dtype=self.dtype, device=self.device, seed=seed,
                                 tp_rank=tpc.rank, tp_size=tpc.size)
        self.model = build_model(config, weights, max_model_len=max_context,
                                 attention_fn=self.kernels[0], kv_append_fn=self.kernels[1],
                                 pointwise=select_pointwise(self.device), tp_group=tpc.group)
        local = self.model.local      # this rank's shard: its KV heads only
        per_token = local.kv_bytes_per_token(self.model.w["embed"].element_size())
        if kv_tokens is None:
            kv_tokens = max_tokens * max_context
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                kv_tokens = min(kv_tokens, int(free * 0.5 // per_token))
            else:
                kv_tokens = min(kv_tokens, (1 << 30) // per_token)
        self.kv = KVCache(num_layers=config.num_layers, num_pages=max(1, kv_tokens // PAGE_SIZE),
                          page_size=PAGE_SIZE, num_kv_heads=local.num_kv_heads,
                          head_dim=local.head_dim, dtype=self.dtype, device=self.device)
        for t in (self.kv.k, self.kv.v):
            t.normal_(0.0, 1.0)
        self.ws = self.model.new_workspace(max_tokens)
        for f in dataclasses.fields(self.ws):       # every activation buffer, dense or MoE
            getattr(self.ws, f.name).normal_(0.0, 1.0)
        # What an op's cost depends on by value (a mixture's routing, which `experts` reads)
        # is computed as the model computes it, not left as noise.
        for op in value_inputs(self.model.layer_ops):
            self.model.run_op(op.name, 0, self.ws, None, None, 0, max_tokens)
        self._streams: dict[tuple[int | None, ...], object] = {}
        self.partitions_how = "no SM partitions (CPU)" if self.device.type != "cuda" else \
            "whole device only"

    @classmethod
    def for_mixes(cls, model: str | ModelConfig, device: str | torch.device,
                  mixes: Iterable[IterationMix]) -> "Rig":
        """A whole-model rig big enough for every iteration of `mixes`."""
        mixes = list(mixes)
        return cls(model, device, max_tokens=max(m.num_tokens for m in mixes),
                   max_context=max(m.reach for m in mixes))

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def device_sms(self) -> int | None:
        return self.spec.sm_count if self.is_cuda else None

    # -- batches ---------------------------------------------------------------------------
    def batch(self, mix: IterationMix):
        """The Batch of one iteration of `mix`, laid out as the engine lays out its batches
        (IterationMix.sequences), each sequence on its own run of pages (reused round-robin
        past the cache's end)."""
        from nanorun.batch import Batch

        seqs = [(first, n) for first, n, _ in mix.sequences()]
        T = mix.num_tokens
        if T > self.max_tokens:
            raise ValueError(f"the mix has {T} tokens but the rig holds {self.max_tokens}; "
                             f"build the Rig with max_tokens >= {T}")
        longest = mix.reach
        if longest > self.max_context:
            raise ValueError(f"the mix reaches position {longest} but the rig's rope tables "
                             f"hold {self.max_context}; build the Rig with max_context >= "
                             f"{longest}")
        P, page = self.kv.num_pages, self.kv.page_size
        max_pages = math.ceil(longest / page)
        tables = torch.full((len(seqs), max_pages), -1, dtype=torch.int32)
        positions = torch.empty(T, dtype=torch.int64)
        seq_ids = torch.empty(T, dtype=torch.int32)
        slots = torch.empty(T, dtype=torch.int64)
        starts, t, next_page = [0], 0, 0
        for s, (first, n) in enumerate(seqs):
            pages = (torch.arange(math.ceil((first + n) / page)) + next_page) % P
            next_page += len(pages)
            tables[s, : len(pages)] = pages.to(torch.int32)
            pos = torch.arange(first, first + n)
            positions[t: t + n] = pos
            seq_ids[t: t + n] = s
            slots[t: t + n] = pages[pos // page] * page + pos % page
            t += n
            starts.append(t)
        token_ids = torch.randint(0, self.config.vocab_size, (T,), generator=self.gen)
        sample = torch.tensor([e - 1 for e in starts[1:]], dtype=torch.int64)
        dev = self.device
        return Batch(token_ids.to(dev), positions.to(dev), seq_ids.to(dev), slots.to(dev),
                     tables.to(dev), sample.to(dev), tuple(starts),
                     len(mix.decode_contexts))

    # -- partitions and clocks ---------------------------------------------------------------
    def streams(self, shares: tuple[int | None, ...]):
        """CudaStreams with one partition per share (None: no SM limit), made once per shares."""
        from nanorun.backends.cuda import CudaStreams

        s = self._streams.get(shares)
        if s is None:
            parts = tuple(Partition(f"p{i}", n) for i, n in enumerate(shares))
            s = CudaStreams(Layout("measure", 1, parts, ()), self.device)
            self._streams[shares] = s
            if any(n is not None for n in shares):
                self.partitions_how = s.how
        return s

    def time_op(self, op: str, tokens: int, sms: int | None = None,
                context: int = DEFAULT_CONTEXT, timing: Timing = Timing(),
                prefill: bool = False) -> float:
        """Seconds of one launch of layer op `op` on `tokens` decode tokens at `context` (with
        `prefill`: a prompt's first chunk of `tokens` tokens instead), on a partition of `sms`
        SMs (None: the whole device)."""
        mix = IterationMix((), ((0, tokens),)) if prefill else \
            IterationMix((context,) * tokens, ())
        batch = self.batch(mix)
        fn = self._op(op, batch, tokens)
        if not self.is_cuda:
            return _cpu_time(fn, timing)
        return self._cuda_times([(sms, fn, timing.reps)], timing)[0]

    def time_pair(self, a: tuple[str, int, int], b: tuple[str, int, int],
                  context: int = DEFAULT_CONTEXT, timing: Timing = Timing()) -> dict:
        """Two ops, each (op, tokens, sms), alone on their partitions and then together on
        disjoint ones; seconds per launch. The launch counts are balanced so both streams stay
        busy for the same time."""
        if not self.is_cuda:
            raise RuntimeError("overlapping pairs are measured on a GPU only")
        fns = []
        for op, tokens, _ in (a, b):
            fns.append(self._op(op, self.batch(IterationMix((context,) * tokens, ())), tokens))
        shares = (a[2], b[2])
        alone = [self._cuda_times([(shares[i], fns[i], timing.reps)], timing,
                                  shares=shares, slots=(i,))[0] for i in range(2)]
        reps_b = max(1, round(timing.reps * alone[0] / alone[1]))
        together = self._cuda_times([(a[2], fns[0], timing.reps), (b[2], fns[1], reps_b)],
                                    timing, shares=shares, slots=(0, 1))
        return {"ops": [a[0], b[0]], "tokens": [a[1], b[1]], "sms": [a[2], b[2]],
                "context": context, "alone_s": alone, "together_s": together}

    def time_iteration(self, layout: Layout, mix: IterationMix, timing: Timing = Timing(),
                       executor=None) -> float:
        """Seconds of one whole iteration of `mix` under `layout` on the engine's executor
        (its streams, events and CUDA graphs), logits included."""
        from nanorun.executor import Executor

        if self.config.num_layers != self.full_config.num_layers:
            raise ValueError("iteration timing needs every layer: build the Rig without "
                             "num_layers")
        if executor is None:
            executor = Executor(self.model, self.kv, layout.batch_tokens, layout, self.spec,
                                kernels=self.kernels)
        batch = self.batch(mix)
        return median_seconds(lambda: executor.run(batch), self.device, timing.warmup,
                              timing.rounds)

    def timeline(self, layout: Layout, mix: IterationMix, warmup: int = 2):
        """One iteration of `mix` under `layout`, run eagerly (no CUDA graph) with every launch
        timed: a search.simulate.Schedule of measured starts and ends (seconds from the
        iteration's start), the same shape `nanorun plan` draws from the cost model. On a GPU,
        CUDA events around each launch on its own stream; on the CPU, the launches one after
        another in issue order."""
        from nanorun.backends.streams import MAIN, issue
        from nanorun.executor import Executor
        from nanorun.planner import LOGITS

        from .simulate import Schedule

        executor = Executor(self.model, self.kv, layout.batch_tokens, layout, self.spec,
                            kernels=self.kernels, graphs=False)
        batch = self.batch(mix)
        plan = executor.planner.plan(batch)
        for _ in range(warmup):
            executor.run_plan(plan, batch)
        n = len(plan.launches)
        launch_one = executor._launcher(batch)
        if not self.is_cuda:
            start, end = [0.0] * n, [0.0] * n
            t0 = time.perf_counter()
            for i, launch in enumerate(plan.launches):
                start[i] = time.perf_counter() - t0
                if launch.op == LOGITS:
                    executor._logits(batch)
                else:
                    launch_one(launch)
                end[i] = time.perf_counter() - t0
            return Schedule(plan, tuple(start), tuple(end))

        index = {id(launch): i for i, launch in enumerate(plan.launches)}
        marks: list = [None] * n

        def timed(launch) -> None:
            begin, done = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            begin.record()
            if launch.op == LOGITS:
                executor._logits(batch)
            else:
                launch_one(launch)
            done.record()
            marks[index[id(launch)]] = (begin, done)

        streams = executor.streams
        self.partitions_how = streams.summary
        torch.cuda.synchronize(self.device)
        origin = torch.cuda.Event(enable_timing=True)
        origin.record(streams.stream(MAIN))
        issue(plan, streams, timed)
        logits = next(launch for launch in plan.launches if launch.op == LOGITS)
        streams.enqueue(MAIN, lambda: timed(logits))
        torch.cuda.synchronize(self.device)
        start = tuple(origin.elapsed_time(b) * 1e-3 for b, _ in marks)
        end = tuple(origin.elapsed_time(e) * 1e-3 for _, e in marks)
        return Schedule(plan, start, end)

    def _op(self, op: str, batch, tokens: int) -> Callable[[], None]:
        model, ws, kv = self.model, self.ws, self.kv
        if op == LOGITS:
            return lambda: model.logits(ws, batch)
        if op not in model._ops:
            raise ValueError(f"{self.config.name} has no op {op!r}; its ops: "
                             f"{[o.name for o in model.layer_ops]} and {LOGITS!r}")
        return lambda: model.run_op(op, 0, ws, batch, kv, 0, tokens)

    def _cuda_times(self, launches, timing: Timing, shares=None, slots=None) -> list[float]:
        """Per launch group (sms, fn, reps): seconds per call, all groups started together."""
        shares = shares or tuple(s for s, _, _ in launches)
        slots = slots or tuple(range(len(launches)))
        streams = self.streams(tuple(shares))
        main = torch.cuda.current_stream(self.device)
        for (_, fn, _), slot in zip(launches, slots):
            for _ in range(timing.warmup):
                streams.enqueue(slot, fn)
        torch.cuda.synchronize(self.device)
        samples = [[] for _ in launches]
        for _ in range(timing.rounds):
            # Hold the GPU while Python enqueues the launches: small ops finish faster than
            # they can be launched, and timing them from an idle start would time the host.
            with torch.cuda.stream(main):
                torch.cuda._sleep(HOLD_CYCLES)
            start = torch.cuda.Event(enable_timing=True)
            start.record(main)
            ends = []
            for (_, fn, reps), slot in zip(launches, slots):
                stream = streams.stream(slot)
                stream.wait_event(start)
                for _ in range(reps):
                    streams.enqueue(slot, fn)
                end = torch.cuda.Event(enable_timing=True)
                end.record(stream)
                ends.append(end)
            torch.cuda.synchronize(self.device)
            for i, ((_, _, reps), end) in enumerate(zip(launches, ends)):
                samples[i].append(start.elapsed_time(end) * 1e-3 / reps)
        return [statistics.median(s) for s in samples]


def value_inputs(ops: tuple[OpSpec, ...]) -> list[OpSpec]:
    """The ops, in layer order, that compute the buffers some op's cost depends on by value
    (OpSpec.indexed_by: the expert GEMM's routing in `topk`), back to that op's own inputs
    (router from x, then topk): run once over the workspace, they make the routing the model's
    own function of the (random) inputs, as in a real layer."""
    chosen: set[int] = set()
    for at, op in enumerate(ops):
        if not op.indexed_by:
            continue
        inputs = set(op.reads) - set(op.indexed_by)     # what the op gets as it is (noise)
        todo = list(op.indexed_by)
        while todo:
            buf = todo.pop()
            writers = [i for i in range(at) if buf in ops[i].writes]
            if not writers or writers[-1] in chosen:
                continue
            chosen.add(writers[-1])
            todo += [r for r in ops[writers[-1]].reads if r not in inputs]
    return [ops[i] for i in sorted(chosen)]


def default_pairs(ops: tuple[OpSpec, ...], config: ModelConfig, tp: int = 1
                  ) -> tuple[tuple[str, str], ...]:
    """The pairs NanoFlow overlaps: a compute-bound GEMM beside memory-bound decode attention
    (each op whose cost reads its context), with the layer's GEMMs of most and of fewest FLOPs
    per token (Llama: gate_up and o_proj), so interference is measured at both ends."""
    flops = {op.name: op.work(config, tp).flops_per_token for op in ops
             if op.kind == GEMM and op.cost is not None}
    context = [op.name for op in ops if op.cost is not None
               and op.work(config, tp).reads_context]
    if not flops or not context:
        return ()
    gemms = dict.fromkeys((max(flops, key=flops.get), min(flops, key=flops.get)))
    return tuple((g, a) for g in gemms for a in context)


def _cpu_time(fn: Callable[[], object], timing: Timing) -> float:
    for _ in range(timing.warmup):
        fn()
    samples = []
    for _ in range(timing.rounds):
        t0 = time.perf_counter()
        for _ in range(timing.reps):
            fn()
        samples.append((time.perf_counter() - t0) / timing.reps)
    return statistics.median(samples)


# -- nanorun profile ------------------------------------------------------------------------------
def sm_grid(device_sms: int, granularity: int, points: int = 4) -> tuple[int, ...]:
    """SM counts to profile: `points - 1` partitions at even fractions of the device, rounded
    down to the granularity, then the whole device."""
    grid = {max(granularity, device_sms * k // points // granularity * granularity)
            for k in range(1, points)}
    return tuple(sorted(grid | {device_sms}))


def time_collectives(rig: Rig, nbytes: Iterable[int] = DEFAULT_COLLECTIVE_BYTES,
                     timing: Timing = Timing(), collectives=("all_reduce", "all_gather"),
                     log: Callable[[str], None] = print) -> list[dict]:
    """Seconds of each collective over the rig's tensor-parallel group against message size
    (nccl-tests' sizes: the all-reduce buffer, all-gather's gathered output), timed like the
    ops, the slowest rank's time taken (a collective ends when its last rank arrives) and made
    non-decreasing in size (hardware.isotonic). Every rank must call it. A collective the
    process group's backend lacks is left out (on every rank alike)."""
    import torch.distributed as dist

    from nanorun.device import isotonic

    tpc = rig.tensor_parallel
    if tpc.size < 2:
        raise ValueError("collectives are timed at tp > 1 (build the Rig with tp=N under "
                         "torchrun)")
    from nanorun.distributed import nccl_max_ctas

    element = torch.empty((), dtype=rig.dtype).element_size()
    sizes = tuple(sorted({max(element * tpc.size, n // (element * tpc.size) * element
                                  * tpc.size) for n in nbytes}))
    out = []
    for name in collectives:
        times = []
        for n in sizes:
            full = torch.randn(n // element, generator=rig.gen).to(rig.device, rig.dtype)
            part = full[: full.numel() // tpc.size].clone()
            if name == "all_reduce":
                fn = lambda: dist.all_reduce(full, group=tpc.group)  # noqa: E731
            elif name == "all_gather":
                fn = lambda: dist.all_gather_into_tensor(full, part, group=tpc.group)  # noqa
            else:
                fn = lambda: dist.reduce_scatter_tensor(part, full, group=tpc.group)  # noqa
            try:
                t = _cpu_time(fn, timing) if not rig.is_cuda else \
                    rig._cuda_times([(None, fn, timing.reps)], timing)[0]
            except (RuntimeError, NotImplementedError) as e:
                log(f"  {name}: not timed ({type(e).__name__}: {str(e)[:80]})")
                times = []
                break
            times.append(t)
        if not times:
            continue
        slowest = torch.tensor(times, dtype=torch.float64, device=rig.device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=tpc.group)
        seconds = [_sig(t) for t in isotonic(slowest.tolist())]
        out.append({"collective": name, "tp": tpc.size,
                    "ctas": nccl_max_ctas() if rig.is_cuda else None,
                    "nbytes": list(sizes), "seconds": seconds})
        log(f"  {name:17s} " + "  ".join(f"{n}B:{t * 1e6:.1f}us"
                                         for n, t in zip(sizes, seconds)))
    return out


def profile(rig: Rig, gpu: str, *, tokens: Iterable[int] = DEFAULT_TOKENS,
            sms: Iterable[int] | None = None, context: int = DEFAULT_CONTEXT,
            pairs: Iterable[tuple[str, str]] | None = None, timing: Timing = Timing(),
            collective_bytes: Iterable[int] = DEFAULT_COLLECTIVE_BYTES,
            log: Callable[[str], None] = print) -> Profile:
    """Measure `rig`'s model on its device: every layer op (and the LM head) over `tokens` x
    `sms`, `pairs` overlapping, the large-GEMM rate and copy bandwidth. `gpu` names the device
    spec the profile calibrates (h100, h200, ..., cpu). On a tp > 1 rig (every rank calls this,
    under torchrun) each op is this rank's shard, the all-reduce ops are timed on the whole
    device (NCCL is bounded by its CTA limit, not by a partition) and the collectives are swept
    over `collective_bytes`."""
    tokens = tuple(sorted({int(t) for t in tokens if 0 < t <= rig.max_tokens}))
    if not tokens:
        raise ValueError(f"no token count fits the rig (max_tokens={rig.max_tokens})")
    if rig.is_cuda:
        sms = tuple(sorted(set(sms))) if sms else sm_grid(rig.device_sms, rig.spec.sm_granularity)
    else:
        sms = (1,)    # the CPU has no SM partitions: one column
    ops = {}
    layer_ops = rig.model.layer_ops
    tp = getattr(rig, "tp", 1)
    network = {o.name for o in layer_ops if o.kind == NETWORK}
    # Ops whose cost reads their context are timed over decode tokens at `context`, and again
    # over a prompt's first chunk of n tokens (their prefill entry).
    context_ops = [o.name for o in layer_ops if o.cost is not None
                   and o.work(rig.config, tp).reads_context]
    entries = [(o.name, o.name, False) for o in layer_ops] + [(LOGITS, LOGITS, False)] + \
        [(prefill_entry(op), op, True) for op in context_ops]
    for op, timed, prefill in entries:
        columns = sms[-1:] if op in network else sms
        grid = [tuple(_sig(rig.time_op(timed, n, _limit(s, rig), context, timing, prefill))
                      for s in columns) for n in tokens]
        ops[op] = OpProfile(tokens, columns, tuple(grid),
                            context if op in context_ops else None)
        log(f"  {op:17s} " + "  ".join(f"{n}:{grid[i][-1] * 1e6:.1f}us"
                                       for i, n in enumerate(tokens)))
    measured_pairs, interference = [], None
    if pairs is None:
        pairs = default_pairs(layer_ops, rig.config, tp)
    if rig.is_cuda:
        gemm_tokens, attn_tokens = tokens[-1], tokens[len(tokens) // 2]
        g = rig.spec.sm_granularity
        usable = rig.device_sms // g * g    # whole groups: what green contexts can split into
        half = usable // 2 // g * g
        for a, b in pairs:
            p = rig.time_pair((a, gemm_tokens, usable - half), (b, attn_tokens, half),
                              context, timing)
            measured_pairs.append(p)
            log(f"  {a} + {b}: " + ", ".join(f"{t / s:.2f}x" for t, s in
                                             zip(p["together_s"], p["alone_s"])))
        slowdowns = [t / s - 1.0 for p in measured_pairs
                     for t, s in zip(p["together_s"], p["alone_s"])]
        interference = max(0.0, statistics.mean(slowdowns)) if slowdowns else None
    collectives = time_collectives(rig, collective_bytes, timing, log=log) if tp > 1 else []
    ceilings = measure_ceilings(rig.device, rig.dtype)   # as `nanorun bench` measures them
    gemm, copy = ceilings.gemm_tflops, ceilings.copy_gbps
    log(f"  device: {gemm:.1f} TFLOP/s large GEMM, {copy:.0f} GB/s copy"
        + (f", interference {interference:.3f}" if interference is not None else ""))
    return Profile(device=gpu, model=rig.config.name, tp=tp, ops=ops,
                   gemm_tflops=round(gemm, 2), collectives=collectives,
                   copy_gbps=round(copy, 1),
                   interference=None if interference is None else round(interference, 4),
                   dtype=str(rig.dtype).removeprefix("torch."), pairs=measured_pairs,
                   provenance=environment(rig) | {"partitions": rig.partitions_how,
                                                  "timing": timing.__dict__})


def _sig(seconds: float) -> float:
    """Four significant digits: what the timing's noise allows."""
    return float(f"{seconds:.4g}")


def _limit(sms: int, rig: Rig) -> int | None:
    """A grid column as a partition: the whole device needs none."""
    return None if not rig.is_cuda or sms >= rig.device_sms else sms


def environment(rig: Rig) -> dict:
    """Versions and device of a measurement (no machine paths)."""
    from nanorun import __version__

    env = {"nanorun_version": __version__, "torch": torch.__version__,
           "python": platform.python_version(), "date": datetime.date.today().isoformat(),
           "device": torch.cuda.get_device_name(rig.device) if rig.is_cuda
           else platform.processor() or platform.machine()}
    if rig.is_cuda:
        env["cuda"] = torch.version.cuda
        env["device_sms"] = rig.device_sms
    return env


# -- tune --measure and the calibration report ----------------------------------------------
def measure_layouts(predictor, rig: Rig, layouts: Iterable[Layout], mixes_for,
                    tokens_per_batch_token: float, timing: Timing = Timing(),
                    log: Callable[[str], None] = print) -> list[dict]:
    """Each layout's iterations on `mixes_for(batch_tokens)`, predicted and measured: per
    layout, the mean tokens/s both ways (prompt and output tokens, as the tuner counts them),
    mean iteration seconds and the prediction's error on every mix."""
    from nanorun.executor import Executor

    rows = []
    for layout in layouts:
        executor = Executor(rig.model, rig.kv, layout.batch_tokens, layout, rig.spec,
                            kernels=rig.kernels)
        per_mix = []
        for mix in mixes_for(layout.batch_tokens):
            predicted = predictor.iteration_seconds(layout, mix)
            measured = rig.time_iteration(layout, mix, timing, executor=executor)
            per_mix.append({"tokens": mix.num_tokens, "decode_tokens": len(mix.decode_contexts),
                            "predicted_ms": round(predicted * 1e3, 4),
                            "measured_ms": round(measured * 1e3, 4),
                            "error_percent": round(100.0 * (predicted / measured - 1.0), 2)})
        tps = lambda key: statistics.mean(  # noqa: E731
            m["tokens"] * tokens_per_batch_token / (m[key] * 1e-3) for m in per_mix)
        row = {"layout": layout.name, "batch_tokens": layout.batch_tokens,
               "predicted_tokens_per_s": round(tps("predicted_ms"), 1),
               "measured_tokens_per_s": round(tps("measured_ms"), 1),
               "max_abs_error_percent": max(abs(m["error_percent"]) for m in per_mix),
               "partitions": executor.partition_sms, "graphs": executor.graphs_active,
               "mixes": per_mix}
        rows.append(row)
        log(f"  {layout.name:28s} B={layout.batch_tokens:5d}  predicted "
            f"{row['predicted_tokens_per_s']:>12,.0f} tok/s  measured "
            f"{row['measured_tokens_per_s']:>12,.0f} tok/s  worst error "
            f"{row['max_abs_error_percent']:.1f} %")
    return rows
