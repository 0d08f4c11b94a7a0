"""`nanorun provision`: the cluster simulation on hand-checkable cases, the SLO search, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanorun.cli import main
from nanorun.search.cluster import MACHINES, ClusterSim, Machine, MachineKind, Requests
from nanorun.search.itertable import IterationTable
from nanorun.search.provision import Design, Provisioner, parse_slos, search

H100 = MACHINES["h100"]
BIG = 10**9   # KV capacity that never binds


def _constant(seconds: float, batch_tokens: int = 16) -> IterationTable:
    """Every iteration takes `seconds`, whatever it holds."""
    return IterationTable((1, batch_tokens), (0.0, 1.0), (64, 128),
                          np.full((2, 2, 2), seconds))


def _linear(base: float, per_token: float, batch_tokens: int = 256) -> IterationTable:
    """base + per_token x tokens: a machine whose capacity the load can exceed."""
    tokens = (1, batch_tokens)
    seconds = np.array([[[base + per_token * n] * 2] * 2 for n in tokens])
    return IterationTable(tokens, (0.0, 1.0), (64, 4096), seconds)


def _requests(arrivals, prompt, output) -> Requests:
    return Requests(np.asarray(arrivals, float), np.asarray(prompt), np.asarray(output))


def _machine(i, home, table, kind=H100) -> Machine:
    return Machine(i, kind, home, {home: table, "mixed": table}, BIG, 64)


# -- the simulation, by hand --------------------------------------------------------------------
def test_one_mixed_machine_known_ttft_and_tbt():
    # Iterations of 10 ms; dense batch 16. Request 0 (4 prompt, 3 output tokens) at t=0:
    # prefill [0, 10] ms -> first token at 10 ms, then tokens at 20 and 30 ms. Request 1 at
    # 100 ms finds the machine idle: its first token at 110 ms, its second at 120.
    sim = ClusterSim([_machine(0, "mixed", _constant(0.010))],
                     _requests([0.0, 0.100], [4, 4], [3, 2]),
                     kv_bytes_per_token=1, num_layers=1)
    out = sim.run()
    assert out.finished == 2
    np.testing.assert_allclose(out.ttft, [0.010, 0.010])
    np.testing.assert_allclose(out.tbt_mean, [0.010, 0.010])
    assert out.iterations == 3 + 2


def test_prompt_longer_than_the_batch_is_chunked_and_shares_iterations():
    # 40 prompt tokens in a 16-token batch: 3 iterations of prefill (16, 16, 8). A second
    # request arriving at once fills the third iteration's 8 free tokens and finishes
    # prefill in the fourth: SplitFuse.
    sim = ClusterSim([_machine(0, "mixed", _constant(0.010))],
                     _requests([0.0, 0.0], [40, 10], [1, 1]), kv_bytes_per_token=1,
                     num_layers=1)
    out = sim.run()
    np.testing.assert_allclose(out.ttft, [0.030, 0.040])


def test_split_cluster_pays_only_the_exposed_kv_transfer():
    # Prompt machine: 10 ms iterations; token machine: 5 ms. 1000 prompt tokens of 1 MB KV
    # each over 8 Gb/s (1 GB/s): 1 s to send, of which the 10 ms prefill hides 10 ms, so
    # 0.99 s is exposed. Over 80 layers with a 1 s prefill, only one layer's share shows.
    token = _constant(0.005, 1024)
    slow = MachineKind("h100", 8, 38.0, 10.2, network_gbps=8.0)

    def run(prefill_s):
        machines = [_machine(0, "prompt", _constant(prefill_s, 1024), slow),
                    _machine(1, "token", token, slow)]
        return ClusterSim(machines, _requests([0.0], [1000], [3]),
                          kv_bytes_per_token=10**6, num_layers=80).run()

    out = run(0.010)
    assert out.ttft[0] == pytest.approx(0.010)
    # Second token: prefill end + exposed transfer + one decode iteration; third 5 ms later.
    second = 0.010 + (1.0 - 0.010) + 0.005
    assert out.tbt_mean[0] == pytest.approx(((second - 0.010) + 0.005) / 2)
    out = run(1.0)
    assert out.tbt_mean[0] == pytest.approx(((1.0 / 80 + 0.005) + 0.005) / 2)


def test_join_shortest_queue_spreads_prompts():
    machines = [_machine(i, "mixed", _constant(0.010)) for i in range(2)]
    out = ClusterSim(machines, _requests([0.0, 0.0], [16, 16], [1, 1]),
                     kv_bytes_per_token=1, num_layers=1).run()
    np.testing.assert_allclose(out.ttft, [0.010, 0.010])   # one each, in parallel


def test_borrowing_lends_a_token_machine_when_the_prompt_queue_is_long():
    prompt, token = _constant(0.010, 64), _constant(0.002, 64)
    reqs = _requests([0.0] * 6, [64] * 6, [2] * 6)

    def run(borrow):
        machines = [_machine(0, "prompt", prompt), _machine(1, "token", token)]
        return ClusterSim(machines, reqs, kv_bytes_per_token=1, num_layers=1, borrow=borrow,
                          long_queue_tokens=128).run()

    strict, pooled = run(False), run(True)
    assert strict.borrowed == 0 and pooled.borrowed > 0
    assert pooled.ttft.max() < strict.ttft.max()
    assert pooled.finished == strict.finished == 6


def test_an_overloaded_cluster_is_cut_off_and_misses_every_bound():
    reqs = _requests(np.linspace(0, 1, 50), [256] * 50, [4] * 50)
    sim = ClusterSim([_machine(0, "mixed", _linear(0.5, 0.0))], reqs, kv_bytes_per_token=1,
                     num_layers=1, time_limit=5.0)
    out = sim.run()
    assert out.finished < 50 and np.isinf(out.ttft).any()


# -- SLOs and the search ------------------------------------------------------------------------
def test_slo_parsing_and_clear_errors():
    slos = parse_slos("ttft_p99=6x, tbt_p50=100ms,ttft_p50=1.5s")
    assert [str(s) for s in slos] == ["ttft_p99=6x", "tbt_p50=100ms", "ttft_p50=1500ms"]
    with pytest.raises(ValueError, match="Did you mean 'ttft_p99'"):
        parse_slos("tft_p99=6x")
    with pytest.raises(ValueError, match="positive slowdown"):
        parse_slos("tbt_p90=fast")
    with pytest.raises(ValueError, match="empty"):
        parse_slos(" , ")


class _Config:
    """What the Provisioner reads of a model."""

    name, num_layers, num_params = "toy", 4, 10**6

    @staticmethod
    def kv_bytes_per_token(dtype_bytes):
        return 1024


def _provisioner(rate: float, slos: str = "ttft_p90=300ms,tbt_p90=40ms") -> Provisioner:
    rng = np.random.default_rng(0)
    n = 300
    arrivals = np.concatenate([[0.0], np.cumsum(rng.exponential(1 / rate, n - 1))])
    reqs = _requests(arrivals, rng.integers(50, 400, n), rng.integers(2, 40, n))
    table = _linear(0.004, 0.0001)
    tables = {("h100", role): table for role in ("mixed", "prompt", "token")}
    return Provisioner(_Config(), MACHINES, tables, reqs, parse_slos(slos), "h100")


@pytest.mark.parametrize("design", [Design("h100"), Design("h100", "h100")],
                         ids=lambda d: d.name)
def test_more_load_never_needs_fewer_machines(design):
    sizes = [search(_provisioner(rate), design, limit=24) for rate in (20, 60, 180)]
    assert all(s is not None for s in sizes)
    totals = [sum(s) for s in sizes]
    assert totals == sorted(totals) and totals[-1] > totals[0]
    # The found size meets the SLOs; for a mixed pool one machine fewer does not.
    prov = _provisioner(180)
    found = search(prov, design, limit=24)
    assert prov.meets(design, found)
    if not design.split:
        assert not prov.meets(design, (found[0] - 1,))


# -- the command line ---------------------------------------------------------------------------
def _tiny(tmp_path, *extra):
    return ["provision", "llama-2-7b", "--gpu", "h100", "--trace", "azure-code",
            "--num-requests", "60", "--rate", "4", "--layout", "sequential",
            "--designs", "mixed-h100,splitwise-h100/h100", "--out", str(tmp_path / "p.json"),
            *extra]


def test_cli_writes_json_and_plot(tmp_path, capsys):
    assert main(_tiny(tmp_path)) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert doc["command"].startswith("nanorun provision") and "/work" not in doc["command"]
    assert doc["machines"]["h100"]["source"]
    (trace,) = doc["traces"]
    assert "CC-BY-4.0" in trace["source"]
    names = [d["design"] for d in trace["designs"]]
    assert names == ["mixed-h100", "splitwise-h100/h100"]
    for d in trace["designs"]:
        if d["meets_slos"]:
            assert d["tokens_per_dollar"] > 0 and d["tokens_per_s_per_kw"] > 0
    assert trace["splitwise_direction"]["splitwise_expects"] == "token < prompt"
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [
    (["--gpu", "h900"], "unknown device 'h900'"),
    (["--gpu", "l40s"], "no machine defaults for GPU 'l40s'"),
    (["--trace", "azure-chat"], "unknown trace 'azure-chat'"),
    (["--slo", "ttft_p99=6x,tbt_p95=2x"], "unknown SLO 'tbt_p95'"),
    (["--designs", "splitwise-h100/a100"], "unknown design"),
    (["--cost", "h100=cheap"], "GPU=NUMBER"),
    (["--rate", "20,0"], "positive finite"),
])
def test_cli_bad_input_says_what_to_change(tmp_path, capsys, flags, message):
    assert main(_tiny(tmp_path, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
