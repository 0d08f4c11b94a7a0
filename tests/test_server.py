"""`nanorun serve` end to end: a real server process on loopback, driven by the openai client.

One server per module (starting one imports torch and loads the model: seconds), on a free
port, over a tiny model directory with a real tokenizer and chat template (tests/text_model.py).
What it returns is checked against the same requests run in this process through the Python
API: greedy text must be equal, streamed deltas must add up to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import urllib.error
import urllib.request
from http.client import HTTPConnection
from urllib.parse import urlsplit

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sse_starlette")
openai = pytest.importorskip("openai")
aiohttp = pytest.importorskip("aiohttp")

from nanorun import LLM, SamplingParams  # noqa: E402

from ranks import free_port  # noqa: E402
from text_model import write_text_model  # noqa: E402

MODEL = "tiny-text"
KV_TOKENS = 4096
PAGE_SIZE = 16
PROMPTS = ["hello world, the quick", "Привет, мир! 你好", "def main():\n    return"]
CHAT = [{"role": "system", "content": "You serve language models."},
        {"role": "user", "content": "héllo wörld! what is 🙂?"}]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _post(url: str, body) -> tuple[int, dict]:
    """POST a JSON body (a str is sent as it is: malformed JSON)."""
    data = body if isinstance(body, str) else json.dumps(body)
    req = urllib.request.Request(url, data=data.encode(),
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _send_completion(url: str, body: dict) -> HTTPConnection:
    """POST a completion on a connection of its own, left open for the test to read (or to
    hang up on) as it likes."""
    where = urlsplit(url)
    conn = HTTPConnection(where.hostname, where.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"content-type": "application/json"})
    return conn


def _start_server(model_dir, *extra: str, env=None, log=None,
                  verbose: bool = False) -> tuple[subprocess.Popen, str]:
    """A server on a free loopback port; its log goes to `log` (a file) if given. verbose:
    `nanorun -v serve` (INFO logging)."""
    port = free_port()
    cmd = [sys.executable, "-m", "nanorun.cli", *(["-v"] if verbose else []), "serve",
           str(model_dir), "--port", str(port), "--served-model-name", MODEL,
           "--kv-cache-tokens", str(KV_TOKENS), "--page-size", str(PAGE_SIZE), *extra]
    # Its log goes to a file: an unread pipe fills up with enough logging and blocks the server.
    if log is None:
        log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"nanorun serve exited: {log.read()}")
        try:
            if _get(f"{url}/health")[0] == 200:
                return proc, url
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("nanorun serve did not come up in 90 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("text-model"))


@pytest.fixture(scope="module")
def server_log():
    """The module server's log (appended to: the server writes while a test reads)."""
    with tempfile.TemporaryFile(mode="a+") as log:
        yield log


@pytest.fixture(scope="module")
def server(model_dir, server_log):
    proc, url = _start_server(model_dir, "--max-queued-requests", "256", log=server_log,
                              verbose=True)
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), kv_cache_tokens=KV_TOKENS, page_size=PAGE_SIZE)


def _metrics(url: str) -> dict[str, float]:
    """/metrics as {name{labels}: value}."""
    text = _get(f"{url}/metrics")[1]
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _metric(url: str, name: str, **labels: str) -> float:
    labels = {"model_name": MODEL, **labels}
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return _metrics(url).get(key, 0.0)


