"""Dynamic SplitFuse batch formation over a paged KV cache.

Every iteration gets a fixed token budget (the dense batch size). It is filled, in order, with
  1. one decode token for every running request that is decoding,
  2. the next chunk of a prompt that was split in the previous iteration,
  3. chunks of waiting prompts, in the order of the scheduling policy,
until the budget is exactly used or nothing is left. Only the chunk that reaches a request's
last known token samples (under async scheduling, a token sampled in the previous iteration
and not yet read back counts as known: see Request.num_pending). When a running request needs
a page and none is free, the latest arrival still running is preempted (vLLM's order; if it
was scheduled already this iteration, its chunk is taken back): its pages are freed and it
goes back to the front of the waiting queue to be recomputed later. Nothing is dropped. A
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

Sequences that share a prompt (the n sequences of one request with n > 1; add(fork_of=...)):
the first is the parent and runs as any request; each other one is a fork, which is not
admitted before the parent's prompt KV is computed and then starts from it instead of from 0.
A fork waiting for its parent is passed over by admission (it keeps its place, and blocks no
one). Admitting a fork forks it: it takes a reference to each of the parent's pages that holds
only prompt positions [0, P - 1) (P: prompt length), a page of its own for the one holding
position P - 1, with that page's shared positions copied there (SchedulerOutput.copies: the
engine copies them, every layer, K and V, before the iteration's model runs), and
num_computed_tokens = P - 1. So it computes only the prompt's last token, whose logits are its
own to sample its first token from, with its own key. Every sequence writes only positions at
or past its num_computed_tokens, so from the fork on no sequence writes a page another reads:
shared pages are read-only. The fork's copy is eager (at the fork, not at the first write,
as vLLM's copy-on-write does it) because the page holding P - 1 is written by the fork's very
first chunk.
  - The parent is ready once its num_computed_tokens has reached P - 1 when the iteration is
    formed: that KV was computed by an iteration already launched, which the device runs
    before this one (so async scheduling needs nothing more).
  - Preempting either side only drops its references: a preempted parent recomputes alone
    (its forks not yet forked wait for it again); a preempted fork waits again and re-forks
    if the parent's prompt KV is there then, else it recomputes from 0 alone.
  - A parent that leaves (finishes, is aborted) with its prompt KV computed while forks are
    still queued keeps the pages of prompt positions [0, P - 1) for them, until the last
    leaves: so a parent ending on its first token (max_tokens=1, an EOS) still shares. Kept
    pages are given up, and those forks go on alone, if nothing else can run without them.
    A parent that leaves before its prompt KV is computed leaves its forks to run alone, as
    if they had never shared.
  - Decisions depend on scheduler state alone, never on timing, so every tensor-parallel rank
    forks alike (each copies its own KV heads).
  - kv_reservation="predicted" counts a fork's whole prompt as its own (it over-counts the
    shared pages) and does not count pages kept for forks (preemption covers that).

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
"""

from __future__ import annotations

