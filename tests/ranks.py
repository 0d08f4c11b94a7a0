"""Launching a test file as N torch.distributed ranks, the way torchrun would start them.

Each rank is the test file run as a script, with the environment torchrun gives a rank (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and one thread per library, so a multi-rank
test takes the production path without the launcher's start-up cost. A rank writes its results
as JSON to the path it gets as its last argument; join_ranks() reads them back.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(script: str, tmp_path: Path, world: int, *, args: tuple[str, ...] = (),
                env: Callable[[int], dict] | None = None,
                cwd: Callable[[int], Path] | None = None) -> list[tuple[subprocess.Popen, Path]]:
    """Start `script` as ranks 0..world-1: `python script *args tmp_path/rankR.json`, with
    env(rank) added to the environment and cwd(rank) as the working directory."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank),
                    "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
                    **(env(rank) if env else {})}
        out = tmp_path / f"rank{rank}.json"
        procs.append((subprocess.Popen([sys.executable, script, *args, str(out)], env=rank_env,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True, cwd=cwd(rank) if cwd else None), out))
    return procs


def join_ranks(procs, timeout_s: float, hang: str = "collective hang?") -> list[dict]:
    """Every rank's results; a rank that fails or hangs fails the test (and stops the rest).
    `hang` says what a timeout most likely means."""
    logs = []
    try:
        for proc, _ in procs:
            logs.append(proc.communicate(timeout=timeout_s)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank did not finish within {timeout_s} s ({hang})")
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, ((proc, _), log) in enumerate(zip(procs, logs)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{log}"
    return [json.loads(out.read_text()) for _, out in procs]
