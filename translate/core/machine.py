"""What a run computes on: its Accelerator and precision (refusing what the machine cannot
do), its optimizers, its length in steps, and whether its nets run through torch.compile."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from accelerate import state as state_mod
from torch import nn

from translate import precision
from translate.config import RunConfig
from translate.core import tracking
from translate.core.batches import steps_per_epoch
from translate.errors import ConfigError


def machine_precision(cfg: RunConfig) -> tuple[str, str]:
    """The run's autocast mode on this machine ("no", "bf16", "fp16") and why it was chosen,
    refusing what the machine cannot do. `translate train --dry-run` asks it too, so it refuses
    what a run would."""
    on_cpu = not torch.cuda.is_available()
    mixed, why = precision.training_precision(cfg.train.mixed_precision,
                                              precision.launcher_precision(),
                                              torch.device("cpu" if on_cpu else "cuda"))
    if on_cpu and mixed == "fp16":
        raise ConfigError("train.mixed_precision: fp16 is not available on CPU (accelerate would "
                          "silently train in fp32); use bf16 or no")
    if on_cpu and cfg.train.sync_batchnorm:
        raise ConfigError("train.sync_batchnorm: torch's SyncBatchNorm refuses CPU tensors (it "
                          "runs on GPUs only); set train.sync_batchnorm = false on CPU")
    return mixed, why


def make_accelerator(cfg: RunConfig) -> tuple[Accelerator, str]:
    """The run's Accelerator and why it computes in its precision (for the start line)."""
    on_cpu = not torch.cuda.is_available()
    trackers = tracking.accelerator_kwargs(cfg)  # a tracker that is not installed stops us here
    mixed, why = machine_precision(cfg)
    if not (state_mod.PartialState._shared_state and state_mod.PartialState().num_processes > 1):
        # In one process (tests, notebooks) a second run may ask for another precision;
        # accelerate keeps one global state, so start it afresh.
        state_mod.AcceleratorState._reset_state()
    # cpu=True on a CPU machine is what makes `accelerate launch --multi_gpu` processes form one
    # gloo group instead of training independently.
    return Accelerator(cpu=on_cpu, mixed_precision=mixed, **trackers), why


def scaler_scale(accelerator: Accelerator) -> torch.Tensor | float:
    """fp16's GradScaler's scale (1.0 without one), left on the device: get_scale() would sync
    the GPU every step. A float until the scaler's first use."""
    scaler = accelerator.scaler
    if scaler is None:
        return 1.0
    return scaler._scale if scaler._scale is not None else scaler.get_scale()


def total_steps(cfg: RunConfig, dataset, world: int) -> tuple[int, int]:
    """(total generator steps, step where linear LR decay starts)."""
    t = cfg.train
    if t.epochs > 0:
        per_epoch = steps_per_epoch(dataset, t.batch_size * t.grad_accum, world)
        return (t.epochs + t.epochs_decay) * per_epoch, t.epochs * per_epoch
    return t.steps, t.decay_start


def make_optimizer(cfg: RunConfig, phase, nets: dict[str, nn.Module]):
    params = [p for name in phase.nets for p in nets[name].parameters()]
    if cfg.train.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=phase.lr)
    # The fused kernel (CPU and CUDA since torch 2.4) is one pass over each parameter: ~6x
    # faster than foreach on CPU (28 M CycleGAN parameters: ~0.3 s less per iteration).
    # foreach is the multi-tensor fallback for devices without it.
    fused = params[0].device.type in ("cpu", "cuda")
    return torch.optim.Adam(params, lr=phase.lr, betas=phase.betas,
                            **({"fused": True} if fused else {"foreach": True}))


def sync_batchnorm(nets: list[nn.Module]) -> list[nn.Module]:
    """BatchNorm statistics over the global batch instead of each process's share of it."""
    return [nn.SyncBatchNorm.convert_sync_batchnorm(net) for net in nets]


# train.compile "auto" compiles runs at least this long, of a method measured to gain (its
# `compile_pays`), in bf16 on a CPU. Measured with bench/speed.py (CycleGAN 128 px batch 1,
# 2-core Xeon with AMX): bf16 steps 1.15-1.26x faster compiled, after a compile of one to a few
# minutes, so it pays after ~1,000-2,000 steps (a paper-length run has 200,000); fp32 steps
# were 0.88x (slower) compiled on the same CPU run as an AVX2 one; GPUs and the other methods
# were not measured, so auto leaves them eager.
AUTO_COMPILE_STEPS = 5_000


def compile_choice(cfg: RunConfig, method, total: int, mixed: str, device: str
                   ) -> tuple[bool, str]:
    """(torch.compile the nets?, why, for the start line). `mixed`: the autocast mode the run
    computes in; `device`: its device type."""
    if cfg.train.compile != "auto":
        return bool(cfg.train.compile), "set by the recipe or --set"
    if not getattr(method, "compile_pays", False):
        return False, f"auto: not measured to pay for {cfg.method}"
    if (mixed, device) != ("bf16", "cpu"):
        return False, "auto: measured to pay only for bf16 on a CPU"
    if total < AUTO_COMPILE_STEPS:
        return False, f"auto: {total} steps, under {AUTO_COMPILE_STEPS:,} to repay the warm-up"
    return True, f"auto: {total} steps repay the warm-up"


def compile_nets(nets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The nets through torch.compile. Every net runs through the same function (accelerate's
    forward wrapper), so all their compiled variants (one per net and kind of input: CycleGAN
    has 8) count against that function's recompile limit, 8 by default; past it the rest would
    run eager without a word. So: room for 4 per net, and a fresh start (entries of an earlier
    run in this process would count too, and change the numbers on resume)."""
    torch.compiler.reset()
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 4 * len(nets))
    return {n: torch.compile(m) for n, m in nets.items()}
