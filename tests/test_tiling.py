"""`translate apply` edges: OUTPUT around INPUT, tiling real norm generators, auto-tiling and its
memory bound, backend/model matching, --resize, and the apply/export CLI flags."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import translate
from translate.errors import UserError
from translate.export import metadata
from translate.infer import translate_folder
from translate.infer.tiling import (
    ModelInfo,
    ModuleNormStats,
    _overview,
    _run_padded,
    _starts,
    norm_layers,
    tile_length,
    translate_tensor,
)
from translate.nets import build_net, init_weights

RESNET = ModelInfo(in_channels=3, out_channels=3, size_multiple=4, min_size=8)


def _resnet(ngf: int = 8, n_blocks: int = 9) -> nn.Module:
    """The CycleGAN ResNet generator (InstanceNorm after every conv), narrow, seeded init."""
    torch.manual_seed(0)
    net = build_net("resnet", ngf=ngf, n_blocks=n_blocks)
    init_weights(net, 0.02)
    return net.eval()


def _meta(net: nn.Module, step: int = 0) -> dict[str, str]:
    """The export metadata of `net` as G_ab of a CycleGAN run at `step`."""
    cfg = SimpleNamespace(method="cyclegan", name="test")
    return metadata(net, cfg, "G_ab", {"from": "A", "to": "B"}, step, False)


def _export(net: nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), _meta(net))
    return path


def _smooth(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A natural-ish HxWx3 uint8 image: a few low-frequency waves per channel and soft blobs."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.zeros((h, w, 3))
    for c in range(3):
        for _ in range(5):
            fy, fx, phase, amp = g.uniform(0.5, 4), g.uniform(0.5, 4), g.uniform(0, 6.3), g.uniform(.2, 1)
            img[..., c] += amp * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
    for _ in range(4):
        cy, cx, r = g.uniform(0, 1), g.uniform(0, 1), g.uniform(0.05, 0.2)
        img += g.uniform(-1, 1, 3) * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / r ** 2)[..., None]
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).round().astype(np.uint8)


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ OUTPUT around INPUT


def test_output_containing_the_input_is_refused_and_the_input_is_untouched(tmp_path):
    """The audit's case: INPUT=T/out/in holding x.png and in/x.png, OUTPUT=T/out, --overwrite
    would have written T/out/in/x.png, an input."""
    src = tmp_path / "out" / "in"
    (src / "in").mkdir(parents=True)
    Image.fromarray(_smooth(16, 16, 1)).save(src / "x.png")
    Image.fromarray(_smooth(16, 16, 2)).save(src / "in" / "x.png")
    model = _export(_resnet(4, 1), tmp_path / "G.safetensors")
    before = _digest(tmp_path / "out")
    proc = run_cli("apply", str(model), str(src), str(tmp_path / "out"), "--overwrite",
                   "--no-progress", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "contains the input folder" in lines[0], proc.stderr
    assert _digest(tmp_path / "out") == before  # byte for byte, nothing added
    for spec in (src, f"{src}/**/*.png", tmp_path / "out" / "in" / "in" / ".."):
        with pytest.raises(UserError, match="contains the input folder"):
            translate_folder(lambda x: -x, RESNET, spec, tmp_path, overwrite=True,
                             progress=False)
    assert _digest(tmp_path / "out") == before


def test_output_through_a_symlink_into_the_input_is_refused(tmp_path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    Image.fromarray(_smooth(8, 8)).save(src / "sub" / "a.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").symlink_to(src / "sub")  # out/sub/a.png would be in/sub/a.png
    before = _digest(src)
    with pytest.raises(UserError, match="would be written inside INPUT"):
        translate_folder(lambda x: -x, RESNET, src, out, overwrite=True, progress=False)
    with pytest.raises(UserError, match="would be written inside INPUT"):
        translate_folder(lambda x: -x, RESNET, src, out, side_by_side=True, progress=False)
    assert _digest(src) == before
    # a sibling OUTPUT and a single file into its own folder's parent still work
    assert translate_folder(lambda x: -x, RESNET, src, tmp_path / "o2",
                            progress=False).translated == 1
    report = translate_folder(lambda x: -x, RESNET, src / "sub" / "a.png", src, progress=False)
    assert report.translated == 1 and (src / "a.png").is_file()



@pytest.mark.parametrize("total,tile,overlap", [(300, 128, 32), (2000, 512, 64), (1504, 512, 64),
                                                (4096, 512, 64), (513, 512, 64), (1000, 512, 0),
                                                (700, 64, 32)])
def test_tiles_are_as_short_as_cover_the_image(total, tile, overlap):
    # As many tiles as tiles of the full side need, each shorter where that covers the image:
    # the tiles overlap by at least `overlap`, end at the image's edge, and hold fewer pixels.
    length = tile_length(total, tile, overlap, 4)
    starts = _starts(total, length, overlap)
    assert length <= tile and length % 4 == 0 and starts[-1] + length == total
    assert len(starts) == len(_starts(total, tile, overlap))
    assert all(b - a <= length - overlap for a, b in itertools.pairwise(starts))
    assert tile_length(2000, 512, 64, 4) * tile_length(1504, 512, 64, 4) == 452 * 424
    assert tile_length(400, 512, 64, 4) == 400  # one tile: the image itself


# ------------------------------------------------------------- tiling with norm statistics


def _edge_distance(n: int, tile: int, overlap: int) -> np.ndarray:
    """Per pixel along one axis: the distance to the nearest tile edge inside the image."""
    dist = np.full(n, 10 ** 6)
    length = tile_length(n, tile, overlap, RESNET.size_multiple)
    for s in _starts(n, length, overlap):
        for edge in (s, s + length):
            if 0 < edge < n:
                dist = np.minimum(dist, np.abs(np.arange(n) - edge))
    return dist


def _frozen_whole(net: nn.Module, x: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """The untiled output with the statistics tiling freezes (from the same overview)."""
    source = ModuleNormStats(norm_layers(net))
    with torch.inference_mode():
        stats, _ = _overview(net, RESNET, x, source, max_pixels)
        with source.frozen(stats):
            return _run_padded(net, RESNET, [x])[0]


def _trained(net: nn.Module, steps: int = 100) -> nn.Module:
    """`net` (a ResNet-9 of ngf 8 by default) trained for a few seconds on a colour mapping of
    smooth images: its output is smooth like a real generator's, where a random net's is
    noise-like, so steps between neighbouring pixels say something about seams."""
    net = net.train()
    data = torch.cat([_tensor(_smooth(96, 96, seed=s)) for s in range(16)])
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(steps):
        i = torch.randint(0, 16, (4,), generator=g)
        oy, ox = torch.randint(0, 32, (2,), generator=g).tolist()
        x = data[i, :, oy:oy + 64, ox:ox + 64]
        loss = (net(x) - torch.tanh(1.5 * x.roll(1, dims=1))).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def resnet9_runs() -> dict[str, torch.Tensor]:
    """A 300x260 image through a ResNet-9, tile 128, overlap 32 (and 64), 4 tiles a batch."""
    net = _trained(_resnet())
    assert len(norm_layers(net)) == 23  # stem, 2 down, 2 x 9 blocks, 2 up
    x = _tensor(_smooth(300, 260, seed=99))
    with torch.inference_mode():
        runs = {"plain": translate_tensor(net, RESNET, x),
                "tiled": translate_tensor(net, RESNET, x, tile=128, overlap=32, batch_size=4),
                "tiled64": translate_tensor(net, RESNET, x, tile=128, overlap=64, batch_size=4),
                # a callable hides the module: every tile is normalised by its own statistics
                "per_tile": translate_tensor(lambda t: net(t), RESNET, x, tile=128, overlap=32,
                                             batch_size=4)}
    runs["frozen"] = _frozen_whole(net, x, 4 * 128 * 128)
    assert "forward" not in vars(norm_layers(net)[0])  # the layers were restored
    return runs


@pytest.mark.slow
def test_tiles_equal_the_frozen_statistics_whole_image_away_from_tile_edges(resnet9_runs):
    r = resnet9_runs
    far = np.minimum(_edge_distance(300, 128, 32)[:, None], _edge_distance(260, 128, 32)[None])
    err = (r["tiled"] - r["frozen"]).abs().amax(dim=(0, 1)).numpy()
    print(f"\ntiled vs frozen whole: max {err[far >= 48].max():.1e} >= 48 px from tile edges, "
          f"{err[(far >= 32) & (far < 48)].max():.4f} at 32-48 px, {err.max():.4f} overall; "
          f"overlap 64: max {(r['tiled64'] - r['frozen']).abs().max():.4f}")
    assert (far >= 48).sum() > 2000 and err[far >= 48].max() < 1e-4
    assert err.max() < 0.03
    assert (r["tiled64"] - r["frozen"]).abs().max() < 2e-3  # the default overlap


def _overlaps(n: int, tile: int, overlap: int) -> np.ndarray:
    """Per step between pixels i and i+1 along one axis: does it touch a tile overlap?"""
    cover = np.zeros(n, int)
    length = tile_length(n, tile, overlap, RESNET.size_multiple)
    for s in _starts(n, length, overlap):
        cover[s:s + length] += 1
    shared = cover > 1
    return shared[1:] | shared[:-1]


def _steps(out: torch.Tensor, across_y: np.ndarray, across_x: np.ndarray) -> tuple[float, float]:
    """(largest step between neighbouring pixels across tile overlaps, largest elsewhere)."""
    dx = out.diff(dim=3).abs().amax(dim=(0, 1, 2)).numpy()
    dy = out.diff(dim=2).abs().amax(dim=(0, 1, 3)).numpy()
    return (float(max(dx[across_x].max(), dy[across_y].max())),
            float(max(dx[~across_x].max(), dy[~across_y].max())))


@pytest.mark.slow
def test_norm_tiling_leaves_no_seam(resnet9_runs):
    """The largest step between neighbouring pixels across the tile overlaps is comparable to
    the interior's and to the untiled image's; and so is that of the difference from the
    untiled image, where per-tile statistics leave tone steps."""
    r = resnet9_runs
    across_y, across_x = _overlaps(300, 128, 32), _overlaps(260, 128, 32)
    steps = {k: _steps(r[k], across_y, across_x) for k in ("tiled", "plain", "per_tile")}
    steps.update({f"{k} - plain": _steps(r[k] - r["plain"], across_y, across_x)
                  for k in ("tiled", "per_tile")})
    print("\nmax step across overlaps / elsewhere: " + "; ".join(
        f"{k} {a:.4f} / {b:.4f}" for k, (a, b) in steps.items()))
    across, inside = steps["tiled"]
    assert across <= 1.25 * inside and across <= steps["plain"][0] + 0.01
    assert steps["tiled - plain"][0] < 0.02
    assert steps["per_tile - plain"][0] > 5 * steps["tiled - plain"][0]  # the test can fail


@pytest.mark.slow
def test_norm_tiling_is_close_to_the_untiled_image(resnet9_runs):
    """Frozen whole-image statistics (from a 0.92x overview here) against true per-image ones,
    and against the per-tile statistics the engine used before."""
    r = resnet9_runs
    gap = {k: (r[k] - r["plain"]).abs() for k in ("tiled", "tiled64", "frozen", "per_tile")}
    print("\n" + "; ".join(f"{k} vs untiled: mean {v.mean():.4f} max {v.max():.4f}"
                           for k, v in gap.items()))
    assert gap["tiled"].mean() < 0.005 and gap["tiled"].max() < 0.03
    assert gap["tiled64"].mean() < 0.005 and gap["tiled64"].max() < 0.02
    assert gap["per_tile"].mean() > 10 * gap["tiled"].mean()


def test_group_norm_and_the_torch_backend_are_tiled_with_frozen_statistics(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                        nn.Conv2d(8, 3, 3, padding=1)).eval()
    x = _tensor(_smooth(96, 200))
    info = ModelInfo(3, 3, 4)
    with torch.inference_mode():
        whole = translate_tensor(net, info, x)
        fits = translate_tensor(net, info, x, tile=64, overlap=32, batch_size=5)
        tiled = translate_tensor(net, info, x, tile=64, overlap=32, batch_size=2)
        opaque = translate_tensor(lambda t: net(t), info, x, tile=64, overlap=32, batch_size=2)
    assert torch.equal(fits, whole)  # as many pixels as 5 tiles: the overview is the result
    assert (tiled - whole).abs().mean() < 0.5 * (opaque - whole).abs().mean()
    gen = translate.load_generator(_export(_resnet(4, 2), tmp_path / "G.safetensors"),
                                   precision="fp32")
    assert gen.net is not None and len(norm_layers(gen)) == len(norm_layers(gen.forward)) == 9
    y = _tensor(_smooth(200, 120))
    with torch.inference_mode():  # the loaded generator is tiled like its bare module
        module = translate_tensor(gen.net, gen.info, y, tile=64, overlap=32, batch_size=1)
        tiled = translate_tensor(gen, gen.info, y, tile=64, overlap=32, batch_size=1)
        opaque = translate_tensor(lambda t: gen.forward(t), gen.info, y, tile=64, overlap=32,
                                  batch_size=1)
        # load_generator's callable tiles when asked (4 tiles a batch, as apply's default)
        by_call = gen(y, tile=64, overlap=32) - translate_tensor(gen.net, gen.info, y, tile=64,
                                                                 overlap=32, batch_size=4)
    assert (tiled - module).abs().max() < 1e-5 < (opaque - module).abs().max()
    assert by_call.abs().max() < 1e-5
    img = _smooth(200, 120)
    assert gen(img, tile=64, overlap=32).shape == img.shape
    assert not np.array_equal(gen(img, tile=64, overlap=32), gen(img))  # whole by default


def _group_norm_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                         nn.Conv2d(8, 3, 3, padding=1)).eval()


def _norm_net(kind: str) -> tuple[nn.Module, nn.Module, int]:
    """(net, the net whose metadata describes it, its per-image norm layers)."""
    if kind == "resnet":  # stem, 2 down, 2 blocks of 2, 2 up
        return _trained(_resnet(4, 2), steps=40), _resnet(4, 2), 3 + 2 * 2 + 2
    if kind == "unet":  # 4 levels; its norm layers counted from the module itself
        torch.manual_seed(0)
        unet = build_net("unet", num_downs=4, ngf=8, norm="instance")
        init_weights(unet, 0.02)
        return unet.eval(), unet, len(norm_layers(unet))
    return _group_norm_net(), _resnet(4, 2), 1


@pytest.mark.parametrize("kind", [pytest.param("resnet", marks=pytest.mark.slow), "unet",
                                  "group_norm"])
def test_the_onnx_backend_tiles_with_whole_image_statistics(tmp_path, kind):
    """`export --onnx` writes G.tiles.onnx beside G.onnx for a net with per-image norm layers;
    with it, onnxruntime tiles a large image as the torch backend does (frozen whole-image
    statistics); without it, a one-line warning and each tile's own statistics, as before."""
    pytest.importorskip("onnxruntime")
    from translate.infer.onnx import ModelWarning
    from translate.onnx_export import export_onnx

    net, described, layers = _norm_net(kind)
    lines = export_onnx(net, _meta(described), tmp_path / "G.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.onnx", "G.tiles.onnx"]
    assert layers > 0 and f"{layers} norm layers" in lines[1]
    gen = translate.load_generator(tmp_path / "G.onnx")
    x = _tensor(_smooth(300, 260, seed=99))
    with torch.inference_mode():
        want = translate_tensor(net, gen.info, x, tile=128, overlap=32, batch_size=4)
        got = translate_tensor(gen.forward, gen.info, x, tile=128, overlap=32, batch_size=4)
        opaque = translate_tensor(lambda t: net(t), gen.info, x, tile=128, overlap=32,
                                  batch_size=4)
    print(f"\n{kind}: onnx vs torch tiled, max {(got - want).abs().max():.1e}; per-tile "
          f"statistics vs frozen, max {(opaque - want).abs().max():.3f}")
    assert (got - want).abs().max() < 1e-4
    assert gen.norm_stats is gen.forward  # tiling finds it on the Generator as on its forward
    companion = (tmp_path / "G.tiles.onnx").rename(tmp_path / "aside.onnx")
    with pytest.warns(ModelWarning, match="G.tiles.onnx is missing"):
        bare = translate.load_generator(tmp_path / "G.onnx")
    with torch.inference_mode():
        per_tile = translate_tensor(bare.forward, bare.info, x, tile=128, overlap=32,
                                    batch_size=4)
    assert (per_tile - opaque).abs().max() < 1e-4 < (opaque - want).abs().max()
    with pytest.raises(UserError, match="the tiling companion of G.onnx"):
        translate.load_generator(companion)


