"""`translate eval`, `translate plot` and bench/quality.py on real runs written to tmp_path."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, cli_error, cli_main, run_cli
from PIL import Image

from translate import recipe as recipe_mod
from translate.eval.evaluate import toy_scores
from translate.explore.plot import (
    PANEL_HEIGHT,
    TITLE_HEIGHT,
    WIDTH,
    group_keys,
    parse_log,
)
from translate.export import export_run, run_generators
from translate.runner import train


def _json(capsys, argv: list[str]) -> dict:
    assert cli_main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # one JSON object, nothing else on stdout
    return json.loads(out[0])


@pytest.fixture(scope="module")
def cyclegan_run(tmp_path_factory, tiny_unpaired) -> Path:
    run = tmp_path_factory.mktemp("eval") / "run"
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml", TINY_CYCLEGAN + [
        f'data.root="{tiny_unpaired}"', f'run_dir="{run}"', "train.steps=2",
        "train.log_every=1"])
    train(cfg, progress=False)
    export_run(run)
    return run


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("eval") / "toy"
    cfg = recipe_mod.load(ROOT / "recipes" / "toy_gan_ring.toml", [
        "model.hidden=16", f'run_dir="{run}"', "train.steps=6", "train.log_every=2"])
    train(cfg, progress=False)
    return run


def _folder(path: Path) -> torch.Tensor:
    from translate.images import list_images, load_image, to_tensor

    return torch.cat([to_tensor(load_image(p)) for p in list_images(path)[0]])


# ---------------------------------------------------------------------------- eval: CycleGAN


def test_eval_run_scores_against_the_demo_truth(capsys, cyclegan_run, tiny_unpaired):
    from translate.eval.metrics import psnr, ssim

    r = _json(capsys, ["eval", str(cyclegan_run), "--json"])
    assert r["kind"] == "translation" and r["truth"] is True and r["n_a"] == r["n_b"] == 4
    a, b = _folder(tiny_unpaired / "testA"), _folder(tiny_unpaired / "testB")
    _, nets, _ = run_generators(cyclegan_run)
    with torch.no_grad():
        fake_b = nets["G_ab"](a).clamp(-1, 1)
        fake_a = nets["G_ba"](b).clamp(-1, 1)
        rec_a = nets["G_ba"](fake_b).clamp(-1, 1)
    # Recomputed here from the checkpoint weights: eval must score what the run learned.
    assert r["psnr"] == pytest.approx(float(psnr(fake_b, b)), abs=1e-3)
    assert r["ssim"] == pytest.approx(float(ssim(fake_b, b)), abs=1e-3)
    assert r["ba_psnr"] == pytest.approx(float(psnr(fake_a, a)), abs=1e-3)
    assert r["baseline_psnr"] == pytest.approx(float(psnr(a, b)), abs=1e-4)
    assert r["baseline_ssim"] == pytest.approx(float(ssim(a, b)), abs=1e-4)
    assert r["cycle_l1"] == pytest.approx(float((rec_a - a).abs().mean()), abs=1e-4)
    assert {"cycle_psnr", "ba_cycle_psnr", "ba_cycle_l1", "ba_ssim"} <= set(r)
    assert "fid" not in r  # only with --fid-features


def test_a_run_is_scored_one_image_per_call_in_the_lanes(cyclegan_run):
    # As an export loads on a CPU (translate.load_generator): fp32, batches in the two lanes.
    from translate.eval.evaluate import _net_translator

    _, nets, _ = run_generators(cyclegan_run)
    calls: list[tuple[int, int, int]] = []
    nets["G_ab"].register_forward_hook(lambda m, args, out: calls.append(
        (len(args[0]), torch.get_num_threads(), threading.get_ident())))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        want = nets["G_ab"](x).clamp(-1, 1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _net_translator(nets["G_ab"])(x)
    finally:
        torch.set_num_threads(before)
    assert [c[:2] for c in calls[1:]] == [(1, 1)] * 4  # calls[0]: `want`, here
    assert threading.get_ident() not in {c[2] for c in calls[1:]}
    assert (got - want).abs().max() < 1e-5  # fp32


def test_eval_table_is_the_default_output(capsys, cyclegan_run):
    assert cli_main(["eval", str(cyclegan_run)]) == 0
    out = capsys.readouterr().out
    for text in ("PSNR vs truth", "SSIM vs truth", "cycle PSNR", "do nothing", "A->B", "B->A"):
        assert text in out


def test_eval_of_an_export_file_needs_data_and_has_no_cycle(capsys, cyclegan_run,
                                                            tiny_unpaired):
    full = _json(capsys, ["eval", str(cyclegan_run), "--json"])
    model = cyclegan_run / "export" / "G_ab.safetensors"
    r = _json(capsys, ["eval", str(model), "--data", str(tiny_unpaired), "--json"])
    assert r["psnr"] == pytest.approx(full["psnr"], abs=1e-3)
    assert not any(k.startswith(("cycle", "ba_")) for k in r)
    err = cli_error(capsys, ["eval", str(model)])
    assert str(model) in err and "--data" in err
    # An export folder holds both directions, so the cycle comes back.
    both = _json(capsys, ["eval", str(cyclegan_run / "export"), "--data", str(tiny_unpaired),
                          "--json"])
    assert both["cycle_psnr"] == pytest.approx(full["cycle_psnr"], abs=1e-3)


def test_without_the_demo_marker_there_is_no_truth(capsys, cyclegan_run, tiny_unpaired,
                                                   tmp_path):
    for split in ("testA", "testB"):
        shutil.copytree(tiny_unpaired / split, tmp_path / split)
    r = _json(capsys, ["eval", str(cyclegan_run), "--data", str(tmp_path), "--json"])
    assert r["truth"] is False
    assert not any(k.endswith(("psnr", "ssim")) and "cycle" not in k for k in r)
    assert "cycle_psnr" in r and "ba_cycle_l1" in r
    # One direction without truth scores nothing: said before any image is translated.
    model = cyclegan_run / "export" / "G_ab.safetensors"
    with mock.patch("translate.eval.evaluate.apply_all", side_effect=AssertionError("ran")):
        err = cli_error(capsys, ["eval", str(model), "--data", str(tmp_path)])
    assert err.startswith(f"error: {model}: nothing to score") and "--fid-features" in err


def test_eval_fid_features_small(capsys, cyclegan_run):
    r = _json(capsys, ["eval", str(cyclegan_run), "--fid-features", "small", "--json"])
    assert "relative" in r["features"]
    for key in ("fid", "kid_mean", "ba_fid", "baseline_fid", "baseline_kid_mean"):
        assert math.isfinite(r[key]), key
    assert r["fid"] >= -1e-6


def test_eval_writes_its_protocol_and_warns_that_fid_on_few_images_is_biased(
        capsys, cyclegan_run, tmp_path):
    from translate.eval.protocol import extractor_sha256

    assert cli_main(["eval", str(cyclegan_run), "--fid-features", "small", "--json"]) == 0
    captured = capsys.readouterr()
    r = json.loads(captured.out)
    p = r["protocol"]
    assert p["checkpoint"] == "step 2, the newest (last)"
    assert p["images"] == {"testA": 4, "testB": 4} and p["image_size"] == "16x16 px"
    assert p["features_sha256"] == extractor_sha256("small") and "8-bit" in p["resize"]
    assert "subsets" in p["kid_interval"]
    for prefix in ("", "ba_", "baseline_"):
        assert r[prefix + "kid_lo"] <= r[prefix + "kid_hi"]
    assert r["warnings"] == [line.removeprefix("warning: ")
                             for line in captured.err.strip().splitlines()]
    assert "FID on few images (testA 4, testB 4): below 2,000" in r["warnings"][0]
    # Scores still printed, and the table mode prints the protocol under the table.
    assert cli_main(["eval", str(cyclegan_run), "--fid-features", "small", "--step", "2"]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and "protocol: checkpoint: step 2, chosen with --step" in out
    # Without FID there is no warning, and the protocol still names the checkpoint.
    plain = _json(capsys, ["eval", str(cyclegan_run), "--json"])
    assert plain["warnings"] == [] and plain["protocol"]["checkpoint"].startswith("step 2")
    # The hash of an Inception weights file is the file's.
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"not really weights")
    import hashlib

    assert extractor_sha256(str(weights)) == hashlib.sha256(b"not really weights").hexdigest()


def test_eval_errors_are_one_line(capsys, tmp_path, cyclegan_run):
    assert str(tmp_path / "nope") in cli_error(capsys, ["eval", str(tmp_path / "nope")])
    assert "not a run folder" in cli_error(capsys, ["eval", str(tmp_path)])
    cli_error(capsys, ["eval"])
    cli_error(capsys, ["eval", str(cyclegan_run), "--folders", str(tmp_path), str(tmp_path)])
    bad = cli_error(capsys, ["eval", str(cyclegan_run), "--data", str(tmp_path)])
    assert "testA" in bad


def _own_pairs(src: Path, dst: Path, suffix: str) -> Path:
    """src's images re-saved losslessly under dst (in a subfolder, as `suffix` files): a
    user's own folder, named and laid out unlike the demo data."""
    for p in sorted(src.glob("*.png")):
        (dst / "set1").mkdir(parents=True, exist_ok=True)
        Image.open(p).save(dst / "set1" / (p.stem + suffix))
    return dst


