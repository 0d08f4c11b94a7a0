"""Executor.run(batch): plan the iteration under the layout, then launch the plan."""

from __future__ import annotations

import random

import torch

from .batch import Batch
from .kv_cache import KVCache
from .layout import Layout, resolve_layout
from .planner import EMBED, LOGITS, Plan, Planner


class Executor:
    """Owns the fixed workspace; runs every launch of the plan on the model's ops.

    CPU backend: partitions are logical streams. Launches run in issue order, or, with
    `order_seed`, in a random order that respects only stream order and the plan's waits: a
    race detector, since a missing dependency then shows up as a wrong output.
    """

    def __init__(self, model, kv_cache: KVCache, max_batch_tokens: int, layout, device_spec):
        self.model = model
        self.kv = kv_cache
        self.ws = model.new_workspace(max_batch_tokens)
        op_names = tuple(op.name for op in model.layer_ops)
        self.layout: Layout = resolve_layout(layout, op_names, max_batch_tokens, device_spec,
                                             model.config.name)
        self.planner = Planner(model.layer_ops, model.config.num_layers, self.layout)

    @property
    def layout_name(self) -> str:
        return self.layout.name

    def run(self, batch: Batch, order_seed: int | None = None) -> torch.Tensor:
        """Returns [N, V] float32 logits of the batch's sampled tokens."""
        return self.run_plan(self.planner.plan(batch), batch, order_seed)

    @torch.inference_mode()
    def run_plan(self, plan: Plan, batch: Batch, order_seed: int | None = None) -> torch.Tensor:
        order = range(len(plan.launches)) if order_seed is None else \
            random_order(plan, random.Random(order_seed))
        logits = None
        m, ws, kv = self.model, self.ws, self.kv
        for i in order:
            launch = plan.launches[i]
            if launch.op == EMBED:
                m.embed(ws, batch, launch.t0, launch.t1)
            elif launch.op == LOGITS:
                logits = m.logits(ws, batch)
            else:
                m.run_op(launch.op, launch.layer, ws, batch, kv, launch.t0, launch.t1)
        return logits


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