# -- what the server returns equals the Python API's -------------------------------------------
def test_greedy_completion_text_equals_llm_generate(client, llm):
    params = SamplingParams(max_tokens=12, temperature=0.0)
    expected = llm.generate(PROMPTS, params)
    for prompt, ref in zip(PROMPTS, expected):
        got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                        temperature=0)
        choice = got.choices[0]
        assert choice.text == ref.outputs[0].text
        assert choice.finish_reason == ref.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert got.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_greedy_chat_text_equals_llm_chat(client, llm):
    ref = llm.chat(CHAT, SamplingParams(max_tokens=10, temperature=0.0))[0]
    got = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                         temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == ref.outputs[0].text
    assert got.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert got.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_token_id_prompt_and_vllm_extra_fields(client, llm):
    """A prompt of token ids, ignore_eos/top_k/min_tokens in the body: as SamplingParams."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, top_k=5)
    ref = llm.generate([{"prompt_token_ids": [1, 40, 41, 42]}], params)[0]
    got = client.completions.create(model=MODEL, prompt=[1, 40, 41, 42], max_tokens=20,
                                    temperature=0, extra_body={"ignore_eos": True, "top_k": 5,
                                                               "min_tokens": 20})
    assert got.choices[0].text == ref.outputs[0].text
    assert got.usage.completion_tokens == 20


def test_streamed_deltas_concatenate_to_the_text(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16,
                                      temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        whole.usage.completion_tokens

    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                          temperature=0)
    stream = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                                 temperature=0, stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == chat.choices[0].message.content


def test_a_stream_interval_sends_the_same_text_in_fewer_chunks(model_dir, client):
    """--stream-interval 4: the first tokens at once, then a chunk once 4 more are there, the
    rest with the finish; the same text as a chunk per step (the module's server). A client
    that reads slower than the steps gets larger chunks, never smaller ones."""
    proc, url = _start_server(model_dir, "--stream-interval", "4")
    try:
        spaced = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        body = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=14, temperature=0,
                    logprobs=1, stream=True, extra_body={"ignore_eos": True})
        every = [c.choices[0] for c in client.completions.create(**body) if c.choices]
        sparse = [c.choices[0] for c in spaced.completions.create(**body) if c.choices]
    finally:
        _stop(proc)
    assert "".join(c.text for c in sparse) == "".join(c.text for c in every)
    sizes = [len(c.logprobs.tokens) for c in sparse]
    assert sum(sizes) == sum(len(c.logprobs.tokens) for c in every) == 14
    assert all(n >= 4 for n in sizes[1:-1]), sizes
    assert len(sparse) <= 5, sizes               # 1 + 4 + 4 + 4 + 1 at the most
    assert [c.finish_reason for c in sparse][-1] == "length"
    assert all(c.finish_reason is None for c in sparse[:-1])


def test_n_stop_and_logprobs(client, llm):
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, n=2,
                                    temperature=1.0, seed=7, logprobs=2)
    assert sorted(c.index for c in got.choices) == [0, 1]
    ref = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=6, n=2, temperature=1.0, seed=7,
                                                    logprobs=2))[0]
    for choice, out in zip(sorted(got.choices, key=lambda c: c.index), ref.outputs):
        assert choice.text == out.text
        lp = choice.logprobs
        assert len(lp.tokens) == len(out.token_ids) == len(lp.token_logprobs)
        want = [out.logprobs[i][t].logprob for i, t in enumerate(out.token_ids)]
        assert lp.token_logprobs == pytest.approx(want, abs=1e-4)
        # The sampled token and the 2 best (OpenAI's "up to logprobs + 1").
        assert all(len(top) <= 3 and token in top
                   for token, top in zip(lp.tokens, lp.top_logprobs))
    # A stop string taken from the greedy text ends the output just before it.
    greedy = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    text = greedy.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12,
                                    temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == text[:text.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_a_streamed_choice_that_ends_first_sends_one_finish_chunk(client, llm):
    """n = 2 where one sequence stops on a string while the other goes on: each choice's
    finish_reason comes once (a finished choice is not sent again with its siblings' chunks)."""
    params = dict(max_tokens=12, n=2, temperature=1.0, seed=0, stop=["e"])
    ref = llm.generate([PROMPTS[0]], SamplingParams(ignore_eos=True, **params))[0].outputs
    assert len(ref[0].token_ids) != len(ref[1].token_ids), "pick a seed where one ends first"
    finishes = {0: 0, 1: 0}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[0], stream=True,
                                           extra_body={"ignore_eos": True}, **params):
        for c in chunk.choices:
            finishes[c.index] += c.finish_reason is not None
    assert finishes == {0: 1, 1: 1}


def test_a_list_of_prompts_is_one_choice_each_streamed_or_not(client, llm):
    params = SamplingParams(max_tokens=8, temperature=0.0, n=2)
    expected = [c.text for out in llm.generate(PROMPTS[:2], params) for c in out.outputs]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, n=2,
                                    temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == expected
    streamed = {}
    for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[:2], max_tokens=8, n=2,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(4)] == expected


