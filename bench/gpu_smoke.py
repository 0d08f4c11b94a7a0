"""The GPU session's first check (about 30 s): tiny-llama under every layout on the device,
against the same model on the CPU in float32.

    python bench/gpu_smoke.py [--device cuda] [--layouts sequential overlap L.json] [--out P]

On CUDA each engine runs float16 (the dtype the CUDA attention kernel runs under graph capture),
so one pass goes through the CUDA kernels, the partitions' streams (green contexts where the
driver allows), their events and the CUDA graphs; the executor's own report says which of
those it used. Checks, per layout: every request produced its tokens; the prompt logits are
within float16 rounding of the CPU's (max |gpu - cpu| / max |cpu| <= TOLERANCE). Greedy tokens
are compared with the CPU's and reported (how many agree before the first difference), not
required to match: a random model's near-ties can flip under float16 rounding.
With --device cpu (the rehearsal) both sides are the CPU in float32; the fields are the same.
Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

TOLERANCE = 2e-2
MODEL = "tiny-llama"
PROMPT_LENS = (90, 7, 33)           # one longer than the dense batch: chunked prefill
MAX_TOKENS = 6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--layouts", nargs="+", default=["sequential", "overlap"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from nanorun import Engine, SamplingParams

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu_smoke.py --device cuda needs a CUDA device", file=sys.stderr)
        return 2
    dtype = "float16" if args.device == "cuda" else "float32"
    kw = dict(max_batch_tokens=64, kv_cache_tokens=8192, weights="random", seed=0)
    g = torch.Generator().manual_seed(0)
    cpu = Engine(MODEL, device="cpu", dtype="float32", layout="sequential", **kw)
    vocab = cpu.model_config.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    want_tokens = generate(cpu, prompts, params)
    want_logits = cpu.prompt_logits(prompts[1])
    del cpu

    layouts = {}
    for layout in args.layouts:
        t0 = time.perf_counter()
        try:
            layouts[layout_name(layout)] = check_layout(Engine, layout, args.device, dtype, kw,
                                                        prompts, params, want_tokens,
                                                        want_logits)
        except Exception as e:  # one layout's failure is a fact; the others still run
            layouts[layout_name(layout)] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        layouts[layout_name(layout)]["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[gpu_smoke] {layout_name(layout)}: {json.dumps(layouts[layout_name(layout)])}",
              flush=True)
        report = write(args, dtype, layouts)    # after each layout: a cap cuts off only the rest
    print("smoke: all layouts passed" if report["ok"] else "smoke: FAILED")
    return 0 if report["ok"] else 1


def write(args, dtype: str, layouts: dict) -> dict:
    from nanorun import cuda_ops
    report = {"model": MODEL, "device": args.device, "dtype": dtype, "tolerance": TOLERANCE,
              "cuda_kernels_built": cuda_ops.available(), "layouts_asked": args.layouts,
              "prompts": list(PROMPT_LENS), "max_tokens": MAX_TOKENS, "layouts": layouts,
              "ok": len(layouts) == len(args.layouts) and all(r["ok"] for r in layouts.values())}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_name(args.out.name + ".part")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(args.out)
    return report


def check_layout(engine_cls, layout, device, dtype, kw, prompts, params, want_tokens,
                 want_logits) -> dict:
    engine = engine_cls(MODEL, device=device, dtype=dtype, layout=layout, **kw)
    ex = engine.executor
    tokens = generate(engine, prompts, params)
    replayed = generate(engine, prompts, params)   # the same sizes again: graph replays
    logits = engine.prompt_logits(prompts[1]).float().cpu()
    rel = float((logits - want_logits).abs().max() / want_logits.abs().max())
    agree = [_common_prefix(tokens[k], want_tokens[k]) for k in want_tokens]
    complete = all(len(t) == MAX_TOKENS for t in tokens.values()) and len(tokens) == len(prompts)
    streams = ex.streams
    return {
        "layout": ex.layout_name, "partitions": ex.partition_sms,
        "streams": getattr(streams, "how", None) if streams is not None else "none (CPU path)",
        "green_contexts": bool(getattr(streams, "green", False)),
        "graphs_active": ex.graphs_active,
        "graph_sizes_captured": sorted(ex.graphs.graphs) if ex.graphs is not None else [],
        "graphs_failure": ex.graphs.failure if ex.graphs is not None else None,
        "kernels": _kernel_names(engine),
        "prompt_logits_max_rel_diff_vs_cpu": rel,
        "tokens_agreeing_with_cpu": sum(agree), "tokens_total": MAX_TOKENS * len(prompts),
        "replay_tokens_equal_first_pass": replayed == tokens,
        "ok": bool(complete and rel <= TOLERANCE and replayed == tokens),
    }


def generate(engine, prompts, params) -> dict[str, list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: list(o.token_ids) for o in engine.step() if o.finished})
    return done


def layout_name(layout: str) -> str:
    return layout.replace("\\", "/").rsplit("/", 1)[-1]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _kernel_names(engine) -> list[str]:
    """The attention and KV-append kernels the engine was built with (select_kernels')."""
    from nanorun.kernels import select_kernels
    return [getattr(f, "__name__", type(f).__name__) for f in select_kernels(engine.device)]


if __name__ == "__main__":
    sys.exit(main())
