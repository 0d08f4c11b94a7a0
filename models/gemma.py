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
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import (ModelConfig, ModelConfigError, RopeScaling, UnsupportedModelError,
                     rope_from_hf, rope_scaling_from_hf)
from .llama import (ACT, ATTENTION_OP, ATTN_NORM, DOWN_PARTIAL, GATE_UP, KV_APPEND, KV_SEND,
                    MLP_NORM, O_PROJ_PARTIAL, QK_NORM, QKV, ROPE, TORCH_POINTWISE, LlamaModel,
                    PointwiseOps, TPWorkspace, all_reduce_work, attention_weight_names, mlp_shapes,
                    mlp_weight_names, qk_norm_shapes, qk_norm_weight_names, rope_tables)
from .loader import Slot
from .op import MEMORY, NETWORK, OpSpec, OpWork, Shapes


# -- the ops of a layer, and what each costs (models/op.py says what the facts mean) -----------
def _post_norm_work(s: Shapes) -> OpWork:       # norm of the output, added into the residual
    return OpWork(flops_per_token=5.0 * s.d, bytes_per_token=3 * s.d * s.dtype_bytes)


def _reduce_work(s: Shapes) -> OpWork:
    # In place: the post norm adds the sums into the residual, not the all-reduce.
    return all_reduce_work(s, into_residual=False)


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


# -- the family's Hugging Face configs --------------------------------------------------------
# Gemma 3 4B-27B are published as image-text models; nanorun runs their text model, whose
# config is text_config, with transformers' Gemma3TextConfig defaults for what it leaves out
# (as the published ones leave out heads, head_dim and vocab_size).
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "bos_token_id": 2,
    "eos_token_id": 1, "tie_word_embeddings": True}


def _read_gemma(d: dict[str, Any], arch: str) -> dict[str, Any]:
    """ModelConfig's Gemma fields from a Gemma 2 or Gemma 3 text config (transformers' defaults
    where a key is absent), refusing what this file does not compute."""
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act != "gelu_pytorch_tanh":
        raise UnsupportedModelError(f"hidden_activation {act!r} is not supported for {arch}; only "
                                    "'gelu_pytorch_tanh' (GeGLU, as every published Gemma) is")
    for key in ("attention_bias", "use_bidirectional_attention"):
        if d.get(key):
            raise UnsupportedModelError(f"{key}=true is not supported for {arch}; set it to false")
    gemma3 = arch == "Gemma3ForCausalLM"
    n, pattern = d["num_hidden_layers"], d.get("sliding_window_pattern", 6 if gemma3 else 2)
    types = d.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                     for i in range(n)]
    attn_cap = d.get("attn_logit_softcapping", None if gemma3 else 50.0)
    if gemma3 and attn_cap is not None:
        # transformers' Gemma 3 attention does not apply it: running it would not be Gemma 3
        raise UnsupportedModelError(f"attn_logit_softcapping={attn_cap} is not supported for "
                                    f"{arch} (transformers ignores it there); set it to null")
    out: dict[str, Any] = dict(
        hidden_act=act, layer_types=tuple(types), attn_logit_softcapping=attn_cap,
        final_logit_softcapping=d.get("final_logit_softcapping", None if gemma3 else 30.0),
        query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
        qk_norm=gemma3, tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
        qkv_bias=False, sliding_window=d.get("sliding_window", 4096))
    if gemma3:
        out["rope"], out["rope_local_theta"] = _gemma3_rope(d, arch)
    return out


