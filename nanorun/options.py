"""Engine options on the command line, derived from EngineConfig's fields.

Each EngineConfig field carries its help text (and, where the command line needs more, its
flag, choices or argparse type) in its metadata; `add_engine_arguments` turns the fields into
flags, `engine_kwargs` turns parsed arguments back into EngineConfig keywords. `nanorun serve`,
`nanorun bench` and `nanorun generate` all take their engine flags from here, and `LLM` its
keyword arguments from the same fields, so an option added to EngineConfig appears everywhere
at once. A command that cannot take an option says why in its `absent` mapping
(tests/test_options.py holds every command to that).

vLLM users bring vLLM's flags: where nanorun has the same option it has vLLM's name; where it
has one under another name, or none, `check_vllm_flags` says so instead of argparse's bare
"unrecognized arguments".
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .config import EngineConfig

# vLLM flags that nanorun takes under another name, or not at all (and why).
VLLM_FLAGS: dict[str, str] = {
    "--block-size": "use --page-size (tokens per KV page)",
    "--max-num-batched-tokens": "use --max-batch-tokens (the dense batch: tokens per iteration)",
    "--num-gpu-blocks-override": "use --kv-cache-tokens (KV cache capacity in tokens)",
    "--gpu-memory-utilization": "nanorun has no equivalent yet: on a GPU it gives the KV cache "
                                "85% of the memory free once the weights are loaded; set "
                                "--kv-cache-tokens to choose the size",
    "--enable-chunked-prefill": "nanorun always chunks prompts (Dynamic SplitFuse): drop it",
    "--no-enable-chunked-prefill": "nanorun always chunks prompts (Dynamic SplitFuse); a "
                                   "--max-batch-tokens above your longest prompt runs each "
                                   "prompt in one iteration",
    "--enforce-eager": "nanorun has no equivalent: on a GPU it captures one CUDA graph per "
                       "batch size, and runs eagerly on the CPU",
    "--load-format": "use --weights random for dummy weights (auto loads the model's own)",
    "--pipeline-parallel-size": "nanorun has no pipeline parallelism; use "
                                "--tensor-parallel-size",
    "--quantization": "nanorun has no quantized kernels: GGUF weights are dequantized at load",
    "--kv-cache-dtype": "nanorun keeps the KV cache in the model's --dtype",
    "--swap-space": "nanorun preempts by recompute and has no CPU swap space",
    "--trust-remote-code": "nanorun runs its own model code for the architectures it knows; "
                           "there is no remote code to trust",
}


def engine_fields() -> list[dataclasses.Field]:
    """EngineConfig's fields that are options (all but the model, which is positional)."""
    return [f for f in dataclasses.fields(EngineConfig) if f.name != "model"]


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def add_engine_arguments(parser: argparse.ArgumentParser | Any, *,
                         absent: Mapping[str, str] = {},
                         defaults: Mapping[str, Any] = {}) -> None:
    """Add a flag for every EngineConfig field not in `absent` (field name -> why this
    command does not take it). `defaults` overrides a field's default for this command."""
    unknown = (set(absent) | set(defaults)) - {f.name for f in engine_fields()}
    if unknown:
        raise ValueError(f"not EngineConfig fields: {sorted(unknown)}")
    for field in engine_fields():
        if field.name in absent:
            continue
        meta = field.metadata
        default = defaults.get(field.name, field.default)
        kwargs: dict[str, Any] = dict(dest=field.name, default=default, help=meta["help"])
        if meta.get("cli") == "flag":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta.get("type", str)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
            if "metavar" in meta:
                kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_of(field), *meta.get("aliases", ()), **kwargs)


def engine_kwargs(args: argparse.Namespace, *, absent: Mapping[str, str] = {}) -> dict:
    """EngineConfig keywords from arguments parsed with add_engine_arguments."""
    return {f.name: getattr(args, f.name) for f in engine_fields() if f.name not in absent}


def check_vllm_flags(argv: Sequence[str]) -> None:
    """Raise SystemExit with a message for each vLLM flag in argv that nanorun takes under
    another name or not at all."""
    said = []
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in VLLM_FLAGS:
            said.append(f"{flag}: {VLLM_FLAGS[flag]}")
    if said:
        raise SystemExit("nanorun: vLLM's flags that nanorun does not take as they are:\n  "
                         + "\n  ".join(said))
