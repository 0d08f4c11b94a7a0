"""What a vLLM user sends and scrapes, against a real `nanorun serve`: vLLM's extra request
fields, endpoints, server flags and metrics (issue 27, its server part).

Two servers per module (starting one is the slow part): the main one, driven by the official
`openai` client (raw HTTP where the client has no field), and one started with the flags that
change every request (API keys, a root path, CORS, HTTPS, a response role, a generation
config), checked over raw HTTP. References are what nobody here wrote: transformers' chat
templates and the `tokenizers` library's ids; greedy text is compared with the same request
made another way, exact where the arithmetic is the same and otherwise up to a near-tie of
the reference logits (tests/tokens.py): another batch, or prompt pages the prefix cache
already holds, computes the rest of a prompt in other GEMM shapes.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import nanorun  # noqa: E402

from ranks import free_port  # noqa: E402
from text_model import CHAT_TEMPLATE, write_text_model  # noqa: E402
from tokens import assert_same_tokens  # noqa: E402

pytestmark = pytest.mark.slow

MODEL, ALIAS = "tiny-text", "tiny-alias"
CHAT = [{"role": "system", "content": "You serve language models."},
        {"role": "user", "content": "hello world, what is 🙂?"}]
# The server's --chat-template: the model's, with a greeting a request's chat_template_kwargs
# can set.
SERVER_TEMPLATE = "{% if greeting %}{{ greeting }}\n{% endif %}" + CHAT_TEMPLATE
KEYS = ("key-one", "key-two")
_INSECURE = ssl._create_unverified_context()      # the extra server's self-signed certificate


def _request(url: str, body=None, *, method: str | None = None, headers=None,
             timeout: float = 60) -> tuple[int, dict | str, dict]:
    """(status, JSON or text body, headers) of one HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        **({"content-type": "application/json"} if data else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_INSECURE) as r:
            status, raw, hdrs = r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read().decode(), dict(e.headers)
    try:
        return status, json.loads(raw), hdrs
    except json.JSONDecodeError:
        return status, raw, hdrs


