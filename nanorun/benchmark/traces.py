"""Request traces: how long each prompt and each output is, and, for some, when each arrived.

A throughput figure is only comparable with another one if the workload is the same, so the
benchmark runs on published traces shipped with the package (see traces/README.md for their
sources and licences), on any CSV of the same shape, or on constant lengths:

    load_trace("azure-conv", num_requests=200, length_filter=NANOFLOW_FILTER)
    load_trace("path/to/my_trace.csv")
    load_trace("const:1024x512", num_requests=64)

Which rows: a trace of N requests is a contiguous window of N rows of the filtered trace, and
the seed picks where the window starts. A window keeps the trace's own arrival process (its rate
and its bursts) intact, where a random sample would thin it (200 rows sampled from the hour-long
Azure trace would arrive one every 18 s); the seed makes a different window, reproducibly.
"""

from __future__ import annotations

import csv
import functools
import io
import numbers
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources

import numpy as np

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
NO_TIMESTAMP = "XXX"
_CONST_PREFIX = "const:"


@dataclass(frozen=True)
class _TraceFile:
    filename: str
    source: str


# Attribution lines as traces/README.md gives them.
TRACES: dict[str, _TraceFile] = {
    "azure-code": _TraceFile(
        "azure_code_2023.csv", "Azure LLM inference trace 2023 (code), Azure/AzurePublicDataset, "
        "CC-BY-4.0; used by the Splitwise paper"),
    "azure-conv": _TraceFile(
        "azure_conv_2023.csv", "Azure LLM inference trace 2023 (conversation), "
        "Azure/AzurePublicDataset, CC-BY-4.0; the \"Splitwise\" trace of the NanoFlow paper"),
    "sharegpt": _TraceFile(
        "sharegpt_lengths.csv", "ShareGPT lengths as published with efeslab/Nanoflow (Apache-2.0)"),
    "lmsys": _TraceFile(
        "lmsys_chat_lengths.csv",
        "LMSYS-Chat-1M lengths as published with efeslab/Nanoflow (Apache-2.0)"),
}


@dataclass(frozen=True)
class LengthFilter:
    """Keep a request only if prompt <= max_prompt, output <= max_output and their sum <=
    max_total (all in tokens)."""

    max_prompt: int
    max_output: int
    max_total: int

    def __post_init__(self) -> None:
        for name in ("max_prompt", "max_output", "max_total"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"LengthFilter.{name} must be a positive int, got {value!r}")

    def keeps(self, prompt_lens: np.ndarray, output_lens: np.ndarray) -> np.ndarray:
        """[N] bool: which requests pass."""
        return ((prompt_lens <= self.max_prompt) & (output_lens <= self.max_output)
                & (prompt_lens + output_lens <= self.max_total))

    def __str__(self) -> str:
        return (f"prompt <= {self.max_prompt}, output <= {self.max_output}, "
                f"prompt + output <= {self.max_total}")


NANOFLOW_FILTER = LengthFilter(3072, 1024, 4096)


def parse_length_filter(text: str) -> LengthFilter | None:
    """The command-line form: "nanoflow", "P,O,T" (max prompt, output, total) or "none"."""
    t = text.strip().lower()
    if t == "nanoflow":
        return NANOFLOW_FILTER
    if t == "none":
        return None
    parts = t.split(",")
    try:
        if len(parts) != 3:
            raise ValueError
        return LengthFilter(*(int(p) for p in parts))
    except ValueError:
        raise ValueError(f"length filter {text!r}: use 'nanoflow' (prompt <= 3072, output <= "
                         f"1024, sum <= 4096), 'none', or three positive ints "
                         f"'MAX_PROMPT,MAX_OUTPUT,MAX_TOTAL'") from None


