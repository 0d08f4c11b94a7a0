"""What `nanorun serve` costs: the same requests in process and through the server, one run.

    python bench/serve_overhead.py [--num-requests 64] [--passes 6] [--size small medium]
                                   [--cpu-threads 1 2] [--device cpu]
                                   [--out bench/results/cpu/serve_overhead.json]

For each --size, a Llama model directory with a real tokenizer is written to a temporary
directory (tests/text_model.py's tokenizer and weight layout, at the SIZES below). The bigger
the model, the longer a step and the smaller the share of the server's per-token work (a JSON
chunk per request per step, on the same cores): "tiny" (a step of ~1 ms) is the worst case. The workload is a
seeded window of ShareGPT under the CPU filter, every request offline (all at time 0) with its
trace output length (greedy, ignore_eos), prompts as token ids: exactly what `nanorun bench`
runs, and the same prompts in both places.

In process: a TextEngine (the text layer included: the server detokenizes every step, so the
baseline does too) driven by nanorun.benchmark.runner.drive. Through the server: `nanorun
serve` in a subprocess with the same engine options, driven over loopback by `nanorun bench
--base-url`'s client (aiohttp, streaming, usage for the token count).

Each --cpu-threads count is measured on both sides alike (the engine's cpu_threads in process,
`--cpu-threads` for the server): the server's HTTP process and this client run on the same
cores as its engine, so the count decides how much of the machine the engine keeps to itself
(nanorun/backends/cpu.py). Passes alternate which side goes first (in process then server,
then server then in process, ...), so a drift of the shared machine lands on both; each pass's
figures, the median of the paired ratios, the ratio of each side's best pass (a shared machine
only slows a pass down), and the TTFT / ITL the server adds (median of the per-pass
differences of the medians) are written, and per size the ratio of the server at its best
thread count to in process at its best: the server's cost to a user who sets each up as well
as it goes.

The client is the load generator, and in a deployment it runs on another machine; here it
shares the engine's cores. By default (--client-priority idle) it runs in a thread of the
lowest CPU priority (Linux's SCHED_IDLE), so it takes only CPU that the server and its engine
leave idle. That can only count against the server: a client that waits for a core reads
every chunk later, so TTFT, ITL and the pass's duration come out longer, never shorter.
--client-priority normal runs it as any other process (its CPU then comes out of the engine's
time, as in the runs before this option).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

# OpenMP threads that spin while waiting (the default) starve a busy 2-core machine shared with
# other work: there the in-process baseline, stepping in the main thread, ran 30x slower than
# the same engine stepping in the server's engine thread. Passive waiting, set before torch
# is imported and inherited by the server process, puts both on the same footing.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))          # text_model.py: the tokenizer and weights

SIZES = {   # (hidden, intermediate, layers, heads, kv heads): a step's cost grows with size
    "tiny": (64, 128, 2, 4, 2),
    "small": (256, 768, 4, 8, 4),
    "medium": (512, 1536, 8, 8, 4),
    "large": (768, 2048, 8, 12, 4),
}
ENGINE_OPTIONS = {"kv_cache_tokens": 32768, "page_size": 16, "max_batch_tokens": 512,
                  "layout": "sequential", "seed": 0}


def write_model(path: Path, size: str) -> Path:
    """A Llama directory of the given size with text_model.py's trained BPE tokenizer."""
    from safetensors.torch import save_file
    from text_model import _HF_TINY_LLAMA, BOS, EOS, IM_END, hf_llama_state_dict, write_tokenizer

    hidden, inter, layers, heads, kv = SIZES[size]
    path.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(path, "bpe")
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(IM_END)
    cfg = dict(_HF_TINY_LLAMA, hidden_size=hidden, intermediate_size=inter,
               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
               head_dim=hidden // heads, max_position_embeddings=2048,
               vocab_size=tok.get_vocab_size(), bos_token_id=bos, eos_token_id=eos)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(hf_llama_state_dict(cfg), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": [eos, tok.token_to_id(EOS)]}))
    return path


def in_process_pass(model_dir: Path, workload, arrivals, cpu_threads: int,
                    options: dict = ENGINE_OPTIONS):
    """One pass through a fresh TextEngine, warmed up first."""
    from nanorun import SamplingParams
    from nanorun.benchmark.loop import step_until_done
    from nanorun.benchmark.runner import drive
    from nanorun.text_engine import TextEngine

    engine = TextEngine.from_model(str(model_dir), **options, cpu_threads=cpu_threads)
    # The server's warm-up request, in process: [1, 2, 3], 2 tokens.
    engine.add_request("warmup", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0,
                                                           ignore_eos=True))
    step_until_done(engine)
    start = time.process_time()            # this process's threads: the engine's CPU
    run = drive(engine, workload, arrivals)
    return run, {"engine": time.process_time() - start}


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of one process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_pid(server_pid: int) -> int | None:
    """The server's engine process (the child multiprocessing spawned; the other is its
    resource tracker), or None where /proc cannot say."""
    try:
        tasks = Path(f"/proc/{server_pid}/task").iterdir()
        children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
        spawned = [c for c in children
                   if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
    except OSError:
        return None
    return spawned[0] if len(spawned) == 1 else None


def server_cpu(proc: subprocess.Popen, engine: int | None, run_pass) -> tuple:
    """run_pass()'s result and the CPU seconds each process spent in it: the API process,
    its engine process, and this process ("client": the client's thread, and any other thread
    of this process that runs meanwhile; the in-process engine's OpenMP threads wait
    passively, OMP_WAIT_POLICY above, so they take nothing)."""
    pids = {"api": proc.pid, "engine": engine}
    before = {k: process_cpu_s(pid) if pid else None for k, pid in pids.items()}
    client = time.process_time()
    result = run_pass()
    cpu = {"client": time.process_time() - client}
    for k, pid in pids.items():
        after = process_cpu_s(pid) if pid else None
        cpu[k] = None if after is None or before[k] is None else after - before[k]
    return result, cpu


def start_server(model_dir: Path, cpu_threads: int, stream_interval: int = 1,
                 options: dict = ENGINE_OPTIONS) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in
            {**options, "cpu_threads": cpu_threads}.items()]
    proc = subprocess.Popen([sys.executable, "-m", "nanorun.cli", "serve", str(model_dir),
                             "--port", str(port), "--served-model-name", "bench",
                             "--stream-interval", str(stream_interval), *opts],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nanorun serve exited: {proc.stderr.read()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("nanorun serve did not come up")


async def server_pass(url: str, workload, arrivals):
    import aiohttp

    from nanorun.benchmark.http_client import drive_http, warm_up_http

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        await warm_up_http(session, url, "bench")
        return await drive_http(session, url, "bench", workload, arrivals)


def run_client_at(priority: str, main):
    """http_client.run_client(main) in a thread of its own; with priority "idle", a thread of
    SCHED_IDLE (the policy is per thread: the in-process passes keep theirs)."""
    from nanorun.benchmark.http_client import run_client

    out: dict = {}

    def client() -> None:
        try:
            if priority == "idle":
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            out["result"] = run_client(main)
        except BaseException as e:     # noqa: BLE001 - raised again in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=client, name="bench-client")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def figures(results, duration: float) -> dict:
    from nanorun.benchmark.metrics import compute_metrics

    m = compute_metrics(results, duration, percentiles=(50, 99))
    keys = ("duration", "completed", "failed", "total_output_tokens", "total_token_throughput",
            "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
            "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_tpot_ms", "mean_e2el_ms")
    return {k: m[k] for k in keys}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--passes", type=int, default=6)
    p.add_argument("--cpu-threads", type=int, nargs="+", default=[1, 2],
                   help="engine thread counts to measure, each on both sides")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="the server's --stream-interval (1: a chunk per request per step)")
    p.add_argument("--size", nargs="+", default=["small", "medium"], choices=sorted(SIZES))
    p.add_argument("--client-priority", choices=["idle", "normal"], default="idle",
                   help="idle: the client only gets CPU the server leaves idle (SCHED_IDLE; "
                        "see above); normal: as any process")
    p.add_argument("--trace", default="sharegpt")
    p.add_argument("--device", default="cpu",
                   help="both sides' engine device (cuda: the server's HTTP side then has the "
                        "host's cores, as in a deployment)")
    p.add_argument("--out", default=None,
                   help="default: bench/results/cpu/serve_overhead.json (on cpu; required "
                        "otherwise, e.g. bench/results/h200/serve_overhead.json)")
    args = p.parse_args()
    if args.out is None:
        if args.device != "cpu":
            p.error("give --out for a GPU run, e.g. bench/results/h200/serve_overhead.json")
        args.out = "bench/results/cpu/serve_overhead.json"
    if args.client_priority == "idle" and not hasattr(os, "SCHED_IDLE"):
        p.error("--client-priority idle needs Linux's SCHED_IDLE; use --client-priority normal")

    import torch

    from nanorun.benchmark import environment

    load_before = os.getloadavg()
    machine = environment.describe(torch.device(args.device))  # before a pass sets threads
    sizes = {size: measure_size(size, args) for size in args.size}
    load_after = os.getloadavg()
    report = {"command": environment.command_line(),
              "environment": machine,
              "cpu_cores": os.cpu_count(),
              "http_stack": http_stack(),
              "engine_options": {**ENGINE_OPTIONS, "device": args.device},
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
              "client": "nanorun bench --base-url's aiohttp streaming client, same machine",
              "client_loop": http_stack()["loop"],
              "client_priority": ("SCHED_IDLE (only CPU the server leaves idle)"
                                  if args.client_priority == "idle" else "normal"),
              # 1: every step's new tokens go out as a chunk, per request (the default).
              "stream_interval": args.stream_interval,
              "server_engine": "engine in its own process (nanorun/server/engine_core.py)",
              # Other work on a shared machine slows either side's passes down.
              "load_average_1_5_15min": {"before": list(load_before),
                                         "after": list(load_after)},
              "sizes": sizes}
    environment.write_result(report, ROOT / args.out, indent=2)     # (an absolute --out stays as it is)
    for size, by_size in sizes.items():
        for threads, r in by_size["cpu_threads"].items():
            print(f"{size}, {threads} thread(s): throughput ratio "
                  f"{r['throughput_ratio']['median']:.3f} (best passes "
                  f"{r['throughput_ratio']['best_pass_ratio']:.3f}) (passes "
                  f"{', '.join(f'{v:.3f}' for v in r['throughput_ratio']['values'])}); added "
                  f"median TTFT {r['added_ms']['median_ttft']:.1f} ms, median ITL "
                  f"{r['added_ms']['median_itl']:.2f} ms")
        best = by_size["best_setup"]
        print(f"{size}: server at its best ({best['server_cpu_threads']} thread(s)) / in process "
              f"at its best ({best['in_process_cpu_threads']}): {best['throughput_ratio']:.3f}")
    print(f"wrote {args.out}")
    return 0


def measure_size(size: str, args) -> dict:
    """Every thread count's passes on one model size."""
    from nanorun.benchmark import arrivals as arrival_process
    from nanorun.benchmark.cli import CPU_FILTER
    from nanorun.benchmark.runner import Workload
    from nanorun.benchmark.traces import load_trace, parse_length_filter
    from nanorun.models import resolve_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / f"llama-{size}", size)
        mc = resolve_model(str(model_dir))[0]
        trace = load_trace(args.trace, num_requests=args.num_requests, seed=0,
                           length_filter=parse_length_filter(CPU_FILTER))
        workload = Workload.fit_limits(trace, mc.max_position_embeddings, mc.vocab_size, 0,
                                       "longer than the context")
        arrivals = arrival_process.schedule(workload.trace, math.inf)
        options = {**ENGINE_OPTIONS, "device": args.device}
        by_threads = {threads: measure_threads(size, threads, model_dir, workload, arrivals,
                                               args.passes, args.stream_interval,
                                               args.client_priority, options)
                      for threads in args.cpu_threads}
    return {"model": {"hidden_size": mc.hidden_size, "num_layers": mc.num_layers,
                      "vocab_size": mc.vocab_size,
                      "weights": "random (tests/text_model.py layout)"},
            "workload": {"trace": trace.name, "length_filter": CPU_FILTER,
                         "num_requests": len(workload.trace), "request_rate": "inf",
                         "mean_prompt_len": float(workload.trace.prompt_lens.mean()),
                         "mean_output_len": float(workload.trace.output_lens.mean()),
                         "sampling": "greedy, ignore_eos, max_tokens = trace output length"},
            "best_setup": best_setup(by_threads),
            "cpu_threads": {str(t): r for t, r in by_threads.items()}}


