"""Pictures of runs: loss (train and validation), learning rate, gradient norm and throughput
against the optimizer step, for one run or several overlaid.

Drawn on a bare `matplotlib.figure.Figure` (the Agg and SVG canvases, no pyplot), so no
global state changes and no window ever opens, in a training process or anywhere else. Points
that are missing or not finite (a diverged step's NaN) are left out; a run without
validation, a grad norm, or with a single step is drawn with what it has.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from tuneplex.errors import Problem, UsageError, first_line, needs_package
from tuneplex.runs.listing import CURVES_FILE, RunInfo, finite, read_run
from tuneplex.runs.records import METRICS_FILE

FORMATS = {".png": "png", ".svg": "svg"}
PANELS = (
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("tokens_per_s", "throughput (tokens/s)"),
)
"""The small panels under the loss: the train-event key each draws, and its title."""
REWARD_PANEL = ("reward", "reward (validation: dots)")
"""Drawn besides them when a run has rewards (reinforcement learning)."""
RAW_ALPHA = 0.28
DPI = 110
FEW_POINTS = 30
"""Up to this many points a curve is drawn with a dot at each, and throughput unclipped."""
Points = tuple[list[float], list[float]]


MARK = "tuneplex curves"
_SIGNATURE = {"png": {"Software": MARK}, "svg": {"Creator": MARK}}
"""Written into every picture, so that only a picture tuneplex drew is ever replaced."""


def _refuse_foreign(out: Path) -> None:
    """A user's own file at `out` (anything but a picture tuneplex drew) is never replaced."""
    if not out.exists() and not out.is_symlink():
        return
    ours = False
    if out.is_file() and not out.is_symlink():
        with out.open("rb") as fh:
            ours = MARK.encode() in fh.read(1 << 16)
    if not ours:
        raise UsageError(
            Problem(
                str(out),
                "exists and is not a picture tuneplex drew; it is kept: choose another -o "
                "(or remove it)",
            )
        )


def plot_run(run_dir: Path) -> Path:
    """Draw `run_dir/curves.png` (what every run does when it ends); returns its path."""
    return plot_runs([Path(run_dir)], Path(run_dir) / CURVES_FILE)