def test_prompt_logprobs_as_vllm_returns_them(client, llm):
    ref = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0.0,
                                                    prompt_logprobs=1))[0]
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2,
                                    temperature=0, extra_body={"prompt_logprobs": 1})
    plp = got.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ref.prompt_token_ids) and plp[0] is None
    for token, entry, want in zip(ref.prompt_token_ids[1:], plp[1:], ref.prompt_logprobs[1:]):
        assert entry[str(token)]["logprob"] == pytest.approx(want[token].logprob, abs=1e-4)
        assert entry[str(token)]["rank"] == want[token].rank


def test_logprobs_0_and_top_logprobs_0_as_openai_and_vllm_return_them(client):
    """Completions: logprobs k gives each token's top_logprobs the sampled token and the k best
    (OpenAI's "up to logprobs + 1"), so 0 gives the sampled token alone. Chat: top_logprobs k
    lists the k best, none for 0 (OpenAI's and vLLM's). prompt_logprobs not asked for is
    null, never absent, so the openai client's attribute reads None."""
    got = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5,
                                    temperature=0, logprobs=0)
    choice = got.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == 5
    assert [list(top) for top in lp.top_logprobs] == [[t] for t in lp.tokens]
    assert [top[t] for t, top in zip(lp.tokens, lp.top_logprobs)] == lp.token_logprobs
    assert choice.prompt_logprobs is None
    for k in (0, 2):
        chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4,
                                              temperature=0, logprobs=True, top_logprobs=k)
        content = chat.choices[0].logprobs.content
        assert len(content) == 4 and all(len(c.top_logprobs) == k for c in content)
        assert chat.prompt_logprobs is None


def test_32_concurrent_streaming_clients_all_finish(server):
    async def one(aclient, i: int) -> tuple[int, str, int]:
        stream = await aclient.completions.create(
            model=MODEL, prompt=PROMPTS[i % 3], max_tokens=8 + i, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
        return i, text, usage

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused",
                                      max_retries=0, timeout=120) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(32)))

    results = asyncio.run(run_all())
    assert [usage for _, _, usage in results] == [8 + i for i in range(32)]
    for i, text, _ in results:
        assert text, f"request {i} streamed no text"


def test_disconnect_mid_stream_aborts_and_frees_every_page(server):
    aborted_before = _metric(server, "vllm:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}
    conn = _send_completion(server, body)
    response = conn.getresponse()
    assert response.status == 200
    data = []
    while len(data) < 3:               # read a few chunks, then hang up
        line = response.fp.readline().decode()
        if line.startswith("data:"):
            data.append(json.loads(line[5:]))
    conn.close()
    assert all(d["choices"][0]["finish_reason"] is None for d in data)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = _metrics(server)
        key = '{model_name="' + MODEL + '"}'
        aborted = _metric(server, "vllm:request_success_total", finished_reason="abort")
        if (aborted > aborted_before and m["vllm:num_requests_running" + key] == 0
                and m["nanorun:kv_cache_free_pages" + key] == m["nanorun:kv_cache_pages" + key]):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the request was not aborted or its pages not freed: {m}")
    assert m["nanorun:kv_cache_pages" + key] == KV_TOKENS // PAGE_SIZE


def test_disconnect_before_a_non_streaming_answer_aborts_too(server):
    aborted_before = _metric(server, "vllm:request_success_total", finished_reason="abort")
    # As long as the context allows (512), four sequences: well over a second of decoding,
    # while noticing the hang-up takes a poll of 0.25 s.
    conn = _send_completion(server, {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 480,
                                     "n": 4, "temperature": 0, "ignore_eos": True})
    running = time.monotonic() + 10
    while _metric(server, "vllm:num_requests_running") < 1:    # hang up once it runs
        assert time.monotonic() < running, "the request never started"
        time.sleep(0.01)
    conn.close()
    deadline = time.monotonic() + 20
    while _metric(server, "vllm:request_success_total", finished_reason="abort") \
            <= aborted_before:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.1)


