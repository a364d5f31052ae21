"""The run folder's rules: a folder that holds a run is never reused silently, and a resume
continues the run as it was configured.

    no --resume, the folder holds a run     refused: --resume auto, another --run-dir, or
                                            --overwrite (the old run moves to RUN.old-<time>)
    --resume auto                           the newest checkpoint; none there is an error
    --resume auto-or-new                    the newest checkpoint, else a new run (what a
                                            start that saved no checkpoint left moves aside)
    --resume PATH                           that checkpoint (or that run's newest); an older
                                            checkpoint of the same folder rewinds the run, and
                                            the later checkpoints move to RUN/rewound-<time>

A resume takes the run's config.json as the truth. A start may differ from it only in how the
run is watched and kept (FREE), in the remedies the NaN messages advise (REMEDIES), in a longer
run (--steps N: the LR schedule is that of the new length, log.jsonl's first record of the start
has run/steps), and in a per-process batch that keeps the run's global batch on another number
of processes. Anything else is refused with one line naming each difference. Nothing here
deletes a file.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from translate import config as config_mod
from translate.config import RunConfig
from translate.core import checkpoint
from translate.core.schedules import lr_factor
from translate.errors import ConfigError, UserError

# Where the run is written and how it is watched: no effect on the weights.
FREE = frozenset({
    "run_dir", "train.log_every", "train.sample_every", "train.save_every",
    "train.keep_checkpoints", "train.n_samples", "train.on_nan", "train.log_with",
    "train.eval_every", "train.eval_data", "train.eval_features", "data.num_workers",
    "data.strict"})
# What the divergence messages tell the user to change before resuming.
REMEDIES = frozenset({"train.lr_g", "train.lr_d", "train.grad_clip"})
LENGTH = frozenset({"train.steps", "train.epochs", "train.epochs_decay"})  # longer only
SHAPE = frozenset({"train.batch_size", "train.grad_accum"})  # judged by the global batch
PRECISION = "train.mixed_precision"  # judged by the precision the run trained in

Totals = Callable[[RunConfig], tuple[int, int]]  # config -> (total steps, linear decay start)
# A run's config.json -> its config. Given by the caller: reading one needs the method table,
# which sits above the core (translate.recipe.load_json).
ReadConfig = Callable[[Path], RunConfig]


@dataclass(frozen=True)
class Plan:
    """What a start does with its run folder, decided before anything is written."""

    checkpoint: Path | None = None   # the checkpoint to resume from; None: a new run
    changes: tuple[str, ...] = ()    # what this start changes against config.json
    set_aside: str = ""              # why the earlier run moves to RUN.old-<time> ("": stays)
    later: tuple[Path, ...] = ()     # checkpoints after the resumed one (a rewind)


def left_by_a_run(run_dir: Path) -> list[str]:
    """What an earlier run left in `run_dir` (checkpoints, log.jsonl, config.json)."""
    ckpts = Path(run_dir) / "checkpoints"
    found = ["checkpoints"] if ckpts.is_dir() and any(ckpts.iterdir()) else []
    return found + [n for n in ("log.jsonl", "config.json") if (Path(run_dir) / n).exists()]


def _show(key: str, old: Any, new: Any) -> str:
    return f"{key} {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}"


def plan(cfg: RunConfig, resume: str | None, overwrite: bool, processes: int, precision: str,
         totals: Totals, read_config: ReadConfig) -> Plan:
    """Check the start against the run folder; raises UserError (one line) when refused.
    `precision` is the one this start trains in (auto resolved)."""
    target = cfg.out_dir
    if overwrite and resume:
        raise UserError("--overwrite starts a run over and --resume continues one; pass only "
                        "one of them")
    path = checkpoint.resolve(target, resume) if resume else None
    if path is None:
        return _new_run(target, resume, overwrite)
    return _resumed(cfg, target, path, processes, precision, totals, read_config)


def _new_run(target: Path, resume: str | None, overwrite: bool) -> Plan:
    left = left_by_a_run(target)
    if resume == "auto":
        raise UserError(f"{target}: no checkpoint to resume (is --run-dir right?); "
                        "--resume auto-or-new starts a new run where there is none")
    if not left:
        return Plan()
    if overwrite:
        return Plan(set_aside="--overwrite")
    if resume:  # auto-or-new, and what is there never saved a checkpoint (killed early)
        return Plan(set_aside=f"no checkpoint to resume ({', '.join(left)} of a start that "
                    "saved none)")
    raise UserError(f"{target}: holds {', '.join(left)} of an earlier run; continue it with "
                    "--resume auto, choose another --run-dir, or start over with --overwrite "
                    f"(the old run moves to {target}.old-<time>; nothing is deleted)")


def _same_folder(a: Path | None, b: Path) -> bool:
    return a is not None and os.path.abspath(a) == os.path.abspath(b)


def _resumed(cfg: RunConfig, target: Path, path: Path, processes: int, precision: str,
             totals: Totals, read_config: ReadConfig) -> Plan:
    source = checkpoint.run_of(path)
    same = _same_folder(source, target)
    left = left_by_a_run(target)
    if not same and left:
        raise UserError(f"{target}: holds {', '.join(left)} of another run; resuming {path} "
                        "there would mix two runs; choose an empty --run-dir")
    state = checkpoint.read_state(path, None)
    changes: list[str] = []
    refused: list[str] = []
    old_file = source / "config.json" if source is not None else None
    if old_file is not None and old_file.is_file():
        old = read_config(old_file)
        changes, refused = _compare(old, cfg, state, totals)
    refused += _as_trained(cfg, state, processes, precision)
    if refused:
        recipe = any(r.startswith(("model.", "method ")) for r in refused)
        raise UserError(
            f"{target}: a resume continues the run as its config.json says, and this start "
            f"differs: {'; '.join(refused)}"
            + ("; the run was made by a different recipe or model settings" if recipe else "")
            + "; drop those options to continue it, or start a new run (another --run-dir, "
            "or --overwrite without --resume)")
    checkpoint.read_state(path, checkpoint.fingerprint(cfg.method, cfg.model))
    later = tuple(c for c in checkpoint.list_checkpoints(target)
                  if checkpoint.step_of(c) > checkpoint.step_of(path)) if same else ()
    return Plan(path, tuple(changes), later=later)


def _as_trained(cfg: RunConfig, state: checkpoint.TrainState, processes: int,
                precision: str) -> list[str]:
    """How this start differs from what the run trained with: the global batch (the data
    order and the LR's meaning depend on it, the per-process share does not) and the
    precision `auto` resolved to (it may resolve otherwise on another machine or launcher).
    Checkpoints from before these were recorded are judged by their config.json alone."""
    out = []
    b, accum = cfg.train.batch_size, cfg.train.grad_accum
    if state.global_batch and b * processes * accum != state.global_batch:
        per = state.global_batch // (processes * accum)
        fix = f"--batch-size {per}" if per * processes * accum == state.global_batch else \
            "the run's number of processes"
        out.append(f"global batch {state.global_batch} -> {b * processes * accum} ({b} per "
                   f"process x {processes} process{'es' * (processes != 1)} x {accum} "
                   f"accumulation; keep it with {fix})")
    if state.precision and precision != state.precision:
        out.append(f"precision {state.precision} -> {precision} (keep it with "
                   f"--mixed-precision {state.precision})")
    return out


def _compare(old: RunConfig, new: RunConfig, state: checkpoint.TrainState,
             totals: Totals) -> tuple[list[str], list[str]]:
    """(changes applied, differences refused) of `new` against the run's config `old`."""
    changes, refused, length = [], [], False
    for key, a, b in config_mod.differences(old, new):
        if key in FREE or (key == PRECISION and state.precision):
            continue  # the precision is judged by the caller, as trained
        if key in REMEDIES or (key in SHAPE and state.global_batch):
            changes.append(_show(key, a, b))  # the global batch is judged by the caller
        elif key in LENGTH:
            length = True
        else:
            refused.append(_show(key, a, b))
    if length:
        (total_a, decay_a), (total_b, decay_b) = totals(old), totals(new)
        if total_b < total_a:
            refused.append(f"train.steps {total_a} -> {total_b} (a resume can extend a run, "
                           "never shorten it)")
        elif total_b > total_a:
            change = f"train.steps {total_a} -> {total_b}"
            if new.train.lr_schedule == "linear":  # the schedule is that of the new length
                kind, step = new.train.lr_schedule, state.step
                change += (f" (the linear LR schedule of {total_b} steps: LR scale of step "
                           f"{step + 1} {lr_factor(step, total_a, kind, decay_a):.3g} -> "
                           f"{lr_factor(step, total_b, kind, decay_b):.3g})")
            changes.append(change)
    return changes, refused


def plan_on_all(accelerator: Accelerator, cfg: RunConfig, resume: str | None, overwrite: bool,
                totals: Totals, read_config: ReadConfig) -> Plan:
    """Collective `plan`: the main process decides, every process gets its answer (or its
    refusal), so no rank acts on a folder listing that lags behind (a shared file system)."""
    args = (cfg, resume, overwrite, accelerator.num_processes, accelerator.mixed_precision,
            totals, read_config)
    if accelerator.num_processes == 1:
        return plan(*args)
    answer: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            answer = [plan(*args)]
        except UserError as e:
            answer = [str(e)]
    answer = broadcast_object_list(answer)
    if isinstance(answer[0], str):
        # A ConfigError: the same line on every rank, which the command prints once (main).
        raise ConfigError(answer[0])
    return answer[0]


def _stamped(path: Path) -> Path:
    """`path` with -<time> added, made unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = path.with_name(f"{path.name}-{stamp}"), 1
    while out.exists():
        n += 1
        out = path.with_name(f"{path.name}-{stamp}-{n}")
    return out


def open_folder(cfg: RunConfig, p: Plan) -> list[str]:
    """Carry out the plan on disk and write config.json (main process only); returns what to
    tell the user. Old files are only renamed, never deleted."""
    run_dir = cfg.out_dir
    notes = ["changed against the run's config.json: " + "; ".join(p.changes)] if p.changes \
        else []
    if p.set_aside:
        aside = _stamped(run_dir.absolute().with_name(run_dir.absolute().name + ".old"))
        os.rename(run_dir, aside)
        notes.append(f"{p.set_aside}: the earlier run in {run_dir} was moved to {aside}; "
                     "starting anew")
    if p.later:
        aside = _stamped(run_dir / "rewound")
        aside.mkdir()
        for ckpt in p.later:
            os.replace(ckpt, aside / ckpt.name)
        if (run_dir / "log.jsonl").is_file():  # the log is rewound too: keep its later lines
            shutil.copy2(run_dir / "log.jsonl", aside / "log.jsonl")
        names = ", ".join(c.name for c in p.later)
        notes.append(f"rewound to {p.checkpoint.name}: the later checkpoints ({names}) and a "
                     f"copy of log.jsonl were moved to {aside}")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        config_mod.save(cfg, run_dir / "config.json")
    except OSError as e:
        raise UserError(f"{run_dir}: cannot write the run's config.json ({e.strerror}); "
                        f"{checkpoint.fix_for(e)}, then run again") from None
    return notes



def check_name(run_dir: Path) -> None:
    """Refuse a run folder whose path safetensors could not open."""
    try:
        str(run_dir.absolute()).encode("utf-8")
    except UnicodeEncodeError:
        # safetensors (ours and accelerate's) opens files by UTF-8 path only: such a run
        # would train but could never be resumed or exported.
        raise ConfigError(f"run_dir: {run_dir} has bytes that are not UTF-8, which safetensors "
                          "cannot open; choose a run folder with a UTF-8 name") from None


# ---------------------------------------------------------------------------- the command line


def continue_command(words: list[str] | None, run_dir: Path, processes: int) -> str:
    """How to continue a stopped run: the command line `words` (shell-quoted), else the
    Python call."""
    how = shlex.join(words) if words else f"train(cfg, resume='auto') into {run_dir}"
    return how + (f" (under the same launcher, {processes} processes)" if processes > 1 else "")
