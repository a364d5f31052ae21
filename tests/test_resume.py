"""Run folders and resume: a folder that holds a run is never reused silently (refused, or
moved aside whole with --overwrite), the default folder is the recipe's and the data's, and a
resume continues the run as its config.json says (only a longer run, the LR remedies and how it
is logged may change). Each test trains for real through the CLI, then does the misuse, then
compares the run folder byte for byte, or the resumed run with an uninterrupted one. Runs that
are compared name their precision (fp32)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, run_cli, set_args, tiny_cli
from safetensors.torch import load_file

from translate import cli
from translate.core import checkpoint, loop
from translate.core.schedules import lr_factor
from translate.export import read_metadata
from translate.methods import METHODS

RECIPE = "recipes/toy_gan_ring.toml"
TOY = tiny_cli("toy")
FP32 = ["--mixed-precision", "no"]


def _args(run: Path, *extra: str) -> list[str]:
    return ["train", RECIPE, *TOY, "--run-dir", str(run), "--log-every", "1", "--save-every",
            "2", "--sample-every", "1000", "--no-progress", *extra]


def _train(run: Path, *extra: str, check: bool = True):
    return run_cli(*_args(run, *extra), check=check)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def _refused(proc) -> str:
    """The one line of a refusal (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _done(proc, cwd: Path = ROOT) -> Path:
    """The checkpoint the done line names; it exists."""
    m = re.search(r"^done: \d+ steps in .+; checkpoint (.+)$", proc.stdout, re.MULTILINE)
    assert m, proc.stdout
    ckpt = cwd / m.group(1)
    assert (ckpt / "state.json").is_file(), f"the done line names a missing checkpoint {ckpt}"
    return ckpt


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(ckpt.glob("optimizer*.bin")):
        for p, slots in torch.load(f, weights_only=True)["state"].items():
            out.update({f"{f.name}/{p}/{k}": v for k, v in slots.items() if torch.is_tensor(v)})
    assert out
    return out


def _assert_same(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6, msg=k)


# ---------------------------------------------------------------------------- reuse


@pytest.mark.slow
def test_training_again_into_a_run_folder_is_refused_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    _done(_train(run, "--steps", "4", *FP32))
    before = _files(run)
    assert {"config.json", "log.jsonl", "checkpoints/step_0000004/state.json"} <= set(before)
    for misuse in (["--steps", "2"], ["--steps", "100", "--batch-size", "4"], []):
        line = _refused(_train(run, *misuse, check=False))
        assert line.startswith(f"error: {run}: holds checkpoints, log.jsonl, config.json of an "
                               "earlier run"), line
        for way_out in ("--resume auto", "--run-dir", "--overwrite"):
            assert way_out in line, line
        assert _files(run) == before  # log.jsonl, config.json, checkpoints: byte for byte
    # A start killed before its first checkpoint left a log and a config: not taken either.
    early = tmp_path / "early"
    early.mkdir()
    for name in ("log.jsonl", "config.json"):
        shutil.copy(run / name, early / name)
    line = _refused(_train(early, "--steps", "2", check=False))
    assert "holds log.jsonl, config.json of an earlier run" in line
    assert _files(early) == {n: before[n] for n in ("config.json", "log.jsonl")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["early", "run"]  # nothing moved


@pytest.mark.slow
def test_overwrite_moves_the_old_run_aside_whole(tmp_path):
    run = tmp_path / "run"
    _train(run, "--steps", "6", *FP32)
    before = _files(run)
    proc = _train(run, "--steps", "2", "--overwrite")
    assert _done(proc) == checkpoint.step_dir(run, 2)  # not pruned by the old run's 4, 6
    (aside,) = tmp_path.glob("run.old-*")
    assert f"moved to {aside}" in proc.stderr
    assert _files(aside) == before
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_0000002"]
    assert [r["step"] for r in _log(run)] == [1, 2]
    line = _refused(_train(run, "--overwrite", "--resume", "auto", check=False))
    assert "--overwrite" in line and "--resume" in line


@pytest.mark.slow
def test_the_demo_recipe_on_user_data_gets_its_own_folder(tiny_unpaired, tmp_path):
    """Not runs/demo (translate demo's), one folder per data folder, and an export that names
    the recipe it came from."""
    sets = set_args(TINY_CYCLEGAN)
    folders = {}
    for name in ("horses", "zebras"):
        (tmp_path / name).symlink_to(tiny_unpaired)
        proc = run_cli("train", str(ROOT / "recipes" / "cyclegan_demo.toml"), *sets, "--data",
                       str(tmp_path / name), "--steps", "1", "--no-progress", cwd=tmp_path)
        folders[name] = _done(proc, tmp_path).parents[1]
    assert folders == {n: tmp_path / "runs" / f"cyclegan_demo-{n}" for n in folders}
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == \
        ["cyclegan_demo-horses", "cyclegan_demo-zebras"]
    run_cli("export", "runs/cyclegan_demo-horses", cwd=tmp_path)
    meta = read_metadata(folders["horses"] / "export" / "G_ab.safetensors")
    assert meta["recipe"] == "cyclegan_demo"


# ---------------------------------------------------------------------------- resume


class _Killed(BaseException):
    """Ends the process's run as a kill would (not caught by the CLI's error handling)."""


@pytest.mark.slow
def test_resume_auto_continues_the_run_as_configured_not_as_the_recipe(tmp_path, monkeypatch):
    """The issue's case: a run of 6 steps, batch 4, fp32, linear LR decay dies after step 3;
    `--resume auto` with the recipe alone (5,000 steps, batch 100, auto precision, constant
    LR, hidden 400) continues it as it was, equal to an uninterrupted run."""
    flags = ["--steps", "6", "--batch-size", "4", *FP32, "--set", 'train.lr_schedule="linear"',
             "--save-every", "3"]
    straight, run = tmp_path / "straight", tmp_path / "run"
    _train(straight, *flags)
    real = loop.run_step

    def dies_after_3(s, state, *args):
        out = real(s, state, *args)
        if state.step == 3:
            raise _Killed
        return out
    monkeypatch.setattr(loop, "run_step", dies_after_3)
    with pytest.raises(_Killed):
        cli.main(_args(run, *flags))
    monkeypatch.undo()
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_0000003"]

    proc = run_cli("train", RECIPE, "--run-dir", str(run), "--resume", "auto", "--no-progress")
    assert _done(proc) == checkpoint.step_dir(run, 6)
    assert "global batch 4 x 1 processes x 1 accumulation = 4; 6 steps; precision no" in \
        proc.stderr
    _assert_same(checkpoint.step_dir(run, 6), checkpoint.step_dir(straight, 6))
    a, b = _log(straight), _log(run)
    assert [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for k in ("lr_scale", "lr/G", "lr/D", "G/loss", "D/loss"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (k, ra["step"])
    assert [r["lr_scale"] for r in b] == pytest.approx([lr_factor(i, 6, "linear")
                                                        for i in range(6)])
    cfg_a, cfg_b = (json.loads((r / "config.json").read_text()) for r in (straight, run))
    assert {**cfg_b, "run_dir": ""} == {**cfg_a, "run_dir": ""}


@pytest.mark.slow
def test_resume_refuses_each_changed_setting_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    _train(run, "--steps", "4", *FP32)
    before = _files(run)
    line = _refused(_train(run, "--resume", "auto", "--steps", "2", "--batch-size", "4",
                           "--mixed-precision", "bf16", "--seed", "3", "--set",
                           'train.lr_schedule="linear"', check=False))
    for difference in ('seed 0 -> 3', 'train.lr_schedule "constant" -> "linear"',
                       "train.steps 4 -> 2 (a resume can extend a run, never shorten it)",
                       "global batch 8 -> 4", "--batch-size 8", "precision no -> bf16",
                       "--mixed-precision no"):
        assert difference in line, line
    assert _files(run) == before
    # Another recipe's model settings: named, and nothing written either.
    line = _refused(_train(run, "--resume", "auto", "--set", "model.hidden=32", check=False))
    assert "model.hidden 16 -> 32" in line and "different recipe" in line
    assert _files(run) == before


@pytest.mark.slow
def test_steps_extends_a_run_on_the_schedule_of_its_new_length_and_the_log_says_so(tmp_path):
    run = tmp_path / "run"
    _train(run, "--steps", "4", *FP32, "--set", 'train.lr_schedule="linear"')
    proc = _train(run, "--resume", "auto", "--steps", "8", "--set", "train.lr_d=5e-5",
                  "--log-every", "2")
    assert _done(proc) == checkpoint.step_dir(run, 8)
    assert ("changed against the run's config.json: train.lr_d 0.0001 -> 5e-05; train.steps "
            "4 -> 8 (the linear LR schedule of 8 steps: LR scale of step 5 0 -> 0.8)") in \
        proc.stderr
    log = _log(run)
    assert [(r["step"], r.get("run/steps")) for r in log] == \
        [(1, 4), (2, None), (3, None), (4, None), (6, 8), (8, None)]
    for r in log:
        total = 4 if r["step"] <= 4 else 8
        assert r["lr_scale"] == pytest.approx(lr_factor(r["step"] - 1, total, "linear"))
        assert r["lr/D"] == pytest.approx((1e-4 if r["step"] <= 4 else 5e-5) * r["lr_scale"])
    config = json.loads((run / "config.json").read_text())
    assert (config["train"]["steps"], config["train"]["lr_d"]) == (8, 5e-5)


@pytest.mark.slow
def test_resume_auto_needs_a_checkpoint_and_auto_or_new_starts_one(tmp_path):
    typo = tmp_path / "typo"
    line = _refused(_train(typo, "--resume", "auto", "--steps", "2", check=False))
    assert f"{typo}: no checkpoint to resume" in line and "--resume auto-or-new" in line
    assert not typo.exists()
    run = tmp_path / "run"
    proc = _train(run, "--resume", "auto-or-new", "--steps", "2", *FP32)
    assert _done(proc) == checkpoint.step_dir(run, 2) and "resumed from" not in proc.stderr
    before = _files(run)
    again = _train(run, "--resume", "auto-or-new")  # finished: continues with nothing to do
    assert "resumed from" in again.stderr and _done(again) == checkpoint.step_dir(run, 2)
    assert _files(run) == before
    # What a start killed before its first checkpoint left is moved aside, then it starts.
    shutil.rmtree(run / "checkpoints")
    left = _files(run)
    proc = _train(run, "--resume", "auto-or-new")
    (aside,) = tmp_path.glob("run.old-*")
    assert "no checkpoint to resume" in proc.stderr and _files(aside) == left
    assert _done(proc) == checkpoint.step_dir(run, 2)


@pytest.mark.slow
def test_a_refused_resume_leaves_no_run_folder_behind(tmp_path):
    run, new = tmp_path / "run", tmp_path / "new"
    _train(run, "--steps", "2", *FP32)
    before = _files(run)
    line = _refused(_train(new, "--resume", str(tmp_path / "nowhere"), check=False))
    assert "no complete checkpoint there" in line
    line = _refused(_train(new, "--resume", str(checkpoint.step_dir(run, 2)), "--set",
                           "model.hidden=32", check=False))
    assert "model.hidden 16 -> 32" in line
    line = _refused(run_cli("train", "recipes/toy_wgan_gp_ring.toml", "--run-dir", str(new),
                            "--resume", str(run), check=False))
    assert "made by recipe 'toy_gan_ring'" in line
    assert not new.exists() and _files(run) == before
    # Resuming one run's checkpoint into a folder that holds another run would mix them.
    _train(new, "--steps", "2", *FP32)
    other = _files(new)
    line = _refused(_train(new, "--resume", str(checkpoint.step_dir(run, 2)), check=False))
    assert "of another run" in line and _files(new) == other and _files(run) == before


@pytest.mark.slow
def test_rewinding_to_an_older_checkpoint_moves_the_later_ones_aside(tmp_path):
    run = tmp_path / "run"
    _train(run, "--steps", "8", *FP32)  # checkpoints 4, 6, 8 (3 kept)
    before = _files(run)
    proc = _train(run, "--resume", str(checkpoint.step_dir(run, 4)))
    assert _done(proc) == checkpoint.step_dir(run, 8)
    (aside,) = run.glob("rewound-*")
    assert f"moved to {aside}" in proc.stderr
    assert _files(aside) == {k.removeprefix("checkpoints/"): v for k, v in before.items()
                             if k.startswith(("checkpoints/step_0000006",
                                              "checkpoints/step_0000008", "log.jsonl"))}
    assert [p.name for p in checkpoint.list_checkpoints(run)] == \
        ["step_0000004", "step_0000006", "step_0000008"]
    # The rewound run retraced the same steps: fp32 on a CPU repeats exactly.
    _assert_same(checkpoint.step_dir(run, 8), aside / "step_0000008")
    assert [r["step"] for r in _log(run)] == list(range(1, 9))


# ---------------------------------------------------------------------------- upgrades

# The model keys each method's checkpoints are fingerprinted by (checkpoint.fingerprint), as of
# 2026-12-06. A key added to a method's config goes into that config's NEW_KEYS, with the value
# that means "as before the key existed"; else every checkpoint made before the upgrade is
# refused as "made by a different recipe" after it. Remove a key here only on purpose.
_TRANSLATION = {"dropout", "generator", "n_blocks", "n_layers_d", "ndf", "ngf", "norm",
                "objective", "padding", "real_target", "unet_affine_out", "unet_downs",
                "unet_full_res", "upsample"}
_GAN = {"clip_value", "d_norm", "depth", "gp_weight", "hidden", "image_size", "minibatch_std",
        "n_critic", "ndf", "net", "ngf", "objective", "pack", "penalty", "r1_gamma",
        "real_target", "self_attention", "spectral_norm", "unrolled_steps", "z_dim"}
FINGERPRINTED = {
    "cyclegan": _TRANSLATION | {"diff_augment", "identity_until", "lambda_cycle",
                                "lambda_identity", "pool_size", "spectral_norm"},
    "cut": _TRANSLATION | {"flip_equivariance", "head_width", "identity_until", "idt_apart",
                           "lambda_gan", "lambda_idt_l1", "lambda_nce", "nce_idt", "nce_layers",
                           "nce_t", "num_patches"},
    "gan": _GAN, "dcgan": _GAN, "wgan_gp": _GAN, "cgan": _GAN | {"classes"},
    "infogan": _GAN | {"cat_dim", "lambda_cat", "lambda_cont", "n_cat", "n_cont", "q_hidden"},
}


def test_every_model_key_is_fingerprinted_or_declared_new():
    for name, spec in METHODS.items():
        keys = {f.name for f in fields(spec.config)} - set(getattr(spec.config, "NEW_KEYS", {}))
        assert keys == FINGERPRINTED[name], (
            f"{name}: {sorted(keys ^ FINGERPRINTED[name])}: declare a new model key in the "
            "config's NEW_KEYS with its 'as before' value, so older checkpoints still resume")


def test_a_checkpoint_made_before_a_model_key_existed_resumes_after_the_upgrade(tiny_unpaired,
                                                                                 tmp_path):
    run = tmp_path / "run"
    args = ["train", "recipes/cut_demo.toml", *tiny_cli("cut"), "--set",
            f'data.root="{tiny_unpaired}"', "--run-dir", str(run), "--log-every", "1",
            "--save-every", "2", "--sample-every", "1000", "--no-progress", *FP32]
    run_cli(*args, "--steps", "2")
    # Make it a run of the code before CUT had diff_augment and spectral_norm: its config.json
    # without them, and its checkpoint's fingerprint as that code computed it (the first 16 hex
    # digits of the sha256 of the sorted JSON of the method and every model key it had).
    config = json.loads((run / "config.json").read_text())
    for key in ("diff_augment", "spectral_norm"):
        del config["model"][key]
    (run / "config.json").write_text(json.dumps(config))
    text = json.dumps({"method": "cut", "model": config["model"]}, sort_keys=True)
    state_file = checkpoint.step_dir(run, 2) / "state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    state_file.write_text(json.dumps(state))
    proc = run_cli(*args, "--steps", "4", "--resume", "auto")
    assert "resumed from" in proc.stderr and "done: 4 steps" in proc.stdout
    # The new key at a value the run did not train with is another recipe, as before.
    line = _refused(run_cli(*args, "--steps", "6", "--resume", "auto", "--set",
                            "model.spectral_norm=true", check=False))
    assert "different recipe" in line
