"""`translate import`: generators saved by the reference implementation
(junyanz/pytorch-CycleGAN-and-pix2pix) become exported generators that compute the same images.

The reference's nets are written out here as that code lays them out (its module order is its
state dict's keys): these are what its `torch.save(net.state_dict(), ...)` files hold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_error, cli_main, random_image_folder, run_cli
from PIL import Image
from torch import nn

import translate
from translate.infer import load_generator
from translate.infer.load import read_metadata
from translate.reference import import_reference


def _norm(kind: str, channels: int) -> nn.Module:
    return {"instance": lambda: nn.InstanceNorm2d(channels),  # no affine, no running statistics
            "batch": lambda: nn.BatchNorm2d(channels),
            "none": nn.Identity}[kind]()


class RefResnetBlock(nn.Module):
    def __init__(self, dim: int, norm: str, dropout: bool) -> None:
        super().__init__()
        bias = norm == "instance"  # the reference's use_bias
        block = [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), _norm(norm, dim),
                 nn.ReLU(True)]
        block += [nn.Dropout(0.5)] if dropout else []
        block += [nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3, bias=bias), _norm(norm, dim)]
        self.conv_block = nn.Sequential(*block)

    def forward(self, x):
        return x + self.conv_block(x)


class RefResnet(nn.Module):
    """The reference's ResnetGenerator (resnet_<n>blocks)."""

    def __init__(self, cin: int, cout: int, ngf: int, norm: str, dropout: bool, n_blocks: int):
        super().__init__()
        bias = norm == "instance"
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(cin, ngf, 7, bias=bias), _norm(norm, ngf),
                  nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1, bias=bias),
                       _norm(norm, ngf * mult * 2), nn.ReLU(True)]
        layers += [RefResnetBlock(ngf * 4, norm, dropout) for _ in range(n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1,
                                          output_padding=1, bias=bias),
                       _norm(norm, ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, cout, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x)


class RefSkip(nn.Module):
    """The reference's UnetSkipConnectionBlock."""

    def __init__(self, outer: int, inner: int, norm: str, cin: int | None = None,
                 sub: nn.Module | None = None, outermost=False, innermost=False, dropout=False):
        super().__init__()
        self.outermost = outermost
        bias = norm == "instance"
        down = nn.Conv2d(cin or outer, inner, 4, stride=2, padding=1, bias=bias)
        if outermost:
            layers = [down, sub, nn.ReLU(True),
                      nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1), nn.Tanh()]
        elif innermost:
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True),
                      nn.ConvTranspose2d(inner, outer, 4, stride=2, padding=1, bias=bias),
                      _norm(norm, outer)]
        else:
            layers = [nn.LeakyReLU(0.2, True), down, _norm(norm, inner), sub, nn.ReLU(True),
                      nn.ConvTranspose2d(inner * 2, outer, 4, stride=2, padding=1, bias=bias),
                      _norm(norm, outer)] + ([nn.Dropout(0.5)] if dropout else [])
        self.model = nn.Sequential(*layers)

    def forward(self, x):
        return self.model(x) if self.outermost else torch.cat([x, self.model(x)], 1)


class RefUnet(nn.Module):
    """The reference's UnetGenerator (unet_128: num_downs 7, unet_256: 8)."""

    def __init__(self, cin: int, cout: int, num_downs: int, ngf: int, norm: str, dropout: bool):
        super().__init__()
        block = RefSkip(ngf * 8, ngf * 8, norm, innermost=True)
        for _ in range(num_downs - 5):
            block = RefSkip(ngf * 8, ngf * 8, norm, sub=block, dropout=dropout)
        for outer in (4, 2, 1):
            block = RefSkip(ngf * outer, ngf * outer * 2, norm, sub=block)
        self.model = RefSkip(cout, ngf, norm, cin=cin, sub=block, outermost=True)

    def forward(self, x):
        return self.model(x)


