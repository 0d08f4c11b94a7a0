"""Cost model: how long one launch (an op of a layer, on a token range, on a partition) takes.

The model is a roofline with three corrections, each a named term of `CostParams`:

    t_alone(op, n, s) = max(t_compute, t_memory) + launch_overhead
    t_compute = flops / (peak_flops * efficiency(n) * s / S)
    t_memory  = bytes / (hbm_bandwidth * bandwidth_efficiency * bandwidth_share(s / S))

- efficiency(n) = gemm_efficiency * n / (n + gemm_half_tokens): GEMMs of few tokens (small M)
  and attention over prompt chunks reach less of the peak (tile and wave quantisation). A GEMM
  is priced on its per-rank shape (M tokens x N outputs x K inputs, N or K cut by tp): its
  128 x 128 output tiles, split along K where K allows (K / gemm_split_k ways), fill a
  partition of s SMs only as far as tiles x splits reach s (the last, partial wave), and each
  tile pays gemm_k_overhead elements of K for its prologue and epilogue, K / (K + overhead).
- bandwidth_share(f) = (1 - exp(-k f)) / (1 - exp(-k)): a memory-bound kernel on a fraction f of
  the SMs still pulls most of the bandwidth (NanoFlow's observation that lets attention run on a
  minority of SMs); k = bandwidth_saturation.
- Ops running at the same time on disjoint partitions share HBM bandwidth and L2. Each launch
  has a bandwidth demand (the share of full bandwidth it pulls alone); while the demands of the
  running launches sum above 1, each slows by its memory-bound share of the excess, and any
  launch running beside another pays `interference` on top. The simulator applies this term.

Collectives (tp > 1) are priced from measured NCCL tables (nanorun/device.py: time against
message size and tp, log-log, with the small-message latency floor), under the CTA bound
nanorun gives NCCL (nanorun.distributed.NCCL_MAX_CTAS), plus the add of the reduced rows into
the residual stream as its own launch. While it runs, NCCL pulls HBM bandwidth (its ring reads
and writes about 3 x the bytes it sends), which slows memory-bound launches beside it.

Work per op is what the op declares (nanorun.models: OpSpec.cost, a function of the model's
shapes per tensor-parallel rank); this module names no op. An op whose work reads its context
(attention) costs what the batch's contexts say: decode tokens stream their sequence's whole
KV; prompt chunks read each KV page once per query tile and are compute-bound for long chunks.

Mixture-of-experts layers (models/moe.py) add the router (a small GEMM), top-k (memory), the
grouped expert GEMM, the combine (memory) and, for Qwen2-MoE, a dense shared expert. The expert
GEMM of a launch of n tokens is priced on the tokens each expert gets, drawn from a multinomial
of n * top_k assignments over the experts (`expert_load`; uniform routing, not the mean n k / E
per expert): only the experts that get a token read their weights, each expert's GEMM has the
small-M efficiency of its own token count and its own partial M tile, and the permutation
(gathering each token's row once per expert, scattering the outputs back) is memory traffic.

A measured profile (`nanorun profile`, search/profile.py) calibrates this model: per op, a
factor measured/predicted over token counts and SM counts, and measured interference.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from nanorun.device import DeviceSpec, collective_seconds
from nanorun.models import GEMM, NETWORK, OpWork, model_frame_ops, model_layer_ops

logger = logging.getLogger("nanorun")

if TYPE_CHECKING:   # pragma: no cover
    from nanorun.models import ModelConfig

    from .profile import Profile


@dataclass(frozen=True)
class CostParams:
    """The cost model's tunable terms (docs/cost_model.md explains each and how to calibrate)."""

    gemm_efficiency: float = 0.78        # share of peak a large bf16 GEMM reaches
    gemm_half_tokens: float = 48.0       # tokens at which a GEMM reaches half that share
    attention_efficiency: float = 0.45   # share of peak that prompt-chunk attention math reaches
    decode_attention_efficiency: float = 0.07   # decode attention math: about the CUDA-core
                                                # FP32 rate (67 of 989 TFLOP/s on an H100)
    bandwidth_efficiency: float = 0.85   # share of the HBM spec a streaming kernel reaches
    bandwidth_saturation: float = 5.0    # k of bandwidth_share; larger: fewer SMs saturate HBM
    launch_overhead_s: float = 2.5e-6    # per kernel launch inside a CUDA graph
    network_latency_s: float = 8e-6      # per collective, where a device has no NCCL tables
    gemm_k_overhead: float = 64.0        # K elements' worth of time a GEMM tile spends outside
                                         # its K loop (prologue, epilogue): one 64-wide k-step
    gemm_split_k: int = 1024             # smallest K slice a split-K GEMM gives one CTA
    per_rank_shapes: bool = True         # GEMM tiles and K overhead (False: the M-only
                                         # efficiency of the first model, for comparisons)
    nccl_ctas: int | None = None         # CTAs a collective may use (None: what nanorun's
                                         # process group sets, NANORUN_NCCL_MAX_CTAS or 8)
    interference: float = 0.05           # slowdown of any launch running beside another
    attention_query_tile: int = 64       # prompt-chunk query rows that share one read of the KV