def _start(model_dir, *flags: str, https: bool = False) -> tuple[subprocess.Popen, str, object]:
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, "-m", "nanorun.cli", "-v", "serve", str(model_dir), "--port",
           str(port), "--kv-cache-tokens", "4096", "--page-size", "16", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"{'https' if https else 'http'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"nanorun serve exited: {log.read()}")
        try:
            if _request(f"{url}/health", timeout=5)[0] == 200:
                return proc, url, log
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("nanorun serve did not come up in 120 s")


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
def main_server(model_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(SERVER_TEMPLATE, encoding="utf-8")
    proc, url, log = _start(model_dir, "--served-model-name", MODEL, ALIAS,
                            "--chat-template", str(template), "--trust-request-chat-template",
                            "--enable-force-include-usage", "--enable-log-requests",
                            "--max-num-seqs", "6", "--log-level", "warning")
    yield url, log
    _stop(proc)


@pytest.fixture(scope="module")
def server(main_server):
    return main_server[0]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def extra_server(model_dir, tmp_path_factory):
    """API keys, a root path, CORS for one origin, HTTPS, a response role, a generation
    config with max_new_tokens 3 and greedy sampling, and no bound on logprobs."""
    where = tmp_path_factory.mktemp("tls")
    key, cert = where / "key.pem", where / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                    str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    gen = tmp_path_factory.mktemp("generation")
    (gen / "generation_config.json").write_text(json.dumps(
        {"max_new_tokens": 3, "temperature": 0.0}), encoding="utf-8")
    proc, url, _ = _start(model_dir, "--served-model-name", MODEL, "--api-key", *KEYS,
                          "--root-path", "/api", "--allowed-origins", '["http://ok.example"]',
                          "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
                          "--response-role", "bot", "--generation-config", str(gen),
                          "--uvicorn-log-level", "info", "--max-logprobs", "-1", https=True)
    yield url
    _stop(proc)


@pytest.fixture(scope="module")
def hf_tokenizer(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def ids_of(model_dir):
    """The `tokenizers` library's encoding of a text, as the model's tokenizer.json says."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return lambda text, special=True: tok.encode(text, add_special_tokens=special).ids


@pytest.fixture(scope="module")
def llm(model_dir):
    """The same model in process: LLM's side of the comparisons, and the reference logits
    of near-ties."""
    return nanorun.LLM(str(model_dir), kv_cache_tokens=4096, page_size=16)


def _post(server: str, path: str, body: dict, **kw) -> tuple[int, dict]:
    status, reply, _ = _request(f"{server}{path}", body, **kw)
    return status, reply


def _completion(server: str, **fields) -> dict:
    status, reply = _post(server, "/v1/completions",
                          {"model": MODEL, "temperature": 0, **fields})
    assert status == 200, reply
    return reply


def _stream(server: str, path: str, body: dict) -> list[dict]:
    """The data of every event of a streamed request but [DONE]."""
    req = urllib.request.Request(f"{server}{path}", data=json.dumps({**body, "stream": True})
                                 .encode(), headers={"content-type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
    return events


def _same_greedy(llm, got: list[int], want: list[int], prompt: list[int], what: str) -> bool:
    """Whether two greedy runs of one prompt agree: equal tokens (True), or (False) tokens
    that part at a near-tie of the in-process engine's logits (anything else fails)."""
    params = nanorun.SamplingParams(temperature=0, max_tokens=max(len(want), 1))
    return assert_same_tokens(got, want, prompt=prompt, params=params,
                              logits_of=llm.engine.prompt_logits, what=what) is None


def _assert_400(status: int, reply: dict, param: str) -> None:
    assert status == 400, reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert reply["error"]["param"] == param and reply["error"]["code"] == 400, reply


# -- endpoints -------------------------------------------------------------------------------
def test_models_list_every_served_name_and_retrieve_one(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL, ALIAS]
    assert client.models.retrieve(ALIAS).id == ALIAS
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    # A request may name either; the answer carries the first, as vLLM's does.
    out = client.completions.create(model=ALIAS, prompt="hello", max_tokens=2)
    assert out.model == MODEL
    status, reply = _post(server, "/v1/completions", {"model": "other", "prompt": "hi"})
    _assert_400(status, reply, "model")


def test_version_and_ping(server):
    assert _request(f"{server}/version")[1] == {"version": nanorun.__version__}
    assert _request(f"{server}/ping")[0] == 200
    assert _request(f"{server}/ping", method="POST")[0] == 200


def test_tokenize_and_detokenize_as_vllm_answers(server, ids_of, hf_tokenizer):
    text = "hello world, héllo wörld"
    status, reply = _post(server, "/tokenize", {"model": MODEL, "prompt": text,
                                                "return_token_strs": True})
    assert status == 200, reply
    assert reply["tokens"] == ids_of(text) and reply["count"] == len(ids_of(text))
    assert reply["max_model_len"] == 512
    assert reply["token_strs"] == hf_tokenizer.convert_ids_to_tokens(ids_of(text))
    assert _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False})[1][
        "tokens"] == ids_of(text, special=False)
    # Chat: the server's template, with the request's kwargs (transformers renders it too).
    status, chat = _post(server, "/tokenize", {"messages": CHAT,
                                               "chat_template_kwargs": {"greeting": "hey"}})
    expected = hf_tokenizer.apply_chat_template(CHAT, chat_template=SERVER_TEMPLATE,
                                                add_generation_prompt=True, tokenize=False,
                                                greeting="hey")
    assert chat["tokens"] == ids_of(expected, special=False)
    assert _post(server, "/detokenize", {"tokens": ids_of(text)})[1] == {
        "prompt": hf_tokenizer.decode(ids_of(text))}
    _assert_400(*_post(server, "/detokenize", {"tokens": [10 ** 6]}), "tokens")
    _assert_400(*_post(server, "/tokenize", {"prompt": "a", "messages": CHAT}), "messages")


def test_a_prompt_of_token_id_lists_is_one_choice_each(server, llm):
    ids = [[5, 6, 7, 8], [9, 10, 11]]
    both = _completion(server, prompt=ids, max_tokens=4, return_token_ids=True)
    assert both["usage"]["prompt_tokens"] == 7
    for p, choice in zip(ids, both["choices"]):
        alone = _completion(server, prompt=p, max_tokens=4, return_token_ids=True)
        alone = alone["choices"][0]
        assert choice["prompt_token_ids"] == p
        if _same_greedy(llm, choice["token_ids"], alone["token_ids"], p, "batched"):
            assert choice["text"] == alone["text"]


