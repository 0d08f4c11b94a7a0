"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) as plain math over named ops.

A layer is the sequence `layer_ops(tp)`. Every op reads and writes rows [t0, t1) of fixed
workspace buffers (and, for kv_append/attention, the paged KV cache), so the planner can run any
op on any token range (a nano-batch) and the runner can keep all buffers at fixed addresses
(CUDA graphs).

Buffers (T = the dense batch size the workspace was sized for, D = hidden size; q, kv and I are
this rank's widths, the full ones without tensor parallelism):
  hidden  [T, D]            the residual stream
  x       [T, D]            normed input of the attention or MLP block
  qkv     [T, q + 2 kv]     projections; rope rotates q and k in place
  attn    [T, q]            attention output, heads concatenated
  gate_up [T, 2 I]          gate and up projections
  act     [T, I]            silu(gate) * up
  o_out   [T, D]            tp > 1: this rank's partial sum of o_proj, then (all-reduced) the sum
  mlp_out [T, D]            tp > 1: the same for down

Tensor parallelism (Megatron-style, over a torch.distributed group the model is given): each
rank holds its share of the heads and of the MLP's intermediate units (models/loader.py cuts
the weights). qkv and gate_up are column-parallel and need no communication; o_proj and down are
row-parallel, so each rank's product is a partial sum, and the network ops attn_allreduce and
mlp_allreduce sum it over the ranks and add it into the residual stream. They are ordinary ops
on token rows, so the planner can overlap one nano-batch's all-reduce with another's compute.

