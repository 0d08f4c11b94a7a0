"""Mixture-of-experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE) as plain math over named ops.

The attention half of a layer is LlamaModel's (plus Qwen3's per-head q/k RMSNorm, `qk_norm`,
before rope, which models.llama declares for the dense Qwen3 too). The MLP is replaced by a
mixture of experts, split into ops that each work on any token rows [t0, t1), so the planner
nano-batches it like any other layer and the race detector applies unchanged:

  moe_norm        memory   hidden -> x                   RMSNorm (the weight HF calls
                                                         post_attention_layernorm)
  router          gemm     x -> router_logits [T, E]     x @ router^T
  topk            memory   router_logits -> topk         softmax in fp32, the top k, renormalised
                                                         (Mixtral; Qwen when norm_topk_prob)
  experts         gemm     x, topk -> expert_out         the routed experts' SwiGLU, grouped
  shared_gate_up  gemm     x -> shared_gate_up           Qwen2-MoE's shared expert, as the
  shared_act      memory   shared_gate_up -> shared_act  dense MLP's gate_up / act / down
  shared_down     gemm     shared_act -> shared_out
  combine         memory   expert_out, topk, (x, shared_out), hidden -> hidden
                           the routing-weighted sum of each token's k expert outputs, plus the
                           sigmoid-gated shared expert, added into the residual stream

Buffers beyond the dense ones (T rows as in models.llama; k = num_experts_per_tok):
  router_logits [T, E]       model dtype, as HF computes them
  topk          [T, 2k]      fp32: the k routing weights, then the k expert ids (exact as floats)
  expert_out    [T * k, D]   row t*k + j: token t's j-th expert's output, unweighted

The permutation is per row: `topk` holds each token's expert ids, and `experts` sorts the
(token, expert) pairs of its own rows by expert, runs the experts as one grouped GEMM over those
sorted rows (torch.nn.functional.grouped_mm where the build runs it for the dtype, else a loop
over experts) and scatters the results back to row order in `expert_out`. A nano-batch's expert
GEMM therefore sees only its rows, and `topk`, `experts` and `combine` may each be split
differently. Why grouped_mm and where it falls back: docs/architecture.md.

Tensor parallelism (vLLM's default for MoE): every rank holds a slice of every expert's
intermediate units (and of the shared expert's), the router is replicated, so each rank's
`combine` is a partial sum, written to `moe_out` and summed over the ranks by the network op
`moe_allreduce`, which adds it into `hidden`, like the dense model's mlp_allreduce.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import ModelConfig, ModelConfigError, UnsupportedModelError
from .llama import (ATTENTION_OP, ATTN_ALLREDUCE, ATTN_NORM, KV_APPEND, KV_SEND, O_PROJ,
                    O_PROJ_PARTIAL, QK_NORM, QKV, ROPE, TORCH_POINTWISE, LlamaModel,
                    PointwiseOps, all_reduce_work, attention_weight_names, mlp_norm_weight_name,
                    norm_work, qk_norm_shapes, qk_norm_weight_names, qwen_sliding_window,
                    qwen_window_hf, refuse_unsupported)
from .loader import Slot
from .op import GEMM, MEMORY, NETWORK, OpSpec, OpWork, Shapes

# dtypes torch's grouped_mm runs, per device type (torch 2.13: CUDA bf16 on SM >= 80 only).
GROUPED_MM_DTYPES = {"cpu": (torch.float32, torch.bfloat16, torch.float16),
                     "cuda": (torch.bfloat16,)}


# -- the ops of a layer, and what each costs (models/op.py says what the facts mean) -----------
def _router_work(s: Shapes) -> OpWork:          # replicated on every rank: E outputs
    return s.gemm(s.d, s.config.num_experts)


def _topk_work(s: Shapes) -> OpWork:
    # softmax + top-k over the E logits; k fp32 weights and k ids written
    e, k = s.config.num_experts, s.config.num_experts_per_tok
    return OpWork(flops_per_token=5.0 * e, bytes_per_token=e * s.dtype_bytes + 2 * k * 4)


def _experts_work(s: Shapes) -> OpWork:
    # The grouped expert GEMM (search/costmodel.py prices it on each expert's share of the
    # tokens). Its own activation traffic, per assignment: the gathered input row, the gate/up
    # outputs written and read back, the activation, and the output row scattered.
    d, b, inter = s.d, s.dtype_bytes, s.inter
    e, k = s.config.num_experts, s.config.num_experts_per_tok
    per_assignment = (d + 2 * inter + 2 * inter + inter + d) * b
    return OpWork(GEMM, 2.0 * k * 3 * d * inter, k * per_assignment + 8 * k,
                  e * 3 * d * inter * b, k=d, n=2 * inter, experts=e, top_k=k,
                  expert_n=(2 * inter, d, d, inter))


def _shared_gate_up_work(s: Shapes) -> OpWork:
    return s.gemm(s.d, 2 * s.shared)


def _shared_act_work(s: Shapes) -> OpWork:
    return OpWork(flops_per_token=4.0 * s.shared, bytes_per_token=3 * s.shared * s.dtype_bytes)


def _shared_down_work(s: Shapes) -> OpWork:
    return s.gemm(s.shared, s.d)


def _combine_work(s: Shapes) -> OpWork:
    # k expert rows and weights read, the residual read and written; with a shared expert,
    # plus its output and x for the sigmoid gate
    d, b, k = s.d, s.dtype_bytes, s.config.num_experts_per_tok
    flops, nbytes = 2.0 * k * d, (k * d + 2 * d) * b + 4 * k
    if s.shared:
        flops, nbytes = flops + 4.0 * d, nbytes + 2 * d * b
    return OpWork(flops_per_token=flops, bytes_per_token=nbytes)


MOE_NORM = OpSpec("moe_norm", MEMORY, ("hidden",), ("x",), cost=norm_work)
ROUTER = OpSpec("router", GEMM, ("x",), ("router_logits",), cost=_router_work)
TOPK = OpSpec("topk", MEMORY, ("router_logits",), ("topk",), cost=_topk_work)
# What the expert GEMM does and costs depends on the routing in `topk`, not only its shape.
EXPERTS = OpSpec("experts", GEMM, ("x", "topk"), ("expert_out",), indexed_by=("topk",),
                 cost=_experts_work)
SHARED_GATE_UP = OpSpec("shared_gate_up", GEMM, ("x",), ("shared_gate_up",),
                        cost=_shared_gate_up_work)
SHARED_ACT = OpSpec("shared_act", MEMORY, ("shared_gate_up",), ("shared_act",),
                    cost=_shared_act_work)
SHARED_DOWN = OpSpec("shared_down", GEMM, ("shared_act",), ("shared_out",),
                     cost=_shared_down_work)
MOE_ALLREDUCE = OpSpec("moe_allreduce", NETWORK, ("moe_out", "hidden"), ("moe_out", "hidden"),
                       cost=all_reduce_work)


def _combine(shared: bool, par: bool) -> OpSpec:
    """combine with (Qwen2-MoE) or without a shared expert; on tp > 1 ranks a partial sum into
    moe_out, which moe_allreduce adds into hidden, else added into hidden directly."""
    reads = ("expert_out", "topk") + (("shared_out", "x") if shared else ())
    if par:
        return OpSpec("combine", MEMORY, reads, ("moe_out",), cost=_combine_work)
    return OpSpec("combine", MEMORY, reads + ("hidden",), ("hidden",), cost=_combine_work)


COMBINES = {(shared, par): _combine(shared, par) for shared in (False, True)
            for par in (False, True)}


def moe_layer_ops(config: ModelConfig, tp: int, kv_send: bool = False) -> tuple[OpSpec, ...]:
    """The ops of one mixture-of-experts layer on `tp` tensor-parallel ranks (module docstring);
    with kv_send, a prefill engine's KV_SEND right after kv_append, as in models.llama."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor parallel size must be a positive int, got {tp!r}")
    par = tp > 1
    shared = bool(config.shared_expert_intermediate_size)
    ops = [ATTN_NORM, QKV] + [QK_NORM] * bool(config.qk_norm) + [ROPE, KV_APPEND]
    ops += [KV_SEND] * kv_send + [ATTENTION_OP]
    ops += [O_PROJ_PARTIAL, ATTN_ALLREDUCE] if par else [O_PROJ]
    ops += [MOE_NORM, ROUTER, TOPK, EXPERTS]
    ops += [SHARED_GATE_UP, SHARED_ACT, SHARED_DOWN] * shared
    ops += [COMBINES[shared, par]] + [MOE_ALLREDUCE] * par
    return tuple(ops)


