"""The CUDA backend: green-context partitions, SM budgets, events and graphs.

CPU: the green-context code against a stand-in for cuda.bindings.driver that keeps its calling
conventions and the documented splitting rules; the clear errors without CUDA.
GPU (marked gpu; run `python -m pytest -m gpu tests/test_cuda_backend.py -v -s`): granted SM
counts, disjoint SMs per partition (eager and replayed), ops on two partitions overlapping in
time, overlap == sequential, graph replay == eager. Each prints what it measured, prefixed
"[nanorun gpu]", so the session's log records the facts.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import random_prompts
from executor_rig import BATCH, GRAPH_SAFE, Rig, close, dense_attention
from tokens import assert_same_tokens

from nanorun import Engine, SamplingParams
from nanorun.backends import MAIN, CudaStreams, current_sm_budget
from nanorun.backends.partitions import GreenContextError, assign_groups, green_contexts
from nanorun.device import device_spec
from nanorun.executor import _network_partitions
from nanorun.layout import Layout, OpLayout, Partition, overlap
from nanorun.models import LAYER_OPS, OpSpec
from nanorun.search import get_device

OPS = tuple(op.name for op in LAYER_OPS)
gpu = pytest.mark.gpu


# -- green contexts against a stand-in driver ------------------------------------------------------
class FakeDriver:
    """cuda.bindings.driver's conventions ((CUresult, outputs...) tuples, enum namespaces) over a
    pretend device whose SMs are numbered, split as the driver documents: disjoint groups of
    whole `step`s; a split's outputs split again only through a green context made of them; one
    descriptor combines several outputs of one split (unless combine=False)."""

    CUdevResourceType = SimpleNamespace(CU_DEV_RESOURCE_TYPE_SM=1)
    CUgreenCtxCreate_flags = SimpleNamespace(CU_GREEN_CTX_DEFAULT_STREAM=1)
    CUstream_flags = SimpleNamespace(CU_STREAM_NON_BLOCKING=1)
    INVALID = 915

    def __init__(self, sms: int = 132, step: int = 8, combine: bool = True,
                 fail: str | None = None) -> None:
        self.sms, self.step, self.combine, self.fail = sms, step, combine, fail
        self.splits = 0
        self.streams: list[int] = []

    def _resource(self, ids, split=None):
        sm = SimpleNamespace(smCount=len(ids), minSmPartitionSize=self.step,
                             smCoscheduledAlignment=self.step)
        return SimpleNamespace(sm=sm, ids=tuple(ids), split=split)

    def cuGetErrorName(self, err):
        return 0, {self.INVALID: b"CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION"}[err]

    def cuInit(self, flags):
        return (0,)

    def cuDeviceGet(self, ordinal):
        return 0, ordinal

    def cuDeviceGetDevResource(self, dev, kind):
        return 0, self._resource(range(self.sms))

    def cuDevSmResourceSplitByCount(self, groups, resource, flags, min_count):
        if resource.split is not None:
            return self.INVALID, None, 0, None
        self.splits += 1
        size = -(-min_count // self.step) * self.step
        count = min(groups, len(resource.ids) // size)
        out = [self._resource(resource.ids[i * size:(i + 1) * size], self.splits)
               for i in range(count)]
        rest = self._resource(resource.ids[count * size:], self.splits)
        return 0, out + [self._resource(())] * (groups - count), count, rest

    def cuDevResourceGenerateDesc(self, resources, count):
        if count > 1 and (not self.combine or len({r.split for r in resources}) > 1):
            return self.INVALID, None
        return 0, SimpleNamespace(ids=sum((r.ids for r in resources[:count]), ()))

    def cuGreenCtxCreate(self, desc, dev, flags):
        if self.fail == "cuGreenCtxCreate":
            return self.INVALID, None
        return 0, SimpleNamespace(ids=desc.ids)

    def cuGreenCtxStreamCreate(self, ctx, flags, priority):
        self.streams.append(1000 + len(self.streams))
        return 0, self.streams[-1]

    def cuGreenCtxGetDevResource(self, ctx, kind):
        return 0, self._resource(ctx.ids)


def _disjoint(contexts) -> bool:
    ids = [i for g in contexts.values() for i in g.context.ids]
    return len(ids) == len(set(ids))


def test_green_contexts_take_disjoint_runs_of_one_split():
    driver = FakeDriver()
    got = green_contexts(driver, 0, {"gemm": 96, "attn": 32})
    assert {name: g.granted for name, g in got.items()} == {"gemm": 96, "attn": 32}
    assert _disjoint(got) and driver.splits == 1
    assert sorted(g.handle for g in got.values()) == driver.streams


def test_green_contexts_carve_partitions_when_groups_cannot_combine():
    driver = FakeDriver(combine=False)
    got = green_contexts(driver, 0, {"gemm": 96, "attn": 32})
    assert {name: g.granted for name, g in got.items()} == {"gemm": 96, "attn": 32}
    assert _disjoint(got) and driver.splits == 3      # the one that failed, then one each


def test_shares_round_up_to_whole_groups():
    assert assign_groups({"a": 20, "b": 8}, 8, 16) == {"a": range(0, 3), "b": range(3, 4)}
    got = green_contexts(FakeDriver(), 0, {"a": 20})
    assert got["a"].granted == 24


def test_green_context_failures_say_why():
    with pytest.raises(GreenContextError, match=r"asks for 20 groups of 8 SMs .* splits into 16"):
        green_contexts(FakeDriver(), 0, {"gemm": 96, "attn": 64})
    with pytest.raises(GreenContextError, match="cuGreenCtxCreate failed with "
                                                "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION"):
        green_contexts(FakeDriver(fail="cuGreenCtxCreate"), 0, {"gemm": 96})


def test_collective_only_partitions_keep_ordinary_streams():
    ops = LAYER_OPS + (OpSpec("all_reduce", "network", ("hidden",), ("hidden",)),)
    model = SimpleNamespace(layer_ops=ops)
    whole = OpLayout((BATCH,), "gemm")
    layout = Layout("tp", BATCH, (Partition("gemm", 96), Partition("net", 8)),
                    tuple((op.name, whole) for op in LAYER_OPS)
                    + (("all_reduce", OpLayout((BATCH,), "net")),))
    assert _network_partitions(model, layout) == {"net"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_the_cuda_backend_without_cuda_says_what_to_do():
    with pytest.raises(RuntimeError, match="use device='cpu'"):
        CudaStreams(overlap(OPS, BATCH, get_device("h100")), "cuda")


# -- on a GPU --------------------------------------------------------------------------------------
def _say(*parts) -> None:
    print("[nanorun gpu]", *parts, flush=True)


@pytest.fixture(scope="module")
def gpu_spec():
    spec = device_spec(torch.device("cuda"))
    props = torch.cuda.get_device_properties(0)
    _say(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
         f"CUDA {torch.version.cuda}, spec {spec.name}")
    return spec


@pytest.fixture(scope="module")
def gpu_rig(gpu_spec):
    return Rig(device="cuda", spec=gpu_spec)


@pytest.fixture(scope="module")
def overlap_streams(gpu_rig) -> CudaStreams:
    streams = gpu_rig.executor("overlap").streams
    _say(f"overlap partitions: {streams.summary}")
    if not streams.green:
        pytest.fail(f"no green contexts on this GPU: {streams.how}")
    return streams


@gpu
def test_granted_sm_counts_per_partition(overlap_streams):
    streams = overlap_streams
    asked = {p.name: p.requested for p in streams.partitions}
    assert sum(streams.granted.values()) <= streams.device_sms
    assert streams.granted == asked, f"asked {asked}, granted {streams.granted}"
    seen = {}
    for i, p in enumerate(streams.partitions):
        streams.enqueue(i, lambda name=p.name: seen.setdefault(name, current_sm_budget()))
    streams.enqueue(MAIN, lambda: seen.setdefault("main", current_sm_budget()))
    assert seen == {**streams.granted, "main": None}


_SMID = r"""
extern "C" __global__ void record_smid(int* out) {
    unsigned int sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    long long start = clock64();
    while (clock64() - start < 200000) { }   // stay resident so the grid spreads out
    if (threadIdx.x == 0) out[blockIdx.x] = (int)sm;
}
"""


@gpu
def test_partitions_run_on_disjoint_sms_eagerly_and_in_a_replayed_graph(overlap_streams):
    cp = pytest.importorskip("cupy")
    streams = overlap_streams
    kernel = cp.RawKernel(_SMID, "record_smid")
    blocks = 4 * streams.device_sms
    outs = [torch.full((blocks,), -1, dtype=torch.int32, device=streams.device)
            for _ in streams.partitions]
    views = [cp.asarray(out) for out in outs]

    def launch_all() -> None:
        fork = streams.record(MAIN)
        for i, view in enumerate(views):
            streams.wait(i, fork)
            with cp.cuda.ExternalStream(streams.stream(i).cuda_stream):
                kernel((blocks,), (128,), (view,))
            streams.wait(MAIN, streams.record(i))

    def used() -> dict[str, set[int]]:
        torch.cuda.synchronize()
        sms = {p.name: set(out.tolist()) for p, out in zip(streams.partitions, outs)}
        for out in outs:
            out.fill_(-1)
        return sms

    launch_all()
    eager = used()
    graph = streams.capture(launch_all)
    streams.replay(graph)
    replayed = used()
    for how, sms in (("eager", eager), ("replayed graph", replayed)):
        _say(f"SMs used per partition, {how}: "
             f"{ {name: len(s) for name, s in sms.items()} } (granted {streams.granted})")
        for name, s in sms.items():
            assert -1 not in s and 0 < len(s) <= streams.granted[name], (how, name, sorted(s))
        a, b = sms.values()
        assert not a & b, f"{how}: partitions share SMs {sorted(a & b)}"


@gpu
def test_ops_on_two_partitions_overlap_in_time(overlap_streams):
    streams = overlap_streams
    names = [p.name for p in streams.partitions]
    gemm, attn = names.index("gemm"), names.index("attn")
    a = torch.randn(8192, 8192, device=streams.device, dtype=torch.bfloat16)
    c = torch.empty_like(a)
    src = torch.randn(1 << 28, device=streams.device)
    dst = torch.empty_like(src)
    work = {gemm: lambda: [torch.mm(a, a, out=c) for _ in range(10)],
            attn: lambda: [torch.add(src, 1.0, out=dst) for _ in range(20)]}
    for i, fn in work.items():      # warm up (cuBLAS handles, workspaces)
        streams.enqueue(i, fn)
    torch.cuda.synchronize()

    start = torch.cuda.Event(enable_timing=True)
    start.record(streams.stream(MAIN))
    marks = {}
    for i, fn in work.items():
        streams.wait(i, start)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(streams.stream(i))
        streams.enqueue(i, fn)
        end.record(streams.stream(i))
        streams.wait(MAIN, end)
        marks[names[i]] = (begin, end)
    torch.cuda.synchronize()
    spans = {name: (start.elapsed_time(b), start.elapsed_time(e))
             for name, (b, e) in marks.items()}
    shared = min(e for _, e in spans.values()) - max(b for b, _ in spans.values())
    _say("busy intervals (ms from the fork): " + ", ".join(
        f"{name} [{b:.2f}, {e:.2f}]" for name, (b, e) in spans.items())
        + f"; both busy for {max(shared, 0):.2f} ms")
    shortest = min(e - b for b, e in spans.values())
    assert shared > 0.5 * shortest, spans


@gpu
def test_overlap_equals_sequential_on_gpu(gpu_rig):
    ex = gpu_rig.executor("overlap", graphs=False)
    batches = gpu_rig.batches([[(4, 1), (6, 1), (0, 22), (11, 1), (2, 12)],
                               [(30, 1)] * 12 + [(0, 30)]], seed=0)
    for b in batches:
        want = gpu_rig.run(gpu_rig.sequential, b)
        for _ in range(3):
            got = gpu_rig.run(ex, b)
            assert close(got, want, tol=1e-4), (got - want).abs().max()


@gpu
@pytest.mark.parametrize("green", [True, False], ids=["green-contexts", "plain-streams"])
def test_graph_replay_equals_eager_on_gpu(gpu_spec, green, monkeypatch):
    """Both ways, so a failure tells capture on green-context streams from capture at all."""
    if not green:
        monkeypatch.setenv("NANORUN_GREEN_CONTEXTS", "0")
    rig = Rig(attention=dense_attention, device="cuda", spec=gpu_spec)
    graphed = rig.executor("overlap", kernels=GRAPH_SAFE)
    eager = rig.executor("overlap", kernels=GRAPH_SAFE, graphs=False)
    assert graphed.streams.green == green, graphed.streams.how
    batches = rig.batches([[(4, 1), (6, 1), (0, 22), (11, 1), (2, 12)],
                           [(0, 9), (3, 1), (30, 1), (0, 17), (7, 12)],
                           [(17, 1)] * 5], seed=1)
    first_round = []
    for round_ in range(2):     # a size's first batch runs eagerly and is captured; then replays
        for k, b in enumerate(batches):
            want = rig.run(eager, b)
            got = rig.run(graphed, b)
            assert graphed.graphs_active, graphed.graphs.failure
            assert close(got, want, tol=1e-4), (got - want).abs().max()
            if round_ == 0:
                first_round.append(got)
                continue
            _say(f"batch {k} ({b.num_tokens} tokens): replay vs eager max |diff| "
                 f"{(got - want).abs().max().item():.2e}; bit-identical to its first run: "
                 f"{torch.equal(got, first_round[k])}")
            assert close(got, first_round[k], tol=1e-6)
    _say(f"graphs on {graphed.streams.how}: captured for sizes {sorted(graphed.graphs.graphs)}")


@gpu
def test_engine_overlap_equals_sequential_on_gpu():
    kw = dict(device="cuda", dtype="float32", max_batch_tokens=64, kv_cache_tokens=8192)
    engines = {layout: Engine("tiny-llama", layout=layout, **kw)
               for layout in ("sequential", "overlap")}
    ex = engines["overlap"].executor
    _say(f"engine overlap: partitions {ex.partition_sms}, graphs "
         f"{'on' if ex.graphs_active else 'off'}")
    prompts = random_prompts(2048, [40, 7, 90], seed=3)
    logits = {k: e.prompt_logits(prompts[2]) for k, e in engines.items()}
    assert close(logits["overlap"], logits["sequential"], tol=1e-4)
    tokens, params = {}, SamplingParams(max_tokens=8, temperature=0)
    for layout, engine in engines.items():
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        tokens[layout] = done
    # overlap's nano-batches cut the GEMMs otherwise: up to a near-tie (tests/tokens.py)
    reference = engines["sequential"]
    for i, p in enumerate(prompts):
        assert_same_tokens(tokens["overlap"][str(i)], tokens["sequential"][str(i)], prompt=p,
                           params=params, eos_token_ids=reference.eos_token_ids,
                           logits_of=reference.prompt_logits, what=f"prompt {i}")

