"""What a result was measured on: the device, the library versions and the nanorun commit.

Only names and versions go into a report, never a path of this machine. The commit is the one
of the checkout nanorun is imported from, and only when that checkout really holds this
package (a wheel installed inside some other repository reports None, not that repository's
commit); `git_dirty` says whether the measured tree had uncommitted changes.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import nanorun


def write_result(doc: dict, out: str | os.PathLike, *, device: torch.device | str | None = None,
                 argv: list[str] | None = None, indent: int = 1) -> dict:
    """A benchmark's result as JSON at `out` (its folder made if need be), with provenance.

    Unless `doc` has them already, "command" (the command line that made it, as command_line
    writes it: no path of this machine) and "environment" (describe(device): the device, the
    versions, the commit and the date; device defaults to the CPU) go first. NaN and infinity
    are refused: a committed result must be JSON that every reader parses. The file is whole or
    not there: written aside and renamed, so a run killed mid-write (a capped GPU step) leaves
    the previous one. Returns what was written.
    """
    stamped = {"command": doc.get("command") or command_line(argv),
               "environment": doc.get("environment") or describe(torch.device(device or "cpu")),
               **doc}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(stamped, indent=indent, allow_nan=False) + "\n")
    part.replace(path)
    return stamped


def describe(device: torch.device) -> dict:
    """Device, versions, commit and date, as JSON-ready values."""
    commit, dirty = git_commit()
    return {
        "device": device_name(device),
        "device_type": device.type,
        "driver_version": driver_version() if device.type == "cuda" else None,
        "cuda_version": torch.version.cuda,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "nanorun_version": nanorun.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command that made a result, as anyone could type it again: "python" and the
    arguments, with an absolute path made relative to the working directory when inside it
    and cut to its file name when not (a machine's own directories stay out of reports)."""
    cwd = os.getcwd()

    def portable(path: str) -> str:
        if not os.path.isabs(path):
            return path
        inside = os.path.commonpath([cwd, os.path.abspath(path)]) == cwd
        return os.path.relpath(path, cwd) if inside else os.path.basename(path)

    words = []
    for arg in sys.argv if argv is None else argv:
        flag, eq, value = arg.partition("=")
        arg = f"{flag}={portable(value)}" if eq and flag.startswith("-") else portable(arg)
        words.append(shlex.quote(arg))
    return " ".join(["python", *words])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()})"


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD of the checkout holding the imported nanorun, whether its tracked files differ
    from HEAD); outside such a checkout (a tree copied to a GPU machine without .git),
    ($NANORUN_COMMIT, None) or (None, None)."""
    package = os.path.dirname(os.path.abspath(nanorun.__file__))
    top = _git(package, "rev-parse", "--show-toplevel")
    if top is None or not _same_file(os.path.join(top, "nanorun", "__init__.py"),
                                     nanorun.__file__):
        return os.environ.get("NANORUN_COMMIT") or None, None
    commit = _git(top, "rev-parse", "HEAD")
    status = _git(top, "status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status) if status is not None else None)


def _git(cwd: str, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _cpu_model() -> str:
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
    return platform.processor() or platform.machine() or "unknown"


def driver_version() -> str | None:
    """The NVIDIA driver version, from nvidia-smi (torch does not expose it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None