@dataclass
class MoEWorkspace:
    """Fixed activation buffers of a mixture-of-experts model (module docstring). The shared
    expert's buffers have no columns when the model has none; o_out and moe_out (tp > 1 only)
    likewise."""

    hidden: torch.Tensor
    x: torch.Tensor
    qkv: torch.Tensor
    attn: torch.Tensor
    router_logits: torch.Tensor
    topk: torch.Tensor
    expert_out: torch.Tensor
    shared_gate_up: torch.Tensor
    shared_act: torch.Tensor
    shared_out: torch.Tensor
    o_out: torch.Tensor
    moe_out: torch.Tensor

    @property
    def max_tokens(self) -> int:
        return self.hidden.shape[0]


# HF names the expert count differently per family.
_NUM_EXPERTS_KEY = {"MixtralForCausalLM": "num_local_experts", "Qwen2MoeForCausalLM": "num_experts",
                    "Qwen3MoeForCausalLM": "num_experts"}


def _read_experts(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """The mixture-of-experts fields of ModelConfig from a HF config. Only models whose every
    layer is sparse are supported: Qwen's decoder_sparse_step and mlp_only_layers (dense MLP
    layers between the sparse ones) are refused."""
    if d.get("decoder_sparse_step", 1) != 1:
        raise UnsupportedModelError(f"decoder_sparse_step={d['decoder_sparse_step']} (dense MLP "
                                    "layers between sparse ones) is not supported; only 1 is")
    if d.get("mlp_only_layers"):
        raise UnsupportedModelError(f"mlp_only_layers={d['mlp_only_layers']} (dense MLP layers) "
                                    "is not supported; every layer must be a mixture of experts")
    # Published configs use _NUM_EXPERTS_KEY; transformers 5 saves Qwen3-MoE's as num_local_experts.
    experts = d.get(_NUM_EXPERTS_KEY[arch]) or d.get("num_local_experts") or d.get("num_experts")
    if not experts:
        raise ModelConfigError(f"{arch} config lacks {_NUM_EXPERTS_KEY[arch]!r} (the expert count)")
    out: dict[str, Any] = {"num_experts": experts,
                           "num_experts_per_tok": d["num_experts_per_tok"]}
    if arch == "MixtralForCausalLM":
        return out      # Mixtral's intermediate_size is its experts'; top-k always renormalised
    out.update(intermediate_size=d["moe_intermediate_size"],
               norm_topk_prob=bool(d.get("norm_topk_prob", False)),
               qk_norm=arch == "Qwen3MoeForCausalLM")
    if arch == "Qwen2MoeForCausalLM":
        out["shared_expert_intermediate_size"] = d["shared_expert_intermediate_size"]
        if not out["shared_expert_intermediate_size"]:
            raise UnsupportedModelError("Qwen2-MoE without a shared expert "
                                        "(shared_expert_intermediate_size=0) is not supported")
    return out


def expert_weight_names(config: ModelConfig, hf: str) -> tuple[str, tuple[str, str, str]]:
    """(the checkpoint's MoE block prefix of layer prefix `hf`, its experts' gate, up and down
    tensor names): Mixtral's block_sparse_moe. and w1, w3, w2; Qwen's mlp. and *_proj."""
    if config.architecture == "MixtralForCausalLM":
        return hf + "block_sparse_moe.", ("w1", "w3", "w2")
    return hf + "mlp.", ("gate_proj", "up_proj", "down_proj")


class MoEModel(LlamaModel):
    """LlamaModel with its MLP replaced by a mixture of experts; same constructor."""

    OPS: tuple[OpSpec, ...] = tuple(dict.fromkeys(
        (ATTN_NORM, QKV, QK_NORM, ROPE, KV_APPEND, KV_SEND, ATTENTION_OP, O_PROJ, O_PROJ_PARTIAL,
         ATTN_ALLREDUCE, MOE_NORM, ROUTER, TOPK, EXPERTS, SHARED_GATE_UP, SHARED_ACT, SHARED_DOWN)
        + tuple(COMBINES.values()) + (MOE_ALLREDUCE,)))

    @classmethod
    def layer_ops_for(cls, config: ModelConfig, tp: int = 1,
                      kv_send: bool = False) -> tuple[OpSpec, ...]:
        return moe_layer_ops(config, tp, kv_send)

    # -- the family's Hugging Face configs and checkpoints (models.config.Family) -----------
    # The three share this decoder: router, top-k, grouped experts; Qwen2-MoE's shared expert
    # and Qwen3-MoE's QK norm are config switches.
    MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                   "Qwen3MoeForCausalLM": "qwen3_moe"}
    FEATURES = frozenset({"num_experts", "shared_expert_intermediate_size", "qk_norm"})

    @classmethod
    def read_hf(cls, d: dict[str, Any], arch: str) -> dict[str, Any]:
        refuse_unsupported(d, arch, attention_bias=arch == "Qwen3MoeForCausalLM")
        mixtral = arch == "MixtralForCausalLM"
        return {**_read_experts(d, arch),
                "qkv_bias": arch == "Qwen2MoeForCausalLM" and bool(d.get("qkv_bias", True)),
                "sliding_window": d.get("sliding_window") if mixtral else qwen_sliding_window(d)}

    @classmethod
    def hf_fields(cls, config: ModelConfig) -> dict[str, Any]:
        arch = config.architecture
        d: dict[str, Any] = {_NUM_EXPERTS_KEY[arch]: config.num_experts,
                             "num_experts_per_tok": config.num_experts_per_tok}
        if arch == "MixtralForCausalLM":
            return {"sliding_window": config.sliding_window, **d}
        d.update(qwen_window_hf(config), moe_intermediate_size=config.intermediate_size,
                 norm_topk_prob=config.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
        if arch == "Qwen2MoeForCausalLM":
            d.update(shared_expert_intermediate_size=config.shared_expert_intermediate_size,
                     qkv_bias=config.qkv_bias)
        else:
            d["attention_bias"] = False
        return d

    @classmethod
    def layer_shapes(cls, config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
        """The router, every expert's weights stacked (models/loader.py's docstring) and the
        optional shared expert, after Qwen3-MoE's q/k norms."""
        d, i, e, s = (config.hidden_size, config.intermediate_size, config.num_experts,
                      config.shared_expert_intermediate_size)
        shapes = qk_norm_shapes(config, p) if config.qk_norm else {}
        shapes[p + "router"] = (e, d)
        shapes[p + "expert_gate_up"] = (e * 2 * i, d)
        shapes[p + "expert_down"] = (e * d, i)
        if s:
            shapes[p + "shared_gate_up"] = (2 * s, d)
            shapes[p + "shared_down"] = (d, s)
            shapes[p + "shared_gate"] = (1, d)
        return shapes

    @classmethod
    def layer_weight_names(cls, config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
        """The published per-expert names (what transformers 5 also saves): Mixtral's
        block_sparse_moe.experts.E.w1/w3/w2 (gate/up/down), Qwen's
        mlp.experts.E.gate/up/down_proj; each a block of rows of the stacked tensor."""
        d, i = config.hidden_size, config.intermediate_size
        plan = {**mlp_norm_weight_name(config, hf, p), **attention_weight_names(config, hf, p)}
        if config.qk_norm:
            plan.update(qk_norm_weight_names(config, hf, p))
        block, names = expert_weight_names(config, hf)
        plan[block + "gate.weight"] = Slot(p + "router", 0, (config.num_experts, d))
        for e in range(config.num_experts):
            gate, up, down = (f"{block}experts.{e}.{n}.weight" for n in names)
            plan[gate] = Slot(p + "expert_gate_up", e * 2 * i, (i, d))
            plan[up] = Slot(p + "expert_gate_up", e * 2 * i + i, (i, d))
            plan[down] = Slot(p + "expert_down", e * d, (d, i))
        s = config.shared_expert_intermediate_size
        if s:
            shared = block + "shared_expert."
            plan[shared + "gate_proj.weight"] = Slot(p + "shared_gate_up", 0, (s, d))
            plan[shared + "up_proj.weight"] = Slot(p + "shared_gate_up", s, (s, d))
            plan[shared + "down_proj.weight"] = Slot(p + "shared_down", 0, (d, s))
            plan[block + "shared_expert_gate.weight"] = Slot(p + "shared_gate", 0, (1, d))
        return plan

    @classmethod
    def workspace_bytes_per_token(cls, local: ModelConfig, elt: int) -> int:
        """As LlamaModel's, for MoEWorkspace: the attention half's buffers, then router logits,
        fp32 top-k, k expert rows and the shared expert's (o_out and moe_out left out)."""
        d, q, kv = local.hidden_size, local.q_size, local.kv_size
        k, shared = local.num_experts_per_tok, local.shared_expert_intermediate_size
        mlp = local.num_experts + 8 * k // elt + k * d + 3 * shared + (d if shared else 0)
        return elt * (2 * d + q + 2 * kv + q + mlp)

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], *,
                 max_model_len: int, attention_fn, kv_append_fn,
                 tp_group: dist.ProcessGroup | None = None,
                 pointwise: PointwiseOps = TORCH_POINTWISE, kv_sink=None) -> None:
        if not config.is_moe:
            raise ValueError(f"{config.name} is a dense model; build it with LlamaModel")
        super().__init__(config, weights, max_model_len=max_model_len, attention_fn=attention_fn,
                         kv_append_fn=kv_append_fn, tp_group=tp_group, pointwise=pointwise,
                         kv_sink=kv_sink)
        self.layer_ops = moe_layer_ops(config, self.tp, kv_send=kv_sink is not None)
        self._ops = {op.name: getattr(self, f"_{op.name}") for op in self.layer_ops}
        if self.tp > 1:
            self._ops["o_proj"] = self._o_proj_partial
        self.top_k = config.num_experts_per_tok
        # Qwen casts the routing weights to the model's dtype before weighting; Mixtral keeps fp32.
        self._round_weights = config.architecture != "MixtralForCausalLM"
        self.grouped_mm = self.dtype in GROUPED_MM_DTYPES.get(self.device.type, ())

    def new_workspace(self, max_tokens: int) -> MoEWorkspace:
        c = self.local
        empty = lambda *s, dtype=self.dtype: torch.empty(s, dtype=dtype, device=self.device)  # noqa: E731
        d, s = c.hidden_size, c.shared_expert_intermediate_size
        par = d if self.tp > 1 else 0
        return MoEWorkspace(
            hidden=empty(max_tokens, d), x=empty(max_tokens, d),
            qkv=empty(max_tokens, c.q_size + 2 * c.kv_size), attn=empty(max_tokens, c.q_size),
            router_logits=empty(max_tokens, c.num_experts),
            topk=empty(max_tokens, 2 * c.num_experts_per_tok, dtype=torch.float32),
            expert_out=empty(max_tokens * c.num_experts_per_tok, d),
            shared_gate_up=empty(max_tokens, 2 * s), shared_act=empty(max_tokens, s),
            shared_out=empty(max_tokens, d if s else 0),
            o_out=empty(max_tokens, par), moe_out=empty(max_tokens, par))

    # -- the mixture of experts --------------------------------------------------------------
    def _moe_norm(self, i, ws, batch, kv, t0, t1):
        self._mlp_norm(i, ws, batch, kv, t0, t1)

    def _router(self, i, ws, batch, kv, t0, t1):
        torch.mm(ws.x[t0:t1], self.w[f"layers.{i}.router"].t(), out=ws.router_logits[t0:t1])

    def _topk(self, i, ws, batch, kv, t0, t1):
        k = self.top_k
        probs = torch.softmax(ws.router_logits[t0:t1].float(), dim=-1)
        weights, ids = torch.topk(probs, k, dim=-1)                       # [n, k]
        if self.config.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self._round_weights:
            weights = weights.to(self.dtype)
        ws.topk[t0:t1, :k] = weights
        ws.topk[t0:t1, k:] = ids

    def _experts(self, i, ws, batch, kv, t0, t1):
        """Token t's j-th expert output to expert_out row t*k + j, for t in [t0, t1)."""
        k, e = self.top_k, self.local.num_experts
        # NaN ids (rows topk has not written, which the race detector poisons) become expert 0:
        # a wrong but finite result, which the comparison catches, instead of an index error.
        ids = ws.topk[t0:t1, k:].nan_to_num(0.0).long().clamp_(0, e - 1).flatten()   # [n k]
        order = torch.argsort(ids, stable=True)             # (token, slot) pairs by expert
        rows = ws.x[t0:t1].index_select(0, order // k)      # [n k, D], sorted by expert
        counts = torch.bincount(ids, minlength=e)
        gate_up = self._grouped(rows, self._expert_weights(i, "gate_up"), counts)
        gate, up = gate_up.chunk(2, dim=-1)
        out = self._grouped(F.silu(gate) * up, self._expert_weights(i, "down"), counts)
        ws.expert_out[t0 * k: t1 * k].index_copy_(0, order, out)

    def _expert_weights(self, i: int, which: str) -> torch.Tensor:
        """[E, N, K] view of the stacked expert weights (models/loader.py's layout)."""
        w = self.w[f"layers.{i}.expert_{which}"]
        return w.view(self.local.num_experts, -1, w.shape[1])

    def _grouped(self, rows: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor
                 ) -> torch.Tensor:
        """rows [M, K] sorted by expert (counts[e] rows for expert e) times each expert's
        weights[e] [N, K] transposed: [M, N]."""
        if self.grouped_mm:
            offs = counts.cumsum(0).to(torch.int32)
            return F.grouped_mm(rows, weights.transpose(1, 2), offs=offs)
        out = rows.new_empty(rows.shape[0], weights.shape[1])
        start = 0
        for expert, n in enumerate(counts.tolist()):    # the loop fallback syncs with the host
            if n:
                torch.mm(rows[start:start + n], weights[expert].t(), out=out[start:start + n])
                start += n
        return out

    def _shared_gate_up(self, i, ws, batch, kv, t0, t1):
        torch.mm(ws.x[t0:t1], self.w[f"layers.{i}.shared_gate_up"].t(),
                 out=ws.shared_gate_up[t0:t1])

    def _shared_act(self, i, ws, batch, kv, t0, t1):
        self.pointwise.silu_and_mul(ws.shared_gate_up[t0:t1], ws.shared_act[t0:t1])

    def _shared_down(self, i, ws, batch, kv, t0, t1):
        torch.mm(ws.shared_act[t0:t1], self.w[f"layers.{i}.shared_down"].t(),
                 out=ws.shared_out[t0:t1])

    def _combine(self, i, ws, batch, kv, t0, t1):
        moe = self._mixture(i, ws, t0, t1)
        if self.tp > 1:
            ws.moe_out[t0:t1].copy_(moe)
        else:
            ws.hidden[t0:t1] += moe

    def _mixture(self, i: int, ws: MoEWorkspace, t0: int, t1: int) -> torch.Tensor:
        """[n, D]: the routing-weighted sum of each row's experts, plus the gated shared expert
        (on tp > 1 ranks: this rank's partial sum of it)."""
        k, n = self.top_k, t1 - t0
        outs = ws.expert_out[t0 * k: t1 * k].view(n, k, -1)             # [n, k, D]
        weights = ws.topk[t0:t1, :k].unsqueeze(-1)                      # [n, k, 1] fp32
        moe = (outs.float() * weights).sum(dim=1).to(self.dtype)
        if self.local.shared_expert_intermediate_size:
            gate = torch.sigmoid(ws.x[t0:t1] @ self.w[f"layers.{i}.shared_gate"].t())   # [n, 1]
            moe += gate * ws.shared_out[t0:t1]
        return moe

    def _moe_allreduce(self, i, ws, batch, kv, t0, t1):
        self._all_reduce_into_hidden(ws.moe_out, ws, t0, t1)
