"""The CUDA backend's whole iteration on the CPU: CudaStreams itself (not SimulatedStreams)
over the stand-in driver of test_cuda_backend.py and a recording stand-in for torch.cuda,
driving the tiny model through the executor for several batches: green contexts (and their
fallback to plain streams), the partitions' streams and SM budgets, torch events, graph capture
and replay, padding rows, page-table growth.

The stand-in (FakeCuda) runs every op at once on the CPU, in issue order, except under graph
capture, where it records the op instead of running it, as CUDA does; a replay runs the recorded
ops again. It keeps a trace of what the backend issued (ops with their stream and SM budget,
event records, waits, captures, replays) and enforces CUDA's capture rules (a stream joins a
capture only by waiting on an event recorded in it; every joined stream must be joined back; no
waits on events from outside the capture). Results are checked against the "sequential" layout;
the trace is checked against the plan: a happens-before order is built from stream order and
the recorded waits (a replayed graph's side streams are its own, ordered after the replaying
stream only through its events), and every launch must come after the launches its plan waits
for, after the batch's copy into the graph's buffers and the previous iteration's logits, and
before this iteration's logits; every launch of the plan runs once, on its partition's stream,
with its partition's budget. Since every op runs in issue order here, results alone could not
show a missing wait: the trace check does, and the mutation tests show that it catches a
dropped, misplaced or mis-streamed wait.
"""

from __future__ import annotations

import itertools
import sys
from contextlib import contextmanager
from types import ModuleType, SimpleNamespace

import pytest
import torch
from executor_rig import BATCH, GRAPH_SAFE, Rig, close, dense_attention
from test_cuda_backend import FakeDriver

from nanorun.backends import MAIN, CudaStreams, current_sm_budget, padded_size
from nanorun.backends import cuda as cuda_backend
from nanorun.backends import partitions
from nanorun.batch import StaticBatch
from nanorun.executor import Executor
from nanorun.layout import overlap
from nanorun.search import get_device

SPEC = get_device("h200")        # 132 SMs, groups of 8: the overlap layout's shares are real


