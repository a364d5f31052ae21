"""Faults during a run, fed for real: kill -9 at random moments (mid-checkpoint included),
Ctrl-C and SIGTERM, a second Ctrl-C, NaN (stop and rollback), a full disk, planted pickles,
and an interrupted `translate apply`. Each test checks the message and that nothing was lost.

Subprocesses get their own session, so signals reach the whole process group as a terminal's
Ctrl-C would, and write to files (a full pipe would stall a chatty run).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, set_args, tiny_sets
from PIL import Image
from safetensors.torch import load_file

from translate import cli, config
from translate import recipe as recipe_mod
from translate.core import checkpoint, loop, machine
from translate.core.faults import MAX_ROLLBACKS
from translate.errors import UserError
from translate.runner import train

TOY = tiny_sets("toy")
TOY_RECIPE = "recipes/toy_gan_ring.toml"
NO_SAMPLES = 1_000_000  # sample_every: sampling only at the last step


# ---------------------------------------------------------------------------- helpers


def _cfg(run: Path, steps: int, save_every: int, *sets: str,
         recipe: str = TOY_RECIPE) -> config.RunConfig:
    """The config `translate train` builds from _train_args (log/save cadence aside, which
    do not change the weights)."""
    return recipe_mod.load(ROOT / recipe, TOY + [
        f"train.steps={steps}", "train.epochs=0", "train.epochs_decay=0", f'run_dir="{run}"',
        "train.log_every=1", f"train.sample_every={NO_SAMPLES}", f"train.save_every={save_every}",
        *sets])


def _train_args(run: Path, steps: int, save_every: int, *extra: str) -> list[str]:
    sets = set_args(TOY)
    return ["train", TOY_RECIPE, *sets, "--steps", str(steps), "--run-dir", str(run),
            "--log-every", "1", "--sample-every", str(NO_SAMPLES), "--save-every",
            str(save_every), "--no-progress", *extra]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (a launcher starts each rank in a session of its own, so a
    signal to the launcher's group does not reach them)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parent.items() if p == frontier[-1]]
        frontier.pop()
        found += children
        frontier += children
    return found


_STARTED: list[Cli] = []


@pytest.fixture(autouse=True)
def _reap():
    """Whatever a test started and left running (it failed early) is killed, ranks included."""
    yield
    while _STARTED:
        _STARTED.pop().kill_tree()


class Cli:
    """`python cli.py ARGS` running in the background, output in files."""

    def __init__(self, args: list[str], out: Path, env: dict | None = None,
                 launcher: list[str] | None = None) -> None:
        self.out = out
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                    **(env or {})}
        cmd = (launcher or [sys.executable]) + [str(ROOT / "cli.py"), *args]
        with open(out.with_suffix(".out"), "w") as so, open(out.with_suffix(".err"), "w") as se:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=so, stderr=se,
                                         start_new_session=True)
        _STARTED.append(self)

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float = 120) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise AssertionError(f"still running after {timeout} s:\n{self.stderr}") from None

    def kill_tree(self) -> None:
        if self.running():
            for pid in [*_descendants(self.proc.pid), self.proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait()

    @property
    def stderr(self) -> str:
        return self.out.with_suffix(".err").read_text()

    def wait_until(self, condition, timeout: float = 120, what: str = "") -> None:
        """Poll `condition` until true; fails if the process ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while not condition():
            if not self.running():
                raise AssertionError(f"process ended before {what}:\n{self.stderr}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting for {what}:\n{self.stderr}")
            time.sleep(0.01)


def _logged(run: Path) -> list[dict]:
    """Complete log lines (a killed process may leave half a line)."""
    path = run / "log.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _last_step(run: Path) -> int:
    logged = _logged(run)
    return logged[-1]["step"] if logged else 0


def _newest(run: Path) -> int:
    found = checkpoint.list_checkpoints(run)
    return int(found[-1].name.split("_")[1]) if found else -1


