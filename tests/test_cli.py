"""The foundation through real subprocesses: `sample` on a checkpoint folder, `--seed`, the
terminal output (plain lines and the rich bar on a terminal), the pytest rule that a run in
which no test passed fails, and the albumentations update check forced off."""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, random_image_folder, run_cli, tiny_cli
from PIL import Image
from test_train import _weights

from translate import cli
from translate import recipe as recipe_mod
from translate.config import TrainConfig
from translate.errors import UserError
from translate.explore.sample import sample_command
from translate.runner import train

TOY = tiny_cli("toy")
ANSI = re.compile(r"\x1b(\[[0-9;?]*[A-Za-z]|\][^\x07]*\x07|[()][A-Z0-9])")


@pytest.fixture(scope="module")
def dcgan_run(tmp_path_factory) -> Path:
    """A tiny DCGAN run with checkpoints at steps 2 and 4."""
    base = tmp_path_factory.mktemp("dcgan")
    data = random_image_folder(base / "img")
    cfg = recipe_mod.load(ROOT / "recipes" / "dcgan.toml", [
        "model.ngf=4", "model.ndf=4", "model.image_size=32", "data.crop_size=32",
        "model.z_dim=8", "train.batch_size=4", f'data.root="{data}"', "train.steps=4",
        "train.save_every=2", "train.sample_every=100", f'run_dir="{base / "run"}"'])
    train(cfg, progress=False)
    return base / "run"


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_sample_takes_a_checkpoint_folder(dcgan_run, tmp_path):
    ckpt = dcgan_run / "checkpoints" / "step_0000002"
    out = {name: tmp_path / f"{name}.png" for name in ("run2", "ckpt2", "newest", "interp")}
    proc = run_cli("sample", str(ckpt), "--n", "16", "--out", str(out["ckpt2"]))
    assert proc.stdout.strip() == f"wrote {out['ckpt2']}"
    sample_command(dcgan_run, n=16, out=out["run2"], step=2)  # what the CLI does in-process
    sample_command(dcgan_run, n=16, out=out["newest"])
    assert _pixels(out["ckpt2"]).shape == (4 * 34 + 2, 4 * 34 + 2, 3)
    # The checkpoint folder means that checkpoint: the run's step 2, not its newest (step 4).
    assert np.array_equal(_pixels(out["ckpt2"]), _pixels(out["run2"]))
    assert not np.array_equal(_pixels(out["ckpt2"]), _pixels(out["newest"]))
    run_cli("sample", str(ckpt), "--n", "20", "--interpolate", "--out", str(out["interp"]))
    assert Image.open(out["interp"]).size == (10 * 34 + 2, 2 * 34 + 2)  # 2 rows of 10 steps
    assert sorted(p.name for p in ckpt.iterdir() if not p.name.endswith(
        (".safetensors", ".bin", ".pkl", ".json"))) == []  # nothing written into the checkpoint


def test_sample_refuses_a_step_that_contradicts_the_checkpoint_folder(dcgan_run, tmp_path):
    ckpt = dcgan_run / "checkpoints" / "step_0000002"
    with pytest.raises(UserError, match="--step 4: .*step_0000002 is the checkpoint of step 2"):
        sample_command(ckpt, n=4, out=tmp_path / "x.png", step=4)
    assert not (tmp_path / "x.png").exists()
    sample_command(ckpt, n=4, out=tmp_path / "y.png", step=2)  # agreeing is fine
    assert (tmp_path / "y.png").is_file()


def test_export_of_a_checkpoint_folder_writes_into_the_run(dcgan_run):
    from safetensors import safe_open

    from translate.export import export_run

    export_run(dcgan_run / "checkpoints" / "step_0000002")
    with safe_open(str(dcgan_run / "export" / "G.safetensors"), "pt") as f:
        assert f.metadata()["step"] == "2"
    assert not (dcgan_run / "checkpoints" / "step_0000002" / "export").exists()


def _toy_run(run: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_cli("train", "recipes/toy_wgan_gp_ring.toml", *TOY, "--steps", "3",
                   "--run-dir", str(run), "--log-every", "1", *flags)


@pytest.fixture(scope="module")
def seed_runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Three plain-output CLI runs: `--seed 3` twice and `--seed 4`."""
    base = tmp_path_factory.mktemp("seeds")
    return {name: (base / name, _toy_run(base / name, "--seed", name[1], "--no-progress"))
            for name in ("a3", "b3", "c4")}


def test_seed_flag_makes_a_cli_run_repeatable(seed_runs):
    runs = [run for run, _ in seed_runs.values()]
    assert json.loads((runs[0] / "config.json").read_text())["seed"] == 3
    a, b, c = (_weights(r, 3) for r in runs)
    assert a.keys() == b.keys() == c.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_no_progress_prints_one_plain_line_per_logged_step(seed_runs):
    proc = seed_runs["a3"][1]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("step ")]
    assert len(lines) == 3, proc.stderr
    num = r"-?\d[\d.e+-]*"
    for i, line in enumerate(lines, 1):
        assert re.fullmatch(rf"step {i}/3  \d+\.\d\d it/s  eta \d+:\d\d:\d\d  D/loss {num}  "
                            rf"G/loss {num}  .*", line)
    assert lines[-1].split()[5] == "0:00:00"  # the last step leaves nothing to wait for
    assert "\x1b[" not in proc.stderr and "━" not in proc.stderr  # no bar, no colour codes
    assert not any("run/" in line for line in lines)  # the run's shape is on the start line only


def _run_on_a_terminal(args: list[str], cols: int = 200, timeout: float = 120) -> str:
    """Run the CLI with stdout/stderr on a pseudo-terminal `cols` wide; its output, ANSI
    codes removed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, cols, 0, 0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm-256color",
           "COLUMNS": str(cols)}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    return ANSI.sub("", b"".join(chunks).decode(errors="replace").replace("\r", "\n"))


