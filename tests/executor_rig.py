"""A tiny model on any device with executors for any layout, batches whose KV contexts are
already cached, and a graph-safe attention: shared by the executor tests (CPU) and the CUDA
backend tests (GPU). No hypothesis here: the GPU machine may not have it."""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from nanorun.backends import SimulatedStreams
from nanorun.batch import build_batch
from nanorun.executor import Executor
from nanorun.kv_cache import KVCache
from nanorun.models import build_model, get_preset, random_weights
from nanorun.ops import kv_append, paged_attention
from nanorun.request import Request
from nanorun.sampling_params import SamplingParams
from nanorun.scheduler import ScheduledChunk
from nanorun.search import get_device


def workspace_buffers(ws) -> list[torch.Tensor]:
    """The workspace's own tensors, to poison in place (dataclasses.astuple returns deep copies,
    so filling those left the real buffers as they were)."""
    return [getattr(ws, f.name) for f in dataclasses.fields(ws)]

BATCH = 48      # the dense batch; equal to test_planner's, whose layout strategy the tests use
PAGE = 8
CPU = get_device("cpu")


# -- a graph-safe attention for tests: fixed shapes, no host reads ---------------------------------
def dense_attention(q, k_cache, v_cache, block_tables, seq_ids, positions, scale, out,
                    sliding_window=None):
    """Every token gathers its sequence's whole page-table row and masks what it may not see:
    slow, but every shape is fixed by the tensors' shapes, so it can be captured in a CUDA
    graph and replayed with new metadata in the same buffers."""
    num_kv = k_cache.shape[2]
    pages = block_tables[seq_ids.long()].clamp(min=0).long()               # [T, P]
    keys = k_cache[pages].flatten(1, 2).float()                             # [T, K, Hkv, D]
    values = v_cache[pages].flatten(1, 2).float()                           # [T, K, Hkv, D]
    kpos = torch.arange(keys.shape[1], device=q.device)                     # [K]
    seen = kpos[None] <= positions[:, None]                                 # [T, K]
    if sliding_window is not None:
        seen &= kpos[None] > positions[:, None] - sliding_window
    group = q.shape[1] // num_kv
    keys = keys.repeat_interleave(group, dim=2)                             # [T, K, H, D]
    values = torch.where(seen[:, :, None, None], values, 0.0).repeat_interleave(group, dim=2)
    scores = torch.einsum("thd,tkhd->thk", q.float(), keys) * scale         # [T, H, K]
    probs = scores.masked_fill(~seen[:, None, :], -math.inf).softmax(-1)
    out.copy_(torch.einsum("thk,tkhd->thd", probs, values).to(out.dtype))
    return out


def graph_safe(fn):
    """fn declared graph-safe. For kv_append: padding slots are -1 and skipped on the CPU; on a
    GPU its sync-free path rewrites slot 0 for an all-padding launch, harmless where no other
    stream writes slot 0 meanwhile (true for the overlap layout, whose appends share a stream)."""
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs)
    wrapped.__name__ = fn.__name__
    wrapped.graph_safe = True
    return wrapped


GRAPH_SAFE = (graph_safe(dense_attention), graph_safe(kv_append))


# -- a model, its cache, and batches ---------------------------------------------------------------
class Rig:
    """A 2-layer tiny model on `device`, its KV cache, and a "sequential" executor."""

    def __init__(self, attention=paged_attention, device="cpu", dtype=torch.float32,
                 spec=CPU, preset: str = "tiny-llama") -> None:
        cfg = dataclasses.replace(get_preset(preset), num_layers=2)
        self.device, self.spec = torch.device(device), spec
        weights = random_weights(cfg, dtype=dtype, device=device, seed=0)
        self.model = build_model(cfg, weights, max_model_len=512, attention_fn=attention,
                                 kv_append_fn=kv_append)
        self.kv = KVCache(num_layers=2, num_pages=256, page_size=PAGE,
                          num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=dtype,
                          device=self.device)
        self.sequential = Executor(self.model, self.kv, BATCH, "sequential", spec, graphs=False)

    def executor(self, layout, **kwargs) -> Executor:
        return Executor(self.model, self.kv, BATCH, layout, self.spec, **kwargs)

    def batches(self, shapes: list[list[tuple[int, int]]], seed: int):
        """One batch per shape, all of whose KV contexts are in the cache at once.
        A shape is (context already cached, tokens this iteration) per sequence."""
        g = torch.Generator().manual_seed(seed)
        self.kv.allocator.reset()
        per_batch, warm, ids = [], [], itertools.count()
        for shape in shapes:
            chunks = []
            for ctx, n in shape:
                prompt = torch.randint(0, 2048, (ctx + n,), generator=g).tolist()
                r = Request(str(next(ids)), prompt, SamplingParams(), 0.0, ())
                self.kv.grow(r, ctx + n)
                chunks.append(ScheduledChunk(r, ctx, n))
                warm += [ScheduledChunk(r, i, min(BATCH, ctx - i)) for i in range(0, ctx, BATCH)]
            per_batch.append(chunks)
        for chunks in _packed(warm):   # fill the earlier contexts
            self.sequential.run(build_batch(chunks, PAGE, self.device))
        return [build_batch(chunks, PAGE, self.device, logits_for_all=True)
                for chunks in per_batch]

    def run(self, executor: Executor, batch, seed: int | None = None):
        """Logits of every token, with the workspace and this batch's KV slots poisoned first,
        so a launch that runs before what it needs reads NaN. `seed` picks the execution order
        (CPU race detector or simulated streams)."""
        for buf in workspace_buffers(executor.ws):
            buf.fill_(float("nan"))
        for cache in (self.kv.k, self.kv.v):
            cache.view(cache.shape[0], -1, *cache.shape[3:])[:, batch.slot_mapping] = math.nan
        if seed is not None and isinstance(executor.streams, SimulatedStreams):
            executor.streams.reseed(seed)
        return executor.run(batch, order_seed=seed)


def _packed(chunks: list[ScheduledChunk]):
    """Consecutive runs of chunks of at most BATCH tokens, no request twice in one run."""
    run, tokens = [], 0
    for c in chunks:
        if tokens + c.length > BATCH or any(r.request is c.request for r in run):
            yield run
            run, tokens = [], 0
        run.append(c)
        tokens += c.length
    if run:
        yield run


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return bool(torch.isfinite(a).all()) and torch.allclose(a, b, rtol=tol, atol=tol)
