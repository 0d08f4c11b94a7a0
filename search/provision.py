"""`nanorun provision`: how many machines of which kind a trace needs, by simulation.

For each design (one mixed pool running Dynamic SplitFuse, today's nanorun; Splitwise's prompt
pool + token pool, of one GPU kind or two; the same with Splitwise's mixed pool that borrows a
machine from the other pool when a queue is long) it searches the pool sizes that meet the SLOs
at the least cost (or power, or machine count), simulating each candidate cluster on the trace
(search/cluster.py) with iteration times from nanorun's cost model under each machine's layout
for its role (search/itertable.py).

SLOs bound percentiles of TTFT and TBT (a request's mean time between its later tokens) over
requests, either as Splitwise does, as a slowdown against the same request run alone on an idle
reference machine ("2x"; Splitwise's is a DGX-A100), or in absolute time ("200ms", "1.5s").
Splitwise's own: TTFT P50/P90/P99 within 2x/3x/6x, TBT within 1.25x/1.5x/5x (splitwise-sim,
github.com/Mutinifni/splitwise-sim @8f99e7d, MIT: notebooks/plots.ipynb get_slo, normalised by
normalize_hardware = "a100-80gb" at tp 8; its per-request tbt_times is the mean gap).

The search assumes more machines never hurt: for a mixed pool the least count is found by
doubling then bisection; for a split design a staircase walks prompt machines up and token
machines down (more prompt machines never need more token machines), so it costs one
simulation per step of the staircase plus the bisections.
"""

from __future__ import annotations

import difflib
import math
import re
import time
from dataclasses import dataclass, field, replace

import numpy as np

from .cluster import MACHINES, ClusterSim, Machine, MachineKind, Outcome, Requests
from .itertable import IterationTable, build_table, role_layout

METRICS = ("ttft", "tbt")
PERCENTILES = (50, 90, 99)
SPLITWISE_SLOS = "ttft_p50=2x,ttft_p90=3x,ttft_p99=6x,tbt_p50=1.25x,tbt_p90=1.5x,tbt_p99=5x"
OBJECTIVES = ("cost", "power", "machines")
MAX_MACHINES = 64
# Cluster roles -> the itertable role whose layout and batches a machine runs.
_TABLE_ROLE = {"mixed": "mixed", "prompt": "prefill", "token": "decode"}


# -- SLOs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Slo:
    metric: str          # "ttft" or "tbt"
    percentile: int      # 50, 90, 99
    bound: float         # a slowdown factor, or seconds
    slowdown: bool       # bound is relative to the request run alone

    def __str__(self) -> str:
        value = f"{self.bound:g}x" if self.slowdown else f"{self.bound * 1e3:g}ms"
        return f"{self.metric}_p{self.percentile}={value}"


def parse_slos(text: str) -> tuple[Slo, ...]:
    """'ttft_p99=6x,tbt_p50=100ms,...' -> Slos; a misspelt name says what it could be."""
    names = [f"{m}_p{p}" for m in METRICS for p in PERCENTILES]
    slos = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        name, eq, value = item.partition("=")
        name = name.strip().lower()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown SLO {name!r} in --slo.{hint} Use NAME=BOUND with NAME "
                             f"one of {', '.join(names)}")
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(x|ms|s)\s*", value.lower()) if eq else None
        if m is None or float(m.group(1)) <= 0:
            raise ValueError(f"SLO {name}: bound {value!r} must be a positive slowdown ('2x') "
                             f"or time ('200ms', '1.5s')")
        bound, unit = float(m.group(1)), m.group(2)
        metric, p = name.split("_p")
        slos.append(Slo(metric, int(p), bound if unit == "x" else
                        bound / 1e3 if unit == "ms" else bound, unit == "x"))
    if not slos:
        raise ValueError("--slo is empty; give at least one bound, e.g. ttft_p99=6x")
    return tuple(slos)


