"""What a JSON schema on every request costs: the same requests through one engine without
and with structured_outputs, side by side in one run, passes interleaved.

    python bench/structured_output.py MODEL [--requests 16] [--max-tokens 48] [--passes 5]
        [--async-scheduling] [--out bench/results/cpu/structured_output.json]

MODEL needs a tokenizer (a grammar is compiled against it): a model directory or a GGUF file,
e.g. SmolLM2-135M-Instruct as the README fetches it (a 49152-token vocabulary, so a mask is
1536 int32 words a row). Each case runs the same greedy requests; "json_schema" gives every
one SCHEMA with compact whitespace, so outputs end when the object does (ignore_eos is set in
both cases, and "none" runs every request to max_tokens). Measured: output tokens/s and the
step time (the whole cost, noisy on a shared machine), and the parts a grammar adds, each
timed where it runs: the host's Sampler.prepare (where the masks are built) and
Sampler.accept (the grammars advanced) per step, and Sampler.sample (on the CPU the device
work: the masks applied, then the draw); medians over passes, with the spread (min, max).
The grammar compile is a one-off per distinct schema (xgrammar caches it) and is timed apart,
on the first request (xgrammar's import and the tokenizer's vocabulary included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z ]{1,24}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"enum": ["Paris", "Berlin", "Tokyo", "Lima"]},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,10}$"},
                 "maxItems": 3},
    },
    "required": ["name", "age", "city", "tags"],
    "additionalProperties": False,
}
PROMPT = "Describe one person as JSON with their name, age, city and some tags:"


def run_case(te, case: str, requests: int, max_tokens: int) -> dict:
    """One pass of one case through TextEngine `te`: its tokens/s, step and prepare times."""
    from nanorun import SamplingParams
    from nanorun.benchmark.loop import step_until_done

    structured = ({"json": SCHEMA, "disable_any_whitespace": True} if case == "json_schema"
                  else None)
    sampler = te.engine.sampler
    spent = {"prepare": [], "sample": [], "accept": []}
    originals = {name: getattr(sampler, name) for name in spent}

    def timer(name):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return originals[name](*a, **kw)
            finally:
                spent[name].append(time.perf_counter() - t)
        return timed

    for name in spent:
        setattr(sampler, name, timer(name))
    try:
        for i in range(requests):
            te.add_request(f"{case}-{i}", f"{PROMPT} #{i}", SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                structured_outputs=structured))
        done = step_until_done(te)
    finally:
        for name in spent:
            delattr(sampler, name)
    tokens = sum(len(ids) for ids in done.token_ids().values())
    steps = done.step_seconds
    return {"output_tokens": tokens, "steps": len(steps),
            "tokens_per_s": tokens / done.wall_s,
            "step_ms_median": 1e3 * statistics.median(steps),
            # the host's mask work (prepare builds the masks, accept advances the grammars)
            # and the sampler's device work (on the CPU: the masks applied, then the draw)
            "prepare_ms_median": 1e3 * statistics.median(spent["prepare"]),
            "accept_ms_per_step": 1e3 * sum(spent["accept"]) / len(steps),
            "sample_ms_median": 1e3 * statistics.median(spent["sample"]),
            "finished_by_grammar": sum(o.outputs[0].finish_reason == "stop"
                                       for o in done.outputs.values())}


def summary(runs: list[dict]) -> dict:
    out = {"passes": len(runs)}
    for key in ("tokens_per_s", "step_ms_median", "prepare_ms_median", "accept_ms_per_step",
                "sample_ms_median"):
        values = [r[key] for r in runs]
        out[key] = {"median": round(statistics.median(values), 3),
                    "min": round(min(values), 3), "max": round(max(values), 3)}
    out["output_tokens"] = sorted({r["output_tokens"] for r in runs})
    out["finished_by_grammar"] = sorted({r["finished_by_grammar"] for r in runs})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model directory or GGUF file with a tokenizer")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--async-scheduling", action="store_true")
    ap.add_argument("--out", default="bench/results/cpu/structured_output.json")
    args = ap.parse_args(argv)

    from nanorun import SamplingParams, TextEngine
    from nanorun.benchmark.environment import write_result

    te = TextEngine.from_model(args.model, async_scheduling=args.async_scheduling)
    if te.tokenizer is None:
        raise SystemExit(f"{args.model} has no tokenizer: a grammar needs one")
    start = time.perf_counter()
    te.add_request("compile", PROMPT, SamplingParams(
        max_tokens=1, structured_outputs={"json": SCHEMA, "disable_any_whitespace": True}))
    compile_ms = 1e3 * (time.perf_counter() - start)      # xgrammar's import and the compile
    while te.has_unfinished_requests():
        te.step()
    for case in ("none", "json_schema"):                  # warm-up
        run_case(te, case, 2, 4)
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {"none": [], "json_schema": []}
    for _ in range(args.passes):
        for case in runs:
            runs[case].append(run_case(te, case, args.requests, args.max_tokens))
    load_after = os.getloadavg()
    te.engine.shutdown()
    cases = {case: summary(r) for case, r in runs.items()}
    ratio = (cases["json_schema"]["tokens_per_s"]["median"]
             / cases["none"]["tokens_per_s"]["median"])
    doc = {
        "what": "output tokens/s and step time with a JSON schema on every request vs none",
        "model": os.path.basename(os.path.normpath(args.model)),
        "vocab_size": te.engine.model_config.vocab_size,
        "requests": args.requests, "max_tokens": args.max_tokens,
        "async_scheduling": args.async_scheduling, "schema": SCHEMA,
        "first_request_compile_ms": round(compile_ms, 1),
        "cases": cases,
        "tokens_per_s_ratio_json_over_none": round(ratio, 3),
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in load_after],
                         "cores": os.cpu_count()},
        "runs": runs,
    }
    write_result(doc, args.out, device="cpu")
    print(f"none: {cases['none']['tokens_per_s']['median']:.1f} tok/s, json_schema: "
          f"{cases['json_schema']['tokens_per_s']['median']:.1f} tok/s (x{ratio:.3f}); "
          f"prepare {cases['none']['prepare_ms_median']['median']:.2f} vs "
          f"{cases['json_schema']['prepare_ms_median']['median']:.2f} ms a step, sample "
          f"{cases['none']['sample_ms_median']['median']:.2f} vs "
          f"{cases['json_schema']['sample_ms_median']['median']:.2f} ms; "
          f"compile {compile_ms:.0f} ms -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
