"""The layout search: an Optuna study over nano-batch layouts, scored by the simulator.

A trial picks a point of `SearchSpace` (dense batch size; nano-batch counts of the GEMM side and
of the attention side; whether the attention side gets its own partition and how many SMs the
GEMM side keeps; how the attention side's nano-batches are cut; how far later nano-batches are
issued behind earlier ones). `build_layout` turns it into an ordinary Layout, the engine's
planner plans it, and the simulator prices it on a few iterations drawn from the workload
(the expected steady-state mix first, then sampled ones): the score is predicted throughput,
tokens/s counting prompt and output tokens. A trial whose running score falls below the
median of earlier trials after the first iterations is pruned.

Single objective: TPE (default). Multi-objective: NSGA-II over (throughput, iteration latency),
returning the Pareto front. Both are seeded; a SQLite storage lets a long study resume.
"""

from __future__ import annotations

import datetime
import itertools
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from nanorun.layout import Layout, LayoutError, OpLayout, Partition, sequential
from nanorun.models.op import ATTENTION_SIDE, NETWORK_SIDE
from nanorun.planner import Planner

from .costmodel import CostModel
from .evaluate import Predictor
from .workload import IterationMix, Workload

SKEWS = (0.0, 0.25, 0.5, 1.0, 2.0)
MEMORY_UTILIZATION = 0.9                               # of device memory for weights + KV


@dataclass(frozen=True)
class Candidate:
    """One point of the layout space."""

    batch_tokens: int
    gemm_splits: int
    attn_splits: int
    attn_partition: bool       # the attention side on its own partition
    gemm_sms: int | None       # SMs of the GEMM partition (None: device not partitioned)
    net_sms: int | None        # SMs of the network partition (tp > 1; None: none)
    balance: str               # "tokens": even token counts; "cost": equal attention cost
    skew: float                # 0: op-major issue order; larger: later nano-batches lag
    pipeline: bool = False     # later nano-batches' post-attention GEMMs a layer slot behind


@dataclass(frozen=True)
class SearchSpace:
    batch_tokens: tuple[int, ...]
    gemm_splits: tuple[int, ...] = (1, 2, 3, 4)
    attn_splits: tuple[int, ...] = (1, 2, 3, 4)
    attn_partition: tuple[bool, ...] = (True, False)
    gemm_sms: tuple[int, ...] = ()
    net_sms: tuple[int | None, ...] = ()    # None: collectives on the GEMM stream
    balance: tuple[str, ...] = ("tokens", "cost")
    skew: tuple[float, ...] = SKEWS
    pipeline: tuple[bool, ...] = (True, False)

    def candidates(self) -> Iterable[Candidate]:
        """Every point (for exhaustive search of small spaces)."""
        for b, g, a, own, bal, sk, pipe in itertools.product(
                self.batch_tokens, self.gemm_splits, self.attn_splits, self.attn_partition,
                self.balance, self.skew, self.pipeline):
            for gs in (self.gemm_sms or (None,)) if own else (None,):
                for ns in self.net_sms or (None,):
                    yield Candidate(b, g, a, own, gs, ns, bal, sk, pipe)

    @property
    def size(self) -> int:
        return sum(1 for _ in self.candidates())


