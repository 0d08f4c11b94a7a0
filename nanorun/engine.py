"""The serving loop: requests in, one iteration per step(), outputs out."""

from __future__ import annotations

import itertools
import logging
import numbers
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import torch

from .backends.cpu import set_cpu_threads
from .backends.inflight import DeviceOutput, InFlight, device_queue
from .batch import Batch, build_batch, spread_order
from .config import DEFAULT_MAX_BATCH_TOKENS, EngineConfig
from .device import DeviceSpec, device_spec
from .distributed import TensorParallel, setup_tensor_parallel
from .executor import Executor
from .kernels import select_kernels, select_pointwise
from .kv_cache import KVCache
from .layout import Layout, is_layout_file, tuned_layout
from . import memory
from .config import ALLOW_LONG_MAX_MODEL_LEN_ENV
from .lengths import get_length_predictor
from .memory import MAX_KV_PAGES
from .models import (ModelConfig, build_model, check_tensor_parallel, load_weights,
                     random_weights, resolve_model, shard_config)
from .outputs import RequestOutput
from .request import Request
from .sampler import (PreparedSampling, Sampler, TokenCounts, logprob_dicts, seed_key,
                      unseeded_key)
from .sampling_params import SamplingParams
from .scheduler import ScheduledChunk, Scheduler, uses_predictions

logger = logging.getLogger("nanorun")

# With no kv_cache_tokens given, the CPU backend takes this much memory for KV pages (capped at
# _CPU_KV_MAX_TOKENS) and a GPU this share of what is free once the weights are loaded.
_CPU_KV_BYTES = 512 << 20
_CPU_KV_MAX_TOKENS = 1 << 18
_GPU_KV_FRACTION = 0.85

