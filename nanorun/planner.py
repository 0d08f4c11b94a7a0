"""plan(batch, layout) -> Plan: the ordered op launches of one iteration and their dependencies.

Pure host work. Each launch runs one op of one layer on one nano-batch (a token range) on one
partition's stream. Dependencies come from what the ops read and write (OpSpec.reads/writes,
row ranges of the workspace buffers and each layer's KV cache), so the planner knows no op by
name: read-after-write, write-after-read and write-after-write on overlapping rows order two
launches. Launches on one stream run in issue order; across streams a launch waits for the
latest launch it needs on each other stream, and waits already implied by earlier ones are
dropped (vector clocks), so every wait in a Plan is necessary.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field

from .layout import Layout, LayoutError

EMBED, LOGITS = "embed", "logits"
_CACHE_SIZE = 1024


@dataclass(frozen=True)
class Launch:
    op: str                    # "embed", a layer op, or "logits"
    layer: int                 # -1 for embed and logits
    nano_batch: int
    t0: int                    # token range [t0, t1) of the batch
    t1: int
    stream: int                # index of the layout's partition
    waits: tuple[int, ...]     # launches on other streams that must finish first


@dataclass(frozen=True)
class Plan:
    launches: tuple[Launch, ...]
    num_streams: int
    # What runners derive from the plan once and reuse on every run of it (backends.streams
    # keeps its issue program here). A plan never changes, so neither does what is derived.
    derived: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def recorded(self) -> frozenset[int]:
        """Launches some other stream waits for: each records an event."""
        return frozenset(w for launch in self.launches for w in launch.waits)


class Planner:
    """Plans iterations of `num_layers` layers of `layer_ops` under `layout`; cached per batch
    shape (token count, and the nano-batch edge at or below where each KV-reading nano-batch's
    first sequence starts: see _start_key). `hits` and `misses` count the cache's answers."""

    def __init__(self, layer_ops, num_layers: int, layout: Layout) -> None:
        self.specs = {op.name: op for op in layer_ops}
        self.num_layers = num_layers
        self.layout = layout
        self.slots = layout.issue_slots()
        self._max_shift = max(shift for *_, shift in self.slots)
        self._splits = {op: ol.splits for op, ol in layout.ops}
        self._check_shifts()
        # Ops reading the KV cache read earlier tokens of their sequences too, so their plans
        # depend on where those sequences start.
        self._seq_ops = [op.name for op in layer_ops if "kv_cache" in op.reads]
        self._cache: OrderedDict[tuple, Plan] = OrderedDict()
        self._per_size: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self.hits = self.misses = 0

    def plan(self, batch) -> Plan:
        T, starts = batch.num_tokens, batch.seq_starts
        key = (T, self._start_key(T, starts))
        plan = self._cache.get(key)
        if plan is None:
            self.misses += 1
            plan = self._build(T, starts)
            self._cache[key] = plan
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self.hits += 1
            self._cache.move_to_end(key)
        return plan

    def _start_key(self, T: int, starts) -> tuple[int, ...]:
        """Where the sequences of the KV-reading launches start, as far as the plan can tell.

        Such a launch reads rows [start, t1) of the KV cache, and every other range the planner
        compares it with runs between nano-batch edges. Between two consecutive edges e <= start
        < e', `start < b` holds for an edge b exactly when `e < b`, and `a <= start` exactly when
        `a <= e`, so the plan is the same for any start in [e, e'): the key keeps e. (Keying by
        the start itself missed the cache whenever a prompt chunk straddled an edge, which in
        served mixed batches is most iterations.)"""
        per_size = self._per_size.get(T)
        if per_size is None:
            t0s = tuple(e for op in self._seq_ops for e in self._edges(op, T)[:-1])
            edges = tuple(sorted({e for op in self.specs for e in self._edges(op, T)} | {0, T}))
            per_size = self._per_size[T] = (t0s, edges)
            if len(self._per_size) > _CACHE_SIZE:
                self._per_size.clear()
        t0s, edges = per_size
        return tuple(edges[bisect.bisect_right(edges, _seq_start(starts, t)) - 1] for t in t0s)

    # -- building -------------------------------------------------------------------------------
    def _edges(self, op: str, T: int) -> list[int]:
        """Nano-batch boundaries of `op` for a batch of T tokens (the layout's proportions)."""
        splits, total = self._splits[op], self.layout.batch_tokens
        edges, acc = [0], 0
        for s in splits:
            acc += s
            edges.append(round(T * acc / total))
        return edges

    def _launch_specs(self, T: int):
        """(op, layer, nano_batch, t0, t1, stream) in issue order, empty ranges skipped."""
        first = self.slots[0][0]
        # The logits are a GEMM (the LM head): they go where the layer's last GEMM went, not
        # on the last op's partition, which under tensor parallelism is the small network one.
        gemms = [op for op, _, _ in self.slots if self.specs[op].kind == "gemm"]
        last = gemms[-1] if gemms else self.slots[-1][0]
        yield EMBED, -1, 0, 0, T, self.layout.partition_index(self.layout.op(first).partition)
        edges = {op: self._edges(op, T) for op in self.specs}
        stream = {op: self.layout.partition_index(self.layout.op(op).partition)
                  for op in self.specs}
        # Slot v issues the layer-v launches, and the shifted ones of layer v - 1.
        for v in range(self.num_layers + self._max_shift):
            for op, i, shift in self.slots:
                layer = v - shift
                t0, t1 = edges[op][i], edges[op][i + 1]
                if 0 <= layer < self.num_layers and t0 < t1:
                    yield op, layer, i, t0, t1, stream[op]
        yield LOGITS, -1, 0, 0, T, stream[last]

    def _check_shifts(self) -> None:
        """A shifted launch of layer l is issued among layer l + 1's: it must still come before
        each of layer l + 1's launches that touches rows of a buffer it touches (a write on
        either side). Layout.validate checks the order within a layer."""
        bounds = {op: list(zip(e[:-1], e[1:])) for op, e in
                  ((op, self._edges(op, self.layout.batch_tokens)) for op in self.specs)}
        for n, (b, j, shift) in enumerate(self.slots):
            if not shift:
                continue
            for a, i, a_shift in self.slots[:n]:
                if not a_shift and _conflict(self.specs[b], bounds[b][j],
                                             self.specs[a], bounds[a][i]):
                    raise LayoutError(
                        f"order shifts ({b!r}, {j}) to the next layer's slot but issues that "
                        f"layer's ({a!r}, {i}) first, and both touch the same rows: shift "
                        f"({a!r}, {i}) too, or move it after ({b!r}, {j})")

    def _accesses(self, op: str, layer: int, t0: int, t1: int, starts):
        """[(buffer, lo, hi, is_write)] of one launch."""
        if op == EMBED:
            return [("hidden", t0, t1, True)]
        if op == LOGITS:
            return [("hidden", t0, t1, False)]
        spec = self.specs[op]
        out = []
        for buf in spec.reads:
            lo = t0
            if buf == "kv_cache":   # attention reads every earlier token of its sequences
                lo = _seq_start(starts, t0)
            out.append((_buffer(buf, layer), lo, t1, False))
        out += [(_buffer(buf, layer), t0, t1, True) for buf in spec.writes]
        return out

    def _build(self, T: int, starts) -> Plan:
        num_streams = len(self.layout.partitions)
        history: dict[str, list[tuple[int, int, int, bool]]] = {}
        clocks = _Clocks(num_streams)
        launches = []
        for op, layer, nb, t0, t1, stream in self._launch_specs(T):
            index = len(launches)
            accesses = self._accesses(op, layer, t0, t1, starts)
            deps = _hazards(accesses, history)
            _record(accesses, history, index)
            waits = clocks.add(index, stream, deps)
            launches.append(Launch(op, layer, nb, t0, t1, stream, waits))
        return Plan(tuple(launches), num_streams)


