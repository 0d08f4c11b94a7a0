"""Turn a kernel .cu file into host C++ for the emulator (cuda/emulator/kernel_emulator.h).

    python cuda/emulator/hostify.py SRC.cu OUT.cpp

The only change: each launch statement `KERNEL<<<CONFIG>>>(ARGS);` becomes
`::nanorun::emulator::launch([&] { KERNEL(ARGS); }, CONFIG);`, and kernel_emulator.h is
included first. Everything else (the kernels, the launchers' grid arithmetic and dispatch) is
compiled as written, so the emulator runs the code the GPU would, launcher included.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LAUNCH = re.compile(r"<<<(.*?)>>>", re.S)
HEADER = '#include "kernel_emulator.h"  // hostify.py: CUDA built-ins on the CPU\n'


def hostify(source: str) -> str:
    out, pos = [], 0
    for m in LAUNCH.finditer(source):
        # The kernel expression starts where the statement does.
        start = max(source.rfind(c, 0, m.start()) for c in ";{}") + 1
        kernel = source[start:m.start()].strip()
        open_paren = _skip_space(source, m.end())
        if source[open_paren] != "(":
            raise ValueError(f"a launch of {kernel!r} without an argument list")
        close = _matching(source, open_paren)
        if not source[_skip_space(source, close + 1)] == ";":
            raise ValueError(f"the launch of {kernel!r} is not a statement of its own")
        lead = re.match(r"\s*", source[start:]).group(0)
        args = source[open_paren + 1:close]
        out.append(source[pos:start] + lead
                   + f"::nanorun::emulator::launch([&] {{ {kernel}({args}); }}, {m.group(1)})")
        pos = close + 1
    if not out:
        raise ValueError("no <<<...>>> launch found")
    return HEADER + "".join(out) + source[pos:]


def _skip_space(s: str, i: int) -> int:
    while s[i].isspace():
        i += 1
    return i


def _matching(s: str, i: int) -> int:
    depth = 0
    for j in range(i, len(s)):
        depth += {"(": 1, ")": -1}.get(s[j], 0)
        if depth == 0:
            return j
    raise ValueError("unbalanced parentheses in a launch")


if __name__ == "__main__":
    src, dst = map(Path, sys.argv[1:3])
    dst.write_text(hostify(src.read_text()))
