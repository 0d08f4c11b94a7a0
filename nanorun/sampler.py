"""Turn the logits of one iteration into one token per sampling sequence.

Everything is a batched tensor op over the [N, V] block on the logits' device; the host reads
back the N tokens (and the logprobs asked for) once. The steps, in vLLM v1's order:
  1. raw logprobs: log_softmax of the model's logits, for the rows that ask for logprobs;
  2. min_tokens: EOS and stop ids get -inf while a row is below its min_tokens;
  3. penalties: repetition (over prompt and output tokens), frequency and presence (output);
  4. greedy rows take the argmax here (after penalties, as in vLLM);
  5. the others: temperature, min_p, top_k, top_p, then one draw from what is left.

The draw is inverse-CDF sampling with ONE uniform number per row, u = hash(key, position):
`key` is the request's seed (or, unseeded, a number the engine gives each request from its
own seed) and `position` the index of the output token being drawn. Why this and not a
per-request torch.Generator: a row's random number is a pure function of (key, position), so
  - a seeded request gets the same tokens whatever it is batched with (no shared stream),
  - after preemption and recompute it draws the same numbers again (no state to roll back),
    and a scheduler that runs a step ahead (issue 14) cannot shift anyone's stream,
  - a row that fails draws nothing from anyone,
and it costs one [N] vector instead of an [N, V] noise tensor (the exponential/Gumbel trick)
or one launch per seeded row (vLLM's per-request generators). The cumulative sum is float32:
its rounding moves a token's share of [0, 1) by about 1e-7 * sqrt(V), far below sampling noise.
The CDF is always in vocabulary order, also when top_k/top_p sort the tokens to find what they
keep: so logits that move by a rounding (the same request batched otherwise) move each token's
interval by about as much, and u picks another token only when it falls within that distance
of a boundary. In rank order two near-tied tokens would swap their intervals, and a whole
interval's worth of u would change its token.

Penalties need each row's token counts, including the token the previous iteration sampled
and async scheduling has not read back yet. The engine's sampler keeps them on the device
(TokenCounts): each live penalised request holds a row of a [C, V] float32 count tensor and
of a [C, V] bool "in the prompt" one, filled from the host lists once, when the request is
first sampled, then updated by a scatter of each iteration's sampled ids, in the device
work, right after they are drawn. So iteration i + 1 counts i's token without reading it back, and a step costs
O(M) host work and an [M, V] gather for its M penalised rows, whatever their lengths. Why
this and not vLLM v1's bincount of every row's prompt + output ids each step: that is
O(total prompt + output tokens) of device work (and host work or a [C, max_len] id buffer to
keep the ids on the device) every step, growing with the sequences, to spare C x V x 5 bytes
(a 128k vocabulary: 640 KiB a penalised request, 160 MiB for 256 of them). Only requests with
penalties take a row, so the common case pays nothing; a row lives until its request leaves
the engine (Sampler.release), through preemption: recompute does not change the outputs.
C is the most penalised requests alive at once (rows are reused, the tensors never shrink).
The stateless path (Sampler() without counts, apply_penalties) rebuilds the counts from the
host lists each call and is the reference the device counts are tested against.

Token masks and biases come first, in vLLM's order: allowed_token_ids, a request's
TokenConstraint (its grammar and bad words, see nanorun.structured_output) and logit_bias.
The masks of all the rows that have one are one host-built bitmask [M, ceil(V / 32)] int32
(xgrammar's layout: bit t % 32 of word t // 32 allows token t), copied to the device and
unpacked there into -inf on the disallowed logits; logit_bias is one index_put of the rows'
(row, id, bias) triples. Rows with neither pay nothing. A constraint's mask depends on every
token before: where that token is still on the device (async scheduling), the engine
prepares such an iteration's sampling after it has read the token back (see Engine.launch).
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .outputs import Logprob
from .request import Request

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_UNSEEDED = 0x5851F42D4C957F2D      # keeps engine-made keys apart from users' seeds
_FLOAT32_MAX = torch.finfo(torch.float32).max


class SamplingError(RuntimeError):
    """One row could not be sampled (its probabilities were not a distribution)."""


@dataclass
class SamplerOutput:
    """tokens[i] for row i; errors: row -> why it failed (its token is meaningless);
    logprobs[i]: {token_id: Logprob} for rows that asked (sampled token first), else None."""

    tokens: list[int]
    errors: dict[int, str]
    logprobs: list[dict[int, Logprob] | None]


class TokenConstraint(Protocol):
    """What a request's next token may be, from its tokens so far (a grammar, bad words; see
    nanorun.structured_output): host state, advanced by each token read back."""

    @property
    def is_terminated(self) -> bool:
        """Nothing may follow: the request ends (finish_reason "stop")."""

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Clear, in bitmask[row] (int32 words, every bit set on entry), the bits of the
        tokens that may not come next."""

    def accept_token(self, token: int) -> bool:
        """Advance by the request's next token; False if it was not allowed."""


