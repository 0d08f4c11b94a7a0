"""Fuzzing the doors a user comes through: SamplingParams, add_request, Engine(...) and layout
JSON. Whatever they are given, only ValueError, TypeError (LayoutError is a ValueError) escape,
and after any refused input the engine still serves a bystander request correctly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanorun import Engine, SamplingParams, TextEngine
from nanorun.layout import Layout, overlap
from nanorun.models import LAYER_OPS
from nanorun.search import get_device

MODEL = "tiny-llama"
VOCAB = 2048
BYSTANDER = [11, 22, 33, 44]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
REFUSED = (ValueError, TypeError)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

# Values of every kind a caller might pass by mistake, with the edges of the valid ranges; the
# inputs that once stalled the engine are drawn often, so every run tries them.
KNOWN_BAD = [2.5, 0.5, True, float("nan"), float("inf"), 1e-50, 1e-300, "0", b"id", 2**70, -1,
             None, np.float64("nan"), [1.5], (2,)]
anything = st.one_of(
    st.sampled_from(KNOWN_BAD), st.sampled_from(KNOWN_BAD),
    st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([2**31, 2**63, -2**70]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 1.0, 2.5]),
    st.text(max_size=3), st.binary(max_size=2), st.lists(st.integers(-2, VOCAB + 2), max_size=3),
    st.sampled_from([(1, 2), {1: 2}, {3}, np.int64(2), object()]),
)
# Valid values of each field; the fuzz takes these and replaces one or two with `anything`, so
# that one bad field is not hidden behind another that is refused first.
VALID_PARAMS = {
    "max_tokens": st.integers(1, 8), "temperature": st.floats(0.05, 2.0),
    "top_k": st.integers(-1, 50), "top_p": st.floats(0.05, 1.0), "seed": st.integers(0, 2**32),
    "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=2),
    "ignore_eos": st.booleans(),
    "n": st.integers(1, 3), "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0), "repetition_penalty": st.floats(0.5, 2.0),
    "min_p": st.floats(0.0, 1.0), "min_tokens": st.integers(0, 1),
    "logprobs": st.none() | st.integers(0, 5), "prompt_logprobs": st.none() | st.integers(0, 5),
    # Stop strings need a tokenizer (the preset has none: refused); the rest is text-only.
    "stop": st.just(()), "include_stop_str_in_output": st.booleans(),
    "skip_special_tokens": st.booleans(),
}


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(MODEL, weights="random", max_batch_tokens=32, kv_cache_tokens=512)


@pytest.fixture(scope="module")
def bystander_tokens(engine) -> list[int]:
    return _serve(engine, "ref")


def _serve(engine: Engine, rid: str) -> list[int]:
    engine.add_request(rid, BYSTANDER, GREEDY)
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id == rid and o.finished:
                out = o
    assert out is not None and out.finish_reason == "length"
    return out.token_ids


valid_prompts = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)


@pytest.mark.parametrize("field", [*VALID_PARAMS, "prompt"])
@settings(FUZZ, max_examples=15)
@given(valid=st.fixed_dictionaries(VALID_PARAMS), prompt=valid_prompts, data=st.data())
def test_sampling_params_and_add_request(engine, bystander_tokens, field, valid, prompt, data):
    """A request that is accepted (through a TextEngine, which takes n > 1) runs to its end;
    one that is refused leaves no trace."""
    fields = dict(valid)
    fields["min_tokens"] = min(fields["min_tokens"], fields["max_tokens"])
    if field == "prompt":
        prompt = data.draw(anything)
    else:
        fields[field] = data.draw(anything)
    text = TextEngine(engine, None)
    try:
        params = SamplingParams(**fields)
        text.add_request("fuzzed", prompt, params)
    except REFUSED:
        pass
    else:
        while text.has_unfinished_requests():
            for out in text.step():
                assert out.finish_reason != "error", out.error
    text.abort_request("fuzzed")
    while text.has_unfinished_requests():
        text.step()
    assert _serve(engine, "bystander") == bystander_tokens
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


ENGINE_ARGS = {
    "max_batch_tokens": st.one_of(anything, st.sampled_from([1, 16, 10**9])),
    "kv_cache_tokens": st.one_of(anything, st.sampled_from([16, 100, 10**12])),
    "page_size": st.one_of(anything, st.sampled_from([1, 8, 10**7])),
    "max_model_len": st.one_of(anything, st.sampled_from([8, 64, 10**9])),
    "seed": anything,
    "device": st.one_of(anything, st.sampled_from(["cpu", "meta", "cuda:x", "gpu"])),
    "dtype": st.one_of(anything, st.sampled_from(["float32", "int8", "bf16"])),
    "layout": st.one_of(anything, st.sampled_from(["sequential", "overlap", "nosuch"])),
    "scheduling_policy": st.one_of(anything, st.sampled_from(["fcfs", "hrrn"])),
    "tensor_parallel_size": anything,
    "weights": anything,
}


@FUZZ
@given(st.fixed_dictionaries({}, optional=ENGINE_ARGS))
def test_engine_arguments(engine, bystander_tokens, kwargs):
    kwargs.setdefault("kv_cache_tokens", 256)    # the CPU default, 2**18 tokens, is slow to zero
    kwargs.setdefault("weights", "random")
    try:
        built = Engine(MODEL, **kwargs)
    except REFUSED:
        pass
    else:
        if built.config.max_batch_tokens >= 4 and built.max_model_len >= 8:
            assert len(_serve(built, "own")) == 4
    assert _serve(engine, "bystander") == bystander_tokens


def _valid_layout() -> dict:
    ops = tuple(op.name for op in LAYER_OPS)
    return overlap(ops, 32, get_device("cpu")).to_dict()


def _mutate(d, path: list, value):
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _paths(d, prefix=()):
    """Every (path) into the layout JSON, to replace with a fuzzed value."""
    yield list(prefix)
    items = d.items() if isinstance(d, dict) else enumerate(d) if isinstance(d, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


LAYOUT_PATHS = [p for p in _paths(_valid_layout()) if p]
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2, 40), st.sampled_from([10**30, 16, 0]),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4)),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                       children, max_size=3),
    max_leaves=6)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(LAYOUT_PATHS), json_values), min_size=1,
                max_size=3), st.booleans())
def test_layout_json(engine, bystander_tokens, tmp_path_factory, edits, drop):
    d = _valid_layout()
    for path, value in edits:
        try:
            if drop and isinstance(path[-1], str):
                value = None
            _mutate(d, path, value)
        except (KeyError, IndexError, TypeError):
            pass
    path = tmp_path_factory.mktemp("layout") / "fuzzed.json"
    path.write_text(json.dumps(d, allow_nan=True))
    try:
        Layout.load(path)
        built = Engine(MODEL, weights="random", layout=str(path), kv_cache_tokens=256)
    except REFUSED:
        pass
    else:
        assert len(_serve(built, "own")) == 4
    assert _serve(engine, "bystander") == bystander_tokens