@dataclass(frozen=True)
class LaunchCost:
    seconds: float            # alone on its partition
    memory_share: float       # share of `seconds` bound by memory (0..1)
    demand: float             # share of the device's full bandwidth it pulls alone (0..1)


@dataclass(frozen=True)
class TokenStats:
    """What attention needs to know about a token range: decode tokens and the sum of their
    contexts (tokens of KV each reads), prompt-chunk tokens and the sum of their contexts."""

    decode_tokens: int = 0
    decode_context: int = 0
    prompt_tokens: int = 0
    prompt_context: int = 0


# A context-reading op's profile entry over prompt chunks is its name + PREFILL (attention's:
# "attention_prefill"); its own entry is over decode tokens.
PREFILL = "_prefill"


def prefill_entry(op: str) -> str:
    """The profile entry of `op` (an op whose cost reads its context) over prompt chunks."""
    return op + PREFILL


def prefill_context(tokens: int) -> int:
    """Summed contexts of a prompt's first chunk of `tokens` tokens (token i sees i + 1)."""
    return tokens * (tokens + 1) // 2


def op_work(config: "ModelConfig", tp: int = 1, dtype_bytes: int = 2) -> dict[str, OpWork]:
    """The work of every layer op of `config`'s model (and of the frame: embed, logits) on one
    tensor-parallel rank, as the ops declare it (nanorun.models: OpSpec.cost)."""
    ops = model_layer_ops(config, tp, kv_send=True) + model_frame_ops(config)
    work = {op.name: op.work(config, tp, dtype_bytes) for op in ops}
    return {name: w for name, w in work.items() if w is not None}


@functools.lru_cache(maxsize=4096)
def expert_load(tokens: int, experts: int, top_k: int, tile: int = 128,
                samples: int = 32) -> tuple[float, float]:
    """(expected touched experts, expected M tiles) of `tokens` tokens routed top_k of
    `experts`, by a seeded Monte Carlo over the multinomial (the same numbers every run)."""
    rng = np.random.default_rng([tokens, experts, top_k])
    counts = rng.multinomial(tokens * top_k, np.full(experts, 1.0 / experts), size=samples)
    touched = float((counts > 0).sum(axis=1).mean())
    m_tiles = float(np.ceil(counts / tile).sum(axis=1).mean())
    return touched, m_tiles


