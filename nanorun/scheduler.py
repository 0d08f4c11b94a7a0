"""Dynamic SplitFuse batch formation over a paged KV cache.

Every iteration gets a fixed token budget (the dense batch size). It is filled, in order, with
  1. one decode token for every running request that is decoding,
  2. the next chunk of a prompt that was split in the previous iteration,
  3. chunks of waiting prompts, in the order of the scheduling policy,
until the budget is exactly used or nothing is left. Only the chunk that reaches a request's
last known token samples (under async scheduling, a token sampled in the previous iteration
and not yet read back counts as known: see Request.num_pending). When a running request needs
a page and none is free, the latest arrival still running is preempted (vLLM's order; if it
was scheduled already this iteration, its chunk is taken back): its pages are given back
(to the prefix cache, which keeps those it computed until they are evicted) and it goes back
to the front of the waiting queue to be recomputed later. Nothing is dropped. A
preempted request is re-admitted only when its whole context fits, beside what the running
requests that arrived before it grow by while it computes that context again; re-admitted as
soon as its next chunk fit, a long prompt was the first victim of the next shortage, over and
over. RequestMetrics.num_recomputed_tokens counts what preemption cost.

Policies decide which waiting requests are admitted first:
  - "fcfs": first come, first served.
  - "hrrn": highest response ratio next (Magnus): ratio = (W + S) / S, with S the request's
    predicted service (the iterations its prompt chunks take, plus one per predicted output
    token after the first; the output length comes from a LengthPredictor) and W the
    iterations it has waited. Short requests go first, and every wait raises a long request's
    ratio until it goes too, so nothing starves. Time is counted in iterations, not seconds,
    so that every tensor-parallel rank ranks alike.
Under both, preempted requests go first, in the order they were preempted: their clients have
seen tokens, and they hold a place they were already given. Admission is strict: it stops at
the first request (in policy order) that does not fit, and that request keeps its place at the
front until it is admitted, so a large request is never skipped for ever by smaller ones that
a re-ranking would put before it.

KV reuse is the prefix cache's (nanorun.prefix_cache, through KVCache): a request admitted
with nothing computed (new, or preempted) first takes the cached pages of its longest cached
prefix and computes only from there; at least its last token is computed, for the logits it
samples from, and a request that wants prompt logprobs computes every position they are still
missing. The pages a request computed are cached at the start of the next iteration (their
KV is then being computed by an iteration already launched, which the device runs first) and
when it leaves or is preempted, so that a preempted request, re-admitted, recomputes only what
was evicted meanwhile. A new request whose prefix a running request is still computing (the n
sequences of one request with n > 1: sequence 0 computes the prompt) waits for it, passed over
by admission (it keeps its place, and blocks no one), and then takes its pages: the full ones
shared, the partial one holding the rest of the prompt copied into a page of its own
(SchedulerOutput.copies, copied on the device before the iteration's model runs). Every
request writes only positions at or past its num_computed_tokens, into pages of its own:
cached pages are read-only. Decisions depend on scheduler state alone, never on timing, so
every tensor-parallel rank takes alike (each copies its own KV heads).

What "fits" means, kv_reservation:
  - "none": the pages of the request's first chunk are free. Running requests may later run out
    of pages, and then one is preempted and recomputed: work done twice.
  - "predicted" (Magnus's use of predicted lengths for memory): also, with the request in,
    the pages that the running requests are predicted to hold stay within the cache at every
    future iteration. Each is forecast to grow by a token an iteration up to its predicted
    peak (prompt + predicted output - 1: the last token's KV is never computed) and to free
    everything when it ends (_KVForecast). Requests end at different times, so this admits far
    more than reserving every request's peak at once would, and with exact predictions nothing
    is preempted. A request that outgrows its prediction is still served, with preemption as
    the safety net.
Under both, a cached page that no request holds counts as free (it is evicted when a page is
needed), and one that the request takes counts as held: it is taken before the check. Shared
pages are counted once per request that holds them (an over-count for "predicted").
"""

from __future__ import annotations

import collections
import itertools
import math
import numbers
from dataclasses import dataclass, field, replace

import numpy as np

from .kv_cache import KVCache
from .lengths import LengthPredictor, get_length_predictor
from .prefix_cache import worth_waiting
from .request import Request, RequestStatus

POLICIES = ("fcfs", "hrrn")
KV_RESERVATIONS = ("none", "predicted")


def uses_predictions(policy: str, kv_reservation: str) -> bool:
    """Whether a scheduler with these settings asks a LengthPredictor anything."""
    return policy == "hrrn" or kv_reservation == "predicted"


