"""InfoGAN: the MI loss falls and Q reads G's categorical code back after a short run; code
sweeps, `translate sample --vary-code`, resume, export, and the recipe checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, set_args
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from translate import config
from translate import recipe as recipe_mod
from translate.core.checkpoint import list_checkpoints
from translate.errors import ConfigError, UserError
from translate.explore.sample import sample_command
from translate.methods import METHODS
from translate.methods.infogan import (
    CONT_STEPS,
    describe_codes,
    info_loss,
    q_accuracy,
    vary_code_input,
)
from translate.runner import train

CAT_DIM = 4
TINY = ["model.ngf=16", "model.ndf=16", "model.z_dim=8", f"model.cat_dim={CAT_DIM}",
        "train.batch_size=16", "train.log_every=10", "train.sample_every=50",
        "train.save_every=50"]


def image_folder(root: Path, n: int = 16, size: int = 32) -> Path:
    """Noisy squares of random colours: something to imitate, with no labels."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        noisy = rng.uniform(0, 255, 3) + rng.normal(0, 20, (size, size, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(root / f"{i}.png")
    return root


def cfg_for(root: Path, run: Path, steps: int, extra: list[str] | None = None):
    return recipe_mod.load(ROOT / "recipes" / "infogan.toml", TINY + [
        f'data.root="{root}"', f'run_dir="{run}"', f"train.steps={steps}", *(extra or [])])


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("infogan") / "images")


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """100 steps (about 15 s on one thread)."""
    run = tmp_path_factory.mktemp("infogan_run") / "run"
    train(cfg_for(data, run, 100), progress=False)
    return run


def load_nets(run: Path) -> tuple[config.RunConfig, dict[str, torch.nn.Module]]:
    """G and D (with Q) from the newest checkpoint: the loop saves nets in method order."""
    cfg = recipe_mod.load_json(run / "config.json")
    method = METHODS[cfg.method].build(cfg)
    ckpt = list_checkpoints(run)[-1]
    for i, net in enumerate(method.nets.values()):
        net.load_state_dict(load_file(str(ckpt / ("model.safetensors" if i == 0 else
                                                  f"model_{i}.safetensors"))))
        net.eval()
    return cfg, method.nets


# ---------------------------------------------------------------------------- pure parts


def test_code_sweeps_keep_everything_else_fixed():
    m = recipe_mod.load(ROOT / "recipes" / "infogan.toml", TINY).model  # 1 categorical, 2 continuous
    z, cat = torch.randn(3, 8), torch.randint(CAT_DIM, (3, 1))
    cont = torch.rand(3, 2) * 2 - 1
    x, cols = vary_code_input(m, 0, z, cat, cont)
    assert cols == CAT_DIM and x.shape == (3 * CAT_DIM, 8 + CAT_DIM + 2)
    rows = x.reshape(3, CAT_DIM, -1)
    assert (rows[:, :, 8:8 + CAT_DIM].argmax(-1) == torch.arange(CAT_DIM)).all()
    assert (rows[:, :, :8] == z[:, None]).all() and (rows[:, :, -2:] == cont[:, None]).all()
    x, cols = vary_code_input(m, 2, z, cat, cont)  # the second continuous code
    rows = x.reshape(3, CAT_DIM if cols == CAT_DIM else CONT_STEPS, -1)
    assert cols == CONT_STEPS
    torch.testing.assert_close(rows[0, :, -1], torch.linspace(-2, 2, CONT_STEPS))
    assert (rows[:, :, -2] == cont[:, None, 0]).all()
    assert describe_codes(m) == f"0: categorical ({CAT_DIM} values); 1-2: continuous"


