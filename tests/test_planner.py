"""Layout -> plan -> run on CPU: nano-batched runs equal the sequential run, under random
dependency-respecting execution orders; every wait of the overlap plan is needed."""

from __future__ import annotations

import random

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from executor_rig import workspace_buffers
from hypothesis import strategies as st

from nanorun.batch import build_batch
from nanorun.executor import Executor
from nanorun.kv_cache import KVCache
from nanorun.layout import Layout, LayoutError, OpLayout, Partition, overlap, sequential
from nanorun.models import LAYER_OPS, build_model, get_preset, random_weights
from nanorun.ops import kv_append, paged_attention
from nanorun.planner import Plan, Planner
from nanorun.request import Request
from nanorun.sampling_params import SamplingParams
from nanorun.scheduler import ScheduledChunk
from nanorun.search import get_device

OPS = tuple(op.name for op in LAYER_OPS)
BATCH = 48
PAGE = 8
CPU = get_device("cpu")
H100 = get_device("h100")


class Rig:
    """A 2-layer tiny model, its KV cache, and executors for any layout."""

    def __init__(self, preset: str = "tiny-llama") -> None:
        cfg = dataclasses.replace(get_preset(preset), num_layers=2)
        weights = random_weights(cfg, dtype=torch.float32, device="cpu", seed=0)
        self.model = build_model(cfg, weights, max_model_len=512, attention_fn=paged_attention,
                                 kv_append_fn=kv_append)
        self.kv = KVCache(num_layers=2, num_pages=256, page_size=PAGE, num_kv_heads=cfg.num_kv_heads,
                          head_dim=cfg.head_dim, dtype=torch.float32, device=torch.device("cpu"))
        self.sequential = self.executor("sequential")

    def executor(self, layout) -> Executor:
        return Executor(self.model, self.kv, BATCH, layout, CPU)

    def batch(self, shape: list[tuple[int, int]], seed: int):
        """shape: (context already cached, tokens this iteration) per sequence."""
        g = torch.Generator().manual_seed(seed)
        self.kv.allocator.reset()
        chunks, warm = [], []
        for ctx, n in shape:
            r = Request(str(len(chunks)), torch.randint(0, 2048, (ctx + n,), generator=g).tolist(),
                        SamplingParams(), 0.0, ())
            self.kv.grow(r, ctx + n)
            chunks.append(ScheduledChunk(r, ctx, n))
            if ctx:
                warm.append(ScheduledChunk(r, 0, ctx))
        for c in warm:   # fill the earlier context, one sequence at a time
            self.sequential.run(build_batch([c], PAGE, torch.device("cpu")))
        return build_batch(chunks, PAGE, torch.device("cpu"), logits_for_all=True)

    def run(self, executor: Executor, batch, plan: Plan | None = None, order_seed=None):
        """Logits of every token, with the workspace and this batch's KV slots poisoned first,
        so a launch that runs before what it needs reads NaN."""
        for buf in workspace_buffers(executor.ws):
            buf.fill_(float("nan"))
        slots = batch.slot_mapping
        for cache in (self.kv.k, self.kv.v):
            cache.view(cache.shape[0], -1, *cache.shape[3:])[:, slots] = float("nan")
        plan = plan or executor.planner.plan(batch)
        return executor.run_plan(plan, batch, order_seed)


@pytest.fixture(scope="module")
def rig():
    return Rig()


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


# -- the property: any valid layout, any batch, any legal order == sequential ----------------------
@st.composite
def layouts(draw, specs=LAYER_OPS):
    """Random valid layouts of the layer `specs` (a model's layer_ops)."""
    names = tuple(op.name for op in specs)
    n_parts = draw(st.integers(1, 3))
    parts = tuple(Partition(f"p{i}") for i in range(n_parts))
    ops = []
    for op in names:
        k = draw(st.integers(1, 3))
        cuts = sorted(draw(st.lists(st.integers(1, BATCH - 1), min_size=k - 1, max_size=k - 1,
                                    unique=True)))
        edges = [0, *cuts, BATCH]
        splits = tuple(b - a for a, b in zip(edges, edges[1:]))
        ops.append((op, OpLayout(splits, f"p{draw(st.integers(0, n_parts - 1))}")))
    op_major = Layout("random", BATCH, parts, tuple(ops))
    layout = dataclasses.replace(op_major, order=_random_order(op_major, draw(st.randoms()),
                                                               names))
    if draw(st.booleans()):
        layout = _shifted(layout, draw(st.randoms()), specs)
    return layout