class FakeStream:
    def __init__(self, fake: FakeCuda, name: str) -> None:
        self.fake, self.name = fake, name

    def wait_event(self, event: FakeEvent) -> None:
        self.fake.emit("wait", self, event.latest)

    @property
    def cuda_stream(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        return f"<{self.name}>"


class FakeEvent:
    def __init__(self, fake: FakeCuda, **_) -> None:
        self.fake, self.latest = fake, None

    def record(self, stream: FakeStream | None = None) -> None:
        self.latest = next(self.fake.versions)      # a wait waits for the latest record
        self.fake.emit("record", stream or self.fake.current, self.latest)


class FakeGraph:
    def __init__(self, fake: FakeCuda) -> None:
        self.fake, self.entries, self.capture_stream = fake, [], None

    def replay(self) -> None:
        self.fake.emit("replay", self.fake.current, self)
        with self.fake.replaying():
            for kind, _, arg in self.entries:
                if kind == "op" and self.fake.execute:
                    arg["run"]()


class FakeCuda:
    """The torch.cuda calls the backend makes, recorded into `trace` (see the module doc)."""

    def __init__(self, sms: int = 132) -> None:
        self.sms = sms
        self.trace: list[tuple] = []
        self.versions = itertools.count(1)
        self.default = FakeStream(self, "default")
        self._stack = [self.default]
        self._external: dict[int, FakeStream] = {}
        self._capture: FakeGraph | None = None
        self._joined: set[FakeStream] = set()
        self._captured_versions: set[int] = set()
        self._replaying = False
        self.iteration = 0
        self.carveout = None
        self.execute = True     # False: ops are only traced (the mutation runs need no data)
        self.graphs_made = 0

    # -- torch.cuda --------------------------------------------------------------------------
    def is_available(self) -> bool:
        return True

    def current_device(self) -> int:
        return 0

    def get_device_properties(self, device) -> SimpleNamespace:
        return SimpleNamespace(multi_processor_count=self.sms, name="stand-in H200")

    def current_stream(self, device=None) -> FakeStream:
        return self.current

    def Stream(self, device=None) -> FakeStream:  # noqa: N802 (torch's name)
        return FakeStream(self, f"stream-{len(self._external)}-{id(object())}")

    def ExternalStream(self, handle: int, device=None) -> FakeStream:  # noqa: N802
        return self._external.setdefault(handle, FakeStream(self, f"green-{handle}"))

    def Event(self, **kwargs) -> FakeEvent:  # noqa: N802
        return FakeEvent(self, **kwargs)

    def CUDAGraph(self) -> FakeGraph:  # noqa: N802
        self.graphs_made += 1
        return FakeGraph(self)

    def graph_pool_handle(self) -> object:
        return object()

    @contextmanager
    def stream(self, s: FakeStream):
        self._stack.append(s)
        try:
            yield
        finally:
            self._stack.pop()

    @contextmanager
    def device(self, device):
        yield

    @contextmanager
    def graph(self, graph: FakeGraph, pool=None):
        capture = FakeStream(self, f"capture-{id(graph)}")
        self._capture, self._joined, self._captured_versions = graph, {capture}, set()
        graph.capture_stream = capture
        self._stack.append(capture)
        try:
            yield
            self._end_capture(graph)
        finally:
            self._stack.pop()
            self._capture = None

    # -- recording ---------------------------------------------------------------------------
    @property
    def current(self) -> FakeStream:
        return self._stack[-1]

    @contextmanager
    def replaying(self):
        self._replaying = True
        try:
            yield
        finally:
            self._replaying = False

    def emit(self, kind: str, stream: FakeStream, arg) -> None:
        if self._replaying:
            return                   # the replay entry stands for what the graph runs
        if self._capture is None:
            self.trace.append((kind, stream, arg, self.iteration))
            return
        # CUDA's capture rules, as errors torch would raise.
        if kind == "wait":
            if arg is not None and arg not in self._captured_versions:
                raise RuntimeError("operation not permitted when stream is capturing: a wait "
                                   "on an event recorded outside the capture")
            if arg is not None:
                self._joined.add(stream)
        elif stream not in self._joined:
            raise RuntimeError(f"{kind} on {stream}, which has not joined the capture")
        if kind == "record":
            self._captured_versions.add(arg)
        self._capture.entries.append((kind, stream, arg))

    def _end_capture(self, graph: FakeGraph) -> None:
        """Every stream that joined must be joined back: its last entry must come before the
        capture stream's end, directly or through other streams (issue() joins only the
        streams nobody else waits for; if CUDA insisted on direct joins, the GPU tests'
        captures would fail with cudaErrorStreamCaptureUnjoined and say so)."""
        anc, last, records = [], {}, {}
        for kind, stream, arg in graph.entries:
            mask = 0
            for p in (last.get(stream), records.get(arg) if kind == "wait" else None):
                if p is not None:
                    mask |= anc[p] | (1 << p)
            anc.append(mask)
            last[stream] = len(anc) - 1
            if kind == "record":
                records[arg] = last[stream]
        end = last.get(graph.capture_stream)
        unjoined = [s for s, n in last.items() if s is not graph.capture_stream
                    and (end is None or not anc[end] >> n & 1)]
        if unjoined:
            raise RuntimeError(f"capture ended with unjoined streams {sorted(map(str, unjoined))}")

    def op(self, tag: tuple, run) -> None:
        """An op enqueued on the current stream: run now, or recorded under capture."""
        entry = {"tag": tag, "budget": current_sm_budget(), "carveout": self.carveout,
                 "run": run}
        self.emit("op", self.current, entry)
        if self._capture is None and self.execute:
            run()


def _torch_proxy(fake: FakeCuda) -> ModuleType:
    """torch as the backend modules see it: the fake torch.cuda, CPU tensors for cuda ones,
    the SM carveout recorded."""
    proxy = ModuleType("torch_on_fake_cuda")
    proxy.__dict__.update({k: getattr(torch, k) for k in ("device", "float32", "Tensor")})
    proxy.cuda = fake

    def zeros(*shape, device=None, **kw):
        return torch.zeros(*shape, **kw)

    def carveout(n):
        fake.carveout = n

    proxy.zeros = zeros
    proxy._C = SimpleNamespace(_set_sm_carveout_experimental=carveout)
    blas = {"library": "cublas"}
    proxy.backends = SimpleNamespace(cuda=SimpleNamespace(
        preferred_blas_library=lambda name=None: blas.update(library=name or blas["library"])
        or blas["library"]))
    return proxy


@pytest.fixture
def fake(monkeypatch, expected):
    """The stand-in torch.cuda and driver, installed where the backend imports them, and the
    executor's ops reporting to it (after the sequential references are computed: their ops
    stay out of the trace)."""
    cuda = FakeCuda()
    proxy = _torch_proxy(cuda)
    monkeypatch.setattr(cuda_backend, "torch", proxy)
    monkeypatch.setattr(partitions, "torch", proxy)
    driver = FakeDriver()
    bindings = ModuleType("cuda.bindings")
    bindings.driver = driver
    package = ModuleType("cuda")
    package.bindings = bindings
    monkeypatch.setitem(sys.modules, "cuda", package)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.driver", driver)
    monkeypatch.delenv(partitions.GREEN_ENV, raising=False)

    launcher, logits, load = Executor._launcher, Executor._logits, StaticBatch.load

    def recording_launcher(self, batch):
        run = launcher(self, batch)
        return lambda lx: cuda.op(("launch", self, lx, batch), lambda: run(lx))

    monkeypatch.setattr(Executor, "_launcher", recording_launcher)
    monkeypatch.setattr(Executor, "_logits", lambda self, batch: _logits_op(
        cuda, lambda: logits(self, batch)))
    monkeypatch.setattr(StaticBatch, "load", lambda self, batch, size: cuda.op(
        ("load",), lambda: load(self, batch, size)))
    cuda.driver = driver
    return cuda


def _logits_op(cuda: FakeCuda, fn):
    out = {}
    cuda.op(("logits",), lambda: out.setdefault("x", fn()))
    return out.get("x", torch.zeros(0))


# -- the trace against the plan --------------------------------------------------------------------
def violations(fake: FakeCuda, executor: Executor) -> list[str]:
    """What in the trace breaks the plan's order, per the module doc; [] when nothing does."""
    nodes, problems = _happens_before(fake)
    by_iteration: dict[int, list] = {}
    for n in nodes:
        by_iteration.setdefault(n["iteration"], []).append(n)
    parts = executor.streams.partitions
    previous_logits = None
    for it, its in sorted(by_iteration.items()):
        ops = [n for n in its if n["tag"][0] == "launch" and n["tag"][1] is executor]
        logits = [n for n in its if n["tag"] == ("logits",)]
        loads = [n for n in its if n["tag"] == ("load",)]
        if not ops:
            continue
        batch = ops[0]["tag"][3]
        plan = executor.planner.plan(batch)
        body = [i for i, lx in enumerate(plan.launches) if lx.op != "logits"]
        at = {}
        for n in ops:
            i = plan.launches.index(n["tag"][2])
            if i in at:
                problems.append(f"iteration {it}: launch {i} ran twice")
            at[i] = n
            lx = plan.launches[i]
            if n["stream"] is not parts[lx.stream].stream:
                problems.append(f"iteration {it}: launch {i} on {n['stream']}, not partition "
                                f"{parts[lx.stream].name}'s stream")
            if n["budget"] != parts[lx.stream].budget:
                problems.append(f"iteration {it}: launch {i} saw budget {n['budget']}")
        missing = set(body) - set(at)
        if missing:
            problems.append(f"iteration {it}: launches {sorted(missing)} never ran")
        for i, n in at.items():
            for w in plan.launches[i].waits:
                if w in at and not _before(at[w], n):
                    problems.append(f"iteration {it}: launch {i} is not ordered after {w}")
            for before in [*loads, *([previous_logits] if previous_logits else [])]:
                if not _before(before, n):
                    problems.append(f"iteration {it}: launch {i} is not ordered after "
                                    f"{before['tag'][0]} (iteration {before['iteration']})")
            for after in logits:
                if not _before(n, after):
                    problems.append(f"iteration {it}: logits are not ordered after launch {i}")
        previous_logits = logits[-1] if logits else previous_logits
    return problems


def _before(a: dict, b: dict) -> bool:
    return bool(b["ancestors"] >> a["id"] & 1)


def _happens_before(fake: FakeCuda) -> tuple[list[dict], list[str]]:
    """Op nodes with their ancestors (a bitset of node ids), from stream order and waits.
    A replay runs its graph on streams of its own, except the capture stream's entries, which
    run on the replaying stream."""
    anc_of, last, records, nodes, problems = [], {}, {}, [], []

    def node(stream_key, preds) -> int:
        mask = 0
        for p in preds:
            if p is not None:
                mask |= anc_of[p] | (1 << p)
        if last.get(stream_key) is not None:
            mask |= anc_of[last[stream_key]] | (1 << last[stream_key])
        anc_of.append(mask)
        last[stream_key] = len(anc_of) - 1
        return last[stream_key]

    def issue(kind, stream_key, arg, iteration, op_stream):
        if kind == "record":
            records[arg] = node(stream_key, [])
        elif kind == "wait":
            if arg is not None and arg not in records:
                problems.append(f"a wait on event version {arg}, recorded nowhere")
            node(stream_key, [records.get(arg)])
        elif kind == "op":
            n = node(stream_key, [])
            nodes.append({"id": n, "tag": arg["tag"], "budget": arg["budget"],
                          "stream": op_stream, "iteration": iteration})

    for replay_k, (kind, stream, arg, iteration) in enumerate(fake.trace):
        if kind != "replay":
            issue(kind, stream, arg, iteration, stream)
            continue
        graph, fresh = arg, {}
        for gkind, gstream, garg in graph.entries:
            key = stream if gstream is graph.capture_stream else (gstream, replay_k)
            if gkind in ("record", "wait") and garg is not None:
                garg = fresh.setdefault(garg, ("replay", replay_k, garg))
            issue(gkind, key, garg, iteration, gstream)
    for n in nodes:
        n["ancestors"] = anc_of[n["id"]]
    return nodes, problems


# -- running the tiny model ------------------------------------------------------------------------
SHAPES = [[(4, 1), (6, 1), (0, 22), (11, 1), (2, 12)],      # decodes and prompt chunks
          [(0, 9), (3, 1), (30, 1), (0, 17), (7, 12)],      # the same padded size: a replay
          [(17, 1)] * 5,                                     # a small size: padding rows
          [(200, 1)] * 4]                                    # page tables grow: recapture


@pytest.fixture(scope="module")
def rig():
    return Rig(attention=dense_attention)


@pytest.fixture(scope="module")
def batches(rig):
    return rig.batches(SHAPES, seed=3)


@pytest.fixture(scope="module")
def expected(rig, batches):
    return [rig.run(rig.sequential, b) for b in batches]


def drive(fake, rig, batches, expected, order=(0, 1, 2, 3, 0, 2), streams_cls=CudaStreams):
    """Run batches[i] for i in `order` (by default: then the first and third again, replays of
    sizes captured before the page tables grew); (executor, [result == sequential, ...])."""
    layout = overlap(tuple(op.name for op in rig.model.layer_ops), BATCH, SPEC)
    streams = streams_cls(layout, "cuda")
    ex = Executor(rig.model, rig.kv, BATCH, layout, SPEC, kernels=GRAPH_SAFE, streams=streams)
    results = []
    for k, i in enumerate(order):
        fake.iteration = k
        got = rig.run(ex, batches[i])
        results.append(fake.execute and close(got, expected[i]))
    return ex, results


def test_a_whole_iteration_on_green_contexts_follows_the_plan(fake, rig, batches, expected):
    ex, results = drive(fake, rig, batches, expected)
    assert all(results)
    streams = ex.streams
    assert streams.green and streams.how == "green contexts"
    assert {p.name: p.granted for p in streams.partitions} == {
        p.name: p.sm_count for p in ex.layout.partitions}
    assert ex.graphs_active, ex.graphs.failure
    # Padding rows: some batch ran as a larger captured size. Page-table growth: the long
    # batch regrew the fixed buffers, dropped every graph and recaptured what came after.
    assert any(padded_size(b.num_tokens, ex.graphs.sizes) > b.num_tokens for b in batches)
    assert ex.graphs.static.max_pages >= batches[3].block_tables.shape[1]
    sizes_before_growth = {padded_size(b.num_tokens, ex.graphs.sizes) for b in batches[:3]}
    assert fake.graphs_made > len(ex.graphs.graphs) and len(sizes_before_growth) >= 2
    kinds = [e[0] for e in fake.trace]
    assert kinds.count("replay") >= 2           # batches 1, 4 and 5 replay captured sizes
    assert violations(fake, ex) == []
    # SM budgets: MAIN's ops (load, logits) see none, each partition's launches its own, and
    # cuBLAS's carveout is the device's SMs less the budget, set around those launches only.
    ops = [e[2] for e in fake.trace if e[0] == "op"]
    ops += [g[2] for e in fake.trace if e[0] == "replay" for g in e[2].entries if g[0] == "op"]
    assert {(o["tag"][0], o["budget"]) for o in ops if o["tag"][0] != "launch"} == {
        ("load", None), ("logits", None)}
    for o in ops:
        want = None if o["budget"] is None or o["budget"] >= 132 else 132 - o["budget"]
        assert o["carveout"] == want, o["tag"][:1]
    assert {o["budget"] for o in ops if o["tag"][0] == "launch"} == {
        p.budget for p in streams.partitions}
    assert fake.carveout is None


def test_without_green_contexts_plain_streams_follow_the_plan_too(fake, rig, batches, expected,
                                                                  monkeypatch):
    fake.driver.fail = "cuGreenCtxCreate"
    ex, results = drive(fake, rig, batches, expected)
    assert all(results) and not ex.streams.green
    assert "green contexts failed: " in ex.streams.how and "cuGreenCtxCreate" in ex.streams.how
    assert [p.granted for p in ex.streams.partitions] == [132, 132]
    assert violations(fake, ex) == []


def test_the_capture_rules_are_enforced(fake):
    """The stand-in refuses what CUDA refuses, so the backend's captures are held to them."""
    side = fake.Stream()
    graph = fake.CUDAGraph()
    with pytest.raises(RuntimeError, match="has not joined"):
        with fake.graph(graph):
            fake.op(("x",), lambda: None)
            with fake.stream(side):
                fake.op(("y",), lambda: None)
    with pytest.raises(RuntimeError, match="unjoined"):
        with fake.graph(fake.CUDAGraph()):
            e = fake.Event()
            e.record()
            side.wait_event(e)
            with fake.stream(side):
                fake.op(("y",), lambda: None)
    outside = fake.Event()
    outside.record()
    with pytest.raises(RuntimeError, match="outside the capture"):
        with fake.graph(fake.CUDAGraph()):
            side.wait_event(outside)


# -- mutation: a wrong wait is caught ----------------------------------------------------------------
class Mutant(CudaStreams):
    """Gets the k-th wait of the whole run wrong: drops it, moves it after the next launch on
    its stream, or puts it on another stream."""

    how_wrong = "drop"
    k = 0

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.count, self.deferred, self.mutated = 0, {}, None

    def wait(self, stream, event) -> None:
        k, self.count = self.count, self.count + 1
        if k != self.k:
            return super().wait(stream, event)
        self.mutated = f"{self.how_wrong} wait #{k} on stream {stream}"
        if self.how_wrong == "late":
            self.deferred[stream] = event
        elif self.how_wrong == "other-stream":
            super().wait(MAIN if stream != MAIN else 0, event)

    def enqueue(self, stream, fn) -> None:
        super().enqueue(stream, fn)
        if stream in self.deferred:
            super().wait(stream, self.deferred.pop(stream))


MUTATED_RUN = (0, 1)     # a size's first batch (eager, then captured), then a replay of it


@pytest.mark.slow
def test_every_wrong_wait_is_caught(fake, rig, batches, expected):
    """Each wait of a run of two iterations (eager + capture, then a replay), made wrong in
    each of three ways, must show as a violation of the plan's order (or break a capture)."""
    total = _count_waits(fake, rig, batches, expected)
    assert total >= 10
    fake.execute = False        # the trace is the same whatever the data: only it is checked
    uncaught = []
    for how in ("drop", "late", "other-stream"):
        for k in range(total):
            fake.trace.clear()
            mutant = type("M", (Mutant,), {"how_wrong": how, "k": k})
            ex, _ = drive(fake, rig, batches, expected, MUTATED_RUN, streams_cls=mutant)
            caught = violations(fake, ex) or not ex.graphs_active
            if not caught:
                uncaught.append(ex.streams.mutated)
    assert not uncaught, f"these went unnoticed: {uncaught}"


def _count_waits(fake, rig, batches, expected) -> int:
    """The waits a correct run issues (eager ones and captured ones), checked correct."""
    counting = type("Counting", (Mutant,), {"k": -1})
    fake.trace.clear()
    ex, results = drive(fake, rig, batches, expected, MUTATED_RUN, streams_cls=counting)
    assert all(results) and violations(fake, ex) == []
    return ex.streams.count
