"""Gantt chart of one layer's pipeline: a row per partition (stream), a bar per launch."""

from __future__ import annotations

from pathlib import Path

from nanorun.layout import Layout
from nanorun.models import ATTENTION, GEMM, MEMORY, NETWORK

from .simulate import Schedule

KIND_COLOURS = {GEMM: "#4C72B0", ATTENTION: "#DD8452", MEMORY: "#8C8C8C", NETWORK: "#55A868"}


def gantt(schedule: Schedule, layout: Layout, kinds: dict[str, str], path: str | Path, *,
          layer: int | None = None, title: str = "", device=None) -> Path:
    """Draw `layer`'s launches (default: a middle layer, where the pipeline is in steady state)
    and the launches of other layers that run at the same time, greyed, to `path`. `device`
    (a DeviceSpec) lets the picture say how many of its SMs the partitions take, and why."""
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
    fig, ax = plt.subplots(figsize=(12, 2.2 + 0.9 * plan.num_streams))
    for i, launch in enumerate(plan.launches):
        s, e = schedule.start[i], schedule.end[i]
        if e < t0 or s > t1:
            continue
        ours = launch.layer == layer
        colour = KIND_COLOURS.get(kinds.get(launch.op, MEMORY), "#8C8C8C")
        ax.barh(launch.stream, (e - s) * 1e6, left=(s - t0) * 1e6, height=0.6,
                color=colour if ours else "#DDDDDD", edgecolor="black", linewidth=0.4)
        if ours:
            _label(ax, launch, (s - t0) * 1e6, (e - t0) * 1e6, (t1 - t0) * 1e6, kinds)
    labels = [f"{p.name} ({p.sm_count} SMs)" if p.sm_count else p.name
              for p in layout.partitions]
    ax.set_yticks(range(plan.num_streams), labels)
    ax.set_ylim(plan.num_streams - 0.4, -0.9)     # inverted, with room for small ops' labels
    ax.set_xlabel(f"microseconds from the start of layer {layer} "
                  f"(other layers' launches in grey)" + _sm_note(layout, device))
    ax.set_xlim(0, (t1 - t0) * 1e6)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOURS.values()]
    # Below the axes, so that it covers no bar.
    ax.legend(handles, list(KIND_COLOURS), loc="upper center", bbox_to_anchor=(0.5, -0.32),
              fontsize=7, ncol=len(KIND_COLOURS), frameon=False)
    ax.set_title(title or f"layout {layout.name!r}: layer {layer}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(ax, launch, start: float, end: float, span: float, kinds: dict[str, str]) -> None:
    """The op's name inside its bar when it fits, else small and slanted above it."""
    text = f"{launch.op}[{launch.nano_batch}]"
    if end - start > 0.04 * span:
        ax.text((start + end) / 2, launch.stream, text, ha="center", va="center", fontsize=7,
                color="white" if kinds.get(launch.op) in ("gemm", "network") else "black")
    else:
        ax.text((start + end) / 2, launch.stream - 0.33, text, ha="left", va="bottom",
                fontsize=6, rotation=45)


def _sm_note(layout: Layout, device) -> str:
    if device is None or not device.sm_count:
        return ""
    used = sum(p.sm_count or 0 for p in layout.partitions)
    if not used or used == device.sm_count:
        return ""
    note = f"\npartitions take {used} of {device.name}'s {device.sm_count} SMs"
    if device.sm_count - used < device.sm_granularity:
        note += (f": they come in steps of {device.sm_granularity}, and the "
                 f"{device.sm_count - used} left over make no step")
    return note
