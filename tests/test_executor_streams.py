"""The CUDA backend's stream, event and graph logic, run on the CPU.

SimulatedStreams executes the work the backend enqueues in random interleavings constrained
ONLY by stream order and the events the backend actually recorded and waited for (not by the
plan's declared waits), and replays "captured graphs" by re-running their closures on whatever
the fixed buffers hold. So a wrong event, a wait on the wrong stream, a missing record, a
launch reading the caller's batch instead of the graph's fixed buffers, or a plan too weak for
a padded batch all show up here as a result that differs from the "sequential" layout.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from executor_rig import BATCH, GRAPH_SAFE, Rig, close, dense_attention
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner import batch_shapes, layouts

from nanorun.backends import SimulatedStreams, graph_sizes, padded_size
from nanorun.backends.streams import SimulatedEvent
from nanorun.batch import StaticBatch
from nanorun.models import get_preset, model_layer_ops
from nanorun.ops import kv_append, paged_attention, paged_attention_reference


@pytest.fixture(scope="module")
def rig():
    return Rig()


@pytest.fixture(scope="module")
def dense_rig():
    return Rig(attention=dense_attention)


# -- the attention stand-in is itself right --------------------------------------------------------
def test_dense_attention_matches_the_reference(dense_rig):
    batch, = dense_rig.batches([[(5, 1), (0, 13), (20, 3)]], seed=1)
    g = torch.Generator().manual_seed(2)
    cfg = dense_rig.model.config
    q = torch.randn(batch.num_tokens, cfg.num_heads, cfg.head_dim, generator=g)
    args = (q, dense_rig.kv.k[0], dense_rig.kv.v[0], batch.block_tables, batch.seq_ids,
            batch.positions, 0.3)
    dense_rig.kv.k[0].view(-1, cfg.num_kv_heads, cfg.head_dim)[batch.slot_mapping] = 0.5
    dense_rig.kv.v[0].view(-1, cfg.num_kv_heads, cfg.head_dim)[batch.slot_mapping] = -0.5
    for window in (None, 4):
        out = dense_attention(*args, torch.full_like(q, math.nan), sliding_window=window)
        assert close(out, paged_attention_reference(*args, sliding_window=window))


# -- eager: any layout on simulated streams == sequential == the random-order CPU path -------------
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), shape=batch_shapes(), seed=st.integers(0, 2**16))
def test_streams_equal_sequential_and_the_cpu_race_detector(rig, layout, shape, seed):
    batch, = rig.batches([shape], seed)
    expected = rig.run(rig.sequential, batch)
    racing = rig.run(rig.executor(layout), batch, seed=seed)
    on_streams = rig.run(rig.executor(layout, streams=SimulatedStreams()), batch, seed=seed)
    assert close(racing, expected) and close(on_streams, expected)


# -- graphs: captured per padded size, replayed with new batches -----------------------------------
@pytest.fixture(scope="module")
def moe_dense_rig():
    return Rig(attention=dense_attention, preset="tiny-qwen2-moe")


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(model_layer_ops(get_preset("tiny-qwen2-moe"))),
       shapes=st.lists(batch_shapes(), min_size=2, max_size=2), seed=st.integers(0, 2**16))
def test_moe_graph_replays_equal_sequential_for_any_layout(moe_dense_rig, layout, shapes, seed):
    """A mixture of experts' ops read only the fixed buffers (the grouped expert GEMM's offsets
    are computed from them on the device), so a captured plan replayed with a new batch, in
    simulated stream interleavings, still gives the sequential logits."""
    rig = moe_dense_rig
    ex = rig.executor(layout, kernels=GRAPH_SAFE, streams=SimulatedStreams())
    batches = rig.batches(shapes + shapes, seed)
    expected = [rig.run(rig.sequential, b) for b in batches]
    for i, (b, want) in enumerate(zip(batches, expected)):
        assert close(rig.run(ex, b, seed=seed + i), want)
    assert ex.graphs_active


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), shapes=st.lists(batch_shapes(), min_size=2, max_size=2),
       seed=st.integers(0, 2**16))
def test_graph_replays_equal_sequential_for_any_layout(dense_rig, layout, shapes, seed):
    """The first batch of a size runs eagerly and is captured; later ones replay. Either way
    the one plan of the padded size must order every batch of that size correctly."""
    ex = dense_rig.executor(layout, kernels=GRAPH_SAFE, streams=SimulatedStreams())
    batches = dense_rig.batches(shapes + shapes, seed)
    expected = [dense_rig.run(dense_rig.sequential, b) for b in batches]
    for i, (b, want) in enumerate(zip(batches, expected)):
        assert close(dense_rig.run(ex, b, seed=seed + i), want)
    assert ex.graphs_active and len(ex.graphs.graphs) == len(
        {padded_size(b.num_tokens, ex.graphs.sizes) for b in batches})


def test_graphs_recapture_when_page_tables_grow(dense_rig):
    ex = dense_rig.executor("overlap", kernels=GRAPH_SAFE, streams=SimulatedStreams())
    short, long_ = dense_rig.batches([[(3, 1)] * 4, [(200, 1)] * 4], seed=5)
    for b in (short, short, long_, long_):
        assert close(dense_rig.run(ex, b, seed=1), dense_rig.run(dense_rig.sequential, b))
    assert ex.graphs.static.max_pages >= long_.block_tables.shape[1]


def test_a_failed_capture_falls_back_to_eager(dense_rig, caplog):
    class NoCapture(SimulatedStreams):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    ex = dense_rig.executor("overlap", kernels=GRAPH_SAFE, streams=NoCapture())
    b, = dense_rig.batches([[(4, 1), (0, 20)]], seed=6)
    want = dense_rig.run(dense_rig.sequential, b)
    with caplog.at_level(logging.WARNING, logger="nanorun"):
        assert close(dense_rig.run(ex, b), want)
    assert not ex.graphs_active and "not permitted" in caplog.text
    assert close(dense_rig.run(ex, b), want)


def test_graphs_only_with_graph_safe_kernels(dense_rig, caplog, monkeypatch):
    def executor(kernels, streams=SimulatedStreams):
        return dense_rig.executor("overlap", kernels=kernels, streams=streams and streams())

    with caplog.at_level(logging.WARNING, logger="nanorun"):
        assert executor((paged_attention, kv_append)).graphs is None
    assert "paged_attention, kv_append not marked graph_safe" in caplog.text
    assert executor(GRAPH_SAFE).graphs_active
    assert executor(GRAPH_SAFE, streams=None).graphs is None        # the CPU path
    monkeypatch.setenv("NANORUN_CUDA_GRAPHS", "0")
    assert executor(GRAPH_SAFE).graphs is None


def test_no_graphs_where_the_cuda_attention_falls_back(dense_rig, caplog):
    """The CUDA attention is graph-safe for fp16/bf16 only; on a float32 model it takes the
    nanorun.ops path, which syncs and raises (ValueError) under capture, so no graphs."""
    from nanorun.kernels import CudaKVAppend, CudaPagedAttention

    kernels = (CudaPagedAttention(torch.device("cpu")), CudaKVAppend())
    assert dense_rig.model.dtype == torch.float32
    with caplog.at_level(logging.WARNING, logger="nanorun"):
        ex = dense_rig.executor("overlap", kernels=kernels, streams=SimulatedStreams())
    assert ex.graphs is None
    assert "CudaPagedAttention cannot run torch.float32 with head dim 32" in caplog.text


# -- mutation check: every wait and record the backend issues is needed ----------------------------
class Dropping(SimulatedStreams):
    """Drops the k-th wait (or record) issued while capturing a graph; a dropped record gives
    an event nothing records, which CUDA treats as already complete."""

    def __init__(self, kind: str, k: int) -> None:
        super().__init__()
        self.kind, self.k, self.count, self.armed, self.dropped = kind, k, 0, False, None

    def capture(self, fn):
        self.armed, self.count = True, 0
        try:
            return super().capture(fn)
        finally:
            self.armed = False

    def wait(self, stream, event):
        if not self._drop("wait", stream):
            super().wait(stream, event)

    def record(self, stream):
        if self._drop("record", stream):
            return SimulatedEvent(done=True)
        return super().record(stream)

    def _drop(self, kind: str, stream: int) -> bool:
        if not self.armed or kind != self.kind:
            return False
        self.count += 1
        if self.count - 1 == self.k:
            self.dropped = f"{kind} #{self.k} on stream {stream}"
            return True
        return False


def test_dropping_any_wait_or_record_is_caught(dense_rig):
    """Graph mode covers the whole wiring: the fork after the batch is copied in on MAIN, the
    plan's waits, and the join before the logits. Two batches of one padded size alternate,
    so a launch that reads the fixed buffers too early sees the other batch."""
    a, b = dense_rig.batches([[(4, 1), (6, 1), (0, 22), (11, 1), (2, 12)],
                              [(0, 9), (3, 1), (30, 1), (0, 17), (7, 12)]], seed=3)
    assert padded_size(a.num_tokens, graph_sizes(BATCH)) == padded_size(b.num_tokens,
                                                                        graph_sizes(BATCH))
    expected = [(a, dense_rig.run(dense_rig.sequential, a)),
                (b, dense_rig.run(dense_rig.sequential, b))]
    counts = {}
    for kind in ("wait", "record"):
        probe = Dropping(kind, -1)
        dense_rig.run(dense_rig.executor("overlap", kernels=GRAPH_SAFE, streams=probe), a)
        counts[kind] = probe.count
    assert counts["wait"] >= 4 and counts["record"] >= 4, counts
    uncaught = []
    for kind, n in counts.items():
        for k in range(n):
            streams = Dropping(kind, k)
            ex = dense_rig.executor("overlap", kernels=GRAPH_SAFE, streams=streams)
            dense_rig.run(ex, b)                             # eager, then the mutant capture
            if all(close(dense_rig.run(ex, batch, seed=s), want)
                   for s in range(12) for batch, want in expected):
                uncaught.append(streams.dropped)
    assert not uncaught, f"dropping these went unnoticed: {uncaught}"


# -- the issue program: one enqueue per run of a stream between events -------------------------
class Counting(SimulatedStreams):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def enqueue(self, stream, fn):
        self.calls.append(("enqueue", stream))
        super().enqueue(stream, fn)

    def record(self, stream):
        self.calls.append(("record", stream))
        return super().record(stream)

    def wait(self, stream, event):
        self.calls.append(("wait", stream))
        super().wait(stream, event)


def test_issue_enqueues_each_run_of_a_stream_once(rig):
    """A stream's launches between two of its events go in one enqueue: "sequential" is the
    fork, one enqueue, the join and the logits; under "overlap" no two enqueues in a row share
    a stream (a run ends only where a wait or a record has to come between)."""
    batch, = rig.batches([[(4, 1), (0, 30), (9, 1)]], seed=2)
    for layout in ("sequential", "overlap"):
        streams = Counting()
        ex = rig.executor(layout, streams=streams)
        assert close(rig.run(ex, batch, seed=1), rig.run(rig.sequential, batch))
        plan = ex.planner.plan(batch)
        if layout == "sequential":
            assert streams.calls == [("record", -1), ("wait", 0), ("enqueue", 0),
                                     ("record", 0), ("wait", -1), ("enqueue", -1)]
            continue
        enqueues = [c for c in streams.calls if c[0] == "enqueue" and c[1] >= 0]
        assert len(enqueues) < len(plan.launches) - 1
        for a, b in zip(streams.calls, streams.calls[1:]):
            assert not (a[0] == b[0] == "enqueue" and a[1] == b[1]), streams.calls
        program = plan.derived["issue"]
        assert sum(len(run[2]) for run in program.runs) == len(plan.launches) - 1


# -- the padding rule and the fixed buffers --------------------------------------------------------
def test_graph_sizes_and_padding_rule():
    assert graph_sizes(1024) == (8, 16, 32, 64, 128, 256, 384, 512, 640, 768, 896, 1024)
    assert graph_sizes(48) == (6, 12, 18, 24, 30, 36, 42, 48)
    assert graph_sizes(100) == (8, 13, 26, 39, 52, 65, 78, 91, 100)
    sizes = graph_sizes(1024)
    assert [padded_size(n, sizes) for n in (1, 8, 9, 129, 1000, 1024)] == [8, 8, 16, 256, 1024,
                                                                          1024]
    with pytest.raises(ValueError, match="larger than the dense batch"):
        padded_size(1025, sizes)


def test_static_batch_pads_with_a_sequence_that_writes_no_kv(rig):
    batch, = rig.batches([[(9, 1), (0, 3)]], seed=0)
    static = StaticBatch(16, 8, "cpu")
    static.load(batch, 8)
    view = static.view(8)
    assert view.token_ids[:4].tolist() == batch.token_ids.tolist()
    assert view.token_ids[4:].tolist() == [0] * 4 and view.positions[4:].tolist() == [0] * 4
    assert view.seq_ids.tolist() == [0, 1, 1, 1] + [16] * 4
    assert view.slot_mapping[4:].tolist() == [-1] * 4
    pages = batch.block_tables.shape[1]
    assert torch.equal(view.block_tables[:2, :pages], batch.block_tables)
    assert (view.block_tables[:2, pages:] == -1).all()
    assert view.block_tables[16].tolist() == [0] + [-1] * 7
    assert view.seq_starts == (0, 8) and view.token_ids.data_ptr() == static.token_ids.data_ptr()
    with pytest.raises(ValueError, match="does not fit"):
        static.load(batch, 3)
