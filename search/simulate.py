"""The makespan of a Plan: discrete-event simulation over its streams.

The Plan is the engine's own (nanorun.planner.Planner over the model's ops), so the simulator
sees exactly the launches, streams and waits the executor would issue. A stream runs its
launches in order, one at a time; a launch starts when its stream is free and every launch it
waits for has finished. Launches running together share memory bandwidth (the cost model's
interference term): between events each running launch progresses at a rate

    rate = 1 / ((1 + memory_share * (max(1, sum of demands) - 1)) * (1 + interference))

(the interference factor only while another launch runs), and the simulation jumps from one
completion to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

from nanorun.planner import EMBED, LOGITS, Plan

from .costmodel import CostModel, LaunchCost, RangeStats


@dataclass(frozen=True)
class Schedule:
    """Simulated start and end of every launch of a plan (seconds from the iteration's start)."""

    plan: Plan
    start: tuple[float, ...]
    end: tuple[float, ...]

    @property
    def makespan(self) -> float:
        return max(self.end) if self.end else 0.0

    def busy(self, stream: int) -> float:
        return sum(e - s for s, e, launch in zip(self.start, self.end, self.plan.launches)
                   if launch.stream == stream)


def launch_costs(plan: Plan, batch, layout, cost: CostModel) -> list[LaunchCost]:
    """The cost of every launch of `plan` alone on its partition. `batch` carries per-token
    contexts and decode flags (search.workload.IterationMix.batch())."""
    stats = RangeStats(batch.contexts, batch.is_decode)
    sms = [p.sm_count for p in layout.partitions]
    memo: dict[tuple, LaunchCost] = {}
    out = []
    for launch in plan.launches:
        n = launch.t1 - launch.t0
        reads_context = launch.op in cost.context_ops   # its cost depends on the rows' contexts
        if launch.op == LOGITS:
            key = (LOGITS, batch.num_sampled, launch.stream)
        elif reads_context:
            key = (launch.op, launch.t0, launch.t1, launch.stream)
        else:
            key = (launch.op, n, launch.stream)
        c = memo.get(key)
        if c is None:
            if launch.op == LOGITS:
                c = cost.launch(LOGITS, batch.num_sampled, sms[launch.stream])
            elif launch.op == EMBED:
                c = cost.launch(EMBED, n, sms[launch.stream])
            else:
                c = cost.launch(launch.op, n, sms[launch.stream],
                                stats(launch.t0, launch.t1) if reads_context else None)
            memo[key] = c
        out.append(c)
    return out


def simulate(plan: Plan, costs: list[LaunchCost], interference: float = 0.0) -> Schedule:
    """Run `plan` on simulated streams; costs[i] is launch i's cost alone."""
    launches = plan.launches
    n = len(launches)
    queues: list[list[int]] = [[] for _ in range(plan.num_streams)]
    for i, launch in enumerate(launches):
        queues[launch.stream].append(i)
    head = [0] * plan.num_streams
    start, end = [0.0] * n, [0.0] * n
    done = [False] * n
    remaining = [c.seconds for c in costs]   # in seconds of running alone
    running: list[int] = []
    now, finished = 0.0, 0
    while finished < n:
        # Start every stream head whose waits are done (a stream runs one launch at a time).
        for s, q in enumerate(queues):
            if head[s] < len(q) and not any(launches[i].stream == s for i in running):
                i = q[head[s]]
                if all(done[w] for w in launches[i].waits):
                    running.append(i)
                    head[s] += 1
                    start[i] = now
        if not running:
            raise RuntimeError("plan deadlocks: no stream can start its next launch")
        rates = _rates(running, costs, interference)
        step = min(remaining[i] / r for i, r in zip(running, rates))
        now += step
        still = []
        for i, r in zip(running, rates):
            remaining[i] -= step * r
            if remaining[i] <= 1e-15 or remaining[i] / r <= step * 1e-9:
                done[i] = True
                end[i] = now
                finished += 1
            else:
                still.append(i)
        running = still
    return Schedule(plan, tuple(start), tuple(end))


def _rates(running: list[int], costs: list[LaunchCost], interference: float) -> list[float]:
    if len(running) == 1:
        return [1.0]
    excess = max(1.0, sum(costs[i].demand for i in running)) - 1.0
    return [1.0 / ((1.0 + costs[i].memory_share * excess) * (1.0 + interference))
            for i in running]
