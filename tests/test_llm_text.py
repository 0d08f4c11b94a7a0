"""Text in, text out through LLM and TextEngine, against references nobody here wrote:
transformers' generate, decoded by its own tokenizer, and its apply_chat_template; the
tokenizer's decode of all output ids for streamed text; log_softmax of the engine's logits.

Tokens from other arithmetic (transformers, or another batch) are the reference's, or differ
first at a near-tie of its logits (tests/tokens.py), after which they are not compared. A
request run alone twice in the same engine does the same arithmetic: exactly equal."""

from __future__ import annotations

import pytest
import torch
from text_model import write_text_model
from tokens import assert_same_tokens, hf_logits_of

from nanorun import LLM, Engine, SamplingParams, TextEngine

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = ["hello world", "Привет, мир! 你好", "The stop string STOP may", "emoji: 🙂 🚀"]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好, wörld?"}]


@pytest.fixture(scope="module", params=["bpe", "sentencepiece"])
def model_dir(request, tmp_path_factory):
    return write_text_model(tmp_path_factory.mktemp(request.param), tokenizer_kind=request.param)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), kv_cache_tokens=2048, max_batch_tokens=64)


@pytest.fixture(scope="module")
def hf(model_dir):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir))
    model.generation_config.eos_token_id = None
    return model, transformers.AutoTokenizer.from_pretrained(str(model_dir))


def hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    model, _ = hf
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                             dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def stream(te: TextEngine, rid: str, prompt, params) -> tuple[list[str], object]:
    """Run one request alone; the text deltas of each step and the final output."""
    te.add_request(rid, prompt, params)
    deltas, text, last = [], "", None
    while te.has_unfinished_requests():
        for out in te.step():
            new = out.outputs[0].text
            assert new.startswith(text), "cumulative text went back"
            deltas.append(new[len(text):])
            text, last = new, out
    return deltas, last


# ---- against transformers ---------------------------------------------------------------------
def test_greedy_text_equals_transformers(llm, hf):
    outs = llm.generate(PROMPTS, GREEDY)
    _, tok = hf
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt)["input_ids"]
        assert list(out.prompt_token_ids) == ids and out.prompt == prompt
        ref = hf_greedy(hf, ids, GREEDY.max_tokens)
        assert_same_tokens(out.token_ids, ref, prompt=ids, params=GREEDY,
                           logits_of=hf_logits_of(hf[0]), what=prompt)
        # In the prompt's context (a SentencePiece decoder drops a first token's space).
        in_context = tok.decode(ids + out.token_ids, skip_special_tokens=True)
        assert out.outputs[0].text == in_context[len(tok.decode(ids, skip_special_tokens=True)):]
        assert out.finish_reason == "length" and out.outputs[0].index == 0


def test_chat_equals_generate_on_transformers_template(llm, hf):
    _, tok = hf
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    out = llm.chat(CHAT, GREEDY)[0]
    assert list(out.prompt_token_ids) == ids
    assert out.prompt == tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert out.token_ids == llm.generate({"prompt_token_ids": ids}, GREEDY)[0].token_ids
    assert_same_tokens(out.token_ids, hf_greedy(hf, ids, GREEDY.max_tokens), prompt=ids,
                       params=GREEDY, logits_of=hf_logits_of(hf[0]), what="vs transformers")
    two = llm.chat([CHAT, CHAT[1:]], GREEDY)      # batched with another chat
    assert len(two) == 2
    assert_same_tokens(two[0].token_ids, out.token_ids, prompt=ids, params=GREEDY,
                       logits_of=llm.engine.prompt_logits, what="batched vs alone")


def test_prompt_forms_give_the_same_tokens(llm):
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    forms = [PROMPTS[0], {"prompt": PROMPTS[0]}, {"prompt_token_ids": ids}, ids]
    outs = llm.generate(forms, GREEDY)
    # Four rows of the same prompt in the same batches: the same arithmetic, the same tokens.
    assert len({tuple(o.token_ids) for o in outs}) == 1
    assert [o.prompt for o in outs] == [PROMPTS[0], PROMPTS[0], None, None]
    assert len(llm.generate(PROMPTS[0], GREEDY)) == 1 and len(llm.generate(ids, GREEDY)) == 1


# ---- streaming ----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_deltas_add_up_to_the_decoded_output(llm, prompt):
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=5, ignore_eos=True)
    deltas, out = stream(llm.text_engine, "s", prompt, params)
    assert "".join(deltas) == out.outputs[0].text
    tok = llm.get_tokenizer()
    ids = list(out.prompt_token_ids)
    assert tok.decode(ids) + out.outputs[0].text == tok.decode(ids + out.token_ids)


