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

A step that fails on one rank leaves the others in a collective that will never complete, so
every rank treats any failure as the end of the job. A rank 0 whose step (or broadcast) fails
emits "dead" and broadcasts a stop to the others. A follower whose step fails logs it, writes
its reason into the job's store (the TCPStore every rank already shares) and exits 1, so that
torchrun's agent, which ends the whole job when a worker fails, sees a failure. Rank 0 learns
of it from the collective it waits in, where the backend notices a peer's exit: gloo does (the
follower's sockets close and rank 0's all-reduce or broadcast raises "Connection closed by
peer" at once), and rank 0 then fails like any failed step, the follower's reason from the
store leading its "dead" message. Where the backend does not notice (NCCL's kernels wait on
the peer's memory until its watchdog's timeout, ten minutes by default; or a follower that
reported but is stuck on its way out), FollowerWatch, a thread of rank 0's engine process
that polls the store, bounds the wait: FAILURE_GRACE_S after a follower's report, if the loop
has not ended by itself, it sends "dead" and ends the engine process, and the API answers
503 from then on. A follower killed outright reports nothing: gloo still notices its exit,
NCCL leaves it to torchrun's agent (or the watchdog).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("nanorun.server")

CONTROL_HEARTBEAT_S = 1.0
# Commands taken from the pipe between two steps, at the most: a client that floods the server
# (adds and aborts) delays the next step by a bounded amount; the rest wait in the pipe.
MAX_COMMANDS = 1024
FAILURE_POLL_S = 0.5      # how often rank 0 looks for a follower's failure report
FAILURE_GRACE_S = 5.0     # how long rank 0's loop then has to fail by itself (gloo: at once)


@dataclass
class EngineStats:
    """What the engine loop publishes after each iteration (read by /metrics and admission)."""

    num_running: int = 0
    num_waiting: int = 0
    num_pages: int = 0
    num_free_pages: int = 0
    # The prefix cache's prompt tokens looked up and found, since the engine started.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Tokens of each iteration run since the last message (vllm:iteration_tokens_total).
    iteration_tokens: tuple[int, ...] = ()
    # The prefix cache's host tier (kv_offload_tokens): prompt tokens looked up there (by
    # requests it held pages for, or not) and found.
    host_cache_queries: int = 0
    host_cache_hits: int = 0


def engine_info(core) -> dict:
    """What the engine process says in its "ready": max_model_len (the longest prompt + output
    a request may have: the model's context, capped by the KV cache), its stats, and what the
    engine was built with, which the server logs at start (as vLLM does)."""
    kv = core.kv_cache
    info = {"max_model_len": min(core.max_model_len, kv.capacity_tokens),
            "kv_pages": kv.num_pages, "kv_tokens": kv.capacity_tokens}
    model = getattr(core, "model_config", None)    # (a stand-in engine in tests has none)
    if model is not None:
        info["vocab_size"] = model.vocab_size
    cfg = getattr(core, "config", None)     # (a stand-in engine in tests has none)
    if cfg is not None:
        info |= {"model": cfg.model, "dtype": str(core.dtype).removeprefix("torch."),
                 "device": str(core.device), "layout": core.executor.layout_name,
                 "max_batch_tokens": cfg.max_batch_tokens, "page_size": cfg.page_size,
                 "model_context": core.max_model_len, "async_scheduling": cfg.async_scheduling,
                 "max_num_seqs": cfg.max_num_seqs,
                 "prefix_caching": getattr(kv, "prefix_cache", None) is not None,
                 "tensor_parallel_size": core.tensor_parallel.size}
    return info


def engine_stats(text_engine, iteration_tokens: tuple[int, ...] = ()) -> EngineStats:
    engine = text_engine.engine
    scheduler, kv = engine.scheduler, engine.kv_cache
    cache = getattr(kv, "prefix_cache", None)
    host = None if cache is None else cache.host
    return EngineStats(len(scheduler.running), len(scheduler.waiting), kv.num_pages,
                       kv.num_free_pages, 0 if cache is None else cache.queries,
                       0 if cache is None else cache.hits, iteration_tokens,
                       host_cache_queries=0 if host is None else host.queries,
                       host_cache_hits=0 if host is None else host.hits)


