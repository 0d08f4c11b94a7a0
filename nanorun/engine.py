"""The serving loop: requests in, one iteration per step(), outputs out."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .backends.inflight import DeviceOutput, InFlight, device_queue
from .batch import Batch, build_batch, spread_order
from .engine_builder import build_engine
from .input_processor import InputProcessor, as_request_id
from .outputs import RequestOutput
from .request import Request
from .sampler import PreparedSampling, TokenConstraint, logprob_dicts
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk

logger = logging.getLogger("nanorun")


class Engine:
    """Continuous batching over a paged KV cache, in the shape of vLLM's LLMEngine.

    Token in, token out: prompts are token ids and outputs carry token ids (and logprobs when
    asked for), with empty text. Text, chat templates, stop strings and n > 1 are
    nanorun.TextEngine's, which drives an Engine (LLM and `nanorun serve` run on one).

    >>> engine = Engine("tiny-llama")
    >>> engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
    >>> while engine.has_unfinished_requests():
    ...     outputs = engine.step()

    With tensor_parallel_size=N the engine is one of N processes (see nanorun.distributed):
    every rank must get the same calls, and every rank's step() returns the same outputs;
    `tensor_parallel.is_driver` (rank 0) says which one should report them. `process_group`
    is a torch.distributed group of N ranks to use instead of the default one.

    `config` is the EngineConfig as run: max_batch_tokens filled in where the user left it to
    the layout (see EngineConfig).

    role="prefill" | "decode" (Splitwise; nanorun.disagg builds and drives such pairs): a
    prefill engine, given `kv_sender`, runs each prompt and its first token with the kv_send
    op in every layer, then hands the request over and forgets it; a decode engine takes
    requests only through admit_transferred(). "both" (the default) runs requests whole.

    async_scheduling=True: step() forms and launches iteration i + 1 before it reads back
    iteration i's tokens (see step()); the tokens are the same, each output comes one step()
    later, and a request that stops on a token (EOS, stop ids) costs one more token of
    compute, which is dropped.
    """

    def __init__(self, model: str, *, process_group=None, kv_sender=None, **kwargs) -> None:
        parts = build_engine(model, process_group=process_group, kv_sender=kv_sender, **kwargs)
        self.config = cfg = parts.config
        self.kv_sender = kv_sender
        self.model_config, self.max_model_len = parts.model_config, parts.max_model_len
        self.tensor_parallel, self.device, self.dtype = (parts.tensor_parallel, parts.device,
                                                         parts.dtype)
        self.model, self.kv_cache, self.executor = parts.model, parts.kv_cache, parts.executor
        self.scheduler, self.sampler = parts.scheduler, parts.sampler
        self.processor = InputProcessor(self.model_config, self.max_model_len, self.kv_cache,
                                        cfg.seed, cfg.max_logprobs)
        self.last_iteration_tokens = 0     # tokens of the iteration the last launch() formed
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._device_queue = device_queue(self.device, cfg.async_scheduling, cfg.cpu_threads)
        self._in_flight: _Launched | None = None    # async: launched, not yet retired
        logger.info("nanorun engine: %s on %s (%s), tensor parallel rank %d of %d, %d KV pages "
                    "of %d tokens, layout %s", self.model_config.name, self.device, self.dtype,
                    self.tensor_parallel.rank, self.tensor_parallel.size,
                    self.kv_cache.num_pages, cfg.page_size, self.executor.layout_name)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """What ends a request unless ignore_eos (the model's; a TextEngine adds its
        tokenizer's per request)."""
        return self.processor.eos_token_ids

    # -- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> None:
        """Queue a request. Raises ValueError (and queues nothing) if it can never be served."""
        self.enqueue(self.new_request(request_id, prompt_token_ids, sampling_params,
                                      arrival_time))

    def enqueue(self, request: Request) -> None:
        """Queue a Request made by new_request()."""
        self.enqueue_all([request])

    def enqueue_all(self, requests: list[Request], *, share_prompt: bool = False) -> None:
        """Queue Requests made by new_request(): all of them, or (raising) none.

        share_prompt=True: the requests are sequences of one prompt (a TextEngine's n > 1),
        checked to be so. With prefix caching (the default) the first computes the prompt's KV
        and the others take it from the cache, computing only its last token themselves (see
        nanorun.scheduler). Outputs are those of separate requests. A prefill engine
        (role="prefill") does not share: it hands each request's whole prompt KV over."""
        if share_prompt and len({r.prompt_token_ids for r in requests}) > 1:
            raise ValueError("share_prompt=True needs requests with the same prompt")
        if self.config.role == "decode":
            raise ValueError("a decode engine continues requests a prefill engine handed it "
                             "(admit_transferred, see nanorun.disagg); add requests to the "
                             "prefill engine, or use role='both'")
        ids = [r.request_id for r in requests]
        taken = [i for i in ids if i in self.requests] or [i for i in ids if ids.count(i) > 1]
        if taken:
            raise ValueError(f"request id {taken[0]!r} is already in use by an unfinished "
                             f"request; give each request a unique id")
        queued: list[Request] = []
        try:
            for request in requests:
                # add() may refuse one: its length predictor failed
                self.scheduler.add(request)
                queued.append(request)
        except BaseException:
            for request in queued:
                self.scheduler.remove(request)
            raise
        self.requests.update((r.request_id, r) for r in requests)

    def new_request(self, request_id, prompt_token_ids, sampling_params=None, arrival_time=None,
                    *, eos_token_ids: tuple[int, ...] | None = None,
                    constraint: TokenConstraint | None = None) -> Request:
        """Validate and build a Request without queueing it (nanorun.input_processor).
        eos_token_ids: what ends it (unless ignore_eos) instead of the engine's eos_token_ids.
        constraint: what its tokens may be from the first on (a grammar, bad words: the text
        layer's, see nanorun.structured_output), applied as a mask on its logits."""
        request = self.processor.new_request(request_id, prompt_token_ids, sampling_params,
                                             arrival_time, eos_token_ids=eos_token_ids)
        if constraint is not None:
            self.sampler.constrain(request, constraint)
        return request

    def admit_transferred(self, request: Request) -> None:
        """Queue a request whose first num_computed_tokens tokens' KV another engine computed
        and nanorun.disagg placed in this engine's pages (request.pages), with its sampled
        tokens so far and its sampling key: it continues as if this engine had prefilled it. It
        is scheduled like a preempted one; if it is preempted, it is recomputed here."""
        if self.config.role == "prefill":
            raise ValueError("a prefill engine hands requests over; it takes none")
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use by an "
                             f"unfinished request; give each request a unique id")
        if self.kv_cache.pages_for(request.num_computed_tokens) > len(request.pages):
            raise ValueError(f"request {request.request_id!r} has computed "
                             f"{request.num_computed_tokens} tokens but holds "
                             f"{len(request.pages)} pages: place its KV first")
        self.scheduler.add(request)
        self.requests[request.request_id] = request

    def abort_request(self, request_id: str | int | Iterable[str | int], *,
                      report: bool = True) -> None:
        """Stop requests: one id (a str, or an int as add_request takes it) or a list, tuple or
        set of them. Each appears once more in the next step() with finish_reason 'abort'
        (report=False: not at all; a TextEngine ending a sequence on a stop string). Their
        KV pages are free at once. Unknown or already finished ids are ignored."""
        if isinstance(request_id, (list, tuple, set, frozenset)):
            ids = [as_request_id(r) for r in request_id]
        else:
            ids = [as_request_id(request_id)]
        for rid in ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            self.scheduler.remove(request)
            self.sampler.release(request)
            request.finish("abort", time.perf_counter())
            if report:
                self._aborted.append(request)

    def shutdown(self) -> None:
        """Release the tensor-parallel process group if this engine initialised it, and the
        device worker thread of async scheduling on the CPU."""
        self._device_queue.close()
        self.tensor_parallel.shutdown()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._aborted) or self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- one iteration ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration. Returns an output for every request that got a token or ended:
        RequestOutput with outputs[0] holding all its output token ids so far (a copy), their
        logprobs if asked for, and prompt_logprobs once its prompt has been computed.

        An iteration is launch() (schedule, build the batch, submit the device work: the
        model, then sampling on the device) and retire() (the one sync: read the sampled ids
        back, update the requests). Synchronous: retire() what was just launched. Async
        scheduling: launch iteration i + 1, then retire iteration i, so the host's work for
        i + 1 runs while the device computes i. What i + 1 needs of i stays on the device
        (the batch reads each pending token from i's sampled ids, see Batch.pending) or is
        known ahead (max_tokens); what is not (a stop token) is seen at retire(i), and the
        token i + 1 sampled after it is dropped. Penalties count i's tokens on the device too
        (nanorun.sampler.TokenCounts), so nothing forces a retire before the next launch. A
        request with a TokenConstraint (a grammar) needs i's token on the host for its mask:
        then i + 1's model runs first and its sampling is submitted after retire(i)."""
        outputs = [r.to_output() for r in self._aborted]
        self._aborted.clear()
        launched = self.launch()
        if not self.config.async_scheduling:
            return outputs + self.retire(launched)
        done, self._in_flight = self._in_flight, launched
        outputs += self.retire(done)
        if launched is not None and launched.in_flight is None:
            self._submit_sampling(launched)     # its constraints have seen `done`'s tokens
        return outputs

    def launch(self) -> _Launched | None:
        """Schedule and build the next iteration and submit its device work (None: nothing
        to run). The requests count its samples as pending until retire()."""
        sched = self.scheduler.schedule()
        self.last_iteration_tokens = sum(c.length for c in sched.chunks)
        if not sched.chunks:
            return None
        start = time.perf_counter()
        for chunk in sched.chunks:
            if chunk.request.metrics.first_scheduled_time is None:
                chunk.request.metrics.first_scheduled_time = start
        chunks = sched.chunks
        chunks = [chunks[i] for i in spread_order([c.request.is_decoding for c in chunks],
                                                  [c.length for c in chunks])]
        every = [c.request.wants_prompt_logprobs for c in chunks]
        every = every if any(every) else None
        previous = self._in_flight
        batch = build_batch(chunks, self.kv_cache.page_size, self.device, all_logits=every,
                            previous=None if previous is None
                            else (previous.tokens, previous.rows))
        sampling = [c.request for c in chunks if c.samples]
        tokens = torch.empty(len(sampling), dtype=torch.long, device=self.device)
        keep = None if every is None else torch.tensor(_sampling_rows(chunks, every),
                                                       dtype=torch.long, device=self.device)
        if self.kv_sender is not None:       # the kv_send ops name the batch's rows by chunk
            self.kv_sender.begin_iteration(chunks, batch)
        launched = _Launched(chunks, every, sampling, {r: i for i, r in enumerate(sampling)},
                             None, tokens, None)
        moves = (sched.copies, sched.saves, sched.loads)
        if self.sampler.waits_for_tokens(sampling):
            # A constrained request's mask needs the token in flight: run the model now and
            # sample once step() has read that token back (_submit_sampling).
            self._device_queue.submit(lambda: self._forward(batch, moves, keep, launched))
        else:
            self._submit_sampling(launched, lambda: self._forward(batch, moves, keep))
        for chunk in sched.chunks:
            chunk.request.advance(chunk.length)
        return launched

    def _submit_sampling(self, launched: _Launched, forward=None) -> None:
        """Prepare the iteration's sampling on the host and submit its device part (after
        `forward`, the model's run, where given: else that was submitted before and left its
        logits in launched.logits). Its samples are pending from here until retire()."""
        sampling = launched.sampling
        prepared = self.sampler.prepare(sampling, self.model_config.vocab_size, self.device)
        logprobs = any(r.sampling_params.logprobs is not None for r in sampling)
        launched.prepared = prepared
        launched.in_flight = self._device_queue.submit(
            lambda: self._device_work(launched, forward, prepared, logprobs))
        for request in sampling:
            request.num_pending += 1

    def _forward(self, batch: Batch, moves: tuple[list, list, list],
                 keep: torch.Tensor | None, launched: _Launched | None = None) -> DeviceOutput:
        """The model's part of an iteration on the device: (logits of the sampling rows, all
        logits where prompt logprobs want them). First the page moves (copies, and the host
        tier's saves and loads: KVCache.move_pages) of requests that took a cached prefix
        (see nanorun.scheduler): after every earlier iteration's writes, before this one's.
        Given `launched` (its sampling comes later), the logits are left there, or the error
        that stopped the run, and the queue gets an empty output."""
        try:
            self.kv_cache.move_pages(*moves)
            logits = all_logits = self.executor.run(batch)
            if keep is not None:
                logits = all_logits.index_select(0, keep)
            result = (logits, all_logits if keep is not None else None)
        except Exception as e:
            if launched is None:
                raise
            result = e
        if launched is None:
            return result
        launched.logits = result
        empty = torch.zeros(0, dtype=torch.long, device=self.device)
        return DeviceOutput(empty, empty.bool())

    def _device_work(self, launched: _Launched, forward, prepared: PreparedSampling,
                     logprobs: bool) -> DeviceOutput:
        """The device's part of an iteration: no host sync (on a GPU; on the CPU under async
        scheduling it runs on the device worker thread): the model's run (`forward`, unless it
        ran before), then sampling; the sampled ids land in launched.tokens."""
        result = forward() if forward is not None else launched.logits
        launched.logits = None
        if isinstance(result, Exception):
            raise result
        logits, all_logits = result
        sampled, ok = self.sampler.sample(logits, prepared)
        launched.tokens.copy_(sampled)
        return DeviceOutput(launched.tokens, ok, logits if logprobs else None, all_logits)

    def retire(self, launched: _Launched | None) -> list[RequestOutput]:
        """Wait for a launched iteration (the one sync) and update its requests: each
        sampling request not finished meanwhile (aborted, or stopped on an earlier token:
        this token is dropped) gets its token, and those that end leave the scheduler."""
        if launched is None:
            return []
        out = launched.in_flight.result()
        now = time.perf_counter()
        if launched.every is not None:
            self._record_prompt_logprobs(launched.chunks, launched.every, out.all_logits)
        sampled = self.sampler.finish(out.logits, launched.prepared, out.host_tokens,
                                      out.host_ok)
        errors = sampled.errors
        reported = []
        for row, (request, token) in enumerate(zip(launched.sampling, sampled.tokens)):
            request.num_pending -= 1
            if request.finished:
                continue
            if row in errors:
                logger.warning("request %r ended with an error: %s", request.request_id,
                               errors[row])
                request.finish("error", now, errors[row])
            else:
                request.append_token(token, now, sampled.logprobs[row])
                if not request.finished:
                    self._advance_constraint(request, token, now)
            if request.finished:
                self.scheduler.remove(request)
                self.sampler.release(request)
                del self.requests[request.request_id]
            reported.append(request)
        if self.kv_sender is not None:
            self._hand_off([r for r in launched.sampling if not r.finished])
        return [r.to_output() for r in reported]

    def _advance_constraint(self, request: Request, token: int, now: float) -> None:
        """Feed a token read back to the request's constraint: a grammar that is complete
        ends the request ("stop", as vLLM's); one the token broke (which a masked draw
        cannot do) ends it with an error."""
        end = self.sampler.accept(request, token)
        if end == "stop":
            request.finish("stop", now)
        elif end is not None:
            logger.warning("request %r ended with an error: %s", request.request_id, end)
            request.finish("error", now, end)

    def _hand_off(self, prefilled: list[Request]) -> None:
        """role="prefill": the requests whose prompt this step completed (and that did not end
        on their first token) leave for the decode engine. hand_off returns once their KV and
        state have been sent, so their pages can be freed."""
        self.kv_sender.hand_off(prefilled)
        for request in prefilled:
            self.scheduler.remove(request)
            self.sampler.release(request)
            del self.requests[request.request_id]

    def _record_prompt_logprobs(self, chunks: list[ScheduledChunk], every: list[bool],
                                logits: torch.Tensor) -> None:
        """Logits of a batch built with all_logits=every: record the prompt logprobs of the
        flagged chunks' positions not yet recorded (a recomputed prompt is not recorded
        twice, nor is a request's that ended meanwhile)."""
        rows, targets, owners = [], [], []
        row = 0
        for chunk, flagged in zip(chunks, every):
            n = chunk.length if flagged else int(chunk.samples)
            request = chunk.request
            if flagged and not request.finished:
                done, end = len(request.prompt_logprobs), len(request.prompt_token_ids)
                # Position p's logits predict prompt token p + 1.
                for p in range(max(chunk.start, done - 1), min(chunk.start + n, end - 1)):
                    rows.append(row + p - chunk.start)
                    targets.append(request.prompt_token_ids[p + 1])
                    owners.append(request)
            row += n
        if rows:
            device = logits.device
            dicts = logprob_dicts(logits.index_select(0, torch.tensor(rows, device=device)),
                                  torch.tensor(targets, device=device),
                                  [r.sampling_params.prompt_logprobs for r in owners])
            for request, d in zip(owners, dicts):
                request.prompt_logprobs.append(d)

    @torch.inference_mode()
    def prompt_logits(self, prompt_token_ids: list[int]) -> torch.Tensor:
        """[T, V] float32 logits at every prompt position, through the paged cache in chunks
        of max_batch_tokens. For scoring and tests; needs enough free KV pages for the prompt."""
        request = self.new_request("prompt_logits", prompt_token_ids, SamplingParams(max_tokens=1))
        if self._in_flight is not None:     # the executor is the device worker's meanwhile
            self._in_flight.in_flight.result()
        budget, rows = self.config.max_batch_tokens, []
        try:
            for start in range(0, len(request.prompt_token_ids), budget):
                n = min(budget, len(request.prompt_token_ids) - start)
                self.kv_cache.grow(request, start + n)
                chunk = ScheduledChunk(request, start, n)
                batch = build_batch([chunk], self.kv_cache.page_size, self.device,
                                    logits_for_all=True)
                rows.append(self.executor.run(batch))
                request.num_computed_tokens += n
        finally:
            self.kv_cache.release(request)
        return torch.cat(rows)


@dataclass
class _Launched:
    """An iteration launch() submitted: its chunks (in batch order), the all_logits flags it
    was built with, its sampling requests and each one's row, their sampling inputs, the
    device tensor its sampled ids land in, and the device work."""

    chunks: list[ScheduledChunk]
    every: list[bool] | None
    sampling: list[Request]
    rows: dict[Request, int]
    prepared: PreparedSampling | None     # None until its sampling is submitted
    tokens: torch.Tensor
    in_flight: InFlight | None
    # Between a model run submitted alone and its sampling: (logits, all logits) or the
    # error the run raised (set and read on the device's side, in submission order).
    logits: tuple | Exception | None = None


def _sampling_rows(chunks: list[ScheduledChunk], every: list[bool]) -> list[int]:
    """The rows of the sampling tokens in the logits of a batch built with all_logits=every,
    in chunk order."""
    keep, row = [], 0
    for chunk, flagged in zip(chunks, every):
        n = chunk.length if flagged else int(chunk.samples)
        if chunk.samples:
            keep.append(row + n - 1)
        row += n
    return keep