def _tmp_dirs(run: Path) -> list[Path]:
    root = run / "checkpoints"
    return sorted(root.glob(".tmp-step_*")) if root.is_dir() else []


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds, weights and optimizer states alike."""
    from accelerate.utils import load as accelerate_load

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(ckpt.glob("optimizer*.bin")):
        for pid, st in accelerate_load(f)["state"].items():
            out.update({f"{f.name}/{pid}/{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def _assert_complete(ckpt: Path) -> None:
    """A visible checkpoint is whole: every file reads, the step matches the folder."""
    state = json.loads((ckpt / "state.json").read_text())
    assert ckpt.name == f"step_{state['step']:07d}"
    assert len(_tensors(ckpt)) > 0
    from accelerate.utils import load as accelerate_load

    accelerate_load(ckpt / "random_states_0.pkl")


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err, err
    return lines[-1]


# ---------------------------------------------------------------------------- kill -9


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps, every = 100, 2
    straight = tmp_path / "straight"
    train(_cfg(straight, steps, every), progress=False)
    run = tmp_path / "run"
    rng = random.Random(8)
    kills, mid_save = 0, False
    for attempt in range(5):
        start = max(_newest(run), 0)
        slow = attempt == 2  # this one is killed while a checkpoint is being written
        env = {"TRANSLATE_TEST_SLOW_SAVE": "1.5"} if slow else None
        job = Cli(_train_args(run, steps, every, "--resume", "auto-or-new"),
                  tmp_path / f"a{attempt}", env)
        if slow:
            job.wait_until(lambda: _tmp_dirs(run), what="a checkpoint in progress")
        else:
            target = max(start, _last_step(run)) + rng.randint(1, 6)  # past stale log lines
            job.wait_until(lambda t=target: _last_step(run) >= t, what=f"step {target}")
            time.sleep(rng.uniform(0.0, 0.4))
        job.proc.kill()
        job.wait()
        kills += 1
        if slow:
            mid_save = bool(_tmp_dirs(run))
            assert mid_save, "the kill was meant to land mid-checkpoint"
            assert all(not p.name.startswith(".") for p in checkpoint.list_checkpoints(run))
        newest = _newest(run)
        assert newest >= start  # never loses a checkpoint that existed
        assert newest >= _last_step(run) - every  # at most the steps since the last one
        for ckpt in checkpoint.list_checkpoints(run):
            _assert_complete(ckpt)
    assert kills == 5 and mid_save
    done = Cli(_train_args(run, steps, every, "--resume", "auto"), tmp_path / "final")
    assert done.wait() == 0, done.stderr
    assert not _tmp_dirs(run)  # leftovers of the killed save were cleared
    _assert_same(_tensors(straight / "checkpoints" / f"step_{steps:07d}"),
                 _tensors(run / "checkpoints" / f"step_{steps:07d}"))
    ref = {r["step"]: r for r in _logged(straight)}
    got = _logged(run)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # stitched, no gap or repeat
    for r in got:
        assert r["D/loss"] == ref[r["step"]]["D/loss"] and r["G/loss"] == ref[r["step"]]["G/loss"]


def test_a_log_line_cut_by_a_kill_does_not_break_the_resume(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, 4, 2), progress=False)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 5, "time": 0.1, "D/lo')  # what kill -9 mid-write leaves
    assert train(_cfg(run, 6, 2), resume="auto", progress=False).step == 6
    assert [r["step"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            ] == list(range(1, 7))


def test_leftovers_of_a_killed_save_are_invisible_then_cleared(tmp_path):
    run = tmp_path / "run"
    train(_cfg(run, 2, 2), progress=False)
    root = run / "checkpoints"
    shutil.copytree(root / "step_0000002", root / ".tmp-step_0000004")  # complete, not renamed
    shutil.copytree(root / "step_0000002", root / ".old-step_0000000")  # a deletion cut short
    assert checkpoint.resolve(run, "auto") == root / "step_0000002"
    train(_cfg(run, 4, 2), resume="auto", progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000002", "step_0000004"]


# ---------------------------------------------------------------------------- Ctrl-C


def _stopped(job: Cli, sig: int, run: Path) -> tuple[int, list[str]]:
    """The step a stop signal ended `job` at (its checkpoint saved, nothing else left) and
    the command its one-line message says continues the run."""
    assert job.wait() == 128 + sig, job.stderr
    last = _one_line_error(job.stderr)
    m = re.fullmatch(rf"stopped by {signal.Signals(sig).name} at step (\d+); checkpoint (.+); "
                     r"continue with: (.+)", last)
    assert m, job.stderr
    step = int(m.group(1))
    assert Path(m.group(2)) == checkpoint.step_dir(run, step)
    assert checkpoint.list_checkpoints(run)[-1] == checkpoint.step_dir(run, step)
    assert _last_step(run) == step  # stopped at a step boundary, the logged one
    return step, shlex.split(m.group(3))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_stop_signal_saves_the_current_step_and_the_printed_command_resumes_exactly(sig,
                                                                                    tmp_path):
    run = tmp_path / "run"
    job = Cli(_train_args(run, 100_000, 100_000, "--mixed-precision", "no"), tmp_path / "job")
    job.wait_until(lambda: _last_step(run) >= 3, what="step 3")
    job.signal(sig)
    step, command = _stopped(job, sig, run)
    assert checkpoint.list_checkpoints(run) == [checkpoint.step_dir(run, step)]
    assert command == ["translate", "train", TOY_RECIPE, "--run-dir", str(run), "--resume",
                       "auto"]
    # The printed command alone continues the run as it was configured (100,000 steps, batch
    # 8, fp32: not the recipe's 5,000 steps, batch 100, auto precision). Stopped again a few
    # steps on, it equals an uninterrupted run of that length.
    again = Cli(command[1:], tmp_path / "again")
    again.wait_until(lambda: _last_step(run) >= step + 3, what=f"step {step + 3}")
    again.signal(sig)
    end, command_again = _stopped(again, sig, run)
    assert command_again == command and end >= step + 3
    assert "resumed from" in again.stderr and "100000 steps; precision no" in again.stderr
    train(_cfg(tmp_path / "straight", end, 100_000, 'train.mixed_precision="no"'),
          progress=False)
    _assert_same(_tensors(checkpoint.step_dir(run, end)),
                 _tensors(checkpoint.step_dir(tmp_path / "straight", end)))


def _rank_pid(launcher: int, rank: int) -> int:
    """The process of `rank` among the launcher's descendants."""
    for pid in _descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"LOCAL_RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no process of rank {rank} under {launcher}")


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_stops_every_rank_at_the_same_step(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(port)]
    run = tmp_path / "run"
    job = Cli(_train_args(run, 100_000, 100_000), tmp_path / "job", launcher=launcher)
    job.wait_until(lambda: _last_step(run) >= 3, what="step 3")
    # Only rank 1 is told (the hard case: a terminal would tell every process): rank 0 must
    # still stop at the same step, or one of them would wait forever in a collective.
    os.kill(_rank_pid(job.proc.pid, 1), signal.SIGINT)
    job.wait(timeout=120)
    stops = re.findall(r"stopped by SIGINT at step (\d+); checkpoint", job.stderr,
                       re.MULTILINE)
    assert len(stops) == 2 and stops[0] == stops[1], job.stderr  # one step, both ranks
    step = int(stops[0])
    assert checkpoint.list_checkpoints(run) == [checkpoint.step_dir(run, step)]
    _assert_complete(checkpoint.step_dir(run, step))
    assert (checkpoint.step_dir(run, step) / "random_states_1.pkl").is_file()
    assert not _tmp_dirs(run)


