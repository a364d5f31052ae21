"""End-to-end training: every recipe through the CLI, exact resume, samples, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_CUT, TINY_CYCLEGAN, random_image_folder, run_cli
from PIL import Image
from safetensors.torch import load_file

from translate import config
from translate import recipe as recipe_mod
from translate.errors import ConfigError
from translate.runner import train

RECIPES = sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))


def tiny_overrides(recipe: str, data: Path, folder: Path) -> list[str]:
    text = (ROOT / "recipes" / recipe).read_text()
    if 'method = "cyclegan"' in text:
        return TINY_CYCLEGAN + [f'data.root="{data}"']
    if 'method = "cut"' in text:
        return TINY_CUT + [f'data.root="{data}"']
    if 'net = "mlp"' in text:
        return ["model.hidden=16", "train.batch_size=8"]
    if 'method = "cgan"' in text:  # labels come from class subfolders
        folder = folder.parent / "classes"
        random_image_folder(folder / "a", n=4)
        random_image_folder(folder / "b", n=4)
    return ["model.ngf=4", "model.ndf=4", "model.image_size=32", "data.crop_size=32",
            "model.z_dim=8", "train.batch_size=4", f'data.root="{folder}"']


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.slow
def test_every_recipe_trains_through_the_cli(recipe, tiny_unpaired, tmp_path):
    folder = random_image_folder(tmp_path / "images")
    run = tmp_path / "run"
    sets = [a for o in tiny_overrides(recipe, tiny_unpaired, folder) for a in ("--set", o)]
    proc = run_cli("train", f"recipes/{recipe}", *sets, "--steps", "2", "--run-dir", str(run),
                   "--log-every", "1", "--sample-every", "2", "--save-every", "2",
                   "--no-progress")
    assert "done: 2 steps" in proc.stdout
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2]
    assert all(isinstance(v, (int, float)) for r in logs for v in r.values())
    assert (run / "samples" / "step_0000002.png").is_file()
    assert (run / "checkpoints" / "step_0000002" / "state.json").is_file()
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 2


def _cfg(recipe: str, run: Path, steps: int, sets: list[str],
         mixed_precision: str = "no") -> config.RunConfig:
    """A run whose numbers are compared: its precision is named, never "auto" (which differs
    between CPUs with and without native bf16)."""
    return recipe_mod.load(ROOT / "recipes" / recipe, sets + [
        f"train.steps={steps}", f'run_dir="{run}"', "train.save_every=3", "train.log_every=1",
        "train.sample_every=100", 'train.lr_schedule="constant"',
        f'train.mixed_precision="{mixed_precision}"'])


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def _losses(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


WGAN_TOY = ["model.hidden=16", "train.batch_size=8", "train.ema=0.9"]
# identity_until, like a linear LR, follows the run's length, which the resume changes
CYCLEGAN_TINY = TINY_CYCLEGAN + ["model.identity_until=0"]


@pytest.mark.parametrize("recipe,sets,mixed_precision", [
    *[(recipe, sets, mp) for recipe, sets in [("toy_wgan_gp_ring.toml", WGAN_TOY),
                                              ("cyclegan_demo.toml", CYCLEGAN_TINY)]
      for mp in ("no", "bf16")],
    # the full unrolled GAN's G phase starts from D's optimizer state, which the resume restores
    ("toy_gan_ring.toml", ["model.hidden=16", "train.batch_size=8", "model.unrolled_steps=2",
                           "model.unrolled_backprop=true"], "no"),
    # compiled, as train.compile auto runs long bf16 CycleGAN runs (three compiles of 4 nets:
    # minutes on 2 cores, so in bf16 only, the precision auto compiles in)
    pytest.param("cyclegan_demo.toml", CYCLEGAN_TINY + ["train.compile=true"], "bf16",
                 marks=pytest.mark.slow),
])
def test_resume_is_exact(recipe, sets, mixed_precision, tiny_unpaired, tmp_path):
    """train(6) == train(3) + resume + train(3): same losses, weights, pools, EMA; in fp32 and
    in bf16 alike (the same precision on both sides: the same arithmetic in the same order)."""
    sets = sets + [f'data.root="{tiny_unpaired}"'] if "cyclegan" in recipe else sets
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg(recipe, straight, 6, sets, mixed_precision), progress=False)
    train(_cfg(recipe, split, 3, sets, mixed_precision), progress=False)
    result = train(_cfg(recipe, split, 6, sets, mixed_precision), resume="auto", progress=False)
    assert result.step == 6
    a, b = _weights(straight, 6), _weights(split, 6)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    la, lb = _losses(straight), _losses(split)
    assert [r["step"] for r in lb] == list(range(1, 7))  # log truncated and continued
    # Each start's first record says its length: the extension 3 -> 6 is in the log.
    assert [r.get("run/steps") for r in lb] == [3, None, None, 6, None, None]
    for ra, rb in zip(la, lb):
        for k in ra:
            if "/" in k and not k.startswith("run/"):  # run/...: facts of each start
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (k, ra["step"])


def test_compile_auto_is_on_for_long_cyclegan_runs_in_bf16_only(tiny_unpaired, tmp_path,
                                                                 monkeypatch):
    from torch._dynamo.eval_frame import OptimizedModule

    from translate import runner
    from translate.core import machine

    def session(recipe: str, *sets: str):
        return runner.setup(recipe_mod.load(ROOT / "recipes" / recipe, [
            'train.mixed_precision="bf16"', *sets, f'run_dir="{tmp_path / "run"}"',
            "train.steps=10"]))

    cyclegan = [*TINY_CYCLEGAN, f'data.root="{tiny_unpaired}"']
    assert recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml").train.compile == "auto"
    short = session("cyclegan_demo.toml", *cyclegan)
    assert not short.compiled and "10 steps, under 5,000" in short.compile_why
    monkeypatch.setattr(machine, "AUTO_COMPILE_STEPS", 10)
    long = session("cyclegan_demo.toml", *cyclegan)
    assert long.compiled and all(isinstance(n, OptimizedModule) for n in long.nets.values())
    # CycleGAN's 4 nets compile 8 variants through one accelerate wrapper: room beyond torch's 8.
    assert torch._dynamo.config.recompile_limit >= 16
    # Not measured to gain (and a penalty's double backward torch.compile cannot do at all).
    penalty = session("wgan_gp.toml", "model.ngf=4", "model.ndf=4", "model.image_size=32",
                      "data.crop_size=32", f'data.root="{random_image_folder(tmp_path / "i")}"')
    assert not penalty.compiled and "not measured to pay for wgan_gp" in penalty.compile_why
    fp32 = session("cyclegan_demo.toml", *cyclegan, 'train.mixed_precision="no"')
    assert not fp32.compiled and "only for bf16 on a CPU" in fp32.compile_why  # 0.88x there
    off = session("cyclegan_demo.toml", *cyclegan, "train.compile=false")
    assert not off.compiled and not any(isinstance(n, OptimizedModule) for n in off.nets.values())


def test_samples_scores_and_health_checks_of_a_compiled_run_run_eager(tiny_unpaired, tmp_path):
    """Through the compiled nets each of them (no grad, eval mode, other batch sizes and
    layouts) was one more graph to compile: a compiled 200-step demo run took 237 s, 74 s
    without them, with the same losses and scores (AVX2 EPYC, fp32)."""
    from torch._dynamo.eval_frame import OptimizedModule

    from translate import runner
    from translate.core.session import shown_nets

    s = runner.setup(recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml", [
        *TINY_CYCLEGAN, f'data.root="{tiny_unpaired}"', "train.compile=true",
        'train.mixed_precision="no"', f'run_dir="{tmp_path / "run"}"', "train.steps=2"]))
    assert s.compiled and all(isinstance(n, OptimizedModule) for n in s.nets.values())
    shown = shown_nets(s)
    assert shown.keys() == s.nets.keys()
    for name, net in shown.items():
        assert not isinstance(net, OptimizedModule), name
        assert [p.data_ptr() for p in net.parameters()] == [
            p.data_ptr() for p in s.nets[name].parameters()]  # the trained weights themselves


def test_resume_changes_nothing_when_weights_differ_detects_real_training(tmp_path):
    """Guard for the test above: two different seeds do give different weights."""
    sets = ["model.hidden=16", "train.batch_size=8"]
    train(_cfg("toy_gan_ring.toml", tmp_path / "a", 3, sets + ["seed=1"]), progress=False)
    train(_cfg("toy_gan_ring.toml", tmp_path / "b", 3, sets + ["seed=2"]), progress=False)
    a, b = _weights(tmp_path / "a", 3), _weights(tmp_path / "b", 3)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_refuses_another_recipe(tmp_path):
    run = tmp_path / "run"
    train(_cfg("toy_gan_ring.toml", run, 3, ["model.hidden=16"]), progress=False)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    proc = run_cli("train", "recipes/toy_gan_ring.toml", "--set", "model.hidden=32",
                   "--run-dir", str(run), "--steps", "4", "--resume", "auto", check=False)
    assert proc.returncode == 2
    assert "different recipe" in proc.stderr and "Traceback" not in proc.stderr
    # Nothing of the run changed: its checkpoint, and the config.json that export reads.
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before


@pytest.mark.slow
def test_sample_and_interpolate(tmp_path):
    run = tmp_path / "run"
    run_cli("train", "recipes/dcgan.toml", "--set", "model.ngf=4", "--set", "model.ndf=4",
            "--set", "model.image_size=32", "--set", "data.crop_size=32", "--set",
            "model.z_dim=8", "--data", str(random_image_folder(tmp_path / "img")), "--batch-size",
            "4", "--steps", "2", "--run-dir", str(run))
    run_cli("sample", str(run), "--n", "16", "--out", str(tmp_path / "grid.png"))
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size == (4 * 34 + 2, 4 * 34 + 2)  # 4x4 images of 32 px with 2 px borders
    run_cli("sample", str(run), "--n", "20", "--interpolate", "--out", str(tmp_path / "i.png"))
    strip = Image.open(tmp_path / "i.png")
    assert strip.size == (10 * 34 + 2, 2 * 34 + 2)  # 2 rows of 10 steps


def test_interpolation_endpoints():
    from translate.explore.sample import interpolation_codes, slerp

    g = torch.Generator().manual_seed(0)
    z = interpolation_codes(8, rows=3, steps=5, generator=g).reshape(3, 5, 8)
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(3, 1, 8, generator=g), torch.randn(3, 1, 8, generator=g)
    torch.testing.assert_close(z[:, 0], z0[:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(z[:, -1], z1[:, 0], atol=1e-5, rtol=0)
    mid = slerp(z0, z1, torch.tensor(0.5))
    lin = 0.5 * (z0 + z1)
    assert (mid.norm(dim=-1) > lin.norm(dim=-1)).all()  # slerp keeps the norm up


def test_dry_run_prints_resolved_config():
    proc = run_cli("train", "recipes/cyclegan_horse2zebra.toml", "--dry-run", "--steps", "7",
                   "--set", "model.lambda_cycle=5")
    cfg = json.loads(proc.stdout)
    assert cfg["train"]["steps"] == 7 and cfg["model"]["lambda_cycle"] == 5.0
    assert cfg["model"]["n_blocks"] == 9


def test_set_steps_counts_where_the_run_counts_steps():
    # The paper recipes count epochs, which override steps: --set train.steps alone is refused
    # (above); with the epochs set to 0 (as --steps does), or for a run counted in steps, as a
    # resumed run's config.json may be, it counts.
    proc = run_cli("train", "recipes/cyclegan_horse2zebra.toml", "--dry-run", "--set",
                   "train.steps=5", "--set", "train.epochs=0", "--set", "train.epochs_decay=0")
    assert json.loads(proc.stdout)["train"]["steps"] == 5
    resumed = recipe_mod.load(ROOT / "recipes" / "cyclegan_horse2zebra.toml",
                              ["train.epochs=0", "train.epochs_decay=0", "train.steps=9"])
    recipe_mod.refuse_ignored_steps(resumed, steps_given=True)
    with pytest.raises(ConfigError, match="train.steps: ignored"):
        recipe_mod.refuse_ignored_steps(recipe_mod.load(
            ROOT / "recipes" / "cyclegan_horse2zebra.toml"), steps_given=True)


@pytest.mark.parametrize("args,needle", [
    (["--set", "train.stepz=3"], "train.stepz: unknown key"),
    (["--set", 'train.steps="ten"'], "train.steps: expected an integer"),
    (["--set", "train.steps=500"], "train.steps: ignored, as this run counts its length in epochs"),
    (["--batch-size", "0"], "train.batch_size: must be > 0"),
    (["--set", "data.crop_size=300"], "data.crop_size"),
    (["--mixed-precision", "fp16"], "fp16 is not available on CPU"),
    (["--mixed-precision", "fp16", "--dry-run"], "fp16 is not available on CPU"),
    (["--data", "/nonexistent/folder"], "/nonexistent/folder"),
])
def test_cli_errors_are_one_line(args, needle, tmp_path):
    proc = run_cli("train", "recipes/cyclegan_horse2zebra.toml", *args, "--run-dir",
                   str(tmp_path / "r"), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists() and proc.stdout == ""


@pytest.mark.parametrize("extra", [
    ['model.diff_augment="color,translation,cutout"', "train.ema=0.9"],
    ['model.generator="unet"', "model.unet_downs=4", "model.objective=\"hinge\"",
     "model.pool_size=0", "model.lambda_identity=0.0", "train.grad_accum=2"],
])
@pytest.mark.slow
def test_cyclegan_options_train_through_the_cli(extra, tiny_unpaired, tmp_path):
    """DiffAugment on D's inputs, EMA, U-Net generators, another objective, no pool, and
    gradient accumulation, each in a real CycleGAN run."""
    sets = [a for o in TINY_CYCLEGAN + extra + [f'data.root="{tiny_unpaired}"']
            for a in ("--set", o)]
    run = tmp_path / "run"
    run_cli("train", "recipes/cyclegan_demo.toml", *sets, "--steps", "2", "--run-dir", str(run),
            "--log-every", "1")
    logs = _losses(run)
    assert len(logs) == 2 and all(r["G/loss"] > 0 for r in logs)
    cfg = json.loads((run / "config.json").read_text())
    for item in extra:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        assert str(cfg[section][name]).lower() == value.strip('"').lower()


@pytest.mark.slow
def test_a_run_shorter_than_its_log_interval_still_logs_a_curve(tmp_path):
    """--steps 20 with the toy recipe's log_every 250 and sample_every 1000: the run logs every
    2 steps and samples every 5, says so once (after the run: a refused run prints only its
    error line), and keeps an interval the user gave."""
    args = ["train", "recipes/toy_gan_ring.toml", "--set", "model.hidden=16", "--steps", "20",
            "--no-progress"]
    proc = run_cli(*args, "--run-dir", str(tmp_path / "a"))
    assert proc.stderr.count("note: a run of 20 steps is shorter than the recipe's intervals: "
                             "train.log_every 250 -> 2, train.sample_every 1000 -> 5") == 1
    records = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(2, 21, 2))
    assert len(list((tmp_path / "a" / "samples").glob("step_*.png"))) == 4
    saved = json.loads((tmp_path / "a" / "config.json").read_text())["train"]
    assert (saved["log_every"], saved["sample_every"]) == (2, 5)
    proc = run_cli(*args, "--run-dir", str(tmp_path / "b"), "--log-every", "250")
    assert "train.log_every" not in proc.stderr
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 1
