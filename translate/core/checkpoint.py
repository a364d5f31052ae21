"""Checkpoints that continue a run bit for bit, written so that a kill at any moment leaves the
previous checkpoint intact.

Layout of `RUN/checkpoints/step_0001000/`:
  model*.safetensors, optimizer*.bin, random_states_<rank>.pkl   accelerator.save_state
  state.json          step, batches drawn, LR scale, net names, recipe fingerprint (main process)
  ema.safetensors     EMA generators (main process; identical on every rank)
  rank<r>.safetensors the method's per-process state, e.g. CycleGAN's image pools

Everything is written into `.tmp-step_*` and renamed when complete; folders without state.json or
with a leading dot are never taken for a checkpoint. accelerate loads its .bin/.pkl files with
torch.load(weights_only=True); our own files are safetensors and JSON, so loading a checkpoint
never unpickles arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from translate.errors import UserError

STEP_DIR = re.compile(r"^step_(\d{7,})$")


@dataclass
class TrainState:
    step: int = 0              # generator steps done
    batches: int = 0           # batches drawn from the loader (data position)
    lr_scale: float = 1.0      # lowered by NaN rollbacks
    fingerprint: str = ""      # of method + model config: resuming another recipe is refused


def fingerprint(method: str, model_cfg: object) -> str:
    text = json.dumps({"method": method, "model": asdict(model_cfg)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest complete checkpoint or None; otherwise a checkpoint folder or a run."""
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise UserError(f"{path}: no complete checkpoint there; pass a run folder or checkpoints/step_N")


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
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        rank = accelerator.process_index
        save_file({k: v.contiguous().cpu() for k, v in method_state.items()} or {"_": torch.zeros(0)},
                  str(tmp / f"rank{rank}.safetensors"))
        if accelerator.is_main_process:
            if ema:
                save_file(_module_tensors(ema), str(tmp / "ema.safetensors"))
            (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _fsync_tree(tmp)
            if final.exists():  # a re-save of the same step (e.g. after a rollback)
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else \
            "no earlier checkpoint exists"
        raise UserError(
            f"{tmp.parent}: could not write checkpoint step {state.step} ({e.strerror or e}); "
            f"{kept}; free disk space or fix permissions, then resume with --resume auto"
        ) from None
    accelerator.wait_for_everyone()
    return final


def load(
    accelerator: Accelerator,
    path: Path,
    expected_fingerprint: str,
    ema: dict[str, nn.Module],
) -> tuple[TrainState, dict[str, Tensor]]:
    """Collective. Restores nets, optimizers, RNG (via accelerate), EMA; returns the train state
    and this process's method state (empty if the checkpoint has none for this rank)."""
    try:
        state = TrainState(**json.loads((path / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}/state.json: unreadable checkpoint state ({e}); "
                        "resume from another checkpoint") from None
    if state.fingerprint != expected_fingerprint:
        raise UserError(
            f"{path}: checkpoint was made by a different recipe (method or model settings "
            "differ); resume with the recipe that made it, or start a new run folder"
        )
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
    except (OSError, RuntimeError, SafetensorError, KeyError) as e:
        raise UserError(f"{path}: checkpoint cannot be loaded ({str(e).splitlines()[0]}); "
                        "resume from another checkpoint or start a new run folder") from None
    method_state.pop("_", None)
    return state, method_state