import collections
import itertools
import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .kv_cache import KVCache
from .lengths import LengthPredictor, get_length_predictor
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
    # the forks' own copies of a page that also holds shared prompt positions.
    copies: list[tuple[int, int]] = field(default_factory=list)

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
        # Forks and their parents (see the module's docstring), while both are queued.
        self._parent_of: dict[Request, Request] = {}
        self._forks_of: dict[Request, list[Request]] = {}
        # A parent that left with its prompt KV computed and forks still queued: the pages of
        # its prompt positions [0, P - 1), kept for them until the last one leaves.
        self._kept: dict[Request, list[int]] = {}

    def add(self, request: Request, fork_of: Request | None = None) -> None:
        """Queue a request. Raises (and queues nothing) if the length predictor fails on it.
        fork_of: a queued request with the same prompt whose prompt KV this one shares (see
        the module's docstring); ignored for a 1-token prompt, which has nothing to share, and
        for a request that wants prompt logprobs, which computes its whole prompt."""
        if fork_of is not None:
            if fork_of.prompt_token_ids != request.prompt_token_ids:
                raise ValueError(f"request {request.request_id!r} cannot fork "
                                 f"{fork_of.request_id!r}: their prompts differ")
            if fork_of in self._parent_of or not (fork_of in self.running
                                                   or fork_of in self.waiting):
                raise ValueError(f"request {request.request_id!r} can fork only a queued "
                                 f"request that is not itself a fork")
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
        if fork_of is not None and len(request.prompt_token_ids) > 1 \
                and request.sampling_params.prompt_logprobs is None:
            self._parent_of[request] = fork_of
            self._forks_of.setdefault(fork_of, []).append(request)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues (finished or aborted) and free its pages (its
        references to shared ones). A parent with forks still queued keeps its prompt's
        pages for them if its prompt KV is computed; if not, they go on alone."""
        was_running = request in self.running
        if was_running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._predicted.pop(request, None)
        self._arrival.pop(request, None)
        if request is self._blocked:
            self._blocked = None
        parent = self._parent_of.pop(request, None)
        if parent is not None:
            self._forks_of[parent].remove(request)
            if not self._forks_of[parent] and parent in self._kept:
                self._drop_kept(parent)
        if self._forks_of.get(request):
            ready = request.num_computed_tokens >= len(request.prompt_token_ids) - 1
            if was_running and ready:
                keep = self.kv.pages_for(len(request.prompt_token_ids) - 1)
                self._kept[request] = request.pages[:keep]
                request.pages = request.pages[keep:]
            else:
                self._drop_kept(request)
        else:
            self._forks_of.pop(request, None)
        self.kv.release(request)

    def _prompt_ready(self, parent: Request) -> bool:
        """Whether the parent's KV of prompt positions [0, P - 1) is there to share: computed
        by iterations already launched, and still held (by it, or kept for its forks)."""
        if parent in self._kept:
            return True
        return (parent.status is RequestStatus.RUNNING
                and parent.num_computed_tokens >= len(parent.prompt_token_ids) - 1)

    def _drop_kept(self, parent: Request) -> None:
        """Free what was kept of a parent (if anything); its forks that have not forked (or
        were preempted) go on alone."""
        pages = self._kept.pop(parent, None)
        if pages:
            self.kv.allocator.free(pages)
        for fork in self._forks_of.pop(parent, ()):
            del self._parent_of[fork]

    def _prompt_pages(self, parent: Request) -> list[int]:
        return self._kept.get(parent, parent.pages)

    def parent_of(self, request: Request) -> Request | None:
        """The queued request whose prompt KV `request` shares or waits for (None: none)."""
        return self._parent_of.get(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        self.iteration += 1
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_batch_tokens)
        if not out.preempted:   # short of pages: admit nothing new this iteration
            if self.policy == "hrrn" and budget > 0 and len(self.waiting) > 1:
                self._rank_waiting()
            self._admit_waiting(out, budget)
            if not out.chunks and self.waiting and self._kept:
                # Nothing could run, and pages kept for forks may be what is missing: give
                # them up (those forks compute their prompt alone) rather than wait for ever.
                for parent in list(self._kept):
                    self._drop_kept(parent)
                self._admit_waiting(out, budget)
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
        passed: list[Request] = []     # forks waiting for their parent: they keep their place
        while self.waiting and budget > 0:
            if self.max_num_seqs is not None and len(self.running) >= self.max_num_seqs:
                break
            request = self.waiting[0]
            if self._waits_for_parent(request):
                passed.append(self.waiting.popleft())
                continue
            forked = self._fork(request)
            n = min(request.num_remaining, budget)
            fits = (self._room_to_resume(request) if request.num_computed_before_preemption
                    else self.kv.can_grow(request, request.num_computed_tokens + n))
            if fits and self.kv_reservation == "predicted" and self.running:
                forecast = forecast or _KVForecast(self)
                fits = forecast.admits(request)
            if not fits:
                if forked:
                    self._unfork(request)
                self._blocked = request
                break
            if request is self._blocked:
                self._blocked = None
            self.waiting.popleft()
            self.kv.grow(request, request.num_computed_tokens + n)
            if forked:
                out.copies += self._copies(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, n))
            budget -= n
        self.waiting.extendleft(reversed(passed))

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

    def _waits_for_parent(self, request: Request) -> bool:
        """A fork that has not forked (it computed nothing) whose parent's prompt KV is not
        there to share yet."""
        parent = self._parent_of.get(request)
        if parent is None or request.num_computed_tokens:
            return False
        return not self._prompt_ready(parent)

    def _fork(self, request: Request) -> bool:
        """Fork a fork whose parent is ready (returns False for anything else, left alone):
        share the parent's pages that hold only positions [0, P - 1), start at P - 1."""
        parent = self._parent_of.get(request)
        if parent is None or request.num_computed_tokens:
            return False
        shared = len(request.prompt_token_ids) - 1
        self.kv.share(self._prompt_pages(parent), request, shared // self.kv.page_size)
        request.num_computed_tokens = shared
        return True

    def _copies(self, request: Request) -> list[tuple[int, int]]:
        """A fork just admitted (its pages grown): (the parent's page, its own) for the page
        holding P - 1, when that page also holds shared positions."""
        shared = len(request.prompt_token_ids) - 1
        if shared % self.kv.page_size == 0:
            return []
        i = shared // self.kv.page_size
        return [(self._prompt_pages(self._parent_of[request])[i], request.pages[i])]

    def _unfork(self, request: Request) -> None:
        """Undo _fork for a fork that was not admitted after all."""
        self.kv.release(request)
        request.num_computed_tokens = 0

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