# -- designs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Design:
    """A cluster design: a mixed pool of one kind, or a prompt pool and a token pool."""

    token_gpu: str                # the mixed pool's kind, or the token pool's
    prompt_gpu: str | None = None # None: one mixed pool
    borrow: bool = False          # Splitwise's mixed pool: machines lent across pools
    budget: int | None = None     # a mixed pool's tokens per iteration (None: dense batch)

    @property
    def split(self) -> bool:
        return self.prompt_gpu is not None

    @property
    def name(self) -> str:
        if not self.split:
            return f"mixed-{self.token_gpu}"
        return f"splitwise-{self.prompt_gpu}/{self.token_gpu}" + ("+pool" if self.borrow else "")

    @property
    def paper_name(self) -> str:
        """Splitwise's name for it (Baseline-H100, Splitwise-HA, ...)."""
        letter = {"a100": "A", "h100": "H", "h200": "H200"}
        if not self.split:
            return f"Baseline-{self.token_gpu.upper()}"
        return f"Splitwise-{letter.get(self.prompt_gpu, self.prompt_gpu)}" \
               f"{letter.get(self.token_gpu, self.token_gpu)}" + \
               ("" if self.borrow else " (no mixed pool)")


def designs_for(gpus: tuple[str, ...], which: str = "all") -> tuple[Design, ...]:
    """Every design the GPU kinds allow: a mixed pool of each, a split of each kind alone
    (with and without the mixed pool), and the first kind prompting for each later one."""
    out = [Design(g) for g in gpus]
    for g in gpus:
        out += [Design(g, g), Design(g, g, borrow=True)]
    for i, p in enumerate(gpus):
        for t in gpus[i + 1:]:
            out += [Design(t, p), Design(t, p, borrow=True)]
    if which == "all":
        return tuple(out)
    names = {d.name: d for d in out}
    picked = []
    for name in (x.strip() for x in which.split(",") if x.strip()):
        if name not in names:
            raise ValueError(f"unknown design {name!r} for --gpu {','.join(gpus)}; known: "
                             f"{', '.join(names)}")
        picked.append(names[name])
    return tuple(picked)