class CostModel:
    """Launch times for one model on one device at a tensor-parallel degree.

    `profile` (a measured search.profile.Profile) scales each op's prediction by its measured
    factor and replaces the interference term.
    """

    def __init__(self, config: "ModelConfig", device: DeviceSpec, *, tp: int = 1,
                 dtype_bytes: int = 2, params: CostParams | None = None,
                 profile: "Profile | None" = None) -> None:
        if tp < 1 or config.num_heads % tp or config.num_kv_heads % tp \
                or config.intermediate_size % tp:
            raise ValueError(f"tp={tp} does not divide {config.name}'s heads "
                             f"({config.num_heads} query, {config.num_kv_heads} KV) and "
                             f"intermediate size {config.intermediate_size}; pick a tp that does")
        self.config, self.device, self.tp = config, device, tp
        self.dtype_bytes = dtype_bytes
        self.params = params or CostParams()
        self.work = op_work(config, tp, dtype_bytes)
        self.peak_flops = device.bf16_tflops * 1e12
        self.bandwidth = device.hbm_gbps * 1e9 * self.params.bandwidth_efficiency
        # The ops whose cost reads their tokens' contexts (attention): priced on TokenStats.
        self.context_ops = frozenset(op for op, w in self.work.items() if w.reads_context)
        ctas = self.params.nccl_ctas
        if ctas is None:
            from nanorun.distributed import nccl_max_ctas

            ctas = nccl_max_ctas()
        self.nccl_ctas = ctas
        self.profile = None
        if profile is not None:
            self._calibrate(profile)

    def _calibrate(self, profile: "Profile") -> None:
        if profile.device != self.device.name:
            raise ValueError(f"the profile was measured on {profile.device!r}, not "
                             f"{self.device.name!r}; profile this device or drop --profile")
        if profile.model != self.config.name or profile.tp != self.tp:
            logger.warning("profile measured for %s at tp=%d, used for %s at tp=%d: its "
                           "per-op factors are applied as they are", profile.model, profile.tp,
                           self.config.name, self.tp)
        if profile.interference is not None:
            self.params = replace(self.params, interference=profile.interference)
        tables = profile.collective_tables()
        if tables:   # measured collectives replace the spec's published tables
            self.device = replace(self.device, collectives=tables)

        prefill = {prefill_entry(op): op for op in self.context_ops}

        def predict(op: str, tokens: int, sms: int, context: int | None) -> float:
            stats = None
            if op in self.context_ops and context:      # decode tokens at `context`
                stats = TokenStats(tokens, tokens * context)
            elif op in prefill:                         # a prompt's first chunk of `tokens`
                op, stats = prefill[op], TokenStats(prompt_tokens=tokens,
                                                    prompt_context=prefill_context(tokens))
            return self.launch(op, tokens, sms, stats).seconds

        profile.calibrate(predict)
        self.profile = profile

    # -- the device's rates -------------------------------------------------------------------
    @property
    def gemm_rate(self) -> float:
        """FLOP/s of a large GEMM on the whole device: the 'peak GEMM rate' of the optimal
        bound (a measured profile's, when one is loaded)."""
        if self.profile is not None and self.profile.gemm_tflops:
            return self.profile.gemm_tflops * 1e12
        return self.peak_flops * self.params.gemm_efficiency

    def optimal_tokens_per_s(self) -> float:
        """NanoFlow's bound for the whole tensor-parallel group: every GPU at the peak GEMM rate
        doing only the 2 x active-parameter FLOPs of each token."""
        return self.tp * self.gemm_rate / (2.0 * self.config.num_active_params_per_token)

    def _sm_fraction(self, sms: int | None) -> float:
        total = self.device.sm_count
        return 1.0 if sms is None or total is None else min(1.0, sms / total)

    def _bandwidth_share(self, fraction: float) -> float:
        k = self.params.bandwidth_saturation
        return (1.0 - math.exp(-k * fraction)) / (1.0 - math.exp(-k))

    # -- one launch ----------------------------------------------------------------------------
    def launch(self, op: str, tokens: int, sms: int | None,
               stats: TokenStats | None = None) -> LaunchCost:
        """Cost of `op` on `tokens` tokens on a partition of `sms` SMs (None: whole device).
        An op whose cost reads its context (attention: self.context_ops) needs the range's
        TokenStats; logits takes the number of sampled tokens.

        Such an op over a mixed range is its decode part plus its prompt-chunk part, each
        priced (and calibrated: profile entries "attention" and "attention_prefill") on its
        own: one kernel launch does both kinds of work item, one after another per CTA."""
        try:
            w = self.work[op]
        except KeyError:
            raise ValueError(f"the cost model has no formula for op {op!r}; known ops: "
                             f"{sorted(self.work)}") from None
        if not w.reads_context:
            return self._cost(op, w, tokens, sms, None)
        stats = stats or TokenStats(decode_tokens=tokens, decode_context=tokens)
        decode = TokenStats(stats.decode_tokens, stats.decode_context)
        prompt = TokenStats(prompt_tokens=stats.prompt_tokens,
                            prompt_context=stats.prompt_context)
        if not stats.prompt_tokens:
            return self._cost(op, w, tokens, sms, decode)
        if not stats.decode_tokens:
            return self._cost(prefill_entry(op), w, tokens, sms, prompt)
        costs = (self._cost(op, w, stats.decode_tokens, sms, decode),
                 self._cost(prefill_entry(op), w, stats.prompt_tokens, sms, prompt))
        seconds = sum(c.seconds for c in costs)
        memory = sum(c.memory_share * c.seconds for c in costs)
        demand = sum(c.demand * c.seconds for c in costs)
        return LaunchCost(seconds, memory / seconds, demand / seconds)

    def _cost(self, name: str, w: OpWork, tokens: int, sms: int | None,
              stats: TokenStats | None) -> LaunchCost:
        """One launch's roofline time, times the profile's factor for `name` at this point."""
        p = self.params
        f = self._sm_fraction(sms)
        flops = w.flops_per_token * tokens
        nbytes = w.bytes_per_token * tokens + w.weight_bytes
        efficiency = p.gemm_efficiency * tokens / (tokens + p.gemm_half_tokens)
        busy = f                     # the share of the device's SMs the launch keeps busy
        if w.experts:
            flops, nbytes, efficiency, busy = self._experts(w, tokens, sms, f)
        elif w.kind == GEMM and w.k and p.per_rank_shapes:
            fill = self._gemm_fill(w, tokens, sms)
            busy = f * fill
            efficiency *= fill * w.k / (w.k + p.gemm_k_overhead)
            # The fill is already in `efficiency`: compute divides by the partition's SMs.
        if w.reads_context:
            flops, nbytes, efficiency = self._attention(w, stats, nbytes)
        compute = flops / (self.peak_flops * max(efficiency, 1e-6) * f) if flops else 0.0
        memory = nbytes / (self.bandwidth * self._bandwidth_share(busy))
        if w.kind == NETWORK:
            message = tokens * w.message_bytes_per_token
            # NCCL's CTAs are bounded by nanorun's NCCL_MAX_CTAS and by the SMs of the
            # partition the layout gives the collective.
            ctas = self.nccl_ctas if sms is None else max(1, min(self.nccl_ctas, sms))
            nccl = collective_seconds(self.device, w.collective, message, self.tp, ctas=ctas)
            if nccl is None:   # no measured tables (the CPU spec): latency + ring formula
                wire = w.network_bytes_per_token * tokens / (self.device.interconnect_gbps * 1e9)
                seconds = p.network_latency_s + max(wire, memory)
                memory_time = memory
            else:
                # NCCL's kernel, then the add of the reduced rows into the residual stream:
                # two launches per collective, a per-layer cost that does not shrink with tp.
                seconds = nccl + memory + 2 * p.launch_overhead_s
                memory_time = memory
                # The ring reads its chunk and the received one and writes the result.
                nbytes += 3.0 * w.network_bytes_per_token * tokens
        else:
            seconds = max(compute, memory) + p.launch_overhead_s
            memory_time = memory if memory >= compute else 0.0
        if self.profile is not None:
            seconds *= self.profile.factor(name, tokens, sms if sms is not None else
                                           self.device.sm_count)
        demand = min(1.0, nbytes / (self.bandwidth * seconds)) if seconds else 0.0
        return LaunchCost(seconds, min(1.0, memory_time / seconds) if seconds else 0.0, demand)

    def _gemm_fill(self, w: OpWork, tokens: int, sms: int | None) -> float:
        """Share of the partition's SMs a GEMM of per-rank shape (tokens x w.n x w.k) keeps busy:
        its 128 x 128 output tiles, split along K (at most K / gemm_split_k ways, only as far
        as it takes to cover the SMs, as cuBLAS's split-K heuristics do for small M), each on
        one SM; below one full wave the rest idle. Beyond a wave, later waves are assumed to
        balance (tile-shape choice and stream-K hide the remainder)."""
        s = sms if sms is not None else self.device.sm_count
        if not s:
            return 1.0
        tiles = math.ceil(tokens / 128) * math.ceil(w.n / 128)
        splits = max(1, min(w.k // self.params.gemm_split_k, math.ceil(s / tiles)))
        return min(1.0, tiles * splits / s)

    def _experts(self, w: OpWork, tokens: int, sms: int | None, f: float
                 ) -> tuple[float, float, float, float]:
        """(flops, bytes, efficiency, busy SM share) of a grouped expert GEMM of `tokens`
        tokens: the weights of the experts that get a token (expert_load), the small-M
        efficiency of each expert's own token count (sum over touched experts of
        c_e / (c_e + gemm_half_tokens) weighted by c_e: assignments / (assignments + half x
        touched)), and the tiles of each expert's rows filling the partition."""
        p = self.params
        touched, m_tiles = expert_load(tokens, w.experts, w.top_k)
        assignments = tokens * w.top_k
        flops = w.flops_per_token * tokens
        nbytes = w.bytes_per_token * tokens + w.weight_bytes * touched / w.experts
        efficiency = p.gemm_efficiency * assignments / (assignments + p.gemm_half_tokens * touched)
        s = sms if sms is not None else self.device.sm_count
        fill = 1.0
        if s and p.per_rank_shapes:   # each of the two GEMMs: its tiles over the partition
            fills = []
            for n, k in zip(w.expert_n[::2], w.expert_n[1::2]):
                tiles = m_tiles * math.ceil(n / 128)
                splits = max(1, min(k // p.gemm_split_k, math.ceil(s / tiles)))
                fills.append(min(1.0, tiles * splits / s) * k / (k + p.gemm_k_overhead))
            fill = sum(fills) / len(fills)
        return flops, nbytes, efficiency * fill, f * fill

    def _attention(self, w: OpWork, s: TokenStats, q_bytes: float
                   ) -> tuple[float, float, float]:
        """(flops, bytes, efficiency) of an op whose cost reads its context: per token of
        context, w.context_flops and a read of w.context_bytes, which the query rows of a
        prompt chunk's tile share."""
        p = self.params
        context = s.decode_context + s.prompt_context
        flops = w.context_flops * context
        kv_reads = s.decode_context + s.prompt_context / p.attention_query_tile
        nbytes = q_bytes + kv_reads * w.context_bytes
        # Decode attention is a matrix-vector product per head group, on CUDA cores; prompt
        # chunks are tiled matrix products reaching attention_efficiency of the tensor peak.
        tokens = s.decode_tokens + s.prompt_tokens
        share_prompt = s.prompt_tokens / tokens if tokens else 0.0
        efficiency = share_prompt * p.attention_efficiency + \
            (1.0 - share_prompt) * p.decode_attention_efficiency
        return flops, nbytes, efficiency


class RangeStats:
    """TokenStats of any token range of a batch in O(1), from prefix sums of its per-token
    contexts (position + 1) and decode flags."""

    def __init__(self, contexts: np.ndarray, is_decode: np.ndarray) -> None:
        contexts = np.asarray(contexts, dtype=np.int64)
        dec = np.asarray(is_decode, dtype=bool)
        zero = np.zeros(1, dtype=np.int64)
        self._dec_n = np.concatenate((zero, np.cumsum(dec)))
        self._dec_c = np.concatenate((zero, np.cumsum(np.where(dec, contexts, 0))))
        self._all_c = np.concatenate((zero, np.cumsum(contexts)))

    def __call__(self, t0: int, t1: int) -> TokenStats:
        dn = int(self._dec_n[t1] - self._dec_n[t0])
        dc = int(self._dec_c[t1] - self._dec_c[t0])
        return TokenStats(dn, dc, (t1 - t0) - dn, int(self._all_c[t1] - self._all_c[t0]) - dc)
