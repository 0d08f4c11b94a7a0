"""Tensor parallelism on CPU: the weight split reproduces the full model's math, and two gloo
processes generate the tokens one process does.

The ranks sum partial GEMMs through an allreduce, which is not one process's reduction order:
each of their sequences is one process's, or differs first at a near-tie of one process's
logits (tests/tokens.py), after which it is not compared.

The two-process test starts this file as a script twice, with the environment torchrun would
give each rank (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so it runs the same
path as `torchrun --nproc-per-node 2` without the launcher's start-up cost.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from executor_rig import workspace_buffers
from ranks import join_ranks, start_ranks
from tokens import assert_same_tokens

from nanorun import LLM, SamplingParams
from nanorun.config import EngineConfig
from nanorun.layout import LAYOUT_DIR_ENV, NETWORK_OPS, overlap
from nanorun.models import (LAYER_OPS, ModelConfigError, TP_LAYER_OPS, get_preset, layer_ops,
                            random_weights, shard_config, shard_ranges,
                            shard_weights)
from nanorun.search import get_device

PROMPT_LENGTHS = [3, 17, 40, 1, 25, 9]
BATCH_TOKENS = 16                      # < the longest prompts: prefill runs in chunks
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, seed=3, ignore_eos=True)
# n > 1 shares the prompt's KV: every rank must fork (and copy) alike.
N_SAMPLED = SamplingParams(n=3, max_tokens=4, temperature=0.9, seed=5, ignore_eos=True)
RUNS = [("tiny-llama", "sequential"), ("tiny-llama", "overlap"), ("tiny-qwen2", "overlap")]
AUTO_BATCH_TOKENS = 48
WORKER_TIMEOUT_S = 180


def _prompts(vocab: int = 2048) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


def _llm(model: str, layout: str, **kw) -> LLM:
    return LLM(model, layout=layout, max_batch_tokens=BATCH_TOKENS, kv_cache_tokens=1024, **kw)


def _generate(llm: LLM) -> dict:
    prompts = _prompts()
    return {"greedy": [o.token_ids for o in llm.generate(prompts, GREEDY)],
            "sampled": [o.token_ids for o in llm.generate(prompts, SAMPLED)],
            "n3": [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, N_SAMPLED)],
            "logits": llm.engine.prompt_logits(prompts[2]).tolist()}


# -- two processes == one process ---------------------------------------------------------------
def test_two_gloo_ranks_generate_the_tokens_of_one_process(tmp_path):
    # Only rank 0 finds a tuned layout for "auto": both must run it, at its batch size.
    tuned = tmp_path / "layouts0" / f"tiny-llama.cpu.tp2.{AUTO_BATCH_TOKENS}.json"
    tuned.parent.mkdir()
    (tmp_path / "layouts1").mkdir()
    overlap(tuple(op.name for op in layer_ops(2)), AUTO_BATCH_TOKENS, get_device("cpu")).save(tuned)
    # Likewise a request log to fit the length predictor on, in rank 0's directory only.
    rows = [f"XXX,{p},{o}" for p, o in [(10, 5)] * 120 + [(600, 90)] * 120]
    (tmp_path / "log.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                      + "\n".join(rows) + "\n")
    procs = start_ranks(__file__, tmp_path, 2,
                        env=lambda rank: {LAYOUT_DIR_ENV: str(tmp_path / f"layouts{rank}")},
                        cwd=_rank_dir(tmp_path))
    llms = {f"{m}/{lay}": _llm(m, lay) for m, lay in RUNS}
    single = {key: _generate(llm) for key, llm in llms.items()}
    results = join_ranks(procs, WORKER_TIMEOUT_S)
    for key, want in single.items():
        for rank, got in enumerate(results):
            _assert_same_tokens(got[key], want, llms[key].engine, f"{key}: rank {rank}")
            diff = (torch.tensor(got[key]["logits"]) - torch.tensor(want["logits"])).abs().max()
            assert diff < 1e-4, f"{key}: rank {rank}'s prompt logits differ by {diff}"
    assert results[0]["is_driver"] and not results[1]["is_driver"]
    assert [r["auto"] for r in results] == [[tuned.name, AUTO_BATCH_TOKENS]] * 2
    assert [r["predictor"] for r in results] == [["bucketed:log", [5.0, 90.0]]] * 2
    assert [r["driver_error"] for r in results] == ["ValueError: only rank 0 decides"] * 2
    assert all(r["race_detector_ok"] for r in results)


def _assert_same_tokens(got: dict, want: dict, engine, what: str) -> None:
    """A rank's greedy, sampled and n = 3 sequences against one process's (`want`, from
    `engine`, whose prompt_logits explain a difference)."""
    for i, prompt in enumerate(_prompts()):
        same = dict(prompt=prompt, logits_of=engine.prompt_logits)
        for kind, params in (("greedy", GREEDY), ("sampled", SAMPLED)):
            assert_same_tokens(got[kind][i], want[kind][i], params=params, **same,
                               what=f"{what}'s {kind} tokens of prompt {i}")
        assert len(got["n3"][i]) == N_SAMPLED.n
        for j, (mine, theirs) in enumerate(zip(got["n3"][i], want["n3"][i])):
            # sequence j of n draws as a request of its own with seed + j
            child = dataclasses.replace(N_SAMPLED, n=1, seed=N_SAMPLED.seed + j)
            assert_same_tokens(mine, theirs, params=child, **same,
                               what=f"{what}'s n = 3 tokens {j} of prompt {i}")


def _rank_dir(tmp_path: Path):
    """Rank 0 runs in tmp_path (where the request log is), the others in a directory each."""
    def cwd(rank: int) -> Path:
        path = tmp_path if rank == 0 else tmp_path / f"rank{rank}"
        path.mkdir(exist_ok=True)
        return path
    return cwd


def _rank_main(out_path: str) -> None:
    """One rank: generate under every run of RUNS, and check the overlap plan under random
    execution orders. The first LLM initialises the process group from the environment, the
    others find it initialised."""
    torch.set_num_threads(1)
    llms = {f"{m}/{lay}": _llm(m, lay, tensor_parallel_size=2) for m, lay in RUNS}
    result = {key: _generate(llm) for key, llm in llms.items()}
    first = llms[f"{RUNS[0][0]}/{RUNS[0][1]}"]
    result["is_driver"] = first.is_driver
    result["race_detector_ok"] = _random_orders_agree(llms["tiny-llama/overlap"].engine)
    auto = LLM("tiny-llama", layout="auto", kv_cache_tokens=1024, tensor_parallel_size=2).engine
    result["auto"] = [auto.executor.layout_name, auto.config.max_batch_tokens]
    hrrn = LLM("tiny-llama", kv_cache_tokens=1024, tensor_parallel_size=2,
               scheduling_policy="hrrn", length_predictor="log.csv").engine
    predictor = hrrn.scheduler.predictor
    result["predictor"] = [predictor.name, list(predictor.medians)]
    try:
        hrrn.tensor_parallel.on_driver(_only_rank_0_decides)
    except ValueError as e:
        result["driver_error"] = f"ValueError: {e}"
    Path(out_path).write_text(json.dumps(result))
    first.shutdown()


def _only_rank_0_decides():
    raise ValueError("only rank 0 decides")


def _random_orders_agree(engine) -> bool:
    """The tensor-parallel overlap plan run in random dependency-respecting orders (the same
    seed on every rank, so the collectives still pair up) gives the issue-order logits, with the
    workspace and the batch's KV slots poisoned before each run."""
    from nanorun.batch import build_batch

    for i, prompt in enumerate(_prompts()):
        engine.add_request(f"race{i}", prompt, GREEDY)
    for _ in range(4):     # some requests decoding, one prompt split across iterations
        engine.step()
    chunks = engine.scheduler.schedule().chunks
    batch = build_batch(chunks, engine.kv_cache.page_size, engine.device, logits_for_all=True)
    ex = engine.executor
    runs = [_poisoned_run(engine, batch, seed) for seed in (None, 0, 1, 2, 3)]
    engine.abort_request([f"race{i}" for i in range(len(PROMPT_LENGTHS))])
    engine.step()
    return ex.layout.name == "overlap" and all(
        bool(torch.isfinite(r).all()) and torch.equal(r, runs[0]) for r in runs)