def plot_runs(run_dirs: Sequence[Path], out: Path, *, labels: Sequence[str] | None = None) -> Path:
    """Draw the runs' curves overlaid, one color per run, into `out` (.png or .svg); the
    legend names each run by `labels`, else by its directory name. Returns `out`."""
    out = Path(out)
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        shown = out.suffix or "no extension"
        raise UsageError(Problem(str(out), f"a picture must end in .png or .svg (got {shown})"))
    if not run_dirs:
        raise UsageError("no run to plot")
    if labels is not None and len(labels) != len(run_dirs):
        raise UsageError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [read_run(Path(d)) for d in run_dirs]
    names = list(labels) if labels is not None else _names([Path(d) for d in run_dirs])
    curves = [_Curves.of(run, name) for run, name in zip(runs, names, strict=True)]
    if not any(c.has_data for c in curves):
        where = str(Path(run_dirs[0]) / METRICS_FILE) if len(runs) == 1 else "runs"
        raise UsageError(Problem(where, "no finite metrics recorded yet; nothing to plot"))
    if find_spec("matplotlib") is None:
        raise needs_package("matplotlib")
    figure = _draw(curves, runs)
    if not out.parent.is_dir():
        raise UsageError(Problem(str(out), f"no such directory: {out.parent}"))
    _refuse_foreign(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(tmp, format=fmt, dpi=DPI, metadata=_SIGNATURE[fmt])
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(
            Problem(str(out), f"cannot write it ({exc.strerror or first_line(exc)})")
        ) from None
    return out


def _names(paths: list[Path]) -> list[str]:
    """Directory names, or the paths as given where two runs share a name."""
    names = [p.resolve().name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


@dataclass
class _Curves:
    name: str
    loss: Points
    val: Points
    panels: dict[str, Points]
    epoch_per_step: float | None
    not_finite: list[float]
    """Steps whose train loss is NaN or infinite (a diverged step)."""

    @classmethod
    def of(cls, run: RunInfo, name: str) -> _Curves:
        train = sorted(run.train_events, key=lambda e: e["step"])
        ratios = [
            e["epoch"] / e["step"]
            for e in train
            if finite(e.get("epoch")) and e["step"] > 0 and e["epoch"] > 0
        ]
        return cls(
            name=name,
            loss=_points(train, "loss"),
            val=_points(sorted(run.val_events, key=lambda e: e["step"]), "loss"),
            panels={key: _points(train, key) for key, _ in (*PANELS, REWARD_PANEL)}
            | {"val_reward": _points(sorted(run.val_events, key=lambda e: e["step"]), "reward")},
            epoch_per_step=ratios[-1] if ratios else None,
            not_finite=[float(e["step"]) for e in train if _not_finite(e.get("loss"))],
        )

    @property
    def has_data(self) -> bool:
        return bool(self.loss[0] or self.val[0] or any(p[0] for p in self.panels.values()))


def _not_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _points(events: list[dict[str, Any]], key: str) -> Points:
    xs, ys = [], []
    for e in events:
        y = finite(e.get(key))
        if y is not None:
            xs.append(float(e["step"]))
            ys.append(y)
    return xs, ys


def smooth(values: list[float]) -> list[float]:
    """A debiased exponential moving average (as TensorBoard draws) whose span grows with
    the run: ~1/25 of its points, at most 60; short runs are left as they are."""
    span = min(len(values) // 25, 60)
    if span < 2:
        return list(values)
    beta = 1 - 2 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = beta * avg + (1 - beta) * v
        weight = beta * weight + (1 - beta)
        out.append(avg / weight)
    return out


def _draw(curves: list[_Curves], runs: list[RunInfo]):
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    palette = colormaps["tab10"].colors
    colors = [palette[i % len(palette)] for i in range(len(curves))]
    panels = [*PANELS]
    if any(c.panels["reward"][0] for c in curves):
        panels.append(REWARD_PANEL)
    fig = Figure(figsize=(12 + 3 * (len(panels) - len(PANELS)), 7.6), layout="constrained")
    grid = fig.add_gridspec(2, len(panels), height_ratios=(1.7, 1))
    loss_ax = fig.add_subplot(grid[0, :])
    axes = [fig.add_subplot(grid[1, i], sharex=loss_ax) for i in range(len(panels))]
    styles = _loss_panel(loss_ax, curves, colors)
    _step_axis(loss_ax, curves)
    for ax, (key, title) in zip(axes, panels, strict=True):
        _small_panel(ax, key, title, curves, colors)
    runs_key = [
        (c.name, Line2D([], [], color=color, lw=3)) for c, color in zip(curves, colors, strict=True)
    ]
    entries = (runs_key if len(curves) > 1 else []) + styles
    title = _headline(curves[0].name, runs[0]) if len(curves) == 1 else None
    legend = fig.legend(
        [h for _, h in entries],
        [t for t, _ in entries],
        loc="outside upper center",
        ncols=min(len(entries), 6),
        frameon=False,
        fontsize=10,
        title=title,
        title_fontproperties={"size": 13, "weight": "bold"},
    )
    legend.get_title().set_ha("center")
    ratio = curves[0].epoch_per_step
    if len(curves) == 1 and ratio:
        top = loss_ax.secondary_xaxis("top", functions=(lambda s: s * ratio, lambda e: e / ratio))
        top.set_xlabel("epoch", fontsize=9, color="0.35")
        top.tick_params(labelsize=8, colors="0.35")
    return fig


def _step_axis(ax, curves: list[_Curves]) -> None:
    """Whole steps only; a run of one step gets a step either side of it."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    steps = [x for c in curves for x in (*c.loss[0], *c.val[0], *c.not_finite)]
    steps += [x for c in curves for p in c.panels.values() for x in p[0]]
    if steps and max(steps) - min(steps) < 2:
        ax.set_xlim(min(steps) - 1, max(steps) + 1)


def _headline(name: str, run: RunInfo) -> str:
    s = run.summary
    parts = [run.status]
    if s.get("backend"):
        parts.append(str(s["backend"]))
    steps, total = s.get("steps"), s.get("total_steps")
    if isinstance(steps, int):
        parts.append(f"{steps}/{total} steps" if isinstance(total, int) else f"{steps} steps")
    best = finite(s.get("best_val_loss"))
    if best is not None:
        parts.append(f"best val loss {best:.4f}")
    return f"{name}  ({', '.join(parts)})"


def _style(ax, title: str) -> None:
    ax.set_title(title, fontsize=11, loc="left")
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.tick_params(labelsize=9)
    ax.set_xlabel("optimizer step", fontsize=9)


def _nothing(ax, what: str) -> None:
    ax.set_yticks([])
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="0.5")


def _line(ax, xs, ys, *, color, **kw) -> None:
    """A line with a dot at each point while there are few (a line of one point is
    invisible; a run of a few steps shows where its steps are)."""
    few = len(xs) <= FEW_POINTS
    ax.plot(xs, ys, color=color, marker="o" if few else None, ms=4 if len(xs) > 1 else 6, **kw)


def _loss_panel(ax, curves: list[_Curves], colors) -> list[tuple[str, Any]]:
    """Draw the losses; returns the legend entries of the line styles used."""
    from matplotlib.lines import Line2D

    _style(ax, "loss")
    train_drawn = raw_drawn = val_drawn = bad_drawn = False
    for c, color in zip(curves, colors, strict=True):
        xs, ys = c.loss
        smoothed = smooth(ys)
        if xs and smoothed != ys:
            ax.plot(xs, ys, color=color, alpha=RAW_ALPHA, lw=0.8)
            raw_drawn = True
        if xs:
            _line(ax, xs, smoothed, color=color, lw=2)
            train_drawn = True
        if c.val[0]:
            ax.plot(*c.val, color=color, ls="--", lw=1.1, marker="o", ms=5, mec="white", mew=0.8)
            val_drawn = True
            _mark_best(ax, c.val, color, text=len(curves) == 1)
        if c.not_finite:  # along the top edge: no value to place them at
            top = ax.get_xaxis_transform()
            ax.plot(
                c.not_finite,
                [0.97] * len(c.not_finite),
                "x",
                color=color,
                ms=7,
                mew=2,
                transform=top,
                clip_on=False,
            )
            bad_drawn = True
    if not any(c.loss[0] or c.val[0] for c in curves):
        _nothing(ax, "no finite loss recorded")
        return []
    solid = Line2D([], [], color="0.25", lw=2)
    key = [("train (smoothed)" if raw_drawn else "train", solid)] if train_drawn else []
    if raw_drawn:
        key.append(("train (raw)", Line2D([], [], color="0.25", lw=0.8, alpha=RAW_ALPHA + 0.1)))
    if val_drawn:
        key.append(("validation", Line2D([], [], color="0.25", ls="--", marker="o", ms=5)))
        star = Line2D([], [], color="0.6", ls="", marker="*", ms=12, mec="black", mew=0.6)
        key.append(("best validation", star))
    if bad_drawn:
        key.append(("NaN/inf loss", Line2D([], [], color="0.25", ls="", marker="x", mew=2)))
    _loss_limits(ax, curves)
    return key


def _mark_best(ax, val: Points, color, *, text: bool) -> None:
    i = min(range(len(val[1])), key=val[1].__getitem__)
    x, y = val[0][i], val[1][i]
    ax.plot([x], [y], marker="*", ms=15, color=color, mec="black", mew=0.6, zorder=5)
    if not text:
        return
    right = x > 0.6 * max(val[0])
    ax.annotate(
        f"best {y:.4f} (step {x:g})",
        (x, y),
        xytext=(0, -14),
        textcoords="offset points",
        ha="right" if right else "center",
        va="top",
        fontsize=9,
    )


def _loss_limits(ax, curves: list[_Curves]) -> None:
    """Room for the smoothed curves and the validation points; a first few raw losses far
    above them (an untrained model's) may leave the top of the panel."""
    shown = [y for c in curves for y in (*smooth(c.loss[1]), *c.val[1])]
    raw = sorted(y for c in curves for y in c.loss[1])
    if not shown:
        return
    low = min(min(shown), raw[0] if raw else math.inf)
    high = max(max(shown), raw[int(0.98 * (len(raw) - 1))] if raw else -math.inf)
    pad = (high - low) * 0.08 or abs(high) * 0.05 or 0.5
    ax.set_ylim(low - pad, high + pad)


def _small_panel(ax, key: str, title: str, curves: list[_Curves], colors) -> None:
    _style(ax, title)
    drawn = []
    for c, color in zip(curves, colors, strict=True):
        xs, ys = c.panels[key]
        if not xs:
            continue
        drawn += ys
        if key == "lr":
            _line(ax, xs, ys, color=color, lw=1.8)
            continue
        smoothed = smooth(ys)
        if smoothed != ys:
            ax.plot(xs, ys, color=color, alpha=RAW_ALPHA, lw=0.7)
        _line(ax, xs, smoothed, color=color, lw=1.6)
        if key == "reward" and c.panels["val_reward"][0]:
            ax.plot(*c.panels["val_reward"], "o", color=color, ms=5)
    if not drawn:
        _nothing(ax, "not recorded")
        return
    if key == "lr":
        ax.yaxis.set_major_formatter(_plain())
        ax.set_ylim(bottom=0)
    elif key == "grad_norm":
        positive = [y for y in drawn if y > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")
    elif key == "tokens_per_s":  # a step timed over a few milliseconds must not flatten the rest
        ordered = sorted(drawn)
        top = ordered[int(0.97 * (len(ordered) - 1))] if len(ordered) > FEW_POINTS else ordered[-1]
        ax.set_ylim(0, max(top * 1.15, 1e-9))
        ax.yaxis.set_major_formatter(_plain(thousands=True))


def _plain(*, thousands: bool = False):
    """Tick labels without an offset or a power of ten set apart: 0.002, 2e-05, 40k."""
    from matplotlib.ticker import FuncFormatter

    def fmt(value, _pos):
        if thousands and abs(value) >= 1000:
            return f"{value / 1000:g}k"
        return f"{value:.3g}"

    return FuncFormatter(fmt)