class EngineLoop:
    """Steps `text_engine` on the commands next_commands(block) returns; emit(message) reports.

    Commands: ("add", request_id, prompt, params, arrival_time), ("abort", request_id),
    ("stop",). Messages: ("acks", [(request_id, exception or None)]) for the adds it ran,
    before it steps; ("step", outputs, stats) after; ("dead", reason) once a step, or getting
    the commands (a broadcast between ranks), has raised.
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
            try:
                commands = next_commands(not engine.has_unfinished_requests())
            except Exception as e:   # rank 0's broadcast to a rank that is gone, or the reverse
                return self._fail("could not get the engine's commands", e)
            acks, stop = self._run_commands(commands)
            if acks:                     # the handlers go on now, not after the step
                self.emit(("acks", acks))
            outputs: Sequence[Any] = ()
            iteration: tuple[int, ...] = ()
            if not stop and engine.has_unfinished_requests():
                try:
                    outputs = engine.step()
                except Exception as e:   # state unknown now: fail everyone, refuse new work
                    return self._fail("engine step failed", e)
                tokens = getattr(engine.engine, "last_iteration_tokens", 0)
                iteration = (tokens,) if tokens else ()
            stats = engine_stats(engine, iteration)
            if outputs or iteration or stats != self._last_stats:
                self._last_stats = stats
                self.emit(("step", self.encode(outputs) if outputs else [], stats))
            if stop:
                return True

    def _fail(self, what: str, e: Exception) -> bool:
        logger.exception(what)
        self.emit(("dead", f"{what}: {type(e).__name__}: {e}"))
        return False

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
    token ids, prompt logprobs, num_cached_tokens) is sent once, with a request's first
    output; metrics with its last."""

    def __init__(self) -> None:
        self._sent: dict[str, list[tuple[int, int, int]]] = {}    # per sequence: chars, ids, lps

    def __call__(self, outputs: Sequence[Any]) -> list[tuple]:
        return [self._encode(out) for out in outputs]

    def _encode(self, out) -> tuple:
        sent = self._sent.get(out.request_id)
        head = None
        if sent is None:
            head = (out.prompt, out.prompt_token_ids, out.prompt_logprobs,
                    out.num_cached_tokens)
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
            prompt, prompt_ids, prompt_logprobs, cached = head
            out = RequestOutput(request_id, prompt, prompt_ids, prompt_logprobs,
                                [CompletionOutput(i, "", [], None, None)
                                 for i in range(len(seqs))], False, num_cached_tokens=cached)
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
def engine_process_main(conn, model: str, engine_kwargs: dict, *,
                        log_level: int = logging.WARNING) -> None:
    """The engine process: build the TextEngine, say "ready" (or "failed"), serve commands
    from `conn` until "stop" or until the API process goes away (conn closes).

    The pipe is blocking at both ends, so a full one only makes a send wait: here until the
    API process's reader takes the step's outputs (its reader thread never waits on this
    process), there until this loop takes the commands, which it does between steps, at most
    MAX_COMMANDS at a time. An API process that exits closes the pipe, which ends the wait of
    either (EOF: stop; a broken pipe: the loop ends)."""
    logging.basicConfig(level=log_level, format="%(name)s: %(message)s")
    from ..text_engine import TextEngine

    try:
        text_engine = TextEngine.from_model(model, **engine_kwargs)
    except Exception as e:
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    core = text_engine.engine
    watch = None
    try:
        control = ControlGroup.of(core)
        conn.send(("ready", {**engine_info(core), "stats": engine_stats(text_engine)}))
        sending = threading.Lock()        # the loop and FollowerWatch both send

        def send(message: tuple) -> None:
            with sending:
                conn.send(message)

        def emit(message: tuple) -> None:
            if message[0] == "dead" and control is not None:
                message = ("dead", control.explain(message[1]))
            send(message)

        def next_commands(block: bool) -> list:
            commands = []
            try:
                if block and not conn.poll(CONTROL_HEARTBEAT_S if control else None):
                    return control.share([]) if control else []
                while len(commands) < MAX_COMMANDS and conn.poll(0):
                    commands.append(conn.recv())
            except (EOFError, OSError):      # the API process is gone: stop every rank
                commands.append(("stop",))
            return control.share(commands) if control else commands

        if control is not None:
            watch = FollowerWatch(control.failures, conn, sending)
            watch.start()
        stopped = EngineLoop(text_engine, emit, encode=OutputEncoder()).run(next_commands)
        if watch is not None:
            watch.stop()
        if not stopped and control is not None:
            control.release_followers()
    except (ConnectionError, EOFError):     # the API process went away mid-send
        pass
    finally:
        if watch is not None:
            watch.stop()
        core.shutdown()


def follower_main(model: str, engine_kwargs: dict) -> int:
    """A tensor-parallel rank > 0: the same TextEngine and loop, commands from rank 0.
    Returns 0 once rank 0 says stop, 1 once a step (or rank 0's broadcast) failed here."""
    _tag_log_lines(f"rank {os.environ.get('RANK', '?')}")
    from ..text_engine import TextEngine

    text_engine = TextEngine.from_model(model, **engine_kwargs)
    core = text_engine.engine
    try:
        control = ControlGroup.of(core)
        rank_0_gone = []

        def next_commands(block: bool) -> list:
            try:
                return control.share(None)
            except Exception:
                rank_0_gone.append(True)
                raise

        def emit(message: tuple) -> None:   # rank 0 reports the outputs; our failure we tell
            if message[0] == "dead" and not rank_0_gone:    # (not to a rank 0 that is gone)
                control.report_failure(message[1])

        stopped = EngineLoop(text_engine, emit).run(next_commands)
    finally:
        core.shutdown()
    return 0 if stopped else 1


