"""Draws a MemoryTimeline (`hm.report(model).plot(path)`). matplotlib is optional: it is
imported here, on first use, and drawn through the Agg canvas directly, so no interactive
backend is ever selected and pyplot's global state is left alone.
"""

from __future__ import annotations

import os

from heteromem.memory.timeline import MemoryTimeline

_UNITS = (("B", 1), ("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40))
_STALL_COLORS = {"copy": "tab:orange", "update": "tab:red", "nvme": "tab:purple"}


def _unit(largest: float) -> tuple[str, int]:
    name, scale = _UNITS[0]
    for name_, scale_ in _UNITS:
        if largest >= scale_:
            name, scale = name_, scale_
    return name, scale


def _merged(stalls: list[tuple[float, float, str]]) -> dict[str, list[tuple[float, float]]]:
    """Stall intervals per kind with overlapping ones joined (fewer patches to draw)."""
    out: dict[str, list[tuple[float, float]]] = {}
    for start, end, what in sorted(stalls, key=lambda s: s[0]):
        spans = out.setdefault(what, [])
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        else:
            spans.append((start, end))
    return out


def plot_timeline(timeline: MemoryTimeline, budgets: dict[str, int | None],
                  path: str | os.PathLike, *, title: str | None = None) -> str | os.PathLike:
    """One panel per tier: reserved bytes over the iteration (ms), the budget dashed where
    bounded, stalls shaded, phase starts as dotted lines. Writes `path` and returns it."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("Report.plot needs matplotlib, which is not installed here: "
                          "pip install matplotlib (or pip install 'heteromem[plot]'), "
                          "then call plot again") from exc

    names = list(timeline.tiers)
    fig = Figure(figsize=(9, 1.2 + 2.0 * len(names)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 1, sharex=True, squeeze=False)[:, 0]
    stalls = _merged(timeline.stalls)
    end_ms = timeline.duration * 1e3
    for ax, name in zip(axes, names):
        points = timeline.tiers[name]
        budget = budgets.get(name)
        unit, scale = _unit(max([b for _, b in points] + [budget or 0, 1]))
        ax.step([t * 1e3 for t, _ in points], [b / scale for _, b in points], where="post",
                color="tab:blue", label="reserved")
        if budget is not None:
            ax.axhline(budget / scale, color="black", linestyle="--", linewidth=1, label="budget")
        for what, spans in stalls.items():
            for i, (start, end) in enumerate(spans):
                ax.axvspan(start * 1e3, end * 1e3, color=_STALL_COLORS.get(what, "tab:gray"),
                           alpha=0.3, linewidth=0, label=f"stall: {what}" if i == 0 else None)
        for t, phase in timeline.phases:
            ax.axvline(t * 1e3, color="gray", linestyle=":", linewidth=1)
            if ax is axes[0]:
                ax.annotate(phase, (t * 1e3, 1.0), xycoords=("data", "axes fraction"),
                            xytext=(2, -2), textcoords="offset points", va="top", fontsize=8,
                            color="dimgray", bbox=dict(facecolor="white", edgecolor="none",
                                                       alpha=0.8, pad=1))
        ax.set_ylim(bottom=0)
        ax.set_xlim(0, max(end_ms, 1e-3))
        ax.set_ylabel(f"{name} ({unit})")
        ax.legend(loc="lower right", fontsize=8)
    axes[-1].set_xlabel("time since the iteration began (ms)")
    fig.suptitle(title if title is not None else
                 f"heteromem memory timeline: one iteration, {end_ms:.1f} ms")
    fig.savefig(path)
    return path
