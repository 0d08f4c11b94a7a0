"""Structured outputs (xgrammar), bad_words, allowed_token_ids and logit_bias, through LLM,
TextEngine and the token-level Engine.

The tiny text model (tests/text_model.py) has random weights, so what a grammar lets through
is what the model would not write by itself: every output must still parse and match. The
checks are the user's: JSON parses and validates against its schema (jsonschema), a regex
output fullmatches, a choice output is a choice, an invalid schema, regex or grammar is a
ValueError naming the field. Batch-mates without a grammar get the tokens they get without
the grammar requests beside them (up to a near-tie: the batches differ, tests/tokens.py).
"""

from __future__ import annotations

import json
import re

# Dependencies of nanorun (xgrammar) and of its test extra (jsonschema): imported, not
# skipped without, so that an install missing one fails here instead of passing by skipping.
import jsonschema
import pytest

from nanorun import LLM, Engine, SamplingParams, TextEngine
from nanorun.sampler import seed_key
from nanorun.sampling_params import StructuredOutputsParams
from nanorun.structured_output import bad_words_token_ids

from text_model import write_text_model
from tokens import assert_same_tokens

KV_TOKENS, PAGE_SIZE = 4096, 16
PROMPTS = ["hello world, the quick", "Привет, мир! 你好", "def main():\n    return",
           "naïve café", "The stop string STOP", "numbers 0123456789"]

# Bounded, so that a random model reaches the end within max_tokens. Strings are bounded by
# a pattern, not maxLength: xgrammar 0.2's maxLength strings admit raw control characters
# (its character class there leaves out only quote, backslash, CR and LF), which JSON forbids.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-zé ]{1,6}$"},
        "kind": {"enum": ["fox", "dog", "cat"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": -5, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z0-9]{1,3}$"},
                 "maxItems": 2},
    },
    "required": ["name", "kind", "ok", "count", "tags"],
    "additionalProperties": False,
}
JSON = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
REGEX = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"
CHOICES = ["yes", "no", 'a "quoted" one', "naïve"]
GRAMMAR = 'root ::= "(" item ("," item)? ")"\nitem ::= [0-9] | "x" [a-c]'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp("text-model"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), kv_cache_tokens=KV_TOKENS, page_size=PAGE_SIZE)


def _texts(llm, params: SamplingParams, prompts=PROMPTS) -> list:
    return [o.outputs for o in llm.generate(prompts, params)]


def test_every_json_schema_output_validates(llm):
    greedy = SamplingParams(max_tokens=96, temperature=0.0, structured_outputs=JSON)
    sampled = SamplingParams(max_tokens=96, temperature=1.0, seed=3, n=3,
                             structured_outputs=JSON)
    outputs = [o.outputs for o in llm.generate(PROMPTS[:3] * 2, [greedy] * 3 + [sampled] * 3)]
    for out in (out for outs in outputs for out in outs):
        assert out.finish_reason == "stop", out
        jsonschema.validate(json.loads(out.text), SCHEMA)
    chat = llm.chat([{"role": "user", "content": "hello"}], greedy)[0].outputs[0]
    jsonschema.validate(json.loads(chat.text), SCHEMA)


def test_regex_choice_and_grammar_outputs_match(llm):
    def run(so):
        params = SamplingParams(max_tokens=48, temperature=1.0, seed=7, structured_outputs=so)
        return [o[0] for o in _texts(llm, params)]

    for out in run(StructuredOutputsParams(regex=REGEX)):
        assert out.finish_reason == "stop" and re.fullmatch(REGEX, out.text), out.text
    picked = [out.text for out in run({"choice": CHOICES})]
    assert set(picked) <= set(CHOICES), picked
    for out in run(StructuredOutputsParams(grammar=GRAMMAR)):
        assert re.fullmatch(r"\(([0-9]|x[a-c])(,([0-9]|x[a-c]))?\)", out.text), out.text
    # vLLM's structural tag: free text until a trigger, then the tag's schema. The tiny model
    # rarely writes the trigger, so this shows it compiles and runs; where a tag opens, its
    # content must be the schema's.
    tag = {"structures": [{"begin": "<f>", "schema": {"enum": ["fox", "dog"]}, "end": "</f>"}],
           "triggers": ["<f>"]}
    for out in run(StructuredOutputsParams(structural_tag=json.dumps(tag))):
        for opened in out.text.split("<f>")[1:]:
            body = opened.split("</f>")[0]
            assert body in ('"fox"', '"dog"') or '"fox"'.startswith(body) \
                or '"dog"'.startswith(body), out.text


