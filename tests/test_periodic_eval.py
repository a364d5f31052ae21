"""Scores during training (train.eval_every): written at the right steps, equal to the same
score computed afterwards from the checkpoint, without changing the training itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, run_cli, set_args, tiny_sets
from PIL import Image
from safetensors.torch import load_file

from translate import recipe as recipe_mod
from translate.eval.evaluate import eval_toy_run
from translate.explore.plot import group_keys, parse_log
from translate.export import run_generators
from translate.runner import train

TOY = [*tiny_sets("toy"), "train.log_every=4", "train.save_every=3", "train.sample_every=100",
       "train.steps=6"]


def _toy(run: Path, *sets: str) -> list[dict]:
    cfg = recipe_mod.load(ROOT / "recipes" / "toy_gan_ring.toml", TOY + [f'run_dir="{run}"', *sets])
    train(cfg, progress=False)
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    return {f"{f.name}/{k}": v for f in sorted(ckpt.glob("*.safetensors"))
            for k, v in load_file(str(f)).items()}


def test_toy_scores_at_eval_steps_match_the_checkpoints_and_change_nothing(tmp_path):
    logs = _toy(tmp_path / "eval", "train.eval_every=3")
    # Logged at log steps (4) and eval steps (3, and the last one, 6).
    assert [r["step"] for r in logs] == [3, 4, 6]
    scored = {r["step"]: r for r in logs if "eval/modes" in r}
    assert sorted(scored) == [3, 6] and "eval/hq" not in logs[1]
    for step, r in scored.items():
        assert r["eval/modes"] in range(9) and 0.0 <= r["eval/hq"] <= 1.0
        assert r["eval/rkl"] == "inf" if r["eval/hq"] == 0 else 0 <= r["eval/rkl"] <= math.log(8)
        # The same PacGAN protocol run afterwards on the checkpoint of that step.
        ref = eval_toy_run(tmp_path / "eval", step=step)
        assert (r["eval/modes"], r["eval/hq"]) == (ref["modes"], pytest.approx(ref["hq"]))
        assert str(r["eval/rkl"]) == str(ref["rkl"]) or r["eval/rkl"] == pytest.approx(ref["rkl"])

    # Off by default (the recipe has no eval_every), and evaluating leaves training untouched.
    plain = _toy(tmp_path / "plain")
    assert [r["step"] for r in plain] == [4, 6]
    assert not any(k.startswith("eval/") for r in plain for k in r)
    assert not (tmp_path / "plain" / "tracking").exists()  # no tracker unless asked either
    for step in (3, 6):
        a, b = _weights(tmp_path / "eval", step), _weights(tmp_path / "plain", step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    by_step = {r["step"]: r for r in logs}
    assert all(by_step[r["step"]]["G/loss"] == r["G/loss"] for r in plain)


def _psnr_by_hand(G: torch.nn.Module, root: Path) -> float:
    """Mean per-image PSNR of G(testA) against testB, in numpy, from the PNG files."""
    values = []
    for path in sorted((root / "testA").glob("*.png")):
        a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 127.5 - 1
        b = np.asarray(Image.open(root / "testB" / path.name).convert("RGB"),
                       dtype=np.float64) / 127.5 - 1
        with torch.no_grad():
            x = torch.from_numpy(a).permute(2, 0, 1)[None].float()
            fake = G(x).clamp(-1, 1)[0].permute(1, 2, 0).double().numpy()
        mse = np.mean((fake - b) ** 2)
        values.append(10 * np.log10(2.0**2 / mse))
    return float(np.mean(values))


@pytest.mark.slow
def test_cyclegan_psnr_during_training_equals_an_independent_computation(tiny_unpaired,
                                                                        tmp_path):
    run = tmp_path / "run"
    sets = set_args(TINY_CYCLEGAN)
    run_cli("train", "recipes/cyclegan_demo.toml", *sets, "--data", str(tiny_unpaired),
            "--steps", "4", "--run-dir", str(run), "--log-every", "3", "--save-every", "2",
            "--sample-every", "100", "--eval-every", "2", "--no-progress",
            "--mixed-precision", "no")  # compared with fp32 computations below, to 1e-6
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [2, 3, 4]
    assert [r["step"] for r in logs if "eval/psnr" in r] == [2, 4]
    for r in logs:
        if "eval/psnr" not in r:
            continue
        _, nets, _ = run_generators(run, r["step"], False)
        assert r["eval/psnr"] == pytest.approx(_psnr_by_hand(nets["G_ab"].eval(), tiny_unpaired),
                                               abs=1e-3)
        assert 5 < r["eval/psnr"] < 40
        out = run_cli("eval", str(run), "--step", str(r["step"]), "--json")
        assert json.loads(out.stdout)["psnr"] == pytest.approx(r["eval/psnr"], abs=1e-6)
    # `translate plot` gives the scores a panel of their own, drawn as one line.
    log = parse_log((run / "log.jsonl").read_text().splitlines())
    assert group_keys(list(log.series))["eval"] == ["eval/psnr"]
    assert log.present["eval/psnr"].tolist() == [True, False, True]
    assert run_cli("plot", str(run)).returncode == 0 and (run / "plot.png").is_file()


@pytest.mark.slow
def test_image_gan_kid_needs_held_out_images(tiny_unpaired, tmp_path):
    sets = ["model.ngf=4", "model.ndf=4", "model.image_size=32", "data.crop_size=32",
            "model.z_dim=8", "train.batch_size=4"]
    args = ["train", "recipes/dcgan.toml", *set_args(sets), "--data",
            str(tiny_unpaired / "trainA"), "--steps", "2", "--eval-every", "2", "--no-progress"]
    proc = run_cli(*args, "--run-dir", str(tmp_path / "bad"), check=False)
    assert proc.returncode == 2 and "train.eval_data" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()
    run = tmp_path / "run"
    run_cli(*args, "--run-dir", str(run), "--set", f'train.eval_data="{tiny_unpaired / "testA"}"')
    last = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 2 and math.isfinite(last["eval/kid"])
    assert last["eval/kid_lo"] <= last["eval/kid_hi"]  # its subset-bootstrap interval
    protocol = json.loads((run / "eval_protocol.json").read_text())
    assert protocol["images"] == {"generated": 4, "reference": 4}
    assert protocol["image_size"] == "32x32 px" and len(protocol["features_sha256"]) == 64


@pytest.mark.slow
def test_scores_and_tracker_under_2_processes(tmp_path):
    """Rank 0 scores and logs alone while rank 1 waits for it at the next gradient all-reduce:
    no collective inside the evaluation, so nothing hangs, and each score is logged once."""
    pytest.importorskip("tensorboard")
    from test_distributed import launch

    run = tmp_path / "run"
    proc = launch([ROOT / "cli.py", "train", "recipes/toy_gan_ring.toml", "--set",
                   "model.hidden=16", "--batch-size", "4", "--steps", "4", "--run-dir", run,
                   "--log-every", "2", "--eval-every", "2", "--save-every", "4",
                   "--sample-every", "100", "--no-progress", "--log-with", "tensorboard"])
    assert "x 2 processes" in proc.stderr + proc.stdout
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "eval/hq" in r] == [2, 4]
    assert logs[-1]["eval/hq"] == pytest.approx(eval_toy_run(run, step=4)["hq"])
    assert len(list((run / "tracking").rglob("events.out.tfevents.*"))) == 2  # scalars, hparams
