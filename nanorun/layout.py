"""Layout: how one iteration is cut into nano-batches and spread over SM partitions.

A Layout is data (frozen, JSON, versioned), never code: "sequential" and "overlap" are two
values of it, and the planner turns any valid one into a Plan the same way.

JSON form (version 1):
    {"version": 1, "name": "overlap", "batch_tokens": 512,
     "partitions": [{"name": "gemm", "sm_count": 96}, {"name": "attn", "sm_count": 32}],
     "ops": {"qkv": {"splits": [256, 256], "partition": "gemm"}, ...},
     "order": [["attn_norm", 0], ["qkv", 0], ...]}
`splits` are token counts summing to batch_tokens; a smaller batch is cut in the same
proportions. `order` is the issue order of one layer's (op, nano-batch) launches; omitted, it is
op by op, each op's nano-batches in turn, which already lets the GEMM of one nano-batch overlap
the attention of the previous one. An entry [op, nano-batch, 1] is shifted: that launch of layer
l is issued with layer l + 1's launches (software pipelining across layers, so the attention of
one nano-batch can overlap the MLP of another that is a layer behind).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .models import MEMORY, OpSpec, op_spec
from .models import NETWORK_OPS  # noqa: F401  (moved to nanorun.models; old imports name it here)
from .models.op import NETWORK_SIDE

LAYOUT_VERSION = 1
logger = logging.getLogger("nanorun")


class LayoutError(ValueError):
    """A layout that cannot run; the message says what to change."""


@dataclass(frozen=True)
class Partition:
    """A set of SMs with its own stream. sm_count None: the whole device (or the CPU)."""

    name: str
    sm_count: int | None = None


@dataclass(frozen=True)
class OpLayout:
    splits: tuple[int, ...]
    partition: str


@dataclass(frozen=True)
class Layout:
    name: str
    batch_tokens: int
    partitions: tuple[Partition, ...]
    ops: tuple[tuple[str, OpLayout], ...]           # (op name, its layout), model op order
    order: tuple[tuple, ...] = ()                   # (op, nb) or (op, nb, shift); () = op-major
    version: int = LAYOUT_VERSION
    provenance: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.version != LAYOUT_VERSION:
            raise LayoutError(f"layout version {self.version} is not supported (this nanorun "
                              f"reads version {LAYOUT_VERSION})")
        if not _is_int(self.batch_tokens) or self.batch_tokens <= 0:
            raise LayoutError(f"batch_tokens must be a positive int, got {self.batch_tokens!r}")
        names = [p.name for p in self.partitions]
        if not names or len(set(names)) != len(names):
            raise LayoutError(f"partitions need distinct names, got {names}")
        for op, ol in self.ops:
            if sum(ol.splits) != self.batch_tokens or min(ol.splits, default=0) <= 0:
                raise LayoutError(f"op {op!r}: splits {list(ol.splits)} must be positive token "
                                  f"counts summing to batch_tokens={self.batch_tokens}")
            if ol.partition not in names:
                raise LayoutError(f"op {op!r} runs on partition {ol.partition!r}, which is not "
                                  f"one of {names}")

    # -- lookups --------------------------------------------------------------------------------
    def op(self, name: str) -> OpLayout:
        return dict(self.ops)[name]

    def partition_index(self, name: str) -> int:
        return [p.name for p in self.partitions].index(name)

    def issue_order(self) -> tuple[tuple, ...]:
        if self.order:
            return self.order
        return tuple((op, i) for op, ol in self.ops for i in range(len(ol.splits)))

    def issue_slots(self) -> tuple[tuple[str, int, int], ...]:
        """(op, nano-batch, shift) in issue order; shift 1 issues a layer's launch with the
        next layer's."""
        return tuple((e[0], e[1], e[2] if len(e) > 2 else 0) for e in self.issue_order())

    # -- checks against a model and a device ---------------------------------------------------
    def validate(self, model_ops: "Sequence[OpSpec | str]", device) -> None:
        """Raise LayoutError unless this layout fits the model's ops (their declarations, or
        their names: see op_specs) and the device's SMs."""
        specs = op_specs(model_ops)
        names = tuple(op.name for op in specs)
        given = [op for op, _ in self.ops]
        if set(given) != set(names) or len(given) != len(names):
            missing = [o for o in names if o not in given]
            unknown = [o for o in given if o not in names]
            raise LayoutError(f"layout ops must be exactly the model's ops {list(names)}: "
                              f"missing {missing}, unknown {unknown}")
        self._validate_order(specs)
        self._validate_sms(device)

    def _validate_order(self, model_ops: "Sequence[OpSpec | str]") -> None:
        specs = op_specs(model_ops)
        model_ops = tuple(op.name for op in specs)
        spec = {op.name: op for op in specs}
        wanted = {(op, i) for op, ol in self.ops for i in range(len(ol.splits))}
        slots = self.issue_slots()
        order = [(op, i) for op, i, _ in slots]
        if len(order) != len(wanted) or set(order) != wanted:
            raise LayoutError("order must list every (op, nano-batch) of the layout exactly once")
        if any(shift not in (0, 1) for _, _, shift in slots):
            raise LayoutError("an order entry's shift (its third element) must be 0 or 1")
        # Within a layer, a launch is issued at (shift, position in the order).
        position = {(op, i): (shift, n) for n, (op, i, shift) in enumerate(slots)}
        rank = {op: n for n, op in enumerate(model_ops)}
        bounds = {op: _bounds(ol.splits) for op, ol in self.ops}
        for a, i in order:
            for b, j in order:
                # An op reading the history of what another writes (attention, the KV that
                # kv_append wrote for every earlier token of its sequences) conflicts with
                # that op's launches over any earlier rows.
                rb = (0, bounds[b][j][1]) if spec[b].reads_history_of(spec[a]) else bounds[b][j]
                if rank[a] < rank[b] and position[(b, j)] < position[(a, i)] \
                        and _overlap(bounds[a][i], rb):
                    raise LayoutError(
                        f"order issues ({b!r}, {j}) before ({a!r}, {i}), but it needs that "
                        f"op's result for the same tokens: a dependency cycle")

    def _validate_sms(self, device) -> None:
        if device.sm_count is None:
            return
        counts = [p.sm_count for p in self.partitions if p.sm_count is not None]
        for p in self.partitions:
            if p.sm_count is None:
                continue
            if p.sm_count <= 0 or p.sm_count % device.sm_granularity:
                raise LayoutError(
                    f"partition {p.name!r}: {p.sm_count} SMs is not a positive multiple of "
                    f"{device.name}'s granularity of {device.sm_granularity}")
        if sum(counts) > device.sm_count:
            raise LayoutError(f"partitions take {sum(counts)} SMs but {device.name} has "
                              f"{device.sm_count}")

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version, "name": self.name, "batch_tokens": self.batch_tokens,
            "partitions": [{"name": p.name, "sm_count": p.sm_count} for p in self.partitions],
            "ops": {op: {"splits": list(ol.splits), "partition": ol.partition}
                    for op, ol in self.ops},
        }
        if self.order:
            d["order"] = [[op, i] + ([1] if shift else []) for op, i, shift in self.issue_slots()]
        if self.provenance:
            d["provenance"] = self.provenance
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "layout JSON") -> "Layout":
        """The Layout a to_dict() (or a layout file) describes. Anything malformed raises a
        LayoutError naming `source`, the field and what it should be."""
        return cls(**_parse_layout(d, source))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Layout":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LayoutError(f"cannot read layout {path}: {e}") from None
        try:
            return cls.from_dict(d, source=f"layout {path}")
        except LayoutError as e:
            if str(path) in str(e):
                raise
            raise LayoutError(f"layout {path}: {e}") from None


