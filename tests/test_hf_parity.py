"""nanorun against Hugging Face transformers, which nobody here wrote: logits and greedy tokens.

Not the same arithmetic: greedy tokens are HF's, or differ first at a near-tie of HF's logits
(tests/tokens.py), after which they are not compared."""

from __future__ import annotations

import pytest
import torch
from tokens import assert_same_tokens, hf_logits_of

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
    # Token 0 is also pad_token_id below: without an attention_mask HF would take it for
    # padding, and the comparison would fail for a reason that is not ours.
    prompts[2][3] = prompts[4][0] = 0
    n_new = 24
    llm = LLM(str(path), max_batch_tokens=64, kv_cache_tokens=4096, page_size=16)
    params = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    hf.generation_config.eos_token_id = None
    for prompt, out in zip(prompts, outputs):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                              do_sample=False, pad_token_id=0)
        assert_same_tokens(out.token_ids, ref[0, len(prompt):].tolist(), prompt=prompt,
                           params=params, logits_of=hf_logits_of(hf),
                           what=f"prompt {len(prompt)}")
        assert out.finish_reason == "length"


# -- on a GPU: bf16 through the CUDA kernels, against HF in fp32 ------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _hf_logits_cuda(hf, ids: list[int], dtype: torch.dtype) -> torch.Tensor:
    """HF's logits for `ids` on the GPU in `dtype`, from a copy (the fixture's model stays put)."""
    import copy

    model = copy.deepcopy(hf).to("cuda", dtype)
    with torch.no_grad():
        return model(torch.tensor([ids], device="cuda")).logits[0].float()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("layout, chunk", [("sequential", 1), ("sequential", 16),
                                           ("overlap", 16), ("overlap", 128)])
def test_gpu_bf16_logits_are_as_close_to_fp32_as_hf_bf16(hf_checkpoint, layout, chunk):
    """bf16 on a GPU runs nanorun._cuda's attention, rope, RMSNorm and SiLU kernels. Our prompt
    logits must be as close to HF's fp32 logits as HF's own bf16 run is. Chunks of 1 token run
    every token as a decode token; 16, as prompt chunks over earlier pages; 128, all at once."""
    path, hf = hf_checkpoint
    prompt = _prompts(hf.config.vocab_size, [77])[0]
    ref = _hf_logits_cuda(hf, prompt, torch.float32)
    hf_bf16 = _hf_logits_cuda(hf, prompt, torch.bfloat16)
    llm = LLM(str(path), device="cuda", dtype="bfloat16", layout=layout,
              max_batch_tokens=chunk, kv_cache_tokens=4096)
    ours = llm.engine.prompt_logits(prompt).float()

    def err(x: torch.Tensor) -> float:
        return ((x - ref).norm() / ref.norm()).item()

    print(f"{layout} chunk {chunk}: ours {err(ours):.2e}, HF bf16 {err(hf_bf16):.2e}")
    assert err(ours) <= 2 * err(hf_bf16) + 1e-3


@pytest.mark.gpu
@requires_cuda
def test_gpu_bf16_greedy_decode_picks_hf_fp32_argmax(hf_checkpoint):
    """Decode steps (CUDA graphs, split-KV attention): every greedy token we pick is HF fp32's
    argmax at that position, up to a bf16-sized margin for near-ties."""
    path, hf = hf_checkpoint
    prompts = _prompts(hf.config.vocab_size, [5, 17, 40, 90])
    llm = LLM(str(path), device="cuda", dtype="bfloat16", layout="overlap",
              max_batch_tokens=64, kv_cache_tokens=8192)
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        ids = prompt + out.token_ids
        ref = _hf_logits_cuda(hf, ids, torch.float32)[len(prompt) - 1: -1]   # [16, V]
        picked = ref.gather(1, torch.tensor(out.token_ids, device="cuda")[:, None])[:, 0]
        margin = ref.max(dim=1).values - picked
        assert (margin <= 0.05 * ref.std(dim=1)).all(), margin.tolist()
