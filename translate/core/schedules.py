"""Learning-rate schedules as pure functions of the global step.

The loop sets each optimizer's LR from `lr_factor(step, ...)` instead of stepping a scheduler
object: the value depends only on the step, so it is identical on every rank whatever the number
of processes (an accelerate-prepared scheduler steps once per process) and resumes exactly.
"""

from __future__ import annotations


def lr_factor(step: int, total: int, kind: str = "constant", decay_start: int = 0) -> float:
    """Multiplier on the base LR at generator step `step` (0-based) of `total`.

    linear: 1 until `decay_start` (0 means total // 2), then linearly to 0 at `total`, as in the
    reference CycleGAN (n_epochs constant + n_epochs_decay linear)."""
    if kind == "constant":
        return 1.0
    if kind == "linear":
        start = decay_start if decay_start > 0 else total // 2
        if step < start:
            return 1.0
        span = max(1, total - start)
        return max(0.0, 1.0 - (step - start + 1) / (span + 1))
    raise ValueError(f"unknown schedule {kind!r}")


def health_interval(t) -> int:
    """Steps between health checks (`t`: the run's TrainConfig): train.health_every, else
    sample_every rounded up to a multiple of log_every (so that the checks fall on log steps
    and add no log record)."""
    return t.health_every or -(-t.sample_every // t.log_every) * t.log_every


def health_due(t, step: int, total: int) -> bool:
    """Whether `step` is a health check: the same answer on every process (it makes a log step,
    which is collective)."""
    return t.health and (step % health_interval(t) == 0 or step == total)