@dataclass(frozen=True, eq=False)
class Trace:
    """A workload: one row per request, in arrival order.

    prompt_lens, output_lens: [N] int64 token counts (each >= 1). arrivals: [N] float64 seconds
    since the first request (non-decreasing, arrivals[0] == 0), or None when the trace has no
    timestamps. source: the attribution line. The arrays are read-only.
    """

    name: str
    prompt_lens: np.ndarray
    output_lens: np.ndarray
    arrivals: np.ndarray | None
    source: str

    def __post_init__(self) -> None:
        prompt = _frozen_array(self.prompt_lens, np.int64)
        output = _frozen_array(self.output_lens, np.int64)
        if prompt.ndim != 1 or prompt.shape != output.shape:
            raise ValueError(f"trace {self.name!r}: prompt_lens and output_lens must be 1-D and "
                             f"of one length, got shapes {prompt.shape} and {output.shape}")
        if prompt.size and min(prompt.min(), output.min()) < 1:
            raise ValueError(f"trace {self.name!r}: every prompt and output needs at least one "
                             f"token")
        object.__setattr__(self, "prompt_lens", prompt)
        object.__setattr__(self, "output_lens", output)
        if self.arrivals is not None:
            arrivals = _frozen_array(self.arrivals, np.float64)
            if arrivals.shape != prompt.shape:
                raise ValueError(f"trace {self.name!r}: arrivals has shape {arrivals.shape}, "
                                 f"expected {prompt.shape}")
            object.__setattr__(self, "arrivals", arrivals)

    def __len__(self) -> int:
        return len(self.prompt_lens)


def load_trace(
    spec: str | os.PathLike,
    *,
    num_requests: int | None = None,
    seed: int = 0,
    length_filter: LengthFilter | None = None,
) -> Trace:
    """A trace by name, CSV path or "const:PxO".

    spec: one of TRACES ("azure-conv", "azure-code", "sharegpt", "lmsys"); a CSV file with the
        columns TIMESTAMP,ContextTokens,GeneratedTokens (TIMESTAMP "XXX" everywhere when there
        are no arrival times); or "const:PxO", num_requests requests of P prompt and O output
        tokens (no arrival times).
    num_requests: how many requests; None takes the whole filtered trace. From a file: a
        contiguous window of the filtered rows whose start the seed picks (module docstring).
    length_filter: requests outside it are dropped before the window is taken.

    Raises ValueError for an unknown spec, a malformed file, or too few rows left.
    """
    _check_count(num_requests)
    spec = os.fspath(spec)
    if spec.startswith(_CONST_PREFIX):
        return _const_trace(spec, num_requests, length_filter)
    if spec in TRACES:
        prompt, output, arrivals = _named_columns(spec)
        source = TRACES[spec].source
        name = spec
    elif os.path.isfile(spec):
        with open(spec, newline="", encoding="utf-8") as f:
            prompt, output, arrivals = _read_columns(f, os.path.basename(spec))
        name = os.path.splitext(os.path.basename(spec))[0]
        source = f"user CSV {os.path.basename(spec)}"
    elif spec.lower().endswith(".csv") or os.sep in spec:
        raise ValueError(f"trace file {spec} does not exist; give the path of a CSV with "
                         f"columns {','.join(COLUMNS)}, a trace name ({', '.join(TRACES)}) "
                         f"or 'const:PxO'")
    else:
        raise ValueError(f"unknown trace {spec!r}: use a name ({', '.join(TRACES)}), the path "
                         f"of a CSV with columns {','.join(COLUMNS)}, or 'const:PxO' "
                         f"(e.g. const:1024x512)")
    if length_filter is not None:
        keep = length_filter.keeps(prompt, output)
        prompt, output = prompt[keep], output[keep]
        arrivals = arrivals[keep] if arrivals is not None else None
    window = _window(len(prompt), num_requests, seed, name, length_filter)
    prompt, output = prompt[window], output[window]
    if arrivals is not None:
        arrivals = arrivals[window] - arrivals[window][0]
    return Trace(name, prompt, output, arrivals, source)


def _check_count(num_requests: int | None) -> None:
    if num_requests is None:
        return
    if (isinstance(num_requests, bool) or not isinstance(num_requests, numbers.Integral)
            or num_requests <= 0):
        raise ValueError(f"num_requests must be a positive int or None, got {num_requests!r}")


