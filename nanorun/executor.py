"""Executor.run(batch): plan the iteration under the layout, then launch the plan.

Three ways to launch, one planner and one op path (model.run_op on the fixed workspace):
  - CPU, no streams: in issue order, or, with `order_seed`, in a random order that respects
    only stream order and the plan's waits: a race detector.
  - streams (the CUDA backend, or SimulatedStreams in tests): backends.issue() puts each launch
    on its partition's stream with the events it needs; the logits follow on the caller's
    stream. On CUDA, whole iterations are captured as graphs (backends.graphs) when the kernels
    allow it.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Callable

import torch

from .backends.cuda import CudaStreams
from .backends.graphs import IterationGraphs
from .backends.streams import MAIN, Streams, issue
from .batch import Batch
from .kv_cache import KVCache
from .layout import Layout, resolve_layout
from .planner import LOGITS, Launch, Plan, Planner

GRAPHS_ENV = "NANORUN_CUDA_GRAPHS"
logger = logging.getLogger("nanorun")


class Executor:
    """Owns the fixed workspace; runs every launch of the plan on the model's ops.

    kernels: the (attention_fn, kv_append_fn) the model was built with; CUDA graphs need both
        to declare `graph_safe = True` (no host sync, metadata read from device memory).
    streams: where launches run. None: the CPU path on a CPU model, CudaStreams (a stream per
        partition, green contexts where possible) on a CUDA model.
    graphs: capture iterations as graphs where the streams and kernels allow it (and
        NANORUN_CUDA_GRAPHS is not 0); False never does.
    """

    def __init__(self, model, kv_cache: KVCache, max_batch_tokens: int, layout, device_spec,
                 *, kernels=(), streams: Streams | None = None, graphs: bool = True):
        self.model = model
        self.kv = kv_cache
        self.ws = model.new_workspace(max_batch_tokens)
        op_names = tuple(op.name for op in model.layer_ops)
        self.layout: Layout = resolve_layout(layout, op_names, max_batch_tokens, device_spec,
                                             model.config.name)
        self.planner = Planner(model.layer_ops, model.config.num_layers, self.layout)
        if streams is None and model.device.type == "cuda":
            streams = CudaStreams(self.layout, model.device, _network_partitions(model,
                                                                                 self.layout))
        self.streams = streams
        self.graphs = self._graphs(graphs, kernels, max_batch_tokens)

    @property
    def layout_name(self) -> str:
        return self.layout.name

    @property
    def partition_sms(self) -> dict[str, int | None]:
        """SMs each partition's stream can run on, as granted (None: not on a GPU)."""
        if isinstance(self.streams, CudaStreams):
            return self.streams.granted
        return {p.name: None for p in self.layout.partitions}

    @property
    def graphs_active(self) -> bool:
        return self.graphs is not None and self.graphs.failure is None

    @torch.inference_mode()
    def run(self, batch: Batch, order_seed: int | None = None) -> torch.Tensor:
        """Returns [N, V] float32 logits of the batch's sampled tokens."""
        if not self.graphs_active:
            return self.run_plan(self.planner.plan(batch), batch, order_seed)
        self._read_pending(batch)
        self.graphs.enqueue(batch)
        return self._logits_on_main(batch)

    @torch.inference_mode()
    def run_plan(self, plan: Plan, batch: Batch, order_seed: int | None = None) -> torch.Tensor:
        """Runs `plan` eagerly (never as a graph). order_seed applies to the CPU path."""
        launch = self._launcher(batch)
        self._read_pending(batch)
        if self.streams is not None:
            issue(plan, self.streams, launch)
            return self._logits_on_main(batch)
        launches = plan.launches if order_seed is None else \
            [plan.launches[i] for i in random_order(plan, random.Random(order_seed))]
        logits = None
        for each in launches:
            if each.op == LOGITS:
                logits = self._logits(batch)
            else:
                launch(each)
        return logits

    def _launcher(self, batch: Batch) -> Callable[[Launch], None]:
        """One op launch on `batch`, with what every launch of the iteration shares bound once
        (the eager path runs hundreds of these an iteration, on the host's critical path)."""
        run_op, embed, ws, kv = self.model.run_op, self.model.embed, self.ws, self.kv

        def launch(each: Launch) -> None:
            if each.layer >= 0:
                run_op(each.op, each.layer, ws, batch, kv, each.t0, each.t1)
            else:       # the embedding: the logits never come here (see run_plan, issue)
                embed(ws, batch, each.t0, each.t1)
        return launch

    def _read_pending(self, batch: Batch) -> None:
        """The tokens still on the device (async scheduling) into the batch, on MAIN: the
        streams fork from MAIN after it (issue()), the graphs' copy-in follows it there."""
        if batch.pending is None:
            return
        if self.streams is None:
            batch.read_pending()
        else:
            self.streams.enqueue(MAIN, batch.read_pending)

    def _logits(self, batch: Batch) -> torch.Tensor:
        return self.model.logits(self.ws, batch)

    def _logits_on_main(self, batch: Batch) -> torch.Tensor:
        """After the iteration's join: the logits, from the caller's batch, on its stream."""
        out: dict[str, torch.Tensor] = {}
        self.streams.enqueue(MAIN, lambda: out.setdefault("logits", self._logits(batch)))
        self.streams.flush()
        return out["logits"]

    def _graphs(self, wanted: bool, kernels, max_batch_tokens: int) -> IterationGraphs | None:
        if self.streams is None or not wanted:
            return None
        why_not = _why_no_graphs(kernels, self.model)
        if why_not:
            logger.warning("nanorun: CUDA graphs off (%s); iterations run eagerly", why_not)
            return None
        return IterationGraphs(self.streams, self.planner, max_batch_tokens, self.model.device,
                               self._launcher)