def test_json_object_output_is_a_json_object(llm):
    # An open-ended object may run on; a bias towards "}" (a mask leaves it only where the
    # grammar allows it) makes them end, and shows the two applied together.
    close = llm.get_tokenizer().encode("}", add_special_tokens=False)
    assert len(close) == 1
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=11, n=4,
                            logit_bias={close[0]: 6.0},
                            structured_outputs={"json_object": True,
                                                "disable_any_whitespace": True})
    for out in _texts(llm, params, PROMPTS[:1])[0]:
        assert out.finish_reason == "stop", out
        assert isinstance(json.loads(out.text), dict)


@pytest.mark.parametrize("field, value", [
    ("json", {"type": "object", "properties": {"a": {"type": "nonsense"}}}),
    ("json", "{not json"),
    ("regex", "[a-z"),
    ("grammar", 'root ::= "a" undefined_rule'),
    ("structural_tag", "{not json"),
])
def test_an_invalid_constraint_is_a_value_error_naming_the_field(llm, field, value):
    with pytest.raises(ValueError, match=f"structured_outputs.{field} is not a valid"):
        llm.generate(PROMPTS[0], SamplingParams(structured_outputs={field: value}))
    # ... and the engine serves the next request
    assert llm.generate(PROMPTS[0], SamplingParams(max_tokens=2))[0].outputs[0].token_ids


def test_bad_words_never_appear(llm):
    tok = llm.get_tokenizer()
    plain = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    # Words the model writes unconstrained: a one-token word and a two-token one.
    words = set()
    for out in plain:
        ids = out.outputs[0].token_ids
        words.add(tok.decode(ids[:1]).strip())
        words.add(tok.decode(ids[2:4]))
    words = [w for w in words if w.strip()]
    sequences = bad_words_token_ids(tok, words, llm.engine.model_config.vocab_size)
    assert sequences
    out = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0,
                                               bad_words=words))
    for o in out:
        ids = o.outputs[0].token_ids
        for seq in sequences:
            n = len(seq)
            assert all(tuple(ids[i:i + n]) != tuple(seq) for i in range(len(ids) - n + 1)), \
                (seq, ids)


