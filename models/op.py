"""An op's declaration: everything the rest of nanorun knows about it.

A model family (models/llama.py, models/moe.py) declares each op of its layer as an OpSpec.
The planner orders launches from what an op reads and writes; the layouts place it by the side
it prefers; the cost model prices it from the work it declares as a function of the model's
shapes; measurement picks what to time from the same facts. None of them names an op: when
one would have to, the declaration is missing a fact.

The facts:
  kind        what bounds it: GEMM (compute), MEMORY (bandwidth), ATTENTION (the KV cache it
              streams: memory-bound for decode tokens, compute-bound for long prompt chunks),
              NETWORK (a collective or a transfer; runs on the network's own stream)
  reads       the buffers it reads, rows [t0, t1) of each ("kv_cache": this layer's KV pages)
  writes      the buffers it writes, rows [t0, t1)
  side        the side of a partitioned layout it prefers: GEMM_SIDE (with the GEMMs),
              ATTENTION_SIDE (with the memory-bound attention) or NETWORK_SIDE; by default
              NETWORK_SIDE for network ops and GEMM_SIDE for the rest
  history     buffers it reads for every earlier token of its sequences too, not only its own
              rows (attention reads the KV of the whole context), so whatever writes them for
              earlier rows must come first
  indexed_by  buffers whose values, not only their shapes, set what it does and costs (the
              expert GEMM's routing): measurement computes them as the model does
  cost        per-token work on one tensor-parallel rank as a function of the model's shapes
              (Shapes -> OpWork); the cost model multiplies in the batch's shapes (tokens,
              contexts, messages). None: the cost model has no formula for it
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:   # pragma: no cover
    from .config import ModelConfig

# Kinds: what bounds an op.
GEMM, MEMORY, ATTENTION, NETWORK = "gemm", "memory", "attention", "network"
KINDS = (GEMM, MEMORY, ATTENTION, NETWORK)

# Sides of a partitioned layout, named as the partitions of nanorun.layout.overlap.
GEMM_SIDE, ATTENTION_SIDE, NETWORK_SIDE = "gemm", "attn", "net"
SIDES = (GEMM_SIDE, ATTENTION_SIDE, NETWORK_SIDE)

# The planner's frame around the layers (nanorun.planner.EMBED and LOGITS): the embedding
# lookup before the first layer and the LM head after the last. A family declares their costs.
EMBED, LOGITS = "embed", "logits"


@dataclass(frozen=True)
class OpWork:
    """Per-token work of one op on one rank (what OpSpec.cost returns); weights are read once
    per launch. The cost model prices a launch of n tokens from it (search/costmodel.py)."""

    kind: str = ""                 # the op's kind (OpSpec.work fills it in)
    flops_per_token: float = 0.0
    bytes_per_token: float = 0.0   # activations read + written
    weight_bytes: float = 0.0
    network_bytes_per_token: float = 0.0   # what each rank sends and receives per token
    k: int = 0                     # GEMM: inputs per token (per rank)
    n: int = 0                     # GEMM: outputs per token (per rank)
    experts: int = 0               # grouped expert GEMM: number of experts (0: an ordinary op)
    top_k: int = 0                 # grouped expert GEMM: experts per token
    expert_n: tuple[int, ...] = ()  # grouped expert GEMM: (N, K) of its GEMMs, flattened
    context_flops: float = 0.0     # per token of context read (attention's QK^T and PV)
    context_bytes: float = 0.0     # KV bytes per token of context read
    message_bytes_per_token: float = 0.0   # a collective's message (its buffer) per token
    collective: str = ""           # the collective it runs (nanorun.device.COLLECTIVES)

    @property
    def reads_context(self) -> bool:
        """Whether its cost grows with the context of its tokens (attention)."""
        return bool(self.context_flops or self.context_bytes)


@dataclass(frozen=True)
class Shapes:
    """What an op's cost is a function of: the model (the whole model's config) split over
    `tp` ranks, in `dtype_bytes`-byte elements. Widths are one rank's."""

    config: "ModelConfig"
    tp: int = 1
    dtype_bytes: int = 2

    @property
    def d(self) -> int:            # hidden size (every rank holds the whole residual)
        return self.config.hidden_size

    @property
    def q(self) -> int:            # query width
        return self.config.q_size // self.tp

    @property
    def kv(self) -> int:           # key (or value) width
        return self.config.kv_size // self.tp

    @property
    def inter(self) -> int:        # MLP intermediate units (an expert's, in a mixture)
        return self.config.intermediate_size // self.tp

    @property
    def shared(self) -> int:       # a mixture's shared-expert intermediate units (0: none)
        return self.config.shared_expert_intermediate_size // self.tp

    @property
    def heads_dim(self) -> int:    # query heads x head size
        return (self.config.num_heads // self.tp) * self.config.head_dim

    def gemm(self, k: int, n: int, extra_rows: int = 0) -> OpWork:
        """A GEMM of k inputs and n outputs per token: reads its input row, writes its output
        row (plus `extra_rows` elements, e.g. a residual read and written), reads k x n
        weights once per launch."""
        b = self.dtype_bytes
        return OpWork(GEMM, 2.0 * k * n, (k + n + extra_rows) * b, k * n * b, k=k, n=n)


CostFn = Callable[[Shapes], OpWork]


@dataclass(frozen=True)
class OpSpec:
    """A named op of a layer and its facts (the module docstring says what each means)."""

    name: str
    kind: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    side: str = ""                          # "": from the kind
    history: tuple[str, ...] = ()
    indexed_by: tuple[str, ...] = ()
    cost: CostFn | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"op {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if not self.side:
            object.__setattr__(self, "side", NETWORK_SIDE if self.kind == NETWORK else GEMM_SIDE)
        if self.side not in SIDES:
            raise ValueError(f"op {self.name!r}: side {self.side!r} is not one of {SIDES}")
        for what, bufs in (("history", self.history), ("indexed_by", self.indexed_by)):
            if not set(bufs) <= set(self.reads):
                raise ValueError(f"op {self.name!r}: its {what} {bufs} must be buffers it reads "
                                 f"{self.reads}")

    def work(self, config: "ModelConfig", tp: int = 1, dtype_bytes: int = 2) -> OpWork | None:
        """Its per-token work on one of `tp` ranks of `config`'s model, None if it declares no
        cost."""
        if self.cost is None:
            return None
        return replace(self.cost(Shapes(config, tp, dtype_bytes)), kind=self.kind)

    def reads_history_of(self, writer: "OpSpec") -> bool:
        """Whether this op reads what `writer` writes for earlier tokens of its sequences (so
        it depends on writer's launches over every earlier row, not only its own rows)."""
        return bool(set(self.history) & set(writer.writes))
