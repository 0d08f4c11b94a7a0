"""The engine side of `nanorun serve`: a loop that steps a TextEngine in its own process.

Why a process, not a thread beside the event loop: the engine's step is mostly Python (the
scheduler, batch building, the detokenizer) between short torch kernels, and so is the HTTP
side (a JSON chunk per request per step). In one process they take turns on the GIL, so every
chunk the server writes is time the engine does not step: on a 2-core machine the server ran
at 0.8x the in-process throughput with the engine in a thread. vLLM (its V1 EngineCore) and
SGLang (its scheduler process) run the engine in its own process for the same reason. Here the
engine process owns the TextEngine (tokens and text, the same layer the in-process baseline
runs); the API process sends it commands and gets back, per step, only what is new: each
sequence's new text, token ids and logprobs (OutputEncoder), never a growing copy.

The loop (EngineLoop) is the same wherever it runs: take the pending commands (add, abort,
stop), run them, step if there is work, report (acks of the adds, the step's outputs, the
engine's stats). An add that raises (a bad request) is acked with its exception and queues
nothing. A step that raises ends the loop with a "dead" message: the engine's state is unknown.

Tensor parallelism: `nanorun serve --tensor-parallel-size N` under torchrun. Rank 0's engine
process takes commands from the API process and broadcasts each iteration's list to the other
ranks (broadcast_object_list over a gloo group of its own, so a CUDA engine's NCCL group only
carries the model's collectives); ranks > 0 run the same loop on what they receive, with no
HTTP, so every rank calls add/abort/step alike, as nanorun.distributed requires. An idle rank
0 broadcasts an empty list every CONTROL_HEARTBEAT_S, so the others never sit in a broadcast
long enough for gloo's timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("nanorun.server")

CONTROL_HEARTBEAT_S = 1.0


@dataclass
class EngineStats:
    """What the engine loop publishes after each iteration (read by /metrics and admission)."""

    num_running: int = 0
    num_waiting: int = 0
    num_pages: int = 0
    num_free_pages: int = 0


def engine_stats(text_engine) -> EngineStats:
    engine = text_engine.engine
    scheduler, kv = engine.scheduler, engine.kv_cache
    return EngineStats(len(scheduler.running), len(scheduler.waiting), kv.num_pages,
                       kv.num_free_pages)


class EngineLoop:
    """Steps `text_engine` on the commands next_commands(block) returns; emit(message) reports.

    Commands: ("add", request_id, prompt, params, arrival_time), ("abort", request_id),
    ("stop",). Messages: ("acks", [(request_id, exception or None)]) for the adds it ran,
    before it steps; ("step", outputs, stats) after; ("dead", reason) once a step has raised.
    encode(outputs) turns the step's outputs into what emit sends (a list of them within one
    process, OutputEncoder's deltas across two).
    """

    def __init__(self, text_engine, emit: Callable[[tuple], None], *,
                 encode: Callable[[Sequence[Any]], Any] = list) -> None:
        self.text_engine = text_engine
        self.emit = emit
        self.encode = encode
        self._last_stats: EngineStats | None = None

    def run(self, next_commands: Callable[[bool], list]) -> bool:
        """Until a stop command (returns True) or a failed step (False). next_commands(block)
        returns the pending commands; with block=True (nothing to step) it may wait for some,
        or return []."""
        engine = self.text_engine
        while True:
            commands = next_commands(not engine.has_unfinished_requests())
            acks, stop = self._run_commands(commands)
            if acks:                     # the handlers go on now, not after the step
                self.emit(("acks", acks))
            outputs: Sequence[Any] = ()
            if not stop and engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as e:   # state unknown now: fail everyone, refuse new work
                    logger.exception("engine step failed")
                    self.emit(("dead", f"engine step failed: {type(e).__name__}: {e}"))
                    return False
            stats = engine_stats(engine)
            if outputs or stats != self._last_stats:
                self._last_stats = stats
                self.emit(("step", self.encode(outputs) if outputs else [], stats))
            if stop:
                return True

    def _run_commands(self, commands: list) -> tuple[list, bool]:
        """Run the commands in order; an add whose abort is in the same batch (its handler
        was cancelled while it waited) is dropped with it."""
        dropped = {c[1] for c in commands if c[0] == "abort"}
        acks, stop = [], False
        for command in commands:
            kind = command[0]
            if kind == "stop":
                stop = True
            elif kind == "abort":
                self.text_engine.abort_request(command[1])
            elif kind == "add":
                _, request_id, prompt, params, arrival = command
                if request_id in dropped:
                    continue
                try:
                    self.text_engine.add_request(request_id, prompt, params,
                                                 arrival_time=arrival)
                except Exception as e:    # ValueError/TypeError: a bad request; nothing queued
                    acks.append((request_id, e))
                else:
                    acks.append((request_id, None))
            else:
                raise ValueError(f"unknown engine command {kind!r}")
        return acks, stop


# -- deltas ----------------------------------------------------------------------------------
class OutputEncoder:
    """Turns a step's cumulative RequestOutputs into what is new since the last step, per
    request: (request_id, finished, head, [(index, text, token_ids, logprobs,
    cumulative_logprob, finish_reason, stop_reason, error)], metrics). head (prompt, prompt
    token ids, prompt logprobs) is sent once, with a request's first output; metrics with
    its last."""

    def __init__(self) -> None:
        self._sent: dict[str, list[tuple[int, int, int]]] = {}    # per sequence: chars, ids, lps

    def __call__(self, outputs: Sequence[Any]) -> list[tuple]:
        return [self._encode(out) for out in outputs]

    def _encode(self, out) -> tuple:
        sent = self._sent.get(out.request_id)
        head = None
        if sent is None:
            head = (out.prompt, out.prompt_token_ids, out.prompt_logprobs)
            sent = self._sent[out.request_id] = [(0, 0, 0)] * len(out.outputs)
        seqs = []
        for c in out.outputs:
            chars, ids, lps = sent[c.index]
            logprobs = None if c.logprobs is None else c.logprobs[lps:]
            seqs.append((c.index, c.text[chars:], c.token_ids[ids:], logprobs,
                         c.cumulative_logprob, c.finish_reason, c.stop_reason, c.error))
            sent[c.index] = (len(c.text), len(c.token_ids),
                             lps if c.logprobs is None else len(c.logprobs))
        if out.finished:
            del self._sent[out.request_id]
        return (out.request_id, out.finished, head, seqs,
                out.metrics if out.finished else None)


class OutputDecoder:
    """The other end of OutputEncoder: one RequestOutput per request, updated in place with
    each step's deltas (so a step costs what it added, not the request's length). A consumer
    that reads it when it arrives sees that step; one that falls behind sees a later step,
    which holds everything the earlier ones did."""

    def __init__(self) -> None:
        self._outputs: dict[str, Any] = {}

    def __call__(self, deltas: list[tuple]) -> list[Any]:
        return [self._apply(d) for d in deltas]

    def _apply(self, delta: tuple):
        from ..outputs import CompletionOutput, RequestOutput

        request_id, finished, head, seqs, metrics = delta
        out = self._outputs.get(request_id)
        if out is None:
            prompt, prompt_ids, prompt_logprobs = head
            out = RequestOutput(request_id, prompt, prompt_ids, prompt_logprobs,
                                [CompletionOutput(i, "", [], None, None)
                                 for i in range(len(seqs))], False)
            self._outputs[request_id] = out
        for index, text, ids, logprobs, cumulative, reason, stop_reason, error in seqs:
            c = out.outputs[index]
            c.text += text
            c.token_ids.extend(ids)
            if logprobs is not None:
                if c.logprobs is None:
                    c.logprobs = []
                c.logprobs.extend(logprobs)
            c.cumulative_logprob, c.finish_reason = cumulative, reason
            c.stop_reason, c.error = stop_reason, error
        out.finished = finished
        if finished:
            out.metrics = metrics
            del self._outputs[request_id]
        return out


# -- the engine process -------------------------------------------------------------------------
def engine_process_main(conn, model: str, engine_kwargs: dict) -> None:
    """The engine process: build the TextEngine, say "ready" (or "failed"), serve commands
    from `conn` until "stop" or until the API process goes away (conn closes)."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    from ..text_engine import TextEngine

    try:
        text_engine = TextEngine.from_model(model, **engine_kwargs)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    core = text_engine.engine
    try:
        control = ControlGroup.of(core)
        conn.send(("ready", {"max_model_len": min(core.max_model_len,
                                                  core.kv_cache.capacity_tokens),
                             "stats": engine_stats(text_engine)}))

        def next_commands(block: bool) -> list:
            commands = []
            try:
                if block and not conn.poll(CONTROL_HEARTBEAT_S if control else None):
                    return control.share([]) if control else []
                while conn.poll(0):
                    commands.append(conn.recv())
            except (EOFError, OSError):      # the API process is gone: stop every rank
                commands.append(("stop",))
            return control.share(commands) if control else commands

        stopped = EngineLoop(text_engine, conn.send, encode=OutputEncoder()).run(next_commands)
        if not stopped and control is not None:
            control.release_followers()
    except (BrokenPipeError, EOFError):     # the API process went away mid-send
        pass
    finally:
        core.shutdown()