def test_utf8_split_across_tokens_streams_whole_characters(llm):
    """Forced outputs: the ids of a text with multi-byte characters split over tokens, fed
    one step at a time through the same path as sampled ones (stop_token_ids would cut them:
    a logits bias is what vLLM users would use, so the model's logits are overridden here)."""
    tok = llm.get_tokenizer()
    target = tok.encode(" héllo ǅ Ꙭ 𝔘 wörld", add_special_tokens=False)
    assert any("\ufffd" in tok.decode([t]) for t in target), "nothing is split"
    te = llm.text_engine
    real = te.engine.sampler.__class__.finish    # the engine's seam: the tokens read back
    forced = iter(target)

    def force(self, *args):
        out = real(self, *args)
        out.tokens = [next(forced) for _ in out.tokens]
        return out

    te.engine.sampler.__class__.finish = force
    try:
        deltas, out = stream(te, "u", "x", SamplingParams(max_tokens=len(target), ignore_eos=True))
    finally:
        te.engine.sampler.__class__.finish = real
    assert out.token_ids == target
    text = out.outputs[0].text
    assert "".join(deltas) == text and "ǅ Ꙭ 𝔘" in text
    ids = list(out.prompt_token_ids)
    assert tok.decode(ids) + text == tok.decode(ids + target)
    assert all("\ufffd" not in d for d in deltas)


# ---- stop strings -----------------------------------------------------------------------------
def _stop_within(llm, prompt: str, n_tokens: int = 16) -> tuple[str, object]:
    """A stop string that spans two output tokens of the greedy continuation."""
    out = llm.generate(prompt, SamplingParams(max_tokens=n_tokens, temperature=0,
                                              ignore_eos=True))[0]
    tok = llm.get_tokenizer()
    ids, full = list(out.prompt_token_ids), out.outputs[0].text
    base = len(tok.decode(ids))
    for k in range(1, len(out.token_ids)):          # the text's length after k tokens
        b = len(tok.decode(ids + out.token_ids[:k])) - base
        stop = full[b - 1:b + 1]
        if 0 < b < len(full) and full.find(stop) == b - 1 and "\ufffd" not in stop:
            return stop, out
    pytest.skip("no stop string spanning two tokens in this continuation")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens(llm, include):
    stop, free = _stop_within(llm, PROMPTS[2])
    full = free.outputs[0].text
    at = full.find(stop)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, stop=[stop],
                            include_stop_str_in_output=include)
    deltas, out = stream(llm.text_engine, "stop", PROMPTS[2], params)
    c = out.outputs[0]
    assert (c.finish_reason, c.stop_reason) == ("stop", stop)
    assert c.text == full[:at + len(stop) if include else at] == "".join(deltas)
    assert c.token_ids == free.token_ids[:len(c.token_ids)] and len(c.token_ids) < 16
    engine = llm.engine
    assert not engine.has_unfinished_requests(), "the core request was not aborted"
    assert engine.kv_cache.num_free_pages == engine.kv_cache.num_pages


def test_min_tokens_holds_off_eos_and_stop_strings(llm):
    free = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0,
                                                    ignore_eos=True))[0]
    eos = free.token_ids[2]             # its 3rd greedy token made an EOS for the test
    params = SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[eos])
    assert llm.generate(PROMPTS[0], params)[0].token_ids == free.token_ids[:3]
    held = llm.generate(PROMPTS[0], SamplingParams(max_tokens=10, temperature=0,
                                                    stop_token_ids=[eos], min_tokens=6))[0]
    assert len(held.token_ids) >= 6 and eos not in held.token_ids[:6]


# ---- n > 1 ----------------------------------------------------------------------------------------
def test_n_sequences_differ_finish_together_and_match_their_seeds(llm):
    params = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=100, ignore_eos=True)
    out = llm.generate(PROMPTS[0], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    for i, c in enumerate(out.outputs):
        one = SamplingParams(max_tokens=8, temperature=1.0, seed=100 + i, ignore_eos=True)
        # three sequences batched against one alone
        assert_same_tokens(c.token_ids, llm.generate(PROMPTS[0], one)[0].token_ids,
                           prompt=out.prompt_token_ids, params=one,
                           logits_of=llm.engine.prompt_logits, what=f"sequence {i}")
        assert c.finish_reason == "length" and len(c.token_ids) == 8
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages


def test_n_with_stop_and_abort(llm):
    te = llm.text_engine
    te.add_request("n", PROMPTS[1], SamplingParams(n=2, max_tokens=30, ignore_eos=True))
    te.step()
    te.abort_request("n")
    done = []
    while te.has_unfinished_requests():
        done += [o for o in te.step() if o.finished]
    assert [o.request_id for o in done] == ["n"]
    assert [c.finish_reason for c in done[0].outputs] == ["abort", "abort"]
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages


# ---- logprobs -----------------------------------------------------------------------------------
def test_logprobs_are_log_softmax_of_the_engine_logits(llm):
    k = 3
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.7, seed=1,
                                                   ignore_eos=True, logprobs=k,
                                                   prompt_logprobs=2))[0]
    ids = list(out.prompt_token_ids) + out.token_ids
    ref = torch.log_softmax(llm.engine.prompt_logits(ids), dim=-1)       # [T, V]
    P = len(out.prompt_token_ids)
    c = out.outputs[0]
    assert len(c.logprobs) == len(c.token_ids)
    total = 0.0
    for j, (tok, d) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[P - 1 + j]
        _check_entry(row, tok, d, k, llm)
        total += float(row[tok])
    assert c.cumulative_logprob == pytest.approx(total, abs=1e-3)
    assert len(out.prompt_logprobs) == P and out.prompt_logprobs[0] is None
    for p in range(1, P):
        _check_entry(ref[p - 1], ids[p], out.prompt_logprobs[p], 2, llm)


