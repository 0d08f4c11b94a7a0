"""The cost model at tp > 1 against published Llama-2-70B iteration times (issue 19).

    python bench/cost_model_tp.py [--trials 200] [--out bench/results/cpu/cost_model_tp.json]

Measured: the Splitwise authors' profiling of Llama-2-70B on DGX-A100 and DGX-H100 at tp 2, 4
and 8 (bench/data/splitwise_llama2_70b_perf_model.csv: the llama2-70b a100-80gb / h100-80gb
rows of data/perf_model.csv of SplitwiseSim, github.com/Azure/splitwise-sim, MIT licence,
Copyright (c) 2024 Pratyush Patel; read from the mirror github.com/Mutinifni/splitwise-sim at
commit 8f99e7d). Times are ms; each configuration was run five times (some 15) and we take the
median. Prefill: `prompt_time` of one prompt of 128 .. 8192 tokens (batch 1). Decode:
`token_time`, the mean time of one decode iteration of a batch of 1 .. 64 sequences with
512-token prompts generating 128 tokens (so the mean context is 512 + 64).

Predicted: `estimate_iteration` of the same iteration under the "sequential" layout, by the
current model ("after": measured NCCL tables, per-rank GEMM shapes; NCCL's CTAs unbounded, as
in the measured engine) and by the first
model ("before": the same code with the tables removed and per-rank shapes off, which is the
model of issue 19's report: latency 8 us + ring all-reduce at the link rate). The ratio
measured / predicted is the error; the engine measured is of 2023 (eager PyTorch, no CUDA
graphs), so some absolute gap is expected, and it is the growth of the ratio with tp that
shows whether collectives are priced.

Then `nanorun tune llama-2-70b --gpu a100|h100 --tp 8` (azure-conv, NanoFlow's length filter,
seed 0): the search's wall time on this machine, the predicted tokens/s per GPU of sequential
and of the tuned layout against NanoFlow's published 1,212-1,286 (TensorRT-LLM 636-831) tokens/s
per GPU on 8 x A100, and what the search picked for the collectives.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

DATA = Path(__file__).parent / "data" / "splitwise_llama2_70b_perf_model.csv"
HARDWARE = {"a100-80gb": "a100", "h100-80gb": "h100"}
PREFILL_PROMPTS = (128, 256, 512, 1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
DECODE_PROMPT, DECODE_OUTPUT = 512, 128


def measured() -> dict:
    """Median prompt_time and token_time (ms) per (gpu, tp, prompt, batch, output)."""
    runs = defaultdict(list)
    with open(DATA) as f:
        for r in csv.DictReader(f):
            key = (HARDWARE[r["hardware"]], int(r["tensor_parallel"]), int(r["prompt_size"]),
                   int(r["batch_size"]), int(r["token_size"]))
            runs[key].append((float(r["prompt_time"]), float(r["token_time"])))
    return {k: (statistics.median(p for p, _ in v), statistics.median(t for _, t in v))
            for k, v in runs.items()}


def predictors(gpu: str):
    from nanorun.search import CostParams, get_device

    device = get_device(gpu)
    # The measured engine let NCCL pick its channels: price it unbounded (64 is NCCL's
    # maximum), not under nanorun's own CTA bound (that one is what `tune` below uses).
    return {"after": (device, CostParams(nccl_ctas=64)),
            "before": (replace(device, collectives=()), CostParams(per_rank_shapes=False))}


def compare(data: dict) -> list[dict]:
    from nanorun.models import get_preset
    from nanorun.search import CostModel, Predictor
    from nanorun.search.workload import IterationMix

    config = get_preset("llama-2-70b")
    rows = []
    for gpu in ("a100", "h100"):
        for tp in (2, 4, 8):
            models = {name: Predictor(CostModel(config, dev, tp=tp, params=params))
                      for name, (dev, params) in predictors(gpu).items()}

            def predict(name: str, mix: IterationMix) -> float:
                p = models[name]
                return p.iteration_seconds(p.resolve("sequential", mix.num_tokens), mix) * 1e3

            for prompt in PREFILL_PROMPTS:
                ms = data[(gpu, tp, prompt, 1, 128)][0]
                mix = IterationMix((), ((0, prompt),))
                rows.append(_row(gpu, tp, "prefill", prompt, ms,
                                 {n: predict(n, mix) for n in models}))
            for batch in DECODE_BATCHES:
                ms = data[(gpu, tp, DECODE_PROMPT, batch, DECODE_OUTPUT)][1]
                mix = IterationMix((DECODE_PROMPT + DECODE_OUTPUT // 2,) * batch, ())
                rows.append(_row(gpu, tp, "decode", batch, ms,
                                 {n: predict(n, mix) for n in models}))
    return rows


def _row(gpu, tp, phase, size, ms, predicted) -> dict:
    return {"gpu": gpu, "tp": tp, "phase": phase,
            ("prompt_tokens" if phase == "prefill" else "batch"): size,
            "measured_ms": round(ms, 2),
            **{f"predicted_{n}_ms": round(v, 2) for n, v in predicted.items()},
            **{f"ratio_{n}": round(ms / v, 3) for n, v in predicted.items()}}


def summary(rows: list[dict]) -> dict:
    """Per gpu, phase and tp: the median ratio measured / predicted, before and after, and the
    measured and predicted tp 8 / tp 4 time (1/tp scaling would be 0.5)."""
    out = {}
    for gpu in ("a100", "h100"):
        for phase in ("prefill", "decode"):
            sel = [r for r in rows if r["gpu"] == gpu and r["phase"] == phase]
            entry = {}
            for tp in (2, 4, 8):
                at = [r for r in sel if r["tp"] == tp]
                entry[f"tp{tp}"] = {n: round(statistics.median(r[f"ratio_{n}"] for r in at), 3)
                                    for n in ("before", "after")}

            def scaling(key: str) -> float:
                t = {tp: [r[key] for r in sel if r["tp"] == tp] for tp in (4, 8)}
                return round(statistics.median(a / b for a, b in zip(t[8], t[4])), 3)

            entry["tp8_over_tp4"] = {"measured": scaling("measured_ms"),
                                     "before": scaling("predicted_before_ms"),
                                     "after": scaling("predicted_after_ms")}
            out[f"{gpu}/{phase}"] = entry
    return out


def tuned(trials: int) -> list[dict]:
    from nanorun.benchmark.traces import NANOFLOW_FILTER
    from nanorun.models import GEMM, NETWORK, get_preset
    from nanorun.search import CostModel, Predictor, Workload, get_device
    from nanorun.search.tune import Tuner, tune

    out = []
    for gpu in ("a100", "h100"):
        start = time.perf_counter()
        workload = Workload.from_trace("azure-conv", length_filter=NANOFLOW_FILTER)
        tuner = Tuner(Predictor(CostModel(get_preset("llama-2-70b"), get_device(gpu), tp=8)),
                      workload)
        result = tune(tuner, trials=trials, seed=0)
        elapsed = time.perf_counter() - start
        layout = result.layout
        parts = {p.name: p.sm_count for p in layout.partitions}
        # Where the collectives went and how the GEMMs were split, read off the ops' kinds.
        placed = dict(layout.ops)
        ops = tuner.predictor.ops
        network = next(op.name for op in ops if op.kind == NETWORK)
        gemm = next(op.name for op in ops if op.kind == GEMM)
        p = result.predicted()
        out.append({
            "command": f"nanorun tune llama-2-70b --gpu {gpu} --tp 8 --trials {trials}",
            "gpu": gpu, "tp": 8, "search_s": round(elapsed, 1), "trials": trials,
            "tokens_per_s_per_gpu": round(result.tokens_per_s / 8, 1),
            "sequential_tokens_per_s_per_gpu": round(result.sequential_tokens_per_s / 8, 1),
            "optimal_tokens_per_s_per_gpu": round(result.optimal_tokens_per_s / 8, 1),
            "speedup_vs_sequential": p["speedup_vs_sequential"],
            "percent_of_optimal": p["percent_of_optimal"],
            "batch_tokens": layout.batch_tokens, "partitions": parts,
            "collectives_on": placed[network].partition,
            "gemm_splits": len(placed[gemm].splits),
            "pipelined": any(len(e) > 2 and e[2] for e in layout.order)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=200)
    ap.add_argument("--out", default="bench/results/cpu/cost_model_tp.json")
    args = ap.parse_args()

    from nanorun.benchmark.environment import write_result

    rows = compare(measured())
    doc = {
        "measured_source": "SplitwiseSim data/perf_model.csv (github.com/Azure/splitwise-sim, "
                           "MIT, (c) 2024 Pratyush Patel), llama2-70b rows for a100-80gb and "
                           "h100-80gb: bench/data/splitwise_llama2_70b_perf_model.csv",
        "nanoflow_published_tokens_per_s_per_gpu": {
            "source": "NanoFlow (OSDI'25), Llama-2-70B on 8 x A100, tokens/s per GPU counting "
                      "prompt and output tokens (../shared/design/ARCHITECTURE.md)",
            "nanoflow": [1212, 1286], "tensorrt_llm": [636, 831]},
        "summary": summary(rows),
        "tune_tp8": tuned(args.trials),
        "rows": rows,
    }
    doc = write_result(doc, args.out, indent=2)
    for key, entry in doc["summary"].items():
        print(key, json.dumps(entry))
    for t in doc["tune_tp8"]:
        print(json.dumps({k: v for k, v in t.items() if k != "command"}))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