def follower_main(model: str, engine_kwargs: dict) -> int:
    """A tensor-parallel rank > 0: the same TextEngine and loop, commands from rank 0."""
    from ..text_engine import TextEngine

    text_engine = TextEngine.from_model(model, **engine_kwargs)
    core = text_engine.engine
    try:
        control = ControlGroup.of(core)
        EngineLoop(text_engine, lambda message: None).run(lambda block: control.share(None))
    finally:
        core.shutdown()
    return 0


class ControlGroup:
    """Rank 0's commands to every tensor-parallel rank (a gloo group beside the engine's)."""

    def __init__(self, group, rank: int, src: int) -> None:
        self.group, self.rank, self.src = group, rank, src

    @classmethod
    def of(cls, core) -> ControlGroup | None:
        tp = core.tensor_parallel
        if tp.size == 1:
            return None
        import torch.distributed as dist

        ranks = dist.get_process_group_ranks(tp.group)
        group = dist.new_group(ranks, backend="gloo")   # a collective: every rank makes it
        return cls(group, tp.rank, ranks[0])

    def release_followers(self) -> None:
        """Rank 0's step failed: send the other ranks a stop, so that those waiting for the
        next iteration's commands exit now instead of at gloo's timeout. A rank whose own
        step failed has exited already; the broadcast's error then is only logged."""
        try:
            self.share([("stop",)])
        except Exception as e:      # noqa: BLE001 - best effort on the way out
            logger.warning("could not tell the other ranks to stop: %s", e)

    def share(self, commands: list | None) -> list:
        """Rank 0's commands on every rank (rank 0 passes them, the others None)."""
        import torch.distributed as dist

        box = [commands if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]


def wait_ready(conn, process, timeout: float | None = None) -> dict:
    """The engine process's "ready" info; raises if it failed or died while starting."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not conn.poll(1.0):
        if not process.is_alive():
            raise RuntimeError(f"the engine process exited while starting (exit code "
                               f"{process.exitcode}); its error is above")
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError("the engine process did not start in time")
    kind, info = conn.recv()
    if kind != "ready":
        raise RuntimeError(f"the engine failed to start: {info}")
    return info