def test_an_onnx_tiling_companion_of_another_export_is_not_used(tmp_path):
    """G.onnx of step 2 beside the companion of step 1's export (say its own failed to be
    written): a warning, and tiles with their own statistics."""
    pytest.importorskip("onnxruntime")
    from translate.infer.onnx import ModelWarning
    from translate.onnx_export import export_onnx

    net = _group_norm_net()
    for step in (1, 2):
        (tmp_path / str(step)).mkdir()
        export_onnx(net, _meta(_resnet(4, 2), step), tmp_path / str(step) / "G.onnx")
    assert translate.load_generator(tmp_path / "2" / "G.onnx").norm_stats is not None
    (tmp_path / "1" / "G.tiles.onnx").replace(tmp_path / "2" / "G.tiles.onnx")
    with pytest.warns(ModelWarning, match="G.tiles.onnx comes from another export"):
        gen = translate.load_generator(tmp_path / "2" / "G.onnx")
    assert gen.norm_stats is None


@pytest.mark.slow
def test_translate_apply_tiles_onnx_like_torch(tmp_path):
    """Through the CLI: a trained ResNet's export, one 300x260 PNG in tiles of 128 px, on
    onnxruntime and on torch in fp32: the same picture within a grey level."""
    pytest.importorskip("onnxruntime")
    from translate.onnx_export import export_onnx

    net = _trained(_resnet(4, 2), steps=40)
    model = _export(net, tmp_path / "G.safetensors")
    export_onnx(net, translate.load_generator(model).metadata, tmp_path / "G.onnx")
    (tmp_path / "in").mkdir()
    Image.fromarray(_smooth(300, 260, seed=99)).save(tmp_path / "in" / "p.png")
    outs = {}
    for name, extra in (("onnx", ["--backend", "onnx"]), ("torch", ["--precision", "fp32"])):
        model_file = tmp_path / ("G.onnx" if name == "onnx" else "G.safetensors")
        run_cli("apply", str(model_file), str(tmp_path / "in"), str(tmp_path / name), "--tile",
                "128", "--overlap", "32", "--no-progress", *extra)
        outs[name] = np.asarray(Image.open(tmp_path / name / "p.png"), np.int16)
    gap = np.abs(outs["onnx"] - outs["torch"])
    print(f"\nonnx vs torch, tiled through the CLI: grey levels mean {gap.mean():.3f}, "
          f"max {gap.max()}")
    assert gap.max() <= 1


