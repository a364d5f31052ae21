"""A run's session: its prepared nets, optimizers and settings (`setup`), which the loop
(translate/core/loop.py) steps, and the nets its samples, scores and health checks run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from translate.config import RunConfig
from translate.core import best, rundir
from translate.core.ema import make_ema
from translate.core.machine import (
    compile_choice,
    compile_nets,
    make_accelerator,
    make_optimizer,
    sync_batchnorm,
    total_steps,
)


@dataclass
class Session:
    """Everything the loop holds for one run (one place instead of a dozen locals)."""

    cfg: RunConfig
    accelerator: Accelerator
    method: object
    nets: dict[str, nn.Module]
    opts: list
    ema: dict[str, nn.Module]
    dataset: object
    total: int
    decay_start: int
    run_dir: Path
    scorer: Callable[[dict[str, nn.Module]], dict[str, float]] | None = None  # eval_every's (main)
    precision_why: str = ""  # how the precision was chosen, for the start line
    health: Any = None  # train.health's checks (main process only): observe, check_nets
    best: best.Keeper | None = None  # train.keep_best's checkpoint (main process only)
    compiled: bool = False  # the nets run through torch.compile
    compile_why: str = ""  # why (or why not), for the start line


def setup(method, dataset, cfg: RunConfig, scorer=None, monitor=None,
          accelerator: Accelerator | None = None, precision_why: str = "") -> Session:
    """The run's prepared nets and optimizers around what it trains (built above the core, by
    translate/run.py). Writes nothing: the run folder is made by `train` once the folder's
    rules (rundir.plan) allow the start."""
    if accelerator is None:
        accelerator, precision_why = make_accelerator(cfg)
    rundir.check_name(cfg.out_dir)
    names = list(method.nets)
    raw = [method.nets[n] for n in names]
    if cfg.train.sync_batchnorm:
        raw = sync_batchnorm(raw)
        method.nets.update(zip(names, raw))  # EMA copies and method state see the same modules
    if cfg.train.channels_last:
        raw = [n.to(memory_format=torch.channels_last) for n in raw]
    opts = [make_optimizer(cfg, ph, method.nets) for ph in method.phases]
    prepared = accelerator.prepare(*raw, *opts)
    nets = dict(zip(names, prepared[: len(names)]))
    opts = list(prepared[len(names):])
    if hasattr(method, "bind_optimizers"):
        method.bind_optimizers({ph.name: opt for ph, opt in zip(method.phases, opts)})
    total, decay = total_steps(cfg, dataset, accelerator.num_processes)
    compiled, compile_why = compile_choice(cfg, method, total, accelerator.mixed_precision,
                                           accelerator.device.type)
    if compiled:
        nets = compile_nets(nets)
    ema = {g: make_ema(method.nets[g]) for g in method.generators} if cfg.train.ema > 0 else {}
    return Session(cfg, accelerator, method, nets, opts, ema, dataset,
                   total, decay, cfg.out_dir, scorer, precision_why, monitor,
                   compiled=compiled, compile_why=compile_why)


def shown_nets(s: Session) -> dict[str, nn.Module]:
    """The nets that samples, scores and health checks run: eager even in a compiled run. Through
    torch.compile each of their calls (no grad, eval mode, other batch sizes and layouts) was
    one more graph to compile (9 for CycleGAN's first evaluation), past the recompile limit."""
    nets = {n: s.accelerator.unwrap_model(m, keep_torch_compile=False) for n, m in s.nets.items()}
    nets.update(s.ema)  # the EMA generators when there are some, as in the sample grids
    return nets
