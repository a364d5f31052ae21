"""GAN inversion: recover the code of an image G made, encoder start, the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT, random_image_folder, run_cli
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from translate import recipe as recipe_mod
from translate import runner
from translate.explore.invert import invert, load_target, train_encoder
from translate.export import run_generators
from translate.images import to_uint8
from translate.nets import build_net, init_weights


def calibrate(G: nn.Module) -> nn.Module:
    """An untrained G whose BatchNorm statistics are those of its own activations (else eval
    mode divides by the initial variance 1 and every output is flat grey)."""
    for m in G.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        G.train()(torch.randn(256, G.z_dim))
        G.model[-2].weight.mul_(10)  # contrast: tanh inputs of order 1
    return G.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def G():
    torch.manual_seed(0)
    net = build_net("dcgan_g", z_dim=8, ngf=8, image_size=32)
    init_weights(net)
    return calibrate(net)


def test_inverting_a_generated_image_recovers_it(G):
    z_true = torch.randn(1, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        target = G(z_true)
    assert target.std() > 0.2  # a picture with contrast, not a flat one
    result = invert(G, target, steps=300, lr=0.1, restarts=4, seed=1)
    assert result.start_mse > 0.05
    assert result.mse < 1e-3 and result.mse < result.start_mse / 100
    assert torch.allclose(result.reconstruction, G(result.z))
    assert result.z.shape == (1, 8)


def test_feature_loss_inversion_also_converges(G):
    torch.manual_seed(1)
    D = build_net("dcgan_d", ndf=8, image_size=32, norm="none").eval().requires_grad_(False)
    with torch.no_grad():
        target = G(torch.randn(1, 8, generator=torch.Generator().manual_seed(6)))
    result = invert(G, target, steps=200, lr=0.1, restarts=2, features=D.features,
                    feature_weight=1.0)
    assert result.mse < result.start_mse / 10


def test_encoder_start_beats_random_start(G):
    E = train_encoder(G, steps=100, batch_size=32)
    g = torch.Generator().manual_seed(7)
    for i in range(3):
        with torch.no_grad():
            target = G(torch.randn(1, 8, generator=g))
            z0 = E(target)
        from_encoder = invert(G, target, steps=0, restarts=1, z_init=z0)
        from_random = invert(G, target, steps=0, restarts=1, seed=100 + i)
        assert from_encoder.start_mse < from_random.start_mse / 3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("invert")
    folder = random_image_folder(base / "images")
    cfg = recipe_mod.load(ROOT / "recipes" / "dcgan.toml", [
        "model.ngf=8", "model.ndf=4", "model.image_size=32", "data.crop_size=32",
        "model.z_dim=8", "train.batch_size=4", f'data.root="{folder}"', "train.steps=2",
        f'run_dir="{base / "run"}"', "train.sample_every=100"])
    runner.train(cfg, progress=False)
    G = calibrate(run_generators(base / "run")[1]["G"])
    path = base / "run" / "checkpoints" / "step_0000002" / "model.safetensors"
    save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(path), {"format": "pt"})
    with torch.no_grad():
        image = G(torch.randn(1, 8, generator=torch.Generator().manual_seed(3)))
    Image.fromarray(to_uint8(image)[0]).save(base / "target.png")
    return base


def test_cli_invert_writes_picture_and_code(run, tmp_path):
    out = tmp_path / "inv" / "result.png"
    proc = run_cli("invert", str(run / "run"), str(run / "target.png"), "--out", str(out),
                   "--steps", "150", "--lr", "0.1", "--restarts", "2", "--encoder",
                   "--encoder-steps", "30", "--feature-loss", "0.1")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("reconstruction MSE"))
    mse, start = float(line.split()[2]), float(line.split()[5].rstrip(";"))
    assert mse < 1e-3 and mse < start / 3
    assert np.asarray(Image.open(out)).shape == (2 + 34, 2 + 2 * 34, 3)  # target | result
    z = load_file(str(out.with_suffix(".safetensors")))["z"]
    assert z.shape == (1, 8) and torch.isfinite(z).all()
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.png", "result.safetensors"]


def test_target_is_resized_and_centre_cropped(tmp_path):
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # a white middle square between black side bands
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_target(tmp_path / "wide.png", 3, 16)
    assert x.shape == (1, 3, 16, 16)
    assert x[..., 1:-1].min() > 0.9  # the crop is the white middle, bands cut away
    assert load_target(tmp_path / "wide.png", 1, 8).shape == (1, 1, 8, 8)


def test_cli_invert_bad_image_is_one_line(run, tmp_path):
    proc = run_cli("invert", str(run / "run"), str(tmp_path / "missing.png"), "--out",
                   str(tmp_path / "o.png"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "missing.png: file not found" in proc.stderr
    assert not (tmp_path / "o.png").exists()