A prefill engine (Splitwise's prompt machine, nanorun.disagg) runs `layer_ops(tp, kv_send=True)`:
each layer gains the network op kv_send right after kv_append. It reads the layer's KV cache
rows [t0, t1) and hands them to the model's `kv_sink` (the transport), so the planner issues
layer l's transfer on the network partition while layer l + 1 computes, as it does collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import Family, ModelConfig, UnsupportedModelError
from .loader import Slot, shard_config, weight_shapes
from .op import (ATTENTION, ATTENTION_SIDE, EMBED, GEMM, LOGITS, MEMORY, NETWORK, OpSpec, OpWork,
                 Shapes)


# -- the ops of a layer, and what each costs (models/op.py says what the facts mean) -----------
# Per-token work on one rank as a function of the model's shapes (s: models.op.Shapes).
def norm_work(s: Shapes) -> OpWork:            # RMSNorm: read the residual row, write x
    return OpWork(flops_per_token=4.0 * s.d, bytes_per_token=2 * s.d * s.dtype_bytes)


def _rope_work(s: Shapes) -> OpWork:            # rotate q and k in place (their rotary dims)
    part = s.config.rotary_dim / s.config.head_dim
    return OpWork(flops_per_token=6.0 * (s.q + s.kv) * part,
                  bytes_per_token=2 * (s.q + s.kv) * part * s.dtype_bytes)


def _qk_norm_work(s: Shapes) -> OpWork:         # RMSNorm of each q and k head, in place
    return OpWork(flops_per_token=4.0 * (s.q + s.kv),
                  bytes_per_token=2 * (s.q + s.kv) * s.dtype_bytes)


def _kv_append_work(s: Shapes) -> OpWork:       # read k and v, write them to their pages
    return OpWork(flops_per_token=0.0, bytes_per_token=4 * s.kv * s.dtype_bytes)


def _attention_work(s: Shapes) -> OpWork:
    # q read and the output written per token; per token of context, QK^T and PV (2 FLOPs a
    # multiply-add) and that token's K and V read (the cost model shares a read among the
    # query rows of a prompt chunk's tile).
    b = s.dtype_bytes
    return OpWork(flops_per_token=0.0, bytes_per_token=2 * s.q * b,
                  context_flops=4.0 * s.heads_dim, context_bytes=2 * s.kv * b)


def _act_work(s: Shapes) -> OpWork:             # silu(gate) * up
    return OpWork(flops_per_token=4.0 * s.inter, bytes_per_token=3 * s.inter * s.dtype_bytes)


def all_reduce_work(s: Shapes, into_residual: bool = True) -> OpWork:
    # The all-reduce of d partial sums per token; bytes_per_token: the add of the reduced rows
    # into the residual (reading both, writing one), or (into_residual=False) the rows reduced
    # in place, read and written back; each rank sends and receives 2 (tp - 1) / tp of the
    # message.
    d, b, tp = s.d, s.dtype_bytes, s.tp
    return OpWork(flops_per_token=0.0, bytes_per_token=(3 if into_residual else 2) * d * b,
                  network_bytes_per_token=2.0 * (tp - 1) / tp * d * b,
                  message_bytes_per_token=d * b, collective="all_reduce")


def _qkv_work(s: Shapes) -> OpWork:
    return s.gemm(s.d, s.q + 2 * s.kv)


def _o_proj_work(s: Shapes) -> OpWork:          # reads and writes the residual too
    return s.gemm(s.q, s.d, extra_rows=s.d)


def _gate_up_work(s: Shapes) -> OpWork:
    return s.gemm(s.d, 2 * s.inter)


def _down_work(s: Shapes) -> OpWork:            # reads and writes the residual too
    return s.gemm(s.inter, s.d, extra_rows=s.d)


ATTN_NORM = OpSpec("attn_norm", MEMORY, ("hidden",), ("x",), cost=norm_work)
QKV = OpSpec("qkv", GEMM, ("x",), ("qkv",), cost=_qkv_work)
# Qwen3's (and Qwen3-MoE's) per-head RMSNorm of q and k, between qkv and rope.
QK_NORM = OpSpec("qk_norm", MEMORY, ("qkv",), ("qkv",), cost=_qk_norm_work)
# rope, the KV append and attention are the memory-bound side of a partitioned layout
# (NanoFlow's): the GEMMs of one nano-batch run beside the attention of another.
ROPE = OpSpec("rope", MEMORY, ("qkv",), ("qkv",), side=ATTENTION_SIDE, cost=_rope_work)
KV_APPEND = OpSpec("kv_append", MEMORY, ("qkv",), ("kv_cache",), side=ATTENTION_SIDE,
                   cost=_kv_append_work)
ATTENTION_OP = OpSpec("attention", ATTENTION, ("qkv", "kv_cache"), ("attn",),
                      side=ATTENTION_SIDE, history=("kv_cache",), cost=_attention_work)
O_PROJ = OpSpec("o_proj", GEMM, ("attn", "hidden"), ("hidden",), cost=_o_proj_work)
MLP_NORM = OpSpec("mlp_norm", MEMORY, ("hidden",), ("x",), cost=norm_work)
GATE_UP = OpSpec("gate_up", GEMM, ("x",), ("gate_up",), cost=_gate_up_work)
ACT = OpSpec("act", MEMORY, ("gate_up",), ("act",), cost=_act_work)
DOWN = OpSpec("down", GEMM, ("act", "hidden"), ("hidden",), cost=_down_work)

LAYER_OPS: tuple[OpSpec, ...] = (ATTN_NORM, QKV, ROPE, KV_APPEND, ATTENTION_OP, O_PROJ, MLP_NORM,
                                 GATE_UP, ACT, DOWN)

# The layer on tp > 1 ranks. qkv and gate_up are column-parallel (local heads and units); o_proj
# and down are row-parallel, writing partial sums that the all-reduces add into the residual.
# A collective must be issued in the same order on every rank, and every rank runs the same
# plan: the executor's launch order (issue order, or the race detector's order_seed order, which
# is a function of the plan and the seed only) is therefore the same everywhere, as long as
# every rank uses the same layout and the same order_seed.
O_PROJ_PARTIAL = OpSpec("o_proj", GEMM, ("attn",), ("o_out",), cost=_o_proj_work)
ATTN_ALLREDUCE = OpSpec("attn_allreduce", NETWORK, ("o_out", "hidden"), ("o_out", "hidden"),
                        cost=all_reduce_work)
DOWN_PARTIAL = OpSpec("down", GEMM, ("act",), ("mlp_out",), cost=_down_work)
MLP_ALLREDUCE = OpSpec("mlp_allreduce", NETWORK, ("mlp_out", "hidden"), ("mlp_out", "hidden"),
                       cost=all_reduce_work)

TP_LAYER_OPS: tuple[OpSpec, ...] = (ATTN_NORM, QKV, ROPE, KV_APPEND, ATTENTION_OP, O_PROJ_PARTIAL,
                                    ATTN_ALLREDUCE, MLP_NORM, GATE_UP, ACT, DOWN_PARTIAL,
                                    MLP_ALLREDUCE)


# The KV handoff of a prefill engine: it reads what kv_append wrote and writes no buffer, so
# the planner orders it after kv_append of its rows and nothing waits for it. No cost: the
# cost model does not price KV transfers.
KV_SEND = OpSpec("kv_send", NETWORK, ("kv_cache",), ())

# The iteration's frame (the planner's embed and logits launches).
EMBED_OP = OpSpec(EMBED, MEMORY, ("token_ids",), ("hidden",),
                  cost=lambda s: OpWork(flops_per_token=0.0,
                                        bytes_per_token=2 * s.d * s.dtype_bytes))
LOGITS_OP = OpSpec(LOGITS, GEMM, ("hidden",), ("logits",),       # per sampled token
                   cost=lambda s: s.gemm(s.d, s.config.vocab_size))


def layer_ops(tp: int, kv_send: bool = False) -> tuple[OpSpec, ...]:
    """The ops of one layer on `tp` tensor-parallel ranks: LAYER_OPS for one, else TP_LAYER_OPS
    (o_proj and down write partial sums that attn_allreduce and mlp_allreduce reduce over the
    ranks, rows [t0, t1) at a time, and add into `hidden`). kv_send: with KV_SEND right after
    kv_append (a prefill engine's layer)."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor parallel size must be a positive int, got {tp!r}")
    ops = LAYER_OPS if tp == 1 else TP_LAYER_OPS
    if not kv_send:
        return ops
    at = ops.index(KV_APPEND) + 1
    return ops[:at] + (KV_SEND,) + ops[at:]


@dataclass
class Workspace:
    """Fixed activation buffers for up to `max_tokens` tokens (see the module docstring)."""

    hidden: torch.Tensor
    x: torch.Tensor
    qkv: torch.Tensor
    attn: torch.Tensor
    gate_up: torch.Tensor
    act: torch.Tensor

    @property
    def max_tokens(self) -> int:
        return self.hidden.shape[0]


@dataclass
class TPWorkspace(Workspace):
    """The workspace of a tensor-parallel rank: plus the row-parallel GEMMs' partial sums."""

    o_out: torch.Tensor
    mlp_out: torch.Tensor


AttentionFn = Callable[..., None]
KVAppendFn = Callable[..., None]
KVSinkFn = Callable[..., None]      # (layer, batch, kv_cache, t0, t1), see LlamaModel


@dataclass(frozen=True)
class PointwiseOps:
    """The element-wise (memory-bound) math of a layer, swappable per device like attention:
    torch by default (`TORCH_POINTWISE`), nanorun._cuda's fused kernels on a GPU
    (nanorun.kernels.select_pointwise). Each writes into `out` (rope: into `qk`, in place).

    rms_norm(x, weight, eps, out)       out = RMSNorm(x) * weight
    rope(qk, positions, cos, sin)       rotate [n, heads, Dh] by position; cos/sin are the
                                        model's [max_len, Dh/2] fp32 tables
    silu_and_mul(gate_up, out)          out = silu(gate) * up, gate_up = [gate | up]
    """

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor], object]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    silu_and_mul: Callable[[torch.Tensor, torch.Tensor], object]


