"""Building an Engine: the model and its weights, the KV cache, the layout and executor, the
scheduler and sampler, sized to the device and checked to fit before anything is allocated."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import torch

from . import memory
from .backends.cpu import set_cpu_threads
from .config import ALLOW_LONG_MAX_MODEL_LEN_ENV, DEFAULT_MAX_BATCH_TOKENS, EngineConfig
from .device import DeviceSpec, device_spec
from .distributed import TensorParallel, setup_tensor_parallel
from .executor import Executor
from .kernels import select_kernels, select_pointwise
from .kv_cache import KVCache
from .layout import Layout, is_layout_file, tuned_layout
from .lengths import get_length_predictor
from .memory import MAX_KV_PAGES
from .models import (ModelConfig, build_model, check_tensor_parallel, load_weights,
                     random_weights, resolve_model, shard_config)
from .sampler import Sampler, TokenCounts
from .scheduler import Scheduler, uses_predictions

logger = logging.getLogger("nanorun")

# With no kv_cache_tokens given, the CPU backend takes this much memory for KV pages (capped at
# _CPU_KV_MAX_TOKENS) and a GPU this share of what is free once the weights are loaded.
_CPU_KV_BYTES = 512 << 20
_CPU_KV_MAX_TOKENS = 1 << 18
_GPU_KV_FRACTION = 0.85


@dataclass(frozen=True)
class EngineParts:
    """What an Engine runs on, built once. `config` is the EngineConfig as run:
    max_batch_tokens filled in where the user left it to the layout."""

    config: EngineConfig
    model_config: ModelConfig
    tensor_parallel: TensorParallel
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    model: object
    kv_cache: KVCache
    executor: Executor
    scheduler: Scheduler
    sampler: Sampler


def build_engine(model: str, *, process_group=None, kv_sender=None, **kwargs) -> EngineParts:
    """Build an Engine's parts for `model` (a preset, a model directory, a GGUF file or a Hub
    id) with EngineConfig's keyword arguments. Refuses, naming what to change, a config that
    cannot run here: no CUDA device, too little memory, a context beyond the model's."""
    cfg = EngineConfig(model=model, **kwargs)
    if (cfg.role == "prefill") != (kv_sender is not None):
        raise ValueError("role='prefill' needs a kv_sender to hand its requests to (use "
                         "nanorun.disagg.prefill_engine), and only a prefill engine takes one")
    model_config, model_dir = resolve_model(model)
    check_tensor_parallel(model_config, cfg.tensor_parallel_size)
    if cfg.torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={cfg.device!r} but torch sees no CUDA device; "
                         f"use device='cpu'")
    if cfg.cpu_threads is not None:     # before anything computes (weights, warm-up)
        set_cpu_threads(cfg.cpu_threads)
    tp = setup_tensor_parallel(cfg.tensor_parallel_size, cfg.torch_device, process_group)
    spec = device_spec(tp.device)
    # Every rank must run rank 0's layout: "auto" and layout files are read there only.
    layout, batch_tokens = tp.on_driver(
        lambda: _layout_and_batch_tokens(cfg, model_config.name, spec))
    cfg = replace(cfg, max_batch_tokens=batch_tokens)
    max_model_len = _max_model_len(cfg, model_config)
    kv_tokens = _check_memory(cfg, model_config, tp.device, max_model_len)
    weights = _load_weights(cfg, model_config, model_dir, tp)
    kernels = select_kernels(tp.device)
    net = build_model(model_config, weights, max_model_len=max_model_len,
                      attention_fn=kernels[0], kv_append_fn=kernels[1], tp_group=tp.group,
                      pointwise=select_pointwise(tp.device),
                      kv_sink=kv_sender and kv_sender.send_layer)
    kv_cache = _new_kv_cache(cfg, net.local, tp, kv_tokens)
    predictor = cfg.length_predictor
    if isinstance(predictor, (str, os.PathLike)) and uses_predictions(
            cfg.scheduling_policy, cfg.kv_reservation):   # fitted from a file: on rank 0
        predictor = tp.on_driver(lambda: get_length_predictor(cfg.length_predictor))
    scheduler = Scheduler(kv_cache, cfg.max_batch_tokens, cfg.scheduling_policy, predictor,
                          cfg.kv_reservation, cfg.max_num_seqs)
    # kv_send calls the transport from the host with each iteration's requests: no graphs.
    executor = Executor(net, kv_cache, cfg.max_batch_tokens, layout, spec, kernels=kernels,
                        graphs=kv_sender is None)
    # Penalised requests' token counts live on the device, so that an iteration can count the
    # tokens of the one before it without reading them back (async scheduling).
    sampler = Sampler(TokenCounts(model_config.vocab_size, tp.device))
    return EngineParts(cfg, model_config, tp, tp.device, cfg.torch_dtype, max_model_len, net,
                       kv_cache, executor, scheduler, sampler)


def choose_layout(layout, model_name: str, spec: DeviceSpec, tp: int = 1,
                  batch_tokens: int | None = None):
    """A layout as the engine runs it: "auto" becomes the tuned Layout for this model, device,
    tp (and batch size, when given) or "overlap"; a JSON file becomes its Layout; anything else
    is returned as it is."""
    if layout == "auto":
        return tuned_layout(model_name, spec.name, tp, batch_tokens) or "overlap"
    if is_layout_file(layout):
        return Layout.load(layout)
    return layout


