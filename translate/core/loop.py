"""train(): the one training loop. Any GAN described as nets + phases runs on it, on one CPU or
under `accelerate launch` on many processes, with no code change."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from translate.config import RunConfig
from translate.core import best, checkpoint, faults, penalties, rundir, tracking
from translate.core.batches import batches as batch_stream
from translate.core.ema import ema_update, warmed_decay
from translate.core.faults import Diverged
from translate.core.machine import scaler_scale, total_steps
from translate.core.runlog import RUN_SHAPE, RunLog
from translate.core.schedules import health_due, lr_factor

# Called through this module's names (tests observe a run by replacing loop.setup).
from translate.core.session import Session, setup, shown_nets


@dataclass
class RunResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    logs: dict[str, float] = field(default_factory=dict)


def set_trainable(nets: dict[str, nn.Module], trained: tuple[str, ...]) -> None:
    # Frozen nets get no gradients, so under DDP they are neither computed nor synced and do not
    # leak into their own next step under gradient accumulation.
    for name, net in nets.items():
        net.requires_grad_(name in trained)


def split(batch: dict[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    if parts == 1:
        return [batch]
    chunks = {k: v.chunk(parts) for k, v in batch.items()}
    return [{k: v[i] for k, v in chunks.items()} for i in range(parts)]


class Batches:
    """Loader batches of batch_size * grad_accum samples, each tagged with the global sample
    numbers `k` so methods can draw per-sample noise that does not depend on the process count."""

    def __init__(self, cfg: RunConfig, dataset, accelerator: Accelerator, start: int):
        self.per_step = cfg.train.batch_size * cfg.train.grad_accum
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.device = accelerator.device
        self.channels_last = cfg.train.channels_last
        self.drawn = start
        self.it = batch_stream(dataset, self.per_step, start, self.rank, self.world,
                               cfg.data.num_workers)

    def next(self) -> dict[str, Tensor]:
        n = self.drawn
        batch = next(self.it)
        self.drawn += 1
        first = (n * self.world + self.rank) * self.per_step
        out = {"k": torch.arange(first, first + self.per_step, device=self.device)}
        for key, v in batch.items():
            v = v.to(self.device, non_blocking=True)
            if self.channels_last and v.dim() == 4:
                v = v.contiguous(memory_format=torch.channels_last)
            out[key] = v
        return out


def run_phase(accelerator, cfg, phase, opt, nets, batch, prev) -> tuple[dict, list[dict]]:
    """One optimizer step of one phase, over grad_accum micro-batches. Returns the logged values
    (detached, still on device) and what each micro-batch hands to the next phase."""
    accum = cfg.train.grad_accum
    logs: dict[str, Tensor] = {}
    handed: list[dict[str, Tensor]] = []
    frozen = [n for n in nets if n not in phase.nets]
    # fp16's GradScaler (GPU only): penalties scale their own input gradient by it too.
    scaler = accelerator.scaler
    scale = scaler_scale(accelerator)
    before = scale.clone() if isinstance(scale, Tensor) else scale  # the step updates it in place
    losses = (*phase.parts, phase.loss)  # each backpropagated before the next is built
    for i, (chunk, p) in enumerate(zip(split(batch, accum), prev)):
        given: dict[str, Tensor] = {}
        for j, loss_fn in enumerate(losses):
            last = i == accum - 1 and j == len(losses) - 1
            with contextlib.ExitStack() as stack:
                # Only the last loss of the last micro-batch all-reduces the gradients (the
                # others add to them locally); frozen nets never sync.
                for name in frozen + ([] if last else list(phase.nets)):
                    stack.enter_context(accelerator.no_sync(nets[name]))
                with accelerator.autocast(), penalties.loss_scale(scale):
                    out = loss_fn(nets, chunk, p)
                if "loss" in out:
                    accelerator.backward(out["loss"] / accum)
            for k, v in out.items():
                if v.dim() == 0:
                    v = v.detach().float() / accum
                    logs[f"{phase.name}/{k}"] = logs.get(f"{phase.name}/{k}", 0.0) + v
                else:
                    given[k] = v
        handed.append(given)
    if cfg.train.grad_clip > 0:
        params = [q for name in phase.nets for q in nets[name].parameters()]
        logs[f"{phase.name}/grad_norm"] = accelerator.clip_grad_norm_(params, cfg.train.grad_clip)
    opt.step()
    if scaler is not None:  # it lowers its scale exactly when it skips the step (faults.SKIPPED)
        logs[f"{phase.name}/{faults.SKIPPED}"] = torch.as_tensor(scaler_scale(accelerator) < before).float()
    opt.zero_grad(set_to_none=True)
    if phase.after_step is not None:
        phase.after_step(nets)
    return logs, handed


def global_mean(accelerator: Accelerator, logs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Logged values averaged over processes: the log then describes the global batch (the
    numbers one process with all of it would log), and a NaN on any rank stops every rank.
    Collective: every process calls it at the same steps."""
    if accelerator.num_processes == 1:
        return logs
    keys = sorted(logs)  # one order on every rank
    values = torch.stack([logs[k].detach().float().to(accelerator.device) for k in keys])
    means = dict(zip(keys, accelerator.reduce(values, "mean")))
    return {k: means[k] for k in logs}


