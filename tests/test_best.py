"""train.keep_best: the best-scoring checkpoint kept in checkpoints/best beside the rolling ones,
what it holds, `translate export RUN --best`, the settings refused before a run starts, and a
kill -9 in the middle of writing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, run_cli, set_args
from safetensors.torch import load_file
from test_faults import Cli

from translate import config
from translate import recipe as recipe_mod
from translate.core import best, checkpoint
from translate.errors import UserError
from translate.export import read_metadata, run_generators
from translate.runner import train


def _cyclegan(root: Path, run: Path, steps: int, *sets: str) -> config.RunConfig:
    return recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml", TINY_CYCLEGAN + [
        f'data.root="{root}"', f'run_dir="{run}"', f"train.steps={steps}",
        'train.mixed_precision="no"', 'train.lr_schedule="constant"', "train.lr_g=2e-3",
        "train.eval_every=1", "train.log_every=1", "train.sample_every=1000",
        'train.keep_best="eval/psnr"', *sets])


def _scores(run: Path) -> dict[int, float]:
    return {r["step"]: r["eval/psnr"] for r in map(json.loads, (run / "log.jsonl").read_text()
                                                   .splitlines()) if "eval/psnr" in r}


@pytest.mark.slow
def test_keep_best_keeps_the_best_scoring_checkpoint_and_exports_it(tiny_unpaired, tmp_path):
    run = tmp_path / "run"
    train(_cyclegan(tiny_unpaired, run, 8, "train.save_every=1", "train.keep_checkpoints=8"),
          progress=False)
    scores = _scores(run)
    top = max(scores, key=scores.get)
    assert len(set(scores.values())) > 1  # the scores moved: the choice means something
    kept = [p.name for p in best.root(run).iterdir()]
    assert kept == [f"step_{top:07d}"]  # only the best, no leftovers
    folder, record = best.find(run)
    assert record == {"metric": "eval/psnr", "value": scores[top], "step": top}
    # The weights are those of the rolling checkpoint of that step.
    rolling = checkpoint.step_dir(run, top)
    for f in sorted(rolling.glob("model*.safetensors")):
        a, b = load_file(str(f)), load_file(str(folder / f.name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.list_checkpoints(run)[-1].name == "step_0000008"  # rolling ones apart
    # It is not a training checkpoint: resuming from it is refused with the reason.
    with pytest.raises(UserError, match="holds the weights only"):
        train(_cyclegan(tiny_unpaired, run, 9), resume=str(folder), progress=False)

    out = run_cli("export", str(run), "--best", "--out", str(tmp_path / "export"))
    assert f"step {top}, the best by eval/psnr = {scores[top]:.4g}" in out.stdout
    meta = read_metadata(tmp_path / "export" / "G_ab.safetensors")
    assert meta["step"] == str(top) and meta["checkpoint"].startswith("best by eval/psnr")
    assert run_generators(run, best=True)[2] == folder
    scored = json.loads(run_cli("eval", str(run), "--best", "--json").stdout)
    assert scored["psnr"] == pytest.approx(scores[top], abs=1e-6)
    assert scored["protocol"]["checkpoint"] == (f"step {top}, the best by eval/psnr "
                                                f"({scores[top]:.6g})")
    assert run_cli("export", str(run), "--best", "--step", "2", check=False).returncode == 2


def test_keep_best_settings_are_refused_before_the_run_starts(tiny_unpaired, tmp_path):
    cases = {
        "eval/psnr_typo": ("1", "train.keep_best: 'eval/psnr_typo' is not a score"),
        "eval/psnr": ("0", "needs periodic scores"),
        "eval/kid": ("1", "eval/kid is not scored in this run"),  # the demo data has PSNR
    }
    sets = set_args(TINY_CYCLEGAN)
    for metric, (every, message) in cases.items():
        run = tmp_path / metric.replace("/", "_")
        proc = run_cli("train", "recipes/cyclegan_demo.toml", *sets, "--data",
                       str(tiny_unpaired), "--steps", "2", "--eval-every", every, "--set",
                       f'train.keep_best="{metric}"', "--run-dir", str(run), "--no-progress",
                       check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not run.exists()
    proc = run_cli("export", str(tmp_path), "--best", check=False)
    assert proc.returncode == 2 and "not a run folder" in proc.stderr


def test_no_best_checkpoint_is_one_line(tiny_unpaired, tmp_path):
    run = tmp_path / "run"
    train(_cyclegan(tiny_unpaired, run, 1, 'train.keep_best=""'), progress=False)
    proc = run_cli("export", str(run), "--best", check=False)
    assert proc.returncode == 2 and "no best checkpoint" in proc.stderr
    assert "train.keep_best" in proc.stderr and "Traceback" not in proc.stderr


def test_directions_are_known_per_score():
    assert best.is_better("eval/psnr", 21.0, 20.0) and not best.is_better("eval/psnr", 19.0, 20.0)
    assert best.is_better("eval/kid", 0.01, 0.02) and not best.is_better("eval/kid", 0.03, 0.02)
    assert best.is_better("eval/rkl", 0.1, None) and not best.is_better("eval/hq", float("nan"),
                                                                          None)
    assert not best.is_better("eval/psnr", 20.0, 20.0)  # a tie keeps the earlier one


@pytest.mark.slow
def test_a_kill_while_the_best_is_written_leaves_the_previous_best(tiny_unpaired, tmp_path):
    run = tmp_path / "run"
    sets = set_args(TINY_CYCLEGAN)
    args = ["train", "recipes/cyclegan_demo.toml", *sets, "--data", str(tiny_unpaired),
            "--steps", "40", "--run-dir", str(run), "--eval-every", "1", "--log-every", "1",
            "--sample-every", "1000", "--save-every", "5", "--mixed-precision", "no",
            "--set", 'train.keep_best="eval/psnr"', "--set", "train.lr_g=2e-3", "--set",
            'train.lr_schedule="constant"', "--no-progress"]
    job = Cli(args, tmp_path / "job", {"TRANSLATE_TEST_SLOW_SAVE": "1.5"})
    root = best.root(run)

    def mid_save() -> bool:  # a complete best exists and the next one is being written
        return (best.find(run) is not None and any(root.glob(".tmp-step_*"))
                and bool(checkpoint.list_checkpoints(run)))  # and a rolling one to resume

    job.wait_until(mid_save, timeout=240, what="a second best checkpoint in progress")
    before = best.find(run)
    job.proc.kill()
    job.wait()
    assert any(root.glob(".tmp-step_*"))  # the kill did land mid-save
    after = best.find(run)
    assert after == before  # the previous best is visible, complete and unchanged
    for f in after[0].glob("*.safetensors"):
        load_file(str(f))
    run_cli("export", str(run), "--best", "--out", str(tmp_path / "export"))
    # The resumed run clears the leftover and keeps the best over the whole log.
    done = run_cli(*args, "--resume", "auto", check=False)
    assert done.returncode == 0, done.stderr
    assert not any(p.name.startswith(".") for p in root.iterdir())
    scores = _scores(run)
    top = max(scores, key=scores.get)
    assert best.find(run)[1] == {"metric": "eval/psnr", "value": scores[top], "step": top}
