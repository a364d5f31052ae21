"""CycleGAN details the end-to-end tests leave open: the paper's settings in the horse2zebra
recipe, a run with a 1-channel domain through train/export/apply, dropout in the ResNet
generator (unit checks and a run), and the labelled sample grids."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, run_cli
from PIL import Image
from safetensors import safe_open
from torch import nn

import translate
from translate import recipe as recipe_mod
from translate import viz
from translate.export import export_run
from translate.methods import METHODS
from translate.nets import build_net
from translate.nets.resnet import ResidualBlock


def test_horse2zebra_recipe_has_the_papers_settings():
    """Zhu et al. 2017 / the reference implementation's defaults, as `translate train` resolves
    them (no --steps, so the epochs stay)."""
    proc = run_cli("train", "recipes/cyclegan_horse2zebra.toml", "--dry-run")
    cfg = json.loads(proc.stdout)
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    assert cfg["method"] == "cyclegan"
    assert (t["epochs"], t["epochs_decay"], t["lr_schedule"]) == (100, 100, "linear")
    assert m["pool_size"] == 50
    assert (m["lambda_cycle"], m["lambda_identity"]) == (10.0, 0.5)
    assert t["optimizer"] == "adam" and t["lr_g"] == t["lr_d"] == 2e-4
    assert t["betas_g"] == t["betas_d"] == [0.5, 0.999]
    assert m["objective"] == "lsgan"
    assert (m["generator"], m["n_blocks"], m["ngf"], m["upsample"]) == ("resnet", 9, 64,
                                                                         "transpose")
    assert (m["ndf"], m["n_layers_d"], m["norm"], m["dropout"]) == (64, 3, "instance", 0.0)
    assert (d["preprocess"], d["load_size"], d["crop_size"], d["flip"]) == (
        "resize_and_crop", 286, 256, True)
    assert t["batch_size"] == 1 and m["diff_augment"] == "" and t["ema"] == 0.0


def _noise_pngs(folder: Path, n: int, mode: str, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (16, 16) if mode == "L" else (16, 16, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
            folder / f"{i}.png")


@pytest.fixture(scope="module")
def gray_to_rgb(tmp_path_factory) -> Path:
    """trainA/testA grayscale ('L' PNGs), trainB/testB RGB."""
    root = tmp_path_factory.mktemp("gray2rgb")
    for split, n in (("train", 6), ("test", 2)):
        _noise_pngs(root / f"{split}A", n, "L", seed=len(split))
        _noise_pngs(root / f"{split}B", n, "RGB", seed=10 + len(split))
    return root


def _train(root: Path, run: Path, extra: list[str], steps: int = 3):
    sets = [a for o in TINY_CYCLEGAN + extra + [f'data.root="{root}"'] for a in ("--set", o)]
    return run_cli("train", "recipes/cyclegan_demo.toml", *sets, "--steps", str(steps),
                   "--run-dir", str(run), "--log-every", "1", "--sample-every", str(steps),
                   "--no-progress")


def _logs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_one_channel_domain_trains_exports_and_applies(gray_to_rgb, tmp_path):
    run = tmp_path / "run"
    proc = _train(gray_to_rgb, run, ["data.channels_a=1", "data.channels_b=3",
                                     "model.lambda_identity=0"])
    assert "done: 3 steps" in proc.stdout
    logs = _logs(run)
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert all(np.isfinite(r["G/loss"]) and np.isfinite(r["D/loss"]) for r in logs)
    assert not any("idt" in key for r in logs for key in r)  # no identity loss across channels
    assert (run / "samples" / "step_0000003.png").is_file()

    run_cli("export", str(run), "--out", str(tmp_path / "export"))
    expected = {"G_ab": ("1", "3"), "G_ba": ("3", "1")}
    for name, (cin, cout) in expected.items():
        with safe_open(str(tmp_path / "export" / f"{name}.safetensors"), framework="pt") as f:
            meta = f.metadata()
        assert (meta["in_channels"], meta["out_channels"]) == (cin, cout), name

    out = tmp_path / "out"
    run_cli("apply", str(tmp_path / "export" / "G_ab.safetensors"), str(gray_to_rgb / "testA"),
            str(out), "--no-progress")
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]
    for p in out.iterdir():
        img = Image.open(p)
        assert img.size == (16, 16) and img.mode == "RGB", (p, img.mode)
    # and back: G_ba makes 1-channel images of RGB ones
    G_ba = translate.load_generator(tmp_path / "export" / "G_ba.safetensors")
    rgb = np.array(Image.open(gray_to_rgb / "testB" / "0.png"))
    assert G_ba(rgb).shape == (16, 16, 1)


def _blocks(net: nn.Module) -> list[ResidualBlock]:
    return [m for m in net.modules() if isinstance(m, ResidualBlock)]


def test_resnet_dropout_sits_in_every_residual_block():
    net = build_net("resnet", ngf=4, n_blocks=3, dropout=0.5)
    blocks = _blocks(net)
    assert len(blocks) == 3
    for block in blocks:
        drops = [m for m in block.body if isinstance(m, nn.Dropout)]
        assert len(drops) == 1 and drops[0].p == 0.5
        # between the two convolutions, after the first ReLU
        kinds = [type(m) for m in block.body]
        assert kinds.index(nn.Dropout) == kinds.index(nn.ReLU) + 1
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 3  # nowhere else
    plain = build_net("resnet", ngf=4, n_blocks=3)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    # dropout has no weights: the parameter count is the same
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())


def test_resnet_dropout_is_random_in_train_mode_and_off_in_eval():
    torch.manual_seed(0)
    net = build_net("resnet", ngf=4, n_blocks=2, dropout=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    with torch.no_grad():
        first = net(x)
        assert torch.equal(first, net(x))
    # eval mode is exactly train mode with p = 0 (instance norm keeps no running statistics)
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    net.train()
    with torch.no_grad():
        assert torch.equal(net(x), first)


def test_cyclegan_trains_with_dropout(tiny_unpaired, tmp_path):
    run = tmp_path / "run"
    proc = _train(tiny_unpaired, run, ["model.dropout=0.5"], steps=2)
    assert "done: 2 steps" in proc.stdout
    assert json.loads((run / "config.json").read_text())["model"]["dropout"] == 0.5
    assert all(np.isfinite(r["G/loss"]) for r in _logs(run))
    export_run(run, out=tmp_path / "export")
    with safe_open(str(tmp_path / "export" / "G_ab.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["dropout"] == 0.5
    # the exported generator runs deterministically (dropout off at inference)
    gen = translate.load_generator(tmp_path / "export" / "G_ab.safetensors", precision="fp32")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(gen(x), gen(x), rtol=0, atol=0)


def test_sample_grid_rows_are_labelled(tiny_unpaired):
    """The training sample grid: real A, translated, reconstructed, then the same for B, each
    row with its label in a margin on the left, the images right of it."""
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml",
                      TINY_CYCLEGAN + [f'data.root="{tiny_unpaired}"'])
    method = METHODS["cyclegan"].build(cfg)
    g = torch.Generator().manual_seed(0)
    fixed = {k: torch.rand(3, 3, 16, 16, generator=g) * 2 - 1 for k in ("a", "b")}
    with torch.no_grad():
        img = method.sample(method.nets, fixed)
        fake_b = method.nets["G_ab"](fixed["a"])
    bare = viz.grid([fixed["a"], fake_b])  # the first two rows without labels
    margin = img.shape[1] - bare.shape[1]
    assert img.shape[0] == 2 + 6 * 18 and margin > 30
    np.testing.assert_array_equal(img[:bare.shape[0] - 2, margin:], bare[:-2])
    bands = [img[2 + 18 * r:18 * (r + 1), :margin] for r in range(6)]
    assert all((band.max(-1) < 100).sum() > 10 for band in bands)  # text in every row
    assert not np.array_equal(bands[0], bands[1])  # "real A" is not "translated"
    np.testing.assert_array_equal(bands[1], bands[4])  # "translated" for A and for B
