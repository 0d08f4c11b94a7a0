"""What `nanorun serve`'s flags tell the HTTP side: names, keys, chat and sampling defaults.

Each setting is a vLLM server flag of the same name (vllm/entrypoints/openai/cli_args.py) with
vLLM's meaning; `nanorun serve --help` lists them. The values are checked here, when the
server starts, so a bad flag stops it with a message naming the flag, never a request.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("nanorun.server")

# The generation_config.json keys vLLM takes sampling defaults from, and their SamplingParams
# names (vLLM's get_diff_sampling_param).
GENERATION_CONFIG_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                          "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                          "max_new_tokens": "max_tokens"}
API_KEY_ENV = ("NANORUN_API_KEY", "VLLM_API_KEY")


@dataclass(frozen=True)
class ServerSettings:
    """The HTTP side's settings (each a `nanorun serve` flag).

    served_model_names: the names a request's `model` may give; the first is the one answers
    carry. api_keys: the bearer tokens /v1 routes accept (none: no check). chat_template:
    the template that replaces the model's. response_role: the role of chat replies (when
    add_generation_prompt). generation_defaults: SamplingParams values for fields a request
    leaves unset (max_tokens among them caps every request's, as vLLM applies
    max_new_tokens)."""

    served_model_names: tuple[str, ...]
    api_keys: tuple[str, ...] = ()
    force_include_usage: bool = False
    enable_prompt_tokens_details: bool = False
    chat_template: str | None = None
    trust_request_chat_template: bool = False
    response_role: str = "assistant"
    return_tokens_as_token_ids: bool = False
    enable_log_requests: bool = False
    generation_defaults: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("--served-model-name needs at least one non-empty name")
        if not self.response_role:
            raise ValueError("--response-role must not be empty")

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


def api_keys(flag: Sequence[str] | None) -> tuple[str, ...]:
    """--api-key's keys, else NANORUN_API_KEY's, else VLLM_API_KEY's (so a vLLM deployment's
    environment works unchanged); () for no key."""
    if flag:
        keys = tuple(flag)
    else:
        value = next((os.environ[v] for v in API_KEY_ENV if os.environ.get(v)), None)
        keys = () if value is None else (value,)
    if any(not k for k in keys):
        raise ValueError("--api-key must not be empty")
    return keys


def load_chat_template(value: str | None) -> str | None:
    """--chat-template: a file's text, or the template itself written inline (as vLLM's
    load_chat_template tells them apart)."""
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if not any(c in value for c in "{}\n"):
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    from ..tokenizer import _compile      # a template that does not parse stops the server

    _compile(value)
    return value


def generation_defaults(setting: str, model_dir: str | None) -> dict[str, Any]:
    """--generation-config: 'auto' reads the model directory's generation_config.json, a
    folder reads its own; 'vllm' (and a model with no such file) gives no defaults. Returns
    SamplingParams' names for the keys vLLM reads."""
    if setting == "vllm":
        return {}
    folder = model_dir if setting == "auto" else setting
    if setting != "auto" and not os.path.isdir(setting):
        raise ValueError(f"--generation-config {setting!r}: use auto, vllm or a folder that "
                         f"holds a generation_config.json")
    path = None if folder is None else os.path.join(folder, "generation_config.json")
    if path is None or not os.path.isfile(path):
        if setting != "auto":
            raise ValueError(f"--generation-config {setting!r} has no generation_config.json")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--generation-config: cannot read {path}: {e}") from None
    out = {ours: config[key] for key, ours in GENERATION_CONFIG_KEYS.items()
           if config.get(key) is not None}        # null: not set
    if out:
        logger.info("default sampling parameters from generation_config.json: %s", out)
    return out