def _poisoned_run(engine, batch, order_seed):
    for buf in workspace_buffers(engine.executor.ws):
        buf.fill_(float("nan"))
    kv = engine.kv_cache
    for cache in (kv.k, kv.v):
        cache.view(cache.shape[0], -1, *cache.shape[3:])[:, batch.slot_mapping] = float("nan")
    return engine.executor.run(batch, order_seed=order_seed)


# -- the split reproduces the full model's math (fp64) --------------------------------------------
@pytest.mark.parametrize("preset, tp", [("tiny-llama", 2), ("tiny-llama", 4), ("tiny-llama", 8),
                                        ("tiny-qwen2", 2)])
def test_column_and_row_split_reproduce_the_full_layer(preset, tp):
    """qkv and gate_up split by columns (heads, intermediate units), o_proj and down by rows:
    the sum of every rank's partial output is the full output. tiny-llama has 2 KV heads, so
    tp 4 and 8 replicate them."""
    cfg = get_preset(preset)
    full = random_weights(cfg, dtype=torch.float64, device="cpu", seed=1)
    x = torch.randn(11, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    shards = [shard_weights(cfg, full, r, tp) for r in range(tp)]
    local = shard_config(cfg, tp)
    attn = sum(_attention_block(x, w, local) for w in shards)
    mlp = sum(_mlp_block(x, w) for w in shards)
    torch.testing.assert_close(attn, _attention_block(x, full, cfg), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mlp, _mlp_block(x, full), rtol=1e-12, atol=1e-12)


def _attention_block(x, w, c):
    """Causal GQA attention then o_proj, plain torch (no rope: it acts on each head alike)."""
    y = F.linear(x, w["layers.0.qkv"], w.get("layers.0.qkv_bias"))
    q, k, v = y.split([c.q_size, c.kv_size, c.kv_size], dim=-1)
    heads = lambda t, n: t.unflatten(-1, (n, c.head_dim)).transpose(0, 1)  # noqa: E731  [H, n, Dh]
    group = c.num_heads // c.num_kv_heads
    k, v = (heads(t, c.num_kv_heads).repeat_interleave(group, 0) for t in (k, v))
    out = F.scaled_dot_product_attention(heads(q, c.num_heads), k, v, is_causal=True)
    return F.linear(out.transpose(0, 1).flatten(1), w["layers.0.o_proj"])


def _mlp_block(x, w):
    gate, up = F.linear(x, w["layers.0.gate_up"]).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w["layers.0.down"])