# -- request fields --------------------------------------------------------------------------
def test_echo_puts_the_prompt_and_its_logprobs_first(server, ids_of, llm):
    prompt = "hello world, the quick"
    plain = _completion(server, prompt=prompt, max_tokens=4, return_token_ids=True)
    plain = plain["choices"][0]
    echo = _completion(server, prompt=prompt, max_tokens=4, echo=True, logprobs=1,
                       return_token_ids=True)["choices"][0]
    assert echo["text"].startswith(prompt)
    if _same_greedy(llm, echo["token_ids"], plain["token_ids"], ids_of(prompt), "echo"):
        assert echo["text"] == prompt + plain["text"]
    lp = echo["logprobs"]
    n_prompt = len(ids_of(prompt))
    assert len(lp["tokens"]) == n_prompt + 4
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None   # as vLLM
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"])
    # max_tokens 0: the prompt alone.
    only = _completion(server, prompt=prompt, max_tokens=0, echo=True)["choices"][0]
    assert only["text"] == prompt
    # Streamed, the same text.
    events = _stream(server, "/v1/completions", {"model": MODEL, "prompt": prompt,
                                                 "max_tokens": 4, "echo": True,
                                                 "temperature": 0, "return_token_ids": True})
    streamed = [c for e in events for c in e["choices"]]
    if _same_greedy(llm, [t for c in streamed for t in c["token_ids"]], echo["token_ids"],
                    ids_of(prompt), "streamed echo"):
        assert "".join(c["text"] for c in streamed) == echo["text"]


def test_chat_echo_and_continue_final_message(server, hf_tokenizer, ids_of, llm):
    partial = CHAT + [{"role": "assistant", "content": "The quick brown"}]
    body = {"model": MODEL, "messages": partial, "max_tokens": 3, "temperature": 0,
            "add_generation_prompt": False, "continue_final_message": True,
            "return_token_ids": True}
    status, plain = _post(server, "/v1/chat/completions", body)
    assert status == 200, plain
    status, echo = _post(server, "/v1/chat/completions", {**body, "echo": True})
    message = echo["choices"][0]["message"]
    assert message["role"] == "assistant" and message["content"].startswith("The quick brown")
    expected = hf_tokenizer.apply_chat_template(partial, chat_template=SERVER_TEMPLATE,
                                                tokenize=False, continue_final_message=True)
    prompt = ids_of(expected, special=False)
    assert echo["prompt_token_ids"] == plain["prompt_token_ids"] == prompt
    echo_ids = echo["choices"][0]["token_ids"]
    if _same_greedy(llm, echo_ids, plain["choices"][0]["token_ids"], prompt, "chat echo"):
        assert message["content"] == ("The quick brown"
                                      + plain["choices"][0]["message"]["content"])
    events = _stream(server, "/v1/chat/completions", {**body, "echo": True})
    deltas = [c["delta"] for e in events for c in e["choices"]]
    assert deltas[0]["role"] == "assistant"
    streamed = [t for e in events for c in e["choices"] for t in c["token_ids"]]
    if _same_greedy(llm, streamed, echo_ids, prompt, "streamed chat echo"):
        assert "".join(d.get("content", "") for d in deltas) == message["content"]
    _assert_400(*_post(server, "/v1/chat/completions",
                       {**body, "add_generation_prompt": True}), "continue_final_message")


def test_return_token_ids_and_tokens_as_token_ids(server, client, ids_of):
    prompt = "def main():\n    return"
    reply = _completion(server, prompt=prompt, max_tokens=5, return_token_ids=True,
                        logprobs=2, return_tokens_as_token_ids=True)
    choice = reply["choices"][0]
    assert choice["prompt_token_ids"] == ids_of(prompt)
    assert len(choice["token_ids"]) == reply["usage"]["completion_tokens"] == 5
    assert choice["logprobs"]["tokens"] == [f"token_id:{t}" for t in choice["token_ids"]]
    assert all(re.fullmatch(r"token_id:\d+", k) for top in choice["logprobs"]["top_logprobs"]
               for k in top)
    detok = _post(server, "/detokenize", {"tokens": choice["token_ids"]})[1]["prompt"]
    assert detok == choice["text"]
    events = _stream(server, "/v1/completions", {"model": MODEL, "prompt": prompt,
                                                 "max_tokens": 5, "temperature": 0,
                                                 "return_token_ids": True})
    with_choice = [e["choices"][0] for e in events if e["choices"]]
    assert with_choice[0]["prompt_token_ids"] == ids_of(prompt)
    assert all("prompt_token_ids" not in c for c in with_choice[1:])
    assert [t for c in with_choice for t in c["token_ids"]] == choice["token_ids"]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3,
                                          extra_body={"return_token_ids": True})
    assert chat.prompt_token_ids and len(chat.choices[0].token_ids) == 3