def _shifted(layout: Layout, rng, specs=LAYER_OPS) -> Layout:
    """Pipeline a random tail of the order into the next layer's slot, then move entries around
    at random while the planner and Layout.validate still accept the order."""
    order = list(layout.issue_order())
    k = rng.randrange(1, len(order))
    slots = [(op, i, 1) for op, i in order[k:]] + order[:k]   # the same launches, same sequence
    for _ in range(30):
        trial_slots = list(slots)
        entry = trial_slots.pop(rng.randrange(len(trial_slots)))
        trial_slots.insert(rng.randrange(len(trial_slots) + 1), entry)
        trial = dataclasses.replace(layout, order=tuple(trial_slots))
        try:
            trial._validate_order(tuple(op.name for op in specs))
            Planner(specs, 2, trial)
        except LayoutError:
            continue
        slots = trial_slots
    return dataclasses.replace(layout, order=tuple(slots))


def _random_order(layout: Layout, rng, names=OPS) -> tuple[tuple[str, int], ...]:
    """A random issue order of one layer's (op, nano-batch) launches that keeps every launch
    after the ones it needs (what Layout.validate accepts)."""
    pending, order = list(layout.issue_order()), []
    while pending:
        for key in rng.sample(pending, len(pending)):
            trial = dataclasses.replace(layout, order=tuple(order + [key] + [
                k for k in pending if k != key]))
            try:
                trial._validate_order(names)
            except LayoutError:
                continue
            order.append(key)
            pending.remove(key)
            break
    return tuple(order)


@st.composite
def batch_shapes(draw):
    """Decode tokens (context > 0, 1 token) and prompt chunks, at most BATCH tokens in all."""
    shape, total = [], 0
    for _ in range(draw(st.integers(1, 8))):
        n = draw(st.sampled_from([1, 1, 1, 2, 5, 13]))
        if total + n > BATCH:
            break
        shape.append((draw(st.integers(0, 40)), n))
        total += n
    return shape


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), shape=batch_shapes(), seed=st.integers(0, 2**16))
def test_any_layout_equals_sequential(rig, layout, shape, seed):
    batch = rig.batch(shape, seed)
    expected = rig.run(rig.sequential, batch)
    got = rig.run(rig.executor(layout), batch, order_seed=seed)
    assert _close(got, expected)


def test_overlap_equals_sequential_on_mixed_batches(rig):
    ex = rig.executor("overlap")
    for seed, shape in enumerate([[(0, 30), (7, 1), (20, 17)], [(9, 1)] * 12 + [(0, 36)],
                                  [(0, 48)], [(3, 1)]]):
        batch = rig.batch(shape, seed)
        expected = rig.run(rig.sequential, batch)
        for order_seed in range(4):
            assert _close(rig.run(ex, batch, order_seed=order_seed), expected)


def test_attention_waits_for_kv_appended_by_another_nano_batch(rig):
    """Attention of nano-batch 1 needs the KV that nano-batch 0 appended for the same prompt;
    with the appends issued in reverse and attention on its own stream, only the planner's
    sequence-aware dependency orders them."""
    halves = (BATCH // 2, BATCH // 2)
    ops = tuple((op, OpLayout(halves, "attn" if op == "attention" else "main")) for op in OPS)
    layout = Layout("reverse", BATCH, (Partition("main"), Partition("attn")), ops)
    order = [k for k in layout.issue_order() if k[0] not in ("kv_append", "attention")]
    at = order.index(("o_proj", 0))
    order[at:at] = [("kv_append", 1), ("kv_append", 0), ("attention", 1), ("attention", 0)]
    layout = dataclasses.replace(layout, order=tuple(order))
    ex = rig.executor(layout)
    batch = rig.batch([(0, 40), (5, 1)], seed=4)     # the prompt straddles token 24
    expected = rig.run(rig.sequential, batch)
    for order_seed in range(10):
        assert _close(rig.run(ex, batch, order_seed=order_seed), expected)


# The same property on a mixture of experts (router, top-k, grouped experts, the shared expert,
# combine): its expert GEMM sorts each nano-batch's own rows, so any split of any op must agree.
MOE_PRESET = "tiny-qwen2-moe"


@pytest.fixture(scope="module")
def moe_rig():
    return Rig(MOE_PRESET)


def _moe_specs():
    from nanorun.models import model_layer_ops

    return model_layer_ops(get_preset(MOE_PRESET), 1)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(_moe_specs()), shape=batch_shapes(), seed=st.integers(0, 2**16))
