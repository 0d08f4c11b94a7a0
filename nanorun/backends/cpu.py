"""The CPU backend's threads: how many cores one engine's kernels use.

Two thread pools compute on the CPU: torch's intra-op pool (the GEMMs, norms, sampling) and
numba's (the paged-attention kernel, nanorun.ops.paged_attention). Both default to every core,
which is right for an engine that has the machine to itself and wrong for one that shares it:
under `nanorun serve` the HTTP process writes a JSON chunk per request per step on the same
cores, and an OpenMP region whose second thread is descheduled waits for it. Giving the engine
fewer threads than cores leaves the rest to the server, as vLLM's CPU backend does with
VLLM_CPU_OMP_THREADS_BIND / VLLM_CPU_NUM_OF_RESERVED_CPU. Which count is fastest depends on the
model: small models' ops are too short to gain from a second thread at all
(bench/results/cpu/serve_overhead.json has both counts, in process and served).

torch's setting is process-wide; numba keeps its count per thread, so a thread that launches
numba kernels (the async WorkerQueue's) must set it itself: set_numba_threads.
"""

from __future__ import annotations

import numba
import torch


def set_cpu_threads(n: int) -> None:
    """Use n threads for torch's intra-op pool (this process) and numba's (this thread)."""
    torch.set_num_threads(n)
    set_numba_threads(n)


def set_numba_threads(n: int) -> None:
    """numba's thread count for kernels this thread launches; numba cannot go above the
    NUMBA_NUM_THREADS it started with (the core count by default), so n is capped there."""
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
