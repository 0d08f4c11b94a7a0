"""A Hugging Face Hub cache built on disk, laid out as huggingface_hub lays out its downloads:

    <cache>/models--<org>--<name>/blobs/<sha256>             the files' bytes
    <cache>/models--<org>--<name>/snapshots/<commit>/<file>  links to the blobs
    <cache>/models--<org>--<name>/refs/<branch or tag>       the commit it points at

`offline_hub(monkeypatch, cache)` points huggingface_hub at it with HF_HUB_OFFLINE on, and its
endpoint at a closed local port besides, so that no test can reach the network.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_snapshot(cache: Path, repo_id: str, src: Path, commit: str,
                   refs: tuple[str, ...] = ("main",), skip: tuple[str, ...] = ()) -> Path:
    """Put the files of directory `src` (but `skip`) into `cache` as snapshot `commit` of
    `repo_id`, with each of `refs` pointing at it; returns the snapshot directory."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name in skip or not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def offline_hub(monkeypatch, cache: Path) -> None:
    """huggingface_hub reads `cache`, with HF_HUB_OFFLINE=1 (its constants are read at import,
    so they are patched, not the environment)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