def _torch_rms_norm(x, weight, eps, out) -> None:
    out.copy_(rms_norm(x, weight, eps))


def _torch_rope(qk, positions, cos, sin) -> None:
    apply_rope(qk, cos[positions], sin[positions])


def _torch_silu_and_mul(gate_up, out) -> None:
    gate, up = gate_up.chunk(2, dim=-1)
    torch.mul(F.silu(gate), up, out=out)


TORCH_POINTWISE = PointwiseOps(_torch_rms_norm, _torch_rope, _torch_silu_and_mul)


class LlamaModel(Family):
    """Weights plus the math of each op. Knows nothing of scheduling, streams or splitting.

    `attention_fn` and `kv_append_fn` come from the backend (numba on CPU, CUDA kernels on GPU)
    and follow nanorun.ops.paged_attention's signatures.

    With `tp_group` (a torch.distributed process group of tp > 1 ranks) the model is this rank's
    shard: `weights` must be its shard (models.loader.shard_weights), `local` is the shard's
    config (local head and intermediate counts, which size the workspace and the KV cache) and
    `layer_ops` is TP_LAYER_OPS. `config` is always the whole model's.

    With `kv_sink` the layers gain the kv_send op (see the module docstring), whose launch on
    rows [t0, t1) of layer i calls kv_sink(i, batch, kv, t0, t1).
    """

    # Every op this family declares (models.registry reads them; tests/test_op_facts.py holds
    # them to their facts), and the costs of the iteration's frame.
    OPS: tuple[OpSpec, ...] = tuple(dict.fromkeys(LAYER_OPS + TP_LAYER_OPS + (KV_SEND,)))
    FRAME_OPS: tuple[OpSpec, ...] = (EMBED_OP, LOGITS_OP)

    @classmethod
    def layer_ops_for(cls, config: ModelConfig, tp: int = 1,
                      kv_send: bool = False) -> tuple[OpSpec, ...]:
        """The ops of one layer of `config`'s model on `tp` ranks, without building it."""
        return layer_ops(tp, kv_send)

    # -- the family's Hugging Face configs and checkpoints (models.config.Family) -----------
    # Llama 2/3, Mistral and Qwen2 share this decoder: they differ only in config (GQA, rope
    # scaling, sliding window, qkv bias).
    MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                   "Qwen2ForCausalLM": "qwen2"}

    @classmethod
    def read_hf(cls, d: dict[str, Any], arch: str) -> dict[str, Any]:
        # HF's Llama attention_bias also adds an o_proj bias, which nanorun's fused layout lacks.
        refuse_unsupported(d, arch, attention_bias=arch == "LlamaForCausalLM")
        if arch == "LlamaForCausalLM":
            window = None
        elif arch == "MistralForCausalLM":
            window = d.get("sliding_window")
        else:
            window = qwen_sliding_window(d)
        return {"qkv_bias": arch == "Qwen2ForCausalLM", "sliding_window": window}

    @classmethod
    def hf_fields(cls, config: ModelConfig) -> dict[str, Any]:
        if config.architecture == "LlamaForCausalLM":
            return {"attention_bias": False, "mlp_bias": False}
        if config.architecture == "MistralForCausalLM":
            return {"sliding_window": config.sliding_window}
        return qwen_window_hf(config)

    @classmethod
    def layer_shapes(cls, config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
        return mlp_shapes(config, p)

    @classmethod
    def layer_weight_names(cls, config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
        return {**mlp_norm_weight_name(config, hf, p), **attention_weight_names(config, hf, p),
                **mlp_weight_names(config, hf, p)}

    @classmethod
    def workspace_bytes_per_token(cls, local: ModelConfig, elt: int) -> int:
        """Bytes per token row of new_workspace's buffers for a rank of config `local`, in
        elements of `elt` bytes (what nanorun.memory estimates before allocating): hidden, x,
        qkv, attn, gate_up, act (a tp > 1 rank's partial sums are left out)."""
        d, q, kv = local.hidden_size, local.q_size, local.kv_size
        return elt * (2 * d + q + 2 * kv + q + 3 * local.intermediate_size)

    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        *,
        max_model_len: int,
        attention_fn: AttentionFn,
        kv_append_fn: KVAppendFn,
        tp_group: dist.ProcessGroup | None = None,
        pointwise: PointwiseOps = TORCH_POINTWISE,
        kv_sink: KVSinkFn | None = None,
    ) -> None:
        self.config = config
        self.tp_group = tp_group
        self.tp = 1 if tp_group is None else dist.get_world_size(tp_group)
        self.local = shard_config(config, self.tp)
        _check_weights(self.local, weights, self.tp)
        self.layer_ops = self.layer_ops_for(config, self.tp, kv_send=kv_sink is not None)
        self._kv_sink = kv_sink
        self.w = weights
        self.dtype = weights["embed"].dtype
        self.device = weights["embed"].device
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self._attention_kernel = attention_fn
        self._kv_append_kernel = kv_append_fn
        self.pointwise = pointwise
        self.cos, self.sin = self.rope_tables(max_model_len)
        self._ops = {op.name: getattr(self, f"_{op.name}") for op in self.layer_ops}
        if self.tp > 1:     # row-parallel: partial sums, for the all-reduces to add up
            partial = {"o_proj": self._o_proj_partial, "down": self._down_partial}
            self._ops.update({n: f for n, f in partial.items() if n in self._ops})

    def rope_tables(self, max_model_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [max_model_len, Dh/2] fp32 tables the rope op reads by position (a family
        with another rope, e.g. Phi-3's longrope, overrides this)."""
        return rope_tables(self.config, max_model_len, self.device)

    # -- the iteration's frame: embedding in, logits out ------------------------------------
    def new_workspace(self, max_tokens: int) -> Workspace:
        c = self.local
        empty = lambda *s: torch.empty(s, dtype=self.dtype, device=self.device)  # noqa: E731
        buffers = dict(
            hidden=empty(max_tokens, c.hidden_size),
            x=empty(max_tokens, c.hidden_size),
            qkv=empty(max_tokens, c.q_size + 2 * c.kv_size),
            attn=empty(max_tokens, c.q_size),
            gate_up=empty(max_tokens, 2 * c.intermediate_size),
            act=empty(max_tokens, c.intermediate_size),
        )
        if self.tp == 1:
            return Workspace(**buffers)
        return TPWorkspace(**buffers, o_out=empty(max_tokens, c.hidden_size),
                           mlp_out=empty(max_tokens, c.hidden_size))

    def embed(self, ws: Workspace, batch, t0: int, t1: int) -> None:
        torch.index_select(self.w["embed"], 0, batch.token_ids[t0:t1], out=ws.hidden[t0:t1])

    def logits(self, ws: Workspace, batch) -> torch.Tensor:
        """[N, V] float32 logits of the tokens at batch.sample_indices."""
        h = ws.hidden.index_select(0, batch.sample_indices)
        self.pointwise.rms_norm(h, self.w["norm"], self.config.rms_norm_eps, h)
        return F.linear(h, self.w["lm_head"]).float()

    def run_op(self, name: str, layer: int, ws: Workspace, batch, kv, t0: int, t1: int) -> None:
        """Run op `name` of `layer` on tokens [t0, t1) of the batch."""
        self._ops[name](layer, ws, batch, kv, t0, t1)

    # -- the ops ------------------------------------------------------------------------------
    def _attn_norm(self, i, ws, batch, kv, t0, t1):
        self.pointwise.rms_norm(ws.hidden[t0:t1], self.w[f"layers.{i}.attn_norm"],
                                self.config.rms_norm_eps, ws.x[t0:t1])

    def _qkv(self, i, ws, batch, kv, t0, t1):
        bias = self.w.get(f"layers.{i}.qkv_bias")
        weight = self.w[f"layers.{i}.qkv"].t()
        if bias is None:
            torch.mm(ws.x[t0:t1], weight, out=ws.qkv[t0:t1])
        else:
            torch.addmm(bias, ws.x[t0:t1], weight, out=ws.qkv[t0:t1])

    def _rope(self, i, ws, batch, kv, t0, t1):
        c = self.local
        qk = ws.qkv[t0:t1, : c.q_size + c.kv_size].unflatten(-1, (-1, c.head_dim))  # [n, Hq+Hkv, Dh]
        # partial rotary (Phi-4-mini): only the first rotary_dim dims of each head turn
        self.pointwise.rope(qk[..., : c.rotary_dim], batch.positions[t0:t1], self.cos, self.sin)

    def _qk_norm(self, i, ws, batch, kv, t0, t1):
        # Per head, over head_dim, before rope (Qwen3). Plain torch: the q and k heads are
        # strided views into qkv, which the fused RMSNorm kernel does not take.
        c, eps = self.local, self.config.rms_norm_eps
        q = ws.qkv[t0:t1, : c.q_size].unflatten(-1, (c.num_heads, c.head_dim))
        k = ws.qkv[t0:t1, c.q_size: c.q_size + c.kv_size].unflatten(-1, (c.num_kv_heads, c.head_dim))
        q.copy_(rms_norm(q, self.w[f"layers.{i}.q_norm"], eps))
        k.copy_(rms_norm(k, self.w[f"layers.{i}.k_norm"], eps))

    def _kv_append(self, i, ws, batch, kv, t0, t1):
        k, v = self._kv_views(ws, t0, t1)
        self._kv_append_kernel(k, v, kv.k[i], kv.v[i], batch.slot_mapping[t0:t1])

    def _kv_send(self, i, ws, batch, kv, t0, t1):
        self._kv_sink(i, batch, kv, t0, t1)

    def _attention(self, i, ws, batch, kv, t0, t1):
        c = self.local
        q = ws.qkv[t0:t1, : c.q_size].unflatten(-1, (c.num_heads, c.head_dim))
        out = ws.attn[t0:t1].unflatten(-1, (c.num_heads, c.head_dim))
        self._attention_kernel(
            q, kv.k[i], kv.v[i], batch.block_tables, batch.seq_ids[t0:t1],
            batch.positions[t0:t1], self.scale, out, sliding_window=c.sliding_window)

    def _o_proj(self, i, ws, batch, kv, t0, t1):
        ws.hidden[t0:t1].addmm_(ws.attn[t0:t1], self.w[f"layers.{i}.o_proj"].t())

    def _mlp_norm(self, i, ws, batch, kv, t0, t1):
        self.pointwise.rms_norm(ws.hidden[t0:t1], self.w[f"layers.{i}.mlp_norm"],
                                self.config.rms_norm_eps, ws.x[t0:t1])

    def _gate_up(self, i, ws, batch, kv, t0, t1):
        torch.mm(ws.x[t0:t1], self.w[f"layers.{i}.gate_up"].t(), out=ws.gate_up[t0:t1])

    def _act(self, i, ws, batch, kv, t0, t1):
        self.pointwise.silu_and_mul(ws.gate_up[t0:t1], ws.act[t0:t1])

    def _down(self, i, ws, batch, kv, t0, t1):
        ws.hidden[t0:t1].addmm_(ws.act[t0:t1], self.w[f"layers.{i}.down"].t())

    # -- tensor parallel: row-parallel GEMMs write partial sums, the network ops add them up ---
    def _o_proj_partial(self, i, ws, batch, kv, t0, t1):
        torch.mm(ws.attn[t0:t1], self.w[f"layers.{i}.o_proj"].t(), out=ws.o_out[t0:t1])

    def _attn_allreduce(self, i, ws, batch, kv, t0, t1):
        self._all_reduce_into_hidden(ws.o_out, ws, t0, t1)

    def _down_partial(self, i, ws, batch, kv, t0, t1):
        torch.mm(ws.act[t0:t1], self.w[f"layers.{i}.down"].t(), out=ws.mlp_out[t0:t1])

    def _mlp_allreduce(self, i, ws, batch, kv, t0, t1):
        self._all_reduce_into_hidden(ws.mlp_out, ws, t0, t1)

    def _all_reduce_into_hidden(self, partial: torch.Tensor, ws, t0: int, t1: int) -> None:
        # Rows [t0, t1) of a row-major buffer are contiguous, as collectives need. Every rank
        # gets the same sum (ring and tree all-reduce compute each element once and share it),
        # so the residual stream, and hence the logits, stay identical across ranks.
        rows = partial[t0:t1]
        dist.all_reduce(rows, group=self.tp_group)
        ws.hidden[t0:t1] += rows

    def _kv_views(self, ws: Workspace, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.local
        k = ws.qkv[t0:t1, c.q_size : c.q_size + c.kv_size]
        v = ws.qkv[t0:t1, c.q_size + c.kv_size :]
        shape = (c.num_kv_heads, c.head_dim)
        return k.unflatten(-1, shape), v.unflatten(-1, shape)


# -- Hugging Face readings and checkpoint names the Llama-like families share --------------------

def refuse_unsupported(d: dict[str, Any], arch: str, attention_bias: bool) -> None:
    """Refuse what a SwiGLU decoder of this file does not compute: another activation, MLP
    biases and, where `attention_bias` (the architecture's attention_bias means an o_proj bias
    too), attention_bias=true."""
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU MLP) is")
    if d.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported (MLP projections must be bias-free)")
    if attention_bias and d.get("attention_bias"):
        raise UnsupportedModelError(f"attention_bias=true is not supported for {arch}: it implies "
                                    "an o_proj bias, which nanorun does not implement")


def qwen_sliding_window(d: dict[str, Any]) -> int | None:
    """The Qwen families' window: layer i slides iff use_sliding_window and i >=
    max_window_layers (or per layer_types); on every layer or none, else refused."""
    window = d.get("sliding_window")
    if window is None or not d.get("use_sliding_window"):
        return None
    n = d["num_hidden_layers"]
    types = d.get("layer_types")
    if types is None:
        first = d.get("max_window_layers", n)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    if all(t == "full_attention" for t in types):
        return None
    if all(t == "sliding_attention" for t in types):
        return window
    raise UnsupportedModelError("sliding window on only some layers (max_window_layers / layer_types) "
                                "is not supported; use it on all layers or none")


def qwen_window_hf(config: ModelConfig) -> dict[str, Any]:
    """The Qwen families' window keys: active only with use_sliding_window, from layer
    max_window_layers on."""
    return {"use_sliding_window": config.sliding_window is not None,
            "sliding_window": config.sliding_window,
            "max_window_layers": 0 if config.sliding_window is not None else config.num_layers}


def mlp_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """The dense MLP's fused tensors of layer prefix `p`."""
    d, i = config.hidden_size, config.intermediate_size
    return {p + "gate_up": (2 * i, d), p + "down": (d, i)}


def qk_norm_shapes(config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """The per-head q and k norm weights of layer prefix `p`."""
    return {p + "q_norm": (config.head_dim,), p + "k_norm": (config.head_dim,)}


def mlp_norm_weight_name(config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
    """HF's post_attention_layernorm: the MLP's input norm in a Llama-like layer."""
    return {hf + "post_attention_layernorm.weight": Slot(p + "mlp_norm", 0, (config.hidden_size,))}


def attention_weight_names(config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
    """q/k/v_proj (rows of qkv, with their biases where config.qkv_bias) and o_proj."""
    d, q, kv = config.hidden_size, config.q_size, config.kv_size
    names = {}
    for proj, start, rows in (("q", 0, q), ("k", q, kv), ("v", q + kv, kv)):
        names[f"{hf}self_attn.{proj}_proj.weight"] = Slot(p + "qkv", start, (rows, d))
        if config.qkv_bias:
            names[f"{hf}self_attn.{proj}_proj.bias"] = Slot(p + "qkv_bias", start, (rows,))
    names[hf + "self_attn.o_proj.weight"] = Slot(p + "o_proj", 0, (d, q))
    return names


def qk_norm_weight_names(config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
    """self_attn.q_norm / k_norm."""
    hd = (config.head_dim,)
    return {hf + "self_attn.q_norm.weight": Slot(p + "q_norm", 0, hd),
            hf + "self_attn.k_norm.weight": Slot(p + "k_norm", 0, hd)}


def mlp_weight_names(config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
    """mlp.gate_proj / up_proj (rows of gate_up) and down_proj."""
    d, i = config.hidden_size, config.intermediate_size
    return {hf + "mlp.gate_proj.weight": Slot(p + "gate_up", 0, (i, d)),
            hf + "mlp.up_proj.weight": Slot(p + "gate_up", i, (i, d)),
            hf + "mlp.down_proj.weight": Slot(p + "down", 0, (d, i))}


def _check_weights(local: ModelConfig, weights: dict[str, torch.Tensor], tp: int) -> None:
    expected = weight_shapes(local)
    for name, shape in expected.items():
        got = weights.get(name)
        if got is None or tuple(got.shape) != shape:
            found = "missing" if got is None else f"of shape {tuple(got.shape)}"
            hint = (f"; with {tp} tensor-parallel ranks pass this rank's shard "
                    f"(models.loader.shard_weights)" if tp > 1 else "")
            raise ValueError(f"weight {name!r} is {found}, expected {shape}{hint}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32 and cast back, as Hugging Face's Llama does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate [n, heads, Dh] in place (the "rotate half" convention); cos/sin are [n, Dh/2]."""
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half], qk[..., half:]
    cos = cos.unsqueeze(1).to(qk.dtype)
    sin = sin.unsqueeze(1).to(qk.dtype)
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    x1.copy_(r1)
    x2.copy_(r2)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """[rotary_dim/2] fp32 inverse frequencies, with Llama 3 or linear scaling applied."""
    dim = config.rotary_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = config.rope_scaling
    if rs is None:
        return inv_freq
    if rs.rope_type == "linear":
        return inv_freq / rs.factor
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    blended = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_tables(config: ModelConfig, max_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [max_len, rotary_dim/2] in fp32, indexed by absolute position."""
    inv_freq = rope_inv_freq(config)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return freqs.cos().to(device), freqs.sin().to(device)