def test_any_layout_equals_sequential_for_a_mixture_of_experts(moe_rig, layout, shape, seed):
    batch = moe_rig.batch(shape, seed)
    expected = moe_rig.run(moe_rig.sequential, batch)
    got = moe_rig.run(moe_rig.executor(layout), batch, order_seed=seed)
    assert _close(got, expected)


# -- mutation check: every wait of the overlap plan is caught when dropped ------------------------
@pytest.mark.parametrize("rig_name", ["rig", "moe_rig"])
def test_dropping_any_wait_of_overlap_is_caught(rig_name, request):
    rig = request.getfixturevalue(rig_name)
    ex = rig.executor("overlap")
    # A prompt chunk straddles the nano-batch boundary, so attention needs the other's KV.
    batch = rig.batch([(4, 1), (6, 1), (0, 30), (11, 1), (2, 15)], seed=3)
    expected = rig.run(rig.sequential, batch)
    plan = ex.planner.plan(batch)
    waits = [(i, w) for i, launch in enumerate(plan.launches) for w in launch.waits]
    assert waits, "the overlap plan has no cross-stream waits"
    uncaught = []
    for i, w in waits:
        mutant = _drop_wait(plan, i, w)
        if all(_close(rig.run(ex, batch, mutant, order_seed=s), expected) for s in range(40)):
            uncaught.append((plan.launches[i], plan.launches[w]))
    assert not uncaught, f"dropping these waits went unnoticed: {uncaught}"


def _drop_wait(plan: Plan, i: int, w: int) -> Plan:
    launches = list(plan.launches)
    launch = launches[i]
    launches[i] = dataclasses.replace(launch, waits=tuple(x for x in launch.waits if x != w))
    return Plan(tuple(launches), plan.num_streams)


# -- planning -------------------------------------------------------------------------------------
def test_sequential_is_one_stream_without_waits(rig):
    plan = rig.sequential.planner.plan(rig.batch([(0, 20), (5, 1)], seed=0))
    assert plan.num_streams == 1 and not plan.recorded
    assert len(plan.launches) == 2 + 2 * len(OPS)


def test_plans_are_cached_per_batch_shape(rig):
    ex = rig.executor("overlap")
    a = ex.planner.plan(rig.batch([(3, 1)] * 10, seed=1))
    b = ex.planner.plan(rig.batch([(9, 1)] * 10, seed=2))
    assert a is b


# -- invalid layouts are rejected with what to change -------------------------------------------
def _layout(**changes) -> Layout:
    base = sequential(OPS, BATCH).to_dict()
    base.update(changes)
    return Layout.from_dict(base)


@pytest.mark.parametrize("make, device, match", [
    (lambda: _layout(ops={**sequential(OPS, BATCH).to_dict()["ops"],
                          "qkv": {"splits": [20, 20], "partition": "device"}}), CPU, "summing"),
    (lambda: _layout(ops={op: {"splits": [BATCH], "partition": "device"} for op in OPS[:-1]}),
     CPU, "missing \\['down'\\]"),
    (lambda: _layout(ops={**sequential(OPS, BATCH).to_dict()["ops"],
                          "softmax": {"splits": [BATCH], "partition": "device"}}), CPU, "unknown"),
    (lambda: _layout(partitions=[{"name": "device", "sm_count": 136}]), H100, "has 132"),
    (lambda: _layout(partitions=[{"name": "device", "sm_count": 60}]), H100, "granularity of 8"),
    (lambda: _layout(ops={**sequential(OPS, BATCH).to_dict()["ops"],
                          "qkv": {"splits": [BATCH], "partition": "gpu"}}), CPU, "not one of"),
    (lambda: _layout(order=[[op, 0] for op in reversed(OPS)]), CPU, "dependency cycle"),
    (lambda: _layout(version=7), CPU, "version 7"),
    (lambda: Layout.from_dict({"name": "x"}), CPU, "malformed"),
])
def test_invalid_layouts_are_rejected(make, device, match):
    with pytest.raises(LayoutError, match=match):
        make().validate(OPS, device)


