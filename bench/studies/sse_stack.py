"""What streaming one chunk costs the server, by HTTP stack: the floor under `nanorun serve`.

    python bench/studies/sse_stack.py [--passes 5] [--streams 64] [--chunks 60]
                              [--out bench/results/cpu/sse_stack.json]

`nanorun serve` writes one server-sent event per streamed request per engine step, so on a
machine whose cores the engine uses too, the HTTP process's CPU per chunk is what the server
takes from the engine (bench/serve_overhead.py measures the whole). This measures only the
stack under nanorun's own code: for each STACKS entry a uvicorn server (uvloop, httptools where
installed) streams `--chunks` events of an OpenAI-sized completion chunk to each of
`--streams` concurrent aiohttp clients, one event per stream every STEP_S (a "step"), and the
server process's CPU time (user + system, from /proc) is divided by the events sent. The
servers are all started first and the passes go round the stacks in turn, so a drift of the
machine lands on every stack alike. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEP_S = 0.012          # about serve_overhead.py's small model's step
CHUNK = {"id": "cmpl-0123456789abcdef0123456789abcdef", "object": "text_completion",
         "created": 1700000000, "model": "bench",
         "choices": [{"index": 0, "text": " token", "logprobs": None, "finish_reason": None}],
         "usage": None}

STACKS = {   # name -> what the server runs
    "starlette + StreamingResponse": "Starlette route, StreamingResponse of sse-starlette's "
                                     "ServerSentEvent(...).encode()",
    "starlette + EventSourceResponse": "Starlette route, sse-starlette's EventSourceResponse",
    "fastapi + EventSourceResponse": "FastAPI route with a body, EventSourceResponse "
                                     "(nanorun serve before this measurement)",
    "fastapi + StreamingResponse": "FastAPI route with a body, StreamingResponse of "
                                   "ServerSentEvent(...).encode() (nanorun serve now)",
}

SERVER = r'''
import asyncio, json, sys
import uvicorn
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import StreamingResponse

stack, port, step_s, chunks, chunk = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4]), json.loads(sys.argv[5])
tick = None

async def ticker():
    global tick
    loop = asyncio.get_running_loop()
    while True:
        tick = loop.create_future()
        await asyncio.sleep(step_s)
        tick.set_result(None)

async def events():
    for _ in range(chunks):
        await tick
        yield json.dumps(chunk)
    yield "[DONE]"

async def framed():
    async for data in events():
        yield ServerSentEvent(data=data, sep="\n").encode()

def respond():
    if stack.endswith("EventSourceResponse"):
        return EventSourceResponse(events(), sep="\n", ping=None)
    return StreamingResponse(framed(), media_type="text/event-stream")

if stack.startswith("fastapi"):
    from fastapi import FastAPI
    app = FastAPI()

    @app.post("/stream")
    async def stream(body: dict):
        return respond()

    @app.get("/health")
    async def health():
        return {}
else:
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def stream(request):
        await request.json()
        return respond()

    async def health(request):
        return Response()

    app = Starlette(routes=[Route("/stream", stream, methods=["POST"]), Route("/health", health)])

async def main():
    asyncio.ensure_future(ticker())
    await uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                        log_level="warning")).serve()

try:
    import uvloop
    uvloop.run(main())
except ImportError:
    asyncio.run(main())
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(stack: str, chunks: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, stack, str(port), str(STEP_S),
                             str(chunks), json.dumps(CHUNK)])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {stack} server did not start") from None
            time.sleep(0.2)


async def one_pass(session, url: str, streams: int) -> list[int]:
    """Every stream's event count (data lines, [DONE] included)."""
    async def one() -> int:
        n = 0
        async with session.post(f"{url}/stream", json={"prompt": [1, 2, 3]}) as r:
            async for line in r.content:
                n += line.startswith(b"data:")
        return n

    return await asyncio.gather(*(one() for _ in range(streams)))


async def measure(servers: dict, args) -> dict:
    import aiohttp

    per_chunk = {stack: [] for stack in servers}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for proc, url in servers.values():          # warm each up (imports, first request)
            await one_pass(session, url, 2)
        for k in range(args.passes):
            for stack, (proc, url) in servers.items():
                before = cpu_seconds(proc.pid)
                counts = await one_pass(session, url, args.streams)
                spent = cpu_seconds(proc.pid) - before
                if counts != [args.chunks + 1] * args.streams:
                    raise RuntimeError(f"{stack}: streams ended early: {sorted(set(counts))}")
                per_chunk[stack].append(spent / (args.streams * args.chunks) * 1e6)
                print(f"pass {k + 1}: {stack}: {per_chunk[stack][-1]:.1f} us/chunk", flush=True)
    return per_chunk


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--chunks", type=int, default=60, help="events per stream ([DONE] aside)")
    p.add_argument("--out", default="bench/results/cpu/sse_stack.json")
    args = p.parse_args()

    import fastapi
    import sse_starlette
    import starlette
    import uvicorn

    sys.path.insert(0, str(ROOT / "bench"))
    from serve_overhead import http_stack

    from nanorun.benchmark import environment
    from nanorun.benchmark.http_client import run_client

    load_before = os.getloadavg()
    servers = {}
    try:
        for stack in STACKS:
            servers[stack] = start(stack, args.chunks)
        per_chunk = run_client(measure(servers, args))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(30)
    medians = {stack: statistics.median(v) for stack, v in per_chunk.items()}
    base = medians["fastapi + EventSourceResponse"]
    import torch

    report = {
        "command": environment.command_line(),
        "environment": environment.describe(torch.device("cpu")),
        "cpu_cores": os.cpu_count(),
        "http_stack": http_stack(),
        "versions": {"fastapi": fastapi.__version__, "starlette": starlette.__version__,
                     "sse_starlette": getattr(sse_starlette, "__version__", None),
                     "uvicorn": uvicorn.__version__},
        "workload": {"streams": args.streams, "chunks_per_stream": args.chunks,
                     "step_s": STEP_S, "chunk_json_bytes": len(json.dumps(CHUNK))},
        "measure": "server process CPU (user + system) per event sent, median over passes",
        "load_average_1_5_15min": {"before": list(load_before), "after": list(os.getloadavg())},
        "stacks": {stack: {"what": STACKS[stack], "us_per_chunk": per_chunk[stack],
                           "median_us_per_chunk": medians[stack],
                           "over_fastapi_eventsourceresponse": medians[stack] / base}
                   for stack in STACKS},
    }
    environment.write_result(report, ROOT / args.out, indent=2)     # (an absolute --out stays as it is)
    for stack, m in medians.items():
        print(f"{stack}: {m:.1f} us/chunk ({m / base:.2f}x)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
