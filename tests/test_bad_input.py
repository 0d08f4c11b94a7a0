"""Bad input is refused at the door with a message that says what to change, and one request's
failure never stalls the others. Everything here goes through the public API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokens import assert_same_tokens

from nanorun import LLM, Engine, SamplingParams
from nanorun import memory as nanorun_memory
from nanorun.layout import LayoutError, sequential
from nanorun.models import LAYER_OPS, ModelConfig, UnknownModelError, get_preset
from nanorun.sampler import Sampler

MODEL = "tiny-llama"
VOCAB = get_preset(MODEL).vocab_size
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 17, 99, 3, 250]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(MODEL, weights="random", max_batch_tokens=64, kv_cache_tokens=1024)


def _run(engine: Engine) -> dict:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done, "a request ended twice"
                done[out.request_id] = out
    return done


def _solo(params: SamplingParams, prompt=PROMPT) -> list[int]:
    """Alone in a sequential engine, the prompt in one chunk: the arithmetic of the `engine`
    fixture's lone runs of it, so they are compared exactly."""
    return LLM(MODEL, weights="random").generate([prompt], params)[0].token_ids


# -- SamplingParams: every field's type and range ------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"top_k": 2.5}, TypeError, "top_k must be an int"),
    ({"top_k": True}, TypeError, "top_k must be an int"),
    ({"top_k": 0.5}, TypeError, "top_k must be an int"),
    ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
    ({"temperature": float("inf")}, ValueError, "temperature must be finite"),
    ({"temperature": "0.7"}, TypeError, "temperature must be a number"),
    ({"top_p": float("nan")}, ValueError, "top_p must be finite"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"seed": 1.5}, TypeError, "seed must be an int"),
    ({"seed": "0"}, TypeError, "seed must be an int"),
    ({"seed": True}, TypeError, "seed must be an int"),
    ({"seed": 2**70}, ValueError, "seed must be in"),
    ({"max_tokens": 2.0}, TypeError, "max_tokens must be an int"),
    ({"ignore_eos": 1}, TypeError, "ignore_eos must be True or False"),
    ({"stop_token_ids": [1.5]}, TypeError, "stop_token_ids entry must be an int"),
    ({"stop_token_ids": "12"}, TypeError, "stop_token_ids must be a list"),
    ({"stop_token_ids": [-1]}, ValueError, "non-negative"),
])
def test_sampling_params_refuse_bad_fields(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_numpy_scalars_are_taken_as_numbers():
    sp = SamplingParams(max_tokens=np.int64(4), temperature=np.float32(0.5), top_k=np.int32(3))
    assert (sp.max_tokens, sp.top_k) == (4, 3) and isinstance(sp.max_tokens, int)


@pytest.mark.parametrize("temperature", [1e-50, 1e-300, 5e-324, 1e-6])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature):
    """vLLM's rule: below 1e-5 is greedy (1/1e-50 overflows float32 to inf, and then NaN)."""
    sp = SamplingParams(max_tokens=6, temperature=temperature, ignore_eos=True)
    assert sp.greedy
    assert _solo(sp) == _solo(GREEDY)


def test_engine_seed_must_be_an_int():
    with pytest.raises(TypeError, match="seed must be an int"):
        Engine(MODEL, weights="random", seed=1.5)


