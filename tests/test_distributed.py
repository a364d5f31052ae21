"""Data-parallel training on CPU over gloo: real `accelerate launch` and `torchrun` subprocesses
with 2 processes, compared with each other and with one process that holds the whole batch.

Every property checked here fails silently in a real run when broken (nothing raises):
- both ranks end with bit-identical weights and optimizer states (every trained net synced by
  DDP, the whole D loss in one backward, nothing trained through `unwrap_model`);
- 2 processes x batch b (x accumulation) == 1 process x the global batch, straight and across a
  resume: data sharded by global sample number, per-sample noise, LR a function of the step,
  logged values averaged over ranks;
- no net holds a gradient after any phase: frozen nets compute none, so none leaks into a later
  step under gradient accumulation;
- every rank resumes from the checkpoint the main process chose, each with its own image pool;
- bf16 autocast really runs for every method and the unrolled GAN (gradient penalty and R1
  included), and precision settings that would silently fall back to fp32 are refused.

- R1 under 2 processes (toy MLP and the conv cgan); `wait_for_everyone()` right before
  `end_training()` on every rank; per-rank torch RNG streams (dropout, pools, DiffAugment),
  rank 0's the same as one process's; only the main process writes the run (rank 1: its own RNG
  and method-state files in the checkpoint, nothing else); the global batch in log.jsonl.
(fp16 loss scaling of the penalties: tests/test_penalties.py.)

tests/dist_worker.py is `cli.py` plus a dump of each rank's weights after training.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ROOT,
    TINY_CUT,
    TINY_CYCLEGAN,
    random_image_folder,
    run_cli,
    set_args,
    tiny_sets,
)
from safetensors.torch import load_file
from torch import nn

from translate import cli, runner
from translate import recipe as recipe_mod
from translate.core import loop, machine
from translate.errors import ConfigError
from translate.methods import gan as gan_mod

WORKER = ROOT / "tests" / "dist_worker.py"
# norm "none": a conv bias in front of an instance norm has a true gradient of zero, and Adam
# turns the float noise of that zero into full-size steps that differ between 1 and 2 processes.
CYCLEGAN = TINY_CYCLEGAN + ["model.pool_size=0", 'model.norm="none"', "train.ema=0.9",
                            "model.identity_until=0"]
TOY_WGAN = ["model.hidden=16"]
LAUNCH_TIMEOUT = 180  # s; a launch takes 10-20 s on 2 busy cores
# Runs compared across process counts are fp32 by name: "auto" would be bf16 on a CPU with
# native bf16 (and under a launcher follows --mixed_precision, "no" here), and bf16's 8-bit
# mantissa is far coarser than the 1e-5 these comparisons hold. bf16 has tests of its own.
# The schedules are constant: a run stopped at --steps 3 and resumed to 6 is compared with a
# 6-step run, and a linear LR or identity_until depends on the total.
COMMON = ["train.log_every=1", "train.sample_every=100", 'train.lr_schedule="constant"',
          'train.mixed_precision="no"']


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], launcher: str = "accelerate", mixed_precision: str = "no",
           env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `args` (a script and its arguments) in 2 CPU processes that form one gloo group."""
    if launcher == "accelerate":
        # --cpu would start ONE process; --multi_gpu starts 2 that join one group because
        # make_accelerator builds Accelerator(cpu=True) on a machine without CUDA.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               mixed_precision, "--dynamo_backend", "no", "--main_process_port", str(_port())]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_port())]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                **(env or {})}
    proc = subprocess.Popen(cmd + [str(a) for a in args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        # Ranks stuck in a collective (how most DDP bugs end) run in sessions of their own;
        # SIGTERM makes the launcher's agent stop them, SIGKILL is the last resort.
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"{launcher} launch hung for {LAUNCH_TIMEOUT} s (ranks waiting "
                             f"on each other?)\nstderr:\n{err[-4000:]}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{launcher} launch exited {proc.returncode}\nstdout:\n{out}\n"
                             f"stderr:\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def worker(dump: Path, recipe: str, sets: list[str], *flags: str, **kw) -> str:
    """`cli.py train` through the worker; returns stdout + stderr (the run's printed lines)."""
    proc = launch([WORKER, dump, "train", f"recipes/{recipe}", *set_args(sets), "--no-progress",
                   *flags], **kw)
    return proc.stdout + proc.stderr


def assert_ranks_identical(dump: Path, skip: tuple[str, ...] = ()) -> None:
    r0, r1 = (load_file(str(dump / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and any(k.startswith("opt") for k in r0)
    differ = [k for k in r0 if not k.endswith(skip) and not torch.equal(r0[k], r1[k])]
    assert not differ, f"the ranks' weights differ: {differ[:6]}"
    for r in (0, 1):
        report = json.loads((dump / f"rank{r}.json").read_text())
        assert report["world"] == 2 and report["rank"] == r and report["phases"] > 0
        assert report["stray_grads"] == [], f"rank {r}: gradients left after a phase (step, " \
            f"phase, net): {report['stray_grads'][:6]}"


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    out = {}
    for f in sorted(ckpt.glob("model*.safetensors")) + sorted(ckpt.glob("ema.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    for f in sorted(ckpt.glob("optimizer*.bin")):
        for p, slots in torch.load(f, weights_only=True)["state"].items():
            out.update({f"{f.name}/{p}/{k}": v for k, v in slots.items() if torch.is_tensor(v)})
    assert out, f"no weights in {ckpt}"
    return out


def assert_same_run(run: Path, ref: Path, steps: list[int]) -> None:
    """Same weights, optimizer states, EMA and logged losses, up to float summation order.

    Adam divides by the gradient's running RMS, so an element whose gradient is nearly zero
    turns summation-order noise into a visible fraction of a step: weights get an absolute
    tolerance of a tenth of the smallest learning rate (1e-4), optimizer moments 0.1% of the
    tensor's scale. A real change (other data, a leaked gradient) moves weights by whole steps."""
    for step in steps:
        a, b = checkpoint_weights(run, step), checkpoint_weights(ref, step)
        assert a.keys() == b.keys()
        for k in a:
            moment = k.startswith("optimizer")
            atol = 1e-3 * float(b[k].abs().max()) if moment else 1e-5
            torch.testing.assert_close(a[k], b[k], rtol=1e-3 if moment else 0.0, atol=atol,
                                       msg=f"step {step} {k}")
    la, lb = ([json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()]
              for r in (run, ref))
    assert [r["step"] for r in la] == [r["step"] for r in lb] == list(range(1, steps[-1] + 1))
    for ra, rb in zip(la, lb):
        for k in rb:
            if "/" in k and not k.startswith("run/"):  # run/processes differs by design
                # health/checkerboard is a ratio of the outputs' spectral energy at the
                # upsampling periods, near 0 for clean generators: the weights' float-sum noise
                # (1e-5) moves it by ~5e-4 relative; a real difference moves it by whole units.
                rel = 1e-2 if k.startswith("health/") else 1e-4
                assert ra[k] == pytest.approx(rb[k], rel=rel, abs=1e-6), (k, ra["step"])


def reference(recipe: str, run: Path, sets: list[str], steps: int = 6) -> None:
    """The same run in this process, with one process holding the whole batch."""
    cfg = recipe_mod.load(ROOT / "recipes" / recipe, sets + COMMON + [
        f"train.steps={steps}", f'run_dir="{run}"', "train.save_every=3"])
    runner.train(cfg, progress=False)


@pytest.mark.slow
def test_cyclegan_2_processes_equal_1_with_twice_the_batch_across_a_resume(tiny_unpaired,
                                                                           tmp_path):
    sets = CYCLEGAN + COMMON + [f'data.root="{tiny_unpaired}"']
    run = tmp_path / "run"
    reference("cyclegan_demo.toml", tmp_path / "ref", sets + ["train.batch_size=2"])
    out = worker(tmp_path / "dump3", "cyclegan_demo.toml", sets, "--batch-size", "1",
                 "--steps", "3", "--save-every", "2", "--run-dir", run)
    assert "global batch 1 x 2 processes x 1 accumulation = 2" in out
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    assert (first["run/processes"], first["run/global_batch"]) == (2, 2)
    assert_ranks_identical(tmp_path / "dump3")
    # Rank 1 is made to see a stale checkpoint listing (step 2 only, as on a lagging shared
    # file system); it must still resume from the main process's choice, step 3.
    out = worker(tmp_path / "dump6", "cyclegan_demo.toml", sets, "--batch-size", "1",
                 "--steps", "6", "--save-every", "3", "--run-dir", run, "--resume", "auto",
                 env={"DIST_WORKER_STALE_RANK": "1"})
    assert "resumed from" in out and out.count("done: 6 steps") == 1  # main process only
    assert_ranks_identical(tmp_path / "dump6")
    assert_same_run(run, tmp_path / "ref", [3, 6])


@pytest.mark.slow
def test_a_resume_in_one_process_keeps_the_global_batch_of_two(tmp_path):
    """A 2-process run (batch 4 each), trained into again under the launcher without
    --resume: refused in one line. Resumed in one process: refused, naming the global batch
    and the --batch-size that keeps it, the run folder unchanged; with that flag, the run ends
    where one process with batch 8 all along does."""
    run = tmp_path / "run"
    sets = TOY_WGAN + COMMON
    reference("toy_wgan_gp_ring.toml", tmp_path / "ref", sets + ["train.batch_size=8"])
    worker(tmp_path / "dump3", "toy_wgan_gp_ring.toml", sets, "--batch-size", "4", "--steps",
           "3", "--save-every", "3", "--run-dir", run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    # Trained again into it without --resume, under the launcher: one line (the main
    # process decides for every rank, and says it once), and not a byte changed.
    proc = launch(["cli.py", "train", "recipes/toy_wgan_gp_ring.toml", "--run-dir", run,
                   "--steps", "3"], check=False)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert f"{run}: holds checkpoints, log.jsonl, config.json of an earlier run" in errors[0]
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    again = ["train", "recipes/toy_wgan_gp_ring.toml", "--run-dir", str(run), "--steps", "6",
             "--resume", "auto", "--no-progress"]
    proc = run_cli(*again, check=False)
    assert proc.returncode == 2, proc.stderr
    assert ("global batch 8 -> 4 (4 per process x 1 process x 1 accumulation; keep it with "
            "--batch-size 8)") in proc.stderr.strip().splitlines()[-1]
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
    proc = run_cli(*again, "--batch-size", "8")
    assert "train.batch_size 4 -> 8; train.steps 3 -> 6" in proc.stderr
    assert_same_run(run, tmp_path / "ref", [3, 6])


@pytest.mark.slow
def test_a_diverged_run_is_said_once_under_the_launcher(tmp_path):
    """Every rank finds the NaN at the same step (global means): the main rank says it, once,
    as it says a settings error (each rank used to print the same line)."""
    run = tmp_path / "run"
    proc = launch(["cli.py", "train", "recipes/toy_gan_ring.toml", *set_args(TOY_WGAN + COMMON),
                   "--set", "train.lr_d=1e30", "--steps", "20", "--run-dir", run,
                   "--no-progress"], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert re.match(r"error: step \d+, phase [DG]: [DG]/\w+ is (nan|inf|-inf); lower", errors[0])


@pytest.mark.slow
def test_wgan_gp_toy_2_processes_with_accumulation_under_both_launchers(tmp_path):
    """2 processes x batch 4 x accumulation 2 == 1 process x batch 16; the first half runs
    under `accelerate launch`, the resumed half under `torchrun`."""
    run = tmp_path / "run"
    reference("toy_wgan_gp_ring.toml", tmp_path / "ref", TOY_WGAN + ["train.batch_size=16"])
    sets = TOY_WGAN + COMMON + ["train.grad_accum=2"]
    out = worker(tmp_path / "dump3", "toy_wgan_gp_ring.toml", sets, "--batch-size", "4",
                 "--steps", "3", "--save-every", "3", "--run-dir", run)
    assert "global batch 4 x 2 processes x 2 accumulation = 16" in out
    assert_ranks_identical(tmp_path / "dump3")
    worker(tmp_path / "dump6", "toy_wgan_gp_ring.toml", sets, "--batch-size", "4", "--steps",
           "6", "--save-every", "3", "--run-dir", run, "--resume", "auto", launcher="torchrun")
    assert_ranks_identical(tmp_path / "dump6")
    assert_same_run(run, tmp_path / "ref", [3, 6])


@pytest.mark.parametrize("recipe,sets,b", [
    ("toy_wgan_gp_ring.toml", TOY_WGAN, 4),
    ("cyclegan_demo.toml", CYCLEGAN, 1),
])
def test_accumulation_equals_a_bigger_batch_and_leaves_no_gradients(recipe, sets, b,
                                                                    tiny_unpaired, tmp_path,
                                                                    monkeypatch):
    """grad_accum=2 with batch b == grad_accum=1 with batch 2b, and after every phase no net
    holds a gradient (in particular D none after the G phase)."""
    sets = sets + [f'data.root="{tiny_unpaired}"'] if "cyclegan" in recipe else sets
    stray: list[tuple[str, str]] = []
    run_phase = loop.run_phase

    def observed(accelerator, cfg, phase, opt, nets, batch, prev):
        out = run_phase(accelerator, cfg, phase, opt, nets, batch, prev)
        stray.extend((phase.name, n) for n, m in nets.items()
                     if any(p.grad is not None for p in m.parameters()))
        return out

    monkeypatch.setattr(loop, "run_phase", observed)
    reference(recipe, tmp_path / "big", sets + [f"train.batch_size={2 * b}"], steps=3)
    reference(recipe, tmp_path / "acc", sets + [f"train.batch_size={b}", "train.grad_accum=2"],
              steps=3)
    assert stray == [], f"gradients left after a phase (phase, net): {stray[:6]}"
    assert_same_run(tmp_path / "acc", tmp_path / "big", [3])


@pytest.mark.slow
def test_cyclegan_bf16_2_processes_equal_1_with_twice_the_batch(tiny_unpaired, tmp_path):
    """The same property in bf16 (what "auto" gives on GPUs and CPUs with native bf16), within
    bf16's tolerance. bf16 keeps 8 bits of mantissa (relative rounding 2^-8 = 0.4%), and a batch
    of 2 on one process sums its convolutions in another order than two batches of 1, so
    values agree to ~1e-2 relative, not 1e-5: the logged losses are compared at rel 2e-2, and the
    weights by how far the runs are apart against how far training moved them (Adam turns the
    rounding of near-zero gradients into full-size steps: some elements differ by a whole step,
    while other data or a leaked gradient would move the runs apart as far as training does)."""
    sets = CYCLEGAN + COMMON + [f'data.root="{tiny_unpaired}"', 'train.mixed_precision="bf16"']
    reference("cyclegan_demo.toml", tmp_path / "ref", sets + ["train.batch_size=2"])
    out = worker(tmp_path / "dump", "cyclegan_demo.toml", sets, "--batch-size", "1",
                 "--steps", "6", "--save-every", "3", "--run-dir", tmp_path / "run",
                 mixed_precision="bf16")
    assert "precision bf16" in out
    assert_ranks_identical(tmp_path / "dump")
    a6, b3, b6 = (checkpoint_weights(r, s) for r, s in
                  ((tmp_path / "run", 6), (tmp_path / "ref", 3), (tmp_path / "ref", 6)))
    nets = [k for k in b6 if k.startswith("model")]
    apart = torch.cat([(a6[k] - b6[k]).flatten() for k in nets]).norm()
    moved = torch.cat([(b6[k] - b3[k]).flatten() for k in nets]).norm()
    assert 0 < moved and apart < 0.3 * moved, (float(apart), float(moved))
    la, lb = ([json.loads(x) for x in (r / "log.jsonl").read_text().splitlines()]
              for r in (tmp_path / "run", tmp_path / "ref"))
    first = {k: v for k, v in lb[0].items() if "/" in k and not k.startswith(("run/", "lr"))}
    assert first and all(la[0][k] == pytest.approx(v, rel=2e-2, abs=1e-3)
                         for k, v in first.items()), (la[0], lb[0])


@pytest.mark.parametrize("launcher_precision", ["no", "bf16"])
@pytest.mark.slow
def test_the_launchers_precision_wins_over_a_recipes_auto(launcher_precision, tmp_path,
                                                           monkeypatch):
    """`accelerate launch --mixed_precision X` with a recipe saying "auto" trains in X, also on
    the other kind of CPU (the switch makes "auto" alone pick the opposite)."""
    monkeypatch.setenv("TRANSLATE_NATIVE_BF16", "1" if launcher_precision == "no" else "0")
    proc = launch(["cli.py", "train", "recipes/toy_wgan_gp_ring.toml", "--set",
                   "model.hidden=16", "--steps", "1", "--run-dir", tmp_path / "run",
                   "--no-progress"], mixed_precision=launcher_precision)
    line = f"precision {launcher_precision} (auto: accelerate launch --mixed_precision " \
           f"{launcher_precision})"
    assert line in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_epoch_length_counts_processes_and_accumulation(tiny_unpaired):
    """The LR schedule is a function of the step; what could depend on the process count is the
    number of steps of an epoch-based recipe, which must count global batches."""
    def steps(batch: int, accum: int, world: int) -> tuple[int, int]:
        cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml", TINY_CYCLEGAN + [
            f'data.root="{tiny_unpaired}"', f"train.batch_size={batch}",
            f"train.grad_accum={accum}", "train.epochs=2", "train.epochs_decay=1",
            'train.lr_schedule="linear"'])
        from translate import data

        return machine.total_steps(cfg, data.build_dataset(cfg), world)

    assert steps(4, 1, 1) == (9, 6)  # 12 images / 4 per step = 3 steps per epoch
    assert steps(1, 2, 2) == steps(2, 1, 2) == steps(4, 1, 1)


DCGAN = tiny_sets("dcgan")
TOY_GAN = tiny_sets("toy")
BF16_RUNS = {  # name: (recipe, sets, penalty logged, data: "unpaired" / "images" / "classes")
    "cyclegan": ("cyclegan_demo.toml", TINY_CYCLEGAN, None, "unpaired"),
    "cut": ("cut_demo.toml", TINY_CUT, None, "unpaired"),
    "dcgan": ("dcgan.toml", DCGAN, None, "images"),
    "wgan_gp": ("wgan_gp.toml", DCGAN + ["model.n_critic=2"], "D/gp", "images"),
    "gan_toy_r1": ("toy_gan_ring.toml", TOY_GAN + ['model.penalty="r1"'], "D/r1", "images"),
    "wgan_gp_toy": ("toy_wgan_gp_ring.toml", TOY_WGAN + ["train.batch_size=8"], "D/gp",
                    "images"),
    "cgan_r1": ("cgan.toml", DCGAN + ['model.penalty="r1"'], "D/r1", "classes"),
    "infogan": ("infogan.toml", DCGAN + ["model.cat_dim=3", "model.q_hidden=8"], None,
                "images"),
    "unrolled_toy": ("toy_gan_unrolled_ring.toml", TOY_GAN + ["model.unrolled_steps=2"], None,
                     "images"),
}


def data_root(kind: str, tiny_unpaired: Path, folder: Path) -> Path:
    if kind == "unpaired":
        return tiny_unpaired
    if kind == "classes":  # cgan: one subfolder per class
        for name in ("a", "b"):
            random_image_folder(folder / name, n=4)
        return folder
    return random_image_folder(folder)


@pytest.mark.parametrize("name", list(BF16_RUNS))
def test_bf16_trains_every_method(name, tiny_unpaired, tmp_path, monkeypatch):
    recipe, sets, penalty, kind = BF16_RUNS[name]
    root = data_root(kind, tiny_unpaired, tmp_path / "img")
    dtypes: set[torch.dtype] = set()
    setup = loop.setup

    def observed(*args, **kw):
        s = setup(*args, **kw)
        for net in s.nets.values():
            for m in net.modules():
                if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    m.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))
        return s

    monkeypatch.setattr(loop, "setup", observed)
    unrolled: list[torch.dtype | None] = []  # autocast's dtype when D is unrolled (G phase)
    unroll = gan_mod.unroll

    def observed_unroll(*args, **kwargs):
        on = torch.is_autocast_enabled("cpu")
        unrolled.append(torch.get_autocast_dtype("cpu") if on else None)
        return unroll(*args, **kwargs)

    monkeypatch.setattr(gan_mod, "unroll", observed_unroll)
    cfg = recipe_mod.load(ROOT / "recipes" / recipe, sets + [
        f'data.root="{root}"', 'train.mixed_precision="bf16"', "train.steps=2",
        f'run_dir="{tmp_path / "run"}"', "train.log_every=1", "train.sample_every=2"])
    result = runner.train(cfg, progress=False)
    assert result.step == 2 and (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    assert torch.bfloat16 in dtypes, f"autocast did not run in bf16: {dtypes}"
    assert all(torch.isfinite(torch.tensor(v)) for v in result.logs.values()), result.logs
    if penalty:
        assert result.logs[penalty] > 0, result.logs
    assert unrolled == ([torch.bfloat16] * 2 if "unrolled" in name else []), unrolled


@pytest.mark.parametrize("flags,launcher_precision,needle", [
    (["--mixed-precision", "fp16"], "no", "fp16 is not available on CPU"),
    (["--mixed-precision", "no"], "bf16", "the launcher asks for bf16"),
])
@pytest.mark.slow
def test_precision_that_would_silently_run_fp32_is_refused(flags, launcher_precision, needle,
                                                            tmp_path):
    run = tmp_path / "run"
    proc = launch(["cli.py", "train", "recipes/toy_wgan_gp_ring.toml", "--set",
                   "model.hidden=16", "--steps", "2", "--run-dir", run, *flags],
                  mixed_precision=launcher_precision, check=False)
    assert proc.returncode != 0
    # One line, from the main process only (the settings are the same on every rank).
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], proc.stderr[-3000:]
    # No traceback through our code (the launcher prints its own failure report).
    assert "translate/core" not in proc.stderr
    assert not (run / "checkpoints").exists()


def test_sync_batchnorm_is_refused_on_cpu_with_a_clear_message(tmp_path):
    sets = DCGAN + [f'data.root="{random_image_folder(tmp_path / "img")}"',
                    f'run_dir="{tmp_path / "run"}"']
    cfg = recipe_mod.load(ROOT / "recipes" / "dcgan.toml", sets + ["train.sync_batchnorm=true"])
    with pytest.raises(ConfigError, match="train.sync_batchnorm: .*CPU"):
        runner.setup(cfg)
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_sync_batchnorm_converts_every_batchnorm_and_keeps_the_parameters():
    from translate.nets import build_net

    D = build_net("dcgan_d", in_channels=3, ndf=4, image_size=32, norm="batch")
    before = {id(p) for p in D.parameters()}
    (converted,) = machine.sync_batchnorm([D])
    kinds = [type(m) for m in converted.modules()]
    assert nn.SyncBatchNorm in kinds and nn.BatchNorm2d not in kinds
    assert {id(p) for p in converted.parameters()} == before  # the optimizer's tensors


@pytest.mark.slow
def test_dcgan_batchnorm_bf16_under_ddp(tmp_path):
    """BatchNorm nets in bf16 on 2 processes: parameters stay identical. The running
    statistics are each rank's own (no SyncBatchNorm on CPU): only rank 0's are saved."""
    sets = DCGAN + ["train.batch_size=2", f'data.root="{random_image_folder(tmp_path / "img")}"']
    worker(tmp_path / "dump", "dcgan.toml", sets, "--steps", "3", "--mixed-precision", "bf16",
           "--run-dir", tmp_path / "run", mixed_precision="bf16")
    assert_ranks_identical(tmp_path / "dump", skip=("running_mean", "running_var",
                                                    "num_batches_tracked"))


@pytest.mark.slow
def test_image_pools_are_per_rank_and_resume_per_rank(tiny_unpaired, tmp_path):
    """A 2-process run with image pools, resumed from its middle checkpoint into another
    folder, ends where it did: each rank got its own pool (and RNG state) back."""
    sets = TINY_CYCLEGAN + COMMON + ["model.pool_size=2", "train.batch_size=1",
                                     f'data.root="{tiny_unpaired}"']
    straight, split = tmp_path / "straight", tmp_path / "split"
    worker(tmp_path / "d0", "cyclegan_demo.toml", sets, "--steps", "4", "--save-every", "2",
           "--run-dir", straight)
    middle = straight / "checkpoints" / "step_0000002"
    pools = [load_file(str(middle / f"rank{r}.safetensors"))["pool_a"] for r in (0, 1)]
    assert pools[0].shape[0] == 2 and not torch.equal(pools[0], pools[1])
    worker(tmp_path / "d1", "cyclegan_demo.toml", sets, "--steps", "4", "--run-dir", split,
           "--resume", middle)
    assert_ranks_identical(tmp_path / "d1")
    a, b = checkpoint_weights(straight, 4), checkpoint_weights(split, 4)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)


TOY_R1 = ["model.hidden=16", 'model.penalty="r1"', "train.ema=0.9"]


# What rank 1 may write inside the run folder: accelerate's save_state makes the checkpoint's
# temp folder on every rank (its parent too, when rank 1 gets there first) and writes each
# rank's RNG state; checkpoint.save adds each rank's method state (image pools).
RANK1_MAY_WRITE = re.compile(r"checkpoints(/\.tmp-step_\d{7}(/(random_states_1\.pkl|"
                             r"rank1\.safetensors))?)?")


def _report(dump: Path, rank: int) -> dict:
    return json.loads((dump / f"rank{rank}.json").read_text())


def _run_writes(report: dict, roots: list[Path]) -> list[tuple[str, str]]:
    """(kind, path relative to the run) of the writes under the test's folder or the repository
    (a relative path would land there). __pycache__ belongs to the interpreter, and the system
    temp folder (tempfile's probe, torch's cache folder) to the libraries, not to the run."""
    out = []
    for kind, path in report["writes"]:
        for root in roots:
            if Path(path).is_relative_to(root) and "__pycache__" not in path:
                out.append((kind, os.path.relpath(path, roots[0])))
                break
    return out


@pytest.mark.slow
def test_toy_gan_r1_2_processes_one_writer_per_run_and_a_barrier_before_end_training(tmp_path,
                                                                                   monkeypatch):
    run, dump = tmp_path / "run", tmp_path / "dump"
    streams: list[str] = []
    start = loop._start

    def observed_start(s, resume):
        out = start(s, resume)
        streams.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
        return out

    monkeypatch.setattr(loop, "_start", observed_start)
    reference("toy_gan_ring.toml", tmp_path / "ref", TOY_R1 + ["train.batch_size=16"], steps=4)
    out = worker(dump, "toy_gan_ring.toml", TOY_R1 + COMMON + ["train.grad_accum=2"],
                 "--batch-size", "4", "--steps", "4", "--save-every", "2", "--run-dir", run)
    reports = [_report(dump, r) for r in (0, 1)]

    # R1 in D's one backward: ranks identical, and equal to one process with the whole batch.
    assert_ranks_identical(dump)
    assert_same_run(run, tmp_path / "ref", [4])

    # The global batch, printed and in the first record only (the 1-process run's is the same).
    assert "global batch 4 x 2 processes x 2 accumulation = 16" in out
    records = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    ref_first = json.loads((tmp_path / "ref" / "log.jsonl").read_text().splitlines()[0])
    assert (records[0]["run/processes"], records[0]["run/global_batch"]) == (2, 16)
    assert (ref_first["run/processes"], ref_first["run/global_batch"]) == (1, 16)
    assert not any(k.startswith("run/") for r in records[1:] for k in r)

    # Every rank waits for the others after its last step and right before end_training.
    for r, report in enumerate(reports):
        events = report["events"]
        assert events.count("step") == 4 and events.count("end_training") == 1, (r, events)
        # The last step's checkpoint save has barriers of its own, inside the step.
        assert events[-3:] == ["step", "wait_for_everyone", "end_training"], (r, events[-6:])

    # Each rank's stream is its own; rank 0's is the one a single process would draw.
    (rng0,), (rng1,) = reports[0]["rng"], reports[1]["rng"]
    assert rng0 != rng1, "both ranks draw the same dropout / pool / DiffAugment numbers"
    assert streams == [rng0], "rank 0's stream depends on the number of processes"

    # Rank 1 writes its checkpoint share and nothing else; rank 0 writes the run.
    roots = [run, tmp_path, ROOT]
    extra = [w for w in _run_writes(reports[1], roots) if not RANK1_MAY_WRITE.fullmatch(w[1])]
    assert extra == [], f"rank 1 wrote what only the main process may: {extra[:8]}"
    rank1 = {p for _, p in _run_writes(reports[1], roots)}
    assert {f"checkpoints/.tmp-step_{s:07d}/{f}" for s in (2, 4)
            for f in ("random_states_1.pkl", "rank1.safetensors")} <= rank1
    rank0 = set(_run_writes(reports[0], roots))
    for s in (2, 4):
        tmp = f"checkpoints/.tmp-step_{s:07d}"
        assert {("save", f"{tmp}/ema.safetensors"), ("open", f"{tmp}/state.json"),
                ("rename", f"checkpoints/step_{s:07d}")} <= rank0, sorted(rank0)
    assert {("rename", "config.json"), ("open", "log.jsonl"),
            ("rename", "samples/step_0000004.png")} <= rank0, sorted(rank0)


@pytest.mark.slow
def test_full_unrolled_gan_2_processes_keep_identical_ranks(tmp_path):
    """The full unrolled GAN under DDP: each rank differentiates through 2 D steps taken from
    D's (replicated) optimizer state on its own batch; G's gradient is all-reduced, D's weights
    and optimizer are not written to by the G phase, and no gradient is left behind."""
    sets = [*TOY_GAN, "model.unrolled_steps=2", "model.unrolled_backprop=true", *COMMON]
    out = worker(tmp_path / "dump", "toy_gan_ring.toml", sets, "--steps", "3",
                 "--run-dir", tmp_path / "run")
    assert "global batch 8 x 2 processes x 1 accumulation = 16" in out
    assert_ranks_identical(tmp_path / "dump")


@pytest.mark.slow
def test_cgan_r1_2_processes_keep_identical_ranks(tmp_path):
    """The conv cgan (projection D, BatchNorm) with R1 under DDP. Each rank keeps its own
    BatchNorm running statistics on CPU (no SyncBatchNorm), so only those may differ."""
    root = tmp_path / "classes"
    for name in ("a", "b"):
        random_image_folder(root / name, n=4)
    sets = ["model.ngf=4", "model.ndf=4", "model.z_dim=8", 'model.penalty="r1"',
            f'data.root="{root}"', *COMMON]
    out = worker(tmp_path / "dump", "cgan.toml", sets, "--batch-size", "2", "--steps", "3",
                 "--run-dir", tmp_path / "run")
    assert "global batch 2 x 2 processes x 1 accumulation = 4" in out
    assert_ranks_identical(tmp_path / "dump", skip=("running_mean", "running_var",
                                                     "num_batches_tracked"))
    logged = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])
    assert logged["D/r1"] > 0


LEAVING = """
import atexit, sys
from translate.cli import leave

class Noisy:
    def __del__(self):
        sys.__stdout__.write("finalized\\n")
        sys.__stdout__.flush()

kept = Noisy()  # a module global: interpreter finalization deletes it
atexit.register(lambda: print("exit handler"))
print("buffered", end="")  # no newline, no flush: leave must flush it
leave(3)
"""


@pytest.mark.parametrize("world", ["2", "1", ""])
def test_a_rank_of_a_multi_process_run_leaves_without_finalization(world):
    """cli.leave, how the translate command ends: a rank of a multi-process run (WORLD_SIZE > 1)
    runs the exit handlers and flushes its output, then ends without interpreter finalization
    (where torch's gloo threads, still freeing the last collective, abort the process now and
    then); a lone process exits as usual. The exit code is the command's either way."""
    env = {**os.environ, "WORLD_SIZE": world}
    proc = subprocess.run([sys.executable, "-c", LEAVING], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60, check=False)
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.startswith("bufferedexit handler\n"), proc.stdout
    assert ("finalized" in proc.stdout) == (world != "2"), proc.stdout


@pytest.mark.parametrize("rank,world", [("1", "2"), ("0", "2"), ("1", "1")])
def test_a_silent_rank_waits_for_the_main_rank_to_say_a_settings_error(rank, world, monkeypatch,
                                                                       capsys):
    """A settings error is said once, by the main rank. The other ranks stay silent and wait to
    be ended by the launcher: a silent rank that exited at once could make torchrun stop the
    main rank before its line was out (seen: a refused 2-process run with no error line)."""
    waits = []
    monkeypatch.setattr(cli.time, "sleep", waits.append)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    code = cli.main(["train", "recipes/toy_gan_ring.toml", "--set", "model.hidden=0"])
    err = capsys.readouterr().err
    assert code == 2
    if rank == "0":
        assert waits == [] and err.startswith("error: ") and "model.hidden" in err
    else:  # silent; waits only where there is a main rank to wait for
        assert waits == ([cli.SILENT_RANK_WAIT_S] if world == "2" else []) and err == ""
