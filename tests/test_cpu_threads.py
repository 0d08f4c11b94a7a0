"""cpu_threads: the engine's CPU kernels run on the threads it is given (nanorun/backends/cpu.py).

torch's count is process-wide, so every test puts back the count it found.
"""

from __future__ import annotations

import numba
import pytest
import torch
from tokens import assert_same_tokens

from nanorun import LLM, SamplingParams
from nanorun.backends.cpu import set_numba_threads
from nanorun.backends.inflight import device_queue

MODEL = "tiny-llama"


@pytest.fixture(autouse=True)
def restore_threads():
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    yield
    torch.set_num_threads(torch_threads)
    numba.set_num_threads(numba_threads)


def test_an_engine_sets_torch_and_numba_threads():
    LLM(MODEL, weights="random", cpu_threads=1)
    assert torch.get_num_threads() == 1
    assert numba.get_num_threads() == 1


def test_numba_threads_are_capped_at_what_numba_started_with():
    set_numba_threads(10**6)
    assert numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS


def test_the_async_worker_thread_applies_the_count_to_itself():
    """numba keeps its count per thread: the WorkerQueue's thread must set its own."""
    from nanorun.backends.inflight import DeviceOutput

    queue = device_queue(torch.device("cpu"), async_scheduling=True, cpu_threads=1)
    try:
        seen = []

        def work() -> DeviceOutput:
            seen.append(numba.get_num_threads())
            return DeviceOutput(torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool))

        queue.submit(work).result()
    finally:
        queue.close()
    assert seen == [1]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_thread_count_changes_no_token(async_scheduling):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 17, 40)]
    runs, llms = [], []
    for threads in (1, 2):
        llms.append(LLM(MODEL, weights="random", cpu_threads=threads,
                        async_scheduling=async_scheduling))
        runs.append([o.outputs[0].token_ids for o in llms[-1].generate(prompts, params)])
    # A GEMM may split its work otherwise on 2 threads: up to a near-tie (tests/tokens.py).
    for prompt, two, one in zip(prompts, runs[1], runs[0], strict=True):
        assert_same_tokens(two, one, prompt=prompt["prompt_token_ids"], params=params,
                           logits_of=llms[0].engine.prompt_logits)
