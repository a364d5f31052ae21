"""bench/quality.py: every benchmarked method resolves to a valid config, and the remedy
methods differ from the plain GAN in exactly the key they name."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import pytest
from conftest import ROOT

from translate import config
from translate import recipe as recipe_mod


def _bench():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


Q = _bench()


def _load(method: str, toy: str) -> config.RunConfig:
    pattern, sets = Q.METHODS[method]
    return recipe_mod.load(ROOT / "recipes" / pattern.format(toy=toy), list(sets))


@pytest.mark.parametrize("method", sorted(Q.METHODS))
@pytest.mark.parametrize("toy", Q.TOYS)
def test_every_method_loads_on_both_mixtures(method, toy):
    cfg = _load(method, toy)
    assert cfg.data.kind == "toy" and cfg.data.toy == toy and cfg.model.net == "mlp"


@pytest.mark.parametrize("method,base,key,value", [
    ("gan_pack", "gan", "pack", 2), ("gan_mbstd", "gan", "minibatch_std", 4),
    ("gan_unrolled", "gan", "unrolled_steps", 5),
    ("gan_unrolled_full", "gan_unrolled", "unrolled_backprop", True)])
def test_remedies_are_their_base_plus_one_key(method, base, key, value):
    """Each remedy is the plain GAN plus one key; the full unrolled GAN is the cheap one plus
    its backprop."""
    for toy in Q.TOYS:
        plain, remedy = _load(base, toy), _load(method, toy)
        assert getattr(remedy.model, key) == value != getattr(plain.model, key)
        assert dataclasses.replace(remedy.model, **{key: getattr(plain.model, key)}) == plain.model
        assert remedy.train == plain.train and remedy.data == plain.data


def test_cpu_and_wall_time_are_reported(capsys, tmp_path):
    argv = ["--toy", "--seeds", "1", "--steps", "2", "--method", "pacgan", "--set",
            "model.hidden=8", "--set", "train.batch_size=8", "--runs", str(tmp_path), "--json"]
    assert Q.main(argv) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["method"] == "pacgan" and r["steps"] == 2
    for toy in Q.TOYS:
        # One thread: the CPU time cannot exceed the wall-clock time (both rounded to 0.1 s).
        assert 0 <= r[f"{toy}_cpu_seconds"] <= r[f"{toy}_seconds"] + 0.2
    assert {run["toy"] for run in r["runs"]} == set(Q.TOYS)


def test_the_default_method_is_the_one_that_meets_the_targets():
    assert Q.parse(["--toy"]).method == "pacgan"
    assert Q.parse(["--toy", "--method", "all"]).method == "all"
    with pytest.raises(SystemExit):
        Q.parse(["--toy", "--jobs", "0"])


def test_markdown_table_has_mean_and_stderr_per_cell():
    runs = [{"toy": "ring", "modes": 8, "hq": 0.99, "rkl": 0.002, "seconds": 9, "cpu_seconds": 5},
            {"toy": "ring", "modes": 7, "hq": 0.97, "rkl": 0.004, "seconds": 9, "cpu_seconds": 7}]
    table = Q.markdown([{"method": "pacgan", "seeds": 2, **Q.summarize(runs)}]).splitlines()
    assert len(table) == 3 and table[2].startswith("| pacgan | 2 | 7.5 ± 0.5 | 98.0% ± 1.0% |")
    assert "0.003 ± 0.001" in table[2] and table[2].endswith("| 6 / nan |")


# ---------------------------------------------------------------------------- bench/frontier.py


def _frontier():
    spec = importlib.util.spec_from_file_location("bench_frontier", ROOT / "bench" / "frontier.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


FR = _frontier()


@pytest.mark.parametrize("recipe", sorted(FR.RECIPES))
@pytest.mark.parametrize("task", sorted(FR.TASKS))
def test_every_frontier_recipe_resolves_on_every_task(recipe, task, tmp_path):
    size = FR.TASKS[task]
    cfg = recipe_mod.load(ROOT / "recipes" / FR.RECIPES[recipe].file,
                      FR.overrides(recipe, tmp_path / "data", tmp_path / "run", size, ()))
    assert (cfg.data.crop_size, cfg.data.preprocess, cfg.data.flip) == (size, "crop", True)
    assert cfg.train.epochs == 0 and cfg.train.steps > 0


def test_old_demo_recipe_is_the_one_before_issue_13():
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml", list(FR.OLD_DEMO))
    m, t = cfg.model, cfg.train
    assert (m.generator, m.unet_downs, m.ngf, m.ndf, m.n_layers_d) == ("unet", 4, 16, 16, 2)
    assert (m.upsample, m.padding, m.unet_full_res) == ("transpose", "zero", False)
    assert (m.unet_affine_out, m.identity_until) == (False, 0.0)
    assert (t.steps, t.batch_size, t.lr_g, t.lr_d) == (2000, 4, 2e-4, 2e-4)


def test_frontier_trains_scores_and_prints_one_row_per_recipe_and_task(tmp_path, capsys):
    argv = ["--recipes", "demo,demo_old", "--tasks", "morph", "--size", "16", "--runs",
            str(tmp_path), "--set", "train.steps=2", "--set", "model.unet_downs=2",
            "--set", 'train.mixed_precision="no"', "--markdown", "--json"]
    assert FR.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = json.loads(out[-1])["rows"]
    assert [(r["recipe"], r["task"], r["steps"]) for r in rows] == [("demo", "morph", 2),
                                                                   ("demo_old", "morph", 2)]
    for r in rows:
        # both rounded: seconds to 0.1, seconds per step to 0.1 ms
        assert r["train_seconds"] > 0
        assert abs(r["s_per_step"] * r["steps"] - r["train_seconds"]) <= 0.06
        assert 0 < r["ssim"] < 1 and r["psnr"] > 0 and r["cycle_psnr"] > 0
    table = [line for line in out if line.startswith("| morph |")]
    assert len(table) == 3 and "do nothing" in table[-1]
    # A second call reads the finished runs back instead of training them again.
    assert FR.main(argv) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == rows


def test_quality_translation_hands_over_to_the_frontier(monkeypatch):
    seen = []
    monkeypatch.setattr(FR, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, "frontier", FR)
    assert Q.main(["--translation", "--tasks", "morph"]) == 0
    assert seen == [["--tasks", "morph"]]