def _conflict(x, x_rows, y, y_rows) -> bool:
    """Whether ops x and y of consecutive layers touch a shared buffer's rows, one writing.
    The KV cache is per layer, so it never conflicts across layers."""
    if not (x_rows[0] < y_rows[1] and y_rows[0] < x_rows[1]):
        return False
    shared = lambda bufs: {b for b in bufs if b != "kv_cache"}  # noqa: E731
    x_all, y_all = shared(x.reads) | shared(x.writes), shared(y.reads) | shared(y.writes)
    return bool(shared(x.writes) & y_all or shared(y.writes) & x_all)


def _buffer(name: str, layer: int) -> str:
    return f"kv_cache.{layer}" if name == "kv_cache" else name


def _seq_start(starts, t: int) -> int:
    """First token of the sequence that token t belongs to."""
    return starts[bisect.bisect_right(starts, t) - 1]


def _hazards(accesses, history) -> set[int]:
    deps = set()
    for buf, lo, hi, write in accesses:
        for plo, phi, idx, pwrite in history.get(buf, ()):
            if plo < hi and lo < phi and (write or pwrite):
                deps.add(idx)
    return deps


def _record(accesses, history, index: int) -> None:
    for buf, lo, hi, write in accesses:
        entries = history.setdefault(buf, [])
        if write:   # a write orders everything before it on these rows: forget what it covers
            entries[:] = [e for e in entries if not (lo <= e[0] and e[1] <= hi)]
        entries.append((lo, hi, index, write))


class _Clocks:
    """Vector clocks: which position of every stream each stream already knows is done."""

    def __init__(self, num_streams: int) -> None:
        self.known = [[-1] * num_streams for _ in range(num_streams)]
        self.stream_of: list[int] = []
        self.pos_of: list[int] = []
        self.clock_of: list[tuple[int, ...]] = []
        self.count = [0] * num_streams

    def add(self, index: int, stream: int, deps: set[int]) -> tuple[int, ...]:
        known = self.known[stream]
        # Per other stream, only the latest needed launch matters (stream order implies the rest).
        latest: dict[int, int] = {}
        for d in deps:
            s = self.stream_of[d]
            if s == stream or self.pos_of[d] <= known[s]:
                continue
            if s not in latest or self.pos_of[d] > self.pos_of[latest[s]]:
                latest[s] = d
        cands = list(latest.values())
        if len(cands) < 2:      # most launches: nothing to prune, and this runs per launch
            waits = tuple(cands)
        else:   # a wait another candidate already implies is dropped
            waits = tuple(sorted(c for c in cands if not any(
                o != c and self.clock_of[o][self.stream_of[c]] >= self.pos_of[c]
                for o in cands)))
        for w in waits:
            known[:] = [max(a, b) for a, b in zip(known, self.clock_of[w])]
        self.stream_of.append(stream)
        self.pos_of.append(self.count[stream])
        known[stream] = self.count[stream]
        self.count[stream] += 1
        self.clock_of.append(tuple(known))
        return waits
