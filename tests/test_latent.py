"""`translate sample`: where pictures go, separate sample files, and the latent tools (vector
arithmetic, linear/spherical interpolation)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import ROOT, random_image_folder, run_cli
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from translate import recipe as recipe_mod
from translate import runner
from translate.errors import UserError
from translate.explore import latent
from translate.export import run_generators
from translate.nets import build_net


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A dcgan run trained for 2 steps on random 32x32 images (z_dim 8)."""
    base = tmp_path_factory.mktemp("latent")
    folder = random_image_folder(base / "images")
    cfg = recipe_mod.load(ROOT / "recipes" / "dcgan.toml", [
        "model.ngf=4", "model.ndf=4", "model.image_size=32", "data.crop_size=32",
        "model.z_dim=8", "train.batch_size=4", f'data.root="{folder}"', "train.steps=2",
        f'run_dir="{base / "run"}"', "train.sample_every=100"])
    runner.train(cfg, progress=False)
    give_contrast(base / "run")
    return base / "run"


def give_contrast(run):
    """Two steps leave G's output almost flat grey (BatchNorm running statistics near their
    start, small weights). Set the statistics to those of G's own outputs and strengthen the last
    layer, so that different codes make visibly different pictures."""
    path = run / "checkpoints" / "step_0000002" / "model.safetensors"
    G = run_generators(run)[1]["G"]
    for m in G.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of this one batch
    with torch.no_grad():
        G.train()(torch.randn(256, G.z_dim))
        G.model[-2].weight.mul_(10)
    save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(path), {"format": "pt"})


@pytest.mark.parametrize("text,terms", [
    ("3,7,9 - 1,2 + 4,5", [(1, [3, 7, 9]), (-1, [1, 2]), (1, [4, 5])]),
    ("0", [(1, [0])]),
    ("+12, 3-4", [(1, [12, 3]), (-1, [4])]),
])
def test_parse(text, terms):
    assert latent.parse(text) == terms


@pytest.mark.parametrize("text", ["", "  ", "3,,7", "3 4", "-3 + 1", "3 - ", "a,b", "3 * 2",
                                  "1,2 -- 3"])
def test_parse_rejects_bad_syntax(text):
    with pytest.raises(UserError, match="--arithmetic") as e:
        latent.parse(text)
    assert "\n" not in str(e.value)


def test_result_is_sum_of_signed_group_means():
    codes = latent.grid_codes(6, 16, seed=3)
    torch.manual_seed(123)  # must not matter: the grid has its own generator
    again = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(codes, again)
    got = latent.combine(codes, latent.parse("3,7,9 - 1,2 + 4,5"))
    want = again[[3, 7, 9]].mean(0) - again[[1, 2]].mean(0) + again[[4, 5]].mean(0)
    assert torch.allclose(got, want, atol=1e-6)
    with pytest.raises(UserError, match="index 16 is not in a grid of --n 16"):
        latent.combine(codes, latent.parse("1 - 16"))


def test_picture_rows_show_operands_means_and_result():
    torch.manual_seed(0)
    G = build_net("dcgan_g", z_dim=6, ngf=4, image_size=8).eval()
    codes = latent.grid_codes(6, 10, seed=1)
    terms = latent.parse("1,2,3 - 4")
    result, rows, labels = latent.arithmetic_picture(G, terms, codes, seed=1)
    # Each row as long as its images (no white filler): mean + 3 samples; a single sample;
    # the result + 3 variations.
    assert [tuple(r.shape) for r in rows] == [(4, 3, 8, 8), (1, 3, 8, 8), (4, 3, 8, 8)]
    assert labels == ["mean of 1, 2, 3", "- sample 4", "= result, then + noise"]
    with torch.no_grad():
        assert torch.allclose(rows[0][0], G(codes[[1, 2, 3]].mean(0, keepdim=True))[0], atol=1e-6)
        assert torch.allclose(rows[0][1:], G(codes[[1, 2, 3]]), atol=1e-6)
        assert torch.allclose(rows[1][0], G(codes[[4]])[0], atol=1e-6)
        assert torch.allclose(rows[2][0], G(result[None])[0], atol=1e-6)


def _cell(png: np.ndarray, r: int, c: int, size: int = 32, pad: int = 2, cols: int = 0,
          gap_after: int | None = None) -> np.ndarray:
    """Cell (r, c) of a viz.grid picture; with `cols`, of one whose label margin sits on the
    left (found from the right edge) and whose columns after `gap_after` are set apart."""
    gap = 3 * pad if gap_after is not None else 0
    margin = png.shape[1] - (pad + cols * (size + pad) + gap) if cols else 0
    y = pad + r * (size + pad)
    x = margin + pad + c * (size + pad) + (gap if gap_after is not None and c >= gap_after else 0)
    return png[y : y + size, x : x + size].astype(int)


