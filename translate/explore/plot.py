"""`translate plot RUN_DIR`: the curves of log.jsonl as one PNG, drawn with matplotlib (Agg).

One panel per group of logged keys: G/* (generator phase), D/* (discriminator phase), any other
"prefix/*", then the keys without a prefix ("other") and the training speed. Values logged as
"nan"/"inf" break the line and are counted in the legend, so a divergence stays visible.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from translate.core.runlog import RUN_SHAPE
from translate.errors import UserError
from translate.files import atomic_path

WIDTH = 960  # output width in pixels
TITLE_HEIGHT = 36  # pixels above the first panel
PANEL_HEIGHT = 260  # pixels per panel
_DPI = 100  # figure inches x _DPI = the pixel sizes above
_LEGEND_ROWS = 12  # legend entries per panel
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 200, 28, 36  # panel margins around the plot area, pixels
_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf"]  # matplotlib's tab10, in its order
# Not curves: the x axis, wall time (the speed panel shows it), the health warnings (text).
_SKIP = ("step", "time", "warnings")
# Keys drawn against their own axis on the right of a panel they share: the schedule's
# multiplier (about 1) beside learning rates (about 1e-4) would flatten them onto zero.
_RIGHT_AXIS = ("lr_scale",)
_RIGHT_TICKS = 48  # pixels between the plot area and the legend for the right axis' labels


# ---------------------------------------------------------------------------- data (pure)


def _number(v: Any) -> float:
    if isinstance(v, bool):
        return math.nan
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)  # "nan", "inf", "-inf" as the run log writes them
        except ValueError:
            return math.nan
    return math.nan


@dataclass(frozen=True)
class Log:
    steps: np.ndarray  # (N,) the logged steps, sorted
    series: dict[str, np.ndarray]  # key -> (N,) values, NaN where a record lacks the key
    non_finite: dict[str, int]  # key -> how many of its logged values were nan/inf
    skipped: int  # lines that were not a JSON object with a numeric "step"
    present: dict[str, np.ndarray] = field(default_factory=dict)  # key -> (N,) bool: logged there


def parse_log(lines: list[str]) -> Log:
    """The records of log.jsonl lines, sorted by step. A line cut short (a kill mid-write) or
    otherwise unreadable is counted in `skipped`, not fatal."""
    records, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        if not isinstance(rec, dict) or not math.isfinite(_number(rec.get("step"))):
            skipped += 1
            continue
        records.append(rec)
    records.sort(key=lambda r: _number(r["step"]))
    keys = list(dict.fromkeys(k for r in records for k in r
                              if k not in _SKIP and not k.startswith(RUN_SHAPE)))
    series = {k: np.array([_number(r.get(k)) for r in records]) for k in keys}
    non_finite = {k: sum(1 for r in records if k in r and not math.isfinite(_number(r[k])))
                  for k in keys}
    present = {k: np.array([k in r for r in records], dtype=bool) for k in keys}
    return Log(np.array([_number(r["step"]) for r in records]), series, non_finite, skipped,
               present)


def group_keys(keys: list[str]) -> dict[str, list[str]]:
    """Panels in display order: G, D, other prefixes (sorted; "lr" also takes the schedule's
    lr_scale, drawn against its own axis on the right), unprefixed keys, speed."""
    special = {"it_s": "speed (it/s)", "lr_scale": "lr"}
    groups: dict[str, list[str]] = {}
    for k in keys:
        name = k.split("/", 1)[0] if "/" in k else special.get(k, "other")
        groups.setdefault(name, []).append(k)
    rank = {"G": 0, "D": 1, "other": 3, "speed (it/s)": 4}
    return {g: groups[g] for g in sorted(groups, key=lambda g: (rank.get(g, 2), g))}


def ema_smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average that skips NaNs (TensorBoard's smoothing)."""
    if weight <= 0:
        return values
    out = np.full_like(values, math.nan)
    acc, norm = 0.0, 0.0
    for i, v in enumerate(values):
        if math.isfinite(v):
            acc, norm = weight * acc + (1 - weight) * v, weight * norm + (1 - weight)
            out[i] = acc / norm
    return out


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False
               ) -> tuple[list[float], float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi], and their
    spacing; `integer` keeps the spacing >= 1 (steps are whole numbers)."""
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    step = max(step, 1.0) if integer else step
    first = math.ceil(lo / step - 1e-9)
    return [i * step for i in range(first, math.floor(hi / step + 1e-9) + 1)], step


def tick_label(v: float, step: float, top: float | None = None) -> str:
    """Short axis labels: 150k, 2.5M, 0.25, 3e-05. `top`, the largest |tick| of the axis,
    keeps one style along an axis (5k and 10k, not 5000 and 10k)."""
    if abs(v) < 1e-12 * max(1.0, step):
        return "0"
    if (top or abs(v)) >= 1e4 and step >= 1:
        return f"{v / 1e3:g}k" if abs(v) < 1e6 else f"{v / 1e6:g}M"
    if step < 1e-3:
        return f"{v:.3g}"
    return f"{v:.{max(0, -math.floor(math.log10(step) + 1e-9))}f}"


def value_range(arrays: list[np.ndarray]) -> tuple[float, float]:
    """[min, max] of the finite values with a 5% margin; a sensible span for flat data."""
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    if hi - lo < 1e-12 * max(1.0, abs(hi)):
        pad = max(abs(hi) * 0.1, 1e-3)
        return lo - pad, hi + pad
    pad = 0.05 * (hi - lo)
    return lo - pad, hi + pad


# ---------------------------------------------------------------------------- drawing


def _legend_label(k: str, log: Log, right: list[str]) -> str:
    label = k.split("/", 1)[1] if "/" in k else k
    if log.non_finite[k]:
        label += f" ({log.non_finite[k]} nan/inf)"
    return label + (" (right axis)" if k in right else "")


def _set_ticks(axis: Any, lo: float, hi: float, n: int = 5, integer: bool = False) -> None:
    """Round ticks with short labels (150k, 0.25) on one matplotlib axis."""
    from matplotlib.ticker import FixedLocator, FuncFormatter

    ticks, step = nice_ticks(lo, hi, n, integer)
    top = max(abs(v) for v in ticks) if ticks else None
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: tick_label(v, step, top)))


def _draw_panel(ax: Any, name: str, keys: list[str], log: Log, xr: tuple[float, float],
                smooth: float) -> None:
    from matplotlib.lines import Line2D

    right = [k for k in keys if k in _RIGHT_AXIS and len(keys) > 1]
    axes = {k: ax for k in keys}
    if right:
        twin = ax.twinx()
        # Behind the left axis: where a right-axis curve meets a left-axis one, that one shows.
        twin.set_zorder(ax.get_zorder() - 1)
        ax.patch.set_visible(False)
        twin.tick_params(labelsize=8)
        axes.update({k: twin for k in right})
        twin.set_ylim(*value_range([log.series[k] for k in right]))
        _set_ticks(twin.yaxis, *twin.get_ylim())
    ax.set_ylim(*value_range([log.series[k] for k in keys if k not in right]))
    ax.set_xlim(*xr)
    _set_ticks(ax.yaxis, *ax.get_ylim())
    _set_ticks(ax.xaxis, *xr, n=6, integer=True)
    ax.grid(axis="y", color="#e6e6e6", linewidth=1)
    ax.tick_params(labelsize=8)
    ax.set_title(name, loc="left", fontsize=11, fontweight="bold")
    ax.annotate("step", xy=(1, 0), xycoords="axes fraction", xytext=(0, -17),
                textcoords="offset points", ha="right", va="top", fontsize=8)
    lines = []
    for i, k in enumerate(keys):
        colour = _PALETTE[i % len(_PALETTE)]
        # Keys logged only at some steps (eval/* every train.eval_every) join their own points;
        # only a logged nan/inf breaks a line (matplotlib breaks it at a NaN).
        keep = log.present.get(k, np.ones(len(log.steps), dtype=bool))
        x, y = log.steps[keep], log.series[k][keep]
        dot = "o" if np.isfinite(y).sum() < 2 else None  # a lone point: a whole dot
        if smooth > 0:  # the raw curve stays visible as a pale line under the smoothed one
            axes[k].plot(x, y, color=colour, alpha=0.35, linewidth=1, marker=dot, markersize=4,
                         clip_on=dot is None)
            y = ema_smooth(y, smooth)
        lines += axes[k].plot(x, y, color=colour, linewidth=1.6, marker=dot, markersize=4,
                              clip_on=dot is None,
                              label=_legend_label(k, log, right))
    if len(lines) > _LEGEND_ROWS:  # more would run past the panel
        more = len(lines) - _LEGEND_ROWS + 1
        lines = lines[:_LEGEND_ROWS - 1] + [Line2D([], [], linestyle="none", label=f"+{more} more")]
    # To the right of the plot area (and of the right axis' tick labels, when there is one).
    offset = 1 + (12 + _RIGHT_TICKS * bool(right)) / (WIDTH - _LEFT - _RIGHT)
    ax.legend(handles=lines, loc="upper left", bbox_to_anchor=(offset, 1), frameon=False,
              fontsize=8, borderaxespad=0, handlelength=1.5)


def render(log: Log, title: str, smooth: float = 0.0) -> Image.Image:
    """The whole figure: WIDTH x (TITLE_HEIGHT + PANEL_HEIGHT per group) pixels, RGB, drawn by
    matplotlib's Agg backend (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = group_keys(list(log.series))
    height = TITLE_HEIGHT + PANEL_HEIGHT * max(len(groups), 1)
    fig = Figure(figsize=(WIDTH / _DPI, height / _DPI), dpi=_DPI)
    canvas = FigureCanvasAgg(fig)
    fig.text(10 / WIDTH, 1 - 10 / height, title, va="top", fontsize=12, fontweight="bold")
    lo, hi = float(log.steps.min()), float(log.steps.max())
    xr = (lo - 1, hi + 1) if hi == lo else (lo, hi)
    for i, (name, keys) in enumerate(groups.items()):
        bottom = TITLE_HEIGHT + (i + 1) * PANEL_HEIGHT - _BOTTOM  # pixels from the top
        rect = (_LEFT / WIDTH, 1 - bottom / height, (WIDTH - _LEFT - _RIGHT) / WIDTH,
                (PANEL_HEIGHT - _TOP - _BOTTOM) / height)
        _draw_panel(fig.add_axes(rect), name, keys, log, xr, smooth)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def plot_run(run: str | Path, out: str | Path | None = None, smooth: float = 0.0) -> Path:
    """Write the plot of RUN/log.jsonl (or of a .jsonl file) to `out` (default RUN/plot.png)."""
    run = Path(run)
    log_path = run if run.suffix == ".jsonl" else run / "log.jsonl"
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth: must be in [0, 1), got {smooth}")
    if not log_path.is_file():
        raise UserError(f"{log_path}: no training log; pass a run folder (runs/<name>) that "
                        "has trained for at least train.log_every steps")
    log = parse_log(log_path.read_text(encoding="utf-8", errors="replace").splitlines())
    if len(log.steps) == 0 or not log.series:
        raise UserError(f"{log_path}: no readable log records; train longer than "
                        "train.log_every steps")
    first, last = int(log.steps[0]), int(log.steps[-1])
    title = (f"{log_path.parent.name}: {len(log.steps)} log points, "
             + (f"step {first}" if first == last else f"steps {first}-{last}"))
    if log.skipped:
        title += f" ({log.skipped} unreadable line{'s' * (log.skipped > 1)} skipped)"
    if smooth > 0:
        title += f", smoothing {smooth}"
    out = Path(out) if out else log_path.parent / "plot.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        render(log, title, smooth).save(tmp, "PNG")
    return out


def cmd_plot(args: Any) -> int:
    print(f"wrote {plot_run(args.run, args.out, args.smooth)}")
    return 0