def _check_entry(row: torch.Tensor, tok: int, d: dict, k: int, llm) -> None:
    assert next(iter(d)) == tok
    assert d[tok].logprob == pytest.approx(float(row[tok]), abs=1e-4)
    assert d[tok].rank == int((row > row[tok]).sum()) + 1
    top = row.topk(k)
    for rank, (v, t) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        assert d[t].logprob == pytest.approx(v, abs=1e-4)
        assert d[t].rank == rank or t == tok
        assert d[t].decoded_token == llm.get_tokenizer().decode([t], skip_special_tokens=False)
    assert len(d) in (k, k + 1)


# ---- refusals -------------------------------------------------------------------------------------
def test_text_to_a_model_without_tokenizer_says_to_pass_ids():
    llm = LLM("tiny-llama", weights="random", kv_cache_tokens=256)
    assert llm.get_tokenizer() is None
    with pytest.raises(ValueError, match="prompt 1: .*token ids"):
        llm.generate([[1, 2, 3], "hello"], GREEDY)
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([[1, 2]], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="tokenizer"):
        llm.chat(CHAT)
    assert not llm.engine.has_unfinished_requests()
    assert llm.generate([[1, 15, 99], [7] * 40], GREEDY)[1].outputs[0].text == ""


@pytest.mark.parametrize("prompt, error", [
    ({"text": "hi"}, ValueError), ({"prompt": 5}, TypeError), ({}, ValueError),
    (b"hi", TypeError), ({"prompt_token_ids": "12"}, TypeError),
    ({"prompt_token_ids": []}, ValueError)])
def test_bad_prompts_are_refused_and_nothing_is_queued(llm, prompt, error):
    with pytest.raises(error):
        llm.generate([PROMPTS[0], prompt], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_the_engine_refuses_what_is_text_engine_work():
    engine = Engine("tiny-llama", weights="random", kv_cache_tokens=256)
    for sp, match in [(SamplingParams(n=2), "n > 1"), (SamplingParams(stop="x"), "stop strings"),
                      (SamplingParams(logprobs=21), "more than")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request("r", [1, 2], sp)
    assert not engine.has_unfinished_requests()


def test_unreadable_tokenizer_files_leave_token_ids_working(tmp_path):
    path = write_text_model(tmp_path)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.model").write_bytes(b"sentencepiece")
    llm = LLM(str(path), kv_cache_tokens=256)
    assert llm.get_tokenizer() is None
    assert len(llm.generate([[1, 15, 99]], GREEDY)[0].token_ids) == GREEDY.max_tokens
    with pytest.raises(ValueError, match="tokenizer.model but no tokenizer.json"):
        llm.generate("hello", GREEDY)


def test_n_streams_each_sequence_and_stops_each_on_its_own(llm):
    """n = 2 through TextEngine.step: each sequence's deltas add up to its final text, and a
    stop string cuts each where it first completes (sequence 0 has it for sure)."""
    free = llm.generate(PROMPTS[0], SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=7,
                                                   ignore_eos=True))[0]
    texts = [c.text for c in free.outputs]
    stop = next((texts[0][i:i + 2] for i in range(len(texts[0]) // 2, len(texts[0]) - 1)
                 if "\ufffd" not in texts[0][i:i + 2]), None)
    if stop is None:
        pytest.skip("no stop string in sequence 0's text")
    te = llm.text_engine
    te.add_request("ns", PROMPTS[0], SamplingParams(n=2, max_tokens=16, temperature=1.0, seed=7,
                                                    ignore_eos=True, stop=stop))
    seen, last = ["", ""], None
    while te.has_unfinished_requests():
        for out in te.step():
            for c in out.outputs:
                assert c.text.startswith(seen[c.index])
                seen[c.index] = c.text
            last = out
    assert last.finished and [c.index for c in last.outputs] == [0, 1]
    for c, full in zip(last.outputs, texts):
        at = full.find(stop)
        assert c.text == (full if at < 0 else full[:at]) == seen[c.index]
        assert (c.finish_reason, c.stop_reason) == (("length", None) if at < 0 else ("stop", stop))
    assert llm.engine.kv_cache.num_free_pages == llm.engine.kv_cache.num_pages