def _layout_and_batch_tokens(cfg: EngineConfig, model_name: str, spec: DeviceSpec):
    """What the executor is built from: the layout ("auto" looked up, a JSON file loaded) and
    the dense batch size: the user's max_batch_tokens, else the layout's own, else the
    default. So a layout that `nanorun tune` sized runs at its size unless the user says
    otherwise; "auto" with an explicit size takes only a layout tuned for that size."""
    layout = choose_layout(cfg.layout, model_name, spec, cfg.tensor_parallel_size,
                           cfg.max_batch_tokens)
    if cfg.max_batch_tokens is not None:
        return layout, cfg.max_batch_tokens
    if isinstance(layout, Layout):
        return layout, layout.batch_tokens
    return layout, DEFAULT_MAX_BATCH_TOKENS


def _max_model_len(cfg: EngineConfig, mc: ModelConfig) -> int:
    """The user's max_model_len, refused beyond the model's context unless the override is set."""
    context = mc.max_position_embeddings
    if cfg.max_model_len is None:
        return context
    if cfg.max_model_len > context and os.environ.get(ALLOW_LONG_MAX_MODEL_LEN_ENV) != "1":
        raise ValueError(
            f"max_model_len={cfg.max_model_len} is beyond {mc.name}'s context of {context} "
            f"tokens (max_position_embeddings); lower it, or set "
            f"{ALLOW_LONG_MAX_MODEL_LEN_ENV}=1 to run past what the model was trained on")
    return cfg.max_model_len


def _check_memory(cfg: EngineConfig, model_config: ModelConfig, device: torch.device,
                  max_model_len: int) -> int | None:
    """Refuse, before anything is allocated, an engine that cannot fit: say what it needs and
    what to lower. Returns the KV cache size in tokens where it is known before the weights
    are loaded (given, or the CPU default); None: sized from the GPU memory left after."""
    mc = shard_config(model_config, cfg.tensor_parallel_size)
    dtype = cfg.torch_dtype
    tokens = cfg.kv_cache_tokens
    if tokens is None and device.type != "cuda":
        tokens = _default_kv_tokens(mc, dtype, device, cfg.max_batch_tokens)
    pages = -(-(tokens or 0) // cfg.page_size)
    if pages > MAX_KV_PAGES:
        raise ValueError(f"kv_cache_tokens={tokens} is {pages:,} pages of {cfg.page_size} "
                         f"tokens, more than the {MAX_KV_PAGES:,} a KV cache can index; "
                         f"lower kv_cache_tokens (or raise page_size)")
    need = memory.estimate(mc, dtype, max_batch_tokens=cfg.max_batch_tokens,
                           kv_tokens=tokens or cfg.max_batch_tokens, max_model_len=max_model_len)
    memory.check_fits(need, device, dtype, what=(
        f"{model_config.name} in {str(dtype).removeprefix('torch.')} with a "
        f"{cfg.max_batch_tokens}-token dense batch (max_batch_tokens, or the layout's "
        f"batch_tokens) and {tokens or cfg.max_batch_tokens} KV cache tokens"))
    return tokens


def _load_weights(cfg: EngineConfig, mc: ModelConfig, model_dir: str | None,
                  tp: TensorParallel) -> dict[str, torch.Tensor]:
    """This rank's shard (all of it without tensor parallelism)."""
    if cfg.weights == "random" or model_dir is None:
        if cfg.weights == "auto":
            logger.info("%s is a preset: using random weights", mc.name)
        return random_weights(mc, dtype=cfg.torch_dtype, device=tp.device, seed=cfg.seed,
                              tp_rank=tp.rank, tp_size=tp.size)
    return load_weights(mc, model_dir, dtype=cfg.torch_dtype, device=tp.device,
                        tp_rank=tp.rank, tp_size=tp.size)


def _new_kv_cache(cfg: EngineConfig, mc: ModelConfig, tp: TensorParallel,
                  tokens: int | None) -> KVCache:
    """Sized per rank (`mc` is this rank's shard of the model: its own KV heads only)."""
    dtype = cfg.torch_dtype
    if tokens is None:
        tokens = _default_kv_tokens(mc, dtype, tp.device, cfg.max_batch_tokens)
        if tokens < cfg.page_size:
            raise ValueError(f"no GPU memory is left for the KV cache once the weights are "
                             f"loaded on {tp.device}; lower max_batch_tokens or use a "
                             f"smaller model or more tensor-parallel ranks")
    if cfg.kv_cache_tokens is None:
        # Free memory differs between GPUs, but the ranks' schedulers must admit and preempt
        # alike: every rank takes the smallest rank's pool.
        tokens = tp.agree_min(tokens)
    return KVCache(
        num_layers=mc.num_layers, num_pages=max(1, tokens // cfg.page_size),
        page_size=cfg.page_size, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
        dtype=dtype, device=tp.device,
        # kv_send sends what an iteration computes: a prefill engine computes every prompt.
        prefix_caching=cfg.enable_prefix_caching and cfg.role != "prefill",
        host_pages=cfg.kv_offload_tokens // cfg.page_size)


def _default_kv_tokens(mc: ModelConfig, dtype: torch.dtype, device: torch.device,
                       max_batch_tokens: int) -> int:
    per_token = mc.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Leave room for the workspace (a handful of [T, 4 * hidden] buffers) and the logits.
        budget = _GPU_KV_FRACTION * free - 16 * max_batch_tokens * mc.hidden_size * 4
        return max(0, int(budget // per_token))
    return min(_CPU_KV_BYTES // per_token, _CPU_KV_MAX_TOKENS)
