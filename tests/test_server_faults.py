"""`nanorun serve` under faults: a burst of clients that give up, an engine process that dies.

Each test starts its own server (a tiny preset, random weights: token-id prompts) on loopback,
since both push it to an edge the module server of test_server.py must not be left at.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")

from test_server import MODEL, _get, _metrics, _post, _start_server, _stop  # noqa: E402

PRESET = "tiny-llama"           # 4096 tokens of context; the server's KV cache holds 4096


async def _abandon(url: str, n: int, max_tokens: int, after_s: float) -> int:
    """n streamed completions at once, each hung up on `after_s` seconds after its first
    chunk (30 s at the most for that); returns how many streamed before they were left."""
    host, port = url.removeprefix("http://").split(":")

    async def one(i: int) -> bool:
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({"model": MODEL, "prompt": [1, 5 + i % 100, 7, 8], "stream": True,
                           "max_tokens": max_tokens, "ignore_eos": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        streamed = False

        async def first_chunk() -> None:
            while not (line := await reader.readline()).startswith(b"data:"):
                if not line:
                    raise ConnectionError("the server closed the stream")

        async def read_on() -> None:
            while await reader.read(1 << 16):
                pass

        try:
            await writer.drain()
            await asyncio.wait_for(first_chunk(), 30)
            streamed = True
            await asyncio.wait_for(read_on(), after_s)       # reads on, then gives up
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
        return streamed

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


def test_a_burst_of_abandoned_streams_is_back_pressure_not_death():
    """200 streams asking for 4000 tokens each, every client gone half a second in: the
    engine process's pipe fills (the aborts queue behind the outputs), which must only slow
    things down. Every request is aborted, every page comes back, the server goes on
    serving. (It answered 503 for good before: issue 25.)"""
    proc, url = _start_server(PRESET)
    try:
        streamed = asyncio.run(_abandon(url, 200, max_tokens=4000, after_s=0.5))
        assert streamed == 200, f"{200 - streamed} of 200 streams never started"
        key = '{model_name="%s"}' % MODEL
        deadline = time.monotonic() + 60
        while True:
            status, body = _get(f"{url}/health")
            assert status == 200, body
            m = _metrics(url)
            busy = m["vllm:num_requests_running" + key] + m["vllm:num_requests_waiting" + key]
            if busy == 0 and m["nanorun:kv_cache_free_pages" + key] == \
                    m["nanorun:kv_cache_pages" + key]:
                break
            assert time.monotonic() < deadline, f"requests were never aborted: {busy} left"
            time.sleep(0.2)
        status, reply = _post(f"{url}/v1/completions", {"model": MODEL, "prompt": [1, 2, 3],
                                                        "max_tokens": 4, "ignore_eos": True})
        assert status == 200 and reply["usage"]["completion_tokens"] == 4, reply
        assert _get(f"{url}/health")[0] == 200
        assert proc.poll() is None
    finally:
        _stop(proc)


def _engine_pid(server_pid: int) -> int:
    """The engine process: the server's child that multiprocessing spawned."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):      # gone meanwhile
            continue
        if ppid == server_pid and b"spawn_main" in cmdline:
            return int(entry)
    raise AssertionError(f"no engine process under {server_pid}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the engine in /proc")
def test_a_killed_engine_process_answers_503_then_the_server_exits_nonzero():
    """SIGKILL the engine process: /health turns 503 and the server exits 1 within seconds
    (5 of answering 503), so a supervisor restarts it, instead of lingering as a server
    that can only refuse."""
    proc, url = _start_server(PRESET)
    try:
        os.kill(_engine_pid(proc.pid), signal.SIGKILL)
        start = time.monotonic()
        health = []
        while proc.poll() is None and time.monotonic() - start < 30:
            try:
                status, body = _get(f"{url}/health")
            except OSError:                  # the server is closing its socket
                break
            health.append(status)
            if status == 503:
                assert "the engine process exited (exit code -9)" in body, body
            time.sleep(0.05)
        assert 503 in health, health
        assert proc.wait(30) == 1
        assert time.monotonic() - start < 30
    finally:
        if proc.poll() is None:
            proc.kill()