def _tag_log_lines(tag: str) -> None:
    """Log lines that say which rank wrote them (torchrun mixes every rank's stderr), at the
    level the command line set (warnings if none)."""
    logging.basicConfig(level=logging.WARNING)
    formatter = logging.Formatter(f"%(name)s ({tag}): %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)


class ControlGroup:
    """Rank 0's commands to every tensor-parallel rank (a gloo group beside the engine's), and
    the followers' failure reports to rank 0 (keys of the job's store)."""

    def __init__(self, group, rank: int, src: int, size: int, store) -> None:
        self.group, self.rank, self.src, self.size, self.store = group, rank, src, size, store

    @classmethod
    def of(cls, core) -> ControlGroup | None:
        tp = core.tensor_parallel
        if tp.size == 1:
            return None
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _get_default_store

        ranks = dist.get_process_group_ranks(tp.group)
        group = dist.new_group(ranks, backend="gloo")   # a collective: every rank makes it
        # The default group's store is this launch's own (torchrun makes a new one for each
        # restart), so a report from an earlier attempt is never read as this one's.
        store = dist.PrefixStore("nanorun/step-failed/", _get_default_store())
        return cls(group, tp.rank, ranks[0], tp.size, store)

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

    def report_failure(self, reason: str) -> None:
        """A follower's loop failed: say why, for rank 0, before this rank exits. The check
        after the set waits for the store's answer, so the report is in before this rank's
        exit closes its sockets (which is what rank 0's gloo collectives notice)."""
        key = str(self.rank)
        try:
            self.store.set(key, reason)
            self.store.check([key])
        except Exception as e:      # noqa: BLE001 - rank 0 still sees this rank go
            logger.warning("could not report the failure to rank 0: %s", e)

    def failures(self) -> dict[int, str]:
        """The followers that reported a failure, and why (rank 0 reads them)."""
        keys = [str(r) for r in range(1, self.size)]
        return {int(k): self.store.get(k).decode(errors="replace")
                for k in keys if self.store.check([k])}

    def explain(self, reason: str) -> str:
        """Rank 0's reason for its loop's end, led by the followers' own if any failed (theirs
        is the cause: rank 0's is then only a collective that lost its peer)."""
        try:
            failures = self.failures()
        except Exception as e:      # noqa: BLE001 - the store may be gone with the job
            logger.warning("could not read the other ranks' failure reports: %s", e)
            return reason
        if not failures:
            return reason
        return f"{describe_failures(failures)} (then rank 0: {reason})"


def describe_failures(failures: dict[int, str]) -> str:
    return "; ".join(f"tensor-parallel rank {r}: {why}" for r, why in sorted(failures.items()))


class FollowerWatch(threading.Thread):
    """Rank 0's bound on a follower's failure that its collectives do not notice: once
    failures() reports one, the loop has `grace` seconds to end (stop()); if it has not (it is
    waiting in a collective that will never complete), this sends ("dead", why) on `conn`
    (holding `lock`, the loop's send lock, if it gets it within a second) and ends the
    process (exit code 1): the engine cannot step again, and the API process answers 503 from
    the "dead" message (or, without it, from the closed pipe).

    Why the store and not a shorter timeout on the groups: the control group's timeout bounds
    only its broadcast, not the model's all-reduce on the engine's group, and a timeout on
    that group short enough to serve (seconds) would also end a job whose ranks only drift
    apart for a while (one rank's first CUDA graph capture, a long prefill). A report says
    that a rank failed, not only that it is slow."""

    def __init__(self, failures: Callable[[], dict[int, str]], conn, lock, *,
                 poll: float = FAILURE_POLL_S, grace: float = FAILURE_GRACE_S) -> None:
        super().__init__(name="nanorun-follower-watch", daemon=True)
        self.failures, self.conn, self.lock = failures, conn, lock
        self.poll, self.grace = poll, grace
        self._done = threading.Event()

    def stop(self) -> None:
        """The loop ended: watch no more (idempotent; waits for a poll in progress)."""
        self._done.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(self.poll + 5.0)

    def run(self) -> None:
        while not self._done.wait(self.poll):
            try:
                failures = self.failures()
            except Exception as e:  # noqa: BLE001 - the store went away: the job is ending
                logger.warning("stopped watching the other ranks: %s", e)
                return
            if not failures:
                continue
            if self._done.wait(self.grace):
                return                  # the loop failed by itself, as gloo's does at once
            why = describe_failures(failures)
            logger.error("%s; rank 0 is still waiting for it after %.0f s: ending the engine",
                         why, self.grace)
            if self.lock.acquire(timeout=1.0):
                try:
                    self.conn.send(("dead", why))
                except OSError:
                    pass
            os._exit(1)                 # not sys.exit: the loop's thread cannot be joined


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
