"""A discrete-event simulation of a serving cluster: machines, their iterations, KV transfers.

A machine is one tensor-parallel group (a DGX: 8 GPUs at tp=8) running nanorun's engine in one
role:
- "mixed": Dynamic SplitFuse, today's nanorun: every iteration carries one decode token per
  running request and fills the rest of the dense batch with prompt chunks.
- "prompt" (Splitwise's prompt machine): prompt chunks only. A request's first token is
  sampled at the end of its prefill; its KV cache then goes to a token machine.
- "token" (Splitwise's token machine): decode tokens only, for requests whose KV has arrived.

Splitwise's mixed pool is a role change: a prompt or token machine borrowed for the other
phase becomes "mixed" while it is, and returns to its pool when it runs empty.

The KV transfer streams layer by layer while the prompt computes (Splitwise section IV-C): each
layer's KV leaves as soon as that layer's append is done, so only what the link has not sent by
the end of the prefill is exposed: max(one layer's share, all of it - the prefill's duration).

Iteration times come from an IterationTable (search/itertable.py) per machine. Events are
request arrivals, iteration ends and KV arrivals; between them nothing changes, so the clock
jumps. Times are seconds from the first arrival.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .itertable import IterationTable

ROLES = ("mixed", "prompt", "token")


@dataclass(frozen=True)
class MachineKind:
    """One kind of machine: its GPUs, what it costs and draws, how fast it ships KV."""

    gpu: str                    # device spec name (nanorun/device.py)
    gpus: int                   # GPUs per machine; the engine runs tp = gpus
    cost_per_hour: float        # $ per machine-hour
    power_kw: float             # provisioned power per machine
    network_gbps: float         # machine-to-machine bandwidth for KV, Gb/s, all NICs together
    source: str = ""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.cost_per_hour <= 0 or self.power_kw <= 0 \
                or self.network_gbps <= 0:
            raise ValueError(f"machine kind {self.gpu}: GPUs, cost, power and network "
                             f"bandwidth must be positive")


_SPLITWISE = ("cost: Splitwise (Patel et al., ISCA 2024) DGX pricing as recalled, $17.6/h "
              "DGX-A100 and $38/h DGX-H100, whose ratio 2.16 matches splitwise-sim's iso-cost "
              "clusters (configs/cluster/isocost_a100.yaml 86 DGX-A100 = isocost_h100.yaml 40 "
              "DGX-H100); power: splitwise-sim configs/hardware_repo/skus/dgx-*.yaml tdp (W); "
              "KV link: splitwise-sim configs/orchestrator_repo/schedulers/mixed_pool.yml "
              "transfer_bandwidth 200 (GB/s, i.e. 8 x 200 Gb/s InfiniBand); "
              "github.com/Mutinifni/splitwise-sim @8f99e7d, MIT")
MACHINES: dict[str, MachineKind] = {
    "a100": MachineKind("a100", 8, 17.6, 6.5, 1600.0, _SPLITWISE),
    "h100": MachineKind("h100", 8, 38.0, 10.2, 1600.0, _SPLITWISE),
    "h200": MachineKind("h200", 8, 45.6, 10.2, 1600.0,
                        "assumption (not in Splitwise): DGX-H200 at 1.2 x the DGX-H100's cost, "
                        "its 10.2 kW and 8 x 200 Gb/s"),
}


@dataclass
class Machine:
    """A machine's state during a simulation."""

    index: int
    kind: MachineKind
    home: str                           # its pool's role
    tables: dict[str, IterationTable]   # role -> iteration times under that role's layout
    kv_capacity: int                    # KV tokens that fit next to the weights
    max_seqs: int                       # requests decoding at once
    role: str = ""
    token_budget: int | None = None     # a mixed machine's tokens per iteration (None: its
                                        # dense batch); smaller trades TTFT for TBT
    queue: deque = field(default_factory=deque)      # requests waiting for / in prefill
    incoming: deque = field(default_factory=deque)   # KV arrived, waiting for room to decode
    running: list = field(default_factory=list)      # requests decoding
    kv_used: int = 0
    queued_tokens: int = 0                           # prompt tokens not yet prefilled
    promised: int = 0                                # KV tokens in flight to it or waiting
    promised_seqs: int = 0
    busy: bool = False
    batch: tuple = ()

    def __post_init__(self) -> None:
        self.role = self.role or self.home

    @property
    def batch_tokens(self) -> int:
        b = self.tables[self.role].batch_tokens
        return min(b, self.token_budget) if self.token_budget and self.role == "mixed" else b


