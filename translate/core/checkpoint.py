"""Checkpoints that continue a run bit for bit, written so that a kill at any moment leaves the
previous checkpoint intact.

Layout of `RUN/checkpoints/step_0001000/`:
  model*.safetensors, optimizer*.bin, random_states_<rank>.pkl   accelerator.save_state
  state.json          step, batches drawn, LR scale, net names, recipe fingerprint (main process)
  ema.safetensors     EMA generators (main process; identical on every rank)
  rank<r>.safetensors the method's per-process state, e.g. CycleGAN's image pools

Everything is written into `.tmp-step_*` and renamed when complete; a checkpoint that is
replaced or pruned is first renamed to `.old-step_*`. Folders without state.json or with a
leading dot are never taken for a checkpoint, so a kill at any moment leaves every checkpoint
either complete or invisible (the next save clears the leftovers).

accelerate loads its .bin/.pkl files with torch.load(weights_only=True), which builds tensors
and plain containers only; `load` first reads each of them that way itself, so a file that is
not plain data is refused with its name (accelerate would silently skip a bad RNG file, and
the resume would not be exact). Our own files are safetensors and JSON. Loading a checkpoint
never unpickles arbitrary objects.

Files get the permissions the user's umask gives (safetensors writes 0600 files otherwise),
never world-writable, even at umask 000.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from accelerate.utils import load as accelerate_load
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from translate.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{7,})$")
BEST_RECORD = "best.json"  # marks checkpoints/best/step_N (translate/core/best.py)


@dataclass
class TrainState:
    step: int = 0              # generator steps done
    batches: int = 0           # batches drawn from the loader (data position)
    lr_scale: float = 1.0      # lowered by NaN rollbacks
    fingerprint: str = ""      # of method + model config: resuming another recipe is refused
    rollbacks: int = 0         # NaN rollbacks so far (train.on_nan = "rollback")
    precision: str = ""        # the precision it trained in (auto resolved); "" = not recorded
    global_batch: int = 0      # per-process batch x processes x accumulation; 0 = not recorded


def fingerprint(method: str, model_cfg: object) -> str:
    """A hash of the method and its model settings. A key that the config class lists in
    NEW_KEYS (added after checkpoints began to carry this hash) is left out while it holds the
    value listed there, the one that means "as before the key existed": a checkpoint made
    before an upgrade added a key still resumes after it."""
    new = getattr(type(model_cfg), "NEW_KEYS", {})
    model = {k: v for k, v in asdict(model_cfg).items() if k not in new or v != new[k]}
    text = json.dumps({"method": method, "model": model}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=step_of)


# --resume values that look in the run folder itself; "auto-or-new" lets a run start when there
# is no checkpoint, where "auto" refuses (a mistyped --run-dir must not train from scratch).
AUTO = ("auto", "auto-or-new")


def resolve(run_dir: Path, resume: str) -> Path | None:
    """`auto`/`auto-or-new`: the newest complete checkpoint or None; otherwise a checkpoint
    folder or a run folder."""
    if resume in AUTO:
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / BEST_RECORD).is_file():
        raise UserError(f"{path}: the best checkpoint (train.keep_best) holds the weights only, "
                        "no optimizer or random states; resume from the run's rolling "
                        "checkpoints (--resume auto), or use it with export/eval --best")
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(f"{path}: no complete checkpoint there; pass a run folder or checkpoints/step_N")


def run_of(ckpt: Path) -> Path | None:
    """The run folder of a checkpoint folder (RUN/checkpoints/step_N), if it lies in one."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def step_of(ckpt: Path) -> int:
    return int(STEP_DIR.match(ckpt.name).group(1)) if STEP_DIR.match(ckpt.name) else -1


