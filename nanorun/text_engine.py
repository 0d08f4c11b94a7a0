"""Text in, text out over the token-level Engine: prompts as vLLM takes them, detokenized
outputs, stop strings and n > 1.

The core Engine stays token-in, token-out (as vLLM's processor and SGLang's tokenizer manager
sit in front of theirs): a TextEngine tokenizes the prompt, adds one core request per output
sequence, and turns each step's new token ids into text with one IncrementalDetokenizer per
sequence. A stop string is found in that text; the TextEngine then aborts the core request
at once, so its KV pages are free for the next step, and reports the sequence as finished
with finish_reason "stop" and stop_reason the string.

n > 1 is n core requests of the same prompt (ids "<id>#<i>"), queued together with
share_prompt: sequence 0 computes the prompt's KV, and the others take it from the prefix
cache once it is there, sharing its full pages and computing only the prompt's last token
themselves (see nanorun.scheduler; with prefix caching off, on a prefill engine, for a 1-token
prompt and for a sequence that wants prompt logprobs, each computes it on its own). Each
sequence samples its own first token from its own logits: sequence i samples with seed + i
when the request has a seed, so the n samples differ and each is reproducible on its own,
equal to a request of its own with that seed. Only sequence 0 computes the prompt logprobs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from .detokenizer import IncrementalDetokenizer
from .engine import Engine
from .input_processor import as_request_id, token_id_list
from .gguf_tokenizer import gguf_tokenizer
from .models.gguf import is_gguf
from .models.hub import model_path
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .request import Request
from .sampling_params import SamplingParams
from .structured_output import GrammarCompiler, RequestConstraint, bad_words_token_ids
from .tokenizer import Message, Tokenizer, load_tokenizer

logger = logging.getLogger("nanorun")

_SEED_MAX = (1 << 64) - 1

Prompt = str | Mapping | Sequence[int]


@dataclass
class _Sequence:
    """One output sequence: its core request and what has been made of its tokens."""

    core_id: str
    index: int
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    token_ids: list[int] = field(default_factory=list)
    output: RequestOutput | None = None          # the core's last output
    # The core's logprobs with their tokens' text, decoded as they arrive (not every step).
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""


@dataclass
class TextRequest:
    """A user request, validated by TextEngine.new_request and not yet queued."""

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    core: list[Request]
    sequences: list[_Sequence]
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.sequences)


class TextEngine:
    """Text in, text out over `engine` (see the module docstring).

    >>> te = TextEngine.from_model("path/to/hf-model-dir")
    >>> te.add_request("a", "Hello, my name is", SamplingParams(max_tokens=8, stop=["\\n"]))
    >>> while te.has_unfinished_requests():
    ...     for out in te.step():
    ...         print(out.request_id, out.outputs[0].text)     # cumulative text

    tokenizer None (a preset): prompts must be token ids, outputs have empty text.
    """

    def __init__(self, engine: Engine, tokenizer: Tokenizer | None, *,
                 no_tokenizer_reason: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        # Why there is none, when the directory had tokenizer files nanorun cannot read.
        self._no_tokenizer_reason = no_tokenizer_reason
        vocab = engine.model_config.vocab_size
        extra = () if tokenizer is None else tokenizer.eos_token_ids
        # What ends generation: the model config's EOS ids and the tokenizer's (as vLLM).
        self.eos_token_ids = tuple(dict.fromkeys(
            (*engine.eos_token_ids, *(t for t in extra if t < vocab))))
        self._requests: dict[str, TextRequest] = {}
        self._by_core: dict[str, tuple[TextRequest, _Sequence]] = {}
        self._token_text: dict[int, str] = {}
        self._grammars: GrammarCompiler | None = None      # made for the first grammar

    @classmethod
    def from_model(cls, model: str, *, tokenizer: str | None = None,
                   revision: str | None = None, **engine_kwargs) -> TextEngine:
        """An Engine for `model` (a preset, a HF model directory, a GGUF file, or a Hugging Face
        Hub id at `revision`) and its tokenizer, or that of `tokenizer` (a directory, a GGUF
        file or a Hub id) where given."""
        path = model_path(model, revision)
        engine = Engine(path, **engine_kwargs)
        tok, reason = tokenizer_of(tokenizer or path)
        return cls(engine, tok, no_tokenizer_reason=reason)

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, request_id: str | int, prompt: Prompt,
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request: prompt is a string, {"prompt": str}, {"prompt_token_ids": [...]}
        (with an optional "prompt" text to report; either dict may have vLLM's "cache_salt":
        only requests with the same salt share prefix-cache pages), or token ids. Raises
        ValueError or TypeError, and queues nothing, when it can never be served."""
        self.enqueue(self.new_request(request_id, prompt, params, arrival_time))

    def new_request(self, request_id: str | int, prompt: Prompt,
                    params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> TextRequest:
        """Validate and build a request without queueing it."""
        rid = as_request_id(request_id)
        sp = params if params is not None else SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(sp).__name__}")
        if sp.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer and this model has none; use "
                             "stop_token_ids")
        text, ids = self._parse_prompt(prompt)
        salt = _cache_salt(prompt)
        ids = _truncated(ids, sp.truncate_prompt_tokens, self.engine.max_model_len)
        constraint = self._constraint_maker(sp)
        core, seqs = [], []
        for i in range(sp.n):
            child = _child_params(sp, i)
            core_id = rid if sp.n == 1 else f"{rid}#{i}"
            request = self.engine.new_request(core_id, ids, child, arrival_time,
                                              eos_token_ids=self.eos_token_ids,
                                              constraint=constraint and constraint())
            request.cache_salt = salt      # names its pages in the prefix cache (not queued yet)
            arrival_time = request.metrics.arrival_time    # all n arrive together
            core.append(request)
            seqs.append(_Sequence(core_id, i, sp, self._detokenizer(request.prompt_token_ids, sp)))
        return TextRequest(rid, text, core[0].prompt_token_ids, sp, core, seqs)

    def enqueue(self, request: TextRequest) -> None:
        """Queue a request made by new_request()."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use by an "
                             f"unfinished request; give each request a unique id")
        self.engine.enqueue_all(request.core, share_prompt=True)
        self._requests[request.request_id] = request
        for seq in request.sequences:
            self._by_core[seq.core_id] = (request, seq)

    def abort_request(self, request_id: str | int | Iterable[str | int]) -> None:
        """Stop requests (one id or a list of them). Each appears once more in a later step()
        with finish_reason "abort"; unknown or finished ids are ignored."""
        ids = request_id if isinstance(request_id, (list, tuple, set, frozenset)) else [request_id]
        for rid in map(as_request_id, ids):
            request = self._requests.get(rid)
            if request is not None:
                self.engine.abort_request([s.core_id for s in request.sequences
                                           if not s.finished])

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or self.engine.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- one iteration ------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One Engine step. Returns an output for every request that got tokens or ended, with
        each sequence's cumulative text; a finished request is reported once, then forgotten."""
        touched: dict[str, TextRequest] = {}
        for out in self.engine.step():
            owner = self._by_core.get(out.request_id)
            if owner is None:
                continue
            request, seq = owner
            self._update(request, seq, out)
            touched[request.request_id] = request
        outputs = []
        for request in touched.values():
            outputs.append(self._output(request))
            if request.finished:
                del self._requests[request.request_id]
                for seq in request.sequences:
                    self._by_core.pop(seq.core_id, None)
        return outputs

    def _update(self, request: TextRequest, seq: _Sequence, out: RequestOutput) -> None:
        if seq.finished:
            return
        seq.output = out
        if seq.index == 0 and out.prompt_logprobs is not None \
                and request.prompt_logprobs is None:        # complete in the first output
            request.prompt_logprobs = [None if d is None else self._decoded(d)
                                       for d in out.prompt_logprobs]
        core_logprobs = out.outputs[0].logprobs
        if core_logprobs is not None:
            seq.logprobs = seq.logprobs or []
            seq.logprobs.extend(self._decoded(d) for d in core_logprobs[len(seq.logprobs):])
        new = out.token_ids[len(seq.token_ids):]
        seq.token_ids = list(out.token_ids)
        if seq.detok is not None:
            seq.detok.step(new, stop_token=out.finish_reason == "stop" and bool(new))
            if out.finished:
                seq.detok.finish()
            if seq.detok.finished_by_stop:
                if not out.finished:      # free its KV pages now
                    self.engine.abort_request(seq.core_id, report=False)
                seq.finish_reason, seq.stop_reason = "stop", seq.detok.stop_reason
                return
        if out.finished:
            seq.finish_reason = out.finish_reason
            seq.stop_reason = out.outputs[0].stop_reason
            seq.error = out.error

    def _output(self, request: TextRequest) -> RequestOutput:
        completions = []
        for seq in request.sequences:
            core = seq.output.outputs[0] if seq.output is not None else None
            completions.append(CompletionOutput(
                index=seq.index, text=seq.text, token_ids=list(seq.token_ids),
                cumulative_logprob=None if core is None else core.cumulative_logprob,
                logprobs=None if seq.logprobs is None else list(seq.logprobs),
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason, error=seq.error))
        prompt_logprobs = request.prompt_logprobs
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             None if prompt_logprobs is None else list(prompt_logprobs),
                             completions, request.finished,
                             _metrics(request.core),
                             # sequence 0's: the one that computes the prompt (n > 1)
                             num_cached_tokens=request.core[0].num_cached_tokens)

    # ---- text -----------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Message],
                            add_generation_prompt: bool = True, **options) -> str:
        """The prompt text of a chat through the model's chat template. To generate from it,
        pass chat_prompt(messages) instead: its ids are encoded without adding special tokens
        (the template writes its own BOS; encoding the text as a prompt would add a second).
        options: Tokenizer.apply_chat_template's (chat_template, continue_final_message,
        tools, documents, and variables for the template). Raises ValueError without a
        tokenizer or template, or for malformed messages."""
        return self._need_tokenizer("a chat").apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **options)

    def chat_prompt(self, messages: Sequence[Message],
                    add_generation_prompt: bool = True, **options) -> dict:
        """{"prompt": text, "prompt_token_ids": ids} of a chat, for add_request (ids as
        transformers' apply_chat_template(tokenize=True) gives them); options as
        apply_chat_template's."""
        text = self.apply_chat_template(messages, add_generation_prompt, **options)
        return {"prompt": text,
                "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}

    def _constraint_maker(self, sp: SamplingParams):
        """A maker of each sequence's RequestConstraint (its own grammar state) for a request
        with structured_outputs or bad_words, or None. Compiling the grammar here refuses an
        invalid schema, regex or grammar with a ValueError naming the field."""
        if sp.structured_outputs is None and not sp.bad_words:
            return None
        tokenizer = self.tokenizer
        if tokenizer is None:
            what = "structured_outputs" if sp.structured_outputs is not None else "bad_words"
            raise ValueError(f"{what} needs the model's tokenizer, and "
                             f"{self.engine.model_config.name} has none "
                             f"({self._no_tokenizer_reason or 'a preset'}); use "
                             f"allowed_token_ids or logit_bias, which name token ids")
        vocab = self.engine.model_config.vocab_size
        grammar = None
        if sp.structured_outputs is not None:
            if self._grammars is None:
                self._grammars = GrammarCompiler(tokenizer, vocab)
            grammar = self._grammars.compile(sp.structured_outputs)
        bad = bad_words_token_ids(tokenizer, sp.bad_words or (), vocab)
        return lambda: RequestConstraint(grammar, bad, self.eos_token_ids)

    def _parse_prompt(self, prompt: Prompt) -> tuple[str | None, Sequence[int]]:
        """(text or None, token ids) of a prompt in any of add_request's forms."""
        if isinstance(prompt, str):
            return prompt, self._encode(prompt)
        if isinstance(prompt, Mapping):
            unknown = set(prompt) - {"prompt", "prompt_token_ids", "cache_salt"}
            if unknown or not set(prompt) - {"cache_salt"}:
                raise ValueError(f"a prompt dict has 'prompt' (text) or 'prompt_token_ids', and "
                                 f"may have 'cache_salt'; got keys {sorted(map(str, prompt))}")
            text = prompt.get("prompt")
            if text is not None and not isinstance(text, str):
                raise TypeError(f"'prompt' must be a string, got {type(text).__name__}")
            if "prompt_token_ids" in prompt:
                return text, prompt["prompt_token_ids"]
            return text, self._encode(text)
        if isinstance(prompt, bytes):
            raise TypeError("a prompt is a str or token ids, not bytes; decode it first")
        return None, prompt

    def _encode(self, text: str) -> list[int]:
        return self._need_tokenizer("a text prompt").encode(text, add_special_tokens=True)

    def _need_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            why = self._no_tokenizer_reason or "a preset, or a directory without tokenizer.json"
            raise ValueError(f"{what} needs a tokenizer, and {self.engine.model_config.name} has "
                             f"none ({why}); pass token ids: prompt_token_ids=[...]")
        return self.tokenizer

    def _detokenizer(self, prompt_ids: Sequence[int],
                     sp: SamplingParams) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(
            self.tokenizer, prompt_ids, skip_special_tokens=sp.skip_special_tokens,
            stop=sp.stop, include_stop_str_in_output=sp.include_stop_str_in_output,
            min_tokens=sp.min_tokens)

    def _decoded(self, logprobs: dict[int, Logprob]) -> dict[int, Logprob]:
        """The same logprobs with each token's text (as vLLM's decoded_token: the token alone,
        special tokens included)."""
        if self.tokenizer is None:
            return dict(logprobs)
        return {t: replace(lp, decoded_token=self._text_of(t)) for t, lp in logprobs.items()}

    def _text_of(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode(
                [token_id], skip_special_tokens=False)
        return text


def tokenizer_of(model: str) -> tuple[Tokenizer | None, str | None]:
    """The tokenizer of a model directory, a GGUF file (built from its metadata) or a Hugging
    Face Hub id (its tokenizer files, downloaded where missing); None for a preset. Where the
    model has a tokenizer nanorun cannot read, None and why not: token-id prompts still work."""
    path = model_path(model, tokenizer_only=True)
    if not os.path.exists(path):
        return None, None
    try:
        return (gguf_tokenizer(path) if is_gguf(path) else load_tokenizer(path)), None
    except ValueError as e:
        logger.warning("%s; text prompts will be refused", e)
        return None, str(e)


def _truncated(ids: Sequence[int], k: int | None, max_model_len: int) -> Sequence[int]:
    """SamplingParams.truncate_prompt_tokens: the prompt's last k tokens (-1: max_model_len),
    as vLLM keeps them."""
    if k is None:
        return ids
    if k == -1:
        k = max_model_len
    if k > max_model_len:
        raise ValueError(f"truncate_prompt_tokens ({k}) is greater than max_model_len "
                         f"({max_model_len}): select a smaller truncation size")
    ids = token_id_list(ids)
    return ids[-k:] if len(ids) > k else ids


def _cache_salt(prompt: Prompt) -> str | None:
    """A prompt dict's cache_salt (vLLM's): only requests with the same salt share prefix-cache
    pages, so that one user cannot learn from timing what another's prompts were."""
    if not isinstance(prompt, Mapping) or prompt.get("cache_salt") is None:
        return None
    salt = prompt["cache_salt"]
    if not isinstance(salt, str) or not salt:
        raise ValueError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt


def _child_params(sp: SamplingParams, i: int) -> SamplingParams:
    """The core request of sequence i: one sequence, no stop strings, bad words or grammar
    (the TextEngine's: they reach the core as its constraint), seed + i, and prompt logprobs
    from sequence 0 alone."""
    seed = sp.seed
    if seed is not None and i:
        seed = seed + i if seed + i <= _SEED_MAX else seed + i - (1 << 64)
    return replace(sp, n=1, stop=(), bad_words=None, structured_outputs=None, seed=seed,
                   prompt_logprobs=sp.prompt_logprobs if i == 0 else None)


def _metrics(core: list[Request]) -> RequestMetrics:
    """The request's metrics: its one sequence's, or for n > 1 the span of all of them."""
    if len(core) == 1:
        return core[0].metrics
    ms = [r.metrics for r in core]

    def first(values):
        values = [v for v in values if v is not None]
        return min(values) if values else None

    finished = [m.finished_time for m in ms]
    return RequestMetrics(
        arrival_time=ms[0].arrival_time,
        first_scheduled_time=first(m.first_scheduled_time for m in ms),
        first_token_time=first(m.first_token_time for m in ms),
        finished_time=None if None in finished else max(finished),
        token_times=sorted(t for m in ms for t in m.token_times),
        num_preemptions=sum(m.num_preemptions for m in ms),
        num_recomputed_tokens=sum(m.num_recomputed_tokens for m in ms))