def test_eval_on_your_own_aligned_pairs(capsys, cyclegan_run, tiny_unpaired, tmp_path):
    """`--input DIR --truth DIR`: the demo's testA/testB copied as a user's own pairs (other
    folder names, a subfolder, .bmp truths) score exactly what the demo's known truth scores,
    through a run (both directions, with cycle) and through one exported file."""
    full = _json(capsys, ["eval", str(cyclegan_run), "--json"])
    photos = _own_pairs(tiny_unpaired / "testA", tmp_path / "photos", ".png")
    truth = _own_pairs(tiny_unpaired / "testB", tmp_path / "truth", ".bmp")
    r = _json(capsys, ["eval", str(cyclegan_run), "--input", str(photos), "--truth",
                       str(truth), "--json"])
    assert r["truth"] is True and r["split"] == "pairs" and r["n_a"] == 4
    for key in ("psnr", "ssim", "baseline_psnr", "baseline_ssim", "cycle_psnr", "cycle_l1"):
        assert r[key] == pytest.approx(full[key], abs=1e-5), key
    back = _json(capsys, ["eval", str(cyclegan_run), "--input", str(truth), "--truth",
                          str(photos), "--direction", "ba", "--json"])
    assert back["ba_psnr"] == pytest.approx(full["ba_psnr"], abs=1e-5) and "psnr" not in back
    model = cyclegan_run / "export" / "G_ab.safetensors"
    one = _json(capsys, ["eval", str(model), "--input", str(photos), "--truth", str(truth),
                         "--json"])  # no --data needed
    assert one["psnr"] == pytest.approx(full["psnr"], abs=1e-3) and "cycle_psnr" not in one
    assert cli_main(["eval", str(cyclegan_run), "--input", str(photos), "--truth",
                  str(truth)]) == 0
    assert "PSNR vs truth" in capsys.readouterr().out