@dataclass(frozen=True)
class ScheduledChunk:
    """Compute the KV of tokens [start, start + length) of `request` this iteration."""

    request: Request
    start: int
    length: int
    # Whether the chunk reaches the request's last known token, so that its last row samples.
    # Decided once, when the chunk is made: by the time its iteration retires, the request's
    # num_tokens has moved on (the token sampled is pending), and a test of it then would say
    # no, and miscount the rows of the iteration's logits.
    samples: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "samples",
                           self.start + self.length == self.request.num_tokens)


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Pages to copy (source, destination), every layer, before this iteration's model runs:
    # a cached page that holds the rest of a new request's cached prefix, into its own.
    copies: list[tuple[int, int]] = field(default_factory=list)
    # The host tier's copies, before those (nanorun.kv_offload): (device page, slot) saved,
    # (slot, device page) loaded.
    saves: list[tuple[int, int]] = field(default_factory=list)
    loads: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(c.length for c in self.chunks if c.request.is_decoding)


class Scheduler:
    """policy: "fcfs" or "hrrn"; kv_reservation: "none" or "predicted" (see the module's
    docstring). predictor: what get_length_predictor takes (None: the request's max_tokens);
    used by "hrrn" and "predicted" only. max_num_seqs: the most requests running at once
    (vLLM's max_num_seqs; a request of n sequences counts n)."""

    def __init__(self, kv_cache: KVCache, max_batch_tokens: int, policy: str = "fcfs",
                 predictor: LengthPredictor | str | None = None,
                 kv_reservation: str = "none", max_num_seqs: int | None = None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduling policy {policy!r}: use one of {POLICIES}")
        if kv_reservation not in KV_RESERVATIONS:
            raise ValueError(f"unknown kv_reservation {kv_reservation!r}: use one of "
                             f"{KV_RESERVATIONS}")
        self.kv = kv_cache
        self.max_batch_tokens = max_batch_tokens
        self.policy = policy
        self.kv_reservation = kv_reservation
        self.max_num_seqs = max_num_seqs          # None: as many as the KV cache holds
        self.predictor = (get_length_predictor(predictor)
                          if uses_predictions(policy, kv_reservation) else None)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []          # in admission order
        self.iteration = 0                        # schedule() calls so far
        # With a predictor, per request: (the iteration it was added, its predicted output
        # tokens, its predicted service then, which holds until it is first admitted).
        self._predicted: dict[Request, tuple[int, float, float]] = {}
        self._blocked: Request | None = None     # where admission last stopped: kept first
        # Each queued request's place in arrival order: the latest arrival is preempted first.
        self._arrival: dict[Request, int] = {}
        self._arrivals = itertools.count()
    def add(self, request: Request) -> None:
        """Queue a request. Raises (and queues nothing) if the length predictor fails on it."""
        if self.predictor is not None:
            predicted = self.predictor.predict(request.prompt_token_ids, request.sampling_params)
            if not isinstance(predicted, numbers.Real) or not math.isfinite(predicted) \
                    or predicted < 1:
                raise ValueError(f"length predictor {self.predictor!r} predicted {predicted!r} "
                                 f"output tokens for request {request.request_id!r}; a "
                                 f"predictor must return a finite number >= 1")
            predicted = float(predicted)
            self._predicted[request] = (self.iteration, predicted,
                                        self._service(request, predicted))
        self.waiting.append(request)
        self._arrival[request] = next(self._arrivals)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues (finished or aborted) and give its pages back (the
        ones it computed stay cached, with prefix caching)."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._predicted.pop(request, None)
        self._arrival.pop(request, None)
        if request is self._blocked:
            self._blocked = None
        self.kv.release(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self.iteration += 1
        for request in self.running:     # what the iterations launched so far compute
            self.kv.cache_computed(request)
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_batch_tokens)
        if not out.preempted:   # short of pages: admit nothing new this iteration
            if self.policy == "hrrn" and budget > 0 and len(self.waiting) > 1:
                self._rank_waiting()
            self._admit_waiting(out, budget)
        out.saves, out.loads = self.kv.host_moves()
        return out

    def predicted_output(self, request: Request) -> float:
        """The request's output length as predicted when it was added. Taken as it is: keeping
        within max_tokens is the predictor's business (the built-in ones do), so that a
        benchmark whose max_tokens are the true lengths can run one that does not peek."""
        return self._predicted[request][1]

    def predicted_service(self, request: Request) -> float:
        """hrrn's S: iterations the request still needs, as predicted (at least 1)."""
        return self._service(request, self.predicted_output(request))

    def _service(self, request: Request, predicted_output: float) -> float:
        prompt_iterations = -(-request.num_remaining // self.max_batch_tokens)
        return prompt_iterations + max(
            0.0, predicted_output - len(request.output_token_ids) - 1)

    def response_ratio(self, request: Request) -> float:
        """hrrn's (W + S) / S, with W the iterations since the request was added."""
        service = self.predicted_service(request)
        waited = self.iteration - self._predicted[request][0]
        return (waited + service) / service

    def _rank_waiting(self) -> None:
        """Preempted requests first, as they are; then the request admission stopped at last
        time, if any; then the rest by highest response ratio. Equal ratios (requests that
        waited equally long: 0 iterations, say) go shortest service first, which is where
        1 + W/S tends as W grows alike for all; then in arrival order (the sort is stable)."""
        resumed, pinned, fresh = [], [], []
        for r in self.waiting:
            (resumed if r.metrics.num_preemptions else
             pinned if r is self._blocked else fresh).append(r)
        # response_ratio() inlined over the cached services: this runs every iteration over
        # the whole queue.
        now, predicted = self.iteration, self._predicted

        def rank(r: Request) -> tuple[float, float]:
            added, _, service = predicted[r]
            return -(now - added + service) / service, service

        fresh.sort(key=rank)
        self.waiting = collections.deque(resumed + pinned + fresh)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # Decode tokens first, then the continuing prompt chunks. A request with all its
        # max_tokens sampled (the last still in flight, under async scheduling) has nothing
        # left to compute. When pages run short, the latest arrival still running is
        # preempted (vLLM's order), even if it was scheduled earlier in this loop: preempting
        # by admission order instead evicts a re-admitted request again and again.
        queue = [r for r in self.running if r.is_decoding and not r.sampling_done]
        queue += [r for r in self.running if not r.is_decoding]
        chunks: dict[Request, ScheduledChunk] = {}
        i = 0
        while i < len(queue) and budget > 0:
            request = queue[i]
            n = min(request.num_remaining, budget)
            end = request.num_computed_tokens + n
            while not self.kv.can_grow(request, end):
                victim = max(queue, key=self._arrival.__getitem__)
                at = queue.index(victim)
                del queue[at]
                if victim in chunks:                  # scheduled already: give its turn back
                    chunk = chunks.pop(victim)
                    out.chunks.remove(chunk)
                    budget += chunk.length
                    i -= 1
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                self.kv.grow(request, end)
                chunks[request] = ScheduledChunk(request, request.num_computed_tokens, n)
                out.chunks.append(chunks[request])
                budget -= n
                i += 1
        return budget

    def predicted_peak_tokens(self, request: Request) -> int:
        """The KV tokens a request is predicted to hold at its end: prompt + predicted output
        - 1 (the last token is sampled, its KV never computed), and never less than its next
        step needs."""
        peak = len(request.prompt_token_ids) + math.ceil(self.predicted_output(request)) - 1
        return max(peak, request.num_tokens)

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        forecast = None     # built when first needed: most iterations admit no one
        if any(r.pages for r in self.waiting):
            # Requests whose KV another engine placed (admit_transferred) hold their pages while
            # they wait; behind a preempted request that waits for pages, they would hold them
            # for ever (a decode engine's deadlock). They go first: they need no new page.
            self.waiting = collections.deque(sorted(self.waiting, key=lambda r: not r.pages))
        passed: list[Request] = []     # waiting for a prefix being computed: keep their place
        while self.waiting and budget > 0:
            if self.max_num_seqs is not None and len(self.running) >= self.max_num_seqs:
                break
            request = self.waiting[0]
            hit = None
            if not request.pages and not request.num_computed_tokens:
                limit = self._reusable_tokens(request)
                hit = self.kv.match_prefix(request, limit)
                if hit is not None and self._waits_for_prefix(request, hit, limit):
                    passed.append(self.waiting.popleft())
                    continue
                if hit is not None:
                    hit = self.kv.take_prefix(request, hit)
            fits = self._fits(request, budget)
            if not fits and hit is not None and hit.copy_from is not None:
                # The page to copy from may be the one it needs: compute that part instead.
                self.kv.drop_prefix(request, hit)
                hit = self.kv.take_prefix(request, replace(
                    self.kv.match_prefix(request, limit), copy_from=None, copy_tokens=0))
                fits = self._fits(request, budget)
            if fits and self.kv_reservation == "predicted" and self.running:
                forecast = forecast or _KVForecast(self)
                fits = forecast.admits(request)
            if not fits:
                if hit is not None:
                    self.kv.drop_prefix(request, hit)
                self._blocked = request
                break
            n = min(request.num_remaining, budget)
            if request is self._blocked:
                self._blocked = None
            self.waiting.popleft()
            self.kv.grow(request, request.num_computed_tokens + n)
            if hit is not None:
                out.copies += self.kv.finish_take(request, hit)
            if request.num_cached_tokens is None:      # vLLM's: as first scheduled
                request.num_cached_tokens = (hit.num_tokens(self.kv.page_size)
                                             if hit is not None else 0)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n
        self.waiting.extendleft(reversed(passed))

    def _fits(self, request: Request, budget: int) -> bool:
        """Whether the pages of the request's next chunk are free (a preempted request's:
        see _room_to_resume)."""
        if request.num_computed_before_preemption:
            return self._room_to_resume(request)
        n = min(request.num_remaining, budget)
        return self.kv.can_grow(request, request.num_computed_tokens + n)

    @staticmethod
    def _reusable_tokens(request: Request) -> int:
        """How many of its leading tokens a request may take from the prefix cache: all but
        the last (its logits are sampled), and none from the first position whose prompt
        logprob it still needs."""
        if request.wants_prompt_logprobs:
            return len(request.prompt_logprobs) - 1
        return request.num_tokens - 1

    def _waits_for_prefix(self, request: Request, hit, limit: int) -> bool:
        """A new request (never preempted) whose prefix a running request is computing now
        waits for it (see the module's docstring)."""
        if request.num_computed_before_preemption or request.output_token_ids:
            return False
        computing = [r for r in self.running
                     if r.num_computed_tokens < len(r.prompt_token_ids)]
        return bool(computing) and worth_waiting(
            request, hit.num_tokens(self.kv.page_size), computing, self.kv.page_size, limit)

    def _room_to_resume(self, request: Request) -> bool:
        """Whether a preempted request may be re-admitted: when there is room now for its whole
        context (all it must compute before it samples again), and for what the running
        requests that outrank it (earlier arrivals) grow by while it computes that, so that
        their growth cannot preempt it again half way. Later arrivals need no room: it
        outranks them. Re-admitted as soon as its next chunk fits, a long request is the
        first victim of the next page shortage, over and over (a storm of recompute)."""
        kv = self.kv
        target = request.num_tokens
        iterations = -(-(target - request.num_computed_tokens) // self.max_batch_tokens)
        rank = self._arrival[request]
        need = kv.extra_pages_needed(request, target)
        for r in self.running:
            if self._arrival[r] < rank:
                end = len(r.prompt_token_ids) + r.sampling_params.max_tokens - 1
                need += kv.extra_pages_needed(r, min(r.num_tokens + iterations,
                                                     max(end, r.num_tokens)))
        return need <= kv.num_free_pages

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        self.kv.release(request)
        request.num_computed_before_preemption = max(request.num_computed_before_preemption,
                                                     request.num_computed_tokens)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.metrics.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted.append(request)


class _KVForecast:
    """The KV pages the running requests are predicted to hold, iteration by iteration, for
    kv_reservation="predicted".

    Request i holds min(now_i + k, peak_i) tokens k iterations from now, for left_i
    iterations, then nothing: it grows by one token an iteration (its whole prompt is counted
    at once, which over-counts a prompt still in chunks) until its predicted peak, and ends
    there. The total can only reach a maximum just before some request ends, so admits()
    checks those iterations alone.
    """

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        rows = [self._row(r) for r in sched.running]
        self.now, self.peak, self.left = (np.array(col, dtype=np.int64)
                                          for col in (zip(*rows) if rows else ((), (), ())))

    def _row(self, request: Request) -> tuple[int, int, int]:
        now = request.num_tokens
        peak = self.sched.predicted_peak_tokens(request)
        to_prefill = request.num_tokens - request.num_computed_tokens - 1
        prefill_iterations = -(-to_prefill // self.sched.max_batch_tokens)
        return now, peak, prefill_iterations + peak - now + 1

    def admits(self, request: Request) -> bool:
        """Whether the request fits beside the running ones at every future iteration; if it
        does, it is counted in from now on."""
        now, peak, left = (np.append(col, v) for col, v in
                           zip((self.now, self.peak, self.left), self._row(request)))
        ends = np.unique(np.append(left - 1, 0))
        held = np.minimum(now[:, None] + ends[None, :], peak[:, None])
        pages = -(-held // self.sched.kv.page_size) * (ends[None, :] < left[:, None])
        if pages.sum(axis=0).max() > self.sched.kv.num_pages:
            return False
        self.now, self.peak, self.left = now, peak, left
        return True