@pytest.mark.parametrize("preset, tp", [("tiny-llama", 2), ("tiny-llama", 4), ("tiny-qwen2", 2)])
def test_shards_put_back_together_give_the_full_weights(preset, tp):
    cfg = get_preset(preset)
    full = random_weights(cfg, dtype=torch.float64, device="cpu", seed=1)
    shards = [shard_weights(cfg, full, rank, tp) for rank in range(tp)]
    for name, want in full.items():
        got = torch.full_like(want, float("nan"))
        for rank in range(tp):
            shard = shards[rank][name]
            split = shard_ranges(cfg, name, rank, tp)
            if split is None:
                assert shard is want, f"{name} should be replicated, not copied"
                got = want
                continue
            dim, ranges = split
            pieces = shard.split([hi - lo for lo, hi in ranges], dim=dim)
            for (lo, hi), piece in zip(ranges, pieces):
                got.narrow(dim, lo, hi - lo).copy_(piece)
        assert torch.equal(got, want), name


def test_random_weights_per_rank_are_shards_of_the_full_draw():
    cfg = get_preset("tiny-llama")
    full = random_weights(cfg, dtype=torch.float32, device="cpu", seed=5)
    for rank in range(2):
        mine = random_weights(cfg, dtype=torch.float32, device="cpu", seed=5, tp_rank=rank,
                              tp_size=2)
        want = shard_weights(cfg, full, rank, 2)
        assert mine.keys() == want.keys()
        assert all(torch.equal(mine[n], want[n]) for n in want)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_loading_a_checkpoint_shard_equals_sharding_the_loaded_model(preset, tmp_path):
    pytest.importorskip("transformers")
    from test_loader import build_hf_checkpoint, load_shards_as_shard_weights

    cfg, _ = build_hf_checkpoint(preset, tmp_path, shard=True)
    mine = load_shards_as_shard_weights(cfg, tmp_path)
    if cfg.tie_word_embeddings:
        assert mine["lm_head"] is mine["embed"]


# -- the op list and the errors -------------------------------------------------------------------
def test_layer_ops_per_tensor_parallel_size():
    assert layer_ops(1) is LAYER_OPS
    assert layer_ops(2) is layer_ops(8) is TP_LAYER_OPS
    assert [op.name for op in TP_LAYER_OPS] == [
        "attn_norm", "qkv", "rope", "kv_append", "attention", "o_proj", "attn_allreduce",
        "mlp_norm", "gate_up", "act", "down", "mlp_allreduce"]
    network = tuple(op.name for op in TP_LAYER_OPS if op.kind == "network")
    assert set(network) <= set(NETWORK_OPS)      # NETWORK_OPS also has MoE's moe_allreduce
    with pytest.raises(ValueError, match="positive int"):
        layer_ops(0)


@pytest.mark.parametrize("change, tp, match", [
    ({}, 3, "8 attention heads do not split over 3"),
    ({"num_heads": 12, "num_kv_heads": 3}, 2, "3 KV heads do not split over 2"),
    ({"intermediate_size": 687}, 2, "intermediate_size 687 does not split over 2"),
    ({}, 16, "8 attention heads do not split over 16"),
])
def test_uneven_splits_are_rejected(change, tp, match):
    cfg = dataclasses.replace(get_preset("tiny-llama"), **change)
    with pytest.raises(ModelConfigError, match=match):
        shard_config(cfg, tp)


def test_tensor_parallel_without_a_launcher_says_how_to_launch(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        LLM("tiny-llama", tensor_parallel_size=2)
    with pytest.raises(ModelConfigError, match="do not split over 3"):
        LLM("tiny-llama", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive int"):
        EngineConfig(model="tiny-llama", tensor_parallel_size=0)


if __name__ == "__main__":
    _rank_main(sys.argv[1])


def test_nccl_cta_bound_is_validated(monkeypatch):
    from nanorun.distributed import NCCL_MAX_CTAS, nccl_max_ctas

    monkeypatch.delenv("NANORUN_NCCL_MAX_CTAS", raising=False)
    assert nccl_max_ctas() == NCCL_MAX_CTAS
    monkeypatch.setenv("NANORUN_NCCL_MAX_CTAS", "16")
    assert nccl_max_ctas() == 16
    for bad in ("0", "65", "eight"):
        monkeypatch.setenv("NANORUN_NCCL_MAX_CTAS", bad)
        with pytest.raises(ValueError, match="NANORUN_NCCL_MAX_CTAS must be an integer"):
            nccl_max_ctas()
