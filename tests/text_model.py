"""A tiny Hugging Face model directory with a real tokenizer, for text-in, text-out tests.

`write_text_model(path)` writes what both nanorun and transformers load: a Llama config.json,
random safetensors weights under HF's parameter names, a tokenizer trained offline with
`tokenizers` on the small corpus below (multi-byte UTF-8 included), tokenizer_config.json with
bos/eos and a ChatML chat template, and generation_config.json. No transformers import: it
runs in well under a second, so a session-scoped fixture can build one per tokenizer kind.

Two tokenizer kinds cover the two families the detokenizer must get right:
    "bpe"            byte-level BPE (GPT-2 / Llama 3 / Qwen style): every byte is a symbol, so
                     a multi-byte character can be split over tokens (Ġ marks spaces).
    "sentencepiece"  Llama 2 style: BPE over "▁"-marked words with byte fallback: characters
                     outside the learned alphabet (🙂, rare CJK) become <0xNN> byte tokens.
    "metaspace"      the same model as tokenizer.json writes it today: Metaspace pre-tokenizer
                     and decoder instead of Llama 2's normalizer and decoder chain.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, IM_START, IM_END]

# ChatML (Qwen's format), with an optional default system message and the generation prompt.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "hello world, héllo wörld! the quick brown fox jumps over the lazy dog.",
    "Hello, my name is nanorun and I serve language models.",
    "你好，世界。你好吗？我很好。",
    "naïve café résumé über straße façade jalapeño crème brûlée",
    "Привет, мир! Καλημέρα κόσμε. こんにちは世界",
    "emoji: 🙂 🚀 👍🏽 — “quotes” and ‘single’ … done",
    "def main():\n    return 42  # tabs\tand\nnewlines\n\n",
    "The stop string STOP may appear anywhere: in the middle, at the end. STOP.",
    "numbers 0123456789 and symbols !@#$%^&*()_+-=[]{};:'\",.<>/?\\|`~",
]

_SP_ALPHABET = frozenset(map(chr, range(32, 127))) | frozenset(
    "\n\téöüïçñèêàâäßûé你好世界我很吗，。？！ПриветмйрусскЖж")

_HF_TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
    "attention_bias": False, "mlp_bias": False,
}


def _corpus() -> list[str]:
    # Repeated so that common words merge; the emoji lines stay rare on purpose (see below).
    return CORPUS[:5] * 20 + CORPUS[5:] * 2


def byte_level_bpe(vocab_size: int = 600) -> Tokenizer:
    """GPT-2 style byte-level BPE with a BOS-adding post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    _add_bos(tok)
    return tok


def sentencepiece_bpe(vocab_size: int = 500) -> Tokenizer:
    """Llama 2 style: "▁" for spaces, BPE with byte fallback, and the decoder chain
    Replace(▁ -> " "), ByteFallback, Fuse, Strip(one leading space), as Llama 2 ships it.

    The alphabet is ASCII plus some Latin, CJK and Cyrillic letters (_SP_ALPHABET); the rest
    (emoji, Greek, kana, typographic quotes) has no token and falls back to <0xNN> bytes: a
    multi-byte character split over tokens.
    """
    # Training only sees the alphabet's characters, so nothing else gets a token (and a
    # capped alphabet would break frequency ties differently from run to run).
    corpus = ["".join(c for c in line if c in _SP_ALPHABET) for line in _corpus()]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False)
    probe = Tokenizer(models.BPE(unk_token=UNK))
    probe.normalizer = _sp_normalizer()
    probe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    probe.train_from_iterator(corpus, trainer)
    # Rebuild with the 256 byte tokens right after the special tokens (Llama 2's layout).
    trained = json.loads(probe.to_str())["model"]
    learned = [t for t, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1])
               if t not in SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [f"<0x{b:02X}>" for b in range(256)]
                                        + learned)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = _sp_normalizer()
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    _add_bos(tok)
    return tok


def metaspace_bpe() -> Tokenizer:
    """The same model as `sentencepiece_bpe`, in the newer tokenizer.json style (Mistral v0.3,
    recent conversions): Metaspace pre-tokenizer and decoder, prepend_scheme "first"."""
    tok = sentencepiece_bpe()
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _sp_normalizer():
    return normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])


def _add_bos(tok: Tokenizer) -> None:
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos)])


TOKENIZER_KINDS = {"bpe": byte_level_bpe, "sentencepiece": sentencepiece_bpe,
                   "metaspace": metaspace_bpe}


def write_tokenizer(path: Path, kind: str = "bpe") -> Tokenizer:
    """tokenizer.json and tokenizer_config.json (special tokens, chat template) into `path`."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"tokenizer_kind must be one of {sorted(TOKENIZER_KINDS)}, got {kind!r}")
    tok = TOKENIZER_KINDS[kind]()
    tok.save(str(path / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False, "special": True}
             for t in SPECIAL_TOKENS}
    config = {
        # PreTrainedTokenizerFast: transformers uses tokenizer.json as written (a model-specific
        # class would rebuild parts of it), so it is a reference for the file itself.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": IM_END, "unk_token": UNK, "pad_token": EOS,
        "added_tokens_decoder": added,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _HF_TINY_LLAMA["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                encoding="utf-8")
    return tok


def hf_llama_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under transformers' LlamaForCausalLM parameter names."""
    g = torch.Generator().manual_seed(seed)
    d, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd, h, kv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.1       # spread logits: no argmax near-ties

    def norm() -> torch.Tensor:
        return 1 + torch.randn(d, generator=g) * 0.1

    sd = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm(),
          "lm_head.weight": w(v, d)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd |= {p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
               p + "self_attn.q_proj.weight": w(h * hd, d),
               p + "self_attn.k_proj.weight": w(kv * hd, d),
               p + "self_attn.v_proj.weight": w(kv * hd, d),
               p + "self_attn.o_proj.weight": w(d, h * hd),
               p + "mlp.gate_proj.weight": w(i, d), p + "mlp.up_proj.weight": w(i, d),
               p + "mlp.down_proj.weight": w(d, i)}
    return sd


def write_text_model(path, *, tokenizer_kind: str = "bpe", seed: int = 0) -> Path:
    """Write a tiny Llama model directory with a trained tokenizer into `path`; returns it.

    Files: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    generation_config.json. The vocabulary is the tokenizer's (special tokens included).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(path, tokenizer_kind)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(IM_END)
    cfg = dict(_HF_TINY_LLAMA, vocab_size=tok.get_vocab_size(), bos_token_id=bos, eos_token_id=eos)
    (path / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    save_file(hf_llama_state_dict(cfg, seed), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    gen = {"bos_token_id": bos, "eos_token_id": [eos, tok.token_to_id(EOS)]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    return path