def test_truncate_prompt_tokens_keeps_the_last_tokens(server, ids_of, llm):
    prompt = "hello world, the quick brown fox jumps over the lazy dog."
    ids = ids_of(prompt)
    cut = _completion(server, prompt=prompt, max_tokens=4, truncate_prompt_tokens=5,
                      return_token_ids=True)["choices"][0]
    assert cut["prompt_token_ids"] == ids[-5:]
    assert _completion(server, prompt=prompt, max_tokens=4, truncate_prompt_tokens=5)[
        "usage"]["prompt_tokens"] == 5
    same = _completion(server, prompt=ids[-5:], max_tokens=4, return_token_ids=True)
    same = same["choices"][0]
    if _same_greedy(llm, cut["token_ids"], same["token_ids"], ids[-5:], "truncated"):
        assert cut["text"] == same["text"]
    assert _completion(server, prompt=prompt, max_tokens=2, truncate_prompt_tokens=-1)[
        "usage"]["prompt_tokens"] == len(ids)
    for bad in (0, -2, 513, "5"):
        _assert_400(*_post(server, "/v1/completions", {"prompt": prompt,
                                                       "truncate_prompt_tokens": bad}),
                    "truncate_prompt_tokens")


def test_request_chat_template_and_kwargs(server, hf_tokenizer, ids_of):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    status, reply = _post(server, "/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 2, "chat_template": template,
        "return_token_ids": True})
    assert status == 200, reply
    expected = hf_tokenizer.apply_chat_template(CHAT, chat_template=template, tokenize=False,
                                                add_generation_prompt=True)
    assert reply["prompt_token_ids"] == ids_of(expected, special=False)
    _assert_400(*_post(server, "/v1/chat/completions", {
        "messages": CHAT, "chat_template_kwargs": {"messages": []}}), "chat_template_kwargs")
    _assert_400(*_post(server, "/v1/chat/completions", {
        "messages": CHAT, "chat_template": "{% if %}"}), "chat_template")


def test_usage_on_every_chunk_and_forced_at_the_end(server):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _stream(server, "/v1/completions", body)
    chunks = [e for e in events if e["choices"]]
    assert [e["usage"]["completion_tokens"] for e in chunks] == [1, 2, 3, 4]
    assert all(e["usage"]["prompt_tokens"] == 3 for e in chunks)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    # --enable-force-include-usage: a stream that did not ask ends with the usage too.
    events = _stream(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT,
                                                      "max_tokens": 2, "ignore_eos": True})
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2


def test_logprobs_minus_one_is_bounded_by_max_logprobs_as_in_vllm(server):
    for field, body in (("logprobs", {"prompt": "hi", "logprobs": -1}),
                        ("prompt_logprobs", {"prompt": "hi", "prompt_logprobs": -1})):
        status, reply = _post(server, "/v1/completions", body)
        _assert_400(status, reply, field)
        assert "20" in reply["error"]["message"]
    _assert_400(*_post(server, "/v1/completions", {"prompt": "hi", "logprobs": -2}),
                "logprobs")
    _assert_400(*_post(server, "/v1/chat/completions", {
        "messages": CHAT, "logprobs": True, "top_logprobs": -3}), "top_logprobs")


