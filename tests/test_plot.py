"""translate plot: which logged keys make curves, grouped into panels, and the PNG drawn from them."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import cli_error, cli_main
from PIL import Image

from translate.explore.plot import (
    PANEL_HEIGHT,
    TITLE_HEIGHT,
    WIDTH,
    nice_ticks,
    parse_log,
    tick_label,
)


def test_plot_leaves_out_the_run_shape():
    """The first record's run/* values describe the run, not a curve: no panel for them."""
    lines = [json.dumps({"step": 1, "run/processes": 2, "run/global_batch": 16, "D/loss": 1.0}),
             json.dumps({"step": 2, "D/loss": 0.5})]
    assert list(parse_log(lines).series) == ["D/loss"]


def test_plot_survives_nan_strings_single_points_and_cut_lines(capsys, tmp_path):
    lines = [json.dumps({"step": 10, "time": 1.0, "it_s": 5.0, "G/loss": 1.0, "D/loss": "nan"}),
             json.dumps({"step": 20, "time": 2.0, "it_s": 5.0, "G/loss": "inf", "D/loss": 0.5,
                         "note": "text"}),
             '{"step": 30, "G/lo']
    (tmp_path / "log.jsonl").write_text("\n".join(lines))
    log = parse_log(lines)
    assert list(log.steps) == [10, 20] and log.skipped == 1
    assert log.non_finite == {"it_s": 0, "G/loss": 1, "D/loss": 1, "note": 1}
    assert math.isnan(log.series["note"][0])  # absent from the record: missing, not "nan"
    assert cli_main(["plot", str(tmp_path)]) == 0
    img = Image.open(tmp_path / "plot.png")
    assert img.size == (WIDTH, TITLE_HEIGHT + 4 * PANEL_HEIGHT)  # G, D, other, speed
    (tmp_path / "log.jsonl").write_text(json.dumps({"step": 5, "G/loss": 2.0}) + "\n")
    assert cli_main(["plot", str(tmp_path)]) == 0
    assert Image.open(tmp_path / "plot.png").size == (WIDTH, TITLE_HEIGHT + PANEL_HEIGHT)


def test_plot_draws_lr_scale_on_its_own_axis(capsys, tmp_path):
    """lr/G (2e-4, decaying), lr/D (1e-4) and lr_scale (1 -> 0) in one panel: against one
    axis both learning rates would lie flat on zero; with lr_scale on the right axis lr/G's
    line spans the plot area's height."""
    records = [{"step": s, "lr/G": 2e-4 * (1 - s / 100), "lr/D": 1e-4, "lr_scale": 1 - s / 100}
               for s in range(0, 101, 10)]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli_main(["plot", str(tmp_path)]) == 0
    img = np.asarray(Image.open(tmp_path / "plot.png")).astype(int)
    assert img.shape[:2] == (TITLE_HEIGHT + PANEL_HEIGHT, WIDTH)  # one panel: lr
    area = img[TITLE_HEIGHT + 30:TITLE_HEIGHT + PANEL_HEIGHT - 38, 74:WIDTH - 202]
    blue = (np.abs(area - np.array([31, 119, 180])).sum(-1) < 60).any(1)  # lr/G, the 1st colour
    rows = np.flatnonzero(blue)
    assert rows.size and rows[-1] - rows[0] > 0.8 * area.shape[0], rows
    orange = (np.abs(area - np.array([255, 127, 14])).sum(-1) < 60).any(1)  # lr/D, flat
    assert 0 < orange.sum() < 10 and np.flatnonzero(orange).mean() < 0.8 * area.shape[0]
    ticks = img[TITLE_HEIGHT + 20:TITLE_HEIGHT + PANEL_HEIGHT - 30, WIDTH - 198:WIDTH - 178]
    assert (ticks.max(-1) < 120).sum() > 15  # the right axis' tick labels (grey text)


def test_plot_errors(capsys, tmp_path):
    assert "no training log" in cli_error(capsys, ["plot", str(tmp_path)])
    (tmp_path / "log.jsonl").write_text("\n{not json\n")
    assert "no readable log records" in cli_error(capsys, ["plot", str(tmp_path)])
    assert "--smooth" in cli_error(capsys, ["plot", str(tmp_path), "--smooth", "1"])
    assert not (tmp_path / "plot.png").exists()


def test_ticks_are_round_and_cover_the_range():
    ticks, step = nice_ticks(0.13, 0.91)
    assert step == 0.2 and ticks == pytest.approx([0.2, 0.4, 0.6, 0.8])
    ticks, step = nice_ticks(1, 3, integer=True)
    assert step == 1 and ticks == [1, 2, 3]
    assert [tick_label(v, 25000, 200000) for v in (50000, 200000)] == ["50k", "200k"]
    assert tick_label(5000, 5000, 10000) == "5k" and tick_label(0.25, 0.05) == "0.25"
