"""Checking a request before the engine takes it (vLLM's Processor): its id, its prompt's
token ids, its sampling parameters against the model and the engine's limits. A request that
can never be served is refused here with a message that says what to change, and queues
nothing."""

from __future__ import annotations

import itertools
from dataclasses import replace
import numbers
import time

import numpy as np
import torch

from .kv_cache import KVCache
from .models import ModelConfig
from .request import Request
from .sampler import seed_key, unseeded_key
from .sampling_params import SamplingParams

# The most logprobs / prompt_logprobs a request may ask for unless EngineConfig.max_logprobs
# says otherwise (vLLM's default max_logprobs).
MAX_LOGPROBS = 20


class InputProcessor:
    """Builds checked Requests for one engine. `eos_token_ids` end a request unless it says
    ignore_eos (a TextEngine passes its tokenizer's too); `seed` is the engine's, from which
    unseeded requests get their random streams, numbered in the order they are made."""

    def __init__(self, model_config: ModelConfig, max_model_len: int, kv_cache: KVCache,
                 seed: int, max_logprobs: int = MAX_LOGPROBS) -> None:
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.kv_cache = kv_cache
        self.seed = seed
        self.max_logprobs = max_logprobs       # -1: the whole vocabulary
        self.eos_token_ids: tuple[int, ...] = tuple(model_config.eos_token_ids)
        self._unseeded = itertools.count()

    def new_request(self, request_id, prompt_token_ids, sampling_params=None,
                    arrival_time=None, *, eos_token_ids: tuple[int, ...] | None = None
                    ) -> Request:
        """A Request, checked; eos_token_ids: what ends it (unless ignore_eos) instead of
        this processor's eos_token_ids. Raises ValueError or TypeError naming the field."""
        request_id = as_request_id(request_id)
        sp = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sp).__name__}")
        check_token_level(sp)
        sp = self._check_logprobs(sp)
        prompt = self.check_prompt(prompt_token_ids)
        self._check_stop_ids(sp)
        self._check_logits_ids(sp)
        self._check_length(len(prompt), sp.max_tokens)
        now = time.perf_counter() if arrival_time is None else arrival_time
        key = (seed_key(sp.seed) if sp.seed is not None
               else unseeded_key(self.seed, next(self._unseeded)))
        eos = self.eos_token_ids if eos_token_ids is None else tuple(eos_token_ids)
        return Request(request_id, prompt, sp, now, eos, sampling_key=key)

    def check_prompt(self, prompt_token_ids) -> list[int]:
        """The prompt as a list of ids in the vocabulary, not empty."""
        prompt = token_id_list(prompt_token_ids)
        if not prompt:
            raise ValueError("prompt_token_ids is empty; give at least one token")
        vocab = self.model_config.vocab_size
        bad = [(i, t) for i, t in enumerate(prompt) if not 0 <= t < vocab]
        if bad:
            i, t = bad[0]
            raise ValueError(f"prompt token {t} at index {i} is outside the vocabulary "
                             f"[0, {vocab}) of {self.model_config.name} ({len(bad)} bad ids)")
        return prompt

    def _check_stop_ids(self, sp: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        bad_stop = [t for t in sp.stop_token_ids if t >= vocab]
        if bad_stop:
            raise ValueError(f"stop_token_ids {bad_stop} are outside the vocabulary [0, {vocab}) "
                             f"of {self.model_config.name}")

    def _check_logits_ids(self, sp: SamplingParams) -> None:
        """logit_bias and allowed_token_ids name tokens of the vocabulary (vLLM's checks)."""
        vocab = self.model_config.vocab_size
        for name, ids in (("logit_bias", sp.logit_bias or ()),
                          ("allowed_token_ids", sp.allowed_token_ids or ())):
            bad = sorted({t for t in ids if t >= vocab})
            if bad:
                raise ValueError(f"{name} token ids {bad[:5]} are outside the vocabulary "
                                 f"[0, {vocab}) of {self.model_config.name}")

    def _check_logprobs(self, sp: SamplingParams) -> SamplingParams:
        """logprobs and prompt_logprobs within max_logprobs, -1 (vLLM's "every token") as the
        vocabulary's size, as vLLM's processor bounds them."""
        vocab = self.model_config.vocab_size
        bound = vocab if self.max_logprobs == -1 else self.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(sp, name)
            if asked == -1:
                sp = replace(sp, **{name: vocab})
            elif asked is not None and asked > bound:
                raise ValueError(f"{name}: {asked} top tokens asked for, more than max_logprobs "
                                 f"({bound}); raise max_logprobs (--max-logprobs; -1 lifts the "
                                 f"bound) or ask for fewer")
        if max(sp.logprobs or 0, sp.prompt_logprobs or 0) > bound:
            name = "logprobs" if (sp.logprobs or 0) > bound else "prompt_logprobs"
            raise ValueError(f"{name}: -1 asks for the whole vocabulary ({vocab} tokens), more "
                             f"than max_logprobs ({bound}); raise max_logprobs (--max-logprobs "
                             f"-1 lifts the bound)")
        return sp

    def _check_length(self, prompt_len: int, max_tokens: int) -> None:
        """The whole request must fit the model's context and, alone, the KV cache."""
        total = prompt_len + max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                f"the model's context of {self.max_model_len} tokens; shorten the prompt or "
                f"lower max_tokens")
        if self.kv_cache.pages_for(total) > self.kv_cache.num_pages:
            raise ValueError(
                f"prompt + max_tokens = {total} tokens needs more KV cache than the engine has "
                f"({self.kv_cache.capacity_tokens} tokens); raise kv_cache_tokens or shorten "
                f"the request")


def check_token_level(sp: SamplingParams) -> None:
    """What the token-level Engine does not do itself: text and several sequences per request
    are nanorun.TextEngine's (and LLM's)."""
    if sp.n != 1:
        raise ValueError(f"n={sp.n}: the Engine runs one sequence per request; use "
                         f"nanorun.TextEngine or LLM for n > 1, or add n requests")
    if sp.stop:
        raise ValueError("stop strings are text: the Engine is token-in, token-out; use "
                         "nanorun.TextEngine or LLM, or stop_token_ids")
    text = sp.needs_tokenizer
    if text is not None:
        raise ValueError(f"{text} is text: the Engine is token-in, token-out; use "
                         f"nanorun.TextEngine or LLM (allowed_token_ids and logit_bias are "
                         f"the Engine's own)")


def as_request_id(request_id) -> str:
    """Request ids are strs; an int is taken as its decimal string (so add_request(5) and
    abort_request(5) name the same request). Anything else would be turned into some string
    that abort_request could not name again, so it is refused."""
    if isinstance(request_id, str):
        return request_id
    if isinstance(request_id, numbers.Integral) and not isinstance(request_id, bool):
        return str(int(request_id))
    raise TypeError(f"a request id must be a str or an int, got {request_id!r} "
                    f"({type(request_id).__name__})")


def token_id_list(prompt) -> list[int]:
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
