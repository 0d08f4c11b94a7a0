"""Hugging Face Hub ids ("org/name"), resolved through huggingface_hub against a cache the tests
build in a tmp dir (tests/hub_cache.py), offline: no test reaches the network."""

from __future__ import annotations

import pytest

pytest.importorskip("huggingface_hub")

from hub_cache import cache_snapshot, offline_hub  # noqa: E402
from text_model import write_text_model  # noqa: E402

from nanorun import LLM, SamplingParams  # noqa: E402
from nanorun.cli import main  # noqa: E402
from nanorun.models import UnknownModelError, resolve_model  # noqa: E402
from nanorun.models.hub import MODEL_FILES, repo_id_of  # noqa: E402

MAIN, V2 = "a" * 40, "b" * 40
PARAMS = SamplingParams(max_tokens=6, temperature=0, logprobs=1)
PROMPTS = ["hello world, the quick", "Привет, мир!"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Two versions of one model (other weights) and a model with another tokenizer."""
    root = tmp_path_factory.mktemp("hub")
    return {"main": write_text_model(root / "main", seed=0),
            "v2": write_text_model(root / "v2", seed=1),
            "sp": write_text_model(root / "sp", tokenizer_kind="sentencepiece")}


@pytest.fixture
def cache(tmp_path, monkeypatch, dirs):
    cache = tmp_path / "hub"
    cache_snapshot(cache, "org/tiny", dirs["main"], MAIN)
    cache_snapshot(cache, "org/tiny", dirs["v2"], V2, refs=("v2",))
    cache_snapshot(cache, "org/sp-tokenizer", dirs["sp"], "c" * 40)
    offline_hub(monkeypatch, cache)
    return cache


def _run(model, **kw):
    llm = LLM(model, kv_cache_tokens=512, **kw)
    return llm, [(o.prompt_token_ids, o.outputs[0].token_ids, o.outputs[0].text)
                 for o in llm.generate(PROMPTS, PARAMS)]


def test_cache_hit_runs_as_the_directory(cache, dirs):
    llm, ours = _run("org/tiny")
    assert ours == _run(str(dirs["main"]))[1]
    assert llm.engine.model_config.name == "tiny"      # the repository's, not the commit's
    config, path = resolve_model("org/tiny")
    assert repo_id_of(path) == "org/tiny" and path.endswith(MAIN)


@pytest.mark.parametrize("revision", ["v2", V2])
def test_revision_picks_the_snapshot(cache, dirs, revision):
    """A tag and a commit hash reach the same snapshot, whose weights differ from main's."""
    ours = _run("org/tiny", revision=revision)[1]
    assert ours == _run(str(dirs["v2"]))[1]
    assert ours != _run("org/tiny")[1]


def test_text_engine_from_model_takes_revision_and_tokenizer(cache, dirs):
    from nanorun.text_engine import TextEngine

    te = TextEngine.from_model("org/tiny", revision="v2", tokenizer="org/sp-tokenizer",
                               kv_cache_tokens=512)
    assert te.engine.model_config.name == "tiny"
    te.add_request("a", {"prompt_token_ids": [1, 20, 30, 40]}, PARAMS)
    done = []
    while te.has_unfinished_requests():
        done += [o for o in te.step() if o.finished]
    v2 = LLM(str(dirs["v2"]), kv_cache_tokens=512).generate(
        [{"prompt_token_ids": [1, 20, 30, 40]}], PARAMS)[0]
    assert done[0].outputs[0].token_ids == v2.outputs[0].token_ids
    sp = LLM(str(dirs["sp"]), kv_cache_tokens=512, weights="random").get_tokenizer()
    assert te.tokenizer.encode("hello world") == sp.encode("hello world")


def test_tokenizer_from_another_hub_id(cache, dirs):
    """tokenizer= names another model's tokenizer (vLLM's argument), here by Hub id."""
    llm = LLM("org/tiny", tokenizer="org/sp-tokenizer", kv_cache_tokens=512,
              weights="random")
    sp = LLM(str(dirs["sp"]), kv_cache_tokens=512, weights="random").get_tokenizer()
    assert llm.get_tokenizer().encode("hello world") == sp.encode("hello world")


def test_missing_files_are_named(tmp_path, monkeypatch, dirs):
    cache = tmp_path / "hub"
    cache_snapshot(cache, "org/partial", dirs["main"], MAIN, skip=("model.safetensors",))
    offline_hub(monkeypatch, cache)
    with pytest.raises(UnknownModelError, match=r"'org/partial' lacks model\.safetensors"):
        LLM("org/partial")


def test_offline_with_nothing_cached_names_the_id(tmp_path, monkeypatch):
    offline_hub(monkeypatch, tmp_path / "empty")
    with pytest.raises(UnknownModelError, match=r"'org/absent'.*HF_HUB_OFFLINE=1"):
        LLM("org/absent")
    with pytest.raises(UnknownModelError, match=r"'org/tiny' at revision 'v9'"):
        resolve_model("org/tiny", revision="v9")


def test_revision_is_for_hub_ids_only(dirs):
    with pytest.raises(ValueError, match="revision='v2' is for Hugging Face Hub ids"):
        LLM(str(dirs["main"]), revision="v2")


def test_downloads_only_what_nanorun_reads(monkeypatch, tmp_path):
    """snapshot_download is asked for config, tokenizer and safetensors files only, never
    another copy of the weights (consolidated.safetensors) nor *.bin / *.gguf."""
    from fnmatch import fnmatch

    import huggingface_hub

    asked = {}
    not_found = type("RepositoryNotFoundError", (OSError,), {})   # as huggingface_hub names it

    def fake(repo_id, revision=None, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, revision=revision, patterns=allow_patterns)
        raise not_found("404")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    with pytest.raises(UnknownModelError, match="'org/x' is not a model on the Hugging Face Hub"):
        resolve_model("org/x", revision="r1")
    assert asked["repo_id"] == "org/x" and asked["revision"] == "r1"
    wanted = ["config.json", "model.safetensors", "model-00001-of-00002.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "generation_config.json"]
    unwanted = ["consolidated.safetensors", "pytorch_model.bin", "model.Q4_0.gguf",
                "original/params.json"]
    assert all(any(fnmatch(f, p) for p in asked["patterns"]) for f in wanted)
    assert not any(fnmatch(f, p) for f in unwanted for p in asked["patterns"])
    assert set(MODEL_FILES) <= set(asked["patterns"])


def test_generate_command_takes_a_hub_id(cache, capsys):
    assert main(["generate", "org/tiny", "--revision", "v2", "--num-prompts", "2",
                 "--prompt-len", "4", "--max-tokens", "2"]) == 0
    assert "model tiny on cpu" in capsys.readouterr().out