@pytest.mark.parametrize("tile, overlap", [(128, 32), (192, 96)])
def test_tiles_are_seamless_up_to_the_right_and_bottom_edges(tmp_path, tile, overlap):
    """A 400x470 image through a trained U-Net (size multiple 16, so the untiled run pads 470
    to 480 with mirrored pixels) loaded in fp32: the last 40 columns and rows differ from the
    untiled output no more than the rest does, as at 464 px (a multiple of 16). Tiles cut from
    the bare image ended at its last pixel and left a band there (mean 2.1 grey levels over the
    last 40 columns, 5x the interior's; max 42)."""
    torch.manual_seed(0)
    unet = build_net("unet", num_downs=4, ngf=16)
    init_weights(unet, 0.02)
    gen = translate.load_generator(_export(_trained(unet), tmp_path / "G.safetensors"),
                                   precision="fp32")
    assert gen.precision == "fp32" and gen.info.size_multiple == 16
    for w in (470, 464):
        x = _tensor(_smooth(400, w, seed=5))
        with torch.inference_mode():
            whole = translate_tensor(gen, gen.info, x)
            tiled = translate_tensor(gen, gen.info, x, tile=tile, overlap=overlap, batch_size=4)
        gap = (tiled - whole).abs() * 127.5  # grey levels
        inner, right, bottom = gap[..., :-40, :-40], gap[..., -40:], gap[..., -40:, :]
        print(f"\n{w} px, tile {tile}/{overlap}: grey levels off untiled, mean/max: interior "
              f"{inner.mean():.2f}/{inner.max():.1f}, last 40 columns {right.mean():.2f}/"
              f"{right.max():.1f}, last 40 rows {bottom.mean():.2f}/{bottom.max():.1f}")
        for band in (right, bottom):
            assert band.mean() < 1.5 * inner.mean() + 0.05
            assert band.max() < 1.5 * inner.max() + 0.5


