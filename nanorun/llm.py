"""Offline batch generation, in the shape of vLLM's LLM class."""

from __future__ import annotations

import inspect
import itertools
import textwrap
import numbers
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .engine import Engine
from .options import engine_fields
from .models.hub import model_path
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .text_engine import Prompt, TextEngine, TextRequest, tokenizer_of
from .tokenizer import Message, Tokenizer


# EngineConfig fields that LLM does not take, and why.
LLM_ABSENT = {"role": "a prefill or decode engine needs a KV connector: build such pairs "
                      "with nanorun.disagg"}
ENGINE_OPTIONS = {f.name: f for f in engine_fields() if f.name not in LLM_ABSENT}


class LLM:
    """Generate for many prompts at once.

    >>> llm = LLM("path/to/hf-model-dir")
    >>> outs = llm.generate(["Hello, my name is", "The capital of France is"],
    ...                     SamplingParams(max_tokens=16, temperature=0))
    >>> outs[0].outputs[0].text

    Args:
        model: a preset name (see `nanorun.models.list_presets()`); a directory holding a
            Hugging Face config.json and its safetensors, and its tokenizer.json (without one,
            prompts must be token ids); a GGUF file (config, weights dequantized to `dtype`,
            tokenizer and chat template all from the file); or a Hugging Face Hub id
            ("org/name"), downloaded into the Hugging Face cache where it is not there yet
            (only the files nanorun reads; HF_HUB_OFFLINE and HF_TOKEN apply).
        tokenizer: a directory, GGUF file or Hub id whose tokenizer to use instead of the
            model's (as vLLM's `tokenizer`).
        revision: the branch, tag or commit of a Hub id (default: main).
        process_group: with tensor_parallel_size N > 1, a torch.distributed group of N ranks
            to use instead of the default group. N > 1 needs N processes started by
            `torchrun --nproc-per-node N`, each running this same code on the same prompts;
            every rank returns the same outputs, `is_driver` (rank 0) says which reports them.
        **options: the engine's options, EngineConfig's fields (the same as the flags of
            `nanorun serve`, `bench` and `generate`), listed below.
    """

    def __init__(self, model: str, *, tokenizer: str | None = None, revision: str | None = None,
                 process_group=None, **options) -> None:
        unknown = sorted(set(options) - set(ENGINE_OPTIONS))
        if unknown:
            absent = [f"{name} ({LLM_ABSENT[name]})" for name in unknown if name in LLM_ABSENT]
            raise TypeError(f"LLM() got unknown options {unknown}"
                            + (f": {'; '.join(absent)}" if absent else "")
                            + f"; its options are {sorted(ENGINE_OPTIONS)}")
        path = model_path(model, revision)      # a Hub id's snapshot, else `model` itself
        self.engine = Engine(path, process_group=process_group, **options)
        tok, reason = tokenizer_of(tokenizer or path)
        self.text_engine = TextEngine(self.engine, tok, no_tokenizer_reason=reason)
        self._ids = itertools.count()

    @property
    def is_driver(self) -> bool:
        """Whether this process reports results: always without tensor parallelism, rank 0
        with it (every rank computes the same outputs)."""
        return self.engine.tensor_parallel.is_driver

    def shutdown(self) -> None:
        """Release the tensor-parallel process group if this LLM initialised it."""
        self.engine.shutdown()

    def get_tokenizer(self) -> Tokenizer | None:
        """The model directory's tokenizer (None for a preset)."""
        return self.text_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        prompts: one prompt or a list of them, each a string, {"prompt": str},
        {"prompt_token_ids": [...]} or a list of token ids. All prompts are checked before
        any is queued: a bad one raises ValueError (or TypeError) naming its index, and
        nothing runs.
        """
        prompts = _prompt_list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        return self._run([self._request(i, p, sp)
                          for i, (p, sp) in enumerate(zip(prompts, params))], use_tqdm)

    def chat(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping] | None = None,
        chat_template_kwargs: Mapping[str, object] | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation ([{"role": ..., "content": ...}, ...]) or a
        list of them, through the model's chat template (or `chat_template`, a Jinja string).
        The rendered text is the outputs' prompt; its ids are encoded without adding special
        tokens (the template writes BOS). As vLLM's LLM.chat: continue_final_message leaves
        the final message open for the model to continue (add_generation_prompt must then be
        False); tools reach the template; chat_template_kwargs are extra template
        variables."""
        chats = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        options = dict(chat_template_kwargs or {})
        options.update(chat_template=chat_template, tools=tools,
                       continue_final_message=continue_final_message)
        prompts = []
        for i, chat in enumerate(chats):
            try:
                prompts.append(self.text_engine.chat_prompt(chat, add_generation_prompt,
                                                            **options))
            except (ValueError, TypeError) as e:
                raise type(e)(f"conversation {i}: {e}") from None
        params = self._params_per_prompt(sampling_params, len(prompts))
        return self._run([self._request(i, p, sp)
                          for i, (p, sp) in enumerate(zip(prompts, params))], use_tqdm)

    def _request(self, i: int, prompt: Prompt, sp: SamplingParams | None) -> TextRequest:
        try:
            return self.text_engine.new_request(str(next(self._ids)), prompt, sp)
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {i}: {e}") from None

    def _run(self, requests: list[TextRequest], use_tqdm: bool) -> list[RequestOutput]:
        te = self.text_engine
        finished: dict[str, RequestOutput] = {}
        bar = _progress(len(requests)) if use_tqdm else None
        try:
            for i, r in enumerate(requests):
                try:
                    te.enqueue(r)          # may still refuse one: its length predictor failed
                except (ValueError, TypeError) as e:
                    raise type(e)(f"prompt {i}: {e}") from None
            ours = {r.request_id for r in requests}    # a step may also end an earlier call's
            while len(finished) < len(requests):       # requests (aborted when it raised)
                for out in te.step():
                    if out.finished and out.request_id in ours:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:
            te.abort_request([r.request_id for r in requests])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [finished[r.request_id] for r in requests]

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"got {len(params)} sampling_params for {n} prompts; give one, "
                             f"or one per prompt")
        return params


def _document_options(cls: type) -> None:
    """LLM's signature and docstring list the engine's options, from EngineConfig's fields."""
    params = list(inspect.signature(cls.__init__).parameters.values())[:-1]   # less **options
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                 annotation=f.type) for name, f in ENGINE_OPTIONS.items()]
    cls.__init__.__signature__ = inspect.Signature(params)
    lines = [textwrap.fill(f"{name}: {f.metadata['help']}", 92, initial_indent=" " * 8,
                           subsequent_indent=" " * 12) for name, f in ENGINE_OPTIONS.items()]
    cls.__doc__ += "\n    Engine options:\n" + "\n".join(lines) + "\n"


_document_options(LLM)


def _progress(total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="req")


def _prompt_list(prompts) -> list:
    """One prompt or a list of them, as a list: a string, a dict or a flat list (or 1-D array)
    of ints is one prompt."""
    if isinstance(prompts, (str, Mapping)):
        return [prompts]
    if isinstance(prompts, (np.ndarray, torch.Tensor)) and prompts.ndim == 1:
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                       for t in prompts):
        return [prompts]
    return prompts
