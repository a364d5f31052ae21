"""A training run from a recipe: builds what the core loop trains (the method, the data, the
periodic scorer, the health monitor) and hands it to `translate.core.loop.train`.

The one place that knows both the recipe's names and the loop: the loop below it knows no
particular GAN, data or score, and the methods, data and scorers know no loop.
"""

from __future__ import annotations

import functools

from accelerate.utils import set_seed

from translate import recipe
from translate.config import RunConfig
from translate.core import loop, machine, rundir
from translate.core.loop import RunResult
from translate.data import build_dataset
from translate.eval import monitor, periodic
from translate.methods import METHODS


def build(cfg: RunConfig, accelerator) -> dict:
    """What the loop trains, scores and checks: {method, dataset, scorer, monitor}. Seeds first,
    so every rank builds identical initial weights."""
    rundir.check_name(cfg.out_dir)
    set_seed(cfg.seed)
    method = METHODS[cfg.method].build(cfg)
    dataset = build_dataset(cfg)
    main = accelerator.is_main_process
    scorer = periodic.build(cfg, main, accelerator.device)
    return {"method": method, "dataset": dataset,
            "scorer": functools.partial(periodic.evaluate, scorer) if scorer else None,
            "monitor": monitor.build(cfg, method, dataset, main)}


def setup(cfg: RunConfig) -> loop.Session:
    """The loop's session of the run `cfg` describes, without training (benches, tests)."""
    accelerator, precision_why = machine.make_accelerator(cfg)
    parts = build(cfg, accelerator)
    return loop.setup(parts["method"], parts["dataset"], cfg, parts["scorer"], parts["monitor"],
                      accelerator, precision_why)


def train(cfg: RunConfig, resume: str | None = None, progress: bool = True,
          overwrite: bool = False, again: list[str] | None = None) -> RunResult:
    """Train the run `cfg` describes (resume, overwrite, again: as translate.core.loop.train)."""
    accelerator, precision_why = machine.make_accelerator(cfg)
    parts = build(cfg, accelerator)
    return loop.train(parts["method"], parts["dataset"], cfg, parts["scorer"],
                      monitor=parts["monitor"], read_config=recipe.load_json,
                      accelerator=accelerator, precision_why=precision_why, resume=resume,
                      progress=progress, overwrite=overwrite, again=again)