def test_small_fields_vllm_takes(server, client, ids_of, llm):
    # add_special_tokens false: no BOS.
    assert _completion(server, prompt="hello", max_tokens=1, add_special_tokens=False)[
        "usage"]["prompt_tokens"] == len(ids_of("hello", special=False))
    # max_completion_tokens wins over max_tokens in chat.
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=9,
                                          max_completion_tokens=2, extra_body={
                                              "ignore_eos": True})
    assert chat.usage.completion_tokens == 2
    # spaces_between_special_tokens: either value, the same text (a fast tokenizer).
    runs = [_completion(server, prompt="hello", max_tokens=4, skip_special_tokens=False,
                        spaces_between_special_tokens=v, return_token_ids=True)["choices"][0]
            for v in (True, False)]
    if _same_greedy(llm, runs[0]["token_ids"], runs[1]["token_ids"], ids_of("hello"),
                    "spaces_between_special_tokens"):
        assert runs[0]["text"] == runs[1]["text"]
    _assert_400(*_post(server, "/v1/completions", {"prompt": "hi",
                                                   "spaces_between_special_tokens": "x"}),
                "spaces_between_special_tokens")
    # priority 0 is what every request has; another needs priority scheduling.
    assert _completion(server, prompt="hi", max_tokens=1, priority=0)
    _assert_400(*_post(server, "/v1/completions", {"prompt": "hi", "priority": 1}),
                "priority")
    # cache_salt: a non-empty string.
    assert _completion(server, prompt="hi", max_tokens=1, cache_salt="s3cret")
    for bad in ("", 5, "x" * 1025):
        _assert_400(*_post(server, "/v1/completions", {"prompt": "hi", "cache_salt": bad}),
                    "cache_salt")


# -- metrics and logs ------------------------------------------------------------------------
def _metrics(server: str) -> dict[str, float]:
    out = {}
    for line in _request(f"{server}/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _value(metrics: dict, name: str, **labels) -> float:
    labels = {"model_name": MODEL, **labels}
    return metrics.get(name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
                       + "}", 0.0)


def test_vllm_metrics_move_with_requests(server):
    before = _metrics(server)
    _completion(server, prompt=[5, 6, 7, 8], max_tokens=3, ignore_eos=True, n=2)
    after = _metrics(server)

    def moved(name: str) -> float:
        return _value(after, name) - _value(before, name)

    assert moved("vllm:request_params_n_count") == 1 and moved("vllm:request_params_n_sum") == 2
    assert moved("vllm:request_params_max_tokens_sum") == 3
    assert moved("vllm:request_prompt_tokens_sum") == 4
    assert moved("vllm:request_generation_tokens_sum") == 6
    for phase in ("queue", "prefill", "decode", "inference"):
        assert moved(f"vllm:request_{phase}_time_seconds_count") == 1, phase
    # Each of the 2 sequences computes at least its prompt's last token (the rest may come
    # from the prefix cache) and its 2 later tokens' inputs, over at least 3 iterations;
    # how the engine batches them is its own.
    assert moved("vllm:iteration_tokens_total_count") >= 3
    assert moved("vllm:iteration_tokens_total_sum") >= 2 * 3
    # vLLM's bucket edges.
    edges = [k for k in after if k.startswith("vllm:request_params_n_bucket")]
    assert [re.search(r'le="([^"]+)"', k).group(1) for k in edges] == [
        "1.0", "2.0", "5.0", "10.0", "20.0", "+Inf"]
    info = [k for k in after if k.startswith("vllm:cache_config_info")]
    assert len(info) == 1 and 'block_size="16"' in info[0] and 'num_gpu_blocks="256"' in info[0]
    for name in ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
                 "vllm:num_preemptions_total"):
        assert any(k.startswith(name + "{") for k in after), name


def test_flags_reach_the_engine_and_the_log(main_server):
    url, log = main_server
    _completion(url, prompt="hello", max_tokens=1)
    log.seek(0)
    text = log.read()
    assert "max_num_seqs=6" in text
    assert re.search(r"request cmpl-\w+: 2 prompt tokens", text), text[-2000:]


