"""The table `nanorun bench` prints at the end: one row per layout and request rate."""

from __future__ import annotations

_COLUMNS = (
    # (header, width, how to get the value from a run)
    ("layout", 12, lambda r: r["nanorun"]["layout"]),
    ("rate", 6, lambda r: str(r["request_rate"])),
    ("ok/fail", 8, lambda r: f"{r['completed']}/{r['failed']}"),
    ("req/s", 7, lambda r: f"{r['request_throughput']:.2f}"),
    ("out tok/s", 10, lambda r: f"{r['output_throughput']:,.0f}"),
    ("tot tok/s", 10, lambda r: f"{r['total_token_throughput']:,.0f}"),
    ("vs seq", 7, lambda r: _ratio(r["nanorun"]["throughput_ratio_to_sequential"])
     + ("?" if r["nanorun"]["repeats"]["ratio_resolved"] is False else "")),
    ("% opt", 6, lambda r: f"{r['nanorun']['percent_of_optimal']:.1f}"),
    ("hit %", 6, lambda r: percent(r.get("prefix_cache_hit_rate"))),
    ("TTFT ms", 9, lambda r: _ms(r["mean_ttft_ms"])),
    ("TPOT ms", 8, lambda r: _ms(r["mean_tpot_ms"])),
    ("ITL ms", 7, lambda r: _ms(r["mean_itl_ms"])),
    ("E2EL ms", 9, lambda r: _ms(r["mean_e2el_ms"])),
)


# With repeats: every pass's spread beside the median pass's figures.
_SPREAD_COLUMNS = (
    ("tok/s min", 10, lambda r: f"{_repeats(r)['total_token_throughput']['min']:,.0f}"),
    ("tok/s max", 10, lambda r: f"{_repeats(r)['total_token_throughput']['max']:,.0f}"),
    ("vs seq range", 13, lambda r: _ratio_range(_repeats(r)["ratio_to_sequential"])),
)

CPU_LABEL = ("CPU FIGURES: measured on this machine's CPU, with the CPU's own ceilings; they "
             "say how the engine runs here, nothing about a GPU")


def format_summary(report: dict) -> str:
    """The header facts, a table of every run (latencies are means; with repeats, the median
    pass's figures and every pass's range; "?" after a ratio the passes do not resolve from
    1.0) and the report's warnings."""
    h = report["nanorun"]
    repeats = h.get("repeats", 1)
    lines = [CPU_LABEL] if h["device_type"] == "cpu" else []
    lines += [
        f"nanorun bench: {h['model']} ({h['dtype']}, {h['weights']} weights) on {h['device']}, "
        f"dense batch {h['max_batch_tokens']} tokens",
        f"trace {h['trace']}: {h['num_requests']} requests, mean {h['mean_prompt_len']:.0f} "
        f"prompt / {h['mean_output_len']:.0f} output tokens, filter "
        f"{h['length_filter'] or 'none'}",
        *prefix_lines(h),
        f"measured on {h['ceilings_measured_on']}: GEMM {h['gemm_tflops']:.3g} TFLOP/s "
        f"({h['gemm_dtype']}), copy {h['copy_gbps']:.3g} GB/s; optimal bound "
        f"{h['optimal_tokens_per_s']:,.0f} tokens/s",
    ]
    if repeats > 1:
        lines.append(f"{repeats} passes over the layouts, interleaved; each row is its median "
                     f"pass (tot tok/s, vs seq: medians), beside the range over the passes")
    if h["num_skipped"]:
        lines.append(f"warning: skipped {h['num_skipped']} requests ({h['skip_reason']})")
    columns = list(_COLUMNS)
    if h["goodput_slo_ms"]:
        columns.insert(4, ("good/s", 7, lambda r: f"{r['request_goodput']:.2f}"))
    if repeats > 1:
        at = next(i for i, c in enumerate(columns) if c[0] == "vs seq") + 1
        columns[at:at] = _SPREAD_COLUMNS
    lines.append("  ".join(f"{name:>{w}}" for name, w, _ in columns))
    for run in report["runs"]:
        lines.append("  ".join(f"{get(run):>{w}}" for _, w, get in columns))
    failed = [e for run in report["runs"] for e in run["errors"] if e]
    if failed:
        lines.append(f"{len(failed)} failed requests; first reason: {failed[0]}")
    lines += [f"warning: {w}" for w in h["warnings"]]
    return "\n".join(lines)


def prefix_lines(h: dict) -> list[str]:
    """What the prompts share, where they share anything; and the hit-rate column's meaning."""
    p = h.get("prefixes") or {}
    shared = []
    if p.get("system_prompt_len"):
        shared.append(f"a {p['system_prompt_len']}-token system prompt in every prompt")
    if p.get("turns", 1) > 1:
        shared.append(f"{h['num_conversations']} conversations of {p['turns']} turns, each "
                      f"resending the conversation so far, mean think time "
                      f"{p['think_time_s']:g} s")
    if not shared:
        return []
    return ["prefixes: " + "; ".join(shared) + " (hit %: prompt tokens taken from the prefix "
            "cache)"]


def percent(value: float | None) -> str:
    """A share as a percentage for a table; "-" where unknown."""
    return "-" if value is None else f"{100 * value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _repeats(run: dict) -> dict:
    return run["nanorun"]["repeats"]


def _ratio_range(ratios: dict | None) -> str:
    return "-" if ratios is None else f"{ratios['min']:.2f}-{ratios['max']:.2f}x"