def measure_threads(size: str, threads: int, model_dir: Path, workload, arrivals,
                    num_passes: int, stream_interval: int, client_priority: str,
                    options: dict) -> dict:
    """The passes at one thread count: in process and server, alternating which goes first."""
    proc, url = start_server(model_dir, threads, stream_interval, options)
    engine = engine_pid(proc.pid)
    passes = []
    try:
        for k in range(num_passes):
            sides = ["in_process", "server"] if k % 2 == 0 else ["server", "in_process"]
            pair = {}
            for side in sides:
                if side == "in_process":
                    local, cpu = in_process_pass(model_dir, workload, arrivals, threads,
                                                 options)
                    pair[side] = figures(local.results, local.duration)
                else:
                    result, cpu = server_cpu(proc, engine, lambda: run_client_at(
                        client_priority, server_pass(url, workload, arrivals)))
                    pair[side] = figures(*result)
                pair[side]["cpu_s"] = cpu
            passes.append({"first": sides[0], **pair})
            print(f"{size}, {threads} thread(s), pass {k + 1}: in process "
                  f"{pair['in_process']['total_token_throughput']:,.0f} tok/s, "
                  f"server {pair['server']['total_token_throughput']:,.0f} tok/s", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    return {**summarize(passes), "passes": passes}


def best_setup(by_threads: dict[int, dict]) -> dict:
    """Each side at the thread count where its median pass is fastest, and their ratio."""
    def median_tput(threads: int, side: str) -> float:
        return statistics.median(p[side]["total_token_throughput"]
                                 for p in by_threads[threads]["passes"])

    best = {side: max(by_threads, key=lambda t: median_tput(t, side))
            for side in ("in_process", "server")}
    return {"in_process_cpu_threads": best["in_process"],
            "server_cpu_threads": best["server"],
            "median_tokens_per_s": {side: median_tput(t, side) for side, t in best.items()},
            "throughput_ratio": median_tput(best["server"], "server")
            / median_tput(best["in_process"], "in_process"),
            "target": 0.9}


def http_stack() -> dict:
    """What uvicorn runs on: uvloop and httptools (uvicorn[standard]) when installed, else
    asyncio and the pure-Python h11, which cost the server more CPU per chunk."""
    import importlib.util

    import uvicorn

    def has(name: str) -> bool:
        return importlib.util.find_spec(name) is not None

    return {"uvicorn": uvicorn.__version__,
            "loop": "uvloop" if has("uvloop") else "asyncio",
            "http": "httptools" if has("httptools") else "h11"}


def summarize(passes: list[dict]) -> dict:
    """The median pass's throughput ratio and the latency the server adds."""
    ratios = [p["server"]["total_token_throughput"] / p["in_process"]["total_token_throughput"]
              for p in passes]

    def added(key: str) -> float:
        return statistics.median(p["server"][key] - p["in_process"][key] for p in passes)

    def cpu(side: str, key: str) -> float | None:
        values = [p[side]["cpu_s"].get(key) for p in passes]
        return None if None in values else statistics.median(values)

    def others_share(p: dict) -> float | None:
        """The API process's and the client's CPU, as a share of the machine in the pass."""
        api, client = p["server"]["cpu_s"]["api"], p["server"]["cpu_s"]["client"]
        if api is None:
            return None
        return (api + client) / (p["server"]["duration"] * (os.cpu_count() or 1))

    shares = [others_share(p) for p in passes]
    failed = sum(p["server"]["failed"] + p["in_process"]["failed"] for p in passes)
    best = {mode: max(p[mode]["total_token_throughput"] for p in passes)
            for mode in ("in_process", "server")}
    # A shared machine only ever slows a pass down, so the best pass of each is the least
    # disturbed estimate of what it can do; the paired median is given beside it.
    return {"throughput_ratio": {"median": statistics.median(ratios), "min": min(ratios),
                                 "max": max(ratios), "values": ratios,
                                 "best_pass_ratio": best["server"] / best["in_process"],
                                 "best_pass_tokens_per_s": best, "target": 0.9},
            "added_ms": {"median_ttft": added("median_ttft_ms"),
                         "mean_ttft": added("mean_ttft_ms"),
                         "median_itl": added("median_itl_ms"),
                         "mean_itl": added("mean_itl_ms"),
                         "p99_itl": added("p99_itl_ms")},
            # CPU seconds per pass (median), by process: what the server's HTTP side and the
            # client take from the machine the engine runs on.
            "cpu_s": {"in_process": {"engine": cpu("in_process", "engine")},
                      "server": {k: cpu("server", k) for k in ("engine", "api", "client")}},
            "api_and_client_share_of_machine": (None if None in shares
                                                else statistics.median(shares)),
            "failed_requests": failed}


if __name__ == "__main__":
    sys.exit(main())
