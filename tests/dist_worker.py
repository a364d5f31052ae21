"""`cli.py` for the distributed tests: the same command line, run under `accelerate launch` or
`torchrun`, after which every rank writes what the tests compare across ranks.

    accelerate launch ... tests/dist_worker.py DUMP_DIR train RECIPE [cli.py train options]

DUMP_DIR/rank<r>.safetensors  this rank's weights (unwrapped) and optimizer state after training;
                              the checkpoint holds only the main process's copy
DUMP_DIR/rank<r>.json         {"rank", "world", "phases", "stray_grads"}: stray_grads lists every
                              (step, phase, net) that still held a .grad after a phase's optimizer
                              step, i.e. a gradient that would leak into a later step

The loop itself is not changed: `setup` and `run_phase` are only wrapped to observe them.
DIST_WORKER_STALE_RANK=r hides the newest checkpoint from rank r's folder listing, as a lagging
shared file system would, to check that every rank resumes from the main process's choice.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch
from safetensors.torch import save_file

import cli
from translate.core import checkpoint, loop

sessions: list[loop.Session] = []
phases_run: list[int] = [0]
stray: list[list] = []
_setup, _run_phase = loop.setup, loop.run_phase


def _observed_setup(cfg):
    s = _setup(cfg)
    sessions.append(s)
    return s


def _observed_run_phase(accelerator, cfg, phase, opt, nets, batch, prev):
    out = _run_phase(accelerator, cfg, phase, opt, nets, batch, prev)
    phases_run[0] += 1
    for name, net in nets.items():
        if any(p.grad is not None for p in net.parameters()):
            stray.append([phases_run[0], phase.name, name])
    return out


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
    if os.environ.get("DIST_WORKER_STALE_RANK", "-") == os.environ.get("RANK"):
        listing = checkpoint.list_checkpoints
        checkpoint.list_checkpoints = lambda run_dir: listing(run_dir)[:-1]
    code = cli.main(argv)
    if code != 0:
        return code
    s = sessions[-1]
    rank, world = s.accelerator.process_index, s.accelerator.num_processes
    dump.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(s), str(dump / f"rank{rank}.safetensors"))
    report = {"rank": rank, "world": world, "phases": phases_run[0], "stray_grads": stray}
    (dump / f"rank{rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