# The most logprobs / prompt_logprobs a request may ask for (vLLM's default max_logprobs).
MAX_LOGPROBS = 20


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
        self.config = EngineConfig(model=model, **kwargs)
        cfg = self.config
        if (cfg.role == "prefill") != (kv_sender is not None):
            raise ValueError("role='prefill' needs a kv_sender to hand its requests to (use "
                             "nanorun.disagg.prefill_engine), and only a prefill engine takes one")
        self.kv_sender = kv_sender
        self.model_config, model_dir = resolve_model(model)
        check_tensor_parallel(self.model_config, cfg.tensor_parallel_size)
        self.dtype = cfg.torch_dtype
        if cfg.torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={cfg.device!r} but torch sees no CUDA device; "
                             f"use device='cpu'")
        if cfg.cpu_threads is not None:     # before anything computes (weights, warm-up)
            set_cpu_threads(cfg.cpu_threads)
        self.tensor_parallel: TensorParallel = setup_tensor_parallel(
            cfg.tensor_parallel_size, cfg.torch_device, process_group)
        self.device = self.tensor_parallel.device
        spec = device_spec(self.device)
        # Every rank must run rank 0's layout: "auto" and layout files are read there only.
        layout, batch_tokens = self.tensor_parallel.on_driver(
            lambda: _layout_and_batch_tokens(cfg, self.model_config.name, spec))
        self.config = cfg = replace(cfg, max_batch_tokens=batch_tokens)
        self.max_model_len = _max_model_len(cfg, self.model_config)
        kv_tokens = self._check_memory()
        weights = self._load_weights(model_dir)
        attention_fn, kv_append_fn = select_kernels(self.device)
        self.model = build_model(self.model_config, weights, max_model_len=self.max_model_len,
                                 attention_fn=attention_fn, kv_append_fn=kv_append_fn,
                                 tp_group=self.tensor_parallel.group,
                                 pointwise=select_pointwise(self.device),
                                 kv_sink=kv_sender and kv_sender.send_layer)
        self.kv_cache = self._new_kv_cache(kv_tokens)
        predictor = cfg.length_predictor
        if isinstance(predictor, (str, os.PathLike)) and uses_predictions(
                cfg.scheduling_policy, cfg.kv_reservation):   # fitted from a file: on rank 0
            predictor = self.tensor_parallel.on_driver(lambda: get_length_predictor(
                cfg.length_predictor))
        self.scheduler = Scheduler(self.kv_cache, cfg.max_batch_tokens, cfg.scheduling_policy,
                                   predictor, cfg.kv_reservation, cfg.max_num_seqs)
        # kv_send calls the transport from the host with each iteration's requests: no graphs.
        self.executor = Executor(self.model, self.kv_cache, cfg.max_batch_tokens, layout,
                                 spec, kernels=(attention_fn, kv_append_fn),
                                 graphs=kv_sender is None)
        # Penalised requests' token counts live on the device, so that an iteration can
        # count the tokens of the one before it without reading them back (async scheduling).
        self.sampler = Sampler(TokenCounts(self.model_config.vocab_size, self.device))
        self._unseeded = itertools.count()     # numbers unseeded requests' random streams
        # What ends a request unless ignore_eos; a TextEngine adds its tokenizer's EOS ids.
        self.eos_token_ids: tuple[int, ...] = tuple(self.model_config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._aborted: list[Request] = []
        self._device_queue = device_queue(self.device, cfg.async_scheduling, cfg.cpu_threads)
        self._in_flight: _Launched | None = None    # async: launched, not yet retired
        logger.info("nanorun engine: %s on %s (%s), tensor parallel rank %d of %d, %d KV pages "
                    "of %d tokens, layout %s", self.model_config.name, self.device, self.dtype,
                    self.tensor_parallel.rank, self.tensor_parallel.size,
                    self.kv_cache.num_pages, cfg.page_size, self.executor.layout_name)

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

        share_prompt=True: the requests are sequences of one prompt (a TextEngine's n > 1):
        the first computes the prompt's KV and the others fork it, computing only its last
        token themselves (see nanorun.scheduler). Outputs are those of separate requests. A
        prefill engine (role="prefill") does not share: it hands each request's whole
        prompt KV over."""
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
        share = share_prompt and self.config.role != "prefill"
        queued: list[Request] = []
        try:
            for request in requests:
                # add() may refuse one: its length predictor failed
                self.scheduler.add(request, requests[0] if share and queued else None)
                queued.append(request)
        except BaseException:
            for request in queued:
                self.scheduler.remove(request)
            raise
        self.requests.update((r.request_id, r) for r in requests)

    def new_request(self, request_id, prompt_token_ids, sampling_params=None, arrival_time=None,
                    *, eos_token_ids: tuple[int, ...] | None = None) -> Request:
        """Validate and build a Request without queueing it. eos_token_ids: what ends it
        (unless ignore_eos) instead of the engine's eos_token_ids."""
        request_id = _request_id(request_id)
        sp = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sp).__name__}")
        _check_token_level(sp)
        prompt = self._check_prompt(prompt_token_ids)
        vocab = self.model_config.vocab_size
        bad_stop = [t for t in sp.stop_token_ids if t >= vocab]
        if bad_stop:
            raise ValueError(f"stop_token_ids {bad_stop} are outside the vocabulary [0, {vocab}) "
                             f"of {self.model_config.name}")
        total = len(prompt) + sp.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({sp.max_tokens}) = {total} exceeds "
                f"the model's context of {self.max_model_len} tokens; shorten the prompt or "
                f"lower max_tokens")
        if self.kv_cache.pages_for(total) > self.kv_cache.num_pages:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens needs more KV cache than the engine has "
                f"({self.kv_cache.capacity_tokens} tokens); raise kv_cache_tokens or shorten "
                f"the request")
        now = time.perf_counter() if arrival_time is None else arrival_time
        key = (seed_key(sp.seed) if sp.seed is not None
               else unseeded_key(self.config.seed, next(self._unseeded)))
        eos = self.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        return Request(request_id, prompt, sp, now, eos, sampling_key=key)

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
            ids = [_request_id(r) for r in request_id]
        else:
            ids = [_request_id(request_id)]
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
        (nanorun.sampler.TokenCounts), so nothing forces a retire before the next launch."""
        outputs = [r.to_output() for r in self._aborted]
        self._aborted.clear()
        launched = self.launch()
        if not self.config.async_scheduling:
            return outputs + self.retire(launched)
        done, self._in_flight = self._in_flight, launched
        return outputs + self.retire(done)

    def launch(self) -> _Launched | None:
        """Schedule and build the next iteration and submit its device work (None: nothing
        to run). The requests count its samples as pending until retire()."""
        sched = self.scheduler.schedule()
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
        prepared = self.sampler.prepare(sampling, self.model_config.vocab_size, self.device)
        tokens = torch.empty(len(sampling), dtype=torch.long, device=self.device)
        keep = None if every is None else torch.tensor(_sampling_rows(chunks, every),
                                                       dtype=torch.long, device=self.device)
        logprobs = any(r.sampling_params.logprobs is not None for r in sampling)
        if self.kv_sender is not None:       # the kv_send ops name the batch's rows by chunk
            self.kv_sender.begin_iteration(chunks, batch)
        copies = sched.copies
        in_flight = self._device_queue.submit(
            lambda: self._device_work(batch, copies, prepared, tokens, keep, logprobs))
        for chunk in sched.chunks:
            chunk.request.advance(chunk.length)
        for request in sampling:
            request.num_pending += 1
        return _Launched(chunks, every, sampling, {r: i for i, r in enumerate(sampling)},
                         prepared, tokens, in_flight)

    def _device_work(self, batch: Batch, copies: list[tuple[int, int]],
                     prepared: PreparedSampling, tokens: torch.Tensor,
                     keep: torch.Tensor | None, logprobs: bool) -> DeviceOutput:
        """The device's part of an iteration: no host sync (on a GPU; on the CPU under async
        scheduling it runs on the device worker thread). First the forks' page copies (see
        nanorun.scheduler): after every earlier iteration's writes, before this one's."""
        self.kv_cache.copy_pages(copies)
        logits = all_logits = self.executor.run(batch)
        if keep is not None:
            logits = all_logits.index_select(0, keep)
        sampled, ok = self.sampler.sample(logits, prepared)
        tokens.copy_(sampled)
        return DeviceOutput(tokens, ok, logits if logprobs else None,
                            all_logits if keep is not None else None)

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
            if request.finished:
                self.scheduler.remove(request)
                self.sampler.release(request)
                del self.requests[request.request_id]
            reported.append(request)
        if self.kv_sender is not None:
            self._hand_off([r for r in launched.sampling if not r.finished])
        return [r.to_output() for r in reported]

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

    # -- construction helpers -----------------------------------------------------------------
    def _check_prompt(self, prompt_token_ids) -> list[int]:
        prompt = _token_id_list(prompt_token_ids)
        if not prompt:
            raise ValueError("prompt_token_ids is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = [(i, t) for i, t in enumerate(prompt) if not 0 <= t < vocab]
        if bad:
            i, t = bad[0]
            raise ValueError(f"prompt token {t} at index {i} is outside the vocabulary "
                             f"[0, {vocab}) of {self.model_config.name} ({len(bad)} bad ids)")
        return prompt

    def _load_weights(self, model_dir: str | None) -> dict[str, torch.Tensor]:
        """This rank's shard (all of it without tensor parallelism)."""
        tp = self.tensor_parallel
        if self.config.weights == "random" or model_dir is None:
            if self.config.weights == "auto":
                logger.info("%s is a preset: using random weights", self.model_config.name)
            return random_weights(self.model_config, dtype=self.dtype, device=self.device,
                                  seed=self.config.seed, tp_rank=tp.rank, tp_size=tp.size)
        return load_weights(self.model_config, model_dir, dtype=self.dtype, device=self.device,
                            tp_rank=tp.rank, tp_size=tp.size)

    def _check_memory(self) -> int | None:
        """Refuse, before anything is allocated, an engine that cannot fit: say what it needs and
        what to lower. Returns the KV cache size in tokens where it is known before the weights
        are loaded (given, or the CPU default); None: sized from the GPU memory left after."""
        cfg = self.config
        mc = shard_config(self.model_config, cfg.tensor_parallel_size)
        tokens = cfg.kv_cache_tokens
        if tokens is None and self.device.type != "cuda":
            tokens = _default_kv_tokens(mc, self.dtype, self.device, cfg.max_batch_tokens)
        pages = -(-(tokens or 0) // cfg.page_size)
        if pages > MAX_KV_PAGES:
            raise ValueError(f"kv_cache_tokens={tokens} is {pages:,} pages of {cfg.page_size} "
                             f"tokens, more than the {MAX_KV_PAGES:,} a KV cache can index; "
                             f"lower kv_cache_tokens (or raise page_size)")
        need = memory.estimate(mc, self.dtype, max_batch_tokens=cfg.max_batch_tokens,
                               kv_tokens=tokens or cfg.max_batch_tokens,
                               max_model_len=self.max_model_len)
        memory.check_fits(need, self.device, self.dtype, what=(
            f"{self.model_config.name} in {str(self.dtype).removeprefix('torch.')} with a "
            f"{cfg.max_batch_tokens}-token dense batch (max_batch_tokens, or the layout's "
            f"batch_tokens) and {tokens or cfg.max_batch_tokens} KV cache tokens"))
        return tokens

    def _new_kv_cache(self, tokens: int | None) -> KVCache:
        """Sized per rank: each holds only its own KV heads."""
        cfg, mc = self.config, self.model.local
        if tokens is None:
            tokens = _default_kv_tokens(mc, self.dtype, self.device, cfg.max_batch_tokens)
            if tokens < cfg.page_size:
                raise ValueError(f"no GPU memory is left for the KV cache once the weights are "
                                 f"loaded on {self.device}; lower max_batch_tokens or use a "
                                 f"smaller model or more tensor-parallel ranks")
        if cfg.kv_cache_tokens is None:
            # Free memory differs between GPUs, but the ranks' schedulers must admit and
            # preempt alike: every rank takes the smallest rank's pool.
            tokens = self.tensor_parallel.agree_min(tokens)
        return KVCache(
            num_layers=mc.num_layers, num_pages=max(1, tokens // cfg.page_size),
            page_size=cfg.page_size, num_kv_heads=mc.num_kv_heads, head_dim=mc.head_dim,
            dtype=self.dtype, device=self.device)


@dataclass
class _Launched:
    """An iteration launch() submitted: its chunks (in batch order), the all_logits flags it
    was built with, its sampling requests and each one's row, their sampling inputs, the
    device tensor its sampled ids land in, and the device work."""

    chunks: list[ScheduledChunk]
    every: list[bool] | None
    sampling: list[Request]
    rows: dict[Request, int]
    prepared: PreparedSampling
    tokens: torch.Tensor
    in_flight: InFlight


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


def _layout_and_batch_tokens(cfg: EngineConfig, model_name: str, spec: DeviceSpec):
    """What the executor is built from: the layout ("auto" looked up, a JSON file loaded) and
    the dense batch size: the user's max_batch_tokens, else the layout's own, else the
    default. So a layout that `nanorun tune` sized runs at its size unless the user says
    otherwise; "auto" with an explicit size takes only a layout tuned for that size."""
    layout = choose_layout(cfg.layout, model_name, spec, cfg.tensor_parallel_size,
                            cfg.max_batch_tokens)
    if cfg.max_batch_tokens is not None:
        return layout, cfg.max_batch_tokens
    if isinstance(layout, Layout):
        return layout, layout.batch_tokens
    return layout, DEFAULT_MAX_BATCH_TOKENS


def choose_layout(layout, model_name: str, spec: DeviceSpec, tp: int = 1,
                   batch_tokens: int | None = None):
    """A layout as the engine runs it: "auto" becomes the tuned Layout for this model, device,
    tp (and batch size, when given) or "overlap"; a JSON file becomes its Layout; anything else
    is returned as it is."""
    if layout == "auto":
        return tuned_layout(model_name, spec.name, tp, batch_tokens) or "overlap"
    if is_layout_file(layout):
        return Layout.load(layout)
    return layout


def _check_token_level(sp: SamplingParams) -> None:
    """What the token-level Engine does not do itself: text and several sequences per request
    are nanorun.TextEngine's (and LLM's); logprobs are bounded as in vLLM."""
    if sp.n != 1:
        raise ValueError(f"n={sp.n}: the Engine runs one sequence per request; use "
                         f"nanorun.TextEngine or LLM for n > 1, or add n requests")
    if sp.stop:
        raise ValueError("stop strings are text: the Engine is token-in, token-out; use "
                         "nanorun.TextEngine or LLM, or stop_token_ids")
    for name in ("logprobs", "prompt_logprobs"):
        if (getattr(sp, name) or 0) > MAX_LOGPROBS:
            raise ValueError(f"{name}={getattr(sp, name)} is more than the "
                             f"{MAX_LOGPROBS} top tokens nanorun returns")


def _request_id(request_id) -> str:
    """Request ids are strs; an int is taken as its decimal string (so add_request(5) and
    abort_request(5) name the same request). Anything else would be turned into some string
    that abort_request could not name again, so it is refused."""
    if isinstance(request_id, str):
        return request_id
    if isinstance(request_id, numbers.Integral) and not isinstance(request_id, bool):
        return str(int(request_id))
    raise TypeError(f"a request id must be a str or an int, got {request_id!r} "
                    f"({type(request_id).__name__})")


def _token_id_list(prompt) -> list[int]:
    """A prompt as a list of ints. Takes a list or tuple of ints, a 1-D integer numpy array or
    torch tensor; refuses what int() would silently reinterpret (floats, bools, digit strings,
    dicts, sets), naming what was wrong."""
    if isinstance(prompt, (str, bytes)):
        raise TypeError("prompt_token_ids must be a list of token ids, not text; pass the ids "
                        "of the tokenized prompt")
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        kind = prompt.dtype.kind if isinstance(prompt, np.ndarray) else (
            "i" if not prompt.dtype.is_floating_point and not prompt.dtype.is_complex
            and prompt.dtype != torch.bool else "f")
        if prompt.ndim != 1 or kind not in "iu":
            raise TypeError(f"prompt_token_ids as an array must be 1-D of integers, got "
                            f"{prompt.ndim}-D {prompt.dtype}")
        return [int(t) for t in prompt.tolist()]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"prompt_token_ids must be a list of ints, got "
                        f"{type(prompt).__name__}")
    for i, t in enumerate(prompt):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"prompt_token_ids must be ints: index {i} is {t!r} "
                            f"({type(t).__name__})")
    return [int(t) for t in prompt]


def _max_model_len(cfg: EngineConfig, mc: ModelConfig) -> int:
    """The user's max_model_len, refused beyond the model's context unless the override is set."""
    context = mc.max_position_embeddings
    if cfg.max_model_len is None:
        return context
    if cfg.max_model_len > context and os.environ.get(ALLOW_LONG_MAX_MODEL_LEN_ENV) != "1":
        raise ValueError(
            f"max_model_len={cfg.max_model_len} is beyond {mc.name}'s context of {context} "
            f"tokens (max_position_embeddings); lower it, or set "
            f"{ALLOW_LONG_MAX_MODEL_LEN_ENV}=1 to run past what the model was trained on")
    return cfg.max_model_len


def _default_kv_tokens(mc: ModelConfig, dtype: torch.dtype, device: torch.device,
                       max_batch_tokens: int) -> int:
    per_token = mc.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Leave room for the workspace (a handful of [T, 4 * hidden] buffers) and the logits.
        budget = _GPU_KV_FRACTION * free - 16 * max_batch_tokens * mc.hidden_size * 4
        return max(0, int(budget // per_token))
    return min(_CPU_KV_BYTES // per_token, _CPU_KV_MAX_TOKENS)