def test_cli_arithmetic_uses_the_grid_samples_and_labels_every_row(run, tmp_path):
    grid, arith = tmp_path / "grid.png", tmp_path / "arith.png"
    run_cli("sample", str(run), "--n", "16", "--seed", "3", "--out", str(grid))
    proc = run_cli("sample", str(run), "--n", "16", "--seed", "3", "--out", str(arith),
                   "--arithmetic", "5,6 - 9 + 2")
    assert "wrote" in proc.stdout
    g, a = np.asarray(Image.open(grid)), np.asarray(Image.open(arith))
    assert a.shape[0] == 2 + 4 * 34  # 3 operands + the result
    cell = {rc: _cell(a, *rc, cols=4, gap_after=1) for rc in
            [(0, 0), (0, 1), (0, 2), (1, 0), (2, 0), (3, 0), (3, 1), (3, 2), (3, 3)]}
    for (r, c), i in {(0, 1): 5, (0, 2): 6, (1, 0): 9, (2, 0): 2}.items():
        assert np.abs(cell[r, c] - _cell(g, i // 4, i % 4)).max() <= 1
    assert all(c.std() > 0 for c in cell.values())  # every cell holds an image, none blank
    assert (a[34 : 3 * 34 + 2, -34:] == 255).all()  # right of the short rows: background
    margin = a[:, : a.shape[1] - (2 + 4 * 34 + 6)]
    for r in range(4):  # each row's label is drawn in the margin beside it
        assert (margin[2 + 34 * r : 34 * (r + 1)] < 128).sum() > 20, r


def test_cli_arithmetic_bad_input_is_one_line(run, tmp_path):
    for expr in ("5,,6", "1 + 99"):
        proc = run_cli("sample", str(run), "--n", "16", "--out", str(tmp_path / "x.png"),
                       "--arithmetic", expr, check=False)
        assert proc.returncode == 2
        assert proc.stderr.startswith("error: --arithmetic") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_cli_linear_interpolation_differs_from_slerp(run, tmp_path):
    a, b = tmp_path / "slerp.png", tmp_path / "linear.png"
    run_cli("sample", str(run), "--interpolate", "--n", "20", "--out", str(a))
    run_cli("sample", str(run), "--interpolate", "--linear", "--n", "20", "--out", str(b))
    sa, sb = np.asarray(Image.open(a)).astype(int), np.asarray(Image.open(b)).astype(int)
    assert sa.shape == sb.shape
    ends = [slice(2, 34), slice(sa.shape[1] - 34, sa.shape[1] - 2)]  # first and last columns
    for cols in ends:  # same end points, different paths in between
        assert np.abs(sa[:, cols] - sb[:, cols]).max() <= 1
    assert np.abs(sa - sb).max() > 1


@pytest.mark.slow
def test_sample_writes_into_the_run_with_a_name_per_kind(run, tmp_path):
    """The README's three examples, run from another folder, write three files into
    RUN/samples and nothing into the current folder; a checkpoint folder writes into its run."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    lines = [run_cli("sample", str(run), *args, cwd=cwd).stdout.strip() for args in (
        ["--n", "16"], ["--interpolate"], ["--n", "16", "--seed", "3", "--arithmetic", "5,6 - 9"])]
    assert list(cwd.iterdir()) == []
    want = ["grid_step2_n16_seed0.png", "interpolate_step2_n64_seed0.png",
            "arithmetic_5,6-9_step2_n16_seed3.png"]
    assert lines == [f"wrote {run / 'samples' / name}" for name in want]
    assert {p.name for p in (run / "samples").iterdir()} >= set(want)
    ckpt = run / "checkpoints" / "step_0000002"
    proc = run_cli("sample", str(ckpt), "--n", "4", "--ema", check=False)  # no EMA: refused
    assert proc.returncode == 2 and "no EMA weights" in proc.stderr
    run_cli("sample", str(ckpt), "--n", "4", "--linear", "--interpolate")
    assert (run / "samples" / "interpolate_linear_step2_n4_seed0.png").is_file()
    assert not (ckpt / "samples").exists()


@pytest.mark.slow
def test_separate_files_follow_the_advice_of_eval(run, tmp_path):
    """`translate eval` on a DCGAN run names the commands to score it; run as printed, they
    write N separate samples (sample i = cell i of the grid of the same --n and --seed) and
    score them against the training images."""
    proc = run_cli("eval", str(run), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    sample_cmd, eval_cmd = re.findall(r"`translate ([^`]+)`", proc.stderr)
    samples = tmp_path / "samples"
    args = [str(samples) if a == "SAMPLES" else a for a in sample_cmd.split()]
    assert args[:4] == ["sample", str(run), "--n", "1000"]
    args[3] = "16"  # fewer, the same command
    assert run_cli(*args).stdout.strip() == f"wrote 16 samples into {samples}"
    files = sorted(samples.iterdir())
    assert [p.name for p in files] == [f"0_{i:05d}.png" for i in range(16)]
    run_cli("sample", str(run), "--n", "16", "--out", str(tmp_path / "grid.png"))
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    for i in (0, 5, 15):
        assert np.abs(np.asarray(Image.open(files[i])).astype(int) - _cell(grid, i // 4, i % 4)
                      ).max() <= 1
    args = [str(samples) if a == "SAMPLES" else a for a in eval_cmd.split()]
    scores = json.loads(run_cli(*args, "--json").stdout)
    assert scores["kind"] == "folders" and (scores["n1"], scores["n2"]) == (16, 8)
    assert scores["fid"] > 0
    for flags in (["--interpolate"], ["--class", "cat"]):
        bad = run_cli("sample", str(run), "--separate", str(tmp_path / "x"), *flags, check=False)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert not (tmp_path / "x").exists()
