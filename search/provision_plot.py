"""The picture of a `nanorun provision` run: per trace, each design's pools and what its
throughput costs."""

from __future__ import annotations

from pathlib import Path

POOL_COLOURS = {"prompt_machines": "#4C72B0", "token_machines": "#DD8452",
                "mixed_machines": "#8C8C8C"}


def plot_provision(doc: dict, path: str | Path) -> Path:
    """Two panels per trace: machines per design (stacked by pool, cost on top), and
    throughput per dollar and per kW relative to the first design that meets the SLOs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = doc["traces"]
    fig, axes = plt.subplots(len(traces), 2, figsize=(13, 4.2 * len(traces)), squeeze=False)
    for (ax_pool, ax_eff), t in zip(axes, traces):
        rows = t["designs"]
        names = [r["design"] for r in rows]
        x = range(len(rows))
        bottom = [0] * len(rows)
        for key, colour in POOL_COLOURS.items():
            counts = [r.get(key, 0) for r in rows]
            if any(counts):
                ax_pool.bar(x, counts, bottom=bottom, color=colour,
                            label=key.replace("_", " "))
                bottom = [b + c for b, c in zip(bottom, counts)]
        for i, r in enumerate(rows):
            label = f"${r['cost_per_hour']:.0f}/h\n{r['power_kw']:.0f} kW" \
                if r["meets_slos"] else "no fit"
            ax_pool.annotate(label, (i, bottom[i]), ha="center", va="bottom", fontsize=7)
        ax_pool.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
        ax_pool.set_ylabel("machines (8 GPUs each)")
        ax_pool.set_ylim(0, max(bottom + [1]) * 1.45)
        ax_pool.set_title(f"{t['trace']} at {t['rate_requests_per_s']:g} req/s: least-"
                          f"{doc['objective']} pools meeting the SLOs", fontsize=9)
        ax_pool.legend(fontsize=7, loc="upper right")

        base = next((r for r in rows if r["meets_slos"]), None)
        width = 0.38
        for k, (key, label) in enumerate((("tokens_per_dollar", "tokens per $"),
                                          ("tokens_per_s_per_kw", "tokens/s per kW"))):
            vals = [r[key] / base[key] if r["meets_slos"] and base else 0 for r in rows]
            ax_eff.bar([i + (k - 0.5) * width for i in x], vals, width, label=label)
        ax_eff.axhline(1.0, color="black", lw=0.6)
        ax_eff.set_xticks(list(x), names, rotation=25, ha="right", fontsize=8)
        ax_eff.set_ylabel(f"relative to {base['design'] if base else '-'}")
        ax_eff.set_title("throughput per cost and per power at this load", fontsize=9)
        ax_eff.legend(fontsize=7)
    fig.suptitle(f"nanorun provision: {doc['model']}, SLOs {doc['slos']}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
