"""The data-parallel properties test_distributed.py does not pin down, each a silent failure
when broken (nothing raises):

- R1 under 2 processes (toy MLP and the conv cgan): D's whole loss in one backward, so the
  ranks stay identical, and 2 processes x b == 1 process x 2b;
- `wait_for_everyone()` right before `end_training()` on every rank;
- the per-rank torch RNG stream (dropout, pools, DiffAugment): different on each rank, rank 0's
  the same as one process's;
- only the main process writes the run: config.json, log.jsonl, samples, checkpoints, EMA,
  state.json; rank 1 writes its own RNG and method-state files in the checkpoint, nothing else;
- the global batch (per-process batch x processes x accumulation) in log.jsonl's first record;
- fp16 loss scaling reaches the penalties' own input gradient (torch's AMP recipe), so D's fp16
  backward does not flush it to zero.

The launches go through tests/dist_worker.py, which records each rank's file writes, its
Accelerator calls and its RNG state.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from accelerate import state as state_mod
from conftest import ROOT, random_image_folder
from test_distributed import COMMON, assert_ranks_identical, assert_same_run, reference, worker
from torch import nn

from translate.core import loop
from translate.core.penalties import gradient_penalty, loss_scale, r1_penalty
from translate.explore.plot import parse_log
from translate.methods.base import Phase

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


def test_plot_leaves_out_the_run_shape():
    """The first record's run/* values describe the run, not a curve: no panel for them."""
    lines = [json.dumps({"step": 1, "run/processes": 2, "run/global_batch": 16, "D/loss": 1.0}),
             json.dumps({"step": 2, "D/loss": 0.5})]
    assert list(parse_log(lines).series) == ["D/loss"]


# ---------------------------------------------------------------------------- fp16 loss scaling


class TinyOutputD(nn.Module):
    """D(x) = 1e-4 * (1e-4 * sum(w * x)) computed in fp16: the input gradient 1e-8 * w is below
    fp16's smallest subnormal (6e-8), so an unscaled fp16 backward returns exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.6, -0.8, 1.2, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.half() * self.w.half()).sum(1)
        return (h * 1e-4) * 1e-4


def _fp32_twin(D: TinyOutputD):
    return lambda x: ((x * D.w).sum(1) * 1e-4) * 1e-4


def test_penalties_with_a_loss_scale_equal_the_unscaled_ones_in_fp32():
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    real, fake = torch.randn(6, 4), torch.randn(6, 4)
    eps = torch.rand(6, 1)
    values, grads = {}, {}
    for scale in (1.0, 2.0**12, 3.0):
        x = real.clone().requires_grad_(True)
        gp = gradient_penalty(D, real, fake, eps=eps, scale=scale)
        r1 = r1_penalty(x, D(x), scale=scale)
        (gp + r1).backward()  # the scaled graph must give D the same gradient
        values[scale] = (gp.detach(), r1.detach())
        grads[scale] = [p.grad.clone() for p in D.parameters()]
        D.zero_grad()
    for scale in (2.0**12, 3.0):
        torch.testing.assert_close(values[scale], values[1.0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grads[scale], grads[1.0], rtol=1e-5, atol=1e-7)
    # loss_scale sets the scale for calls that do not pass one.
    x = real.clone().requires_grad_(True)
    with loss_scale(2.0**12):
        torch.testing.assert_close(r1_penalty(x, D(x)), values[1.0][1], rtol=1e-6, atol=0)


def test_the_loss_scale_keeps_an_fp16_penalty_gradient_from_underflowing():
    D = TinyOutputD()
    real = torch.randn(5, 4)
    x = real.clone().requires_grad_(True)
    exact = r1_penalty(x, _fp32_twin(D)(x), gamma=2.0)
    assert exact > 0
    x = real.clone().requires_grad_(True)
    assert float(r1_penalty(x, D(x), gamma=2.0).detach()) == 0.0  # flushed to zero: why scaling matters
    x = real.clone().requires_grad_(True)
    scaled = r1_penalty(x, D(x), gamma=2.0, scale=2.0**15)
    torch.testing.assert_close(scaled, exact, rtol=2e-3, atol=0)


def test_run_phase_gives_the_grad_scalers_scale_to_the_penalties():
    """An fp16 run has accelerate's GradScaler (CUDA only); here one is attached by hand."""
    state_mod.AcceleratorState._reset_state()
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**15)
    D = TinyOutputD()
    real = torch.randn(5, 4)

    def d_loss(nets, batch, prev):
        x = batch["x"].detach().requires_grad_(True)
        r1 = r1_penalty(x, nets["D"](x), gamma=2.0)
        return {"loss": r1, "r1": r1}

    phase = Phase("D", ("D",), d_loss, lr=0.0)
    cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=1, grad_clip=0.0))
    opt = torch.optim.SGD(D.parameters(), lr=0.0)
    x = real.clone().requires_grad_(True)
    exact = r1_penalty(x, _fp32_twin(D)(x), gamma=2.0)
    logs, _ = loop.run_phase(acc, cfg, phase, opt, {"D": D}, {"x": real}, [{}])
    torch.testing.assert_close(logs["D/r1"], exact.detach(), rtol=2e-3, atol=0)
    # Once the scaler has scaled a loss its scale is a tensor, passed on without a host sync.
    acc.scaler.scale(torch.ones(()))
    assert isinstance(acc.scaler._scale, torch.Tensor)
    logs, _ = loop.run_phase(acc, cfg, phase, opt, {"D": D}, {"x": real}, [{}])
    torch.testing.assert_close(logs["D/r1"], exact.detach(), rtol=2e-3, atol=0)