def _why_no_graphs(kernels, model) -> str | None:
    if os.environ.get(GRAPHS_ENV) == "0":
        return f"{GRAPHS_ENV}=0"
    if not kernels:
        return "no kernels were named to check for graph safety"
    unsafe = [_kernel_name(fn) for fn in kernels if not getattr(fn, "graph_safe", False)]
    if unsafe:
        return (f"{', '.join(unsafe)} not marked graph_safe: a kernel that syncs with the host "
                f"or reads metadata on it cannot be replayed")
    # A graph-safe kernel with `supports` is so only for the inputs it supports; for others it
    # falls back to a path that syncs (and refuses to be captured).
    head_dim = model.config.head_dim
    fallback = [_kernel_name(fn) for fn in kernels
                if hasattr(fn, "supports") and not fn.supports(model.dtype, head_dim)]
    if fallback:
        return (f"{', '.join(fallback)} cannot run {model.dtype} with head dim {head_dim} and "
                f"falls back to a path that syncs with the host")
    return None


def _kernel_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _network_partitions(model, layout: Layout) -> frozenset[str]:
    """Partitions every op of which is a collective: they keep an ordinary stream."""
    kinds = {op.name: op.kind for op in model.layer_ops}
    by_partition: dict[str, set[str]] = {}
    for op, ol in layout.ops:
        by_partition.setdefault(ol.partition, set()).add(kinds[op])
    return frozenset(p for p, k in by_partition.items() if k == {"network"})


def random_order(plan: Plan, rng: random.Random) -> list[int]:
    """A random execution order in which each stream runs its launches in issue order and
    every launch runs after the launches it waits for."""
    queues: list[list[int]] = [[] for _ in range(plan.num_streams)]
    for i, launch in enumerate(plan.launches):
        queues[launch.stream].append(i)
    heads = [0] * plan.num_streams
    done: set[int] = set()
    order: list[int] = []
    while len(order) < len(plan.launches):
        ready = [s for s in range(plan.num_streams) if heads[s] < len(queues[s])
                 and all(w in done for w in plan.launches[queues[s][heads[s]]].waits)]
        if not ready:
            raise RuntimeError("plan deadlocks: a launch waits for one issued after it")
        s = rng.choice(ready)
        i = queues[s][heads[s]]
        heads[s] += 1
        done.add(i)
        order.append(i)
    return order