# -- a request that fails while sampling ends alone ---------------------------------------------
def test_a_row_that_fails_sampling_ends_that_request_and_no_other(monkeypatch):
    seeded = SamplingParams(max_tokens=6, temperature=0.9, seed=11, ignore_eos=True)
    solo = LLM(MODEL, weights="random")
    alone = solo.generate([PROMPT], seeded)[0].token_ids
    engine = Engine(MODEL, weights="random", max_batch_tokens=64, kv_cache_tokens=1024)
    real = Sampler.sample

    def poisoned(self, logits, prepared):        # the bad request's row turns to NaN
        logits = logits.clone()
        for row, request in enumerate(prepared.requests):
            if request.request_id == "bad":
                logits[row] = float("nan")
        return real(self, logits, prepared)

    monkeypatch.setattr(Sampler, "sample", poisoned)
    engine.add_request("bad", PROMPT, SamplingParams(max_tokens=6, temperature=1.0))
    engine.add_request("seeded", PROMPT, seeded)
    engine.add_request("greedy", [7, 8, 9], GREEDY)
    done = _run(engine)
    assert done["bad"].finish_reason == "error" and "sampling failed" in done["bad"].error
    assert done["bad"].token_ids == []
    # Batched here, alone there: its solo tokens, or a near-tie of its logits (tests/tokens.py)
    assert_same_tokens(done["seeded"].token_ids, alone, prompt=PROMPT, params=seeded,
                       logits_of=solo.engine.prompt_logits)
    assert done["seeded"].finish_reason == "length"
    assert len(done["greedy"].token_ids) == 6
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


def test_nan_logits_fail_only_their_row():
    sampler = Sampler()
    engine = Engine(MODEL, weights="random", kv_cache_tokens=256)
    reqs = [engine.new_request(str(i), PROMPT, SamplingParams(temperature=1.0, seed=i))
            for i in range(3)]
    logits = torch.randn(3, VOCAB)
    good = sampler(logits[[0, 2]], [reqs[0], reqs[2]]).tokens
    logits[1, 7] = float("nan")
    out = sampler(logits, reqs)
    assert list(out.errors) == [1] and "not finite" in out.errors[1]
    assert [out.tokens[0], out.tokens[2]] == good, "a failed row changed its neighbours' draws"


# -- request ids and abort ------------------------------------------------------------------------
def test_abort_takes_the_ids_add_request_takes(engine):
    engine.add_request(5, PROMPT, GREEDY)
    engine.add_request("x", PROMPT, GREEDY)
    engine.abort_request(5)
    engine.abort_request(("x",))
    done = _run(engine)
    assert done["5"].finish_reason == "abort" and done["x"].finish_reason == "abort"


@pytest.mark.parametrize("bad", [b"id", 1.5, True, None, ("a",)])
def test_request_ids_other_than_str_or_int_are_refused(engine, bad):
    with pytest.raises(TypeError, match="request id must be a str or an int"):
        engine.add_request(bad, PROMPT, GREEDY)
    engine.add_request("bystander", PROMPT, GREEDY)
    with pytest.raises(TypeError, match="request id must be a str or an int"):
        engine.abort_request(bad if not isinstance(bad, tuple) else [b"a"])
    assert len(_run(engine)["bystander"].token_ids) == 6


# -- prompts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, match", [
    ([1.7, 2.2], "index 0 is 1.7"),
    ([True], "index 0 is True"),
    (["7"], "index 0 is '7'"),
    ({1: 2}, "must be a list of ints, got dict"),
    ({1, 2}, "must be a list of ints, got set"),
    (np.array([True, False]), "1-D of integers"),
    (np.array([1.0, 2.0]), "1-D of integers"),
    (torch.tensor([[1, 2]]), "1-D of integers"),
    (torch.tensor([1.0]), "1-D of integers"),
    ("hello", "not text"),
])
def test_prompts_are_not_reinterpreted(engine, prompt, match):
    with pytest.raises(TypeError, match=match):
        engine.add_request("p", prompt, GREEDY)
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt", [np.array(PROMPT), np.array(PROMPT, dtype=np.uint16),
                                    torch.tensor(PROMPT), tuple(PROMPT),
                                    [np.int64(t) for t in PROMPT]])
def test_integer_arrays_and_tensors_are_prompts(engine, prompt):
    engine.add_request("ok", prompt, GREEDY)
    assert _run(engine)["ok"].token_ids == _solo(GREEDY)