def _save(s: Session, state: checkpoint.TrainState) -> Path:
    phase_of = {n: ph.name for ph in reversed(s.method.phases) for n in ph.nets}
    faults.check_weights(s.nets, s.ema, phase_of, state.step)
    return checkpoint.save(s.accelerator, s.run_dir, state, s.ema, s.method.state(),
                           s.cfg.train.keep_checkpoints)


def _sample(s: Session, log: RunLog, step: int, fixed) -> None:
    if not s.accelerator.is_main_process:
        return
    nets = shown_nets(s)
    modes = {n: m.training for n, m in nets.items()}
    for m in nets.values():
        m.eval()  # eval: sampling must not move BatchNorm statistics (exact resume)
    with torch.no_grad(), s.accelerator.autocast():
        image = s.method.sample(nets, fixed)
    for n, m in nets.items():
        m.train(modes[n])
    log.sample(step, image)


def _evaluate(s: Session) -> dict[str, float]:
    """The periodic scores, on the main process only. No collective runs inside (unwrapped
    nets, SyncBatchNorm in eval mode uses its running statistics), so the other ranks go on
    and wait for the main one at the next gradient all-reduce."""
    if s.scorer is None:
        return {}
    return s.scorer(shown_nets(s))


def _health(s: Session, step: int, fixed, values: dict[str, float], due: bool) -> list[str]:
    """Health checks (main process, no collective): adds health/* to `values`; returns the
    warning lines that became due."""
    if s.health is None:
        return []
    s.health.observe(step, values)
    if not due:
        return []
    checks, warnings = s.health.check_nets(step, shown_nets(s), fixed)
    values.update(checks)
    return warnings


def _start(s: Session, path: Path | None) -> tuple[checkpoint.TrainState, Path | None]:
    """The state to start from: checkpoint `path`'s, or step 0 with fresh per-rank seeding."""
    acc, t = s.accelerator, s.cfg.train
    fp = checkpoint.fingerprint(s.cfg.method, s.cfg.model)
    if path is None:
        # Per-rank stream for what is not drawn per sample (dropout, pool, DiffAugment).
        torch.manual_seed(s.cfg.seed + 1000 * acc.process_index)
        state = checkpoint.TrainState(fingerprint=fp)
    else:
        state, method_state = checkpoint.load(acc, path, fp, s.ema)
        s.method.load_state(method_state)
    # What the next resume must keep (rundir.plan checks it): for a resume, the same values.
    state.precision = acc.mixed_precision
    state.global_batch = t.batch_size * acc.num_processes * t.grad_accum
    return state, path


