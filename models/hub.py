"""Models named by their Hugging Face Hub id ("org/name"), through `huggingface_hub`.

`model_path` turns a model argument into a local path: a directory or file that exists is
itself; a Hub id becomes its snapshot directory in the Hugging Face cache, downloaded where it
is missing. The download is huggingface_hub's own `snapshot_download`, so its cache
(HF_HUB_CACHE / HF_HOME), HF_HUB_OFFLINE, HF_TOKEN (and a saved `hf auth login`) and its
progress bars work as in transformers; `allow_patterns` keeps it to the files nanorun reads.
"""

from __future__ import annotations

import json
import os
import re

from .config import UnknownModelError

# What nanorun reads of a model repository. model*.safetensors, not *.safetensors: Mistral's
# repositories hold the weights twice, also as consolidated.safetensors.
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors",
               "model-*.safetensors", "model.safetensors.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "additional_chat_templates/*.jinja",
                   "generation_config.json")
# A snapshot directory of the cache: <cache>/models--org--name/snapshots/<commit>.
_SNAPSHOT = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)[/\\]snapshots[/\\][^/\\]+$")


def looks_like_hub_id(model: str) -> bool:
    """ORG/NAME with no other path parts, not a path that exists."""
    parts = str(model).split("/")
    return (len(parts) == 2 and all(parts) and not os.path.exists(model)
            and not str(model).startswith((".", "~")))


def model_path(model: str, revision: str | None = None, *, tokenizer_only: bool = False) -> str:
    """A local path for `model`: itself where it exists, else a Hub id's snapshot directory
    holding what nanorun reads (only the tokenizer files with tokenizer_only). Anything else
    is returned as it is, for the caller to report. `revision` (a branch, tag or commit) is for
    Hub ids only."""
    model = os.fspath(model)
    if not looks_like_hub_id(model):
        if revision is not None:
            raise ValueError(f"revision={revision!r} is for Hugging Face Hub ids (org/name); "
                             f"{model!r} is a local path or a preset")
        return model
    return download(model, revision, tokenizer_only=tokenizer_only)


def download(repo_id: str, revision: str | None = None, *, tokenizer_only: bool = False) -> str:
    """The snapshot directory of `repo_id` at `revision` (default: main) in the Hugging Face
    cache, with the files nanorun reads; raises UnknownModelError saying what is wrong."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise UnknownModelError(f"{repo_id!r} looks like a Hugging Face Hub id; loading one needs "
                                f"huggingface_hub (pip install huggingface_hub)") from e
    patterns = list(TOKENIZER_FILES if tokenizer_only else MODEL_FILES + TOKENIZER_FILES)
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except Exception as e:     # huggingface_hub's errors differ between its versions
        raise UnknownModelError(_download_error(repo_id, revision, e)) from e
    if not tokenizer_only:
        _check_model_files(path, repo_id, revision)
    return path


def repo_id_of(path: str) -> str | None:
    """"org/name" where `path` is a snapshot directory of a Hugging Face cache, else None."""
    m = _SNAPSHOT.search(os.path.abspath(path))
    return f"{m['org']}/{m['name']}" if m else None


def _at(repo_id: str, revision: str | None) -> str:
    return f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _download_error(repo_id: str, revision: str | None, e: Exception) -> str:
    kind = type(e).__name__
    where = _at(repo_id, revision)
    if kind == "IncompleteSnapshotError":     # recent huggingface_hub checks the cached listing
        return f"the cached snapshot of {where} is incomplete: {e}"
    if kind == "LocalEntryNotFoundError" or (_offline() and isinstance(e, OSError)):
        from huggingface_hub import constants

        why = ("HF_HUB_OFFLINE=1 forbids downloading it" if _offline()
               else "the Hub cannot be reached to download it")
        return (f"{where} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}; "
                f"download it where the Hub is reachable (hf download {repo_id}), or pass a "
                f"local directory")
    if kind == "RevisionNotFoundError":
        return f"revision {revision!r} of {repo_id!r} does not exist on the Hugging Face Hub"
    if kind == "GatedRepoError":
        return (f"{repo_id!r} is gated on the Hugging Face Hub: accept its terms on its page, "
                f"then set HF_TOKEN (or run `hf auth login`)")
    if kind == "RepositoryNotFoundError":
        return (f"{repo_id!r} is not a model on the Hugging Face Hub (or it is private: set "
                f"HF_TOKEN, or run `hf auth login`)")
    if kind == "HFValidationError":
        return f"{repo_id!r} is not a valid Hugging Face Hub id: {e}"
    return f"could not get {where} from the Hugging Face Hub: {kind}: {e}"


def _check_model_files(path: str, repo_id: str, revision: str | None) -> None:
    """Say which file is missing, naming the model: a repository without them, or a cache
    filled only partly (offline, or by another tool's allow_patterns)."""
    missing = [f for f in ("config.json",) if not os.path.isfile(os.path.join(path, f))]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing += [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    elif not os.path.isfile(os.path.join(path, "model.safetensors")):
        missing.append("model.safetensors (or model.safetensors.index.json and its shards)")
    if missing:
        hint = (" (HF_HUB_OFFLINE=1: only what is cached is used)" if _offline() else
                "; nanorun reads Hugging Face safetensors checkpoints (for a GGUF repository, "
                "download one .gguf file and pass its path)")
        raise UnknownModelError(f"{_at(repo_id, revision)} lacks {', '.join(missing)} in "
                                f"{path}{hint}")
