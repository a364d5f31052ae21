"""Class-conditional GAN: labels from class subfolders (pure in k, sharded, resumed), class names
in the run and its export, `translate sample --class`, and conditioning that works."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, set_args
from PIL import Image
from safetensors import safe_open

from translate import config
from translate import recipe as recipe_mod
from translate.data import batches, build_dataset
from translate.errors import UserError
from translate.explore.sample import sample_command
from translate.export import load_generator, run_generators
from translate.methods.cgan import generator_input
from translate.runner import train

# Two classes that differ at a glance: noisy blue and noisy red squares, in [-1, 1] RGB.
COLOURS = {"blue": (30, 60, 220), "red": (220, 40, 30)}
TINY = ["model.ngf=16", "model.ndf=16", "model.z_dim=8", "train.batch_size=16",
        "train.lr_g=1e-3", "train.lr_d=1e-3", "train.log_every=10", "train.sample_every=50",
        "train.save_every=50"]


def class_folder(root: Path, n: int = 8, size: int = 32) -> Path:
    rng = np.random.default_rng(0)
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            noisy = np.array(colour) + rng.normal(0, 20, (size, size, 3))
            Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def colour_of(name: str) -> torch.Tensor:
    return torch.tensor(COLOURS[name], dtype=torch.float32) / 127.5 - 1


def cfg_for(root: Path, run: Path, steps: int, extra: list[str] | None = None):
    return recipe_mod.load(ROOT / "recipes" / "cgan.toml", TINY + [
        f'data.root="{root}"', f'run_dir="{run}"', f"train.steps={steps}", *(extra or [])])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return class_folder(tmp_path_factory.mktemp("cgan") / "colours")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """100 steps on blue vs red (about 15 s on one thread)."""
    run = tmp_path_factory.mktemp("cgan_run") / "run"
    train(cfg_for(data, run, 100), progress=False)
    return run


# ---------------------------------------------------------------------------- data and config


def test_classes_come_from_sorted_subfolders_and_reach_config_json(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "r", 1)
    assert cfg.model.classes == ("blue", "red")
    config.save(cfg, tmp_path / "config.json")
    again = recipe_mod.load_json(tmp_path / "config.json")  # no data needed any more
    assert again == cfg
    # An explicit list picks and orders the classes.
    cfg = cfg_for(data, tmp_path / "r", 1, ['model.classes=["red", "blue"]'])
    assert build_dataset(cfg)[0]["y"].dtype == torch.int64
    assert cfg.model.classes == ("red", "blue")
    with pytest.raises(UserError, match="model.classes: expected a list"):
        cfg_for(data, tmp_path / "r", 1, ["model.classes=red"])
    with pytest.raises(UserError, match="'red' is listed twice"):
        cfg_for(data, tmp_path / "r", 1, ['model.classes=["red", "red"]'])


def test_labels_match_the_images_and_are_pure_in_k(data, tmp_path):
    cfg = cfg_for(data, tmp_path / "r", 1)
    ds = build_dataset(cfg)
    assert len(ds) == 16 and "2 classes (blue 8, red 8)" in ds.describe()
    for k in range(40):  # 2.5 epochs: every image, in several shuffles
        item = ds[k]
        mean = item["x"].mean((1, 2))
        nearest = min(COLOURS, key=lambda c: float((mean - colour_of(c)).norm()))
        assert cfg.model.classes[int(item["y"])] == nearest
    again = build_dataset(cfg)
    assert all(int(ds[k]["y"]) == int(again[k]["y"]) for k in range(40))
    # Two ranks with batch 4 together see what one rank with batch 8 sees, labels included.
    one = next(batches(ds, 8, start_batch=3))
    two = [next(batches(ds, 4, start_batch=3, rank=r, world_size=2)) for r in (0, 1)]
    torch.testing.assert_close(torch.cat([b["y"] for b in two]), one["y"])
    torch.testing.assert_close(torch.cat([b["x"] for b in two]), one["x"])


def test_a_folder_without_class_subfolders_is_a_one_line_error(data, tmp_path):
    flat = data / "red"  # images, no subfolders
    proc = run_cli("train", "recipes/cgan.toml", "--data", str(flat), "--steps", "1",
                   "--run-dir", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(flat) in lines[0] and "subfolder" in lines[0], proc.stderr
    assert "<class>" in lines[0]  # says how to fix it
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="no class folder 'cow'"):
        build_dataset(cfg_for(data, tmp_path / "r", 1, ['model.classes=["red", "cow"]']))


def test_images_outside_the_class_folders_are_refused(tmp_path):
    root = class_folder(tmp_path / "c", n=2)
    Image.new("RGB", (32, 32)).save(root / "stray.png")
    with pytest.raises(UserError, match="outside the class subfolders"):
        build_dataset(cfg_for(root, tmp_path / "r", 1))


# ---------------------------------------------------------------------------- training


def test_labels_steer_the_generator(trained):
    """After 100 steps on blue vs red, each class's samples are nearer its own colour, and the
    same z gives different images for different labels."""
    cfg, nets, _ = run_generators(trained)
    z = torch.randn(64, cfg.model.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = {c: nets["G"](generator_input(z, torch.full((64,), i), 2))
             for i, c in enumerate(cfg.model.classes)}
    assert (x["blue"] - x["red"]).abs().mean() > 0.1
    for name, images in x.items():
        means = images.mean((2, 3))  # one mean colour per sample
        own = (means - colour_of(name)).norm(dim=1)
        other = (means - colour_of("red" if name == "blue" else "blue")).norm(dim=1)
        assert (own < other).float().mean() >= 0.9, (name, own.mean(), other.mean())


@pytest.mark.slow
def test_cli_resume_sample_export(trained, data, tmp_path):
    run = tmp_path / "run"
    sets = set_args(TINY)
    run_cli("train", "recipes/cgan.toml", *sets, "--data", str(data), "--run-dir", str(run),
            "--steps", "2", "--save-every", "2")
    proc = run_cli("train", "recipes/cgan.toml", *sets, "--data", str(data), "--run-dir",
                   str(run), "--steps", "4", "--save-every", "2", "--resume", "auto")
    assert "done: 4 steps" in proc.stdout
    assert (run / "checkpoints" / "step_0000004" / "state.json").is_file()

    run_cli("sample", str(trained), "--class", "red", "--n", "9", "--out", str(tmp_path / "r.png"))
    assert Image.open(tmp_path / "r.png").size == (3 * 34 + 2, 3 * 34 + 2)
    red = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"), dtype=float)[2:34, 2:34]
    assert red[..., 0].mean() > red[..., 2].mean()  # the trained run draws red for "red"
    run_cli("sample", str(trained), "--n", "16", "--out", str(tmp_path / "all.png"))
    assert Image.open(tmp_path / "all.png").size == (4 * 34 + 2, 2 * 34 + 2)  # a row per class

    proc = run_cli("sample", str(trained), "--class", "cow", "--out", str(tmp_path / "x.png"),
                   check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "valid: blue, red" in lines[0]
    for kwargs, needle in [({"vary_code": 0}, "infogan"), ({"interpolate": True}, "--class")]:
        with pytest.raises(UserError, match=needle):
            sample_command(trained, out=tmp_path / "x.png", **kwargs)
    assert not (tmp_path / "x.png").exists()
    proc = run_cli("invert", str(trained), str(tmp_path / "r.png"), "--out",
                   str(tmp_path / "inv.png"), check=False)
    assert proc.returncode == 2 and "takes labels or codes" in proc.stderr.strip().splitlines()[0]
    assert not (tmp_path / "inv.png").exists()

    run_cli("export", str(trained), "--out", str(tmp_path / "export"))
    path = tmp_path / "export" / "G.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["classes"]) == ["blue", "red"] and meta["noise_dim"] == "8"
    assert meta["z_dim"] == "10"  # noise + one-hot label
    with pytest.raises(UserError, match="translate sample"):
        load_generator(path)


@pytest.mark.parametrize("method", ["cgan", "infogan"])
def test_conditional_gans_build_their_nets_once(method, data, tmp_path, monkeypatch):
    """cgan and infogan build their own G and D through build_nets, not GAN's plain ones
    first and then replacements: one G and one D, each initialised once."""
    import importlib

    from translate.methods import METHODS, gan

    built = []
    for module in (gan, importlib.import_module(f"translate.methods.{method}")):
        real = module.build_net
        monkeypatch.setattr(module, "build_net", lambda kind, _real=real, **kw: (
            built.append(kind), _real(kind, **kw))[1])
    sets = TINY if method == "cgan" else []
    cfg = recipe_mod.load(ROOT / "recipes" / f"{method}.toml",
                          sets + [f'data.root="{data}"', f'run_dir="{tmp_path / "r"}"'])
    nets = METHODS[cfg.method].build(cfg).nets
    assert sorted(built) == ["dcgan_d", "dcgan_g"], built
    assert set(nets) == {"G", "D"}
