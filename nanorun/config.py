"""Engine configuration: one frozen, validated dataclass."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

# The dense batch size when neither the user nor the layout sets one.
DEFAULT_MAX_BATCH_TOKENS = 512
# The most tokens one KV page holds.
MAX_PAGE_SIZE = 1024
# Set to 1 to run with max_model_len beyond the model's context (vLLM's
# VLLM_ALLOW_LONG_MAX_MODEL_LEN): positions past what it was trained on give poor outputs.
ALLOW_LONG_MAX_MODEL_LEN_ENV = "NANORUN_ALLOW_LONG_MAX_MODEL_LEN"
# What an engine does with a request (Splitwise, nanorun.disagg): "both" runs it whole;
# "prefill" runs its prompt and first token, then hands it to a "decode" engine.
ROLES = ("both", "prefill", "decode")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def _option(default: Any, help: str, **cli: Any) -> Any:
    """An EngineConfig field: its default, its help text (LLM's docstring and every command's
    flag show it), and what the command line needs beyond that (nanorun.options): `type`
    (argparse's, str by default), `choices`, `flag` (else --field-name), `aliases`, `cli`
    ("flag": an on/off switch)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class EngineConfig:
    """Everything an Engine is built from; each field's help says what it means. LLM takes
    them as keyword arguments and `nanorun serve`, `bench` and `generate` as flags, all
    derived from these fields (nanorun.options).

    max_batch_tokens None: not chosen by the user, so the layout's own dense batch size where
    the layout has one (a Layout, a layout JSON, or the tuned layout "auto" finds), else
    DEFAULT_MAX_BATCH_TOKENS. The Engine's `config` has it filled in.
    """

    model: str
    device: str = _option("cpu", "cpu, cuda or cuda:N")
    dtype: str | torch.dtype | None = _option(
        None, "float32, bfloat16 or float16 (default: float32 on CPU, bfloat16 on GPU)")
    layout: Any = _option(
        "sequential", "how each iteration is split into nano-batches: sequential (whole), "
        "overlap, auto (the layout `nanorun tune` stored for this model, device and "
        "tensor-parallel size, else overlap), a layout JSON file, or (from Python) a Layout")
    max_batch_tokens: int | None = _option(
        None, "the dense batch size, tokens per iteration (the Dynamic SplitFuse budget; "
        f"default: the layout's own, else {DEFAULT_MAX_BATCH_TOKENS})", type=int)
    kv_cache_tokens: int | None = _option(
        None, "KV cache capacity in tokens (default: sized from free memory)", type=int)
    page_size: int = _option(16, "tokens per KV page (vLLM's --block-size)", type=int)
    seed: int = _option(0, "seeds random weights and unseeded requests' sampling", type=int)
    weights: str = _option("auto", "auto loads the model's weights (random for a preset); "
                           "random skips loading", choices=("auto", "random"))
    max_model_len: int | None = _option(
        None, "longest prompt + output (default: the model's context)", type=int)
    tensor_parallel_size: int = _option(
        1, "split the model over this many processes, one per device (Megatron-style); N > 1 "
        "runs under `torchrun --nproc-per-node N`, every rank running the same code",
        type=int, aliases=("-tp", "--tp"))
    max_num_seqs: int | None = _option(
        None, "the most sequences running at once (default: as many as the KV cache holds)",
        type=int)
    scheduling_policy: str = _option(
        "fcfs", "which waiting requests start first: fcfs (arrival order) or hrrn (highest "
        "response ratio next by predicted output length: Magnus)", choices=("fcfs", "hrrn"))
    length_predictor: Any = _option(
        None, "what hrrn and kv_reservation=predicted predict output lengths with: "
        "max_tokens (the default), a trace name or request-log CSV to fit a prompt-length "
        "model on, or (from Python) an object with predict(prompt_token_ids, sampling_params)")
    kv_reservation: str = _option(
        "none", "none admits a request when its first chunk's KV pages are free; predicted "
        "also keeps back the pages running requests are forecast to need, so that none is "
        "preempted", choices=("none", "predicted"))
    role: str = _option(
        "both", "both runs requests whole; prefill and decode split them between two engines "
        "(Splitwise: nanorun.disagg builds such pairs)", choices=ROLES)
    async_scheduling: bool = _option(
        False, "form and launch each iteration while the previous one runs on the device; "
        "the same tokens, the host's work hidden", cli="flag")
    cpu_threads: int | None = _option(
        None, "threads the CPU kernels use (default: every core); fewer leaves cores to other "
        "work, such as a server's HTTP process", type=int)
    max_logprobs: int = _option(
        20, "the most logprobs / prompt_logprobs a request may ask for (vLLM's "
        "--max-logprobs); -1: no bound, so a request may ask for the whole vocabulary",
        type=int)
    enable_prefix_caching: bool = _option(
        True, "keep the KV of computed pages, named by the prefix they hold, and start a new "
        "request from its longest cached prefix (vLLM's automatic prefix caching; also how "
        "the n sequences of a request share their prompt); a prefill engine (role=prefill) "
        "never reuses, it hands the whole prompt's KV over", cli="flag")
    kv_offload_tokens: int = _option(
        0, "host memory, in tokens of KV, that cached pages evicted from the device go to, "
        "and come back from instead of being recomputed (the prefix cache's host tier; 0: "
        "none)", type=int)

    def __post_init__(self) -> None:
        from .scheduler import KV_RESERVATIONS, POLICIES

        if self.scheduling_policy not in POLICIES:
            raise ValueError(f"unknown scheduling_policy {self.scheduling_policy!r}: use one of "
                             f"{POLICIES}")
        if self.kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"unknown kv_reservation {self.kv_reservation!r}: use one of "
                             f"{KV_RESERVATIONS}")
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r}: use one of {ROLES}")
        if self.role == "prefill" and self.tensor_parallel_size != 1:
            raise ValueError("role='prefill' hands KV over from one device: the KV handoff of "
                             "tensor-parallel shards is not supported; use "
                             "tensor_parallel_size=1")
        if isinstance(self.max_logprobs, bool) or not isinstance(self.max_logprobs, int) \
                or self.max_logprobs < -1:
            raise ValueError(f"max_logprobs must be an int >= 0, or -1 for no bound, got "
                             f"{self.max_logprobs!r}")
        if not isinstance(self.async_scheduling, bool):
            raise TypeError(f"async_scheduling must be True or False, got "
                            f"{self.async_scheduling!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise TypeError(f"enable_prefix_caching must be True or False, got "
                            f"{self.enable_prefix_caching!r}")
        if isinstance(self.kv_offload_tokens, bool) or not isinstance(
                self.kv_offload_tokens, int) or self.kv_offload_tokens < 0:
            raise ValueError(f"kv_offload_tokens must be an int >= 0, got "
                             f"{self.kv_offload_tokens!r}")
        if self.kv_offload_tokens and not self.enable_prefix_caching:
            raise ValueError("kv_offload_tokens is the prefix cache's host tier: it needs "
                             "enable_prefix_caching=True")
        if self.role == "prefill" and self.async_scheduling:
            # A prefill engine hands a request off when its first token is read back; one
            # iteration ahead, it would already have scheduled that request's next decode.
            raise ValueError("role='prefill' runs synchronously: a request leaves when its "
                             "first token is read back; use async_scheduling=False there (the "
                             "decode engine may use async scheduling)")
        if self.max_batch_tokens is not None:
            _positive("max_batch_tokens", self.max_batch_tokens)
        _positive("tensor_parallel_size", self.tensor_parallel_size)
        if self.cpu_threads is not None:
            _positive("cpu_threads", self.cpu_threads)
        if self.max_num_seqs is not None:
            _positive("max_num_seqs", self.max_num_seqs)
        _positive("page_size", self.page_size)
        if self.page_size > MAX_PAGE_SIZE:
            raise ValueError(f"page_size={self.page_size} tokens per KV page is more than the "
                             f"{MAX_PAGE_SIZE} nanorun supports; 16 (the default) to 128 suit "
                             f"most models")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise TypeError(f"seed must be an int, got {self.seed!r} ({type(self.seed).__name__})")
        if self.kv_cache_tokens is not None:
            _positive("kv_cache_tokens", self.kv_cache_tokens)
            if self.kv_cache_tokens < self.page_size:
                raise ValueError(f"kv_cache_tokens={self.kv_cache_tokens} is less than one page "
                                 f"(page_size={self.page_size}); give at least {self.page_size}")
        if self.max_model_len is not None:
            _positive("max_model_len", self.max_model_len)
        if self.weights not in ("auto", "random"):
            raise ValueError(f"weights must be 'auto' (load from the model directory, random for "
                             f"a preset) or 'random', got {self.weights!r}")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device {self.device!r} is not a torch device: use 'cpu' or "
                             f"'cuda' (or 'cuda:N')") from e
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {self.device!r} is not supported: nanorun runs on 'cpu' "
                             f"or 'cuda' (or 'cuda:N')")
        self.torch_dtype  # validates

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        """float32 on CPU and bfloat16 on GPU unless the user chose."""
        if self.dtype is None or self.dtype == "auto":
            return torch.float32 if self.torch_device.type == "cpu" else torch.bfloat16
        if isinstance(self.dtype, torch.dtype):
            if self.dtype not in _DTYPES.values():
                raise ValueError(f"dtype {self.dtype} is not supported: use float32, bfloat16 "
                                 f"or float16")
            return self.dtype
        try:
            return _DTYPES[str(self.dtype).lower()]
        except KeyError:
            raise ValueError(f"unknown dtype {self.dtype!r}: use one of "
                             f"{sorted(set(_DTYPES))}") from None


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