@pytest.mark.parametrize("V", [1, 31, 33, 99, 989])
def test_a_bitmask_masks_exactly_the_tokens_it_clears(V):
    """The sampler's bitmask (xgrammar's layout) against a plain bool mask: bad words and
    allowed_token_ids cleared on the host, -inf on the device exactly there."""
    import numpy as np
    import torch

    from nanorun.request import Request
    from nanorun.sampler import PreparedSampling, Sampler
    from nanorun.structured_output import RequestConstraint, bitmask_words

    g = torch.Generator().manual_seed(V)
    allowed = torch.randperm(V, generator=g)[:max(1, V // 2)].tolist()
    banned = torch.randperm(V, generator=g)[:max(1, V // 3)].tolist()
    # Rows 0 and 3 are free: the masked rows are 1, 2 and 4 of the batch.
    requests = [Request(str(i), (1,), SamplingParams(
        temperature=0.0, allowed_token_ids=allowed if i in (1, 4) else None), 0.0, ())
        for i in range(5)]
    sampler = Sampler()
    sampler.constrain(requests[2], RequestConstraint(None, [[t] for t in banned]))
    prepared = PreparedSampling.of(requests, V, torch.device("cpu"),
                                   constraints=sampler.constraints)
    rows, bitmask = prepared.masks
    assert rows.tolist() == [1, 2, 4] and bitmask.shape == (3, bitmask_words(V))
    z = torch.randn(5, V, generator=g)
    want = z.clone()
    keep = torch.zeros(V, dtype=torch.bool)
    keep[allowed] = True
    want[1, ~keep] = want[4, ~keep] = float("-inf")
    want[2, banned] = float("-inf")
    from nanorun.sampler import _apply_bitmask, _mask_with_torch

    for apply in (_apply_bitmask, _mask_with_torch):    # the CPU's kernel, and the GPU's ops
        got = z.clone()
        apply(got, rows, bitmask)
        assert torch.equal(got, want), apply.__name__
    tokens, ok = sampler.sample(torch.randn(5, V, generator=g), prepared)
    assert tokens[1].item() in allowed and tokens[4].item() in allowed
    assert ok[[0, 1, 3, 4]].all()
    if len(banned) < V:
        assert tokens[2].item() not in banned and ok[2]
    else:                       # nothing left: the row is reported as failed, not drawn
        assert not ok[2]
    # Bits past V in the last word are never read: a fully cleared row stays fully cleared.
    clear = np.zeros((1, bitmask_words(V)), dtype=np.int32)
    for apply in (_apply_bitmask, _mask_with_torch):
        z = torch.zeros(1, V)
        apply(z, torch.tensor([0]), torch.from_numpy(clear))
        assert torch.isinf(z).all()


def test_logit_bias_and_allowed_token_ids_on_the_token_engine():
    engine = Engine("tiny-llama", kv_cache_tokens=1024, page_size=16)
    prompt = [1, 5, 9, 200, 7]

    def run(**kw):
        engine.add_request("r", prompt, SamplingParams(max_tokens=8, **kw))
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    return out.outputs[0].token_ids

    greedy = run(temperature=0.0)
    forced = run(temperature=0.0, logit_bias={123: 100})
    assert forced == [123] * 8
    banned = run(temperature=0.0, logit_bias={t: -100 for t in set(greedy)})
    assert not set(banned) & set(greedy)
    allowed = [3, 77, 500, 901]
    for seed in range(3):
        got = run(temperature=1.5, seed=seed, allowed_token_ids=allowed)
        assert set(got) <= set(allowed), got
    vocab = engine.model_config.vocab_size
    for bad in ({"logit_bias": {vocab: 1.0}}, {"allowed_token_ids": [vocab + 5]}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))} token ids"):
            engine.add_request("x", prompt, SamplingParams(**bad))
    with pytest.raises(ValueError, match="^structured_outputs is text"):
        engine.add_request("x", prompt, SamplingParams(structured_outputs={"regex": "a"}))
    with pytest.raises(ValueError, match=r"logit_bias\[3\] must be in \[-100, 100\]"):
        SamplingParams(logit_bias={3: 100.5})


@pytest.mark.slow
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("layout", ["sequential", "overlap"])
def test_grammar_requests_among_others_validate_and_leave_the_others_alone(
        model_dir, async_scheduling, layout):
    """16 requests at once: 8 under a JSON schema or regex (greedy and seeded sampling), 8
    unconstrained. Every constrained output matches; the unconstrained ones get the tokens
    a run without the constrained requests gives them, up to a near-tie."""
    te = TextEngine.from_model(str(model_dir), kv_cache_tokens=KV_TOKENS, page_size=PAGE_SIZE,
                               layout=layout, async_scheduling=async_scheduling,
                               max_batch_tokens=64)
    free = {f"free{i}": (PROMPTS[i % len(PROMPTS)],
                         SamplingParams(max_tokens=24, temperature=0.0 if i % 2 else 0.9,
                                        seed=100 + i)) for i in range(8)}
    bound = {}
    for i in range(8):
        so = JSON if i % 2 else StructuredOutputsParams(regex=REGEX)
        bound[f"bound{i}"] = (PROMPTS[(i + 3) % len(PROMPTS)],
                              SamplingParams(max_tokens=96, temperature=0.0 if i < 4 else 1.0,
                                             seed=i, structured_outputs=so))

    def run(requests: dict) -> dict:
        for rid, (prompt, params) in requests.items():
            te.add_request(rid, prompt, params)
        done = {}
        while te.has_unfinished_requests():
            for out in te.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0]
        return done

    mixed = run({**bound, **free})
    for rid, (_, params) in bound.items():
        out = mixed[rid]
        assert out.finish_reason == "stop", (rid, out)
        if params.structured_outputs.kind == "json":
            jsonschema.validate(json.loads(out.text), SCHEMA)
        else:
            assert re.fullmatch(REGEX, out.text), out.text
    alone = run(free)
    engine = te.engine
    for rid, (prompt, params) in free.items():
        ids = te.tokenizer.encode(prompt, add_special_tokens=True)
        assert_same_tokens(mixed[rid].token_ids, alone[rid].token_ids, prompt=ids,
                           params=params, logits_of=engine.prompt_logits,
                           key=seed_key(params.seed), eos_token_ids=te.eos_token_ids,
                           what=rid)
    te.engine.shutdown()


# -- the server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(model_dir):
    pytest.importorskip("fastapi")
    from test_server import _start_server, _stop

    proc, url = _start_server(model_dir)
    yield url
    _stop(proc)


@pytest.mark.slow
def test_served_structured_outputs_as_vllm_takes_them(server):
    """response_format json_schema through the openai client (chat), vLLM's
    structured_outputs and guided_* names (completions), logit_bias, and the 400s."""
    openai = pytest.importorskip("openai")
    from test_server import MODEL, _post

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    # A top-level string has no whitespace to fill; an object gets compact JSON below.
    word = {"type": "string", "pattern": "^[a-z]{2,8}$"}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "héllo wörld! what is 🙂?"}],
        max_tokens=32, temperature=1.0, seed=5, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": word}})
    for choice in chat.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), word)
    done = client.completions.create(
        model=MODEL, prompt=PROMPTS[:2], max_tokens=96, temperature=0.0,
        extra_body={"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}})
    for choice in done.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.text), SCHEMA)
    regex = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=32,
                                      extra_body={"guided_regex": REGEX,
                                                  "guided_decoding_backend": "xgrammar"})
    assert re.fullmatch(REGEX, regex.choices[0].text)
    choice = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=16,
                                       extra_body={"guided_choice": CHOICES})
    assert choice.choices[0].text in CHOICES
    forced = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=4,
                                       temperature=0.0, logit_bias={"77": 100})
    tok = forced.choices[0].text
    assert tok and tok == tok[:len(tok) // 4] * 4        # one token, four times

    base = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for extra, param in [
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
            "type": "object", "properties": {"a": {"type": "nonsense"}}}}}},
         "structured_outputs"),
        ({"guided_regex": "[a-z"}, "structured_outputs"),
        ({"guided_grammar": 'root ::= "a" nowhere'}, "structured_outputs"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
        ({"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
         "response_format"),
        ({"guided_regex": "a", "guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {"10000000": 1}}, "logit_bias"),
        ({"allowed_token_ids": [10 ** 8]}, "allowed_token_ids"),
        ({"bad_words": [""]}, "bad_words"),
    ]:
        status, reply = _post(f"{server}/v1/completions", {**base, **extra})
        assert status == 400 and reply["error"]["param"] == param, (extra, reply)
    status, reply = _post(f"{server}/v1/completions", {**base, "allowed_token_ids": [5, 9],
                                                       "bad_words": ["hello"],
                                                       "response_format": {"type": "text"}})
    assert status == 200, reply