def test_eval_of_own_pairs_refuses_what_it_cannot_pair(capsys, cyclegan_run, tiny_unpaired,
                                                       tmp_path):
    photos = _own_pairs(tiny_unpaired / "testA", tmp_path / "photos", ".png")
    truth = _own_pairs(tiny_unpaired / "testB", tmp_path / "truth", ".png")
    run = str(cyclegan_run)
    victim = sorted((truth / "set1").iterdir())[1]
    victim.rename(victim.with_name("renamed.png"))
    err = cli_error(capsys, ["eval", run, "--input", str(photos), "--truth", str(truth)])
    assert f"no image named like set1/{victim.name}" in err and "1 of 4 inputs" in err
    Image.new("RGB", (20, 12)).save(victim)
    err = cli_error(capsys, ["eval", run, "--input", str(photos), "--truth", str(truth)])
    assert f"{victim}: 20x12 pixels, but its input" in err
    assert "--truth: missing" in cli_error(capsys, ["eval", run, "--input", str(photos)])
    assert "--direction" in cli_error(capsys, [
        "eval", str(cyclegan_run / "export" / "G_ab.safetensors"), "--input", str(photos),
        "--truth", str(truth), "--direction", "ba"])


# ---------------------------------------------------------------------------- eval: folders


def test_folders_fid_of_a_folder_with_itself_is_zero(capsys, tiny_unpaired):
    a, b = str(tiny_unpaired / "trainA"), str(tiny_unpaired / "trainB")
    same = _json(capsys, ["eval", "--folders", a, a, "--json"])
    other = _json(capsys, ["eval", "--folders", a, b, "--json"])
    assert same["n1"] == same["n2"] == 12 and "relative" in same["features"]
    assert abs(same["fid"]) < 1e-4
    assert other["fid"] > 100 * max(abs(same["fid"]), 1e-6)
    assert other["kid_mean"] > same["kid_mean"]


def test_folders_with_bad_inception_weights(capsys, tiny_unpaired, tmp_path):
    a = str(tiny_unpaired / "trainA")
    missing = tmp_path / "pt_inception.pth"
    err = cli_error(capsys, ["eval", "--folders", a, a, "--inception-weights", str(missing)])
    assert str(missing) in err


# ---------------------------------------------------------------------------- eval: toy


class _FixedG(torch.nn.Module):
    """A stand-in generator that puts sample i exactly on mode pick(i)."""

    def __init__(self, points: torch.Tensor):
        super().__init__()
        self.z_dim, self.points = 2, points

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.points[torch.arange(len(z)) % len(self.points)]


