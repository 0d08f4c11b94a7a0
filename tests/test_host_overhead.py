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


def test_the_bench_writes_a_row_per_layout_size_and_sampling(bench, tmp_path):
    out = tmp_path / "host.json"
    assert bench.main(["--requests", "8", "--steps", "3", "--warmup", "1", "--layouts",
                       "sequential", "overlap", "--sampling", "greedy", "sampled",
                       "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["command"].startswith("python bench/host_overhead.py --requests 8")
    rows = {(r["layout"], r["sampling"]): r for r in doc["rows"]}
    assert set(rows) == {(lay, s) for lay in ("sequential", "overlap")
                         for s in ("greedy", "sampled")}
    for row in rows.values():
        assert row["running_requests"] == 8 and row["async_scheduling"] is False
        assert set(row["breakdown_ms"]) == set(bench.PHASES)
        assert row["host_ms"] > 0 and row["exposed_host_ms"] == row["host_ms"]
        assert row["plan_cache"]["steps"] == 3 and row["graph_cache"]["steps"] == 3
        # the real op list: embed + 32 layers x (10 ops x nano-batches), logits
        splits = 1 if row["layout"] == "sequential" else 2
        assert row["launches_per_step"] == 2 + 32 * 10 * splits
    assert rows[("sequential", "greedy")]["events_per_step"] == 2     # the fork and the join
    assert rows[("overlap", "greedy")]["waits_per_step"] > 2

