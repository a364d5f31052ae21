"""`translate plot RUN_DIR`: the curves of log.jsonl as one PNG, drawn with numpy + PIL.

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
from PIL import Image, ImageDraw, ImageFont

from translate import viz
from translate.core.runlog import RUN_SHAPE
from translate.errors import UserError
from translate.files import atomic_path

WIDTH = 960  # output width in pixels
TITLE_HEIGHT = 36  # pixels above the first panel
PANEL_HEIGHT = 260  # pixels per panel
SCALE = 2  # drawn at SCALE x and downsampled: PIL's lines are not anti-aliased
_LEFT, _RIGHT, _TOP, _BOTTOM = 72, 200, 28, 36  # panel margins around the plot area, pixels
_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
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


def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return viz.font(px * SCALE)


def _runs(x: np.ndarray, y: np.ndarray) -> list[list[tuple[float, float]]]:
    """Polylines of consecutive finite points (a NaN breaks the line)."""
    out: list[list[tuple[float, float]]] = [[]]
    for a, b in zip(x, y):
        if math.isfinite(a) and math.isfinite(b):
            out[-1].append((float(a), float(b)))
        elif out[-1]:
            out.append([])
    return [r for r in out if r]


def _draw_series(d: ImageDraw.ImageDraw, pts: list[tuple[float, float]], colour: tuple,
                 width: int) -> None:
    if len(pts) == 1:  # a lone point (single log line, or between NaNs) is a dot
        (x, y), r = pts[0], 2.5 * SCALE
        d.ellipse((x - r, y - r, x + r, y + r), fill=colour)
    else:
        d.line(pts, fill=colour, width=width, joint="curve")


def _lighter(c: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(int(v + 0.65 * (255 - v)) for v in c)


def _draw_y_ticks(d: ImageDraw.ImageDraw, box: tuple[float, float, float, float],
                  yr: tuple[float, float], font, right: bool = False) -> None:
    """Tick labels of a y axis: on the left with grid lines, or on the right with tick marks
    (a second axis, in the colour-neutral grey of the first)."""
    x0, y0, x1, y1 = box
    yticks, ystep = nice_ticks(*yr)
    top = max(abs(v) for v in yticks) if yticks else None
    for v in yticks:
        py = y1 - (v - yr[0]) / (yr[1] - yr[0]) * (y1 - y0)
        label = tick_label(v, ystep, top)
        if right:
            d.line([(x1, py), (x1 + 4 * SCALE, py)], fill=(60, 60, 60), width=SCALE)
            d.text((x1 + 6 * SCALE, py), label, fill=(60, 60, 60), font=font, anchor="lm")
        else:
            d.line([(x0, py), (x1, py)], fill=(230, 230, 230), width=SCALE)
            d.text((x0 - 6 * SCALE, py), label, fill=(60, 60, 60), font=font, anchor="rm")


def _draw_axes(d: ImageDraw.ImageDraw, box: tuple[float, float, float, float],
               xr: tuple[float, float], yr: tuple[float, float], font) -> None:
    x0, _, x1, y1 = box
    _draw_y_ticks(d, box, yr, font)
    xticks, xstep = nice_ticks(*xr, n=6, integer=True)
    top = max(abs(v) for v in xticks) if xticks else None
    for v in xticks:
        px = x0 + (v - xr[0]) / (xr[1] - xr[0]) * (x1 - x0)
        d.line([(px, y1), (px, y1 + 4 * SCALE)], fill=(60, 60, 60), width=SCALE)
        d.text((px, y1 + 6 * SCALE), tick_label(v, xstep, top), fill=(60, 60, 60), font=font,
               anchor="mt")
    d.rectangle(box, outline=(90, 90, 90), width=SCALE)


def _draw_legend(d: ImageDraw.ImageDraw, x: float, y: float, keys: list[str], log: Log,
                 font, right: tuple[str, ...] = ()) -> None:
    s = SCALE
    rows = int((PANEL_HEIGHT - _TOP - _BOTTOM) / 16)
    for i, k in enumerate(keys):
        ly = y + (2 + 16 * i) * s
        if i == rows - 1 and len(keys) > rows:
            d.text((x + 24 * s, ly), f"+{len(keys) - i} more", fill=(30, 30, 30), font=font,
                   anchor="lt")
            return
        label = k.split("/", 1)[1] if "/" in k else k
        if log.non_finite[k]:
            label += f" ({log.non_finite[k]} nan/inf)"
        if k in right:
            label += " (right axis)"
        d.line([(x, ly + 6 * s), (x + 18 * s, ly + 6 * s)], fill=_PALETTE[i % len(_PALETTE)],
               width=3 * s)
        d.text((x + 24 * s, ly), label, fill=(30, 30, 30), font=font, anchor="lt")


def _draw_panel(d: ImageDraw.ImageDraw, top: float, name: str, keys: list[str], log: Log,
                xr: tuple[float, float], smooth: float, fonts: tuple) -> None:
    small, bold = fonts
    s = SCALE
    box = (_LEFT * s, top + _TOP * s, (WIDTH - _RIGHT) * s, top + (PANEL_HEIGHT - _BOTTOM) * s)
    x0, y0, x1, y1 = box
    right = tuple(k for k in keys if k in _RIGHT_AXIS and len(keys) > 1)
    yr = value_range([log.series[k] for k in keys if k not in right])
    yr_right = value_range([log.series[k] for k in right])
    _draw_axes(d, box, xr, yr, small)
    if right:
        _draw_y_ticks(d, box, yr_right, small, right=True)
    d.text((x0, top + 8 * s), name, fill=(0, 0, 0), font=bold, anchor="lt")
    d.text((x1, y1 + 20 * s), "step", fill=(60, 60, 60), font=small, anchor="rt")
    px = x0 + (log.steps - xr[0]) / (xr[1] - xr[0]) * (x1 - x0)
    # The right axis' curves first: where they meet a left-axis curve, that one stays on top.
    for i, k in sorted(enumerate(keys), key=lambda ik: ik[1] not in right):
        colour = _PALETTE[i % len(_PALETTE)]
        # With smoothing, the raw curve stays visible as a pale line under the smoothed one.
        layers = [(log.series[k], colour, 2 * s)]
        if smooth > 0:
            layers = [(log.series[k], _lighter(colour), s),
                      (ema_smooth(log.series[k], smooth), colour, 2 * s)]
        lo, hi = yr_right if k in right else yr
        for values, c, w in layers:
            py = y1 - (values - lo) / (hi - lo) * (y1 - y0)
            # Keys logged only at some steps (eval/* every train.eval_every) join their own
            # points; only a logged nan/inf breaks a line.
            keep = log.present.get(k, np.ones(len(py), dtype=bool))
            for run in _runs(px[keep], py[keep]):
                _draw_series(d, run, c, w)
    _draw_legend(d, x1 + (12 + _RIGHT_TICKS * bool(right)) * s, y0, keys, log, small, right)


def render(log: Log, title: str, smooth: float = 0.0) -> Image.Image:
    """The whole figure: WIDTH x (TITLE_HEIGHT + PANEL_HEIGHT per group) pixels, RGB."""
    groups = group_keys(list(log.series))
    height = TITLE_HEIGHT + PANEL_HEIGHT * max(len(groups), 1)
    img = Image.new("RGB", (WIDTH * SCALE, height * SCALE), "white")
    d = ImageDraw.Draw(img)
    fonts = (_font(11), _font(14))
    d.text((10 * SCALE, 10 * SCALE), title, fill=(0, 0, 0), font=fonts[1], anchor="lt")
    lo, hi = float(log.steps.min()), float(log.steps.max())
    xr = (lo - 1, hi + 1) if hi == lo else (lo, hi)
    for i, (name, keys) in enumerate(groups.items()):
        top = (TITLE_HEIGHT + i * PANEL_HEIGHT) * SCALE
        _draw_panel(d, top, name, keys, log, xr, smooth, fonts)
    return img.resize((WIDTH, height), Image.Resampling.LANCZOS)


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
