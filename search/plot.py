"""Gantt chart of one layer's pipeline: a row per partition (stream), a bar per launch."""

from __future__ import annotations

from pathlib import Path

from nanorun.layout import Layout

from .simulate import Schedule

KIND_COLOURS = {"gemm": "#4C72B0", "attention": "#DD8452", "memory": "#8C8C8C",
                "network": "#55A868"}


def gantt(schedule: Schedule, layout: Layout, kinds: dict[str, str], path: str | Path, *,
          layer: int | None = None, title: str = "") -> Path:
    """Draw `layer`'s launches (default: a middle layer, where the pipeline is in steady state)
    and the launches of other layers that run at the same time, greyed, to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = schedule.plan
    layers = sorted({launch.layer for launch in plan.launches if launch.layer >= 0})
    if layer is None:
        layer = layers[len(layers) // 2] if layers else -1
    mine = [i for i, launch in enumerate(plan.launches) if launch.layer == layer]
    if not mine:
        raise ValueError(f"the plan has no launches of layer {layer}")
    t0 = min(schedule.start[i] for i in mine)
    t1 = max(schedule.end[i] for i in mine)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * plan.num_streams))
    for i, launch in enumerate(plan.launches):
        s, e = schedule.start[i], schedule.end[i]
        if e < t0 or s > t1:
            continue
        ours = launch.layer == layer
        colour = KIND_COLOURS.get(kinds.get(launch.op, "memory"), "#8C8C8C")
        ax.barh(launch.stream, (e - s) * 1e6, left=(s - t0) * 1e6, height=0.6,
                color=colour if ours else "#DDDDDD", edgecolor="black", linewidth=0.4)
        if ours and (e - s) > 0.04 * (t1 - t0):
            ax.text((s + e) / 2 * 1e6 - t0 * 1e6, launch.stream,
                    f"{launch.op}[{launch.nano_batch}]", ha="center", va="center", fontsize=7,
                    color="white" if kinds.get(launch.op) in ("gemm", "network") else "black")
    labels = [f"{p.name} ({p.sm_count} SMs)" if p.sm_count else p.name
              for p in layout.partitions]
    ax.set_yticks(range(plan.num_streams), labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"microseconds from the start of layer {layer} "
                  f"(other layers' launches in grey)")
    ax.set_xlim(0, (t1 - t0) * 1e6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    ax.legend(handles, list(KIND_COLOURS), loc="upper right", fontsize=7, ncol=4)
    ax.set_title(title or f"layout {layout.name!r}: layer {layer}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