# ------------------------------------------------------------ auto-tiling and the 4 GB bound


@pytest.mark.slow
def test_a_4096_pixel_square_image_runs_in_under_4_gb(tmp_path):
    """`translate apply` with the default --tile auto on a 4096x4096 PNG: peak RSS of the
    apply process, measured by a parent that runs nothing else."""
    model = _export(_resnet(8, 1), tmp_path / "G.safetensors")
    (tmp_path / "in").mkdir()
    y, x = np.mgrid[0:4096, 0:4096].astype(np.float32) / 4096
    img = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), np.sin(4 * (x + y))], -1)
    Image.fromarray(((img + 1) * 127.5).astype(np.uint8)).save(tmp_path / "in" / "big.png",
                                                               compress_level=1)
    del img, x, y
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, p.returncode)")
    proc = subprocess.run([sys.executable, "-c", probe, sys.executable, str(ROOT / "cli.py"),
                           "apply", str(model), str(tmp_path / "in"), str(tmp_path / "out"),
                           "--no-progress"], check=False, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    peak_kb, code = map(int, proc.stdout.splitlines()[-1].split())
    print(f"\n4096x4096 apply, ResNet ngf 8: peak RSS {peak_kb / 1024:.0f} MB")
    assert code == 0, proc.stderr
    assert peak_kb < 4 * 1024 * 1024
    with Image.open(tmp_path / "out" / "big.png") as im:
        assert im.size == (4096, 4096)


def test_auto_tiling_picks_tiles_for_large_images_only(tmp_path):
    shapes: list[tuple[int, ...]] = []

    def record(x: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(x.shape))
        return -x
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((1024, 1024, 3), np.uint8)).save(src / "square.png")
    Image.fromarray(np.zeros((1100, 1000, 3), np.uint8)).save(src / "larger.png")
    translate_folder(record, RESNET, src, tmp_path / "auto", progress=False)
    # 1100 x 1000: tiled, 3 x 3 tiles of at most 512 px, as short as cover it (tile_length)
    assert (1, 3, 1024, 1024) in shapes and (4, 3, 412, 376) in shapes
    assert all(s[2:] in ((1024, 1024), (412, 376)) for s in shapes)
    shapes.clear()
    translate_folder(record, RESNET, src, tmp_path / "never", tile=0, progress=False)
    assert sorted(s[2:] for s in shapes) == [(1024, 1024), (1100, 1000)]
    proc = run_cli("apply", str(tmp_path / "none.safetensors"), str(src), str(tmp_path / "o"),
                   "--tile", "big", check=False)
    assert proc.returncode == 2 and "--tile" in proc.stderr


# -------------------------------------------------------------------------- --resize


def test_resize_sets_the_longer_side_and_keeps_aspect_and_alpha(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rgba = np.dstack([_smooth(60, 90), np.tile(np.linspace(0, 255, 90).astype(np.uint8),
                                               (60, 1))])
    Image.fromarray(rgba).save(src / "wide.png")
    Image.fromarray(_smooth(50, 20)).save(src / "tall.png")
    Image.fromarray(_smooth(7, 3)).save(src / "tiny.png")
    translate_folder(lambda x: x, RESNET, src, tmp_path / "out", resize=30, progress=False)
    sizes = {p.name: Image.open(p).size for p in (tmp_path / "out").iterdir()}
    assert sizes == {"wide.png": (30, 20), "tall.png": (12, 30), "tiny.png": (13, 30)}
    with Image.open(tmp_path / "out" / "wide.png") as im:
        assert im.mode == "RGBA"
        alpha = np.asarray(im)[..., 3].astype(int)
    want = np.asarray(Image.fromarray(rgba[..., 3]).resize((30, 20), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(alpha, want)  # resized like the colour, then carried through
    assert alpha[0, 0] < 10 and alpha[0, -1] > 245