def resolve_on_all(accelerator: Accelerator, run_dir: Path, resume: str) -> Path | None:
    """Collective `resolve`: every process checks the request, then all take the main
    process's answer, so no rank resumes from another checkpoint because its view of a shared
    file system lags (a save in flight, NFS attribute caching)."""
    path = resolve(run_dir, resume)
    if accelerator.num_processes > 1:
        path = broadcast_object_list([path])[0]
    return path


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process umask, read without changing it (os.umask can only set it, which would
    race with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of a new output file: what a plain open() gives (0666 minus the umask), minus
    o+w, so that no output is world-writable even at umask 000."""
    return 0o666 & ~(umask() | 0o002)


def apply_umask(paths: list[Path]) -> None:
    """Give files the mode of `file_mode`. Never wider."""
    mode = file_mode()
    for p in paths:
        os.chmod(p, mode)


# What to do when the run folder cannot be written, by errno (others: `fix_for`'s default).
_SAVE_FIXES = {
    errno.ENOSPC: "free disk space",
    errno.EDQUOT: "free disk space (or raise your quota)",
    errno.EROFS: "the file system is read-only: remount it read-write, or copy the run folder to "
                 "a writable disk and pass that as --run-dir",
    errno.EACCES: "make that folder writable for this user (chmod/chown)",
    errno.EPERM: "make that folder writable for this user (chmod/chown)",
}


def fix_for(e: BaseException) -> str:
    """What the user can do about a failed write into the run folder."""
    return _SAVE_FIXES.get(getattr(e, "errno", None), "free disk space or fix permissions")


def _discard(path: Path) -> None:
    """Remove a checkpoint folder so that no kill leaves it half deleted under its name."""
    hidden = path.with_name(".old-" + path.name)
    os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def _clear_leftovers(root: Path) -> None:
    """Folders of saves and deletions that a killed process did not finish."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-step_", ".old-step_")) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _test_delay() -> None:
    # Tests only: hold a save open so that a test can kill the process mid-checkpoint.
    delay = float(os.environ.get("TRANSLATE_TEST_SLOW_SAVE", "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _module_tensors(nets: dict[str, nn.Module]) -> dict[str, Tensor]:
    return {
        f"{name}/{k}": v.detach().contiguous().cpu()
        for name, net in nets.items()
        for k, v in net.state_dict().items()
    }


def all_finite(nets: dict[str, nn.Module]) -> bool:
    return all(torch.isfinite(p).all() for net in nets.values() for p in net.parameters())


def save(
    accelerator: Accelerator,
    run_dir: Path,
    state: TrainState,
    ema: dict[str, nn.Module],
    method_state: dict[str, Tensor],
    keep: int,
) -> Path:
    """Collective: every process calls it. Returns the final checkpoint folder."""
    final = step_dir(run_dir, state.step)
    tmp = final.with_name(".tmp-" + final.name)
    try:
        if accelerator.is_main_process:
            _clear_leftovers(final.parent)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        rank = accelerator.process_index
        save_file({k: v.contiguous().cpu() for k, v in method_state.items()} or {"_": torch.zeros(0)},
                  str(tmp / f"rank{rank}.safetensors"))
        if accelerator.is_main_process:
            if ema:
                save_file(_module_tensors(ema), str(tmp / "ema.safetensors"))
            _test_delay()
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            apply_umask([p for p in tmp.iterdir() if p.is_file()])
            _fsync_tree(tmp)
            if final.exists():  # a re-save of the same step
                _discard(final)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            # The one just written is never pruned, so the checkpoint a run reports exists.
            others = [p for p in list_checkpoints(run_dir) if p != final]
            for old in others[:max(0, len(others) - (keep - 1))]:
                _discard(old)
    except (OSError, SafetensorError, RuntimeError) as e:
        # safetensors and torch.save report a full disk as their own error types.
        reason = e.strerror if isinstance(e, OSError) and e.strerror else \
            (str(e).strip().splitlines() or [type(e).__name__])[0]
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else \
            "no earlier checkpoint exists"
        fix = fix_for(e)
        raise UserError(
            f"{tmp.parent}: could not write checkpoint step {state.step} ({reason}); "
            f"{kept}; {fix}, then resume with --resume auto"
        ) from None
    accelerator.wait_for_everyone()
    return final


def _check_pickles(path: Path, rank: int) -> None:
    """Read every pickle-format file this process will load the way accelerate does
    (weights_only: tensors and plain containers, no code), so a bad one is named here."""
    rng = path / f"random_states_{rank}.pkl"
    if not rng.is_file():
        raise UserError(f"{rng}: missing, so the resume would not repeat the run's random "
                        "numbers; resume from another checkpoint")
    scaler = [path / "scaler.pt"] if (path / "scaler.pt").is_file() else []  # fp16's GradScaler
    for f in sorted(path.glob("*.bin")) + [rng] + scaler:
        try:
            with warnings.catch_warnings():  # torch's notes about pickle protocols of bad files
                warnings.simplefilter("ignore")
                accelerate_load(f, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - torch raises several types for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{f}: not a plain tensor file ({type(e).__name__}: {first[:120]}); "
                            "it was not executed; resume from another checkpoint") from None


def read_state(path: Path, expected_fingerprint: str | None) -> TrainState:
    """A checkpoint's state.json, refused when another recipe (method or model) made it
    (not checked when `expected_fingerprint` is None)."""
    try:
        state = TrainState(**json.loads((path / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}/state.json: unreadable checkpoint state ({e}); "
                        "resume from another checkpoint") from None
    if expected_fingerprint is not None and state.fingerprint != expected_fingerprint:
        raise UserError(
            f"{path}: checkpoint was made by a different recipe (method or model settings "
            "differ); resume with the recipe that made it, or start a new run folder"
        )
    return state


def load(
    accelerator: Accelerator,
    path: Path,
    expected_fingerprint: str,
    ema: dict[str, nn.Module],
) -> tuple[TrainState, dict[str, Tensor]]:
    """Collective. Restores nets, optimizers, RNG (via accelerate), EMA; returns the train state
    and this process's method state (empty if the checkpoint has none for this rank)."""
    state = read_state(path, expected_fingerprint)
    _check_pickles(path, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
        if ema:
            tensors = load_file(str(path / "ema.safetensors"))
            for name, net in ema.items():
                prefix = f"{name}/"
                net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                                     if k.startswith(prefix)})
        rank_file = path / f"rank{accelerator.process_index}.safetensors"
        method_state = load_file(str(rank_file)) if rank_file.is_file() else {}
    except (OSError, RuntimeError, SafetensorError, KeyError, ValueError, EOFError,
            pickle.UnpicklingError) as e:
        raise UserError(f"{path}: checkpoint cannot be loaded ({str(e).splitlines()[0]}); "
                        "resume from another checkpoint or start a new run folder") from None
    method_state.pop("_", None)
    return state, method_state