def test_toy_scores_on_perfect_and_collapsed_generators():
    from translate.data import toy_modes

    modes = toy_modes("ring")
    perfect = toy_scores(_FixedG(modes), "ring", n=800)
    assert perfect["modes"] == 8 and perfect["hq"] == 1.0 and perfect["rkl"] == pytest.approx(0)
    collapsed = toy_scores(_FixedG(modes[:1]), "ring", n=800)
    assert collapsed["modes"] == 1 and collapsed["rkl"] == pytest.approx(math.log(8))
    off = toy_scores(_FixedG(modes * 1.5), "ring", n=800)
    assert off["modes"] == 0 and off["hq"] == 0.0 and off["rkl"] == math.inf


def test_eval_of_a_toy_run(capsys, toy_run):
    r = _json(capsys, ["eval", str(toy_run), "--json"])
    assert r["kind"] == "toy" and r["toy"] == "ring" and r["step"] == 6
    assert r["samples"] == 2500 and r["n_modes"] == 8
    assert 0 <= r["modes"] <= 8 and 0.0 <= r["hq"] <= 1.0
    assert r["rkl"] == "inf" if r["modes"] == 0 else 0 <= r["rkl"] <= math.log(8) + 1e-9
    again = _json(capsys, ["eval", str(toy_run), "--json", "--samples", "300"])
    assert again["samples"] == 300
    assert cli_main(["eval", str(toy_run)]) == 0
    assert "modes captured" in capsys.readouterr().out
    assert "EMA" in cli_error(capsys, ["eval", str(toy_run), "--ema"])


# ---------------------------------------------------------------------------- plot


def test_plot_of_a_run(capsys, cyclegan_run, tmp_path):
    assert cli_main(["plot", str(cyclegan_run)]) == 0
    path = cyclegan_run / "plot.png"
    assert f"wrote {path}" in capsys.readouterr().out
    with Image.open(path) as im:
        im.verify()
    img = Image.open(path)
    # Panels: G, D, eval (the demo recipe's eval/psnr), health (the health monitor's values),
    # lr (lr/D, lr/G, lr_scale), speed (it_s).
    assert img.size == (WIDTH, TITLE_HEIGHT + 6 * PANEL_HEIGHT) and img.mode == "RGB"
    log = parse_log((cyclegan_run / "log.jsonl").read_text().splitlines())
    groups = group_keys(list(log.series))
    assert list(groups) == ["G", "D", "eval", "health", "lr", "speed (it/s)"], groups
    assert sorted(groups["lr"]) == ["lr/D", "lr/G", "lr_scale"]
    # Inside the G panel's plot area (left of the legend), the curves are coloured pixels.
    inner = np.asarray(img)[TITLE_HEIGHT + 40:TITLE_HEIGHT + PANEL_HEIGHT - 50,
                            100:WIDTH - 220].reshape(-1, 3).astype(int)
    assert ((inner.max(1) - inner.min(1)) > 80).sum() > 300
    out = tmp_path / "sub" / "p.png"
    assert cli_main(["plot", str(cyclegan_run), "--out", str(out), "--smooth", "0.5"]) == 0
    assert out.is_file() and not list(out.parent.glob(".*tmp"))


# ---------------------------------------------------------------------------- bench/quality.py


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_quality_summary_and_targets():
    q = _bench()
    runs = [{"toy": "ring", "modes": 8, "hq": 0.99, "rkl": 0.01},
            {"toy": "ring", "modes": 6, "hq": 0.97, "rkl": 0.05}]
    s = q.summarize(runs)
    assert s["ring_modes"] == 7 and s["ring_modes_se"] == pytest.approx(1.0)
    assert "grid_modes" not in s
    assert q.meets("ring", "modes", 8.0) and not q.meets("ring", "modes", 7.9)
    assert q.meets("grid", "rkl", 0.03) and not q.meets("grid", "hq", 0.94)


def test_bench_quality_smoke(capsys, tmp_path):
    q = _bench()
    argv = ["--toy", "--seeds", "1", "--steps", "3", "--method", "gan", "--set",
            "model.hidden=16", "--runs", str(tmp_path), "--json"]
    assert q.main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["method"] == "gan" and r["seeds"] == 1 and r["steps"] == 3
    for key in ("ring_modes", "ring_hq", "ring_rkl", "grid_modes", "grid_hq", "grid_rkl"):
        assert key in r
    assert 0 <= r["grid_modes"] <= 25 and 0 <= r["ring_hq"] <= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gan_grid_seed0", "gan_ring_seed0"]


@pytest.mark.slow
def test_eval_cli_in_a_subprocess(tiny_unpaired):
    a = str(tiny_unpaired / "trainA")
    proc = run_cli("eval", "--folders", a, a, "--json")
    assert abs(json.loads(proc.stdout)["fid"]) < 1e-4
    bad = run_cli("eval", "--folders", a, "/nonexistent", check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: /nonexistent")