def test_layout_json_round_trip(tmp_path):
    layout = overlap(OPS, 1024, H100)
    layout.validate(OPS, H100)
    assert [p.sm_count for p in layout.partitions] == [96, 32]
    layout.save(tmp_path / "l.json")
    assert Layout.load(tmp_path / "l.json") == layout


def test_write_after_read_across_streams_waits():
    """A writer on another stream waits for the last reader of the rows it overwrites, even
    when no data flows from the reader to the writer."""
    from nanorun.models import OpSpec
    from nanorun.planner import Planner

    specs = (OpSpec("a", "memory", (), ("buf",)), OpSpec("b", "memory", ("buf",), ("out",)),
             OpSpec("c", "memory", (), ("buf",)))
    layout = Layout("war", 8, (Partition("p0"), Partition("p1")), (
        ("a", OpLayout((8,), "p0")), ("b", OpLayout((8,), "p0")), ("c", OpLayout((8,), "p1"))))

    class FakeBatch:
        num_tokens, seq_starts = 8, (0, 8)

    launches = Planner(specs, 1, layout).plan(FakeBatch()).launches
    ops = [launch.op for launch in launches]
    c, b = ops.index("c"), ops.index("b")
    assert b in launches[c].waits


def test_shift_that_reorders_dependent_launches_is_rejected():
    """Shifting down (which writes the residual) into the next layer's slot while that layer's
    attn_norm (which reads it) stays first would read a stale residual."""
    order = [(op, 0) for op in OPS if op != "down"] + [("down", 0, 1)]
    layout = Layout("bad-shift", BATCH, (Partition("device"),),
                    tuple((op, OpLayout((BATCH,), "device")) for op in OPS), tuple(order))
    with pytest.raises(LayoutError, match="shifts \\('down', 0\\)"):
        Planner(LAYER_OPS, 2, layout)


def test_shifted_pipeline_equals_sequential(rig):
    """The cross-layer pipeline the search builds: the second nano-batch's MLP lags a layer
    slot, so it can run beside the first nano-batch's attention of the next layer."""
    layout = overlap(OPS, BATCH, CPU)
    mlp = ("o_proj", "mlp_norm", "gate_up", "act", "down")
    order = [k for k in layout.issue_order() if not (k[0] in mlp and k[1] == 1)]
    order = [(op, 1, 1) for op in mlp] + order
    layout = dataclasses.replace(layout, name="pipelined", order=tuple(order))
    ex = rig.executor(layout)
    assert {launch.layer for launch in ex.planner.plan(rig.batch([(8, 1), (0, 20)], 3)).launches
            if launch.op == "down"} == {0, 1}
    batch = rig.batch([(8, 1), (3, 1), (0, 20), (5, 13)], seed=5)
    expected = rig.run(rig.sequential, batch)
    for order_seed in range(6):
        assert _close(rig.run(ex, batch, order_seed=order_seed), expected)