# -- reading layout JSON -------------------------------------------------------------------------
# "predicted": what `nanorun tune` predicted for the layout (read by people, not by the engine).
_LAYOUT_KEYS = ("version", "name", "batch_tokens", "partitions", "ops", "order", "provenance",
                "predicted")


def _parse_layout(d: Any, source: str) -> dict[str, Any]:
    """Layout's fields from its JSON form, every value's type checked (json.loads gives floats
    for 1e3 and Infinity, bools for true, which int() would quietly take)."""
    def fail(what: str) -> LayoutError:
        return LayoutError(f"{source}: {what}; see docs/layout.md for the format")

    if not isinstance(d, dict):
        raise fail(f"malformed: must be a JSON object, got {type(d).__name__}")
    unknown = sorted(set(d) - set(_LAYOUT_KEYS))
    if unknown:
        raise fail(f"unknown field(s) {unknown}; a layout has {list(_LAYOUT_KEYS)}")
    for key in ("batch_tokens", "partitions", "ops"):
        if key not in d:
            raise fail(f"malformed: field {key!r} is missing")
    version = d.get("version", LAYOUT_VERSION)
    if not _is_int(version):
        raise fail(f"'version' must be an int, got {version!r}")
    name = d.get("name", "custom")
    if not isinstance(name, str):
        raise fail(f"'name' must be a string, got {name!r}")
    if not _is_int(d["batch_tokens"]) or d["batch_tokens"] <= 0:
        raise fail(f"'batch_tokens' must be a positive int, got {d['batch_tokens']!r}")
    provenance = d.get("provenance", {})
    if not isinstance(provenance, dict):
        raise fail(f"'provenance' must be an object, got {provenance!r}")
    return dict(version=version, name=name, batch_tokens=d["batch_tokens"],
                partitions=_parse_partitions(d["partitions"], fail),
                ops=_parse_ops(d["ops"], fail), order=_parse_order(d.get("order", []), fail),
                provenance=dict(provenance))


