"""The health monitor of a training run: the detectors of translate/eval/health.py run on the sample
batch every train.health_every steps (0: every sample_every, rounded up to a multiple of
log_every), their values logged as health/<detector> (log.jsonl, trackers, `translate plot`),
and ONE warning line with the remedy once a condition has held for train.health_patience
checks in a row.

The generator outputs come from the method's own `sample` (the grid the run draws anyway), read
off forward hooks on the generators, so every method is watched without knowing its inputs:
a translator's first call maps source images (checked against the target domain), a latent G's
first call draws samples (checked against real samples). Losses and D's outputs come from the
log records between two checks. Main process only; a resume starts the streaks afresh.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from translate.config import RunConfig
from translate.core import runlog
from translate.core.schedules import health_due, health_interval
from translate.eval import health
from translate.eval import periodic as periodic_eval

REFERENCE_SAMPLES = 32  # real samples per domain the outputs are compared with
HISTORY_RECORDS = 1000  # log records the loss-based detectors remember
KEY = "health/"

# detector -> (name in the warning, what to do about it)
REMEDIES: dict[str, tuple[str, str]] = {
    "identity": ("identity collapse", (
        "the output is (nearly) the input: lower model.lambda_identity, and make sure D is not "
        "too weak (train.lr_d, model.n_layers_d)")),
    "inversion": ("colour inversion", (
        "the output's colours mirror the target domain's: keep model.lambda_identity > 0 (it "
        "anchors the colours) and check the weight initialisation gain")),
    "checkerboard": ("checkerboard artifacts", (
        "set model.upsample = \"resize\" (nearest x2 + conv instead of transposed "
        "convolutions)")),
    "diversity": ("mode collapse", (
        "outputs for different inputs look alike: try model.pack (PacGAN), "
        "model.minibatch_std, or lower learning rates")),
    "d_wins": ("D wins", (
        "D tells real from fake every time and G gets no useful gradient: TTUR (train.lr_d "
        "below train.lr_g), model.diff_augment, model.spectral_norm")),
    "explosion": ("loss explosion", (
        "lower the learning rates (train.lr_g, train.lr_d) or set train.grad_clip")),
}


def interval(cfg: RunConfig) -> int:
    return health_interval(cfg.train)


def due(cfg: RunConfig, step: int, total: int) -> bool:
    return health_due(cfg.train, step, total)


def reference_batch(dataset: Any, n: int = REFERENCE_SAMPLES) -> dict[str, Tensor]:
    """The first n samples of the training set, stacked by key (a, b; x), float ones only
    (of the first sample's size, where sizes vary)."""
    with torch.random.fork_rng(devices=[]):
        items = [dataset[k] for k in range(min(n, len(dataset)))]
    return {key: torch.stack([it[key] for it in items
                              if it[key].shape == items[0][key].shape]).float()
            for key in items[0] if items[0][key].is_floating_point()}


def record_generators(nets: dict[str, nn.Module], names: list[str],
                      run: Callable[[], Any]) -> dict[str, tuple[Tensor, Tensor]]:
    """{generator: (input, output) of its first call} while `run()` runs."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = []
    for name in names:
        def hook(module, args, out, name=name):
            if name not in seen and args and isinstance(args[0], Tensor):
                seen[name] = (args[0].detach().float().cpu(), out.detach().float().cpu())
        hooks.append(nets[name].register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def generator_calls(method: Any, nets: dict[str, nn.Module], fixed: Any
                    ) -> dict[str, tuple[Tensor, Tensor]]:
    """Each generator's first (input, output) while the method draws its sample grid, in eval
    mode, without gradients, the RNG streams untouched (as the periodic scores)."""
    names = list(method.generators)
    return periodic_eval.evaluate(
        lambda n: record_generators(n, names, lambda: method.sample(n, fixed)), nets)


def image_verdicts(generators: dict[str, dict[str, Any]], calls: dict[str, tuple[Tensor, Tensor]],
                   reference: dict[str, Tensor]) -> dict[str, list[tuple[str, health.Verdict]]]:
    """detector -> [(generator, verdict)] for every generator and detector that applies."""
    out: dict[str, list[tuple[str, health.Verdict]]] = {}
    for name, (inp, output) in calls.items():
        meta = generators.get(name, {})
        target = reference.get(str(meta.get("to", "x")).lower())
        if target is None:
            continue
        translator = "from" in meta and inp.shape == output.shape
        base = inp if translator else target  # what "normal" looks like for this generator
        found = {
            "identity": health.identity_collapse(inp, output, target) if translator else None,
            "inversion": health.colour_inversion(output, target),
            "checkerboard": health.checkerboard(output, base),
            "diversity": health.diversity(output, base),
        }
        for detector, verdict in found.items():
            if verdict is not None and math.isfinite(verdict.value):
                out.setdefault(detector, []).append((name, verdict))
    return out


@dataclass
class Monitor:
    """Streaks and logged losses of one run (main process). Its state is what the run's
    log.jsonl says up to the current step: at the first record of a start (a resume) or after
    a step goes back (a NaN rollback) it is rebuilt from the log, so a resumed run logs and
    warns as an uninterrupted one. The loss-based detectors look at the log records of the
    last `interval` steps (the window) against the earlier ones (the history): which records
    these are depends on the steps only, not on when checks happened."""

    log_path: Path
    generators: dict[str, dict[str, Any]]
    reference: dict[str, Tensor]
    objective: str
    patience: int
    interval: int  # steps between checks
    records: deque = field(default_factory=lambda: deque(maxlen=HISTORY_RECORDS))
    streaks: dict[str, list[int]] = field(default_factory=dict)  # detector -> bad steps in a row
    last_step: int | None = None
    method: Any = None  # whose sample grid the image checks watch (check_nets)

    def check_nets(self, step: int, nets: dict[str, nn.Module], fixed: Any
                   ) -> tuple[dict[str, float], list[str]]:
        """`check` on what the method's generators do while it draws its sample grid."""
        return self.check(step, generator_calls(self.method, nets, fixed))

    def observe(self, step: int, values: dict[str, Any]) -> None:
        """A log record (every log step): its losses and D outputs."""
        if self.last_step is None or step <= self.last_step:
            self._replay(step)
        self._keep(step, values)

    def _keep(self, step: int, values: dict[str, Any]) -> None:
        self.last_step = step
        # A step fp16's GradScaler skipped may log inf (as the string "inf" once in the log).
        kept = {k: float(v) for k, v in values.items()
                if isinstance(v, (int, float)) and math.isfinite(v)
                and (k.endswith("/loss") or k.startswith(("D/real", "D/fake")))}
        if kept:
            self.records.append((step, kept))

    def _replay(self, step: int) -> None:
        """Rebuilds the state from the log records before `step`, one pass over the file."""
        self.records.clear()
        self.streaks = {}
        for record in runlog.records(self.log_path):
            if record["step"] >= step:
                break
            self._keep(record["step"], record)
            logged = {d: record[KEY + d] for d in REMEDIES
                      if isinstance(record.get(KEY + d), (int, float))}
            if logged:
                self._streaks(record["step"], logged)

    def check(self, step: int, calls: dict[str, tuple[Tensor, Tensor]]
              ) -> tuple[dict[str, float], list[str]]:
        """(health/<detector> values, new warning lines) of this check."""
        found = image_verdicts(self.generators, calls, self.reference)
        window = [r for s, r in self.records if s > step - self.interval]
        history = [r for s, r in self.records if s <= step - self.interval]
        for detector, verdict in (("d_wins", health.d_wins(window, self.objective)),
                                  ("explosion", health.loss_explosion(window, history))):
            if verdict is not None:
                found[detector] = [("", verdict)]
        worst = {d: _worst(d, verdicts) for d, verdicts in found.items()}
        due = self._streaks(step, {d: v.value for d, (_, v) in worst.items()})
        warnings = [warning_line(d, self.streaks[d], worst[d][0], worst[d][1].detail)
                    for d in due]
        return {KEY + d: v.value for d, (_, v) in worst.items()}, warnings

    def _streaks(self, step: int, values: dict[str, float]) -> list[str]:
        """Streaks grow or break with a check's values. Returns the detectors whose streak has
        just reached the patience."""
        due = []
        for detector in REMEDIES:
            bad = detector in values and health.is_bad(detector, values[detector])
            streak = self.streaks[detector] = self.streaks.get(detector, []) + [step] \
                if bad else []
            if len(streak) == self.patience:
                due.append(detector)
        return due


def _worst(detector: str, verdicts: list[tuple[str, health.Verdict]]
           ) -> tuple[str, health.Verdict]:
    """The verdict of the generator that is furthest gone."""
    sign = health.THRESHOLDS[detector][0]
    return max(verdicts, key=lambda nv: sign * nv[1].value)


def warning_line(detector: str, steps: list[int], generator: str, detail: str) -> str:
    what, remedy = REMEDIES[detector]
    where = f"{generator}: " if generator else ""
    return (f"health: {what} for {len(steps)} checks in a row (steps {steps[0]}-{steps[-1]}): "
            f"{where}{detail}; {remedy}")


def build(cfg: RunConfig, method: Any, dataset: Any, main: bool) -> Monitor | None:
    """The run's monitor on the main process when train.health is on; None elsewhere."""
    if not (cfg.train.health and main):
        return None
    t = cfg.train
    return Monitor(cfg.out_dir / "log.jsonl", dict(method.generators), reference_batch(dataset),
                   str(getattr(cfg.model, "objective", "")), t.health_patience, interval(cfg),
                   method=method)