def start_line(s: Session, state: checkpoint.TrainState, path: Path | None) -> str:
    """What this start trains, on what, how (the first line a run prints)."""
    acc, cfg, t = s.accelerator, s.cfg, s.cfg.train
    return (f"{cfg.method} '{cfg.name}': {s.dataset.describe()}; global batch "
            f"{t.batch_size} x {acc.num_processes} processes x {t.grad_accum} accumulation = "
            f"{state.global_batch}; {s.total} steps; precision {acc.mixed_precision} "
            f"({s.precision_why}); compile {'on' if s.compiled else 'off'} ({s.compile_why})"
            + (f"; resumed from {path}" if path else ""))


def train(method, dataset, cfg: RunConfig, scorer=None, *, monitor=None,
          read_config: rundir.ReadConfig, accelerator: Accelerator | None = None,
          precision_why: str = "", resume: str | None = None, progress: bool = True,
          overwrite: bool = False, again: list[str] | None = None) -> RunResult:
    """Train `method` (nets + phases) on `dataset` as `cfg` says, into its run folder (rundir
    has the folder's rules); what it trains is built above the core (translate/runner.py).
    scorer: nets -> {"eval/...": value}, main process, every train.eval_every; monitor: health
    checks (observe, check_nets); read_config: a run's config.json -> its config (for a resume).
    resume: None (new run), "auto" (newest checkpoint, none is an error), "auto-or-new", or a
    checkpoint or run folder; overwrite: a new run where one exists (the old one moves to
    RUN.old-<time>); again: the command line that continues the run, for a stop's message."""
    s = setup(method, dataset, cfg, scorer, monitor, accelerator, precision_why)
    acc, t = s.accelerator, cfg.train
    plan = rundir.plan_on_all(acc, cfg, resume, overwrite,
                              lambda c: total_steps(c, s.dataset, acc.num_processes),
                              read_config)
    state, path = _start(s, plan.checkpoint)
    # Only now, with settings, data and checkpoint known to be usable, is the folder touched.
    notes = rundir.open_folder(cfg, plan) if acc.is_main_process else []
    s.best = best.keeper(t.keep_best, s.run_dir, state.step, acc.is_main_process)
    trackers = tracking.start(acc, cfg, state.step)
    log = RunLog(s.run_dir, acc.is_main_process, s.total, state.step, progress, trackers)
    # Also in the first log.jsonl record of this start (a resume may change the process count
    # or extend the run); per-process batch and accumulation are in config.json.
    shape = {f"{RUN_SHAPE}processes": acc.num_processes,
             f"{RUN_SHAPE}global_batch": state.global_batch, f"{RUN_SHAPE}steps": s.total}
    for line in [start_line(s, state, path), *notes]:
        log.print(line)
    again_text = rundir.continue_command(again, s.run_dir, acc.num_processes)
    fixed = s.method.fixed_batch(s.dataset, t.n_samples, cfg.seed) if acc.is_main_process else None
    batches = Batches(cfg, s.dataset, acc, state.batches)
    last_ckpt, logs = path, {}
    if t.on_nan == "rollback" and last_ckpt is None:
        last_ckpt = _save(s, state)  # something to roll back to before the first save
    try:
        with faults.StopRequest() as stop:
            while state.step < s.total:
                try:
                    logs, saved = run_step(s, state, batches, log, fixed, shape)
                except Diverged as e:
                    if t.on_nan != "rollback":
                        raise
                    state, last_ckpt = faults.roll_back(acc, s.run_dir, state, e, s.ema,
                                                        s.method, log)
                    batches = Batches(cfg, s.dataset, acc, state.batches)
                    continue
                last_ckpt = saved or last_ckpt
                if signum := stop.requested(acc):
                    if saved is None:
                        log.print(f"stopping: saving a checkpoint at step {state.step} "
                                  "(press Ctrl-C again to quit at once)")
                        last_ckpt = _save(s, state)
                    raise faults.interrupted(signum, state.step, last_ckpt, again_text)
    finally:
        log.close()
        if trackers is not None:
            trackers.close()
    acc.wait_for_everyone()  # before end_training, else gloo aborts now and then
    acc.end_training()
    return RunResult(s.run_dir, state.step, last_ckpt, {k: float(v) for k, v in logs.items()})