def _parse_partitions(parts: Any, fail) -> tuple[Partition, ...]:
    if not isinstance(parts, list) or not parts:
        raise fail(f"'partitions' must be a non-empty list, got {parts!r}")
    out = []
    for i, p in enumerate(parts):
        if not isinstance(p, dict) or not isinstance(p.get("name"), str) \
                or set(p) - {"name", "sm_count"}:
            raise fail(f"partitions[{i}] must be {{\"name\": str, \"sm_count\": int or null}}, "
                       f"got {p!r}")
        sms = p.get("sm_count")
        if sms is not None and not _is_int(sms):
            raise fail(f"partitions[{i}].sm_count must be an int or null, got {sms!r}")
        out.append(Partition(p["name"], sms))
    return tuple(out)


def _parse_ops(ops: Any, fail) -> tuple[tuple[str, OpLayout], ...]:
    if not isinstance(ops, dict) or not ops:
        raise fail(f"'ops' must be a non-empty object of op name -> layout, got {ops!r}")
    out = []
    for op, v in ops.items():
        if not isinstance(v, dict) or set(v) != {"splits", "partition"}:
            raise fail(f"ops.{op} must be {{\"splits\": [ints], \"partition\": str}}, got {v!r}")
        splits, partition = v["splits"], v["partition"]
        if not isinstance(splits, list) or not splits or not all(_is_int(t) for t in splits):
            raise fail(f"ops.{op}.splits must be a non-empty list of ints, got {splits!r}")
        if not isinstance(partition, str):
            raise fail(f"ops.{op}.partition must be a partition name, got {partition!r}")
        out.append((op, OpLayout(tuple(splits), partition)))
    return tuple(out)


def _parse_order(order: Any, fail) -> tuple[tuple, ...]:
    if not isinstance(order, list):
        raise fail(f"'order' must be a list of [op, nano-batch] or [op, nano-batch, shift], "
                   f"got {order!r}")
    out = []
    for n, e in enumerate(order):
        if not (isinstance(e, list) and len(e) in (2, 3) and isinstance(e[0], str)
                and all(_is_int(x) for x in e[1:]) and e[1] >= 0
                and (len(e) == 2 or e[2] in (0, 1))):
            raise fail(f"order[{n}] must be [op, nano-batch] or [op, nano-batch, shift] with "
                       f"nano-batch an int >= 0 and shift 0 or 1, got {e!r}")
        out.append((e[0], e[1]) + ((1,) if len(e) == 3 and e[2] else ()))
    return tuple(out)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _bounds(splits: tuple[int, ...]) -> list[tuple[int, int]]:
    edges = [0]
    for s in splits:
        edges.append(edges[-1] + s)
    return list(zip(edges[:-1], edges[1:]))


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


# -- a model's ops ------------------------------------------------------------------------------
def op_specs(model_ops: "Sequence[OpSpec | str]") -> tuple[OpSpec, ...]:
    """The declarations of a model's ops (nanorun.models), given as OpSpecs or by name. A name
    is looked up among the registered families' declarations (nanorun.models.op_spec), whose
    placement facts agree for every declaration of a name; a name no family declares stands
    for an op with no facts (a memory op on the GEMM side, reading no one's history)."""
    out = []
    for op in model_ops:
        if isinstance(op, str):
            op = op_spec(op) or OpSpec(op, MEMORY, (), ())
        out.append(op)
    return tuple(out)


