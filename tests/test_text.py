"""The text layer (nanorun.tokenizer, nanorun.detokenizer) against references nobody here wrote:
transformers' AutoTokenizer and apply_chat_template on the same directory, and the `tokenizers`
decode of all ids for the streamed text. Model directories come from tests/text_model.py."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from text_model import CORPUS, IM_END, write_text_model

from nanorun.detokenizer import IncrementalDetokenizer, StopChecker
from nanorun.tokenizer import load_tokenizer

KINDS = ["bpe", "sentencepiece", "metaspace"]
TEXTS = ["", " ", "hello world", "  two  spaces ", "héllo wörld 你好 🙂", "Привет, мир!\n\n\tx",
         f"a{IM_END}b <s> c", "👍🏽 — “quotes” … done", "unseen chars: ǅ Ꙭ 𝔘 ﷺ", *CORPUS]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief. 🙂"}, {"role": "user", "content": "你好, wörld?"},
     {"role": "assistant", "content": "  Héllo!  "}, {"role": "user", "content": "again\n"}],
]


@pytest.fixture(scope="module", params=KINDS)
def model_dir(request, tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp(request.param), tokenizer_kind=request.param)


@pytest.fixture(scope="module")
def tok(model_dir):
    return load_tokenizer(model_dir)


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Ids a model could emit, weighted towards what is hard to stream: pieces of multi-byte
    text (split characters, byte-fallback runs), lone fragments, special tokens."""
    pieces = [tok.encode(t, add_special_tokens=False) for t in TEXTS if t]
    fragments = fragment_ids(tok)
    ids: list[int] = []
    while len(ids) < n:
        r = rng.random()
        if r < 0.35:
            piece = rng.choice(pieces)
            lo = rng.randrange(len(piece))
            ids += piece[lo:lo + rng.randrange(1, 6)]
        elif r < 0.65:
            ids.append(rng.choice(fragments))
        elif r < 0.75:
            ids.append(rng.choice(sorted(tok.all_special_ids)))
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids[:n]


def fragment_ids(tok) -> list[int]:
    """Tokens that are not a whole character on their own (decode alone to U+FFFD)."""
    return [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]