@pytest.mark.parametrize("cols", [80, 200])
@pytest.mark.slow
def test_progress_bar_on_a_terminal_shows_step_rate_eta_and_losses(tmp_path, cols):
    """The bar line keeps step count, rate and ETA whole at 80 columns (only the bar shrinks);
    the latest losses follow on their own line, cut to the width."""
    text = _run_on_a_terminal(["train", "recipes/toy_wgan_gp_ring.toml", *TOY, "--steps",
                               "30", "--run-dir", str(tmp_path / "run"), "--log-every", "1"],
                              cols=cols)
    assert "done: 30 steps" in text
    lines = text.splitlines()
    bars = [i for i, x in enumerate(lines) if re.search(r"step\s+\d+/30", x)]
    assert bars, text
    final = lines[bars[-1]]
    losses = next(x for x in lines[bars[-1] + 1:] if x)  # the cursor moves leave empty lines
    assert re.search(r"step\s+30/30 ━+ \d+\.\d\d it/s \d+:\d\d:\d\d eta \d+:\d\d:\d\d$",
                     final), final  # elapsed, then the ETA
    assert len(final) <= cols and len(losses) <= cols, text
    assert re.match(r"D/loss -?\d\S*  G/loss -?\d", losses), losses
    # The bar replaces the plain per-step lines.
    assert not re.search(r"^step \d+  \d+\.\d\d it/s", text, re.MULTILINE), text


SKIPPED_ONLY = "import pytest\n\n\n@pytest.mark.skip(reason='x')\ndef test_skipped():\n    pass\n"
ONE_PASSES = SKIPPED_ONLY + "\n\ndef test_passes():\n    assert True\n"


@pytest.mark.parametrize("source,with_hook,workers,code", [
    (SKIPPED_ONLY, False, [], 0),  # plain pytest: every test skipped still exits 0 ...
    (SKIPPED_ONLY, True, [], 5),   # ... our conftest turns that into a failure
    (SKIPPED_ONLY, True, ["-n", "2"], 5),  # also with pytest-xdist workers (the README's -n)
    (ONE_PASSES, True, [], 0),     # one real pass is enough
    (ONE_PASSES, True, ["-n", "2"], 0),
], ids=["plain-pytest-all-skipped", "conftest-all-skipped", "conftest-xdist-all-skipped",
        "conftest-one-passes", "conftest-xdist-one-passes"])
def test_a_test_run_in_which_nothing_passed_fails(source, with_hook, workers, code, tmp_path):
    """`python -m pytest -q -n auto` (the README's and .ci/run's command) loads tests/conftest.py; here
    that same conftest is loaded as a plugin into a run of a folder of our own."""
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_some.py").write_text(source)
    hook = ["-p", "conftest"] if with_hook else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *workers, *hook, "-c", str(tmp_path / "pytest.ini"), str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert ("no test passed" in proc.stdout) == (code != 0), proc.stdout


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == "bash .ci/setup && .venv/bin/python -m pytest -q -n auto"
    assert ci in (ROOT / "README.md").read_text()


SPY = """
import os, sys
seen = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "albumentations":
            seen.append(os.environ.get("NO_ALBUMENTATIONS_UPDATE"))
sys.meta_path.insert(0, Spy())
import translate
after_package = (os.environ.get("NO_ALBUMENTATIONS_UPDATE"), "albumentations" in sys.modules)
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "0"  # even if something resets it before the import
import numpy, translate.data.transforms as t
t.resize(numpy.zeros((8, 8, 3), numpy.uint8), 4, 4)  # albumentations loads on the first resize
print(after_package, seen)
"""


def test_albumentations_update_check_is_forced_off():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "0"}
    proc = subprocess.run([sys.executable, "-c", SPY], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert proc.stdout.strip() == "('1', False) ['1']", proc.stdout + proc.stderr


def test_help_describes_every_option_with_its_default():
    """Every option of every command has a description, and --help shows its default where it
    has one; demo --mixed-precision takes what train does (train.mixed_precision's values)."""
    sub = next(a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings[0]}: no description"
        text = " ".join(command.format_help().split())
        for action in command._actions:
            if action.option_strings and action.default not in (None, False,
                                                                 argparse.SUPPRESS):
                assert f"default: {action.default}" in text or "default" in action.help, (
                    name, action.option_strings)
    proc = run_cli("apply", "--help")
    text = " ".join(proc.stdout.split())
    assert "--batch-size BATCH_SIZE images of one size (or tiles of a large image) per " \
           "generator call; memory grows with it (on a CPU with 2+ threads, torch runs take " \
           "whole images in two lanes instead) (default: 4)" in text
    assert "--overlap OVERLAP tile overlap in pixels" in text and "(default: 64)" in text
    choices = {f.name: f for f in dataclasses.fields(TrainConfig)}["mixed_precision"]
    assert choices.metadata["choices"] == ("auto", "no", "bf16", "fp16")
    for value in choices.metadata["choices"]:
        assert cli.parser().parse_args(["demo", "--mixed-precision", value]).mixed_precision \
            == value
    assert "--mixed-precision MIXED_PRECISION auto | no | bf16 | fp16" in " ".join(
        sub.choices["train"].format_help().split())
