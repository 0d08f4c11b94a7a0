"""Engine options have one source, EngineConfig: every field is an LLM keyword argument and a
flag of `nanorun serve`, `bench` and `generate`, or is listed as deliberately absent from one
with the reason; vLLM's flags that nanorun names otherwise get an error that says so."""

from __future__ import annotations

import argparse
import dataclasses
import inspect

import pytest

from nanorun import LLM
from nanorun.benchmark.cli import BENCH_ABSENT
from nanorun.cli import GENERATE_ABSENT, main
from nanorun.config import EngineConfig
from nanorun.llm import LLM_ABSENT
from nanorun.options import (VLLM_FLAGS, add_engine_arguments, check_vllm_flags,
                             engine_fields, engine_kwargs, flag_of)
from nanorun.server.cli import SERVE_ABSENT

FIELDS = [f.name for f in engine_fields()]


def _subparser(command: str) -> argparse.ArgumentParser:
    """The parser `nanorun` builds for one command."""
    from nanorun import cli

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
    finally:
        argparse.ArgumentParser.parse_args = real
    sub = next(a for a in captured["parser"]._actions
               if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def test_every_field_has_help_text():
    for field in engine_fields():
        assert field.metadata.get("help"), f"EngineConfig.{field.name} has no help text"


@pytest.mark.parametrize("command, absent", [("serve", SERVE_ABSENT), ("bench", BENCH_ABSENT),
                                             ("generate", GENERATE_ABSENT)])
def test_every_field_is_a_flag_or_absent_with_a_reason(command, absent):
    parser = _subparser(command)
    flags = {s: a for a in parser._actions for s in a.option_strings}
    for field in engine_fields():
        if field.name in absent:
            assert len(absent[field.name]) > 20, f"{command}: say why {field.name} is absent"
            continue
        action = flags.get(flag_of(field))
        assert action is not None, f"nanorun {command} has no {flag_of(field)}"
        assert action.dest == field.name
        assert action.default == field.default or field.name in ("device",)
    assert set(absent) <= set(FIELDS)


def test_every_field_is_an_llm_argument_or_absent_with_a_reason():
    params = inspect.signature(LLM.__init__).parameters
    for name in FIELDS:
        if name in LLM_ABSENT:
            continue
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].default == EngineConfig.__dataclass_fields__[name].default
        assert f"{name}:" in LLM.__doc__
    with pytest.raises(TypeError, match="role.*nanorun.disagg"):
        LLM("tiny-llama", role="prefill")
    with pytest.raises(TypeError, match=r"unknown options \['max_num_batched_tokens'\]"):
        LLM("tiny-llama", max_num_batched_tokens=64)


def test_a_new_field_reaches_every_command(monkeypatch):
    """Derived, not copied: a field added to EngineConfig is a flag at once."""
    extra = dataclasses.field(default=3, metadata={"help": "a new option", "type": int})
    extra.name, extra.type = "new_option", int
    monkeypatch.setattr("nanorun.options.engine_fields", lambda: [*engine_fields(), extra])
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    args = parser.parse_args(["--new-option", "5", "--max-num-seqs", "2", "--async-scheduling"])
    kwargs = engine_kwargs(args)
    assert kwargs["new_option"] == 5 and kwargs["max_num_seqs"] == 2
    assert kwargs["async_scheduling"] is True


def test_parsed_flags_build_the_engine_config():
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser, absent={"role": "not here, for the test"})
    args = parser.parse_args(["--tensor-parallel-size", "1", "--page-size", "32", "--dtype",
                              "bfloat16", "--scheduling-policy", "hrrn", "-tp", "1"])
    config = EngineConfig(model="tiny-llama", **engine_kwargs(args, absent={"role": "x"}))
    assert (config.page_size, config.scheduling_policy) == (32, "hrrn")
    with pytest.raises(SystemExit):
        parser.parse_args(["--scheduling-policy", "sjf"])


def test_vllm_flags_named_otherwise_say_what_to_use(capsys):
    with pytest.raises(SystemExit, match="--block-size: use --page-size"):
        check_vllm_flags(["serve", "m", "--block-size=32"])
    with pytest.raises(SystemExit, match="--max-num-batched-tokens: use --max-batch-tokens"):
        main(["bench", "--max-num-batched-tokens", "64"])
    check_vllm_flags(["serve", "m", "--page-size", "32"])          # nanorun's own: fine
    assert all(flag.startswith("--") and len(why) > 20 for flag, why in VLLM_FLAGS.items())


def test_max_num_seqs_bounds_the_running_requests():
    llm = LLM("tiny-llama", max_num_seqs=2, max_batch_tokens=64)
    seen = []
    engine = llm.engine
    real = engine.scheduler.schedule

    def schedule():
        out = real()
        seen.append(len(engine.scheduler.running))
        return out

    engine.scheduler.schedule = schedule
    from nanorun import SamplingParams
    outs = llm.generate([[1, 2, 3]] * 5, SamplingParams(max_tokens=3, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [3] * 5
    assert max(seen) == 2
