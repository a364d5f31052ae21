"""The main job in a reduced size: `translate demo` end to end through the CLI."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli
from PIL import Image


@pytest.mark.slow
def test_demo_end_to_end_reduced(tmp_path):
    root, run = tmp_path / "demo", tmp_path / "run"
    proc = run_cli("demo", "--root", str(root), "--run-dir", str(run), "--steps", "3",
                   "--size", "16", "--no-progress")
    assert "PSNR (dB)" in proc.stdout and "cycle PSNR" in proc.stdout
    scores = json.loads((run / "demo_scores.json").read_text())
    assert scores["steps"] == 3 and scores["n_test"] == 40
    for key in ("psnr", "ssim", "baseline_psnr", "cycle_psnr"):
        assert math.isfinite(scores[key])
    for name in ("G_ab.safetensors", "G_ba.safetensors", "G_ab.onnx"):
        assert (run / "export" / name).is_file()
    translated = sorted(p.name for p in (run / "translated" / "testA").iterdir())
    assert translated == sorted(p.name for p in (root / "testA").iterdir())
    pairs = Image.open(run / "demo_side_by_side.png")
    assert pairs.size == (3 * 16, 8 * 16)  # input | translated | truth, 8 rows
    # the do-nothing baseline is scored against the same truth, independent of training
    assert scores["baseline_psnr"] < 40

    again = run_cli("demo", "--root", str(root), "--run-dir", str(run), "--steps", "3",
                    "--size", "16", "--no-progress")
    assert "resumed from" in again.stderr  # the finished run is not trained again
    assert json.loads((run / "demo_scores.json").read_text())["psnr"] == scores["psnr"]