# -- the extra server: keys, root path, CORS, HTTPS, role, generation config ----------------
def test_api_keys_guard_the_v1_routes_only(extra_server):
    api = extra_server      # a proxy serves it under /api and strips that (--root-path /api)
    status, reply, _ = _request(f"{api}/v1/models")
    assert status == 401 and reply["error"]["code"] == 401
    assert _request(f"{api}/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    for key in KEYS:
        assert _request(f"{api}/v1/models", headers={"Authorization": f"Bearer {key}"})[0] == 200
    for open_route in ("/health", "/ping", "/metrics", "/version"):
        assert _request(f"{api}{open_route}")[0] == 200, open_route
    # The root path is where the proxy serves it: the API docs point there.
    status, docs, _ = _request(f"{api}/docs")
    assert status == 200 and "/api/openapi.json" in docs
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="wrong", max_retries=0,
                           http_client=openai.DefaultHttpxClient(verify=False))
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    good = openai.OpenAI(base_url=f"{api}/v1", api_key=KEYS[1], max_retries=0,
                         http_client=openai.DefaultHttpxClient(verify=False))
    assert good.completions.create(model=MODEL, prompt="hi").usage.completion_tokens <= 3


def test_cors_allows_the_configured_origin(extra_server):
    preflight = {"Origin": "http://ok.example", "Access-Control-Request-Method": "POST"}
    status, _, headers = _request(f"{extra_server}/v1/completions", method="OPTIONS",
                                  headers=preflight)
    assert status == 200 and headers.get("access-control-allow-origin") == "http://ok.example"
    status, _, headers = _request(f"{extra_server}/v1/completions", method="OPTIONS",
                                  headers={**preflight, "Origin": "http://evil.example"})
    assert headers.get("access-control-allow-origin") is None


def test_response_role_and_generation_config_defaults(extra_server, llm, ids_of):
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    url = f"{extra_server}/v1"
    status, chat, _ = _request(f"{url}/chat/completions", {"messages": CHAT,
                                                           "ignore_eos": True}, headers=auth)
    assert status == 200, chat
    assert chat["choices"][0]["message"]["role"] == "bot"
    # max_new_tokens 3 caps the chat's default (the rest of the context) and an explicit 10;
    # temperature 0 makes two unseeded requests agree.
    assert chat["usage"]["completion_tokens"] == 3
    body = {"prompt": "hello world", "max_tokens": 10, "ignore_eos": True,
            "return_token_ids": True}
    first = _request(f"{url}/completions", body, headers=auth)[1]["choices"][0]
    second = _request(f"{url}/completions", body, headers=auth)[1]["choices"][0]
    assert len(first["token_ids"]) == 3
    # (Sampled at temperature 1 they would part where no near-tie explains it.)
    if _same_greedy(llm, second["token_ids"], first["token_ids"], ids_of("hello world"),
                    "generation config"):
        assert first["text"] == second["text"]
    # A request's own chat template needs --trust-request-chat-template.
    status, reply, _ = _request(f"{url}/chat/completions", {
        "messages": CHAT, "chat_template": "{{ messages }}"}, headers=auth)
    _assert_400(status, reply, "chat_template")


# -- offline: LLM takes the same options -----------------------------------------------------

def test_llm_chat_takes_the_server_chat_options(server, llm):
    """LLM.chat's chat_template, chat_template_kwargs, add_generation_prompt and
    continue_final_message (vLLM's LLM.chat arguments) render what the server renders for the
    same request, and greedy text agrees."""
    partial = CHAT + [{"role": "assistant", "content": "The quick"}]
    status, served = _post(server, "/v1/chat/completions", {
        "messages": partial, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
        "add_generation_prompt": False, "continue_final_message": True,
        "chat_template_kwargs": {"greeting": "hey"}, "return_token_ids": True})
    assert status == 200, served
    out = llm.chat(partial, nanorun.SamplingParams(max_tokens=4, temperature=0,
                                                    ignore_eos=True),
                   chat_template=SERVER_TEMPLATE, add_generation_prompt=False,
                   continue_final_message=True, chat_template_kwargs={"greeting": "hey"})[0]
    assert list(out.prompt_token_ids) == served["prompt_token_ids"]
    if _same_greedy(llm, out.outputs[0].token_ids, served["choices"][0]["token_ids"],
                    served["prompt_token_ids"], "LLM.chat"):
        assert out.outputs[0].text == served["choices"][0]["message"]["content"]
    with pytest.raises(ValueError, match="continue_final_message"):
        llm.chat(partial, continue_final_message=True)