# -- tensor parallelism: the all-reduces are ordinary ops on their own stream ---------------------
def test_tensor_parallel_overlap_runs_allreduces_on_net_beside_the_other_nano_batch():
    """With the tp > 1 op list, "overlap" puts both all-reduces on the "net" partition, and the
    all-reduce of nano-batch 0 is ordered neither before nor after the row-parallel GEMM of
    nano-batch 1 that feeds the next all-reduce: nothing forces them to run one after the other."""
    from nanorun.layout import NETWORK_OPS
    from nanorun.models import TP_LAYER_OPS
    from nanorun.planner import Planner

    ops = tuple(op.name for op in TP_LAYER_OPS)
    layout = overlap(ops, BATCH, H100)
    layout.validate(ops, H100)
    assert [(p.name, p.sm_count) for p in layout.partitions] == [
        ("gemm", 88), ("attn", 32), ("net", 8)]

    class FakeBatch:
        num_tokens, seq_starts = BATCH, (0, 3, 4, 30, BATCH)

    plan = Planner(TP_LAYER_OPS, 2, layout).plan(FakeBatch())
    net = layout.partition_index("net")
    assert all((launch.stream == net) == (launch.op in NETWORK_OPS)
               for launch in plan.launches if launch.layer >= 0)
    at = {(launch.op, launch.layer, launch.nano_batch): i for i, launch in enumerate(plan.launches)}
    before = _happens_before(plan)
    for layer in range(2):
        for allreduce, gemm in (("attn_allreduce", "o_proj"), ("mlp_allreduce", "down")):
            a, g = at[(allreduce, layer, 0)], at[(gemm, layer, 1)]
            assert not before[a] >> g & 1 and not before[g] >> a & 1, (allreduce, layer)
            assert before[at[(allreduce, layer, 1)]] >> g & 1     # the one it feeds waits
    # The LM head is a GEMM: it runs on the GEMM partition, not on the 8 SMs of "net" where
    # the layer's last op (an all-reduce) ran.
    logits = plan.launches[-1]
    assert logits.op == "logits" and logits.stream == layout.partition_index("gemm")


def _happens_before(plan: Plan) -> list[int]:
    """Per launch, a bit set of the launches that must finish before it starts: earlier launches
    on its stream, the launches it waits for, and (transitively) theirs."""
    before: list[int] = []
    last_on: dict[int, int] = {}
    for i, launch in enumerate(plan.launches):
        preds = [*launch.waits] + ([last_on[launch.stream]] if launch.stream in last_on else [])
        bits = 0
        for p in preds:
            bits |= before[p] | 1 << p
        before.append(bits)
        last_on[launch.stream] = i
    return before


def test_spread_order_gives_every_nano_batch_its_share_of_decode_tokens():
    """Decode tokens first would put them all in the first nano-batches; spread, every even
    split of the batch gets decode tokens in proportion (within one sequence's worth)."""
    from nanorun.batch import spread_order

    rng = random.Random(3)
    for _ in range(50):
        is_decode = [rng.random() < 0.6 for _ in range(rng.randint(1, 40))]
        lengths = [1 if d else rng.randint(1, 300) for d in is_decode]
        order = spread_order(is_decode, lengths)
        assert sorted(order) == list(range(len(is_decode)))
        kinds = [i for i in order if is_decode[i]], [i for i in order if not is_decode[i]]
        assert all(k == sorted(k) for k in kinds)          # each kind keeps its order
        tokens = [is_decode[i] for i in order for _ in range(lengths[i])]
        total, decode = len(tokens), sum(tokens)
        for k in (2, 3, 4):
            for j in range(1, k):
                cut = total * j // k
                expected = decode * j / k
                biggest = max(lengths)
                assert abs(sum(tokens[:cut]) - expected) <= 1 + decode * biggest / total


class _Starts:
    """What the planner reads of a batch: its token count and where its sequences start."""

    def __init__(self, starts: tuple[int, ...]) -> None:
        self.seq_starts, self.num_tokens = starts, starts[-1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=layouts(), cuts=st.lists(st.lists(st.integers(1, BATCH - 1), max_size=8),
                                       min_size=2, max_size=6))
def test_a_cached_plan_is_the_plan_the_batch_would_get(layout, cuts):
    """The cache keys sequence starts by the nano-batch edge at or below them: whatever batch
    filled the entry, the plan served must be the one built for this batch's own starts."""
    planner = Planner(LAYER_OPS, 2, layout)
    for c in cuts:
        starts = (0, *sorted(set(c)), BATCH)
        assert planner.plan(_Starts(starts)) == planner._build(BATCH, starts), starts


def test_a_prompt_straddling_an_edge_hits_the_cache_wherever_it_starts():
    """Overlap splits the batch in two; a prompt chunk across the split starting anywhere in
    the first half orders the second half's attention alike, so it needs one plan."""
    planner = Planner(LAYER_OPS, 2, overlap(OPS, BATCH, CPU))
    for start in range(1, BATCH // 2):
        planner.plan(_Starts((0, start, BATCH // 2 + 3, BATCH)))
    assert (planner.misses, planner.hits) == (1, BATCH // 2 - 2)
    planner.plan(_Starts((0, BATCH // 2, BATCH)))      # a sequence starting on the edge: another
    assert planner.misses == 2