def test_stop_token_ids_outside_the_vocabulary_are_refused(engine):
    with pytest.raises(ValueError, match=r"stop_token_ids \[2048\] are outside the vocabulary"):
        engine.add_request("s", PROMPT, SamplingParams(stop_token_ids=[VOCAB]))


# -- outputs do not alias the engine's state ------------------------------------------------------
def test_outputs_are_copies(engine):
    engine.add_request("a", PROMPT, GREEDY)
    first = engine.step()[0]
    with pytest.raises(AttributeError):
        first.prompt_token_ids.append(1)       # a tuple
    first.token_ids.append(123)
    first.token_ids.clear()
    out = _run(engine)["a"]
    assert list(out.prompt_token_ids) == PROMPT and out.token_ids == _solo(GREEDY)


# -- layout JSON ----------------------------------------------------------------------------------
def _layout_file(tmp_path, edit):
    d = sequential(tuple(op.name for op in LAYER_OPS), 64).to_dict()
    edit(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda d: d["ops"]["qkv"].update(splits=[float("inf")]), "ops.qkv.splits must be"),
    (lambda d: d.update(order=[["qkv"]]), r"order\[0\] must be"),
    (lambda d: d.update(provenance="ab"), "'provenance' must be an object"),
    (lambda d: d.pop("batch_tokens"), "field 'batch_tokens' is missing"),
    (lambda d: d.update(batch_tokens=True), "'batch_tokens' must be a positive int"),
    (lambda d: d.update(batch_tokens=64.0), "'batch_tokens' must be a positive int"),
    (lambda d: d.update(partitions=[{"name": 3}]), r"partitions\[0\] must be"),
    (lambda d: d["partitions"][0].update(sm_count=1.5), r"partitions\[0\].sm_count"),
    (lambda d: d["ops"].update(qkv=[64]), "ops.qkv must be"),
    (lambda d: d.update(ops=[]), "'ops' must be a non-empty object"),
    (lambda d: d.update(version="1"), "'version' must be an int"),
    (lambda d: d.update(batch_token=64), "unknown field"),
])
def test_malformed_layout_files_name_the_file_and_the_field(tmp_path, edit, match):
    path = _layout_file(tmp_path, edit)
    with pytest.raises(LayoutError, match=match) as e:
        LLM(MODEL, weights="random", layout=str(path))
    assert str(path) in str(e.value)


def test_a_layout_file_that_is_not_json(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{\"batch_tokens\": ")
    with pytest.raises(LayoutError, match="cannot read layout"):
        LLM(MODEL, weights="random", layout=str(path))


# -- sizes and memory, refused before anything is allocated ---------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"page_size": 10**7}, "page_size=10000000"),
    ({"max_batch_tokens": 10**9}, r"needs .* GiB .*max_batch_tokens"),
    ({"kv_cache_tokens": 10**12}, "lower kv_cache_tokens"),
    ({"kv_cache_tokens": 10**10}, r"needs .* GiB .*kv_cache_tokens"),
    ({"max_model_len": 10**9}, "beyond tiny-llama's context of 4096"),
    ({"device": "meta"}, "nanorun runs on 'cpu' or 'cuda'"),
    ({"device": "nosuch"}, "not a torch device"),
    ({"cpu_threads": 0}, "cpu_threads must be a positive int"),
    ({"cpu_threads": 1.5}, "cpu_threads must be a positive int"),
])
def test_sizes_and_devices_that_cannot_work_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(MODEL, weights="random", **kwargs)


def test_a_long_max_model_len_needs_the_override(monkeypatch):
    monkeypatch.setenv("NANORUN_ALLOW_LONG_MAX_MODEL_LEN", "1")
    assert Engine(MODEL, weights="random", max_model_len=8192).max_model_len == 8192