@dataclass(frozen=True)
class Requests:
    """The simulated requests: [N] arrival seconds, prompt and output lengths."""

    arrivals: np.ndarray
    prompt_lens: np.ndarray
    output_lens: np.ndarray

    def __len__(self) -> int:
        return len(self.arrivals)


@dataclass
class Outcome:
    """Per-request latencies of one simulation (inf: not served before the time limit)."""

    ttft: np.ndarray                    # [N] seconds from arrival to the first token
    tbt_mean: np.ndarray                # [N] mean gap between later tokens (nan: one token)
    token_gaps: np.ndarray              # every gap between two tokens of a request
    finished: int
    end_time: float
    borrowed: int                       # times a machine was lent to the other phase
    iterations: int


class ClusterSim:
    """Simulate `requests` on `machines`, routing join-shortest-queue.

    `borrow`: a prompt machine whose queue holds more than `long_queue_tokens` prompt tokens
    makes the router borrow a token machine as a mixed one (and a request that no token machine
    has room for borrows a prompt machine), as Splitwise's mixed pool does."""

    def __init__(self, machines: list[Machine], requests: Requests, *, kv_bytes_per_token: int,
                 num_layers: int, borrow: bool = False, long_queue_tokens: int = 8192,
                 time_limit: float | None = None) -> None:
        self.m = machines
        self.r = requests
        self.kv_bytes = kv_bytes_per_token
        self.layers = num_layers
        self.borrow = borrow
        self.long_queue = long_queue_tokens
        span = float(requests.arrivals[-1]) if len(requests) else 0.0
        self.time_limit = time_limit if time_limit is not None else span + max(60.0, span)
        n = len(requests)
        self.P = requests.prompt_lens.astype(np.int64).tolist()
        self.O = requests.output_lens.astype(np.int64).tolist()
        self.done = [0] * n            # prompt tokens prefilled
        self.generated = [0] * n       # output tokens so far
        self.started = [0.0] * n       # when its prefill began
        self.local = [False] * n       # KV reserved where it prefills (a mixed machine)
        self.last = [0.0] * n          # when its latest token came
        self.ttft = np.full(n, math.inf)
        self.gap_sum = np.zeros(n)
        self.gaps: list[np.ndarray] = []
        self.events: list = []
        self.seq = 0
        self.finished = 0
        self.borrowed = 0
        self.iterations = 0
        if not any(mc.home in ("mixed", "prompt") for mc in machines):
            raise ValueError("the cluster has no machine that prefills; give it a mixed or "
                             "prompt machine")
        if any(mc.home == "prompt" for mc in machines) and \
                not any(mc.home == "token" for mc in machines):
            raise ValueError("a split cluster needs token machines beside its prompt machines")

    # -- the event loop -----------------------------------------------------------------------
    def run(self) -> Outcome:
        for i, t in enumerate(self.r.arrivals.tolist()):
            self._push(t, 0, i)
        now = 0.0
        while self.events:
            now, kind, _, what = heapq.heappop(self.events)
            if now > self.time_limit:
                break
            if kind == 0:
                self._arrive(now, what)
            elif kind == 1:
                self._iteration_end(now, what)
            else:
                self._kv_arrive(now, *what)
        served = np.isfinite(self.ttft)
        gaps = np.concatenate(self.gaps) if self.gaps else np.zeros(0)
        counts = np.maximum(np.asarray(self.generated) - 1, 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            tbt = np.where(counts > 0, self.gap_sum / np.maximum(counts, 1), np.nan)
        unfinished = len(self.r) - self.finished
        if unfinished:   # what was cut off counts as missing its SLOs
            tbt = np.where(np.asarray(self.generated) < np.asarray(self.O), np.inf, tbt)
            gaps = np.concatenate([gaps, np.full(unfinished, np.inf)])
        return Outcome(np.where(served, self.ttft, math.inf), tbt, gaps, self.finished, now,
                       self.borrowed, self.iterations)

    def _push(self, t: float, kind: int, what) -> None:
        self.seq += 1
        heapq.heappush(self.events, (t, kind, self.seq, what))

    # -- routing ------------------------------------------------------------------------------
    def _arrive(self, now: float, r: int) -> None:
        m = self._prompt_machine(r)
        m.queue.append(r)
        m.queued_tokens += self.P[r]
        self._kick(now, m)

    def _prompt_machine(self, r: int) -> Machine:
        prompt = [m for m in self.m if m.role == "prompt"]
        mixed = [m for m in self.m if m.role == "mixed"]
        if not prompt:
            return min(mixed, key=lambda m: (m.queued_tokens + len(m.running), m.index))
        best = min(prompt, key=lambda m: (m.queued_tokens, m.index))
        if not self.borrow or not self._long(best, r):
            return best
        if mixed:
            other = min(mixed, key=lambda m: (m.queued_tokens, m.index))
            if not self._long(other, r):
                return other
        tokens = [m for m in self.m if m.role == "token"]
        if not tokens:
            return best
        lent = min(tokens, key=lambda m: (m.kv_used, m.index))
        lent.role = "mixed"
        self.borrowed += 1
        return lent

    def _long(self, m: Machine, r: int) -> bool:
        return bool(m.queue) and m.queued_tokens + self.P[r] > self.long_queue

    def _token_machine(self, r: int, source: Machine) -> Machine:
        """Where a prefilled request decodes: the token machine (then a mixed one) with room
        and the least KV held or promised; else, borrowing, a prompt machine lent as mixed;
        else the least loaded token machine, where it waits for room. Never `source`, the
        prompt machine it leaves."""
        need = self.P[r] + self.O[r]
        for role in ("token", "mixed"):
            fits = [m for m in self.m if m.role == role and self._fits(m, need)]
            if fits:
                return min(fits, key=lambda m: (self._held(m), m.index))
        if self.borrow:
            prompt = [m for m in self.m if m.role == "prompt" and m is not source
                      and self._fits(m, need)]
            if prompt:
                lent = min(prompt, key=lambda m: (m.queued_tokens, m.index))
                lent.role = "mixed"
                self.borrowed += 1
                return lent
        tokens = [m for m in self.m if m.home == "token"]
        return min(tokens, key=lambda m: (self._held(m), m.index))

    def _held(self, m: Machine) -> int:
        """KV tokens m holds or has promised (in flight to it, or arrived and waiting)."""
        return m.kv_used + m.promised

    def _fits(self, m: Machine, need: int) -> bool:
        return self._held(m) + need <= m.kv_capacity and \
            len(m.running) + m.promised_seqs < m.max_seqs

    # -- a machine's iterations ---------------------------------------------------------------
    def _kick(self, now: float, m: Machine) -> None:
        """Start m's next iteration if it is free and has work."""
        if m.busy:
            return
        if m.role == "mixed" and m.home != "mixed" and self._lent_out(m):
            m.role = m.home         # the borrowed work is done: back to its pool
        self._admit(m)
        decode = m.running[:m.batch_tokens] if m.role != "prompt" else []
        chunks = []
        if m.role != "token":
            budget = m.batch_tokens - len(decode)
            for r in m.queue:
                if budget <= 0:
                    break
                if self.done[r] == 0:
                    if m.role == "mixed" and not self._reserve(m, r):
                        break   # no room to decode it here yet: it waits, in order
                    self.started[r] = now
                take = min(self.P[r] - self.done[r], budget)
                chunks.append((r, take))
                budget -= take
        if not decode and not chunks:
            return
        p = sum(t for _, t in chunks)
        ctx = sum(self.P[r] + self.generated[r] for r in decode) / len(decode) if decode else 0
        seconds = m.tables[m.role](p, len(decode), ctx)
        m.busy, m.batch = True, (decode, chunks)
        self.iterations += 1
        self._push(now + seconds, 1, m.index)

    @staticmethod
    def _lent_out(m: Machine) -> bool:
        """A lent token machine returns when it has no prompt left; a lent prompt machine
        when it has nothing left to decode."""
        if m.home == "token":
            return not m.queue
        return not (m.running or m.incoming or m.promised_seqs)

    def _reserve(self, m: Machine, r: int) -> bool:
        """A mixed machine decodes what it prefills: KV room for the whole request first."""
        need = self.P[r] + self.O[r]
        if m.kv_used + need > m.kv_capacity or len(m.running) >= m.max_seqs:
            return False
        m.kv_used += need
        self.local[r] = True
        return True

    def _admit(self, m: Machine) -> None:
        while m.incoming and m.role != "prompt":
            r = m.incoming[0]
            need = self.P[r] + self.O[r]
            if m.kv_used + need > m.kv_capacity or len(m.running) >= m.max_seqs:
                break
            m.incoming.popleft()
            m.kv_used += need
            m.promised -= need
            m.promised_seqs -= 1
            m.running.append(r)

    def _iteration_end(self, now: float, index: int) -> None:
        m = self.m[index]
        decode, chunks = m.batch
        m.busy, m.batch = False, ()
        if decode:
            gaps = now - np.fromiter((self.last[r] for r in decode), float, len(decode))
            self.gaps.append(gaps)
            for r, g in zip(decode, gaps.tolist()):
                self.gap_sum[r] += g
                self.last[r] = now
                self.generated[r] += 1
            keep = []
            for r in m.running:
                if self.generated[r] >= self.O[r]:
                    self._finish(m, r)
                else:
                    keep.append(r)
            m.running = keep
        for r, take in chunks:
            self.done[r] += take
            m.queued_tokens -= take
            if self.done[r] == self.P[r]:
                m.queue.remove(r)
                self._first_token(now, m, r)
        self._kick(now, m)

    def _first_token(self, now: float, m: Machine, r: int) -> None:
        self.ttft[r] = now - float(self.r.arrivals[r])
        self.last[r] = now
        self.generated[r] = 1
        need = self.P[r] + self.O[r]
        if self.O[r] <= 1:
            self.finished += 1
            if self.local[r]:
                m.kv_used -= need
            return
        if m.role == "mixed" and (self.local[r] or self._reserve(m, r)):
            m.running.append(r)        # a mixed machine decodes what it prefilled
            return
        if self.local[r]:              # reserved while lent as mixed; it went back since
            m.kv_used -= need
            self.local[r] = False
        dest = self._token_machine(r, m)
        dest.promised += need
        dest.promised_seqs += 1
        self._push(now + self._exposed_transfer(now, m, dest, r), 2, (r, dest.index))

    def _exposed_transfer(self, now: float, src: Machine, dst: Machine, r: int) -> float:
        gbps = min(src.kind.network_gbps, dst.kind.network_gbps)
        total = self.P[r] * self.kv_bytes / (gbps * 1e9 / 8)
        return max(total / self.layers, total - (now - self.started[r]))

    def _kv_arrive(self, now: float, r: int, index: int) -> None:
        m = self.m[index]
        m.incoming.append(r)
        self._kick(now, m)

    def _finish(self, m: Machine, r: int) -> None:
        m.kv_used -= self.P[r] + self.O[r]
        self.finished += 1
