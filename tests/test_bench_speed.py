"""bench/speed.py measures what it says: every variant names its precision, no figure rests on
fewer than MIN_STEPS steps, and its self-check reads `translate train`'s real it/s line."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_CYCLEGAN, run_cli, set_args

from translate import recipe as recipe_mod

sys.path.insert(0, str(ROOT / "bench"))
import _paired
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
@pytest.mark.parametrize("nnpack", [True, False])
def test_plans_time_enough_steps_and_keep_auto_rows(quick, native, nnpack):
    plan = speed.Plan(Path("/nonexistent"), quick, native, nnpack, speed.MIN_STEPS, 2)
    cases = speed.plan(plan, "")
    keys = [c.key for c in cases]
    assert "train128b1/fp32" in keys and "train128b1/auto" in keys and "apply256/torch auto" in keys
    assert ("train128b1/bf16+compile" in keys) == native
    assert ("apply256/torch bf16 compiled" in keys) == native
    assert "apply256/torch fp32 compiled" in keys and "apply256/onnx" in keys
    # fp32 rows name their convolutions: oneDNN's, and NNPACK's where it runs (256 px only)
    assert speed.BACKENDS["torch fp32"]["nnpack"] is False
    assert ("apply256/torch fp32 nnpack" in keys) == ("apply256/torch fp32 nnpack compiled"
                                                        in keys) == nnpack
    assert not any("nnpack" in k for k in keys if k.startswith("apply1024"))
    # training on oneDNN beside the fp32 row, which takes NNPACK where train.nnpack's auto does
    assert ("train128b1/fp32 oneDNN" in keys) == nnpack
    assert 'train.nnpack="off"' in speed.VARIANTS["fp32 oneDNN"]
    assert all(c.spec["repeats"] >= _paired.MIN_STEPS for c in cases if c.kind != "gemm")
    if not native:  # emulated bf16 is not measured
        assert not any("bf16" in c.variant for c in cases if c.kind != "gemm")


def test_the_training_target_reads_cyclegan_rows_only(capsys):
    # CUT and FastCUT are timed in CycleGAN's 128 px group (beside its fp32 step); a faster
    # FastCUT step must not stand in for CycleGAN's best in the 0.45 s/it target.
    cases = speed.plan(speed.Plan(Path("/nonexistent"), True, False, False, speed.MIN_STEPS, 2),
                       "train128b1")
    speedups = {"train128b1/fp32": 1.0, "train128b1/auto": 1.1, "train128b1/fp32+compile": 1.3,
                "train128b1/cut": 1.6, "train128b1/fastcut": 2.9}
    assert {c.key for c in cases if c.kind == "train"} == set(speedups)
    for c in cases:
        if c.key in speedups:
            c.result = {"median_s": 2.0 / speedups[c.key], "speedup": speedups[c.key]}
    rss = {"train128b1/fp32": 1400.0, "train128b1/cut": 1050.0, "train128b1/fastcut": 840.0}
    for c in cases:
        if c.key in rss:
            c.result["rss_mb"] = rss[c.key]
    got = speed.summary(cases, {}, {})
    assert got["train128_best_variant"] == "fp32+compile" and got["train128_best_s"] == 2.0 / 1.3
    # issue #14's memory target: each one-sided method's peak over CycleGAN's fp32 one
    assert got["cut128_rss_share"] == 0.75 and got["fastcut128_rss_share"] == 0.6
    speed.print_targets({**got, "self_check": {}})
    out = capsys.readouterr().out
    assert "target cut 128 b1 peak RSS <= 70% of cyclegan's (fp32, issue #14): 75% (1050 MB " \
           "against 1400) MISS" in out
    assert "target fastcut 128 b1 peak RSS <= 70% of cyclegan's (fp32, issue #14): 60%" in out


def test_repeat_never_stops_before_min_steps():
    calls = []
    out = _paired._repeat(lambda: calls.append(1) or [1.0], {"repeats": 9, "budget": 0.0},
                          lambda: None)
    assert len(out) == _paired.MIN_STEPS == len(calls)


def test_self_check_reads_translate_trains_rate(tiny_unpaired, tmp_path):
    run = tmp_path / "run"
    run_cli("train", str(ROOT / "recipes" / "cyclegan_demo.toml"),
            *set_args(TINY_CYCLEGAN + [f'data.root="{tiny_unpaired}"', f'run_dir="{run}"']),
            "--steps", "5", "--log-every", "1", "--no-progress")
    seconds = _self_check.cli_seconds_per_step(run / "log.jsonl")
    steps = [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
             if r["step"] > _self_check.WARMUP_STEPS]
    assert len(steps) == 3 and seconds == sorted(1 / r["it_s"] for r in steps)[1]
    assert _self_check.cli_seconds_per_step(tmp_path / "missing.jsonl") is None


@pytest.mark.slow
def test_self_check_times_the_bench_around_the_cli_run(tiny_unpaired, tmp_path):
    """The check's bench figure comes from the case's own child, stepped just before and just
    after translate train runs the same config, not from the table (measured minutes earlier,
    perhaps in another window of a drifting machine): a table figure of 123 s is not used."""
    import statistics

    plan = speed.Plan(tmp_path, quick=True, native=False, nnpack=False, repeats=5, threads=1)
    case = speed._train_case(plan, "train128b1/fp32", "tiny", "cyclegan_demo.toml", "fp32",
                             TINY_CYCLEGAN + [f'data.root="{tiny_unpaired}"'])
    case.result = {"median_s": 123.0}
    row = _self_check.self_check(tmp_path, 1, [case], ROOT / "bench" / "speed.py", 600,
                                 steps=3)["fp32"]
    assert "error" not in row, row
    assert len(row["bench_times"]) == 2 * _self_check.BRACKET_STEPS
    assert row["bench_s"] == statistics.median(row["bench_times"]) < 10
    assert row["table_s"] == 123.0 and row["cli_precision"] == "no"
    assert row["ratio"] == row["cli_s"] / row["bench_s"]
    assert row["ok"] is (abs(row["ratio"] - 1) <= _self_check.SELF_CHECK_TOLERANCE)


def test_profile_step_groups_a_real_step_by_op():
    import subprocess

    import profile_step

    assert profile_step.group_of("aten::convolution_backward") == "convolution"
    assert profile_step.group_of("aten::reflection_pad2d_backward") == "padding / resize"
    assert profile_step.group_of("aten::_to_copy") == "dtype conversion / copy"
    assert profile_step.group_of("aten::_fused_adam_") == "optimizer"
    # The recipe as `translate train` takes it, a path (a bare name looks in recipes/).
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "profile_step.py"), "--recipe",
         "recipes/cyclegan_demo.toml", "--size", "16", "--batch", "2", "--precision", "no",
         "--steps", "2", "--threads", "1", "--top", "5", "--floor"],
        capture_output=True, text=True, timeout=300, check=True, cwd=ROOT)
    out = proc.stdout
    assert "cyclegan_demo.toml 16px batch 2, precision no:" in out and "s/step" in out
    groups = {line.split("|")[1].strip(): float(line.split("|")[3].strip().rstrip("%"))
              for line in out.splitlines() if line.startswith("| ") and line.count("|") == 4
              and "%" in line}
    assert groups["convolution"] > 0 and abs(sum(groups.values()) - 100) < 1.0
    floor = {line.split("|")[1].strip(): [float(v) for v in line.split("|")[2:4]]
             for line in out.splitlines() if line.startswith("| ") and line.count("|") == 4
             and "%" not in line and "s/step" not in line}
    assert set(floor) == {"forward", "backward", "total"}
    assert all(alone > 0 and step > 0 for alone, step in floor.values())


def test_conv_floor_replays_each_recorded_convolution_call():
    import profile_step
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(1, 3, 12, 12, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):  # two steps: counts are per step
            F.conv2d(x, w, None, 2, 1).sum().backward()
            F.conv_transpose2d(torch.randn(1, 5, 6, 6), w, torch.zeros(3), 2, 1, 1)
    calls = profile_step.conv_calls(prof, steps=2)
    # name, first shape, and transposed (forward) or output_mask (backward: x and w need grads)
    kinds = sorted((k[0], k[1][0], k[2][3] if k[0] == "aten::convolution" else k[2][-1])
                   for k in calls)
    assert kinds == [("aten::convolution", (1, 3, 12, 12), False),
                     ("aten::convolution", (1, 5, 6, 6), True),
                     ("aten::convolution_backward", (1, 5, 6, 6), (True, True, False))]
    assert all(n == 1 for n in calls.values())
    for key in calls:  # each replays with its own arguments, in both layouts
        assert profile_step.time_conv(key, False, repeats=2) > 0
        assert profile_step.time_conv(key, True, repeats=2) > 0


def test_gpu_bench_runs_each_case_in_its_own_process_on_the_cpu_without_cuda(tmp_path):
    import subprocess

    tiny = ["--set", "model.ngf=8", "--set", "model.n_blocks=1", "--set", "model.ndf=8"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--size", "32", "--steps", "2",
         "--apply-size", "32", "--apply-images", "2", "--ngf", "8", "--blocks", "1",
         "--train", "fp16,fp32", "--apply", "fp32", "--json", "--cli-profile",
         str(tmp_path / "cli.prof"), *tiny],
        capture_output=True, text=True, timeout=600, check=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["device"] == "CPU (no CUDA device)"
    assert result["train/fp32"]["precision"] == "no" and result["train/fp32"]["median_s"] > 0
    assert result["train/fp16"] == {"error": "fp16 training needs a CUDA device"}
    assert result["apply/fp32"]["img_s"] > 0 and result["apply/fp32"]["alone_img_s"] > 0
    # translate train's own rate on the fp32 case's config, checked against that row (the
    # first case, fp16, is refused on a CPU)
    assert result["cli_s"] > 0
    ratio = result["cli_s"] / result["train/fp32"]["median_s"]
    assert result["self_check_pass"] is (abs(ratio - 1) <= 0.15)
    assert "| train/fp32 |" in proc.stdout and "self-check: bench" in proc.stdout
    assert ("PASS" if result["self_check_pass"] else "FAIL") in proc.stdout
    # --cli-profile: the same translate train run again under cProfile, its stats kept
    assert (tmp_path / "cli.prof").stat().st_size > 0
    assert "translate train under cProfile" in proc.stdout and "function calls" in proc.stdout