def stream(tok, ids, prompt=(), chunks=None, **kw) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed `ids` in chunks of the given sizes (default 1); the detokenizer and its deltas."""
    detok = IncrementalDetokenizer(tok, list(prompt), **kw)
    deltas, i = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.step(ids[i:i + size]))
        i += size
    deltas.append(detok.finish())
    return detok, deltas


def assert_prefixes(deltas: list[str], final: str) -> None:
    """Every text emitted so far is a start of the final text: nothing emitted is ever wrong,
    in particular no U+FFFD for a character that completes later."""
    so_far = ""
    for d in deltas:
        so_far += d
        assert final.startswith(so_far), (so_far, final)


# ---- tokenizer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(tok, hf, add_special_tokens):
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens) == hf.encode(
            text, add_special_tokens=add_special_tokens), text


@pytest.mark.parametrize("skip", [True, False])
def test_decode_matches_transformers(tok, hf, skip):
    rng = random.Random(0)
    seqs = [tok.encode(t) for t in TEXTS] + [random_ids(tok, rng, 12) for _ in range(50)]
    for ids in seqs:
        assert tok.decode(ids, skip) == hf.decode(ids, skip_special_tokens=skip), ids
    assert tok.convert_ids_to_tokens(seqs[5]) == hf.convert_ids_to_tokens(seqs[5])


def test_special_tokens_match_transformers(tok, hf, model_dir):
    assert (tok.bos_token_id, tok.eos_token_id) == (hf.bos_token_id, hf.eos_token_id)
    assert len(tok) == tok.vocab_size == len(hf)
    assert set(hf.all_special_ids) <= tok.all_special_ids
    # skip_special_tokens drops exactly all_special_ids (<|im_start|> is not a named token).
    kept = [i for i in range(tok.vocab_size) if tok.decode([i], True) == tok.decode([i], False)]
    assert set(range(tok.vocab_size)) - set(kept) == tok.all_special_ids
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert tok.eos_token_ids == tuple(dict.fromkeys([hf.eos_token_id, *gen["eos_token_id"]]))


def test_the_test_tokenizers_split_characters(tok):
    """The tokenizers exercise the hard cases: a character split over byte tokens (byte
    fallback) or over byte-level pieces."""
    assert fragment_ids(tok)
    if tok.byte_token_ids:
        ids = tok.encode("🙂", add_special_tokens=False)
        assert sum(i in tok.byte_token_ids for i in ids) == 4, tok.convert_ids_to_tokens(ids)


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_eos_token": True},
                                   {"add_bos_token": True, "add_eos_token": True}])
def test_add_bos_eos_flags_match_transformers(model_dir, tmp_path, flags):
    """tokenizer.json's post-processor decides, whatever tokenizer_config.json's flags say."""
    transformers = pytest.importorskip("transformers")
    d = copy_tokenizer(model_dir, tmp_path, **flags)
    ours, ref = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS[:6]:
        assert ours.encode(text) == ref.encode(text), (flags, text)


def copy_tokenizer(src, dst, drop=(), **config):
    """The tokenizer files of `src` in `dst`, with tokenizer_config.json edited."""
    for f in ("tokenizer.json", "config.json"):
        shutil.copy(src / f, dst / f)
    cfg = json.loads((src / "tokenizer_config.json").read_text()) | config
    for key in drop:
        cfg.pop(key)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    return dst


def test_load_tokenizer_without_files(tmp_path):
    assert load_tokenizer(None) is None
    assert load_tokenizer(tmp_path) is None
    (tmp_path / "tokenizer.model").write_bytes(b"\0")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


# ---- chat template ------------------------------------------------------------------------------
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, add_generation_prompt):
    for chat in CHATS:
        text = tok.apply_chat_template(chat, add_generation_prompt)
        assert text == hf.apply_chat_template(chat, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
        ids = tok.apply_chat_template(chat, add_generation_prompt, tokenize=True)
        assert ids == hf.apply_chat_template(chat, add_generation_prompt=add_generation_prompt,
                                             tokenize=True, return_dict=False)


LLAMA3_LIKE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    "{{ {'k': 'ü'} | tojson }}{% generation %}{{ eos_token }}{% endgeneration %}")


def test_chat_template_file_wins_and_matches_transformers(model_dir, tmp_path):
    """chat_template.jinja overrides tokenizer_config.json's; a second template style (the
    Llama 3 one, with raise_exception, tojson and a {% generation %} block) renders alike."""
    transformers = pytest.importorskip("transformers")
    d = copy_tokenizer(model_dir, tmp_path)
    (d / "chat_template.jinja").write_text(LLAMA3_LIKE)
    ours, ref = load_tokenizer(d), transformers.AutoTokenizer.from_pretrained(str(d))
    for chat in CHATS:
        assert ours.apply_chat_template(chat) == ref.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True)
    with pytest.raises(ValueError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


TOOLS_TEMPLATE = ("{% if tools is not none %}TOOLS {{ tools | tojson }}\n{% endif %}"
                  "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")


def test_tools_reach_the_template_as_in_transformers(tok, hf):
    tools = [{"type": "function", "function": {"name": "wëather", "parameters": {}}}]
    for t in (None, tools):
        assert tok.apply_chat_template(CHATS[1], chat_template=TOOLS_TEMPLATE, tools=t) == (
            hf.apply_chat_template(CHATS[1], chat_template=TOOLS_TEMPLATE, tools=t,
                                   tokenize=False, add_generation_prompt=True))


def test_content_parts_are_joined_text(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]
    assert tok.apply_chat_template(parts) == tok.apply_chat_template(
        [{"role": "user", "content": "a\nb"}])


@pytest.mark.parametrize("messages, match", [
    ("hello", "list of"),
    ({"role": "user", "content": "x"}, "list of"),
    ([], "empty"),
    (["hello"], "message 0 must be a dict"),
    ([{"content": "x"}], "message 0 needs a non-empty string 'role'"),
    ([{"role": "user", "content": "x"}, {"role": "assistant"}], "message 1 .* no 'content'"),
    ([{"role": "user", "content": 3}], "must be a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]}], "text models only"),
])
def test_malformed_messages_say_what_is_wrong(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.apply_chat_template(messages)


def test_no_chat_template_is_a_clear_error(model_dir, tmp_path):
    ours = load_tokenizer(copy_tokenizer(model_dir, tmp_path, drop=["chat_template"]))
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CHATS[0])
    assert ours.apply_chat_template(CHATS[0], chat_template="{{ messages[0]['content'] }}") == "hi"
    with pytest.raises(ValueError, match="not valid Jinja"):
        ours.apply_chat_template(CHATS[0], chat_template="{% for %}")


# ---- incremental detokenization -----------------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
def test_deltas_add_up_to_decode_of_all_ids(tok, skip):
    """Over many random sequences, fed one token at a time and in chunks: the concatenated
    deltas equal decode(all ids), and what is emitted is never taken back."""
    rng = random.Random(1)
    for _ in range(200):
        ids = random_ids(tok, rng, rng.randrange(1, 24))
        ref = tok.decode(ids, skip)
        for chunks in (None, _chunking(rng, len(ids))):
            detok, deltas = stream(tok, ids, chunks=chunks, skip_special_tokens=skip)
            assert "".join(deltas) == detok.text == ref, ids
            assert_prefixes(deltas, ref)


def _chunking(rng: random.Random, n: int) -> list[int]:
    sizes = []
    while sum(sizes) < n:
        sizes.append(rng.randrange(1, 4))
    return sizes


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_deltas_property(tok, data):
    ids = data.draw(st.lists(st.sampled_from(_hard_ids(tok)), min_size=1, max_size=16))
    prompt = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=8))
    skip = data.draw(st.booleans())
    detok, deltas = stream(tok, ids, prompt=prompt, skip_special_tokens=skip)
    ctx = detok._decoder.context_ids       # a few of the prompt's last tokens
    assert any(prompt[i:i + len(ctx)] == ctx for i in range(len(prompt) + 1))
    full = tok.decode(ctx + ids, skip)
    assert full.startswith(tok.decode(ctx, skip))
    ref = full[len(tok.decode(ctx, skip)):]
    assert "".join(deltas) == ref
    assert_prefixes(deltas, ref)


_HARD: dict[int, list[int]] = {}


def _hard_ids(tok) -> list[int]:
    """Fragments, special tokens and a few ordinary tokens: the alphabet of the property test."""
    if id(tok) not in _HARD:
        ordinary = tok.encode(" héllo wörld 你好 🙂 the", add_special_tokens=False)
        _HARD[id(tok)] = sorted(set(fragment_ids(tok)[:40]) | tok.all_special_ids | set(ordinary))
    return _HARD[id(tok)]


def test_output_continues_the_prompt(tok):
    """Text is decoded after the prompt (as vLLM does): a SentencePiece tokenizer keeps the
    leading space of the first output token, and prompt text + output text = decode(all)."""
    prompt = tok.encode("Hello, my name is")
    ids = tok.encode("Hello, my name is nanorun and I serve 🙂 héllo")
    assert ids[:len(prompt)] == prompt
    out = ids[len(prompt):]
    detok, deltas = stream(tok, out, prompt=prompt)
    assert detok.text == " nanorun and I serve 🙂 héllo"
    assert tok.decode(prompt) + detok.text == tok.decode(prompt + out)
    # With no prompt the text is exactly decode(output ids), leading space stripped or not.
    assert stream(tok, out)[0].text == tok.decode(out)


def test_skip_special_tokens(tok):
    im_end = tok.token_to_id(IM_END)
    out = tok.encode("ab", add_special_tokens=False) + [im_end] + tok.encode(
        " 🙂c", add_special_tokens=False)
    assert stream(tok, out)[0].text == tok.decode(out, True)
    assert IM_END not in stream(tok, out)[0].text
    assert stream(tok, out, skip_special_tokens=False)[0].text == tok.decode(out, False)
    assert IM_END in stream(tok, out, skip_special_tokens=False)[0].text


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("include", [True, False])
def test_the_token_that_ended_the_request_is_left_out(tok, skip, include):
    """vLLM's rule: the EOS / stop token's text is not output, unless include_stop_str_in_output."""
    ids = tok.encode("ab 🙂", add_special_tokens=False) + [tok.token_to_id(IM_END)]
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=skip,
                                   include_stop_str_in_output=include)
    text = "".join(detok.step([i]) for i in ids[:-1])
    text += detok.step(ids[-1:], stop_token=True) + detok.finish()
    assert text == detok.text == tok.decode(ids if include else ids[:-1], skip)
    assert (IM_END in text) == (include and not skip)


def test_split_character_is_held_then_emitted_whole(tok):
    """"🙂" over several tokens: nothing (no U+FFFD) until it is complete."""
    ids = tok.encode("a 🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.step([i]) for i in ids]
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) + detok.finish() == "a 🙂"


# ---- stop strings -------------------------------------------------------------------------------
TEXT = "The stop string STOP may appear anywhere: in the middle, at the end. STOP."


def stop_case(tok, text, stop, include, **kw):
    """Stream `text`'s tokens with `stop`; check against cutting decode(ids) at the stop."""
    ids = tok.encode(text, add_special_tokens=False)
    full = tok.decode(ids)
    stops = [stop] if isinstance(stop, str) else stop
    ends = [(full.find(s) + len(s), -len(s), s) for s in stops if s in full]
    end, _, hit = min(ends)
    expected = full[:end] if include else full[:end - len(hit)]
    detok, deltas = stream(tok, ids, stop=stop, include_stop_str_in_output=include, **kw)
    assert (detok.text, detok.stop_reason, detok.finished_by_stop) == (expected, hit, True)
    assert_prefixes(deltas, expected)
    return ids, detok


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(tok, include):
    ids = tok.encode(TEXT, add_special_tokens=False)
    pieces = [tok.decode(ids[:k]) for k in range(len(ids) + 1)]
    # A stop string crossing a token boundary: the end of one token and the start of the next.
    k = next(k for k in range(2, len(ids)) if len(pieces[k]) - len(pieces[k - 1]) >= 2
             and len(pieces[k + 1]) - len(pieces[k]) >= 2)
    stop = pieces[k + 1][len(pieces[k]) - 2:len(pieces[k]) + 2]
    assert not any(stop in tok.decode([i]) for i in ids)
    stop_case(tok, TEXT, stop, include)


