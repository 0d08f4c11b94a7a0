"""Gemma 2 and Gemma 3 (text) decoders as plain math over named ops.

Both follow transformers' modeling_gemma2.py / modeling_gemma3.py. A layer differs from Llama's in:
  * RMSNorm scales by (1 + weight), computed in fp32 and rounded once (`gemma_rms_norm`);
  * "sandwich" norms: the attention's and the MLP's outputs are normed before they are added
    to the residual stream (HF's post_attention_layernorm and post_feedforward_layernorm), so
    o_proj and down write o_out / mlp_out instead of adding into `hidden`, and the ops
    post_attn_norm and post_mlp_norm add the normed rows in;
  * GeGLU: gelu (tanh approximation) of the gate times up;
  * embeddings scaled by sqrt(hidden_size) (rounded to the model's dtype, as HF does);
  * attention scale query_pre_attn_scalar ** -0.5, independent of head_dim (itself
    independent of hidden / heads);
  * per-layer sliding windows: `config.layer_types` says which layers attend only to the last
    `sliding_window` positions (Gemma 2: every other layer, from the first; Gemma 3: five local
    layers to one global); the paged attention kernels take the window per call;
  * Gemma 2: attention-logit soft-capping (cap * tanh(score / cap), in the attention kernels)
    and final-logit soft-capping;
  * Gemma 3: per-head RMSNorm of q and k before rope (qk_norm), and two rope tables: sliding
    layers rotate with rope_local_theta (10k, unscaled), global ones with rope_theta and its
    optional scaling.

The layer's ops (tp: tensor-parallel ranks; the all-reduces only for tp > 1):

  attn_norm, qkv, [qk_norm], rope, kv_append, [kv_send], attention    as models.llama
  o_proj              gemm     attn -> o_out          this rank's partial sum for tp > 1
  attn_out_allreduce  network  o_out -> o_out         the sum over the ranks
  post_attn_norm      memory   o_out, hidden -> hidden    hidden += norm(o_out)
  mlp_norm, gate_up   as models.llama (mlp_norm: HF's pre_feedforward_layernorm)
  act                 memory   gate_up -> act         gelu_tanh(gate) * up
  down                gemm     act -> mlp_out
  mlp_out_allreduce   network  mlp_out -> mlp_out
  post_mlp_norm       memory   mlp_out, hidden -> hidden  hidden += norm(mlp_out)

Buffers: models.llama's TPWorkspace, at every tp (o_out and mlp_out hold the outputs the post
norms read).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import GEMMA_ARCHITECTURES, ModelConfig
from .llama import (ACT, ATTENTION_OP, ATTN_NORM, DOWN_PARTIAL, GATE_UP, KV_APPEND, KV_SEND,
                    MLP_NORM, O_PROJ_PARTIAL, QK_NORM, QKV, ROPE, TORCH_POINTWISE, LlamaModel,
                    PointwiseOps, TPWorkspace, rope_tables)
from .op import MEMORY, NETWORK, OpSpec, OpWork, Shapes


# -- the ops of a layer, and what each costs (models/op.py says what the facts mean) -----------
def _post_norm_work(s: Shapes) -> OpWork:       # norm of the output, added into the residual
    return OpWork(flops_per_token=5.0 * s.d, bytes_per_token=3 * s.d * s.dtype_bytes)


def _reduce_work(s: Shapes) -> OpWork:
    # The all-reduce of d partial sums per token, in place (the post norm adds them in): the
    # rows are read and the sums written back; each rank sends and receives 2 (tp - 1) / tp of
    # the message.
    d, b, tp = s.d, s.dtype_bytes, s.tp
    return OpWork(flops_per_token=0.0, bytes_per_token=2 * d * b,
                  network_bytes_per_token=2.0 * (tp - 1) / tp * d * b,
                  message_bytes_per_token=d * b, collective="all_reduce")


ATTN_OUT_ALLREDUCE = OpSpec("attn_out_allreduce", NETWORK, ("o_out",), ("o_out",),
                            cost=_reduce_work)
POST_ATTN_NORM = OpSpec("post_attn_norm", MEMORY, ("o_out", "hidden"), ("hidden",),
                        cost=_post_norm_work)
MLP_OUT_ALLREDUCE = OpSpec("mlp_out_allreduce", NETWORK, ("mlp_out",), ("mlp_out",),
                           cost=_reduce_work)
POST_MLP_NORM = OpSpec("post_mlp_norm", MEMORY, ("mlp_out", "hidden"), ("hidden",),
                       cost=_post_norm_work)


def gemma_layer_ops(config: ModelConfig, tp: int, kv_send: bool = False) -> tuple[OpSpec, ...]:
    """The ops of one Gemma layer on `tp` tensor-parallel ranks (module docstring); with
    kv_send, a prefill engine's KV_SEND right after kv_append, as in models.llama."""
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor parallel size must be a positive int, got {tp!r}")
    par = tp > 1
    ops = [ATTN_NORM, QKV] + [QK_NORM] * bool(config.qk_norm) + [ROPE, KV_APPEND]
    ops += [KV_SEND] * kv_send + [ATTENTION_OP, O_PROJ_PARTIAL]
    ops += [ATTN_OUT_ALLREDUCE] * par + [POST_ATTN_NORM, MLP_NORM, GATE_UP, ACT, DOWN_PARTIAL]
    ops += [MLP_OUT_ALLREDUCE] * par + [POST_MLP_NORM]
    return tuple(ops)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), all in fp32, rounded to x's dtype once."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