def test_max_logprobs_minus_one_gives_the_whole_vocabulary(extra_server, model_dir):
    """--max-logprobs -1 (an engine option): logprobs and prompt_logprobs -1 return every
    token, as vLLM does."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    auth = {"Authorization": f"Bearer {KEYS[0]}"}
    status, chat, _ = _request(f"{extra_server}/v1/chat/completions", {
        "messages": CHAT, "max_tokens": 2, "logprobs": True, "top_logprobs": -1},
        headers=auth)
    assert status == 200, chat
    assert [len(t["top_logprobs"]) for t in chat["choices"][0]["logprobs"]["content"]] == \
        [vocab, vocab]
    status, done, _ = _request(f"{extra_server}/v1/completions", {
        "prompt": "hello world", "max_tokens": 1, "prompt_logprobs": -1}, headers=auth)
    assert status == 200, done
    assert all(len(d) >= vocab for d in done["choices"][0]["prompt_logprobs"][1:])


def test_llm_bounds_logprobs_by_max_logprobs(llm, model_dir):
    with pytest.raises(ValueError, match="logprobs: -1 asks for the whole vocabulary"):
        llm.generate("hello", nanorun.SamplingParams(max_tokens=1, logprobs=-1))
    with pytest.raises(ValueError, match=r"more than max_logprobs \(20\)"):
        llm.generate("hello", nanorun.SamplingParams(max_tokens=1, prompt_logprobs=21))
    unbounded = nanorun.LLM(str(model_dir), kv_cache_tokens=1024, max_logprobs=-1)
    out = unbounded.generate("hello", nanorun.SamplingParams(max_tokens=2, logprobs=-1,
                                                             temperature=0))[0]
    vocab = unbounded.engine.model_config.vocab_size
    assert [len(d) for d in out.outputs[0].logprobs] == [vocab, vocab]


def test_llm_truncates_prompts_as_the_server_does(server, llm, ids_of):
    """SamplingParams.truncate_prompt_tokens (vLLM's name): LLM.generate keeps the prompt's
    last N tokens, as the server does for the same request."""
    prompt = "hello world, the quick brown fox jumps over the lazy dog."
    served = _completion(server, prompt=prompt, max_tokens=4, truncate_prompt_tokens=6,
                         return_token_ids=True)["choices"][0]
    out = llm.generate(prompt, nanorun.SamplingParams(max_tokens=4, temperature=0,
                                                      truncate_prompt_tokens=6))[0]
    assert list(out.prompt_token_ids) == served["prompt_token_ids"] == ids_of(prompt)[-6:]
    if _same_greedy(llm, out.outputs[0].token_ids, served["token_ids"], ids_of(prompt)[-6:],
                    "LLM truncated"):
        assert out.outputs[0].text == served["text"]
    whole = llm.generate(prompt, nanorun.SamplingParams(max_tokens=1,
                                                        truncate_prompt_tokens=-1))[0]
    assert list(whole.prompt_token_ids) == ids_of(prompt)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="truncate_prompt_tokens"):
            nanorun.SamplingParams(truncate_prompt_tokens=bad)
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate(prompt, nanorun.SamplingParams(truncate_prompt_tokens=10 ** 6))
    with pytest.raises(TypeError, match="spaces_between_special_tokens"):
        nanorun.SamplingParams(spaces_between_special_tokens="no")


def test_cache_salt_keys_the_prefix_cache(server):
    """A request's cache_salt reaches the prefix cache: a repeat with the same salt finds the
    prompt's full pages there, one with another salt finds none (vLLM's cache isolation).
    Seen through vllm:prefix_cache_hits_total."""
    pytest.importorskip("nanorun.prefix_cache")
    prompt = list(range(40, 90))        # 50 tokens: 3 full pages of 16, used nowhere else

    def hits_of(**fields) -> tuple[float, float]:
        before = _metrics(server)
        _completion(server, prompt=prompt, max_tokens=1, **fields)
        after = _metrics(server)
        return tuple(_value(after, name) - _value(before, name) for name in (
            "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"))

    queries, hits = hits_of(cache_salt="salt-a")
    assert queries >= 50 and hits == 0
    assert hits_of(cache_salt="salt-a")[1] >= 48
    assert hits_of(cache_salt="salt-b")[1] == 0
    assert hits_of()[1] == 0                 # unsalted: not salt-a's pages either