@pytest.mark.parametrize("include", [False, True])
def test_stop_at_the_very_start(tok, include):
    _, detok = stop_case(tok, TEXT, "The s", include)
    assert detok.text == ("The s" if include else "")


@pytest.mark.parametrize("include", [False, True])
def test_first_stop_to_complete_wins(tok, include):
    stop_case(tok, TEXT, ["middle", "STOP", "anywhere"], include)          # STOP comes first
    stop_case(tok, TEXT, ["OP", "STOP"], include)          # same end: the longer one wins


def test_stop_on_a_split_character_found_at_finish(tok):
    """A stop ending in a multi-byte character whose last piece is the last token: found when
    the held bytes are flushed at finish."""
    ids = tok.encode("ab 🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["🙂"])
    text = "".join(detok.step([i]) for i in ids) + detok.finish()
    assert (text, detok.stop_reason) == ("ab ", "🙂")


def test_a_possible_stop_is_held_until_it_is_not(tok):
    """"STO" could begin "STOP": it is held until the next character says otherwise."""
    ids = tok.encode("xx STO STOP yy", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    deltas, held = [], 0
    for k, i in enumerate(ids, 1):
        deltas.append(detok.step([i]))
        decoded = tok.decode(ids[:k])
        if decoded.endswith(("S", "ST", "STO")) and not detok.finished_by_stop:
            held += 1
            assert len(detok.text) < len(decoded.rstrip("STO")) + 1
    assert held and detok.text == "xx STO " and detok.stop_reason == "STOP"
    assert_prefixes(deltas, "xx STO ")
    assert detok.step(ids[:2]) == "" and detok.finish() == "" and detok.text == "xx STO "


def test_min_tokens_ignores_earlier_stops(tok):
    ids = tok.encode("STOP a STOP b", add_special_tokens=False)
    first = next(k for k in range(1, len(ids)) if "STOP" in tok.decode(ids[:k]))
    detok, deltas = stream(tok, ids, stop="STOP", min_tokens=first + 1)
    assert detok.text == "STOP a " and detok.finished_by_stop


def test_empty_stop_string_is_rejected(tok):
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(tok, [], stop=["a", ""])


def reference_stop(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Character by character: the output ends at the first character that completes a stop."""
    for end in range(1, len(text) + 1):
        hits = [s for s in stops if text[:end].endswith(s)]
        if hits:
            s = max(hits, key=len)
            return (text[:end] if include else text[:end - len(s)]), s
    return text, None


@settings(max_examples=300, deadline=None)
@given(text=st.text("abc", max_size=14), stops=st.lists(st.text("abc", min_size=1, max_size=4),
                                                        min_size=1, max_size=3),
       include=st.booleans(), cuts=st.lists(st.integers(0, 14), max_size=6))
def test_stop_checker_property(text, stops, include, cuts):
    """Any split of the text into pieces gives the reference's result, and nothing emitted is
    past the stop (nor, without include_stop_str_in_output, part of it)."""
    expected, hit = reference_stop(text, stops, include)
    checker, out = StopChecker(stops, include), ""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    for lo, hi in zip(bounds, bounds[1:]):
        out += checker.feed(text[lo:hi])
        assert expected.startswith(out)
    out += checker.feed("", final=True)
    assert (out, checker.stopped_on) == (expected, hit)


# ---- the model directory ------------------------------------------------------------------------
def test_model_dir_runs_in_nanorun_and_transformers_alike(tmp_path):
    """tests/text_model.py writes a directory both load: nanorun's greedy tokens equal HF's
    (up to a near-tie of HF's logits: not the same arithmetic, see tests/tokens.py), and the
    streamed text of them is the tokenizer's decode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokens import assert_same_tokens, hf_logits_of

    from nanorun import LLM, SamplingParams

    path = write_text_model(tmp_path)
    tok = load_tokenizer(path)
    prompt = tok.apply_chat_template(CHATS[1], tokenize=True)
    llm = LLM(str(path), kv_cache_tokens=1024, max_batch_tokens=64)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(path),
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          pad_token_id=0)
    assert_same_tokens(out.token_ids, ref[0, len(prompt):].tolist(), prompt=prompt,
                       params=params, logits_of=hf_logits_of(hf))
    detok, _ = stream(tok, out.token_ids, prompt=prompt)
    assert tok.decode(prompt) + detok.text == tok.decode(prompt + out.token_ids)
