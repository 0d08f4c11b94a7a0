"""An op's facts live on its declaration (models/op.py), and nothing outside models/ names an op.

The op names checked are the registered families' own declarations (MODEL_CLASSES' OPS), so a
new family's ops are checked as soon as it is registered. The layouts, the cost model, the
simulator and measurement are shown to need no name: a family whose ops are the same facts
under other names gets the same layouts, costs and predictions.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from nanorun.device import get_device
from nanorun.layout import overlap, sequential
from nanorun.models import (KINDS, MODEL_CLASSES, NETWORK, SIDES, OpSpec, declared_ops, family,
                            get_preset, list_presets, model_frame_ops, model_layer_ops, op_spec)
from nanorun.planner import EMBED, LOGITS

ROOT = Path(__file__).resolve().parents[1]
H100 = get_device("h100")

# Where an op's name may not appear as a string: everything that reads the declarations.
SCANNED = ("nanorun", "search", "bench")
# Strings there that equal an op's name but do not name the op, and why. Each must still occur
# (test_allowed_op_strings_are_still_needed), so the list cannot outlive its reasons.
ALLOWED = {
    ("bench/gpu_session.py", "attention"): "the GPU session's stage timing the attention "
                                           "kernel, and its results read back by that name",
    ("bench/kernels.py", "kv_append"): "the benchmark case of the CUDA kernel "
                                       "nanorun.cuda_ops.kv_append",
}


def _families() -> list[type]:
    return list(dict.fromkeys(MODEL_CLASSES.values()))


def op_names() -> set[str]:
    """The name of every op a registered family declares."""
    return {op.name for cls in _families() for op in cls.OPS}


def _configs():
    """Every preset at the tensor-parallel degrees its heads divide into."""
    for name in list_presets():
        config = get_preset(name)
        for tp in (1, 2, 4):
            if config.num_kv_heads % tp == 0 and config.intermediate_size % tp == 0:
                yield config, tp


# -- the declarations ---------------------------------------------------------------------------
def test_every_family_declares_every_op_it_runs():
    """A family's OPS holds every op its layers can run (any config, tp, prefill role): what
    the name scan and the lookups by name rely on."""
    for config, tp in _configs():
        cls = family(config)
        for kv_send in (False, True):
            ops = cls.layer_ops_for(config, tp, kv_send)
            assert set(ops) <= set(cls.OPS), (config.name, tp, kv_send)
            assert len({op.name for op in ops}) == len(ops)
        assert model_layer_ops(config, tp) == cls.layer_ops_for(config, tp)


def test_declarations_of_one_name_agree_on_where_it_runs():
    """o_proj (tp 1 or a partial sum) or combine (with a shared expert or not) are declared
    more than once; a layout may look an op up by name (nanorun.layout.op_specs) only because
    its placement facts are the same in every declaration."""
    facts: dict[str, set] = {}
    for op in declared_ops():
        facts.setdefault(op.name, set()).add((op.kind, op.side, op.history, op.indexed_by))
        assert op_spec(op.name).name == op.name
    assert all(len(f) == 1 for f in facts.values()), {n: f for n, f in facts.items()
                                                       if len(f) > 1}
    assert op_spec("no such op") is None


def test_every_op_declares_its_kind_side_and_cost():
    for op in declared_ops():
        assert op.kind in KINDS and op.side in SIDES
        assert (op.side == "net") == (op.kind == NETWORK), op
        if op.cost is None:    # only a transfer that writes nothing (a prefill's kv_send)
            assert op.kind == NETWORK and not op.writes, op
    for config, tp in _configs():
        for op in model_layer_ops(config, tp) + model_frame_ops(config):
            work = op.work(config, tp)
            if op.cost is not None:
                assert work.kind == op.kind and work.flops_per_token >= 0 \
                    and work.bytes_per_token > 0, (config.name, op.name)
                assert (work.collective != "") == (op.kind == NETWORK), op
                assert bool(op.history) == work.reads_context, op


def test_bad_declarations_are_refused():
    with pytest.raises(ValueError, match="kind 'gpu'"):
        OpSpec("a", "gpu", (), ())
    with pytest.raises(ValueError, match="side 'left'"):
        OpSpec("a", "memory", (), (), side="left")
    with pytest.raises(ValueError, match="history .* must be buffers it reads"):
        OpSpec("a", "attention", ("q",), ("out",), history=("kv_cache",))


def test_the_frame_is_the_planners():
    for config, _ in _configs():
        assert tuple(op.name for op in model_frame_ops(config)) == (EMBED, LOGITS)


def test_the_cost_model_prices_every_op_that_declares_a_cost():
    from nanorun.search import CostModel

    for config, tp in _configs():
        cost = CostModel(config, H100, tp=tp)
        ops = model_layer_ops(config, tp, kv_send=True) + model_frame_ops(config)
        assert set(cost.work) == {op.name for op in ops if op.cost is not None}
        assert cost.context_ops == {op.name for op in ops if op.history}


# -- nothing else names an op --------------------------------------------------------------------
def _op_strings() -> dict[tuple[str, str], list[int]]:
    """(file, string) -> lines, for string literals equal to an op name in SCANNED. The
    names of `__all__` are Python names (nanorun.ops exports a kernel function kv_append)."""
    names, found = op_names(), {}
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            exports = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                       and any(isinstance(t, ast.Name) and t.id == "__all__"
                               for t in node.targets) for n in ast.walk(node.value)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and node.value in names \
                        and id(node) not in exports:
                    key = (str(path.relative_to(ROOT)), node.value)
                    found.setdefault(key, []).append(node.lineno)
    return found


def test_no_module_outside_models_names_an_op():
    """The layouts, the cost model, the search, measurement, the runtime and the benchmarks
    read what an op is from its declaration; an op's name in their code is a fact missing from
    the declaration (add it to models/op.py's OpSpec)."""
    assert {"attention", "kv_append", "gate_up", "experts", "moe_allreduce"} <= op_names()
    found = {k: v for k, v in _op_strings().items() if k not in ALLOWED}
    assert not found, "op names outside models/: " + ", ".join(
        f"{path}:{lines[0]} {name!r}" for (path, name), lines in sorted(found.items()))


def test_allowed_op_strings_are_still_needed():
    assert set(ALLOWED) <= set(_op_strings())


# -- a family of new names gets the same layouts, costs and predictions --------------------------
def _renamed(ops: tuple[OpSpec, ...]) -> tuple[OpSpec, ...]:
    return tuple(dataclasses.replace(op, name=f"new_{op.name}") for op in ops)


def _unrenamed(layout):
    """A layout of renamed ops with their old names back, to compare with the original."""
    back = lambda op: op.removeprefix("new_")  # noqa: E731
    return dataclasses.replace(
        layout, ops=tuple((back(op), ol) for op, ol in layout.ops),
        order=tuple((back(e[0]),) + tuple(e[1:]) for e in layout.order))


CASES = [("llama-3-8b", 1), ("llama-2-70b", 4), ("mixtral-8x7b", 2), ("qwen2-57b-a14b", 1)]


@pytest.mark.parametrize("model,tp", CASES)
def test_layouts_need_no_op_names(model, tp):
    from nanorun.search.tune import SearchSpace, build_layout
    from nanorun.search.workload import IterationMix

    config = get_preset(model)
    ops = model_layer_ops(config, tp, kv_send=True)
    new = _renamed(ops)
    assert _unrenamed(overlap(new, 512, H100)) == overlap(ops, 512, H100)
    assert _unrenamed(sequential(new, 512)) == sequential(ops, 512)
    ops, new = model_layer_ops(config, tp), _renamed(model_layer_ops(config, tp))
    mix = IterationMix((900,) * 200, ((0, 312),))
    space = SearchSpace((512,), gemm_sms=(64, 96), net_sms=(None, 8) if tp > 1 else ())
    for i, c in enumerate(space.candidates()):
        if i % 5 == 0:
            try:
                expected = build_layout(ops, H100, c, mix)
            except Exception as e:      # the same candidates fail, with the same message
                with pytest.raises(type(e)):
                    build_layout(new, H100, c, mix)
                continue
            assert _unrenamed(build_layout(new, H100, c, mix)) == expected, c
    # A layout written for the renamed family validates against its declarations.
    layout = overlap(new, 512, H100)
    layout.validate(new, H100)
    bad = dataclasses.replace(layout, order=tuple(reversed(layout.issue_order())))
    with pytest.raises(Exception, match="dependency cycle"):
        bad.validate(new, H100)


@pytest.mark.parametrize("model,tp", CASES[:3])
def test_costs_and_predictions_need_no_op_names(model, tp, monkeypatch):
    from nanorun.search import CostModel, Predictor
    from nanorun.search import costmodel, evaluate
    from nanorun.search.costmodel import TokenStats
    from nanorun.search.workload import IterationMix

    config = get_preset(model)
    before = CostModel(config, H100, tp=tp)
    predictor = Predictor(before)
    rename = lambda c, t=1, kv_send=False: _renamed(model_layer_ops(c, t, kv_send))  # noqa
    monkeypatch.setattr(costmodel, "model_layer_ops", rename)
    monkeypatch.setattr(evaluate, "model_layer_ops", rename)
    after = CostModel(config, H100, tp=tp)
    renamed = Predictor(after)
    assert after.context_ops == {f"new_{op}" for op in before.context_ops}
    stats = TokenStats(64, 64 * 900, 100, 100 * 50)
    for op in model_layer_ops(config, tp):
        for n, sms in ((164, None), (164, 32), (7, 96)):
            s = stats if op.history and n == 164 else None
            assert after.launch(f"new_{op.name}", n, sms, s) == before.launch(op.name, n, sms, s)
    mix = IterationMix((700,) * 300, ((0, 212),))
    for name in ("sequential", "overlap"):
        expected = predictor.iteration_seconds(predictor.resolve(name, 512), mix)
        assert renamed.iteration_seconds(renamed.resolve(name, 512), mix) == expected


def test_measurement_needs_no_op_names():
    from nanorun.search.measure import default_pairs, value_inputs

    for model in ("llama-3-8b", "mixtral-8x7b"):
        config = get_preset(model)
        ops = model_layer_ops(config)
        new = _renamed(ops)
        assert default_pairs(new, config) == tuple(
            (f"new_{a}", f"new_{b}") for a, b in default_pairs(ops, config))
        assert [op.name for op in value_inputs(new)] == [
            f"new_{op.name}" for op in value_inputs(ops)]
    # What NanoFlow overlaps on Llama, and the routing a mixture's expert GEMM is timed on.
    assert default_pairs(model_layer_ops(get_preset("llama-3-8b")), get_preset("llama-3-8b")) \
        == (("gate_up", "attention"), ("o_proj", "attention"))
    assert [op.name for op in value_inputs(model_layer_ops(get_preset("mixtral-8x7b")))] == [
        "router", "topk"]
