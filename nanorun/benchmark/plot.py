"""`nanorun bench --plot`: throughput and latency per layout, and latency against request rate.

Row one has a group of bars per layout (one bar per request rate), each with its value: total
tokens/s (with its ratio to sequential at the same rate; the optimal bound is a note in the
panel's title, since as a line it would flatten the bars below it), mean TTFT, mean TPOT. When several rates were run, row two
plots the same three against the request rate (a trace replay at the mean rate its timestamps
offered), one line per layout; offline runs have no rate to place and are left out there.
With several passes each bar is the median pass, with a whisker from the lowest pass to the
highest, and a throughput bar also gives the range of its ratio to sequential. The report's
warnings (one pass only, a ratio the passes do not resolve from 1.0) are written in red below
the panels. Drawn on a bare Agg figure, so no GUI backend or pyplot global state is involved.
"""

from __future__ import annotations

_PANELS = (
    ("total_token_throughput", "total tokens/s"),
    ("mean_ttft_ms", "mean TTFT (ms)"),
    ("mean_tpot_ms", "mean TPOT (ms)"),
)


def plot_report(report: dict, path: str) -> None:
    """Write the figure to `path` (the format follows its extension: .png, .svg, .pdf)."""
    draw_report(report).savefig(path, dpi=120)


def draw_report(report: dict):
    """The figure, as a matplotlib Figure."""
    from matplotlib.figure import Figure

    header, runs = report["nanorun"], report["runs"]
    several_rates = len(header["request_rates"]) > 1
    fig = Figure(figsize=(15, 9 if several_rates else 4.5), layout="constrained")
    axes = fig.subplots(2 if several_rates else 1, len(_PANELS), squeeze=False)
    for ax, (key, label) in zip(axes[0], _PANELS):
        _bars_per_layout(ax, runs, header, key, label)
    axes[0][0].set_title(f"optimal bound {header['optimal_tokens_per_s']:,.0f} tokens/s "
                         f"(GEMM rate / 2 x active params)", fontsize="small")
    if several_rates:
        for ax, (key, label) in zip(axes[1], _PANELS):
            _lines_against_rate(ax, runs, header["layouts"], key, label)
    fig.suptitle(f"{header['model']} on {header['device']}, trace {header['trace']} "
                 f"({header['num_requests']} requests, {header['repeats']} "
                 f"pass{'es' if header['repeats'] > 1 else ''})")
    if header["warnings"]:
        fig.supxlabel("\n".join(f"warning: {w}" for w in header["warnings"]), color="red",
                      fontsize="small", wrap=True)
    return fig


def _bars_per_layout(ax, runs: list[dict], header: dict, key: str, label: str) -> None:
    layouts, rates = header["layouts"], header["request_rates"]
    width = 0.8 / len(rates)
    for j, rate in enumerate(rates):
        xs, heights, lows, highs, labels = [], [], [], [], []
        base = _find(runs, "sequential", rate)
        for i, layout in enumerate(layouts):
            run = _find(runs, layout, rate)
            if run is not None and run[key] is not None:
                xs.append(i - 0.4 + width * (j + 0.5))
                heights.append(run[key])
                low, high = _whisker(run, key)
                lows.append(low)
                highs.append(high)
                labels.append(_value_label(run, key, base))
        whiskers = (lows, highs) if any(lows) or any(highs) else None
        ax.bar(xs, heights, width, yerr=whiskers, capsize=3, label=f"rate {rate}")
        for x, top, text in zip(xs, map(sum, zip(heights, highs)), labels):
            # Above the whisker, not the bar, so the two never overlap.
            ax.annotate(text, (x, top), xytext=(0, 2), textcoords="offset points",
                        ha="center", va="bottom", fontsize="x-small")
    ax.margins(y=0.25)                 # room for the labels above the tallest whisker
    ax.set_xticks(range(len(layouts)), layouts)
    ax.set_ylabel(label)
    if len(rates) > 1 and key != "total_token_throughput":
        ax.legend(fontsize="small")


def _value_label(run: dict, key: str, base: dict | None) -> str:
    """A bar's value; a throughput bar also says its ratio to sequential at the same rate (with
    several passes, the median of the paired ratios and their range, "?" when unresolved)."""
    value = run[key]
    text = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    if key != "total_token_throughput" or base is None or not base[key]:
        return text
    passes = run["nanorun"]["repeats"]
    ratios = passes["ratio_to_sequential"]
    if passes["ratio_resolved"] is None:        # sequential itself, or a single pass
        return text + f"\n{value / base[key]:.3f}x"
    mark = "?" if passes["ratio_resolved"] is False else ""
    return text + (f"\n{run['nanorun']['throughput_ratio_to_sequential']:.3f}x{mark}"
                   f"\n({ratios['min']:.2f}-{ratios['max']:.2f}x)")


def _lines_against_rate(ax, runs: list[dict], layouts: list[str], key: str, label: str) -> None:
    for layout in layouts:
        points = sorted((_rate(r), r[key], *_whisker(r, key)) for r in runs
                        if r["nanorun"]["layout"] == layout and r[key] is not None
                        and _rate(r) != "inf")
        if points:
            rates, values, lows, highs = zip(*points)
            ax.errorbar(rates, values, yerr=(lows, highs), marker="o", capsize=3,
                        label=layout)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(label)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def _whisker(run: dict, key: str) -> tuple[float, float]:
    """How far the lowest and the highest pass lie below and above the run's value."""
    passes = run["nanorun"]["repeats"][key]
    return (0.0, 0.0) if passes is None else (run[key] - passes["min"],
                                              passes["max"] - run[key])


def _rate(run: dict):
    """The asked rate; for a trace replay, the rate its timestamps offered."""
    rate = run["request_rate"]
    return run["nanorun"]["offered_rate"] if rate == "trace" else rate


def _find(runs: list[dict], layout: str, rate) -> dict | None:
    for run in runs:
        if run["nanorun"]["layout"] == layout and run["request_rate"] == rate:
            return run
    return None