def test_info_loss_is_zero_for_a_perfect_q_and_chance_for_a_blind_one():
    m = recipe_mod.load(ROOT / "recipes" / "infogan.toml", TINY).model
    cat, cont = torch.randint(CAT_DIM, (64, 1)), torch.rand(64, 2) * 2 - 1
    perfect = torch.cat([torch.nn.functional.one_hot(cat[:, 0], CAT_DIM) * 50.0, cont], 1)
    out = info_loss(m, perfect, cat, cont)
    assert out["mi"] < 1e-6 and out["q_acc"] == 1
    blind = torch.zeros(64, CAT_DIM + 2)
    out = info_loss(m, blind, cat, cont)
    assert out["mi_cat"] == pytest.approx(np.log(CAT_DIM), rel=1e-5)
    assert out["mi_cont"] == pytest.approx(0.5 * float((cont ** 2).sum(1).mean()), rel=1e-5)


@pytest.mark.parametrize("sets,needle", [
    (["model.n_cat=0", "model.n_cont=0"], "at least one code"),
    (["model.cat_dim=1"], "model.cat_dim"),
    (['model.penalty="gp"', 'model.d_norm="layer"'], "model.penalty"),
    (['model.net="mlp"', 'data.kind="toy"'], "model.net"),
])
def test_impossible_settings_are_config_errors(sets, needle):
    with pytest.raises(ConfigError, match=needle):
        recipe_mod.load(ROOT / "recipes" / "infogan.toml", sets)


# ---------------------------------------------------------------------------- training


def test_mi_loss_falls_and_q_reads_the_code_back(trained):
    logs = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    for key in ("G/mi_cat", "D/mi_cat"):
        first, last = logs[0][key], logs[-1][key]
        assert last < 0.5 * first, (key, first, last)
    assert logs[0]["G/mi_cont"] > 0
    cfg, nets = load_nets(trained)
    (accuracy,) = q_accuracy(cfg, nets["G"], nets["D"], n=256, seed=3)
    assert accuracy > 2 / CAT_DIM, accuracy  # chance is 1 / CAT_DIM


@pytest.mark.slow
def test_cli_resume_vary_code_export(trained, data, tmp_path):
    run = tmp_path / "run"
    sets = set_args(TINY)
    run_cli("train", "recipes/infogan.toml", *sets, "--data", str(data), "--run-dir", str(run),
            "--steps", "2", "--save-every", "2")
    proc = run_cli("train", "recipes/infogan.toml", *sets, "--data", str(data), "--run-dir",
                   str(run), "--steps", "4", "--save-every", "2", "--resume", "auto")
    assert "done: 4 steps" in proc.stdout and "resumed from" in proc.stdout + proc.stderr
    assert (run / "checkpoints" / "step_0000004" / "state.json").is_file()

    run_cli("sample", str(trained), "--vary-code", "0", "--n", "8", "--out",
            str(tmp_path / "c0.png"))
    assert Image.open(tmp_path / "c0.png").size == (CAT_DIM * 34 + 2, 2 * 34 + 2)
    grid = np.asarray(Image.open(tmp_path / "c0.png").convert("RGB"), dtype=float)
    tiles = [grid[2:34, 2 + 34 * j: 34 + 34 * j] for j in range(CAT_DIM)]
    assert max(np.abs(t - tiles[0]).mean() for t in tiles) > 1  # the code changes the image
    sample_command(trained, n=20, out=tmp_path / "c2.png", vary_code=2)
    assert Image.open(tmp_path / "c2.png").size == (CONT_STEPS * 34 + 2, 2 * 34 + 2)

    proc = run_cli("sample", str(trained), "--vary-code", "3", "--out", str(tmp_path / "x.png"),
                   check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "0: categorical (4 values); 1-2: continuous" in lines[0]
    with pytest.raises(UserError, match="cgan"):
        sample_command(trained, out=tmp_path / "x.png", class_name="red")
    assert not (tmp_path / "x.png").exists()

    run_cli("export", str(trained), "--out", str(tmp_path / "export"))
    with safe_open(str(tmp_path / "export" / "G.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["codes"] == describe_codes(cfg_for(data, run, 1).model)
    assert meta["z_dim"] == str(8 + CAT_DIM + 2) and meta["noise_dim"] == "8"
