"""`cli.py` for the distributed tests: the same command line, run under `accelerate launch` or
`torchrun`, after which every rank writes what the tests compare across ranks.

    accelerate launch ... tests/dist_worker.py DUMP_DIR train RECIPE [cli.py train options]

DUMP_DIR/rank<r>.safetensors  this rank's weights (unwrapped) and optimizer state after training;
                              the checkpoint holds only the main process's copy
DUMP_DIR/rank<r>.json         {"rank", "world", "phases", "stray_grads", "events", "writes",
                              "rng"}:
  stray_grads  every (step, phase, net) that still held a .grad after a phase's optimizer step,
               i.e. a gradient that would leak into a later step
  events       in call order: "step" (a training step and its bookkeeping ended),
               "wait_for_everyone", "end_training" (Accelerator methods)
  writes       every [kind, absolute path] this process changed on disk during the command:
               "open" (for writing), "rename" (destination), "mkdir", "remove", "rmtree",
               "chmod", "save" (torch.save / safetensors' save_file, which open files in
               C++/Rust where Python's audit hooks do not see them)
  rng          sha256 of the torch RNG state the run starts from (after `_start`): the stream
               of what is not drawn per sample (dropout, image pool, DiffAugment)

The loop itself is not changed: its functions and accelerate's are only wrapped to observe them.
DIST_WORKER_STALE_RANK=r hides the newest checkpoint from rank r's folder listing, as a lagging
shared file system would, to check that every rank resumes from the main process's choice.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import safetensors.torch
import torch

# Wrapped before accelerate and translate import them (`from safetensors.torch import save_file`
# binds the name at import time).
writes: list[list[str]] = []
recording = [False]
_save_file, _torch_save = safetensors.torch.save_file, torch.save


def _note(kind: str, path) -> None:
    if recording[0] and isinstance(path, (str, bytes, os.PathLike)):
        writes.append([kind, os.path.abspath(os.fsdecode(path))])


def _recorded_save_file(tensors, filename, metadata=None):
    _note("save", filename)
    return _save_file(tensors, filename, metadata)


def _recorded_torch_save(obj, f, *args, **kwargs):
    _note("save", f)
    return _torch_save(obj, f, *args, **kwargs)


safetensors.torch.save_file, torch.save = _recorded_save_file, _recorded_torch_save
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = {"os.rename": "rename", "os.mkdir": "mkdir", "os.remove": "remove",
           "os.rmdir": "remove", "shutil.rmtree": "rmtree", "os.chmod": "chmod",
           "os.truncate": "open", "os.link": "rename", "os.symlink": "rename"}


def _audit(event: str, args: tuple) -> None:
    if not recording[0]:
        return
    if event == "open":
        path, mode, flags = args
        writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
            bool(flags & _WRITE_FLAGS)
        if writing:
            _note("open", path)
    elif event in _EVENTS:
        # os.rename/os.replace: (src, dst, ...); the others: (path, ...)
        _note(_EVENTS[event], args[1] if event in ("os.rename", "os.link", "os.symlink")
              else args[0])


sys.addaudithook(_audit)

from accelerate import Accelerator
from safetensors.torch import save_file

from translate import cli
from translate.core import checkpoint, loop

sessions: list[loop.Session] = []
phases_run: list[int] = [0]
stray: list[list] = []
events: list[str] = []
rng: list[str] = []
_setup, _run_phase, _run_step, _start = loop.setup, loop.run_phase, loop.run_step, loop._start


def _observed_setup(*args, **kw):
    s = _setup(*args, **kw)
    sessions.append(s)
    return s


def _observed_run_phase(accelerator, cfg, phase, opt, nets, batch, prev):
    out = _run_phase(accelerator, cfg, phase, opt, nets, batch, prev)
    phases_run[0] += 1
    for name, net in nets.items():
        if any(p.grad is not None for p in net.parameters()):
            stray.append([phases_run[0], phase.name, name])
    return out


def _observed_run_step(*args, **kwargs):
    out = _run_step(*args, **kwargs)
    events.append("step")
    return out


def _observed_start(s, resume):
    out = _start(s, resume)
    rng.append(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest())
    return out


def _event(name: str, method):
    def observed(self, *args, **kwargs):
        events.append(name)
        return method(self, *args, **kwargs)

    return observed


def _tensors(s: loop.Session) -> dict[str, torch.Tensor]:
    out = {}
    for name, net in s.nets.items():
        for k, v in s.accelerator.unwrap_model(net).state_dict().items():
            out[f"{name}/{k}"] = v.detach().float().cpu().contiguous()
    for i, opt in enumerate(s.opts):
        for p, slots in opt.state_dict()["state"].items():
            for k, v in slots.items():
                if torch.is_tensor(v):
                    out[f"opt{i}/{p}/{k}"] = v.detach().float().cpu().reshape(-1).contiguous()
    return out


def main() -> int:
    dump, argv = Path(sys.argv[1]), sys.argv[2:]
    loop.setup, loop.run_phase = _observed_setup, _observed_run_phase
    loop.run_step, loop._start = _observed_run_step, _observed_start
    for name in ("wait_for_everyone", "end_training"):
        setattr(Accelerator, name, _event(name, getattr(Accelerator, name)))
    if os.environ.get("DIST_WORKER_STALE_RANK", "-") == os.environ.get("RANK"):
        listing = checkpoint.list_checkpoints
        checkpoint.list_checkpoints = lambda run_dir: listing(run_dir)[:-1]
    recording[0] = True
    code = cli.main(argv)
    recording[0] = False
    if code != 0:
        return code
    s = sessions[-1]
    rank, world = s.accelerator.process_index, s.accelerator.num_processes
    dump.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(s), str(dump / f"rank{rank}.safetensors"))
    report = {"rank": rank, "world": world, "phases": phases_run[0], "stray_grads": stray,
              "events": events, "writes": writes, "rng": rng}
    (dump / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    cli.leave(main())  # as the translate command ends a rank (see cli.leave)