def _randomised(net: nn.Module, seed: int = 0) -> nn.Module:
    """Weights and batch-norm statistics away from their initial values, so that every tensor
    the import moves shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=g)
                t.copy_(noise.abs() + 0.5 if name.endswith("running_var") else noise * 0.2)
    return net.eval()


CASES = {
    "resnet_instance": lambda: RefResnet(3, 3, 4, "instance", False, 3),
    "resnet_instance_dropout": lambda: RefResnet(3, 3, 4, "instance", True, 2),
    "resnet_batch_gray_to_rgb": lambda: RefResnet(1, 3, 4, "batch", False, 2),
    "resnet_none": lambda: RefResnet(3, 3, 4, "none", False, 1),
    "unet_instance": lambda: RefUnet(3, 3, 5, 4, "instance", False),
    "unet_batch_dropout": lambda: RefUnet(3, 3, 6, 2, "batch", True),
    "unet_none": lambda: RefUnet(3, 1, 5, 2, "none", False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_imported_generator_computes_what_the_reference_net_computes(case, tmp_path):
    ref = _randomised(CASES[case]())
    torch.save(ref.state_dict(), tmp_path / "latest_net_G_A.pth")
    lines = import_reference(tmp_path / "latest_net_G_A.pth", tmp_path / "G.safetensors")
    assert lines[0].startswith(f"wrote {tmp_path / 'G.safetensors'}") and "A -> B" in lines[0]
    gen = load_generator(tmp_path / "G.safetensors", precision="fp32", nnpack=False)
    cin = ref.model[1].in_channels if isinstance(ref, RefResnet) else ref.model.model[0].in_channels
    x = torch.rand(2, cin, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = ref(x)
    got = gen(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    # any size: padded to the net's multiple and cropped back, as for our own exports
    assert gen(x[:, :, :40, :56]).shape == (2, want.shape[1], 40, 56)


def test_metadata_names_the_source_and_the_direction_of_g_b(tmp_path):
    ref = _randomised(RefResnet(3, 3, 4, "instance", False, 2))
    src = tmp_path / "checkpoints" / "horse2zebra" / "latest_net_G_B.pth"
    src.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), src)
    translate.import_reference(src, tmp_path / "out" / "G_ba.safetensors")  # the public API
    meta = read_metadata(tmp_path / "out" / "G_ba.safetensors")
    assert (meta["from_domain"], meta["to_domain"], meta["name"]) == ("b", "a", "G_ba")
    assert json.loads(meta["config"])["n_blocks"] == 2 and meta["kind"] == "resnet"
    assert "pytorch-CycleGAN-and-pix2pix: latest_net_G_B.pth (sha256 " in meta["source"]


def test_a_checkpoint_folder_imports_both_generators_of_its_epoch(tmp_path, capsys):
    """The reference's checkpoints/NAME folder holds <epoch>_net_G_A/G_B/D_A/D_B.pth: the
    generators of the epoch asked for become G_ab and G_ba; a pretrained model's folder holds
    latest_net_G.pth alone."""
    run = tmp_path / "checkpoints" / "horse2zebra"
    run.mkdir(parents=True)
    nets = {}
    for seed, (epoch, g) in enumerate([(e, g) for e in ("latest", "5") for g in ("G_A", "G_B")]):
        nets[epoch, g] = _randomised(RefResnet(3, 3, 4, "instance", False, 1), seed)
        torch.save(nets[epoch, g].state_dict(), run / f"{epoch}_net_{g}.pth")
    torch.save({"model.0.weight": torch.zeros(8, 3, 4, 4)}, run / "latest_net_D_A.pth")
    assert cli_main(["import", str(run), str(tmp_path / "export"), "--epoch", "5"]) == 0
    assert capsys.readouterr().out.count("wrote") == 2
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    for epoch, out in (("5", tmp_path / "export"), ("latest", tmp_path / "latest")):
        if epoch == "latest":
            import_reference(run, out)  # the default epoch
        for g, ours in (("G_A", "G_ab"), ("G_B", "G_ba")):
            gen = load_generator(out / f"{ours}.safetensors", precision="fp32", nnpack=False)
            with torch.no_grad():
                torch.testing.assert_close(gen(x), nets[epoch, g](x), rtol=0, atol=2e-5)
            assert f": {epoch}_net_{g}.pth (sha256" in read_metadata(out / f"{ours}.safetensors")[
                "source"]
    pretrained = tmp_path / "horse2zebra_pretrained"
    pretrained.mkdir()
    (run / "latest_net_G_A.pth").rename(pretrained / "latest_net_G.pth")
    assert import_reference(pretrained, tmp_path / "p")[0].startswith(
        f"wrote {tmp_path / 'p' / 'G_ab.safetensors'}")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["G_ab.safetensors"]


def test_a_folder_with_one_bad_generator_writes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    torch.save(RefResnet(3, 3, 4, "instance", False, 1).state_dict(), run / "latest_net_G_A.pth")
    (run / "latest_net_G_B.pth").write_bytes(b"not a pickle")
    err = cli_error(capsys, ["import", str(run), str(tmp_path / "export")])
    assert "latest_net_G_B.pth: not a state dict" in err
    assert not (tmp_path / "export").exists()
    err = cli_error(capsys, ["import", str(run), str(tmp_path / "export"), "--epoch", "7"])
    assert ("no 7_net_G_A.pth, 7_net_G_B.pth or 7_net_G.pth in it (generators found: "
            "latest_net_G_A.pth, latest_net_G_B.pth)") in err
    err = cli_error(capsys, ["import", str(run), str(tmp_path / "G.safetensors")])
    assert "a checkpoint folder imports into a folder" in err


def test_old_files_with_instance_norm_statistics_import_without_them(tmp_path):
    """torch < 0.4 saved running statistics for InstanceNorm2d; the reference's own loader drops
    them, and so does the import (they are unused: each image is normalised by its own)."""
    ref = _randomised(RefResnet(3, 3, 4, "instance", False, 1))
    sd = ref.state_dict()
    for i in (2, 5, 8):
        sd[f"model.{i}.running_mean"] = torch.randn(sd[f"model.{i - 1}.weight"].shape[0])
        sd[f"model.{i}.running_var"] = torch.rand(sd[f"model.{i - 1}.weight"].shape[0]) + 0.5
    torch.save(sd, tmp_path / "old.pth")
    import_reference(tmp_path / "old.pth", tmp_path / "G.safetensors")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    gen = load_generator(tmp_path / "G.safetensors", precision="fp32", nnpack=False)
    with torch.no_grad():
        torch.testing.assert_close(gen(x), ref(x), rtol=0, atol=2e-5)


@pytest.mark.slow
def test_import_then_apply_and_onnx_through_the_cli(tmp_path):
    ref = _randomised(RefResnet(3, 3, 4, "instance", False, 2))
    torch.save(ref.state_dict(), tmp_path / "latest_net_G.pth")
    images = random_image_folder(tmp_path / "in", n=2, size=36)
    proc = run_cli("import", str(tmp_path / "latest_net_G.pth"), str(tmp_path / "G.safetensors"),
                   "--onnx")
    assert "wrote" in proc.stdout and (tmp_path / "G.onnx").is_file()
    for model, out in (("G.safetensors", "out_torch"), ("G.onnx", "out_onnx")):
        run_cli("apply", str(tmp_path / model), str(images), str(tmp_path / out),
                "--precision", "fp32", "--no-progress")
        for png in sorted(images.glob("*.png")):
            arr = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 127.5 - 1
            with torch.no_grad():
                want = ref(torch.from_numpy(arr).permute(2, 0, 1)[None])[0]
            want = ((want.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).numpy()
            got = np.asarray(Image.open(tmp_path / out / png.name), dtype=np.float32)
            assert np.abs(got - want).max() <= 1, (model, png.name)
    # both directions of a reference run in one folder: translate eval scores them and the cycle
    folder = tmp_path / "export"
    for ref_name, ours in (("latest_net_G_A.pth", "G_ab"), ("latest_net_G_B.pth", "G_ba")):
        torch.save(_randomised(RefResnet(3, 3, 4, "instance", False, 2), seed=len(ours)
                               ).state_dict(), tmp_path / ref_name)
        run_cli("import", str(tmp_path / ref_name), str(folder / f"{ours}.safetensors"))
    for split in ("testA", "testB"):
        random_image_folder(tmp_path / "data" / split, n=2, size=36)
    proc = run_cli("eval", str(folder), "--data", str(tmp_path / "data"), "--fid-features",
                   "small", "--json")
    scores = json.loads(proc.stdout.splitlines()[-1])
    assert all(np.isfinite(scores[k]) for k in ("cycle_psnr", "ba_cycle_psnr", "fid", "ba_fid"))
    assert ("G_ba.safetensors: imported from junyanz/pytorch-CycleGAN-and-pix2pix: "
            "latest_net_G_B.pth") in scores["protocol"]["checkpoint"]


def _save(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _truncated(path: Path) -> Path:
    data = _save(path, RefResnet(3, 3, 4, "instance", False, 1).state_dict()).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class NotWeights:  # pickled as a class instance: weights_only refuses to build it
    pass


@pytest.mark.parametrize("make,expected", [
    (lambda d: d / "missing.pth", "no such file"),
    (lambda d: _save(d / "code.pth", {"model.1.weight": NotWeights()}),
     "not a state dict that torch.load(weights_only=True) can read"),
    (lambda d: _save(d / "list.pth", [torch.zeros(1)]), "holds a list, not a state dict"),
    (lambda d: _truncated(d / "half.pth"), "not a state dict that torch.load(weights_only=True)"),
    (lambda d: _save(d / "D.pth", {"model.0.weight": torch.zeros(8, 3, 4, 4)}),
     "not a generator of junyanz/pytorch-CycleGAN-and-pix2pix"),
    (lambda d: _save(d / "cut.pth", {**RefResnet(3, 3, 4, "instance", False, 1).state_dict(),
                                     "model.4.filt": torch.ones(8, 1, 3, 3)}),
     "anti-aliased sampling (CUT's reference"),
    (lambda d: _save(d / "cut.pth", {k: v for k, v in RefResnet(
        3, 3, 4, "instance", False, 1).state_dict().items() if k != "model.4.bias"}),
     "does not fit the reference's resnet generator it looks like (missing model.4.bias)"),
])
def test_files_that_are_not_a_reference_generator_get_one_line(make, expected, tmp_path, capsys):
    path = make(tmp_path)
    err = cli_error(capsys, ["import", str(path), str(tmp_path / "G.safetensors")])
    assert str(path) in err and expected in err
    assert not (tmp_path / "G.safetensors").exists()


def test_the_output_must_be_a_safetensors_file(tmp_path, capsys):
    path = _save(tmp_path / "G.pth", RefResnet(3, 3, 4, "instance", False, 1).state_dict())
    err = cli_error(capsys, ["import", str(path), str(tmp_path / "G.pt")])
    assert "G.pt: the output is a .safetensors file" in err