def test_second_ctrl_c_exits_at_once(tmp_path):
    run = tmp_path / "run"
    job = Cli(_train_args(run, 100_000, 100_000), tmp_path / "job",
              {"TRANSLATE_TEST_SLOW_SAVE": "30"})
    job.wait_until(lambda: _last_step(run) >= 2, what="step 2")
    job.signal(signal.SIGINT)
    job.wait_until(lambda: _tmp_dirs(run), what="the stop checkpoint being written")
    assert "press Ctrl-C again to quit at once" in job.stderr
    t0 = time.monotonic()
    job.signal(signal.SIGINT)
    code = job.wait(timeout=20)
    assert code == -signal.SIGINT and time.monotonic() - t0 < 10
    assert checkpoint.list_checkpoints(run) == []  # the half-written save is not taken
    assert checkpoint.resolve(run, "auto") is None


# ---------------------------------------------------------------------------- NaN


def _good_run(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    run = tmp_path / "run"
    train(_cfg(run, 4, 2), progress=False)
    return run, _digest(checkpoint.step_dir(run, 4))


def test_nan_stops_naming_phase_and_step_and_keeps_the_checkpoint(tmp_path):
    run, before = _good_run(tmp_path)
    job = Cli(_train_args(run, 20, 1, "--resume", "auto", "--set", "train.lr_d=1e30"),
              tmp_path / "job")
    assert job.wait() == 2
    last = _one_line_error(job.stderr)
    assert re.match(r"error: step 5, phase [DG]: [DG]/\w+ is (nan|inf|-inf); lower the "
                    r"learning rates", last), last
    assert checkpoint.list_checkpoints(run)[-1] == checkpoint.step_dir(run, 4)
    assert _digest(checkpoint.step_dir(run, 4)) == before
    assert not _tmp_dirs(run)
    assert _last_step(run) == 4  # the NaN step is not logged as if it were a result


def test_nan_rollback_gives_up_after_a_few_rollbacks(tmp_path):
    run, before = _good_run(tmp_path)
    job = Cli(_train_args(run, 20, 1, "--resume", "auto", "--set", "train.lr_d=1e30",
                          "--set", 'train.on_nan="rollback"'), tmp_path / "job")
    assert job.wait() == 2
    err = job.stderr
    rolled = re.findall(r"rolled back to step_0000004, learning rates now ([\d.]+) x", err)
    assert rolled == ["0.5", "0.25", "0.125"][:MAX_ROLLBACKS]
    last = _one_line_error(err)
    assert f"still diverging after {MAX_ROLLBACKS} rollbacks" in last and "step 5" in last
    assert _digest(checkpoint.step_dir(run, 4)) == before
    assert checkpoint.list_checkpoints(run)[-1] == checkpoint.step_dir(run, 4)


def _poison_once(monkeypatch, at_step: int) -> list[int]:
    """Make D's weights NaN right after generator step `at_step`, once, as a blown-up update
    would; returns a list that records when it happened."""
    real = loop.train_step
    fired: list[int] = []

    def poisoned(s, state, batches):
        logs = real(s, state, batches)
        if state.step + 1 == at_step and not fired:
            fired.append(at_step)
            with torch.no_grad():
                next(s.nets["D"].parameters()).fill_(float("nan"))
        return logs
    monkeypatch.setattr(loop, "train_step", poisoned)
    return fired


def test_nan_weights_are_never_checkpointed(tmp_path, monkeypatch):
    run, _ = _good_run(tmp_path)
    before = _digest(checkpoint.step_dir(run, 4))
    fired = _poison_once(monkeypatch, at_step=6)  # the losses of step 6 are still finite
    with pytest.raises(UserError) as err:
        train(_cfg(run, 10, 2), resume="auto", progress=False)
    assert fired == [6]
    assert str(err.value).startswith("step 6, phase D: weights of D contain NaN/Inf; not "
                                     "writing a checkpoint")
    assert checkpoint.list_checkpoints(run)[-1] == checkpoint.step_dir(run, 4)
    assert _digest(checkpoint.step_dir(run, 4)) == before and not _tmp_dirs(run)


def test_nan_rollback_recovers_at_half_the_learning_rate(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fired = _poison_once(monkeypatch, at_step=5)
    result = train(_cfg(run, 8, 2, 'train.on_nan="rollback"'), progress=False)
    assert fired == [5] and result.step == 8
    assert "step 6, phase D" in capsys.readouterr().err  # seen at the next step's losses
    state = json.loads((checkpoint.step_dir(run, 8) / "state.json").read_text())
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1
    assert [r["step"] for r in _logged(run)] == list(range(1, 9))  # rewound, then continued
    assert [r["lr_scale"] for r in _logged(run)] == [1.0] * 4 + [0.5] * 4
    for ckpt in checkpoint.list_checkpoints(run):
        assert all(torch.isfinite(v).all() for v in _tensors(ckpt).values()), ckpt
    # Guard: the same poison without rollback does stop the run.
    monkeypatch.undo()
    _poison_once(monkeypatch, at_step=5)
    with pytest.raises(UserError, match="step 6, phase D"):
        train(_cfg(tmp_path / "stop", 8, 2), progress=False)


def _fp16_as_on_a_gpu(monkeypatch, init_scale: float) -> None:
    """fp16 as accelerate runs it on a GPU, here on the CPU: the run's Accelerator gets a real
    GradScaler (accelerate makes one on CUDA only) and fp16 autocast."""
    real = machine.make_accelerator

    def make(cfg):
        acc, _ = real(cfg)
        acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        acc.autocast = lambda *args, **kwargs: torch.autocast("cpu", dtype=torch.float16)
        return acc, "fp16 with a GradScaler (test)"
    monkeypatch.setattr(machine, "make_accelerator", make)


def _gp_cfg(run: Path, steps: int, *sets: str) -> config.RunConfig:
    """A tiny WGAN-GP (its penalty is an input gradient, what fp16 overflows first), saved
    every 4 steps. Its precision is named "no": fp16 comes from _fp16_as_on_a_gpu alone, on
    either kind of CPU (`auto` would ask Accelerate for bf16 where it is native)."""
    return _cfg(run, steps, 4, 'train.mixed_precision="no"', *sets,
                recipe="recipes/toy_wgan_gp_ring.toml")


def test_fp16_steps_the_grad_scaler_skips_do_not_stop_the_run(tmp_path, monkeypatch):
    # A scale of 2^24 overflows D's fp16 input gradient: the first steps' penalty is NaN/Inf
    # and the GradScaler skips them, halving its scale, as a GPU run does at its start and
    # whenever its scale probes higher. That is not divergence (it stopped the run before).
    _fp16_as_on_a_gpu(monkeypatch, init_scale=2.0**24)
    run = tmp_path / "run"
    assert train(_gp_cfg(run, 8), progress=False).step == 8
    logged = _logged(run)
    assert [r["step"] for r in logged] == list(range(1, 9))
    first, last = logged[0], logged[-1]
    assert first["D/skipped"] == 1.0 and first["D/gp"] in ("nan", "inf")
    assert last["D/skipped"] == 0.0 and last["G/skipped"] == 0.0
    assert isinstance(last["D/gp"], float) and last["loss_scale"] < first["loss_scale"] < 2**24
    for ckpt in checkpoint.list_checkpoints(run):
        assert (ckpt / "scaler.pt").is_file()
        assert all(torch.isfinite(v).all() for v in _tensors(ckpt).values()), ckpt


def test_fp16_gradients_overflowing_step_after_step_stop_the_run(tmp_path, monkeypatch):
    # A penalty weight of 1e30 overflows D's fp16 gradients at any scale: the scaler skips
    # every D step and its scale falls under faults.MIN_LOSS_SCALE within a few steps.
    _fp16_as_on_a_gpu(monkeypatch, init_scale=2.0**16)
    with pytest.raises(UserError) as err:
        train(_gp_cfg(tmp_path / "stop", 20, "model.gp_weight=1e30"), progress=False)
    assert re.match(r"step \d, phase D: fp16's loss scale fell to \d\.\de-0[5-9] \(the "
                    r"gradients overflowed step after step\); lower the learning rates",
                    str(err.value)), err.value
    # A rollback restores step 4's scale (scaler.pt) and diverges at step 6 again: its step 5
    # logs the scale the first attempt's did (5 critic steps skipped a step, each halving it).
    run = tmp_path / "rollback"
    with pytest.raises(UserError, match=f"step 6.*still diverging after {MAX_ROLLBACKS} "):
        train(_gp_cfg(run, 20, "model.gp_weight=1e30", 'train.on_nan="rollback"'),
              progress=False)
    assert [r["loss_scale"] for r in _logged(run)] == [2.0**16 / 32**k for k in range(1, 6)]


# ---------------------------------------------------------------------------- disk full


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    run, _ = _good_run(tmp_path)
    before = _digest(checkpoint.step_dir(run, 4))
    real = checkpoint.save_file
    calls = []

    def full(tensors, filename, *args, **kwargs):
        calls.append(filename)
        real(tensors, filename, *args, **kwargs)  # write it, then fail: a part is on disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(UserError) as err:
        train(_cfg(run, 8, 2), resume="auto", progress=False)
    message = str(err.value)
    assert "\n" not in message and calls
    assert message.startswith(f"{run / 'checkpoints'}: could not write checkpoint step 6 "
                               "(No space left on device); the previous checkpoint "
                               "step_0000004 is intact; free disk space")
    assert checkpoint.list_checkpoints(run) == [checkpoint.step_dir(run, 2),
                                                checkpoint.step_dir(run, 4)]
    assert _digest(checkpoint.step_dir(run, 4)) == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000002",
                                                                      "step_0000004"]
    monkeypatch.undo()  # the failed start had extended the run to 8 steps (config.json)
    assert train(_cfg(run, 8, 2), resume="auto", progress=False).step == 8


@pytest.fixture
def small_disk(tmp_path):
    """A real 1 MB tmpfs (root only; skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("needs root and mount(8) for a real small file system")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_gives_one_line_and_a_usable_checkpoint(small_disk, capsys):
    run = small_disk / "run"
    sets = ["--set", "model.hidden=64", "--set", "train.keep_checkpoints=100"]
    code = cli.main(_train_args(run, 200, 1, *sets, "--log-every", "1000"))
    err = capsys.readouterr().err
    assert code == 2, err
    last = _one_line_error(err)
    assert "No space left on device" in last and "free disk space" in last, err
    found = checkpoint.list_checkpoints(run)
    assert found and not _tmp_dirs(run)
    _assert_complete(found[-1])
    shutil.rmtree(found[0])  # room to resume: the rest of the run, saved once at its end
    assert train(_cfg(run, 200, 1000, "model.hidden=64", "train.log_every=1000"),
                 resume="auto", progress=False).step == _newest(run) == 200


# ---------------------------------------------------------------------------- planted pickles


class _Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _plant(path: Path, marker: Path) -> None:
    if path.suffix == ".pkl":
        path.write_bytes(pickle.dumps({"random_state": _Payload(marker)}))
    else:
        torch.save({"state": {0: _Payload(marker)}, "param_groups": []}, path)


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "pytorch_model.bin"])
def test_a_planted_pickle_is_never_executed(name, tmp_path, capsys):
    run, _ = _good_run(tmp_path)
    ckpt = checkpoint.step_dir(run, 4)
    marker, live = tmp_path / "pwned", tmp_path / "live"
    probe = tmp_path / ("probe" + Path(name).suffix)
    _plant(probe, live)
    if probe.suffix == ".pkl":
        pickle.loads(probe.read_bytes())
    else:
        torch.load(probe, weights_only=False)
    assert live.exists()  # guard: the payload does run when something unpickles it
    if name == "pytorch_model.bin":
        (ckpt / "model.safetensors").unlink()  # accelerate would fall back to this file
    _plant(ckpt / name, marker)
    code = cli.main(_train_args(run, 6, 2, "--resume", "auto"))
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    last = _one_line_error(err)
    assert last.startswith(f"error: {ckpt / name}: not a plain tensor file"), err
    assert "it was not executed" in last


def test_a_planted_pickle_through_a_real_process(tmp_path):
    run, _ = _good_run(tmp_path)
    marker = tmp_path / "pwned"
    _plant(checkpoint.step_dir(run, 4) / "random_states_0.pkl", marker)
    job = Cli(_train_args(run, 6, 2, "--resume", "auto"), tmp_path / "job")
    assert job.wait() == 2 and not marker.exists()
    assert "random_states_0.pkl: not a plain tensor file" in _one_line_error(job.stderr)


# ---------------------------------------------------------------------------- apply


def _noise_folder(folder: Path, n: int, size: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{i:03d}.png", compress_level=0)
    return folder


def _outputs(out: Path) -> list[Path]:
    return sorted(out.glob("*.png")) if out.is_dir() else []


@pytest.mark.slow
def test_apply_killed_or_interrupted_continues_where_it_stopped(generator, tmp_path):
    n = 60
    src = _noise_folder(tmp_path / "in", n, 128)
    out = tmp_path / "out"
    args = ["apply", str(generator), str(src), str(out), "--batch-size", "1", "--workers", "1"]
    for sig in (signal.SIGKILL, signal.SIGINT):
        job = Cli(args, tmp_path / f"apply_{sig.name}")
        already = len(_outputs(out))
        job.wait_until(lambda n0=already: len(_outputs(out)) >= n0 + 3, what="3 more outputs")
        job.signal(sig)
        code = job.wait()
        assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 130), job.stderr
        if sig == signal.SIGINT:
            assert _one_line_error(job.stderr) == "interrupted"
        done = _outputs(out)
        assert already < len(done) < n, "the signal was meant to land mid-run"
        for p in done:  # whatever carries a final name is a whole image
            with Image.open(p) as im:
                im.load()
                assert im.size == (128, 128)
    finished = len(_outputs(out))
    last = Cli(args, tmp_path / "apply_last")
    assert last.wait() == 0, last.stderr
    assert f"translated {n - finished}, skipped {finished}, failed 0" in last.stderr
    # Same pixels as one uninterrupted run.
    clean = Cli(args[:3] + [str(tmp_path / "clean")] + args[4:], tmp_path / "apply_clean")
    assert clean.wait() == 0
    for p in _outputs(tmp_path / "clean"):
        np.testing.assert_array_equal(np.asarray(Image.open(p)),
                                      np.asarray(Image.open(out / p.name)))
    assert [p.name for p in _outputs(out)] == [p.name for p in _outputs(tmp_path / "clean")]
    # Not even the hidden temp file the kill -9 may have left: the rerun cleared it.
    assert not [p for p in out.iterdir() if p.suffix != ".png" or p.name.startswith(".")]