def run_step(s: Session, state: checkpoint.TrainState, batches: Batches, log: RunLog, fixed,
             shape: dict[str, int]) -> tuple[dict[str, Tensor], Path | None]:
    """One step with its bookkeeping: NaN check, log line, samples, checkpoint. Returns the
    logged values and the checkpoint written at this step, if any. `shape` goes into the next
    log record, then is emptied."""
    acc, t = s.accelerator, s.cfg.train
    logs = train_step(s, state, batches)
    state.step += 1
    state.batches = batches.drawn
    eval_now = t.eval_every > 0 and (state.step % t.eval_every == 0 or state.step == s.total)
    health_now = health_due(s.cfg.train, state.step, s.total)
    log_now = state.step % t.log_every == 0 or state.step == s.total or eval_now or health_now
    if log_now:
        logs = global_mean(acc, logs)
    # Every step where it is free (one CPU process); else at log steps, where the values are
    # global means, so every process takes the same decision (and a GPU syncs only then).
    if log_now or (acc.device.type == "cpu" and acc.num_processes == 1):
        faults.check_finite(logs, state.step)
    log.advance(state.step)
    scores = _evaluate(s) if eval_now else {}
    if log_now:
        values = {**shape, **{k: float(v) for k, v in logs.items()}, **scores}
        warnings = _health(s, state.step, fixed, values, health_now)
        log.log(state.step, values, warnings)
        shape.clear()
    if state.step % t.sample_every == 0 or state.step == s.total:
        _sample(s, log, state.step, fixed)
    saved = None
    if state.step % t.save_every == 0 or state.step == s.total:
        saved = _save(s, state)
    if s.best is not None and scores:  # Keep the best checkpoint (train.keep_best).
        s.best.offer(s.accelerator, s.run_dir, state, s.nets, s.ema, scores)
    return logs, saved


def train_step(s: Session, state: checkpoint.TrainState, batches: Batches) -> dict[str, Tensor]:
    """One generator step: every phase in order, each repeated (n_critic) as it asks."""
    t = s.cfg.train
    scale = lr_factor(state.step, s.total, t.lr_schedule, s.decay_start) * state.lr_scale
    logs: dict[str, Tensor] = {}
    batch, handed = None, [{}] * t.grad_accum
    # How far the run is (0 at the first step), for losses whose weights follow the schedule.
    progress = torch.tensor(state.step / s.total)
    for phase, opt in zip(s.method.phases, s.opts):
        for group in opt.param_groups:
            group["lr"] = phase.lr * scale
        logs[f"lr/{phase.name}"] = torch.tensor(phase.lr * scale)  # TTUR: each phase's own LR
        set_trainable(s.nets, phase.nets)
        for _ in range(phase.repeats):
            if phase.new_batch or batch is None:
                batch = batches.next()
            prev = [{**p, "progress": progress} for p in handed]
            phase_logs, out = run_phase(s.accelerator, s.cfg, phase, opt, s.nets, batch, prev)
            logs.update(phase_logs)
        handed = out
        if phase.is_generator and s.ema:
            for name, ema_net in s.ema.items():
                ema_update(ema_net, s.accelerator.unwrap_model(s.nets[name]),
                           warmed_decay(t.ema, state.step))
    set_trainable(s.nets, tuple(s.nets))
    logs["lr_scale"] = torch.tensor(scale)
    if s.accelerator.scaler is not None:
        logs[faults.LOSS_SCALE] = torch.as_tensor(scaler_scale(s.accelerator)).clone()
    if math.isnan(scale):
        raise Diverged(f"step {state.step}: the learning-rate schedule gave NaN",
                       "check train.lr_schedule and train.decay_start")
    return logs