class GemmaModel(LlamaModel):
    """Gemma 2 / Gemma 3 text (module docstring); LlamaModel's constructor and frame."""

    OPS: tuple[OpSpec, ...] = (ATTN_NORM, QKV, QK_NORM, ROPE, KV_APPEND, KV_SEND, ATTENTION_OP,
                               O_PROJ_PARTIAL, ATTN_OUT_ALLREDUCE, POST_ATTN_NORM, MLP_NORM,
                               GATE_UP, ACT, DOWN_PARTIAL, MLP_OUT_ALLREDUCE, POST_MLP_NORM)

    @classmethod
    def layer_ops_for(cls, config: ModelConfig, tp: int = 1,
                      kv_send: bool = False) -> tuple[OpSpec, ...]:
        return gemma_layer_ops(config, tp, kv_send)

    @classmethod
    def workspace_bytes_per_token(cls, local: ModelConfig, elt: int) -> int:
        """As LlamaModel's, plus o_out and mlp_out (every tp: the post norms read them)."""
        return super().workspace_bytes_per_token(local, elt) + elt * 2 * local.hidden_size

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], *,
                 max_model_len: int, attention_fn, kv_append_fn,
                 tp_group: dist.ProcessGroup | None = None,
                 pointwise: PointwiseOps = TORCH_POINTWISE, kv_sink=None) -> None:
        if config.architecture not in GEMMA_ARCHITECTURES:
            raise ValueError(f"{config.name} is a {config.architecture}; build it with "
                             f"models.registry.build_model")
        super().__init__(config, weights, max_model_len=max_model_len, attention_fn=attention_fn,
                         kv_append_fn=kv_append_fn, tp_group=tp_group, pointwise=pointwise,
                         kv_sink=kv_sink)
        # (LlamaModel's o_proj / down on tp > 1 ranks are this family's: partial sums into
        # o_out / mlp_out, which the all-reduces sum in place.)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.windows = [config.layer_window(i) for i in range(config.num_layers)]
        # HF multiplies by sqrt(hidden) rounded to the model's dtype.
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=self.dtype,
                                        device=self.device)
        self._rope_of = self._layer_rope_tables(max_model_len)

    def _layer_rope_tables(self, max_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(cos, sin) per layer: Gemma 3's sliding layers rotate with rope_local_theta and no
        scaling; every other layer with rope_theta and its scaling."""
        c = self.config
        full = rope_tables(c, max_len, self.device)
        if c.rope_local_theta is None:
            return [full] * c.num_layers
        local = rope_tables(dataclasses.replace(c, rope_theta=c.rope_local_theta,
                                                rope_scaling=None), max_len, self.device)
        return [local if w is not None else full for w in self.windows]

    def new_workspace(self, max_tokens: int) -> TPWorkspace:
        c = self.local
        empty = lambda *s: torch.empty(s, dtype=self.dtype, device=self.device)  # noqa: E731
        return TPWorkspace(
            hidden=empty(max_tokens, c.hidden_size), x=empty(max_tokens, c.hidden_size),
            qkv=empty(max_tokens, c.q_size + 2 * c.kv_size), attn=empty(max_tokens, c.q_size),
            gate_up=empty(max_tokens, 2 * c.intermediate_size),
            act=empty(max_tokens, c.intermediate_size),
            o_out=empty(max_tokens, c.hidden_size), mlp_out=empty(max_tokens, c.hidden_size))

    # -- the iteration's frame ---------------------------------------------------------------
    def embed(self, ws: TPWorkspace, batch, t0: int, t1: int) -> None:
        super().embed(ws, batch, t0, t1)
        ws.hidden[t0:t1].mul_(self.embed_scale)

    def logits(self, ws: TPWorkspace, batch) -> torch.Tensor:
        """[N, V] float32 logits of the tokens at batch.sample_indices, soft-capped (in the
        model's dtype, as HF) where the config says."""
        h = ws.hidden.index_select(0, batch.sample_indices)
        h = gemma_rms_norm(h, self.w["norm"], self.config.rms_norm_eps)
        logits = F.linear(h, self.w["lm_head"])
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    # -- the ops ------------------------------------------------------------------------------
    def _norm_into(self, src: torch.Tensor, weight: str, dst: torch.Tensor) -> None:
        dst.copy_(gemma_rms_norm(src, self.w[weight], self.config.rms_norm_eps))

    def _attn_norm(self, i, ws, batch, kv, t0, t1):
        self._norm_into(ws.hidden[t0:t1], f"layers.{i}.attn_norm", ws.x[t0:t1])

    def _qk_norm(self, i, ws, batch, kv, t0, t1):
        # Per head, over head_dim, before rope; q and k are strided views into qkv.
        c = self.local
        q = ws.qkv[t0:t1, : c.q_size].unflatten(-1, (c.num_heads, c.head_dim))
        k = ws.qkv[t0:t1, c.q_size: c.q_size + c.kv_size].unflatten(-1, (c.num_kv_heads,
                                                                         c.head_dim))
        self._norm_into(q, f"layers.{i}.q_norm", q)
        self._norm_into(k, f"layers.{i}.k_norm", k)

    def _rope(self, i, ws, batch, kv, t0, t1):
        c = self.local
        qk = ws.qkv[t0:t1, : c.q_size + c.kv_size].unflatten(-1, (-1, c.head_dim))  # [n, Hq+Hkv, Dh]
        cos, sin = self._rope_of[i]
        self.pointwise.rope(qk, batch.positions[t0:t1], cos, sin)

    def _attention(self, i, ws, batch, kv, t0, t1):
        c = self.local
        q = ws.qkv[t0:t1, : c.q_size].unflatten(-1, (c.num_heads, c.head_dim))
        out = ws.attn[t0:t1].unflatten(-1, (c.num_heads, c.head_dim))
        cap = self.config.attn_logit_softcapping
        extra = {} if cap is None else {"logit_softcap": cap}
        self._attention_kernel(
            q, kv.k[i], kv.v[i], batch.block_tables, batch.seq_ids[t0:t1],
            batch.positions[t0:t1], self.scale, out, sliding_window=self.windows[i], **extra)

    def _o_proj(self, i, ws, batch, kv, t0, t1):
        torch.mm(ws.attn[t0:t1], self.w[f"layers.{i}.o_proj"].t(), out=ws.o_out[t0:t1])

    def _attn_out_allreduce(self, i, ws, batch, kv, t0, t1):
        dist.all_reduce(ws.o_out[t0:t1], group=self.tp_group)

    def _post_attn_norm(self, i, ws, batch, kv, t0, t1):
        ws.hidden[t0:t1] += gemma_rms_norm(ws.o_out[t0:t1], self.w[f"layers.{i}.post_attn_norm"],
                                           self.config.rms_norm_eps)

    def _mlp_norm(self, i, ws, batch, kv, t0, t1):
        self._norm_into(ws.hidden[t0:t1], f"layers.{i}.mlp_norm", ws.x[t0:t1])

    def _act(self, i, ws, batch, kv, t0, t1):
        gate, up = ws.gate_up[t0:t1].chunk(2, dim=-1)
        torch.mul(F.gelu(gate, approximate="tanh"), up, out=ws.act[t0:t1])

    def _down(self, i, ws, batch, kv, t0, t1):
        torch.mm(ws.act[t0:t1], self.w[f"layers.{i}.down"].t(), out=ws.mlp_out[t0:t1])

    def _mlp_out_allreduce(self, i, ws, batch, kv, t0, t1):
        dist.all_reduce(ws.mlp_out[t0:t1], group=self.tp_group)

    def _post_mlp_norm(self, i, ws, batch, kv, t0, t1):
        ws.hidden[t0:t1] += gemma_rms_norm(ws.mlp_out[t0:t1], self.w[f"layers.{i}.post_mlp_norm"],
                                           self.config.rms_norm_eps)
