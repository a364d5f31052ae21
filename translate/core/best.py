"""The best checkpoint by a score (train.keep_best = "eval/psnr", "eval/kid", ...), kept in
`RUN/checkpoints/best/step_N/` beside the rolling checkpoints, for `translate export --best`.

It holds what export, eval and sample read (each net's weights under accelerate's file names,
the EMA weights, state.json) plus best.json (metric, value, step); no optimizer or RNG state, so
it is written by the main process alone (the score exists only there) and cannot be resumed
from: the rolling checkpoints are for that. Written like them: into `.tmp-step_N`, fsync-ed,
renamed; only then is the previous best removed. A kill at any moment leaves the previous best
or the new one complete and visible (and perhaps both, until the next save); readers take the
best score among the complete ones.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from translate.core import checkpoint
from translate.errors import UserError

# Score -> +1 where higher is better, -1 where lower is better.
DIRECTIONS: dict[str, int] = {
    "eval/psnr": 1, "eval/ssim": 1, "eval/modes": 1, "eval/hq": 1,
    "eval/kid": -1, "eval/fid": -1, "eval/rkl": -1,
}
RECORD = checkpoint.BEST_RECORD


def root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints" / "best"


def is_better(metric: str, value: float, than: float | None) -> bool:
    if not math.isfinite(value):
        return False
    return than is None or DIRECTIONS[metric] * (value - than) > 0


def _record(path: Path) -> dict | None:
    try:
        record = json.loads((path / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and (path / "state.json").is_file() else None


def find(run_dir: Path) -> tuple[Path, dict] | None:
    """(folder, best.json) of the run's best checkpoint, or None."""
    folder = root(run_dir)
    if not folder.is_dir():
        return None
    found = [(p, r) for p in folder.iterdir() if checkpoint.STEP_DIR.match(p.name)
             and (r := _record(p)) is not None and r.get("metric") in DIRECTIONS]
    if not found:
        return None
    return max(found, key=lambda pr: (DIRECTIONS[pr[1]["metric"]] * pr[1]["value"],
                                      pr[1]["step"]))


def require(run_dir: Path) -> Path:
    """The best checkpoint's folder, or a one-line error saying how to get one."""
    found = find(run_dir)
    if found is None:
        raise UserError(f"{run_dir}: no best checkpoint (checkpoints/best); train with "
                        "train.keep_best = \"eval/psnr\" (or eval/kid, ...) and "
                        "train.eval_every > 0")
    return found[0]


def save(accelerator: Accelerator, run_dir: Path, state: checkpoint.TrainState,
         nets: dict[str, nn.Module], ema: dict[str, nn.Module], metric: str, value: float
         ) -> Path:
    """Main process only. Writes checkpoints/best/step_N and then removes the older bests."""
    folder = root(run_dir)
    final = folder / f"step_{state.step:07d}"
    tmp = final.with_name(".tmp-" + final.name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for p in folder.iterdir():  # what a killed save left
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)
        tmp.mkdir()
        for i, net in enumerate(nets.values()):
            tensors = {k: v.detach().contiguous().cpu()
                       for k, v in accelerator.unwrap_model(net).state_dict().items()}
            save_file(tensors, str(tmp / ("model.safetensors" if i == 0 else
                                          f"model_{i}.safetensors")))
        if ema:
            save_file(checkpoint._module_tensors(ema), str(tmp / "ema.safetensors"))
        checkpoint._test_delay()
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        (tmp / RECORD).write_text(json.dumps({"metric": metric, "value": value,
                                              "step": state.step}, indent=2))
        checkpoint.apply_umask([p for p in tmp.iterdir() if p.is_file()])
        checkpoint._fsync_tree(tmp)
        if final.exists():  # the same step again (a resumed run)
            checkpoint._discard(final)
        tmp.rename(final)
        checkpoint._fsync_dir(folder)
        for old in folder.iterdir():
            if old != final and checkpoint.STEP_DIR.match(old.name):
                checkpoint._discard(old)
    except (OSError, SafetensorError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise UserError(f"{folder}: could not write the best checkpoint of step {state.step} "
                        f"({reason}); the previous best is intact; {checkpoint.fix_for(e)}, "
                        "then resume with --resume auto") from None
    return final


class Keeper:
    """The score to beat, and the save when a periodic evaluation beats it (main process)."""

    def __init__(self, metric: str, value: float | None) -> None:
        self.metric = metric
        self.value = value

    def offer(self, accelerator: Accelerator, run_dir: Path, state: checkpoint.TrainState,
              nets: dict[str, nn.Module], ema: dict[str, nn.Module], scores: dict[str, float]
              ) -> Path | None:
        """Save checkpoints/best when `scores` beat the best so far; the folder, or None."""
        value = scores.get(self.metric)
        if value is None or not is_better(self.metric, value, self.value):
            return None
        path = save(accelerator, run_dir, state, nets, ema, self.metric, value)
        self.value = value
        return path


def keeper(metric: str, run_dir: Path, start_step: int, main: bool) -> Keeper | None:
    """A Keeper for train.keep_best on the main process. An existing best counts only if it
    is from before the start step (a resume); a fresh start in an old folder replaces it."""
    if not metric or not main:
        return None
    found = find(run_dir)
    old = found[1] if found and found[1]["metric"] == metric and \
        found[1]["step"] <= start_step else None
    return Keeper(metric, old["value"] if old else None)
