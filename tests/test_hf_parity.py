"""nanorun against Hugging Face transformers, which nobody here wrote: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from nanorun import LLM, SamplingParams
from nanorun.models import get_preset

transformers = pytest.importorskip("transformers")

ARCHS = ["tiny-llama", "tiny-llama2", "tiny-mistral", "tiny-qwen2"]


@pytest.fixture(scope="module", params=ARCHS)
def hf_checkpoint(request, tmp_path_factory):
    """A random-weight HF model saved with save_pretrained, and the model itself."""
    hf_dict = get_preset(request.param).to_hf_dict()
    hf_dict["initializer_range"] = 0.1        # spread the logits: no near-ties in argmax
    config = transformers.AutoConfig.for_model(**hf_dict)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, torch_dtype=torch.float32, attn_implementation="eager").eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path, model


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def test_logits_match_hf_forward(hf_checkpoint):
    path, hf = hf_checkpoint
    llm = LLM(str(path), max_batch_tokens=256, kv_cache_tokens=4096)
    prompt = _prompts(hf.config.vocab_size, [77])[0]
    ours = llm.engine.prompt_logits(prompt)                          # [T, V]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0].float()
    rel = (ours - ref).norm() / ref.norm()
    assert rel < 1e-4, f"relative error {rel:.2e}"


def test_greedy_batch_matches_hf_generate(hf_checkpoint):
    path, hf = hf_checkpoint
    # Prompt lengths straddle page boundaries and, for tiny-mistral, its sliding window (64).
    prompts = _prompts(hf.config.vocab_size, [1, 5, 16, 17, 40, 90])
    n_new = 24
    llm = LLM(str(path), max_batch_tokens=64, kv_cache_tokens=4096, page_size=16)
    params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    hf.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False,
                              pad_token_id=0)
        assert out.token_ids == ref[0, len(prompt):].tolist()
        assert out.finish_reason == "length"
