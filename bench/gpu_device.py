"""What a GPU gives nanorun (issue 7, item 2): its SMs, the driver's green-context granularity,
the SMs granted to each partition of the "overlap" layout, and whether a CUDA-graph replay of a
multi-partition iteration gives what the same iterations give run eagerly.

    python bench/gpu_device.py [--out PATH] [--model llama-3-8b] [--batch-tokens 1024]
                               [--check-model tiny-llama]

Granularity: read from the driver (cuda.bindings: cuDeviceGetDevResource, SM resource), beside
the granularity of the device spec that layouts are built with. Partitions: the overlap layout
for --model at --batch-tokens on this device's spec, opened by the CUDA backend itself
(CudaStreams), so the SM counts are what the executor really gets. Graphs: two engines on
--check-model (float16, which the CUDA attention kernel runs under capture; random weights;
layout "overlap", so every iteration spans both partitions), one with CUDA graphs and one with
NANORUN_CUDA_GRAPHS=0; the graphed one runs the requests twice (the first pass runs each new
padded batch size eagerly and captures it, the second replays them): the replayed pass must
give the first pass's greedy tokens exactly, and the prompt logits must match the eager
engine's within float16 rounding (the eager engine runs unpadded shapes, so its roundings
differ; its greedy tokens are reported beside).

Ceilings: the GEMM rate (bf16 8192^3 products, median of event-timed repeats) and the copy
bandwidth (1 GiB device-to-device, bytes read + written) that every %-of-optimal and GB/s figure
of the session is set against (nanorun.benchmark.ceilings, as `nanorun bench` measures them).

Prints each fact as it is read and writes them all as JSON with the command, date, commit and
versions. Exit status: 0 when every check passed, 1 when one failed (the JSON says which and
why), 2 without a CUDA device. --rehearse (bench/gpu_session.sh --rehearse) writes the same
fields on the CPU: ceilings measured there, the GPU-only facts null with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from importlib import metadata
from pathlib import Path

import torch

TOLERANCE = 1e-2        # max |graph - eager| / max |eager| over float16 prompt logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="JSON path (default: print only)")
    parser.add_argument("--model", default="llama-3-8b",
                        help="the model whose overlap layout is opened (default: llama-3-8b)")
    parser.add_argument("--batch-tokens", type=int, default=1024,
                        help="dense batch of that layout (default: 1024)")
    parser.add_argument("--check-model", default="tiny-llama",
                        help="preset the graph-vs-eager check runs (default: tiny-llama)")
    parser.add_argument("--rehearse", action="store_true",
                        help="on the CPU: the same fields, GPU-only facts null")
    args = parser.parse_args(argv)
    if args.rehearse:
        return write(args.out, rehearsal_report(args.model, args.batch_tokens))
    if not torch.cuda.is_available():
        print(f"bench/gpu_device.py needs a CUDA device, and torch {torch.__version__} "
              f"(CUDA {torch.version.cuda}) sees none; run it on the GPU machine "
              f"(bench/gpu_session.sh device)", file=sys.stderr)
        return 2

    from nanorun.benchmark.environment import command_line
    report = {"command": command_line(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit(), "device": device_facts()}
    say("device", report["device"])
    checks = {}
    for name, fn in (("ceilings", lambda: ceiling_facts(torch.device("cuda"))),
                     ("green_contexts", green_context_facts),
                     ("overlap_partitions", lambda: overlap_partitions(args.model,
                                                                       args.batch_tokens)),
                     ("graph_replay", lambda: graph_replay_vs_eager(args.check_model))):
        try:
            checks[name] = fn()
        except Exception as e:  # a failure is a fact to record, not a reason to stop
            checks[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        say(name, checks[name])
    report.update(checks)
    return write(args.out, report)


CHECKS = ("ceilings", "green_contexts", "overlap_partitions", "graph_replay")


def write(out: Path | None, report: dict) -> int:
    """Sets report["ok"] (every check that ran passed; a rehearsal's skipped ones are null),
    writes it, and returns the exit status."""
    checks = {k: report[k] for k in CHECKS}
    report["ok"] = all(c.get("ok") is not False for c in checks.values()) and any(
        c.get("ok") for c in checks.values())
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    print("all checks passed" if report["ok"] else
          "FAILED: " + ", ".join(k for k, c in checks.items() if c.get("ok") is False))
    return 0 if report["ok"] else 1


def rehearsal_report(model: str, batch_tokens: int) -> dict:
    """The CPU rehearsal's report: the GPU report's fields, GPU-only facts null."""
    from nanorun.benchmark.environment import command_line, device_name
    from nanorun.device import device_spec
    from nanorun.layout import overlap
    from nanorun.models import layer_ops

    cpu = torch.device("cpu")
    why = "rehearsal on the CPU: no CUDA device"
    layout = overlap(tuple(op.name for op in layer_ops(1)), batch_tokens, device_spec(cpu))
    report = {"command": command_line(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": commit(),
              "device": {"name": device_name(cpu), "multiprocessors": None,
                         "compute_capability": None, "memory_gib": None, "driver": None,
                         "torch": torch.__version__, "cuda": torch.version.cuda,
                         "cuda_bindings": package_version("cuda-bindings")},
              "ceilings": ceiling_facts(cpu),
              "green_contexts": {"driver_sm_resource": None, "spec": device_spec(cpu).name,
                                 "spec_sm_granularity": None, "spec_sm_count": None,
                                 "ok": None, "skipped": why},
              "overlap_partitions": {"model": model, "batch_tokens": batch_tokens,
                                     "requested": {p.name: p.sm_count for p in layout.partitions},
                                     "granted": None, "green_contexts": None, "how": why,
                                     "summary": None, "device_sms": None, "ok": None},
              "graph_replay": {"ok": None, "skipped": why}}
    for name in CHECKS:
        say(name, report[name])
    return report


# -- the ceilings ----------------------------------------------------------------------------------
def ceiling_facts(device: torch.device) -> dict:
    """GEMM rate and copy bandwidth, measured as `nanorun bench` measures them."""
    from nanorun.benchmark.ceilings import measure

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    c = measure(device, dtype)
    return {"gemm_tflops": c.gemm_tflops, "gemm_dtype": c.gemm_dtype, "gemm_size": c.gemm_size,
            "copy_gbps": c.copy_gbps, "measured_on": device.type,
            "ok": c.gemm_tflops > 0 and c.copy_gbps > 0}


def say(what: str, facts: dict) -> None:
    print(f"[gpu_device] {what}: {json.dumps(facts)}", flush=True)


# -- the device ------------------------------------------------------------------------------------
def device_facts() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "multiprocessors": props.multi_processor_count,
            "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "driver": driver_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_bindings": package_version("cuda-bindings") or package_version("cuda-python")}


def driver_version() -> str | None:
    from nanorun.benchmark.environment import _driver_version
    return _driver_version()


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def commit() -> str | None:
    """The measured commit: $NANORUN_COMMIT (the device's copy of the tree has no .git; the
    session script passes what the lead's checkout said), else git's."""
    from nanorun.benchmark.environment import git_commit
    if os.environ.get("NANORUN_COMMIT"):
        return os.environ["NANORUN_COMMIT"]
    sha, dirty = git_commit()
    return None if sha is None else sha + ("-dirty" if dirty else "")


# -- green contexts --------------------------------------------------------------------------------
def green_context_facts() -> dict:
    """The device's SM resource as the driver describes it, and the granularity nanorun's layouts
    assume for this device (the spec's)."""
    from cuda.bindings import driver

    from nanorun.device import device_spec

    def call(name, *args):
        err, *out = getattr(driver, name)(*args)
        if int(err) != 0:
            raise RuntimeError(f"{name} failed with {driver.cuGetErrorName(err)[1]}")
        return out[0] if len(out) == 1 else out

    torch.zeros(1, device="cuda")       # the primary context, as the backend makes it
    call("cuInit", 0)
    dev = call("cuDeviceGet", torch.cuda.current_device())
    sm = call("cuDeviceGetDevResource", dev, driver.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM).sm
    fields = {f: getattr(sm, f, None) for f in ("smCount", "minSmPartitionSize",
                                                "smCoscheduledAlignment")}
    fields = {k: int(v) for k, v in fields.items() if v is not None}
    spec = device_spec(torch.device("cuda"))
    driver_step = max(fields.get("minSmPartitionSize", 0), fields.get("smCoscheduledAlignment", 0))
    return {"driver_sm_resource": fields, "spec": spec.name,
            "spec_sm_granularity": spec.sm_granularity, "spec_sm_count": spec.sm_count,
            # Layouts are built with the spec's numbers; they must agree with the driver's.
            "ok": fields.get("smCount") == spec.sm_count
                  and driver_step in (0, spec.sm_granularity)}


# -- the overlap layout's partitions ---------------------------------------------------------------
def overlap_partitions(model: str, batch_tokens: int) -> dict:
    """Open the overlap layout's partitions as the executor does and read back their SMs."""
    from nanorun.backends import CudaStreams
    from nanorun.device import device_spec
    from nanorun.layout import overlap
    from nanorun.models import layer_ops, resolve_model

    config, _ = resolve_model(model)
    ops = tuple(op.name for op in layer_ops(1))
    layout = overlap(ops, batch_tokens, device_spec(torch.device("cuda")))
    streams = CudaStreams(layout, "cuda")
    requested = {p.name: p.sm_count for p in layout.partitions}
    return {"model": config.name, "batch_tokens": batch_tokens, "requested": requested,
            "granted": streams.granted, "green_contexts": streams.green, "how": streams.how,
            "summary": streams.summary, "device_sms": streams.device_sms,
            "ok": streams.green and streams.granted == requested}


# -- graph replay against eager --------------------------------------------------------------------
def graph_replay_vs_eager(model: str) -> dict:
    from nanorun import Engine, SamplingParams

    kw = dict(device="cuda", dtype="float16", layout="overlap", max_batch_tokens=64,
              kv_cache_tokens=16384, weights="random", seed=0)
    graphed = Engine(model, **kw)
    eager = engine_without_graphs(Engine, model, kw)
    ex = graphed.executor
    if not ex.graphs_active:
        return {"ok": False, "error": "the graphed engine runs eagerly: "
                + (ex.graphs.failure if ex.graphs is not None else "graphs are off")}
    g = torch.Generator().manual_seed(0)
    vocab = graphed.model_config.vocab_size
    # Longer than the dense batch (chunked prefill beside decodes) and short ones: mixed sizes.
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (150, 40, 7, 90, 3)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    captured_first = generate(graphed, prompts, params)       # eager runs + captures
    replayed = generate(graphed, prompts, params)             # the same sizes: replays
    want = generate(eager, prompts, params)
    for _ in range(2):      # the first pass captures any new size, the second replays
        logits_graph = [graphed.prompt_logits(p) for p in prompts[:2]]
    logits_eager = [eager.prompt_logits(p) for p in prompts[:2]]
    rel = max(float((a - b).abs().max() / b.abs().max())
              for a, b in zip(logits_graph, logits_eager))
    replay_matches = replayed == captured_first
    return {"model": model, "dtype": "float16", "layout": ex.layout_name,
            "partitions": ex.partition_sms, "how": ex.streams.how,
            "captured_sizes": sorted(ex.graphs.graphs), "graphs_active": ex.graphs_active,
            "replay_tokens_match_first_pass": replay_matches,
            "greedy_tokens_match": replayed == want,
            "first_pass_tokens_match": captured_first == want,
            "prompt_logits_max_rel_diff": rel, "tolerance": TOLERANCE,
            "ok": bool(ex.graphs_active and replay_matches and rel <= TOLERANCE
                       and len(ex.partition_sms) > 1)}


def engine_without_graphs(engine_cls, model: str, kw: dict):
    """An engine built while NANORUN_CUDA_GRAPHS=0 (the executor reads it when built)."""
    from nanorun.executor import GRAPHS_ENV
    before = os.environ.get(GRAPHS_ENV)
    os.environ[GRAPHS_ENV] = "0"
    try:
        return engine_cls(model, **kw)
    finally:
        if before is None:
            del os.environ[GRAPHS_ENV]
        else:
            os.environ[GRAPHS_ENV] = before


def generate(engine, prompts, params) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: list(o.token_ids) for o in engine.step() if o.finished})
    return done


if __name__ == "__main__":
    sys.exit(main())