BAD_REQUESTS = [
    ("completions", {"model": "no-such-model", "prompt": "hi"}, "model"),
    ("completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
    ("completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, "top_p"),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "hi", "n": "two"}, "n"),
    ("completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [10 ** 9]}, None),
    ("completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("completions", {"model": MODEL}, "prompt"),
    ("completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"1": 500}}, "logit_bias"),
    ("completions", {"model": MODEL, "prompt": "hi", "stream": True, "prompt_logprobs": 1},
     "prompt_logprobs"),
    ("chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("chat/completions", {"model": MODEL, "messages": [{"content": "no role"}]}, "messages"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "max_completion_tokens": -3},
     "max_tokens"),
    ("completions", "{not json", None),
    # Fields nanorun does not know are refused by name, never ignored.
    ("completions", {"model": MODEL, "prompt": "hi", "no_such_field": 1}, "no_such_field"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "no_such_field": 1},
     "no_such_field"),
    ("completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, "best_of"),
    ("completions", {"model": MODEL, "prompt": "hi", "stream": True,
                     "stream_options": {"no_such_option": True}},
     "stream_options.no_such_option"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "tool_choice": "auto"},
     "tool_choice"),
    ("chat/completions", {"model": MODEL, "messages": CHAT, "tool_choice": "auto",
                          "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
]


@pytest.mark.parametrize("endpoint,body,param", BAD_REQUESTS)
def test_bad_request_is_a_400_and_the_next_is_served(server, endpoint, body, param):
    status, reply = _post(f"{server}/v1/{endpoint}", body)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == 400
    if param is not None:
        assert error["param"] == param, error
    status, ok = _post(f"{server}/v1/completions", {"model": MODEL, "prompt": "hello",
                                                    "max_tokens": 2})
    assert status == 200 and ok["usage"]["completion_tokens"] >= 1


def _fields(what: type) -> list[tuple[str, str, object]]:
    """(endpoint, field, its disposition) for every declared field of the request models
    whose disposition is of type `what`."""
    from nanorun.server.protocol import (ChatCompletionRequest, CompletionRequest,
                                         field_dispositions)

    return [(endpoint, name, d)
            for endpoint, model in (("completions", CompletionRequest),
                                    ("chat/completions", ChatCompletionRequest))
            for name, d in field_dispositions(model).items() if isinstance(d, what)]


def _refused() -> list:
    from nanorun.server.protocol import Refused

    return _fields(Refused)


_BASE = {"completions": {"model": MODEL, "prompt": "hi", "max_tokens": 2},
         "chat/completions": {"model": MODEL, "messages": CHAT, "max_tokens": 2}}


@pytest.mark.parametrize("endpoint,field,refused", _refused(),
                         ids=[f"{e}-{f}" for e, f, _ in _refused()])
def test_every_field_nanorun_does_not_act_on_is_a_400_naming_it(server, endpoint, field,
                                                                 refused):
    """Walks the request models: every field declared Refused, sent with a value a client
    sends to ask for it, is refused by name (structured_outputs, response_format, echo,
    continue_final_message, ...)."""
    status, reply = _post(f"{server}/v1/{endpoint}", {**_BASE[endpoint],
                                                      field: refused.example})
    assert status == 400, reply
    assert reply["error"]["param"] == field and field in reply["error"]["message"], reply


def test_a_refused_fields_values_that_ask_for_nothing_are_served(server):
    """echo: false, response_format {"type": "text"}, logit_bias {}: what a client library
    sends by default changes nothing, so it is served."""
    sent = 0
    for endpoint, field, refused in _refused():
        for value in refused.noop:
            if value is not None:
                status, reply = _post(f"{server}/v1/{endpoint}", {**_BASE[endpoint],
                                                                  field: value})
                assert status == 200, (field, value, reply)
                sent += 1
    assert sent >= 10


def test_every_request_field_says_what_happens_to_it():
    """Each declared field is passed to SamplingParams (a field it has), served, or refused:
    field_dispositions raises for a field that says none, or two."""
    from nanorun.sampling_params import SamplingParams
    from nanorun.server.protocol import Sampling

    names = {f for _, f, _ in _fields(Sampling)}
    assert names and names <= set(SamplingParams.__dataclass_fields__)


def test_add_generation_prompt_and_tools_reach_the_chat_template(client, server):
    """Fields the server acts on itself: add_generation_prompt false leaves the template's
    assistant header out; tools with tool_choice "none" are given to the template (this one
    ignores them) and served."""
    with_prompt = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1)
    without = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                             extra_body={"add_generation_prompt": False})
    assert without.usage.prompt_tokens < with_prompt.usage.prompt_tokens
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    status, reply = _post(f"{server}/v1/chat/completions", {**_BASE["chat/completions"],
                                                            "tools": tools,
                                                            "tool_choice": "none"})
    assert status == 200, reply


def test_the_start_log_says_what_the_engine_was_built_with(server, server_log):
    """`nanorun -v serve` logs the engine's build at start (the module's server runs so)."""
    server_log.seek(0)
    text = server_log.read()
    for part in (f"served_model_name={MODEL}", "dtype=float32", "device=cpu",
                 "async_scheduling=False", "layout=sequential", "max_batch_tokens=512",
                 f"{KV_TOKENS // PAGE_SIZE} pages x {PAGE_SIZE} tokens = {KV_TOKENS} tokens",
                 "max_model_len=512"):
        assert part in text, (part, text)


def test_models_health_and_metric_names(server):
    models = json.loads(_get(f"{server}/v1/models")[1])
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert _get(f"{server}/health")[0] == 200
    names = {re.sub(r"\{.*", "", k) for k in _metrics(server)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "nanorun:kv_cache_free_pages",
                 "nanorun:recomputed_tokens_total"):
        assert name in names, name
    # Counted per step, every token once, whichever tests ran before this one.
    before = _metric(server, "vllm:generation_tokens_total")
    prompts = _metric(server, "vllm:prompt_tokens_total")
    for stream in (False, True):
        body = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 3, "ignore_eos": True,
                "stream": stream}
        req = urllib.request.Request(f"{server}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and r.read()
    assert _metric(server, "vllm:generation_tokens_total") == before + 6
    assert _metric(server, "vllm:prompt_tokens_total") == prompts + 8


def test_sigterm_cancels_running_streams_after_the_shutdown_timeout(model_dir):
    """A stream that would run for seconds does not hold the server past --shutdown-timeout:
    uvicorn cancels it (its request is aborted), the engine stops, and the process ends (by
    the SIGTERM uvicorn raises again once it has shut down)."""
    proc, url = _start_server(model_dir, "--shutdown-timeout", "0")
    try:
        body = {"model": MODEL, "prompt": PROMPTS[0], "max_tokens": 480, "n": 8,
                "temperature": 0, "ignore_eos": True, "stream": True}
        conn = _send_completion(url, body)
        response = conn.getresponse()
        assert response.status == 200
        while not response.fp.readline().startswith(b"data:"):   # it is streaming
            pass
        proc.terminate()
        start = time.monotonic()
        assert proc.wait(20) in (0, -signal.SIGTERM)
        assert time.monotonic() - start < 15
        rest = []                        # the raw (chunked) bytes until the server closes
        try:
            while line := response.fp.readline():
                rest.append(line)
        except OSError:                  # reset: nothing more either way
            pass
        assert rest and b"data: [DONE]\n" not in rest      # cut short, not run to its end
        conn.close()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_503_past_the_queue_bound_and_no_hang(model_dir):
    """With --max-queued-requests 1, a burst gets some 503s at once; the rest are served."""
    proc, url = _start_server(model_dir, "--max-queued-requests", "1")
    try:
        async def post(http) -> int:
            async with http.post(f"{url}/v1/completions", json={
                    "model": MODEL, "prompt": PROMPTS[0], "max_tokens": 40,
                    "ignore_eos": True}) as r:
                await r.read()
                return r.status

        async def burst():
            timeout = aiohttp.ClientTimeout(total=60)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                return await asyncio.gather(*(post(http) for _ in range(12)))

        codes = asyncio.run(burst())
        assert set(codes) == {200, 503}, codes
        assert _metric(url, "nanorun:requests_rejected_total") == codes.count(503)
        status, _ = _post(f"{url}/v1/completions", {"model": MODEL, "prompt": "hi",
                                                    "max_tokens": 2})
        assert status == 200
    finally:
        _stop(proc)


def test_import_nanorun_does_not_import_the_server_libraries():
    code = ("import sys, nanorun, nanorun.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'sse_starlette', "
            "'prometheus_client', 'aiohttp') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ}, check=True)
    assert out.stdout.strip() == "[]"


# -- tensor parallelism: rank 0 serves HTTP, every rank steps alike ------------------------------
def test_two_gloo_ranks_serve_the_text_of_one_process(model_dir, llm):
    port = free_port()
    procs = []
    try:
        for rank in (1, 0):
            env = _rank_env(rank, port)
            if rank == 1:
                procs.append(_start_follower(model_dir, env))
            else:
                proc, url = _start_server(model_dir, "--tensor-parallel-size", "2", env=env)
                procs.append(proc)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0,
                               timeout=60)
        params = SamplingParams(max_tokens=12, temperature=0.0)
        for prompt, ref in zip(PROMPTS, llm.generate(PROMPTS, params)):
            got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                            temperature=0)
            assert got.choices[0].text == ref.outputs[0].text
        _stop(procs[1])              # rank 0 stops, and tells rank 1 to stop with it
        assert procs[0].wait(30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def _start_follower(model_dir, env, *, code: str | None = None,
                    stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """Rank 1 of `nanorun serve --tensor-parallel-size 2`; code: a `python -c` program that
    ends in nanorun.cli.main (to change something in this process only) instead of -m."""
    launch = ["-m", "nanorun.cli"] if code is None else ["-c", code]
    cmd = [sys.executable, *launch, "serve", str(model_dir), "--tensor-parallel-size", "2",
           "--kv-cache-tokens", str(KV_TOKENS), "--page-size", str(PAGE_SIZE)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr, env=env)


def _rank_env(rank: int, port: int) -> dict:
    """torchrun's environment for `rank` of 2, without the launcher's start-up."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}


# Rank 1's third step raises before it runs (so rank 0 is left in the step's all-reduce); with
# hang, rank 1 then never gets out of its shutdown either, its sockets left open: a peer that
# rank 0's collectives cannot see go, as NCCL's cannot.
_FAILING_FOLLOWER = """
import sys, time
import nanorun.engine, nanorun.text_engine
step, calls = nanorun.text_engine.TextEngine.step, []
def failing_step(self):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("injected failure on rank 1")
    return step(self)
nanorun.text_engine.TextEngine.step = failing_step
if {hang}:
    nanorun.engine.Engine.shutdown = lambda self: time.sleep(600)
from nanorun.cli import main
sys.exit(main(sys.argv[1:]))
"""

_RANK_1_REASON = ("tensor-parallel rank 1: engine step failed: RuntimeError: injected failure "
                  "on rank 1")


def _serve_with_failing_follower(model_dir, *, hang: bool, follower_log):
    port = free_port()
    follower = _start_follower(model_dir, _rank_env(1, port), stderr=follower_log,
                               code=_FAILING_FOLLOWER.format(hang=hang))
    try:
        server, url = _start_server(model_dir, "--tensor-parallel-size", "2",
                                    env=_rank_env(0, port))
    except BaseException:
        follower.kill()
        raise
    return follower, server, url


def _stream_until_error(url: str) -> tuple[list[str], openai.APIError]:
    """A streamed completion that must end with an error: its text chunks and the error."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    texts = []
    with pytest.raises(openai.APIError) as raised:
        for chunk in client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30,
                                               temperature=0, stream=True):
            texts.append(chunk.choices[0].text)
    return texts, raised.value


def _assert_refused(url: str) -> None:
    status, body = _get(f"{url}/health")
    assert status == 503 and "tensor-parallel rank 1" in body, (status, body)
    status, body = _post(f"{url}/v1/completions", {"model": MODEL, "prompt": "hi",
                                                   "max_tokens": 2})
    assert status == 503, (status, body)


def test_a_step_failing_on_a_follower_fails_the_server_in_seconds(model_dir):
    log = tempfile.TemporaryFile(mode="w+")
    follower, server, url = _serve_with_failing_follower(model_dir, hang=False,
                                                         follower_log=log)
    try:
        start = time.monotonic()
        texts, error = _stream_until_error(url)
        assert time.monotonic() - start < 30
        assert texts, "the first steps' tokens came before the failure"
        # Rank 1's reason first, then rank 0's own: its all-reduce saw rank 1's sockets close.
        assert f"{_RANK_1_REASON} (then rank 0: engine step failed: " in str(error), str(error)
        _assert_refused(url)
        assert follower.wait(30) != 0       # so torchrun's agent would end the job
        log.seek(0)
        text = log.read()
        assert "Traceback" in text and "injected failure on rank 1" in text, text
        assert server.wait(30) == 1         # after its 503s, for a supervisor to restart it
    finally:
        for proc in (follower, server):
            if proc.poll() is None:
                proc.kill()


@pytest.mark.slow
def test_rank_0_bounds_its_wait_for_a_failed_follower_that_does_not_exit(model_dir):
    # No socket closes: rank 0's all-reduce would wait for gloo's 30-minute timeout, and only
    # FollowerWatch, which reads rank 1's report from the store, ends it.
    follower, server, url = _serve_with_failing_follower(model_dir, hang=True,
                                                         follower_log=subprocess.DEVNULL)
    try:
        start = time.monotonic()
        _, error = _stream_until_error(url)
        assert time.monotonic() - start < 30
        # Rank 1's reason alone: FollowerWatch said it, rank 0's loop never got to.
        assert _RANK_1_REASON in str(error) and "then rank 0" not in str(error), str(error)
        _assert_refused(url)
        assert follower.poll() is None
        assert server.wait(30) == 1         # after its 503s, for a supervisor to restart it
    finally:
        for proc in (follower, server):
            if proc.poll() is None:
                proc.kill()


def test_a_broadcast_that_fails_ends_the_engine_loop_as_dead():
    """Rank 0's broadcast of the commands to a rank that is gone (the other path than a
    failed step to the same end): the loop reports "dead", it does not raise past its
    caller."""
    from nanorun.server.engine_core import EngineLoop

    class Idle:
        def has_unfinished_requests(self):
            return False

    def next_commands(block):
        raise RuntimeError("Connection closed by peer")

    messages = []
    assert EngineLoop(Idle(), messages.append).run(next_commands) is False
    assert messages == [("dead", "could not get the engine's commands: RuntimeError: "
                                 "Connection closed by peer")]


def test_recomputed_tokens_cross_the_pipe_into_metrics():
    """An ended request's num_recomputed_tokens goes through OutputEncoder, the pipe (a
    pickle) and OutputDecoder into nanorun:recomputed_tokens_total, beside
    vllm:num_preemptions_total."""
    import pickle

    from nanorun.outputs import CompletionOutput, RequestMetrics, RequestOutput
    from nanorun.server.engine_core import EngineStats, OutputDecoder, OutputEncoder
    from nanorun.server.metrics import ServerMetrics

    metrics = RequestMetrics(arrival_time=0.0, finished_time=1.0, num_preemptions=2)
    metrics.num_recomputed_tokens = 37
    out = RequestOutput("r", None, [1, 2], None,
                        [CompletionOutput(0, "ab", [5, 6], None, None, "length")], True, metrics)
    decoded = OutputDecoder()(pickle.loads(pickle.dumps(OutputEncoder()([out]))))
    registry = ServerMetrics(MODEL)
    registry.observe(decoded)
    text = registry.render(EngineStats()).decode()
    label = '{model_name="%s"}' % MODEL
    assert f"nanorun:recomputed_tokens_total{label} 37.0" in text, text
    assert f"vllm:num_preemptions_total{label} 2.0" in text
