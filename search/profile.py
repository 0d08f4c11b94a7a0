"""Measured profiles: what calibrates the cost model to a real GPU.

A profile (JSON, written by `nanorun profile` on a GPU) holds, per op, measured seconds over a
grid of token counts x SM counts (attention at a stated decode context), the device's measured
large-GEMM rate and copy bandwidth, and the slowdown measured when two ops run together on
disjoint partitions. The cost model keeps its roofline shape and multiplies each prediction by
measured / predicted, interpolated over the grid (bilinear in log tokens and SMs, clamped at
the edges), so a profile taken at a few points corrects the model everywhere between them.

Format (version 1):
    {"version": 1, "device": "h100", "model": "llama-3-8b", "tp": 1, "dtype": "bfloat16",
     "gemm_tflops": 702.0, "copy_gbps": 2950.0, "interference": 0.06,
     "ops": {"qkv": {"tokens": [64, 256, 1024], "sms": [32, 64, 132],
                     "seconds": [[...], [...], [...]]},          # seconds[i][j]: tokens[i], sms[j]
             "attention": {"tokens": [...], "sms": [...], "context": 1024, "seconds": [...]},
             "attention_prefill": {...}},      # a prompt's first chunk of each token count
     "pairs": [{"ops": ["gate_up", "attention"], "alone_s": [a, b], "together_s": [a2, b2]}],
     "collectives": [{"collective": "all_reduce", "tp": 8, "ctas": 8,     # profiles at tp > 1
                      "nbytes": [4096, ...], "seconds": [...]}],
     "provenance": {...}}

A profile taken at tp > 1 (`nanorun profile --tp N` under torchrun) times each rank's own shard
of every op, the all-reduce ops included (their per-op factors calibrate them like any op), and
sweeps the collectives over message sizes under the CTA bound the engine runs with: those
tables replace the device spec's published ones (nanorun/device.py) in the cost model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PROFILE_VERSION = 1


class ProfileError(ValueError):
    """A profile file that cannot be used; the message says why."""


@dataclass(frozen=True)
class OpProfile:
    tokens: tuple[int, ...]
    sms: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]      # [len(tokens)][len(sms)]
    context: int | None = None                  # attention: each decode token's context


@dataclass
class Profile:
    device: str
    model: str
    tp: int
    ops: dict[str, OpProfile]
    gemm_tflops: float | None = None
    copy_gbps: float | None = None
    interference: float | None = None
    dtype: str = "bfloat16"
    pairs: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)
    collectives: list[dict[str, Any]] = field(default_factory=list)
    # measured / predicted per op and grid point, set by calibrate()
    _factors: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    # -- calibration ---------------------------------------------------------------------------
    def calibrate(self, predict) -> None:
        """Compute each op's measured/predicted grid; `predict(op, tokens, sms, context)` is the
        uncalibrated cost model's time."""
        self._factors = {}
        for op, p in self.ops.items():
            grid = np.empty((len(p.tokens), len(p.sms)))
            for i, n in enumerate(p.tokens):
                for j, s in enumerate(p.sms):
                    grid[i, j] = p.seconds[i][j] / predict(op, n, s, p.context)
            self._factors[op] = grid

    def factor(self, op: str, tokens: int, sms: int | None) -> float:
        """measured / predicted at (tokens, sms), interpolated; 1.0 for ops not profiled."""
        grid = self._factors.get(op)
        if grid is None:
            return 1.0
        p = self.ops[op]
        x = _position(np.log(np.asarray(p.tokens, dtype=float)), np.log(max(tokens, 1)))
        y = _position(np.asarray(p.sms, dtype=float), float(sms if sms is not None
                                                             else p.sms[-1]))
        return float(_bilinear(grid, x, y))

    def collective_tables(self) -> tuple:
        """The measured collective sweeps as hardware.CollectiveTable (empty at tp 1)."""
        from nanorun.device import CollectiveTable

        return tuple(CollectiveTable(c["collective"], int(c["tp"]),
                                     tuple(int(n) for n in c["nbytes"]),
                                     tuple(float(s) for s in c["seconds"]),
                                     int(c.get("ctas") or 1),
                                     f"measured: nanorun profile ({self.device})")
                     for c in self.collectives)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        ops = {}
        for name, p in self.ops.items():
            d: dict[str, Any] = {"tokens": list(p.tokens), "sms": list(p.sms),
                                 "seconds": [list(r) for r in p.seconds]}
            if p.context is not None:
                d["context"] = p.context
            ops[name] = d
        return {"version": PROFILE_VERSION, "device": self.device, "model": self.model,
                "tp": self.tp, "dtype": self.dtype, "gemm_tflops": self.gemm_tflops,
                "copy_gbps": self.copy_gbps, "interference": self.interference, "ops": ops,
                "pairs": self.pairs, "collectives": self.collectives,
                "provenance": self.provenance}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        if d.get("version") != PROFILE_VERSION:
            raise ProfileError(f"profile version {d.get('version')!r} is not supported (this "
                               f"nanorun reads version {PROFILE_VERSION}); re-run nanorun profile")
        try:
            ops = {}
            for name, o in d["ops"].items():
                tokens, sms = tuple(int(t) for t in o["tokens"]), tuple(int(s) for s in o["sms"])
                seconds = tuple(tuple(float(x) for x in row) for row in o["seconds"])
                if len(seconds) != len(tokens) or any(len(r) != len(sms) for r in seconds):
                    raise ProfileError(f"op {name!r}: seconds must be a {len(tokens)} x "
                                       f"{len(sms)} grid (tokens x sms)")
                if any(x <= 0 for r in seconds for x in r) or list(tokens) != sorted(tokens) \
                        or list(sms) != sorted(sms):
                    raise ProfileError(f"op {name!r}: tokens and sms must be ascending and "
                                       f"every time positive")
                ops[name] = OpProfile(tokens, sms, seconds, o.get("context"))
            prof = cls(device=str(d["device"]), model=str(d["model"]), tp=int(d.get("tp", 1)),
                       ops=ops, gemm_tflops=d.get("gemm_tflops"), copy_gbps=d.get("copy_gbps"),
                       interference=d.get("interference"), dtype=d.get("dtype", "bfloat16"),
                       pairs=list(d.get("pairs", [])), provenance=dict(d.get("provenance", {})),
                       collectives=list(d.get("collectives", [])))
            try:
                prof.collective_tables()
            except ValueError as e:
                raise ProfileError(f"collectives: {e}") from None
            return prof
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ProfileError):
                raise
            raise ProfileError(f"malformed profile ({type(e).__name__}: {e}); see "
                               f"search/profile.py for the format") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise ProfileError(f"cannot read profile {path}: {e}") from None


def _position(axis: np.ndarray, value: float) -> tuple[int, int, float]:
    """Neighbours (i, i+1) on `axis` and the weight of i+1, clamped to the axis' ends."""
    if len(axis) == 1 or value <= axis[0]:
        return 0, 0, 0.0
    if value >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0
    i = int(np.searchsorted(axis, value) - 1)
    return i, i + 1, float((value - axis[i]) / (axis[i + 1] - axis[i]))


def _bilinear(grid: np.ndarray, x, y) -> float:
    (i0, i1, wx), (j0, j1, wy) = x, y
    top = grid[i0, j0] * (1 - wy) + grid[i0, j1] * wy
    bottom = grid[i1, j0] * (1 - wy) + grid[i1, j1] * wy
    return top * (1 - wx) + bottom * wx