def test_a_layout_with_an_absurd_batch_is_refused_by_its_memory(tmp_path):
    path = _layout_file(tmp_path, lambda d: d.update(batch_tokens=10**30) or [
        v.update(splits=[10**30]) for v in d["ops"].values()])
    with pytest.raises(ValueError, match="layout's batch_tokens"):
        Engine(MODEL, weights="random", layout=str(path))


def test_a_model_too_big_for_memory_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(nanorun_memory, "available_bytes", lambda device: 24 << 30)
    with pytest.raises(ValueError, match=r"needs 3\d\.\d\d GiB \(weights 29\.9\d GiB.*"
                                         r"dtype='bfloat16'"):
        LLM("llama-3-8b")


def test_a_70b_model_is_refused_on_any_cpu():
    with pytest.raises(ValueError, match="GiB is free"):
        LLM("llama-2-70b")


# -- models ---------------------------------------------------------------------------------------
def test_a_hub_id_that_cannot_be_had_names_itself_and_what_to_do(monkeypatch):
    """Hub ids are resolved now (tests/test_hub.py); one neither cached nor reachable is
    refused at once, naming the id, why, and what to do."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UnknownModelError,
                       match=r"'meta-llama/Llama-3.2-1B'.*HF_HUB_OFFLINE=1.*local directory"):
        LLM("meta-llama/Llama-3.2-1B")


def test_generation_config_eos_ids_are_merged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(get_preset(MODEL).to_hf_dict()))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 9]}))
    assert ModelConfig.from_pretrained(tmp_path).eos_token_ids == (2, 3, 9)


def test_an_eos_from_generation_config_stops_generation(tmp_path):
    from test_loader import build_hf_checkpoint

    build_hf_checkpoint(MODEL, tmp_path)
    free = LLM(str(tmp_path)).generate([PROMPT], SamplingParams(max_tokens=8, temperature=0.0,
                                                                ignore_eos=True))[0].token_ids
    stop = next(t for t in free if t not in (2, 3))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": stop}))
    out = LLM(str(tmp_path)).generate([PROMPT], SamplingParams(max_tokens=8,
                                                               temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids == free[:free.index(stop) + 1]


# -- the command line -----------------------------------------------------------------------------
def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanorun.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_cli_version_and_generate_with_a_positional_model():
    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("nanorun 0.")
    run = _cli("generate", MODEL, "--prompt-token-ids", "1,2,3", "--max-tokens", "3")
    assert run.returncode == 0, run.stderr
    assert "1 requests, 3 prompt + 3 output tokens" in run.stdout


def test_cli_errors_are_one_line():
    run = _cli("generate", "meta-llama/Llama-3.2-1B", env={"HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    assert "'meta-llama/Llama-3.2-1B' is not in the Hugging Face cache" in run.stderr


def test_bench_names_a_missing_trace_file_and_bad_rates_in_one_line(tmp_path):
    missing = _cli("bench", MODEL, "--trace", str(tmp_path / "nosuch.csv"), "--num-requests", "2")
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    rate = _cli("bench", MODEL, "--request-rate", "-1")
    assert rate.returncode == 2 and len(rate.stderr.strip().splitlines()) == 1
    assert "use a positive number of requests/s" in rate.stderr


def test_tune_to_a_pipe_writes_plain_progress_lines_and_plan_names_its_spec(tmp_path):
    tune = _cli("tune", MODEL, "--gpu", "h100", "--trials", "20", "--no-plot",
                "--out", str(tmp_path / "t.json"))
    assert tune.returncode == 0, tune.stderr
    assert "\r" not in tune.stderr
    lines = [line for line in tune.stderr.splitlines() if line.startswith("tune: trial")]
    assert 2 <= len(lines) <= 11 and lines[-1].startswith("tune: trial 20/20")
    plan = _cli("plan", MODEL, "--gpu", "h100", "--layout", "overlap")
    assert plan.returncode == 0, plan.stderr
    assert "device spec h100: 132 SMs in steps of 8" in plan.stdout
