"""bench/host_overhead.py runs on tiny sizes and writes the fields the README and issue 14 read."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("host_overhead",
                                                  ROOT / "bench" / "host_overhead.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_bench_writes_a_row_per_layout_size_sampling_and_mode(bench, tmp_path):
    out = tmp_path / "host.json"
    assert bench.main(["--requests", "8", "--steps", "3", "--warmup", "1", "--layouts",
                       "sequential", "overlap", "--sampling", "greedy", "sampled",
                       "--device-ms", "5", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python bench/host_overhead.py --requests 8")
    rows = {(r["layout"], r["sampling"], r["async_scheduling"]): r for r in doc["rows"]}
    assert set(rows) == {(lay, s, a) for lay in ("sequential", "overlap")
                         for s in ("greedy", "sampled") for a in (False, True)}
    for (_, _, mode), row in rows.items():
        assert row["running_requests"] == 8 and row["device_ms"] == 5
        assert set(row["breakdown_ms"]) == set(bench.PHASES)
        assert row["host_ms"] > 0
        # Each step's phases add up to its host time (bookkeeping is the remainder), so the
        # phases' minima over the steps add up to at most the quickest step. Medians need not
        # add up: on a loaded machine the OS's time slices land in different phases.
        assert 0 < sum(row["breakdown_min_ms"].values()) <= row["host_ms_min"] + 0.01
        if not mode:    # the device waits through the whole host path
            assert row["exposed_host_ms"] >= 0.9 * row["host_ms_min"]
        assert row["plan_cache"]["steps"] == 3 and row["graph_cache"]["steps"] == 3
        # the real op list: embed + 32 layers x (10 ops x nano-batches), logits
        splits = 1 if row["layout"] == "sequential" else 2
        assert row["launches_per_step"] == 2 + 32 * 10 * splits
    assert rows[("sequential", "greedy", False)]["events_per_step"] == 2   # the fork and join
    assert rows[("overlap", "greedy", False)]["waits_per_step"] > 2


def test_async_scheduling_hides_the_host_path_behind_the_device(bench):
    """A host path far shorter than the device's iteration: synchronous, the device waits
    for all of it every iteration; async, for none of it (a margin for a loaded machine)."""
    rows = [bench.measure("sequential", "sequential", 256, 16, False, steps=6, warmup=2,
                          vocab=32, async_scheduling=mode, device_ms=30.0)
            for mode in (False, True)]
    sync, fast = rows
    assert sync["exposed_host_ms"] >= 0.9 * sync["host_ms_min"] > 0
    assert fast["exposed_host_ms"] < 0.5 * sync["exposed_host_ms"]
