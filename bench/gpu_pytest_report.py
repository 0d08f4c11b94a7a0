"""A pytest plugin for the GPU session: one JSON line per finished test, written as it finishes,
to $NANORUN_TEST_REPORT (loaded with `-p gpu_pytest_report`, bench/ on PYTHONPATH).

pytest's junit XML is written only when the whole run ends, so a run stopped at its cap would
leave nothing; these lines survive the kill. Each holds the test's id, outcome, seconds, a
short failure message, and the lines it printed starting "[nanorun gpu]" (the facts the GPU
tests report: SMs granted, overlap intervals, replay differences).
"""

from __future__ import annotations

import json
import os

FACT = "[nanorun gpu]"


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("NANORUN_TEST_REPORT")
    # One line per test: its call phase, or the setup phase when that failed or skipped it.
    if not path or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    outcome = report.outcome if report.when == "call" or report.skipped else "error"
    message = ""
    if report.failed:
        message = str(report.longrepr).strip().splitlines()[-1][:500]
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])[:200]
    facts = [line.strip() for line in (report.capstdout or "").splitlines() if FACT in line]
    line = {"nodeid": report.nodeid, "outcome": outcome, "seconds": round(report.duration, 3),
            "message": message, "facts": facts}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
