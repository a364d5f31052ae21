"""bench/speed.py measures what it says: every variant names its precision, no figure rests on
fewer than MIN_STEPS steps, and its self-check reads `translate train`'s real it/s line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_CYCLEGAN, run_cli, set_args

from translate import recipe as recipe_mod

sys.path.insert(0, str(ROOT / "bench"))
import _common
import _self_check
import speed


@pytest.mark.parametrize("variant", sorted(speed.VARIANTS))
def test_every_training_variant_names_its_precision(variant, tmp_path):
    sets = speed.VARIANTS[variant]
    precision = [s for s in sets if s.startswith("train.mixed_precision=")]
    assert len(precision) == 1, sets  # never left to the default
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_horse2zebra.toml", sets)
    want = "auto" if variant == "auto" else "no" if variant.startswith("fp32") else "bf16"
    assert cfg.train.mixed_precision == want
    assert cfg.train.compile is ("compile" in variant)


@pytest.mark.parametrize("quick", [True, False])
@pytest.mark.parametrize("native", [True, False])
def test_plans_time_enough_steps_and_keep_auto_rows(quick, native):
    plan = speed.Plan(Path("/nonexistent"), quick, native, speed.MIN_STEPS, 2)
    cases = speed.plan(plan, "")
    keys = [c.key for c in cases]
    assert "train128b1/fp32" in keys and "train128b1/auto" in keys and "apply256/torch auto" in keys
    assert ("train128b1/bf16+compile" in keys) == native
    assert ("apply256/torch bf16 compiled" in keys) == native
    assert "apply256/torch fp32 compiled" in keys and "apply256/onnx" in keys
    assert all(c.spec["repeats"] >= _common.MIN_STEPS for c in cases if c.kind != "gemm")
    if not native:  # emulated bf16 is not measured
        assert not any("bf16" in c.variant for c in cases if c.kind != "gemm")


def test_repeat_never_stops_before_min_steps():
    calls = []
    out = _common._repeat(lambda: calls.append(1) or [1.0], {"repeats": 9, "budget": 0.0},
                          lambda: None)
    assert len(out) == _common.MIN_STEPS == len(calls)


def test_self_check_reads_translate_trains_rate(tiny_unpaired, tmp_path):
    proc = run_cli("train", str(ROOT / "recipes" / "cyclegan_demo.toml"),
                   *set_args(TINY_CYCLEGAN + [f'data.root="{tiny_unpaired}"',
                                              f'run_dir="{tmp_path / "run"}"']),
                   "--steps", "4", "--log-every", "2", "--no-progress")
    seconds = _self_check.cli_seconds_per_step(proc.stdout + proc.stderr)
    assert seconds is not None and 0 < seconds < 60
    assert _self_check.cli_seconds_per_step("no rate here") is None