def _gemma3_rope(d: dict[str, Any], arch: str) -> tuple[tuple[float, RopeScaling | None], float]:
    """((global rope_theta, its scaling), the sliding layers' rope base): from transformers 5's
    per-layer-type rope_parameters, or the legacy rope_theta / rope_scaling /
    rope_local_base_freq keys."""
    params = d.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        if local.get("rope_type", "default") != "default":
            raise UnsupportedModelError(f"rope_parameters.sliding_attention.rope_type "
                                        f"{local['rope_type']!r} is not supported; only 'default'")
        return ((float(full.get("rope_theta", 1_000_000.0)), rope_scaling_from_hf(full, arch)),
                float(local.get("rope_theta", 10_000.0)))
    theta, scaling = rope_from_hf({**d, "rope_theta": d.get("rope_theta", 1_000_000.0)}, arch)
    return (theta, scaling), float(d.get("rope_local_base_freq", 10_000.0))


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

    # -- the family's Hugging Face configs and checkpoints (models.config.Family) -----------
    # Gemma 2 and Gemma 3 text share this decoder (Gemma 2's soft-capping and Gemma 3's QK norm
    # and local rope base are config switches).
    MODEL_TYPES = {"Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text"}
    HIDDEN_ACT = "gelu_pytorch_tanh"
    FEATURES = frozenset({"qk_norm", "query_pre_attn_scalar", "attn_logit_softcapping",
                          "final_logit_softcapping", "layer_types", "rope_local_theta"})
    NORMS_PER_LAYER = 4     # the sandwich: attn_norm, post_attn_norm, mlp_norm, post_mlp_norm

    @classmethod
    def text_part(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A Gemma3ForConditionalGeneration checkpoint's text model config (its images are not
        nanorun's: image tokens in a prompt are only tokens)."""
        if (d.get("architectures") or []) != ["Gemma3ForConditionalGeneration"]:
            return d
        top = {k: d[k] for k in ("bos_token_id", "eos_token_id", "dtype", "torch_dtype")
               if d.get(k) is not None}
        return {**_GEMMA3_TEXT_DEFAULTS, **top, **(d.get("text_config") or {}),
                "architectures": ["Gemma3ForCausalLM"]}

    @classmethod
    def read_hf(cls, d: dict[str, Any], arch: str) -> dict[str, Any]:
        return _read_gemma(d, arch)

    @classmethod
    def check(cls, config: ModelConfig) -> None:
        if len(config.layer_types) != config.num_layers:
            raise ModelConfigError(f"{config.name}: layer_types must give one of "
                                   "['sliding_attention', 'full_attention'] for each of the "
                                   f"{config.num_layers} layers, got {list(config.layer_types)}")
        if config.qk_norm and config.architecture != "Gemma3ForCausalLM":
            raise ModelConfigError(f"{config.name}: qk_norm is implemented for Gemma 3 only, "
                                   f"not {config.architecture}")

    @classmethod
    def hf_fields(cls, config: ModelConfig) -> dict[str, Any]:
        d: dict[str, Any] = {
            "hidden_activation": config.hidden_act, "attention_bias": False,
            "query_pre_attn_scalar": config.query_pre_attn_scalar,
            "attn_logit_softcapping": config.attn_logit_softcapping,
            "final_logit_softcapping": config.final_logit_softcapping,
            "sliding_window": config.sliding_window, "layer_types": list(config.layer_types)}
        if config.architecture == "Gemma3ForCausalLM":
            d["rope_local_base_freq"] = config.rope_local_theta
        return d

    @classmethod
    def layer_shapes(cls, config: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
        """The norms of the attention and MLP outputs, Gemma 3's q/k norms, the MLP."""
        d = config.hidden_size
        shapes = {p + "post_attn_norm": (d,), p + "post_mlp_norm": (d,)}
        if config.qk_norm:
            shapes.update(qk_norm_shapes(config, p))
        return {**shapes, **mlp_shapes(config, p)}

    @classmethod
    def layer_weight_names(cls, config: ModelConfig, hf: str, p: str) -> dict[str, Slot]:
        """Four norms a layer: HF's post_attention_layernorm normalises the attention's output
        (not the MLP's input, as in Llama); pre_feedforward_layernorm is the MLP's."""
        d = config.hidden_size
        names = {hf + "post_attention_layernorm.weight": Slot(p + "post_attn_norm", 0, (d,)),
                 **attention_weight_names(config, hf, p),
                 hf + "pre_feedforward_layernorm.weight": Slot(p + "mlp_norm", 0, (d,)),
                 hf + "post_feedforward_layernorm.weight": Slot(p + "post_mlp_norm", 0, (d,))}
        if config.qk_norm:
            names.update(qk_norm_weight_names(config, hf, p))
        return {**names, **mlp_weight_names(config, hf, p)}

    @classmethod
    def workspace_bytes_per_token(cls, local: ModelConfig, elt: int) -> int:
        """As LlamaModel's, plus o_out and mlp_out (every tp: the post norms read them)."""
        return super().workspace_bytes_per_token(local, elt) + elt * 2 * local.hidden_size

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], *,
                 max_model_len: int, attention_fn, kv_append_fn,
                 tp_group: dist.ProcessGroup | None = None,
                 pointwise: PointwiseOps = TORCH_POINTWISE, kv_sink=None) -> None:
        if config.architecture not in self.MODEL_TYPES:
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
