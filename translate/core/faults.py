"""What the training loop does when something goes wrong: a loss or weight turns NaN/Inf (stop,
or roll back to the last checkpoint at a lower learning rate), or the user asks it to stop
(Ctrl-C, SIGTERM from a scheduler). The loop reads top to bottom; the policies live here."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Self

import torch
from accelerate import Accelerator
from torch import Tensor

from translate.core import checkpoint
from translate.core.runlog import RunLog
from translate.errors import UserError

MAX_ROLLBACKS = 3  # per run; each one halves the learning rates, so 1/8 of the recipe's at most
# fp16's GradScaler skips an optimizer step whose gradients overflowed and halves its scale: the
# loop logs "<phase>/skipped" (1.0 for that step) and the scale itself.
SKIPPED = "skipped"
LOSS_SCALE = "loss_scale"
MIN_LOSS_SCALE = 1e-4  # fairseq's --min-loss-scale: under it, step after step has overflowed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Diverged(UserError):
    """A loss or a weight became NaN/Inf. `what` names the step, phase and value. Every rank
    decides alike: it checks global means, and DDP keeps the weights equal."""

    same_on_every_rank = True

    def __init__(self, what: str, hint: str) -> None:
        super().__init__(f"{what}; {hint}")
        self.what = what


class Interrupted(UserError):
    """The run stopped on request after saving; the exit code is the shell's 128 + signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def check_finite(logs: dict[str, Tensor], step: int) -> None:
    """Stop on a NaN/Inf logged value. Under fp16, a phase whose step the GradScaler skipped
    is not checked: its gradient-derived values (a penalty's input gradient, grad_norm)
    overflowed, and the scaler threw the step away and lowered its scale. The scale tells
    divergence apart: once it falls under MIN_LOSS_SCALE, every step has been overflowing."""
    skipped = {k.split("/")[0] for k, v in logs.items()
               if k.endswith("/" + SKIPPED) and float(v) > 0}
    for key, v in logs.items():
        phase = key.split("/")[0]
        if phase not in skipped and not torch.isfinite(v):
            # No hint names one phase's rate: D's step is what usually blows up G's loss.
            raise Diverged(f"step {step}, phase {phase}: {key} is {float(v)}", _lower_rates())
    if LOSS_SCALE in logs and float(logs[LOSS_SCALE]) < MIN_LOSS_SCALE:
        raise Diverged(f"step {step}, phase {', '.join(sorted(skipped)) or '?'}: fp16's loss "
                       f"scale fell to {float(logs[LOSS_SCALE]):.1e} (the gradients overflowed "
                       "step after step)", _lower_rates(", or train in bf16 where the GPU has it"))


def _lower_rates(also: str = "") -> str:
    return (f"lower the learning rates (train.lr_d, train.lr_g) or set train.grad_clip{also}, "
            "then --resume auto (or set train.on_nan = \"rollback\")")


def check_weights(nets: dict[str, torch.nn.Module], ema: dict[str, torch.nn.Module],
                  phase_of: dict[str, str], step: int) -> None:
    """Refuse to checkpoint NaN weights: they would replace the last good checkpoint as the
    one `--resume auto` takes. The message names the phase that trains the first bad net
    (`phase_of`: net name -> phase name; an EMA copy counts as its generator)."""
    named = [(name, name, net) for name, net in nets.items()]
    named += [(name, f"EMA of {name}", net) for name, net in ema.items()]
    for name, what, net in named:
        if not checkpoint.all_finite({name: net}):
            phase = phase_of.get(name, "?")
            raise Diverged(f"step {step}, phase {phase}: weights of {what} contain NaN/Inf",
                           "not writing a checkpoint over the last good one; lower the "
                           "learning rates (train.lr_d, train.lr_g), then --resume auto")


def roll_back(accelerator: Accelerator, run_dir, state: checkpoint.TrainState, error: Diverged,
              ema: dict, method, log: RunLog) -> tuple[checkpoint.TrainState, object]:
    """train.on_nan = "rollback": reload the newest checkpoint and halve the learning rates.
    Returns (the restored state, its checkpoint folder). Collective: every process diverges at
    the same step (the loop only checks values that agree across processes)."""
    if state.rollbacks >= MAX_ROLLBACKS:
        raise Diverged(error.what, f"still diverging after {MAX_ROLLBACKS} rollbacks (learning "
                       f"rates at {state.lr_scale:g} x the recipe's); lower train.lr_g / "
                       "train.lr_d or set train.grad_clip, then --resume auto") from None
    path = checkpoint.resolve_on_all(accelerator, run_dir, "auto")
    if path is None:
        raise Diverged(error.what, "no checkpoint to roll back to yet") from None
    restored, method_state = checkpoint.load(accelerator, path, state.fingerprint, ema)
    method.load_state(method_state)
    # The run's own history wins over the checkpoint's: a second NaN before the next save
    # rolls back to the same checkpoint and must still lower the rate further.
    restored.lr_scale = state.lr_scale / 2
    restored.rollbacks = state.rollbacks + 1
    log.rewind(restored.step)
    log.print(f"{error.what}: rolled back to {path.name}, learning rates now "
              f"{restored.lr_scale:g} x the recipe's (rollback {restored.rollbacks} of "
              f"{MAX_ROLLBACKS})")
    return restored, path


class StopRequest:
    """Within `with StopRequest() as stop:` the first SIGINT or SIGTERM only sets a flag, which
    the loop reads between steps: it saves a checkpoint at a step boundary (a step half done
    would not resume exactly) and stops. A second signal gets the default action: exit at once.

    Handlers can only be set from the main thread; elsewhere (a notebook worker thread) the
    signals keep their usual behaviour."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)

    def requested(self, accelerator: Accelerator) -> int | None:
        """The signal that asked to stop, agreed by every process (collective when there are
        several: one scalar all-reduce per step, so no rank stops a step before another and
        leaves it waiting in a collective)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        agreed = int(accelerator.reduce(flag, "max").item())
        return agreed or None


def interrupted(signum: int, step: int, ckpt, again: str) -> Interrupted:
    """`again`: the exact command (or call) that continues the run."""
    name = signal.Signals(signum).name
    where = f"checkpoint {ckpt}" if ckpt is not None else "no checkpoint (step 0)"
    return Interrupted(f"stopped by {name} at step {step}; {where}; continue with: {again}",
                       signum)