# -- built-in layouts ----------------------------------------------------------------------------
def sequential(model_ops: "Sequence[OpSpec | str]", batch_tokens: int) -> Layout:
    """One nano-batch on one full-device partition: the baseline."""
    whole = OpLayout((batch_tokens,), "device")
    return Layout("sequential", batch_tokens, (Partition("device"),),
                  tuple((op.name, whole) for op in op_specs(model_ops)))


def overlap(model_ops: "Sequence[OpSpec | str]", batch_tokens: int, device) -> Layout:
    """NanoFlow-style: two nano-batches; each op on the partition of the side it prefers
    (OpSpec.side): the GEMMs (with the norms and activation feeding them) on "gemm", rope + KV
    append + attention on "attn", so the GEMMs of one nano-batch run while the other's
    attention streams the KV cache. SMs: three quarters to the GEMMs.

    A tensor-parallel model's all-reduces (network ops) go on a third partition, "net": its
    stream stands for NCCL's own, and its SMs (NCCL's bounded CTA count rounded up to whole
    granules, taken from the GEMMs' share) for what the collectives occupy. Op by op, the
    all-reduce of nano-batch 0 then runs while nano-batch 1's o_proj or down still computes.

    A prefill engine's kv_send (a point-to-point send, NCCL's on a GPU) goes on "net" too: layer
    l's KV leaves while layer l + 1's GEMMs and attention compute."""
    specs = op_specs(model_ops)
    if batch_tokens < 2:
        return sequential(specs, batch_tokens)
    half = batch_tokens // 2
    splits = (half, batch_tokens - half)
    networked = any(op.side == NETWORK_SIDE for op in specs)
    if device.sm_count is None:
        gemm_sms = attn_sms = net_sms = None
    else:
        g = device.sm_granularity
        usable = device.sm_count // g * g
        gemm_sms = max(g, round(usable * 0.75 / g) * g)
        attn_sms = usable - gemm_sms
        net_sms = None
        if networked:
            from .distributed import nccl_max_ctas

            # Room for NCCL's bounded CTAs, in whole granules (one on Hopper, four on an A100).
            net_sms = -(-nccl_max_ctas() // g) * g
            gemm_sms -= net_sms
    parts = (Partition("gemm", gemm_sms), Partition("attn", attn_sms))
    if networked:
        parts += (Partition("net", net_sms),)
    # The partitions are named as the sides (models.op.SIDES: "gemm", "attn", "net").
    ops = tuple((op.name, OpLayout(splits, op.side)) for op in specs)
    return Layout("overlap", batch_tokens, parts, ops)


# -- tuned layouts ("auto") ----------------------------------------------------------------------
# `nanorun tune` writes MODEL.GPU[.tpN].BATCH.json; "auto" reads the same names back. One place
# says where they live, so the writer and the reader cannot drift apart.
LAYOUT_DIR_ENV = "NANORUN_LAYOUT_DIR"
LOCAL_LAYOUT_DIR = "layouts"


def tuned_layout_dir() -> Path:
    """Where `nanorun tune` writes: $NANORUN_LAYOUT_DIR if set, else ./layouts."""
    return Path(os.environ.get(LAYOUT_DIR_ENV) or LOCAL_LAYOUT_DIR)


# Layouts shipped inside the package: the runtime's own data (it reads them; the search, which
# writes layouts, sits above the runtime and is never imported by it).
SHIPPED_LAYOUT_DIR = Path(__file__).parent / "layouts"


def tuned_layout_dirs() -> tuple[Path, ...]:
    """Where "auto" looks, first match wins: $NANORUN_LAYOUT_DIR if set, ./layouts, then the
    layouts shipped inside the package (nanorun/layouts in the repository)."""
    env = os.environ.get(LAYOUT_DIR_ENV)
    dirs = ([Path(env)] if env else []) + [Path(LOCAL_LAYOUT_DIR), SHIPPED_LAYOUT_DIR]
    return tuple(dict.fromkeys(dirs))


def tuned_layout_stem(model_name: str, device_name: str, tp: int = 1) -> str:
    """MODEL.GPU, with .tpN when the model is split over tp > 1 devices (its ops differ)."""
    return f"{model_name}.{device_name}" + (f".tp{tp}" if tp > 1 else "")


def tuned_layout_path(model_name: str, device_name: str, batch_tokens: int,
                      tp: int = 1) -> Path:
    """Where `nanorun tune` stores its layout for a model, device, tp and dense batch size."""
    return tuned_layout_dir() / f"{tuned_layout_stem(model_name, device_name, tp)}." \
                                f"{batch_tokens}.json"


def find_tuned_layouts(model_name: str, device_name: str, tp: int = 1) -> dict[int, Path]:
    """The stored tuned layouts for a model, device and tp by dense batch size; where several
    directories hold one size, the first in tuned_layout_dirs() order."""
    prefix = tuned_layout_stem(model_name, device_name, tp) + "."
    found: dict[int, Path] = {}
    for root in tuned_layout_dirs():
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            size = path.name.removeprefix(prefix).removesuffix(".json")
            if path.name.startswith(prefix) and path.suffix == ".json" and size.isdigit():
                found.setdefault(int(size), path)
    return found


def tuned_layout(model_name: str, device_name: str, tp: int = 1,
                 batch_tokens: int | None = None) -> Layout | None:
    """The tuned layout "auto" takes, named by its file, or None (after a warning saying what
    exists and what to do) when there is none to take.

    batch_tokens given: the layout for exactly that dense batch size. None: the engine adopts
    the tuned batch size, so one is chosen: among the layouts of the first directory (in
    tuned_layout_dirs() order) that holds any, the most recently written, the largest batch
    size on a tie. A user's own tuning thus wins over a shipped layout, and a re-run of
    `nanorun tune` over an older one."""
    found = find_tuned_layouts(model_name, device_name, tp)
    what = f"{tuned_layout_stem(model_name, device_name, tp)}.BATCH.json"
    if not found:
        tp_flag = f" --tp {tp}" if tp > 1 else ""
        logger.warning("layout auto: no tuned layout %s in $%s, ./%s or the package's layouts; "
                       "using 'overlap'. Run `nanorun tune %s --gpu %s%s` to make one",
                       what, LAYOUT_DIR_ENV, LOCAL_LAYOUT_DIR, model_name, device_name, tp_flag)
        return None
    if batch_tokens is None:
        first_dir = next(iter(found.values())).parent
        batch_tokens = max((b for b, p in found.items() if p.parent == first_dir),
                           key=lambda b: (found[b].stat().st_mtime, b))
    elif batch_tokens not in found:
        logger.warning("layout auto: no tuned layout for max_batch_tokens=%d (%s exists for %s "
                       "tokens); using 'overlap'. Leave max_batch_tokens unset to adopt the "
                       "tuned size, or set it to one of those", batch_tokens, what,
                       ", ".join(str(b) for b in sorted(found)))
        return None
    path = found[batch_tokens]
    logger.warning("layout auto: using the tuned layout %s (dense batch %d tokens)", path.name,
                   batch_tokens)
    return replace(Layout.load(path), name=path.name)


def is_layout_file(layout) -> bool:
    """Whether a user's layout argument names a layout JSON file."""
    return isinstance(layout, (str, Path)) and Path(layout).suffix == ".json"


def resolve_layout(layout, model_ops: "Sequence[OpSpec | str]", batch_tokens: int, device,
                   model_name: str = "", tp: int = 1) -> Layout:
    """A Layout from what a user passed: a Layout, a built-in name, "auto" (the tuned layout for
    this model, device, tp and batch size, else "overlap"), or a JSON path."""
    if layout == "auto":
        layout = tuned_layout(model_name, device.name, tp, batch_tokens) or "overlap"
    if isinstance(layout, Layout):
        result = layout
    elif layout == "sequential":
        result = sequential(model_ops, batch_tokens)
    elif layout == "overlap":
        result = overlap(model_ops, batch_tokens, device)
    elif is_layout_file(layout):
        result = Layout.load(layout)
    else:
        raise LayoutError(f"unknown layout {layout!r}: use 'sequential', 'overlap', 'auto', "
                          f"a Layout, or the path of a layout .json file")
    if result.batch_tokens != batch_tokens:
        raise LayoutError(f"layout {result.name!r} is for a dense batch of "
                          f"{result.batch_tokens} tokens but the engine's max_batch_tokens is "
                          f"{batch_tokens}; make them equal")
    result.validate(model_ops, device)
    return result