def _const_trace(spec: str, num_requests: int | None, length_filter: LengthFilter | None):
    body = spec[len(_CONST_PREFIX):]
    try:
        p, o = (int(x) for x in body.lower().split("x"))
        if p < 1 or o < 1:
            raise ValueError
    except ValueError:
        raise ValueError(f"trace {spec!r}: the constant form is 'const:PxO' with P prompt and O "
                         f"output tokens, both >= 1 (e.g. const:1024x512)") from None
    if num_requests is None:
        raise ValueError(f"trace {spec!r} needs num_requests (how many copies to make)")
    prompt, output = np.full(num_requests, p), np.full(num_requests, o)
    if length_filter is not None and not length_filter.keeps(prompt[:1], output[:1])[0]:
        raise ValueError(f"trace {spec!r} is outside the length filter ({length_filter}); "
                         f"drop the filter or change the lengths")
    return Trace(spec, prompt, output, None, f"constant lengths: {p} prompt, {o} output tokens")


def _window(num_rows: int, num_requests: int | None, seed: int, name: str,
            length_filter: LengthFilter | None) -> slice:
    after = f" after the filter ({length_filter})" if length_filter is not None else ""
    if num_rows == 0:
        raise ValueError(f"no request of trace {name!r} is left{after}; loosen the filter")
    if num_requests is None:
        return slice(0, num_rows)
    if num_requests > num_rows:
        raise ValueError(f"trace {name!r} has {num_rows} requests{after}; ask for at most that "
                         f"many (got num_requests={num_requests})")
    start = int(np.random.default_rng(seed).integers(0, num_rows - num_requests + 1))
    return slice(start, start + num_requests)


@functools.lru_cache(maxsize=None)
def _named_columns(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The shipped files never change, so each is parsed once per process."""
    filename = TRACES[name].filename
    text = resources.files(__package__).joinpath("traces", filename).read_text(encoding="utf-8")
    return _read_columns(io.StringIO(text, newline=""), filename)


def _read_columns(f, label: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(prompt_lens, output_lens, arrival seconds since the first row or None), read-only."""
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(f"{label}: missing column(s) {missing}; a trace CSV has the header "
                         f"{','.join(COLUMNS)}")
    prompt, output, stamps = [], [], []
    for line, row in enumerate(reader, start=2):
        try:
            p, o = int(row["ContextTokens"]), int(row["GeneratedTokens"])
        except (TypeError, ValueError):
            raise ValueError(f"{label} line {line}: ContextTokens and GeneratedTokens must be "
                             f"integers, got {row['ContextTokens']!r}, "
                             f"{row['GeneratedTokens']!r}") from None
        if p < 1 or o < 1:
            raise ValueError(f"{label} line {line}: prompt and output need at least one token, "
                             f"got {p} and {o}")
        prompt.append(p)
        output.append(o)
        stamps.append(row["TIMESTAMP"])
    if not prompt:
        raise ValueError(f"{label} holds no requests")
    return (_frozen_array(prompt, np.int64), _frozen_array(output, np.int64),
            _arrivals(stamps, label))


def _arrivals(stamps: list[str], label: str) -> np.ndarray | None:
    untimed = [s == NO_TIMESTAMP for s in stamps]
    if all(untimed):
        return None
    if any(untimed):
        line = untimed.index(True) + 2
        raise ValueError(f"{label} line {line}: TIMESTAMP is {NO_TIMESTAMP} but other rows have "
                         f"times; give every row a time or none")
    seconds = np.array([_parse_time(s, label, i + 2) for i, s in enumerate(stamps)])
    seconds -= seconds[0]
    back = np.flatnonzero(np.diff(seconds) < 0)
    if back.size:
        raise ValueError(f"{label} line {back[0] + 3}: timestamps go backwards; sort the file "
                         f"by TIMESTAMP")
    return _frozen_array(seconds, np.float64)


def _parse_time(stamp: str, label: str, line: int) -> float:
    # Azure writes 7 fractional digits; fromisoformat takes at most 6, hence the cut to 26.
    # A time without a zone is read as UTC, so that no daylight-saving shift enters the gaps.
    try:
        t = datetime.fromisoformat(stamp.strip()[:26])
    except ValueError:
        raise ValueError(f"{label} line {line}: TIMESTAMP {stamp!r} is neither an ISO date-time "
                         f"(e.g. 2023-11-16 18:17:03.979960) nor {NO_TIMESTAMP}") from None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


def _frozen_array(values, dtype) -> np.ndarray:
    a = np.array(values, dtype=dtype)
    a.setflags(write=False)
    return a