# -- the simulator of one trace -----------------------------------------------------------------
@dataclass
class Provisioner:
    """Simulates clusters of machine kinds for one model, trace and arrival schedule."""

    config: object                          # ModelConfig
    kinds: dict[str, MachineKind]
    tables: dict[tuple[str, str], IterationTable]   # (gpu, cluster role) -> table
    requests: Requests
    slos: tuple[Slo, ...]
    reference_gpu: str
    max_seqs: int = 512
    long_queue_tokens: int = 8192
    memory_utilization: float = 0.9
    simulations: int = field(default=0, init=False)
    _memo: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.kv_bytes = self.config.kv_bytes_per_token(2)
        self.alone = self._unloaded(self.tables[(self.reference_gpu, "mixed")])

    def _unloaded(self, table: IterationTable) -> tuple[np.ndarray, np.ndarray]:
        """(TTFT, TBT) of each request run alone on an idle machine: its prompt in dense-batch
        chunks, then one decode token per iteration at its mean context."""
        b = table.batch_tokens
        full = table(b, 0, 0)
        p, o = self.requests.prompt_lens, self.requests.output_lens
        ttft = np.array([(n // b) * full + (table(n % b, 0, 0) if n % b else 0.0)
                         for n in p.tolist()])
        tbt = np.array([table(0, 1, n + (k + 1) / 2) for n, k in zip(p.tolist(), o.tolist())])
        return ttft, tbt

    def kv_capacity(self, kind: MachineKind) -> int:
        from nanorun.device import get_device

        memory = get_device(kind.gpu).memory_gib * 2**30 * kind.gpus * self.memory_utilization
        free = memory - self.config.num_params * 2
        if free <= 0:
            raise ValueError(f"{self.config.name} does not fit on a machine of {kind.gpus} x "
                             f"{kind.gpu}; use more GPUs per machine")
        return int(free // self.kv_bytes)

    def machines(self, design: Design, counts: tuple[int, ...]) -> list[Machine]:
        pools = [("token" if design.split else "mixed", design.token_gpu, counts[-1])]
        if design.split:
            pools.insert(0, ("prompt", design.prompt_gpu, counts[0]))
        out = []
        for home, gpu, n in pools:
            kind = self.kinds[gpu]
            roles = {home, "mixed"} if design.borrow else {home}
            tables = {role: self.tables[(gpu, role)] for role in roles}
            budget = design.budget if home == "mixed" else None
            for _ in range(n):
                out.append(Machine(len(out), kind, home, tables, self.kv_capacity(kind),
                                   self.max_seqs, token_budget=budget))
        return out

    def simulate(self, design: Design, counts: tuple[int, ...]) -> Outcome:
        key = (design, counts)
        if key not in self._memo:
            self.simulations += 1
            sim = ClusterSim(self.machines(design, counts), self.requests,
                             kv_bytes_per_token=self.kv_bytes,
                             num_layers=self.config.num_layers, borrow=design.borrow,
                             long_queue_tokens=self.long_queue_tokens)
            self._memo[key] = sim.run()
        return self._memo[key]

    def lower_bounds(self, design: Design) -> tuple[int, ...]:
        """Pool sizes below which the pools cannot keep up even running flat out: the prompt
        tokens over what a machine prefills per second in full batches (a mixed pool: in
        batches of its budget), the decode tokens over what a token machine decodes in
        batches of max_seqs. Where machines are lent across pools, nothing is ruled out."""
        if design.borrow:
            return (1, 1) if design.split else (1,)
        r = self.requests
        span = max(float(r.arrivals[-1] - r.arrivals[0]), 1e-9)
        prompt_rate = float(np.sum(r.prompt_lens)) / span
        gpu = design.prompt_gpu or design.token_gpu
        table = self.tables[(gpu, "prompt" if design.split else "mixed")]
        b = min(design.budget or table.batch_tokens, table.batch_tokens)
        prompt = max(1, int(prompt_rate * table(b, 0, 0) / b))
        if not design.split:
            return (prompt,)
        token = self.tables[(design.token_gpu, "token")]
        seqs = min(self.max_seqs, token.batch_tokens)
        context = float(np.mean(r.prompt_lens + r.output_lens / 2))
        decode_rate = float(np.sum(r.output_lens - 1)) / span
        return prompt, max(1, int(decode_rate * token(0, seqs, context) / seqs))

    # -- judging an outcome ------------------------------------------------------------------
    def latencies(self, out: Outcome) -> dict[str, float]:
        """Every SLO's measured value (slowdown or seconds), keyed as the SLO is named."""
        ttft0, tbt0 = self.alone
        values = {}
        for slo in self.slos:
            if slo.metric == "ttft":
                x = out.ttft / ttft0 if slo.slowdown else out.ttft
            else:
                keep = ~np.isnan(out.tbt_mean)
                x = (out.tbt_mean / tbt0)[keep] if slo.slowdown else out.tbt_mean[keep]
            values[str(slo).split("=")[0]] = _percentile(x, slo.percentile)
        return values

    def meets(self, design: Design, counts: tuple[int, ...]) -> bool:
        values = self.latencies(self.simulate(design, counts))
        return all(values[str(s).split("=")[0]] <= s.bound for s in self.slos)


def _percentile(x: np.ndarray, q: int) -> float:
    """The q-th percentile, inf-aware (a request never served is as late as can be)."""
    if len(x) == 0:
        return 0.0
    x = np.sort(x)
    v = x[min(len(x) - 1, int(math.ceil(q / 100 * len(x))) - 1)]
    return float(v)


# -- the search ---------------------------------------------------------------------------------
def objective_value(prov: Provisioner, design: Design, counts: tuple[int, ...],
                    objective: str) -> float:
    kinds = [design.prompt_gpu, design.token_gpu] if design.split else [design.token_gpu]
    if objective == "machines":
        return float(sum(counts))
    attr = "cost_per_hour" if objective == "cost" else "power_kw"
    return sum(n * getattr(prov.kinds[g], attr) for n, g in zip(counts, kinds))


def search(prov: Provisioner, design: Design, objective: str = "cost",
           limit: int = MAX_MACHINES) -> tuple[int, ...] | None:
    """The least-`objective` pool sizes of `design` that meet the SLOs (None: none within
    `limit` machines a pool)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; use {', '.join(OBJECTIVES)}")
    lo = prov.lower_bounds(design)
    if not design.split:
        n = _least(lambda k: prov.meets(design, (k,)), lo[0], limit)
        return (n,) if n else None
    best, best_value = None, math.inf
    t_hi = _least(lambda k: prov.meets(design, (limit, k)), lo[1], limit)
    if t_hi is None:
        return None
    for p in range(lo[0], limit + 1):
        if objective_value(prov, design, (p, lo[1]), objective) >= best_value:
            break
        if not prov.meets(design, (p, t_hi)):
            continue
        t = _least(lambda k: prov.meets(design, (p, k)), lo[1], t_hi)
        t_hi = t
        value = objective_value(prov, design, (p, t), objective)
        if value < best_value:
            best, best_value = (p, t), value
    return best


def search_design(prov: Provisioner, design: Design, objective: str = "cost",
                  budgets: tuple[int, ...] = (), limit: int = MAX_MACHINES):
    """(design, pool sizes) of the least objective; a mixed pool also tries each token
    budget per iteration in `budgets` (Sarathi-Serve's chunk size: a smaller one keeps decode
    iterations short at the price of longer prefills), the larger budget on a tie."""
    if design.split or not budgets:
        return design, search(prov, design, objective, limit)
    best = (design, None)
    for b in sorted(budgets, reverse=True):
        d = replace(design, budget=b)
        counts = search(prov, d, objective, limit)
        if counts is not None and (best[1] is None or objective_value(
                prov, d, counts, objective) < objective_value(prov, *best, objective)):
            best = (d, counts)
    return best


def _least(ok, lo: int, hi: int) -> int | None:
    """The least k in [lo, hi] with ok(k), for a monotone ok: doubling, then bisection."""
    k = lo
    while not ok(k):
        if k >= hi:
            return None
        lo, k = k + 1, min(hi, k * 2)
    while lo < k:
        mid = (lo + k) // 2
        if ok(mid):
            k = mid
        else:
            lo = mid + 1
    return k


# -- one run: the tables, the searches, the report ----------------------------------------------
def requests_for(trace: str, *, num_requests: int, rate: float, seed: int = 0,
                 length_filter=None) -> tuple[Requests, str, str]:
    """A window of `num_requests` requests of the trace (its lengths, in its order) arriving
    as a Poisson process at `rate` requests/s; also its name and attribution."""
    from nanorun.benchmark.arrivals import gamma_arrivals
    from nanorun.benchmark.traces import load_trace

    if not rate > 0 or math.isinf(rate):
        raise ValueError(f"--rate must be a positive finite number of requests/s, got {rate}")
    t = load_trace(trace, num_requests=num_requests, seed=seed, length_filter=length_filter)
    arrivals = gamma_arrivals(len(t), rate, seed=seed)
    return Requests(arrivals, np.asarray(t.prompt_lens), np.asarray(t.output_lens)), t.name, \
        t.source


def build_tables(config, kinds: dict[str, MachineKind], workload, *, batch_tokens: int,
                 layout: str, trials: int, seed: int, max_seqs: int, max_context: int,
                 roles=tuple(_TABLE_ROLE), log=print) -> tuple[dict, dict]:
    """Iteration tables and layout summaries for every (GPU kind, cluster role)."""
    from .costmodel import CostModel
    from .evaluate import Predictor
    from nanorun.device import get_device

    tables, layouts = {}, {}
    for gpu, kind in kinds.items():
        predictor = Predictor(CostModel(config, get_device(gpu), tp=kind.gpus))
        for role in roles:
            table_role = _TABLE_ROLE[role]
            start = time.perf_counter()
            lo = role_layout(predictor, workload, table_role, batch_tokens, how=layout,
                             trials=trials, seed=seed, max_seqs=max_seqs)
            table = build_table(predictor, lo, table_role, max_context)
            tables[(gpu, role)] = table
            layouts[f"{gpu}/{role}"] = _layout_summary(lo)
            full = table(0, max_seqs, 1024) if role == "token" else table(batch_tokens, 0, 0)
            what = f"{max_seqs} decode tokens at context 1024" if role == "token" else \
                f"{batch_tokens} prompt tokens"
            log(f"  {gpu} {role} machine: layout {lo.name}, {full * 1e3:.1f} ms for {what} "
                f"(tabulated in {time.perf_counter() - start:.1f} s)")
    return tables, layouts


def _layout_summary(layout) -> dict:
    return {"name": layout.name, "batch_tokens": layout.batch_tokens,
            "partitions": {p.name: p.sm_count for p in layout.partitions},
            "nano_batches": max(len(ol.splits) for _, ol in layout.ops)}


def summarize(prov: Provisioner, design: Design, counts: tuple[int, ...] | None,
              objective: str) -> dict:
    """What the JSON says of one design: its pools, cost, power, SLO values, throughput per
    cost and per power at the simulated load."""
    row = {"design": design.name, "splitwise_name": design.paper_name,
           "prompt_gpu": design.prompt_gpu, "token_gpu": design.token_gpu,
           "borrows": design.borrow, "meets_slos": counts is not None}
    if counts is None:
        row["note"] = f"no pool sizes up to {MAX_MACHINES} machines a pool meet the SLOs"
        return row
    out = prov.simulate(design, counts)
    r = prov.requests
    tokens = float(np.sum(r.prompt_lens) + np.sum(r.output_lens))
    # Served tokens/s over the arrival window: every request is served, so this is the
    # offered load; designs differ in what it costs them.
    span = float(r.arrivals[-1] - r.arrivals[0]) or 1.0
    throughput = tokens / span
    cost = objective_value(prov, design, counts, "cost")
    power = objective_value(prov, design, counts, "power")
    if design.split:
        row.update(prompt_machines=counts[0], token_machines=counts[1])
    else:
        row.update(mixed_machines=counts[0], tokens_per_iteration=design.budget)
    row.update(machines=int(sum(counts)), cost_per_hour=round(cost, 2),
               power_kw=round(power, 2), objective=objective,
               objective_value=round(objective_value(prov, design, counts, objective), 3),
               tokens_per_s=round(throughput, 1),
               tokens_per_dollar=round(throughput * 3600 / cost, 1),
               tokens_per_s_per_kw=round(throughput / power, 2),
               slo_values={k: round(v, 4) for k, v in prov.latencies(out).items()},
               token_gap_ms={f"p{q}": round(_percentile(out.token_gaps, q) * 1e3, 2)
                             for q in PERCENTILES},
               lent_machines=out.borrowed, iterations=out.iterations)
    return row


def splitwise_direction(trace: str, rows: list[dict]) -> dict:
    """Whether the split designs size their pools the way Splitwise reports: on the coding
    trace fewer token than prompt machines, on the conversation trace the reverse."""
    expect = {"azure-code": "token < prompt", "azure-conv": "token > prompt"}.get(trace)
    found = [(r["design"], r["prompt_machines"], r["token_machines"]) for r in rows
             if r.get("meets_slos") and "prompt_machines" in r]
    checks = []
    for name, p, t in found:
        relation = "token < prompt" if t < p else "token > prompt" if t > p else "token = prompt"
        checks.append({"design": name, "prompt_machines": p, "token_machines": t,
                       "found": relation,
                       "agrees": None if expect is None else relation == expect})
    return {"splitwise_expects": expect, "designs": checks}


def provision_trace(config, kinds, tables, trace: str, *, rate: float, num_requests: int,
                    slos, designs, objective: str, seed: int, length_filter, max_seqs: int,
                    long_queue_tokens: int, reference_gpu: str, mixed_budgets=(),
                    log=print) -> dict:
    """Search every design on one trace; the trace's part of the JSON."""
    start = time.perf_counter()
    requests, name, source = requests_for(trace, num_requests=num_requests, rate=rate,
                                          seed=seed, length_filter=length_filter)
    prov = Provisioner(config, kinds, tables, requests, slos, reference_gpu, max_seqs=max_seqs,
                       long_queue_tokens=long_queue_tokens)
    rows = []
    for design in designs:
        t0 = time.perf_counter()
        design, counts = search_design(prov, design, objective, mixed_budgets)
        row = summarize(prov, design, counts, objective)
        rows.append(row)
        pools = "none meets the SLOs" if counts is None else \
            (f"{counts[0]} prompt + {counts[1]} token" if design.split else
             f"{counts[0]} mixed") + f" machines, ${row['cost_per_hour']:.1f}/h, " \
            f"{row['power_kw']:.1f} kW"
        log(f"  {design.name:24s} {pools}  ({time.perf_counter() - t0:.1f} s)")
    ttft0, tbt0 = prov.alone
    return {"trace": name, "source": source, "requests": len(requests),
            "rate_requests_per_s": rate,
            "mean_prompt_tokens": round(float(np.mean(requests.prompt_lens)), 1),
            "mean_output_tokens": round(float(np.mean(requests.output_lens)), 1),
            "unloaded_reference": {"gpu": prov.reference_gpu,
                                   "ttft_ms_p50": round(float(np.median(ttft0)) * 1e3, 2),
                                   "tbt_ms_p50": round(float(np.median(tbt0)) * 1e3, 2)},
            "designs": rows, "splitwise_direction": splitwise_direction(name, rows),
            "simulations": prov.simulations,
            "seconds": round(time.perf_counter() - start, 1)}
