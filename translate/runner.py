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
from translate.nets import nnpack


def build(cfg: RunConfig, accelerator) -> dict:
    """What the loop trains, scores and checks: {method, dataset, scorer, monitor}, and how
    many convolutions run on NNPACK (nnpack). Seeds first, so every rank builds identical
    initial weights."""
    rundir.check_name(cfg.out_dir)
    set_seed(cfg.seed)
    method = METHODS[cfg.method].build(cfg)
    swapped = 0
    if not cfg.train.channels_last and nnpack.for_training(  # NNPACK takes NCHW only
            cfg.train.nnpack, accelerator.device, accelerator.mixed_precision):
        swapped = sum(nnpack.use_in_training(net) for net in method.nets.values())
    dataset = build_dataset(cfg)
    main = accelerator.is_main_process
    scorer = periodic.build(cfg, main, accelerator.device)
    return {"method": method, "dataset": dataset,
            "scorer": functools.partial(periodic.evaluate, scorer) if scorer else None,
            "monitor": monitor.build(cfg, method, dataset, main), "nnpack": swapped}


def _why(precision_why: str, cfg: RunConfig, parts: dict) -> str:
    """The start line's reason for the precision, with the convolutions NNPACK took."""
    if not parts["nnpack"]:
        return precision_why
    return (f"{precision_why}; train.nnpack {cfg.train.nnpack}: {parts['nnpack']} "
            f"convolutions on NNPACK at {nnpack.TRAIN_MIN_SIDE}x{nnpack.TRAIN_MIN_SIDE} px "
            "and more")


def setup(cfg: RunConfig) -> loop.Session:
    """The loop's session of the run `cfg` describes, without training (benches, tests)."""
    accelerator, precision_why = machine.make_accelerator(cfg)
    parts = build(cfg, accelerator)
    return loop.setup(parts["method"], parts["dataset"], cfg, parts["scorer"], parts["monitor"],
                      accelerator, _why(precision_why, cfg, parts))


def train(cfg: RunConfig, resume: str | None = None, progress: bool = True,
          overwrite: bool = False, again: list[str] | None = None) -> RunResult:
    """Train the run `cfg` describes (resume, overwrite, again: as translate.core.loop.train)."""
    accelerator, precision_why = machine.make_accelerator(cfg)
    parts = build(cfg, accelerator)
    return loop.train(parts["method"], parts["dataset"], cfg, parts["scorer"],
                      monitor=parts["monitor"], read_config=recipe.load_json,
                      accelerator=accelerator, precision_why=_why(precision_why, cfg, parts),
                      resume=resume,
                      progress=progress, overwrite=overwrite, again=again)
