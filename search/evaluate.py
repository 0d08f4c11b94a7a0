"""Predict an iteration: the engine's planner makes the Plan, the cost model prices its launches,
the simulator runs them. Also the public `estimate_iteration`."""

from __future__ import annotations

from dataclasses import dataclass

from nanorun.layout import Layout, resolve_layout
from nanorun.models import model_layer_ops
from nanorun.planner import Planner

from .costmodel import CostModel
from nanorun.device import DeviceSpec, get_device
from .simulate import Schedule, launch_costs, simulate
from .workload import IterationMix


@dataclass
class Predictor:
    """Predicts iterations of one model on one device at one tp, for any layout and mix."""

    cost: CostModel

    def __post_init__(self) -> None:
        # The model's own ops (dense or mixture of experts); network ops appear when tp > 1.
        self.ops = model_layer_ops(self.cost.config, self.cost.tp)
        self.op_names = tuple(op.name for op in self.ops)

    @property
    def device(self) -> DeviceSpec:
        return self.cost.device

    def resolve(self, layout, batch_tokens: int) -> Layout:
        return resolve_layout(layout, self.ops, batch_tokens, self.device,
                              self.cost.config.name, tp=self.cost.tp)

    def schedule(self, layout: Layout, mix: IterationMix) -> Schedule:
        batch = mix.batch()
        plan = Planner(self.ops, self.cost.config.num_layers, layout).plan(batch)
        costs = launch_costs(plan, batch, layout, self.cost)
        return simulate(plan, costs, self.cost.params.interference)

    def iteration_seconds(self, layout: Layout, mix: IterationMix) -> float:
        return self.schedule(layout, mix).makespan


def estimate_iteration(model, gpu, *, tp: int = 1, prefill_tokens: int = 0,
                       decode_seqs: int = 0, decode_context: int = 0,
                       layout="sequential", profile=None) -> float:
    """Predicted seconds of one iteration of `model` (a preset name, model directory or
    ModelConfig) on `gpu` (a name such as "h100", or a DeviceSpec): `decode_seqs` decode tokens
    each attending to `decode_context` tokens, plus one prompt chunk of `prefill_tokens` tokens
    from the start of its prompt, under `layout` ("sequential", "overlap", a Layout, or a layout
    JSON path) for a dense batch of exactly these tokens. `profile`: a measured profile (path or
    search.profile.Profile) to calibrate the cost model with."""
    from nanorun.models import ModelConfig, resolve_model

    from .profile import Profile

    config = model if isinstance(model, ModelConfig) else resolve_model(model)[0]
    device = gpu if isinstance(gpu, DeviceSpec) else get_device(gpu)
    if prefill_tokens < 0 or decode_seqs < 0 or prefill_tokens + decode_seqs == 0:
        raise ValueError("give a batch: prefill_tokens and/or decode_seqs must be positive")
    if decode_seqs and decode_context < 1:
        raise ValueError("decode_context (tokens each decode token attends to, itself "
                         "included) must be at least 1 when decode_seqs > 0")
    if profile is not None and not isinstance(profile, Profile):
        profile = Profile.load(profile)
    predictor = Predictor(CostModel(config, device, tp=tp, profile=profile))
    mix = IterationMix((decode_context,) * decode_seqs,
                       ((0, prefill_tokens),) if prefill_tokens else ())
    return predictor.iteration_seconds(predictor.resolve(layout, mix.num_tokens), mix)