def _mix(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints that scatters every input bit."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK64
    return x ^ (x >> 31)


def seed_key(seed: int) -> int:
    """The sampling key of a request with this seed."""
    return _mix(seed & _MASK64)


def unseeded_key(engine_seed: int, counter: int) -> int:
    """The sampling key of the counter-th unseeded request of an engine with this seed: runs
    with the same seed and requests draw alike; requests draw independently of each other."""
    return _mix(_mix(engine_seed & _MASK64) ^ _UNSEEDED ^ _mix(counter & _MASK64))


def uniform(key: int, position: int) -> float:
    """The uniform number in [0, 1) that output token `position` of a request is drawn with."""
    return (_mix((key + (position + 1) * _GOLDEN) & _MASK64) >> 11) * 2.0 ** -53


class Sampler:
    """Samples one token per row; see the module docstring.

    Three parts, so that an engine can run them at different times (async scheduling):
      prepare(requests, vocab, device): the host's part, everything read from the requests,
          into tensors (while the previous iteration still runs on the device);
      sample(logits, prepared): device ops only, [N] token ids and [N] ok flags on the
          logits' device, no host sync (the next iteration can read the ids where they are);
      finish(logits, prepared, tokens, ok): after the one sync, the host lists, the errors and
          the logprobs asked for.
    Calling the sampler does all three.

    A row that cannot be sampled (NaN or +inf logits, nothing left after the filters) is
    reported, not raised: one request's bad logits must not stop the step for the others.

    counts: where the penalised rows' token counts come from. None: rebuilt from the
    requests' host lists at every prepare(), so any requests do, but none with penalties may
    have tokens pending. A TokenCounts (the engine's): kept on the device and updated by
    every sample() with the ids it draws, so a request's outputs must be what this sampler
    drew for it, and release() must be called when the request leaves.
    """

    def __init__(self, counts: "TokenCounts | None" = None) -> None:
        self.counts = counts
        # Each constrained request's TokenConstraint; weak, so a request made but never
        # queued (its batch-mate refused) leaves nothing behind.
        self.constraints: weakref.WeakKeyDictionary[Request, TokenConstraint] = (
            weakref.WeakKeyDictionary())

    def constrain(self, request: Request, constraint: TokenConstraint) -> None:
        """Sample `request` under `constraint` from its next token on."""
        self.constraints[request] = constraint

    def release(self, request: Request) -> None:
        """`request` leaves (finished, aborted, handed over): its count row, if it has one,
        may go to another request."""
        if self.counts is not None:
            self.counts.release(request)
        self.constraints.pop(request, None)

    def accept(self, request: Request, token: int) -> str | None:
        """Advance the request's constraint, if any, by the token just read back: None, or
        how the request ends ("stop": the grammar is complete; "error: ...": the token broke
        it, which a masked draw cannot do)."""
        constraint = self.constraints.get(request)
        if constraint is None:
            return None
        if not constraint.accept_token(token):
            return f"error: token {token} is not allowed by the request's structured output"
        return "stop" if constraint.is_terminated else None

    def waits_for_tokens(self, requests: list[Request]) -> bool:
        """Whether some request's mask depends on a token still on the device (async
        scheduling): its sampling must be prepared after that token is read back."""
        return any(r.num_pending and r in self.constraints for r in requests)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """logits [N, V], one row per request in `requests` (float32 or the model's dtype)."""
        prepared = self.prepare(requests, logits.shape[1], logits.device)
        tokens, ok = self.sample(logits, prepared)
        return self.finish(logits, prepared, tokens, ok)

    def prepare(self, requests: list[Request], vocab: int,
                device: torch.device) -> "PreparedSampling":
        """What sample() needs from `requests`, built on the host now: later changes to the
        requests (a token read back, an abort) do not change this iteration's draws."""
        return PreparedSampling.of(requests, vocab, device, self.counts, self.constraints)

    def sample(self, logits: torch.Tensor,
               prepared: "PreparedSampling") -> tuple[torch.Tensor, torch.Tensor]:
        """[N] int64 token ids and [N] bool ok, on the logits' device; no host sync."""
        if not prepared.requests:
            empty = torch.zeros(0, dtype=torch.long, device=logits.device)
            return empty, empty.bool()
        logits = logits.float()
        z = logits
        if prepared.edits_logits:
            z = logits.clone()      # the edits are in place; `logits` stays the model's
            if prepared.masks is not None:
                _apply_bitmask(z, *prepared.masks)
            if prepared.bias is not None:
                z.index_put_(prepared.bias[:2], prepared.bias[2], accumulate=True)
            if prepared.stops is not None:
                z[prepared.stops] = float("-inf")
            if prepared.penalties is not None:
                prepared.penalties.apply(z)
        ok = _valid_rows(z)
        tokens = z.argmax(dim=-1)
        for rows, *inputs in prepared.sampled:
            token, row_ok = _sample_rows(z.index_select(0, rows), *inputs)
            tokens = tokens.index_copy(0, rows, token)
            ok = ok.index_copy(0, rows, ok.index_select(0, rows) & row_ok)
        if prepared.penalties is not None:
            prepared.penalties.record(tokens)
        return tokens, ok

    def finish(self, logits: torch.Tensor | None, prepared: "PreparedSampling",
               tokens: torch.Tensor, ok: torch.Tensor) -> SamplerOutput:
        """The host's view of sample()'s result: reads tokens and ok back (the one sync,
        unless they are host tensors already) and computes the logprobs asked for from
        `logits` (which may be None when no request asks for logprobs)."""
        requests = prepared.requests
        if not requests:
            return SamplerOutput([], {}, [])
        host = torch.stack([tokens.long(), ok.long()]).tolist()
        errors = {i: "sampling failed: the probabilities are not finite (NaN or inf logits)"
                  for i, good in enumerate(host[1]) if not good}
        if all(r.sampling_params.logprobs is None for r in requests):
            return SamplerOutput(host[0], errors, [None] * len(requests))
        return SamplerOutput(host[0], errors,
                             _sampled_logprobs(logits, requests, tokens.to(logits.device),
                                               errors))


@dataclass
class PreparedSampling:
    """One iteration's sampling inputs as tensors on the device (see Sampler.prepare).

    masks: (rows [M], bitmask [M, W] int32) of the rows with allowed_token_ids or a
    TokenConstraint; bias: (rows, ids, biases) of logit_bias;
    stops: (rows, ids) to mask with -inf (min_tokens); penalties: the penalised rows and
    their counts (HostPenalties or DevicePenalties);
    sampled: (rows, temperature, min_p, top_k, top_p, u, what to apply) of the non-greedy
    rows, drawn together (empty if there are none).
    """

    requests: list[Request]
    stops: tuple[torch.Tensor, torch.Tensor] | None = None
    penalties: "HostPenalties | DevicePenalties | None" = None
    sampled: tuple[tuple, ...] = ()
    masks: tuple[torch.Tensor, torch.Tensor] | None = None
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def edits_logits(self) -> bool:
        return any(x is not None for x in (self.masks, self.bias, self.stops, self.penalties))

    @classmethod
    def of(cls, requests: list[Request], V: int, device: torch.device,
           counts: "TokenCounts | None" = None,
           constraints: Mapping[Request, TokenConstraint] | None = None) -> "PreparedSampling":
        out = cls(list(requests))
        if not requests:
            return out
        out.masks = _token_masks(requests, V, device, constraints or {})
        out.bias = _logit_bias(requests, V, device)
        out.stops = _stop_mask(requests, V, device)
        rows = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
        if rows:
            out.penalties = (_penalty_inputs(requests, rows, V, device) if counts is None
                             else counts.prepare(requests, rows, V))
        sampled = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        if sampled:
            out.sampled = ((torch.tensor(sampled, device=device),
                            *_sampling_inputs([requests[i] for i in sampled], V, device)),)
        return out


def _valid_rows(z: torch.Tensor) -> torch.Tensor:
    """[N] bool: no NaN or +inf, and some token not masked: exactly the rows whose maximum is
    finite (a NaN propagates through amax), in one pass over [N, V]."""
    return torch.isfinite(z.amax(dim=-1))


def _token_masks(requests: list[Request], V: int, device: torch.device,
                 constraints: Mapping[Request, TokenConstraint]
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows [M], bitmask [M, W] int32 on the device) of the rows with allowed_token_ids or
    a constraint, built on the host; None without any. A finished request (its token in
    flight is dropped) is not asked."""
    rows = [i for i, r in enumerate(requests)
            if r.sampling_params.allowed_token_ids is not None
            or (not r.finished and r in constraints)]
    if not rows:
        return None
    words = -(-V // 32)
    bitmask = np.full((len(rows), words), -1, dtype=np.int32)
    for m, i in enumerate(rows):
        request = requests[i]
        constraint = None if request.finished else constraints.get(request)
        if constraint is not None:
            constraint.fill_bitmask(bitmask, m)
        allowed = request.sampling_params.allowed_token_ids
        if allowed is not None:
            bitmask[m] &= _bitmask_of(allowed, words)
    return (torch.tensor(rows, device=device),
            torch.from_numpy(bitmask).to(device, non_blocking=True))


def _bitmask_of(ids, words: int) -> np.ndarray:
    """One bitmask row [words] int32 allowing exactly `ids`."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[ids < words * 32]
    row = np.zeros(words, dtype=np.uint32)
    np.bitwise_or.at(row, ids // 32, (np.uint32(1) << (ids % 32).astype(np.uint32)))
    return row.view(np.int32)


def _apply_bitmask(z: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf, in place, on z's logits whose bit is clear in their row of the bitmask. On the
    CPU with xgrammar's kernel (one pass in C++: torch's masked_fill there was 20 times
    slower on a 49152-token vocabulary); elsewhere with torch's element-wise ops, which a GPU
    runs at memory speed (xgrammar's CUDA kernel may need a compiler at first use)."""
    if z.device.type == "cpu":
        import xgrammar      # a dependency; imported here, where a mask is first applied

        sub = z.index_select(0, rows)          # bitmask row m masks logits row rows[m]
        xgrammar.apply_token_bitmask_inplace(sub, bitmask, backend="cpu")
        z.index_copy_(0, rows, sub)
    else:
        _mask_with_torch(z, rows, bitmask)


def _mask_with_torch(z: torch.Tensor, rows: torch.Tensor, bitmask: torch.Tensor) -> None:
    """_apply_bitmask in torch's element-wise ops, on any device."""
    V = z.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[:, :, None] >> shifts) & 1                                # [M, W, 32]
    allowed = bits.reshape(len(rows), -1)[:, :V].bool()
    z.index_copy_(0, rows, z.index_select(0, rows).masked_fill(~allowed, float("-inf")))


def _logit_bias(requests: list[Request], V: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, ids, biases) of every logit_bias entry in the vocabulary; None without any."""
    rows, ids, values = [], [], []
    for i, r in enumerate(requests):
        for token, bias in (r.sampling_params.logit_bias or {}).items():
            if token < V:
                rows.append(i)
                ids.append(token)
                values.append(bias)
    if not rows:
        return None
    return (torch.tensor(rows, device=device), torch.tensor(ids, device=device),
            torch.tensor(values, dtype=torch.float32, device=device))


def _stop_mask(requests: list[Request], V: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """EOS and stop ids cannot be drawn before min_tokens (vLLM's min_tokens processor):
    the (rows, ids) to mask, or None."""
    rows, ids = [], []
    for i, r in enumerate(requests):
        if not r.stops_allowed:
            stop = [t for t in r.stop_ids if t < V]
            rows += [i] * len(stop)
            ids += stop
    if not rows:
        return None
    return torch.tensor(rows, device=device), torch.tensor(ids, device=device)


def apply_penalties(z: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """vLLM's penalties, in place on the rows that have any: a token seen in the prompt or the
    output has its logit divided by repetition_penalty where positive (multiplied where
    negative); then frequency_penalty * its count in the output and presence_penalty (once,
    if it is in the output) are subtracted."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
    if rows:
        _penalty_inputs(requests, rows, z.shape[1], z.device).apply(z)
    return z


@dataclass
class HostPenalties:
    """The penalised rows [M] of a batch with their counts built from the host lists now:
    output counts [M, V] float32, in_prompt [M, V] bool, params [M, 3] (repetition,
    frequency, presence)."""

    rows: torch.Tensor
    counts: torch.Tensor
    in_prompt: torch.Tensor
    params: torch.Tensor

    def apply(self, z: torch.Tensor) -> None:
        _penalise(z, self.rows, self.counts, self.in_prompt, self.params)

    def record(self, tokens: torch.Tensor) -> None:
        """Nothing to keep: the next call counts the host lists again."""


def _penalty_inputs(requests: list[Request], rows: list[int], V: int,
                    device: torch.device) -> HostPenalties:
    """The penalties of requests[rows], counted from the tokens read back: none may be
    pending (an engine's sampler counts on the device instead, see TokenCounts)."""
    reqs = [requests[i] for i in rows]
    if any(r.num_pending for r in reqs):
        raise RuntimeError("penalties counted from the host lists need every output token "
                           "read back; give the Sampler a TokenCounts to count tokens still "
                           "on the device")
    counts = _token_counts([r.output_token_ids for r in reqs], V, device)       # [M, V]
    in_prompt = _token_counts([r.prompt_token_ids for r in reqs], V, device) > 0
    return HostPenalties(torch.tensor(rows, device=device), counts, in_prompt,
                         _penalty_params(reqs, device))


def _penalty_params(requests: list[Request], device: torch.device) -> torch.Tensor:
    """[M, 3] float32: each request's repetition, frequency and presence penalty."""
    return torch.tensor([[r.sampling_params.repetition_penalty,
                          r.sampling_params.frequency_penalty,
                          r.sampling_params.presence_penalty] for r in requests],
                        device=device)


class TokenCounts:
    """Penalised requests' token counts kept on the device (see the module docstring).

    Each request with penalties holds a slot, a row of three device tensors: how often each
    token occurs in its output ([C, V] float32), whether it occurs in its prompt ([C, V]
    bool) and its penalties ([C, 3]). The host hands slots out and takes them back
    (prepare, release); only device work touches the tensors (gather and add, which
    DevicePenalties calls inside Sampler.sample, which an engine runs in submission order:
    on the device worker thread on the CPU under async scheduling). So a slot freed on the host and handed
    to another request is refilled after every iteration launched before has written to it,
    and the tensors grow (doubling) there too, never under a running iteration.
    """

    def __init__(self, vocab: int, device: torch.device | str) -> None:
        self.vocab, self.device = vocab, torch.device(device)
        self._slots: dict[Request, int] = {}
        self._free: list[int] = []
        self._handed_out = 0                 # slots 0 .. _handed_out - 1 have been used
        self._output = torch.zeros(0, vocab, device=self.device)
        self._in_prompt = torch.zeros(0, vocab, dtype=torch.bool, device=self.device)
        self._params = torch.zeros(0, 3, device=self.device)

    def __len__(self) -> int:
        """The requests that hold a slot."""
        return len(self._slots)

    def prepare(self, requests: list[Request], rows: list[int], V: int) -> "DevicePenalties":
        """Host work: the slots of requests[rows], taken for those sampled with penalties
        for the first time (filled from their host lists, so none of those may have
        tokens pending; a request keeps its slot until release, so only a request new to
        this sampler is filled)."""
        if V != self.vocab:
            raise ValueError(f"logits of {V} tokens for TokenCounts of a {self.vocab}-token "
                             f"vocabulary; build the TokenCounts with the logits' width")
        slots, new = [], []
        for i in rows:
            request = requests[i]
            slot = self._slots.get(request)
            if slot is None:
                if request.num_pending:
                    raise RuntimeError(f"request {request.request_id!r} has tokens not read "
                                       f"back but no count row: its counts cannot be built "
                                       f"from the host lists; it must be sampled through "
                                       f"this TokenCounts from its first token on")
                slot = self._take()
                self._slots[request] = slot
                new.append((slot, request))
            slots.append(slot)
        device = self.device
        return DevicePenalties(self, torch.tensor(rows, device=device),
                               torch.tensor(slots, device=device), self._handed_out,
                               self._fill_inputs(new) if new else None)

    def release(self, request: Request) -> None:
        slot = self._slots.pop(request, None)
        if slot is not None:
            self._free.append(slot)

    def counts_of(self, request: Request) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(output counts [V], in_prompt [V]) of the request's slot as the device has them
        after the work submitted so far (None: it has no slot). For inspection: on the CPU
        under async scheduling, wait for the engine's iteration in flight first."""
        slot = self._slots.get(request)
        if slot is None:
            return None
        return self._output[slot].clone(), self._in_prompt[slot].clone()

    def _take(self) -> int:
        if self._free:
            return self._free.pop()
        self._handed_out += 1
        return self._handed_out - 1

    def _fill_inputs(self, new: list[tuple[int, Request]]) -> tuple:
        """What _fill writes into new slots: (slots [K], prompt (slot, id) pairs, output
        (slot, id) pairs, params [K, 3]), built on the host."""
        device = self.device
        slots, reqs = [s for s, _ in new], [r for _, r in new]
        return (torch.tensor(slots, device=device),
                _row_token_pairs([r.prompt_token_ids for r in reqs], slots, device),
                _row_token_pairs([r.output_token_ids for r in reqs], slots, device),
                _penalty_params(reqs, device))

    # -- device work ---------------------------------------------------------------------------
    # Always under inference mode, whatever the caller's: tensors grown inside it are
    # inference tensors, which may not be updated in place outside it (an engine's steps run
    # inside it on the CPU's async worker thread, outside it elsewhere, and a caller may wrap
    # step() in it).
    @torch.inference_mode()
    def gather(self, step: "DevicePenalties") -> tuple[torch.Tensor, ...]:
        """The step's slots' (output counts [M, V], in_prompt [M, V], params [M, 3]), after
        growing to its capacity and filling its new slots."""
        if step.capacity > self._output.shape[0]:
            self._grow(step.capacity)
        if step.fill is not None:
            self._fill(*step.fill)
        return tuple(t.index_select(0, step.slots)
                     for t in (self._output, self._in_prompt, self._params))

    @torch.inference_mode()
    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Count one more occurrence of tokens[m] in slot slots[m]'s output."""
        self._output.index_put_((slots, tokens), torch.ones(len(slots), device=self.device),
                                accumulate=True)

    def _fill(self, slots: torch.Tensor, prompt: tuple, output: tuple,
              params: torch.Tensor) -> None:
        """Reset the slots, then count their prompt and output (slot, id) pairs."""
        self._output.index_fill_(0, slots, 0.0)
        self._in_prompt.index_fill_(0, slots, False)
        self._output.index_put_(output, torch.ones(len(output[1]), device=self.device),
                                accumulate=True)
        self._in_prompt.index_put_(prompt, torch.ones(len(prompt[1]), dtype=torch.bool,
                                                      device=self.device))
        self._params.index_copy_(0, slots, params)

    def _grow(self, capacity: int) -> None:
        size = max(capacity, 2 * self._output.shape[0], 8)
        for name in ("_output", "_in_prompt", "_params"):
            old = getattr(self, name)
            new = old.new_zeros((size, old.shape[1]))
            new[:old.shape[0]] = old
            setattr(self, name, new)


@dataclass
class DevicePenalties:
    """One iteration's penalised rows [M] of the batch and their TokenCounts slots [M]; the
    slots count up to `capacity`, and `fill` is what the ones new this iteration start
    from."""

    counts: TokenCounts
    rows: torch.Tensor
    slots: torch.Tensor
    capacity: int
    fill: tuple | None

    def apply(self, z: torch.Tensor) -> None:
        """Device work: penalise z's rows with the counts of every token sampled so far."""
        _penalise(z, self.rows, *self.counts.gather(self))

    def record(self, tokens: torch.Tensor) -> None:
        """Device work: count the tokens [N] this iteration drew in the rows' slots (a
        token dropped later ends its request, whose slot is refilled before reuse)."""
        self.counts.add(self.slots, tokens.index_select(0, self.rows))


def _penalise(z: torch.Tensor, index: torch.Tensor, counts: torch.Tensor,
              in_prompt: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    rep, freq, pres = (params[:, k:k + 1] for k in range(3))
    # repetition_penalty is any float > 0; in float32 it must stay in (0, inf), else a masked
    # -inf logit times 0 (or a 0 logit times inf) becomes NaN.
    rep = rep.clamp(min=torch.finfo(torch.float32).tiny, max=_FLOAT32_MAX)
    sub = z.index_select(0, index)
    seen = in_prompt | (counts > 0)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0).float()
    # A tiny repetition_penalty (it only has to be > 0) must not make a logit +inf: that
    # would read as a broken row.
    return z.index_copy_(0, index, sub.clamp(max=_FLOAT32_MAX))


def _token_counts(seqs: list, V: int, device: torch.device) -> torch.Tensor:
    """[len(seqs), V] float32: how often each token occurs in each sequence."""
    counts = torch.zeros(len(seqs), V, device=device)
    rows, ids = _row_token_pairs(seqs, range(len(seqs)), device)
    return counts.index_put_((rows, ids), torch.ones(len(ids), device=device), accumulate=True)


def _row_token_pairs(seqs: list, row_of, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, token id) index pairs of every token of every sequence, seqs[k]'s in row
    row_of[k]: ([T] int64, [T] int64), T the sequences' total length."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    rows = np.repeat(np.fromiter(row_of, dtype=np.int64, count=len(seqs)), lengths)
    ids = np.concatenate([np.zeros(0, dtype=np.int64)]
                         + [np.asarray(s, dtype=np.int64) for s in seqs])
    return torch.from_numpy(rows).to(device), torch.from_numpy(ids).to(device)


def _sampling_inputs(requests: list[Request], V: int, device: torch.device) -> tuple:
    """_sample_rows's per-row inputs for sampled (non-greedy) rows, from the host: the
    parameters, the row's uniform number (keyed by the position of the token it draws, read
    back or not) and which filters any row needs."""
    sps = [r.sampling_params for r in requests]
    params = torch.tensor([[sp.temperature, sp.min_p, sp.top_k if 0 < sp.top_k < V else V,
                            sp.top_p if sp.top_p < 1.0 else 2.0] for sp in sps],
                          dtype=torch.float64, device=device)
    u = torch.tensor([uniform(r.sampling_key, r.num_output_tokens) for r in requests],
                     dtype=torch.float64, device=device)
    use_min_p = any(sp.min_p > 0.0 for sp in sps)
    use_sort = any(0 < sp.top_k < V or sp.top_p < 1.0 for sp in sps)
    return (*(params[:, k:k + 1] for k in range(4)), u, use_min_p, use_sort)


def _sample_rows(z: torch.Tensor, temperature: torch.Tensor, min_p: torch.Tensor,
                 top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor, use_min_p: bool,
                 use_sort: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, min_p, top_k, top_p, then the draw, for sampled (non-greedy) rows.
    Returns ([M] token ids, [M] bool: the row was a distribution)."""
    device, V = z.device, z.shape[1]
    z = (z / temperature.float()).clamp(max=_FLOAT32_MAX)    # huge / small: not +inf
    if use_min_p:
        probs = torch.softmax(z, dim=-1)
        z = z.masked_fill(probs < min_p.float() * probs.max(dim=-1, keepdim=True).values,
                          float("-inf"))
    if use_sort:
        # top_k and top_p need the tokens by rank to find the kept set; the draw does not. It
        # runs in vocabulary order: there a near-tie between two tokens moves a boundary of
        # the CDF by the size of their difference, where in rank order the two would swap
        # intervals, and the same u pick the other one when rounding (batch shape, thread
        # count) reorders them.
        ranked, order = z.sort(dim=-1, descending=True)
        rank = torch.arange(V, device=device)[None, :]
        ranked = ranked.masked_fill(rank >= top_k.long(), float("-inf"))
        probs = torch.softmax(ranked, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        cut = (rank >= top_k.long()) | (mass_before >= top_p.float())
        z = z.masked_fill(torch.zeros_like(cut).scatter_(1, order, cut), float("-inf"))
    probs = torch.softmax(z, dim=-1)
    ok = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    cdf = probs.nan_to_num(0.0).cumsum(dim=-1)
    # Scaled by the row's total (not 1.0): rounding can leave the sum a hair below u.
    x = (u * cdf[:, -1].double()).float()[:, None]
    token = torch.searchsorted(cdf, x, right=True).clamp_(max=V - 1)[:, 0]
    return token, ok


def _sampled_logprobs(logits: torch.Tensor, requests: list[Request], tokens: torch.Tensor,
                      errors: dict[int, str]) -> list[dict[int, Logprob] | None]:
    rows = [i for i, r in enumerate(requests)
            if r.sampling_params.logprobs is not None and i not in errors]
    out: list[dict[int, Logprob] | None] = [None] * len(requests)
    if rows:
        index = torch.tensor(rows, device=logits.device)
        dicts = logprob_dicts(logits.index_select(0, index), tokens.index_select(0, index),
                              [requests[i].sampling_params.logprobs for i in rows])
        for i, d in zip(rows, dicts):
            out[i] = d
    return out


def logprob_dicts(logits: torch.Tensor, token_ids: torch.Tensor,
                  top: list[int]) -> list[dict[int, Logprob]]:
    """For each row of logits [R, V] (raw model logits): {token_ids[r]: its Logprob, then the
    top[r] most likely tokens}, from log_softmax(logits) (vLLM's default "raw" logprobs: before
    temperature, penalties and filters). rank is 1 + the number of strictly more likely
    tokens, as vLLM counts it."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, token_ids.long()[:, None])                           # [R, 1]
    rank = (lp > chosen).sum(dim=-1) + 1
    k = min(max(top), lp.shape[1]) if top else 0     # a vocabulary may be under 20 tokens
    top_lp, top_ids = lp.topk(k, dim=-1) if k else (lp[:, :0], token_ids[:, None][:, :0])
    host = (token_ids.tolist(), chosen[:, 0].tolist(), rank.tolist(), top_ids.tolist(),
            top_lp.tolist())
    dicts = []
    for r, (tok, value, rk, ids, lps) in enumerate(zip(*host)):
        d = {tok: Logprob(value, rk)}
        for j in range(min(top[r], k)):
            d.setdefault(ids[j], Logprob(lps[j], j + 1))
        dicts.append(d)
    return dicts