@dataclass
class Tuner:
    """Scores layouts of one model on one device for one workload."""

    predictor: Predictor
    workload: Workload
    seed: int = 0
    num_mixes: int = 3
    _mixes: dict[int, list[IterationMix]] = field(default_factory=dict, repr=False)

    @property
    def cost(self) -> CostModel:
        return self.predictor.cost

    # -- the space -------------------------------------------------------------------------
    def max_batch_tokens(self) -> int:
        """The largest dense batch whose steady-state KV cache fits next to the weights."""
        c, dev = self.cost.config, self.cost.device
        free = dev.memory_gib * 2**30 * MEMORY_UTILIZATION \
            - c.num_params * self.cost.dtype_bytes / self.cost.tp
        per_token = c.kv_bytes_per_token(self.cost.dtype_bytes) / self.cost.tp
        b = 64
        while b < 16384 and self.workload.kv_tokens(b * 2) * per_token <= free:
            b *= 2
        lo, hi = b, b * 2   # refine in steps of 64
        while hi - lo > 64:
            mid = (lo + hi) // 2 // 64 * 64
            if self.workload.kv_tokens(mid) * per_token <= free:
                lo = mid
            else:
                hi = mid
        if self.workload.kv_tokens(lo) * per_token > free:
            raise ValueError(f"{c.name} at tp={self.cost.tp} leaves no room for the KV cache "
                             f"of this workload on {dev.name} ({dev.memory_gib:g} GiB); use a "
                             f"larger tp or a shorter trace")
        return min(lo, 16384)

    def space(self, batch_tokens: Iterable[int] | None = None) -> SearchSpace:
        dev = self.cost.device
        if batch_tokens is None:
            top = self.max_batch_tokens()
            batch_tokens = tuple(range(256, top + 1, 256)) or (top,)
        gemm_sms: tuple[int, ...] = ()
        net_sms: tuple[int | None, ...] = ()    # None: collectives on the GEMM stream
        if dev.sm_count is not None:
            g = dev.sm_granularity
            usable = dev.sm_count // g * g
            # A network partition holds NCCL's CTAs: at least the CTA bound nanorun gives NCCL
            # (8; one granule on Hopper, four on an A100), or twice that.
            c = -(-self.cost.nccl_ctas // g) * g
            net_sms = (None, c, 2 * c) if self.cost.tp > 1 else ()
            reserve = 2 * c if self.cost.tp > 1 else 0
            gemm_sms = tuple(range(2 * g, usable - reserve - g + 1, g))
        return SearchSpace(tuple(batch_tokens), gemm_sms=gemm_sms, net_sms=net_sms)

    # -- scoring ------------------------------------------------------------------------------
    def mixes(self, batch_tokens: int) -> list[IterationMix]:
        """The iterations a layout is judged on: the expected mix, then sampled ones; the same
        for every trial (seeded by the search seed and the batch size)."""
        if batch_tokens not in self._mixes:
            rng = np.random.default_rng([self.seed, batch_tokens])
            self._mixes[batch_tokens] = [self.workload.mix(batch_tokens)] + [
                self.workload.sample_mix(batch_tokens, rng) for _ in range(self.num_mixes - 1)]
        return self._mixes[batch_tokens]

    def layout(self, c: Candidate) -> Layout:
        return build_layout(self.predictor.ops, self.cost.device, c,
                            self.mixes(c.batch_tokens)[0])

    def throughput(self, layout: Layout, mix: IterationMix) -> tuple[float, float]:
        """(tokens/s counting prompt and output tokens, iteration seconds) on one mix."""
        seconds = self.predictor.iteration_seconds(layout, mix)
        return mix.num_tokens * self.workload.tokens_per_batch_token / seconds, seconds

    def score(self, layout: Layout, report=None) -> tuple[float, float]:
        """Mean throughput and mean iteration seconds over the mixes; `report(step, value)`
        is told the running mean after each (Optuna pruning raises from it)."""
        tps, secs = [], []
        for step, mix in enumerate(self.mixes(layout.batch_tokens)):
            t, s = self.throughput(layout, mix)
            tps.append(t)
            secs.append(s)
            if report is not None:
                report(step, float(np.mean(tps)))
        return float(np.mean(tps)), float(np.mean(secs))

    def sequential(self, batch_tokens: int) -> Layout:
        return sequential(self.predictor.op_names, batch_tokens)


# -- building a layout from a candidate ---------------------------------------------------------
def build_layout(ops, device, c: Candidate, mix: IterationMix | None = None,
                 name: str = "tuned") -> Layout:
    """The Layout of a search point for a model's ops on a device. `mix` is the iteration that
    "cost" balancing equalises attention work over."""
    names = [op.name for op in ops]
    network = {op.name for op in ops if op.side == NETWORK_SIDE}
    attention_side = {op.name for op in ops if op.side == ATTENTION_SIDE}
    b = c.batch_tokens
    net = c.net_sms if network else None   # None: collectives share the GEMM stream
    partitions: list[Partition] = []
    if device.sm_count is None:   # the CPU: partitions are logical streams
        partitions = [Partition("gemm")] + [Partition("attn")] * c.attn_partition
    elif c.attn_partition:
        g = device.sm_granularity
        attn = device.sm_count // g * g - (c.gemm_sms or 0) - (net or 0)
        if c.gemm_sms is None or attn < g:
            raise LayoutError(f"{c.gemm_sms} GEMM SMs leave no attention partition")
        partitions = [Partition("gemm", c.gemm_sms), Partition("attn", attn)]
    else:
        g = device.sm_granularity
        partitions = [Partition("gemm", device.sm_count // g * g - net if net else None)]
    if net:
        partitions.append(Partition("net", net))
    part_names = {p.name for p in partitions}

    gemm = _even(b, c.gemm_splits)
    if c.balance == "cost" and mix is not None and c.attn_splits > 1:
        attn = _cost_balanced(b, c.attn_splits, mix)
        if c.gemm_splits == c.attn_splits:
            # Same nano-batches on both sides: misaligned boundaries would make each GEMM
            # nano-batch wait for two attention nano-batches, serialising the pipeline.
            gemm = attn
    else:
        attn = _even(b, c.attn_splits)
    layout_ops = []
    for op in names:
        if op in network:
            layout_ops.append((op, OpLayout(gemm, "net" if net else "gemm")))
        elif op in attention_side:
            layout_ops.append((op, OpLayout(attn, "attn" if "attn" in part_names else "gemm")))
        else:
            layout_ops.append((op, OpLayout(gemm, "gemm")))
    order = _skewed_order(ops, layout_ops, b, c.skew)
    if c.pipeline:
        op_major = tuple((op, i) for op, ol in layout_ops for i in range(len(ol.splits)))
        order = _pipelined(ops, order or op_major, len(gemm))
    layout = Layout(name, b, tuple(partitions), tuple(layout_ops), order)
    Planner(ops, 2, layout)   # raises LayoutError if the shifts break a dependency
    return layout


def _even(total: int, k: int) -> tuple[int, ...]:
    k = max(1, min(k, total))
    return tuple(total * (i + 1) // k - total * i // k for i in range(k))


def _cost_balanced(total: int, k: int, mix: IterationMix) -> tuple[int, ...]:
    """Splits of `total` tokens into k nano-batches of equal attention work on `mix` (KV tokens
    read: a decode token its context, a prompt token a share of its context), each at least
    one token."""
    batch = mix.batch()
    work = np.where(batch.is_decode, batch.contexts, batch.contexts / 64.0) + 1.0
    cum = np.cumsum(work) / work.sum()
    edges = [0]
    for i in range(1, k):
        e = int(np.searchsorted(cum, i / k)) + 1
        edges.append(min(max(e, edges[-1] + 1), total - (k - i)))
    edges.append(total)
    # The planner scales splits to each batch; the mix has exactly `total` tokens.
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


def _pipelined(ops, order, gemm_splits: int):
    """NanoFlow's cross-layer pipeline: the ops after the attention side (OpSpec.side) of the
    later half of the GEMM nano-batches are shifted into the next layer's slot, issued there
    right after the earlier nano-batches' ops before the attention side (attn_norm, qkv). So
    while layer l + 1's first nano-batches run their attention, the GEMM partition finishes
    layer l's later ones."""
    if gemm_splits < 2:
        raise LayoutError("a pipelined order needs at least two GEMM nano-batches")
    half = (gemm_splits + 1) // 2
    names = [op.name for op in ops]
    sided = [i for i, op in enumerate(ops) if op.side == ATTENTION_SIDE]
    before = set(names[:sided[0]])
    after = set(names[sided[-1] + 1:])
    late = [(op, i) for op, i in order if op in after and i >= half]
    early = [(op, i) for op, i in order if op in before and i < half]
    rest = [k for k in order if k not in late and k not in early]
    return tuple(early) + tuple((op, i, 1) for op, i in late) + tuple(rest)


def _skewed_order(ops, layout_ops, batch_tokens: int, skew: float):
    """Issue order of one layer's (op, nano-batch) launches: by op rank plus `skew` x (op count)
    x (where the nano-batch starts in the batch), repaired to respect the dependencies (an op's
    launch after the earlier ops' launches of overlapping tokens; an op reading the history of
    another's writes, attention of kv_append's, after its launches over every earlier token)."""
    if skew == 0.0:
        return ()
    names = [op.name for op in ops]
    spec = {op.name: op for op in ops}
    rank = {op: i for i, op in enumerate(names)}
    bounds = {}
    for op, ol in layout_ops:
        acc = 0
        for i, s in enumerate(ol.splits):
            bounds[(op, i)] = (acc, acc + s)
            acc += s
    keys = list(bounds)
    priority = {k: rank[k[0]] + skew * len(names) * bounds[k][0] / batch_tokens for k in keys}

    def needs(later, earlier) -> bool:
        (a, _), (b, _) = earlier, later
        if rank[a] >= rank[b]:
            return False
        lo, hi = bounds[later]
        if spec[b].reads_history_of(spec[a]):
            lo = 0
        return bounds[earlier][0] < hi and lo < bounds[earlier][1]

    preds = {k: [e for e in keys if needs(k, e)] for k in keys}
    order, done = [], set()
    while len(order) < len(keys):
        ready = [k for k in keys if k not in done and all(p in done for p in preds[k])]
        k = min(ready, key=lambda k: (priority[k], bounds[k][0], rank[k[0]]))
        order.append(k)
        done.add(k)
    return tuple(order)


# -- the study ----------------------------------------------------------------------------------
@dataclass
class TuneResult:
    layout: Layout
    tokens_per_s: float
    iteration_s: float
    sequential_tokens_per_s: float
    optimal_tokens_per_s: float
    trials: int
    pareto: list[dict[str, Any]] = field(default_factory=list)
    # The best distinct layouts found, best first (layout is candidates[0]): what
    # `tune --measure` re-times on the device.
    candidates: list[Layout] = field(default_factory=list)

    @property
    def speedup_vs_sequential(self) -> float:
        return self.tokens_per_s / self.sequential_tokens_per_s

    @property
    def percent_of_optimal(self) -> float:
        return 100.0 * self.tokens_per_s / self.optimal_tokens_per_s

    def predicted(self) -> dict[str, float]:
        return {"tokens_per_s": round(self.tokens_per_s, 1),
                "iteration_ms": round(self.iteration_s * 1e3, 4),
                "percent_of_optimal": round(self.percent_of_optimal, 2),
                "speedup_vs_sequential": round(self.speedup_vs_sequential, 4),
                "sequential_tokens_per_s": round(self.sequential_tokens_per_s, 1),
                "optimal_tokens_per_s": round(self.optimal_tokens_per_s, 1)}


def prediction(tuner: Tuner, layout: Layout) -> dict[str, float]:
    """The predicted figures of any layout, as TuneResult.predicted() gives the best's."""
    return _result(tuner, layout, 0, []).predicted()


def suggest(trial, space: SearchSpace) -> Candidate:
    """A candidate from an Optuna trial (parameters named as Candidate's fields)."""
    b = trial.suggest_categorical("batch_tokens", list(space.batch_tokens))
    own = trial.suggest_categorical("attn_partition", list(space.attn_partition))
    gemm_sms = None
    if own and space.gemm_sms:
        gemm_sms = trial.suggest_categorical("gemm_sms", list(space.gemm_sms))
    net_sms = trial.suggest_categorical("net_sms", list(space.net_sms)) if space.net_sms else None
    return Candidate(
        batch_tokens=b,
        gemm_splits=trial.suggest_categorical("gemm_splits", list(space.gemm_splits)),
        attn_splits=trial.suggest_categorical("attn_splits", list(space.attn_splits)),
        attn_partition=own, gemm_sms=gemm_sms, net_sms=net_sms,
        balance=trial.suggest_categorical("balance", list(space.balance)),
        skew=trial.suggest_categorical("skew", list(space.skew)),
        pipeline=trial.suggest_categorical("pipeline", list(space.pipeline)))


def _progress_lines(total: int, multi_objective: bool):
    """An Optuna callback printing `trial k/total, best X tokens/s` about ten times."""
    every = max(1, total // 10)
    count = 0

    def callback(study, trial) -> None:
        nonlocal count
        count += 1
        if count % every and count != total:
            return
        complete = [t for t in study.trials if t.values is not None]
        best = max((t.values[0] for t in complete), default=float("nan"))
        print(f"tune: trial {count}/{total}, best {best:,.0f} tokens/s", file=sys.stderr,
              flush=True)

    return callback


def tune(tuner: Tuner, *, trials: int = 200, seed: int = 0, space: SearchSpace | None = None,
         multi_objective: bool = False, storage: str | None = None,
         study_name: str | None = None, progress: bool = False, keep: int = 8) -> TuneResult:
    """Search the layout space; returns the best layout and its predicted figures, and the
    `keep` best distinct layouts (for re-timing on a device)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = space or tuner.space()
    if multi_objective:
        sampler = optuna.samplers.NSGAIISampler(seed=seed)
        directions = ["maximize", "minimize"]
        pruner = None
    else:
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(20, trials))
        directions = ["maximize"]
        pruner = optuna.pruners.MedianPruner(n_startup_trials=10, n_warmup_steps=0)
    study = optuna.create_study(directions=directions, sampler=sampler, pruner=pruner,
                                storage=storage, study_name=study_name,
                                load_if_exists=storage is not None)

    def objective(trial):
        c = suggest(trial, space)
        try:
            layout = tuner.layout(c)
        except LayoutError as e:   # a point of the space that cannot be built
            raise optuna.TrialPruned(str(e)) from None

        def report(step: int, value: float) -> None:
            if multi_objective:
                return
            trial.report(value, step)
            if trial.should_prune():
                raise optuna.TrialPruned()

        tps, secs = tuner.score(layout, report)
        return (tps, secs) if multi_objective else tps

    if not study.trials:   # the baseline is always a trial: tuned is never below sequential
        for params in seed_points(space):
            study.enqueue_trial(params)
    done = len([t for t in study.trials if t.state.is_finished()])
    todo = max(0, trials - done)
    # A progress bar on a terminal; to a file or a pipe a bar is one enormous \r line, so
    # a plain line every tenth of the trials instead.
    bar = progress and sys.stderr.isatty()
    callbacks = [_progress_lines(todo, multi_objective)] if progress and not bar else []
    study.optimize(objective, n_trials=todo, show_progress_bar=bar, callbacks=callbacks)

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise RuntimeError("no trial completed; widen the search space or raise --trials")
    if multi_objective:
        front = sorted(study.best_trials, key=lambda t: -t.values[0])
        best = front[0]
        pareto = [{"tokens_per_s": round(t.values[0], 1),
                   "iteration_ms": round(t.values[1] * 1e3, 4), "params": t.params}
                  for t in front]
    else:
        best, pareto = study.best_trial, []
    ranked = [best] + sorted((t for t in complete if t is not best),
                             key=lambda t: -t.values[0])
    result = _result(tuner, tuner.layout(_candidate(best.params)), len(study.trials), pareto)
    result.candidates = _distinct(tuner, ranked, keep)
    return result


def _distinct(tuner: Tuner, trials, keep: int) -> list[Layout]:
    """The layouts of the first `keep` trials that build distinct layouts."""
    layouts: list[Layout] = []
    for t in trials:
        layout = tuner.layout(_candidate(t.params))
        if layout not in layouts:
            layouts.append(layout)
            if len(layouts) == keep:
                break
    return layouts


def seed_points(space: SearchSpace) -> list[dict[str, Any]]:
    """The first trials of a new study, at the largest batch size: "sequential" (so the tuned
    layout is never predicted below it), then NanoFlow's shape of pipeline (two nano-batches,
    attention on its own partition, the later nano-batch's post-attention GEMMs a layer behind)
    at a few GEMM shares. Throughput is dominated by the batch size, so a search started
    elsewhere spends its trials there and seldom reaches the conjunction of choices the
    pipeline needs; started here, TPE refines around it."""
    b = max(space.batch_tokens)
    net = {"net_sms": None} if space.net_sms else {}
    points = [{"batch_tokens": b, "attn_partition": False, "gemm_splits": 1, "attn_splits": 1,
               "balance": space.balance[0], "skew": 0.0, "pipeline": False, **net}]
    if not (True in space.attn_partition and True in space.pipeline
            and 2 in space.gemm_splits and 2 in space.attn_splits):
        return points
    shares = [None]
    if space.gemm_sms:
        top = max(space.gemm_sms) + min(space.gemm_sms)     # about the device's usable SMs
        shares = sorted({min(space.gemm_sms, key=lambda s: abs(s - f * top))
                         for f in (0.7, 0.8, 0.9)})
    skew = min(space.skew, key=lambda k: abs(k - 0.5))
    for sms in shares:
        point = {"batch_tokens": b, "attn_partition": True, "gemm_splits": 2, "attn_splits": 2,
                 "balance": "tokens" if "tokens" in space.balance else space.balance[0],
                 "skew": skew, "pipeline": True, **net}
        if sms is not None:
            point["gemm_sms"] = sms
        points.append(point)
    return points


def exhaustive(tuner: Tuner, space: SearchSpace) -> TuneResult:
    """Score every point of a (small) space: the reference the search is tested against."""
    best, best_tps = None, -1.0
    for c in space.candidates():
        try:
            layout = tuner.layout(c)
        except LayoutError:
            continue
        tps, _ = tuner.score(layout)
        if tps > best_tps:
            best, best_tps = layout, tps
    if best is None:
        raise RuntimeError("no point of the space builds a valid layout")
    return _result(tuner, best, space.size, [])


def _candidate(params: dict[str, Any]) -> Candidate:
    return Candidate(params["batch_tokens"], params["gemm_splits"], params["attn_splits"],
                     params["attn_partition"], params.get("gemm_sms"), params.get("net_sms"),
                     params["balance"], params["skew"], params.get("pipeline", False))


def _result(tuner: Tuner, layout: Layout, trials: int, pareto) -> TuneResult:
    tps, secs = tuner.score(layout)
    seq_tps, _ = tuner.score(tuner.sequential(layout.batch_tokens))
    return TuneResult(layout, tps, secs, seq_tps, tuner.cost.optimal_tokens_per_s(), trials,
                      pareto)


def provenance(tuner: Tuner, *, trials: int, seed: int, trace: str, profile: str | None,
               multi_objective: bool) -> dict[str, Any]:
    """What made a tuned layout (no machine paths: the trace and profile by name)."""
    from nanorun import __version__

    return {"model": tuner.cost.config.name, "gpu": tuner.cost.device.name,
            "tp": tuner.cost.tp, "trace": trace, "profile": profile, "trials": trials,
            "seed": seed, "objective": "pareto(tokens/s, iteration latency)" if multi_objective
            else "tokens/s", "nanorun_version": __version__,
            "date": datetime.date.today().isoformat()}
