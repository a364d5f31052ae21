"""The worker processes of bench/demo_ablation.py: each (variant, steps, seed) run trains in a
process of its own with one thread, n at a time; a finished run is read back from its
ablation.json, and a run another invocation is training is waited for, not trained twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve().parent / "demo_ablation.py"  # what each worker runs


def run_name(variant: str, steps: int, seed: int) -> str:
    return f"{variant}-{steps}-s{seed}"


def launch(job: tuple[str, int, int], runs: Path, data_root: Path) -> subprocess.Popen:
    variant, steps, seed = job
    run_dir = runs / run_name(variant, steps, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, str(SCRIPT), "--worker", variant, "--steps",
           str(steps), "--seeds", str(seed), "--root", str(data_root), "--runs", str(runs)]
    with (run_dir / "worker.log").open("a") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    (run_dir / "worker.pid").write_text(f"{proc.pid}\n")
    return proc


def busy_elsewhere(job: tuple[str, int, int], runs: Path) -> bool:
    """True while another invocation's worker trains this run (its worker.pid is alive), so a
    second invocation on the same --runs waits for it instead of training it twice."""
    try:
        pid = int((runs / run_name(*job) / "worker.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return b"demo_ablation" in cmdline and b"--worker" in cmdline


def finished(job: tuple[str, int, int], runs: Path) -> dict[str, Any] | None:
    path = runs / run_name(*job) / "ablation.json"
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if found.get("steps") == job[1] else None


def run_all(jobs: list[tuple[str, int, int]], runs: Path, data_root: Path, n_parallel: int
            ) -> list[dict[str, Any]]:
    """Every job's result: saved ones as they are, the rest trained `n_parallel` at a time
    (runs that another invocation is training count against the limit and are waited for)."""
    pending = [j for j in jobs if finished(j, runs) is None]
    running: dict[tuple[str, int, int], subprocess.Popen] = {}
    while True:
        pending = [j for j in pending if finished(j, runs) is None]
        elsewhere = [j for j in pending if busy_elsewhere(j, runs)]
        free = n_parallel - len(running) - len(elsewhere)
        for job in [j for j in pending if j not in elsewhere][:max(free, 0)]:
            pending.remove(job)
            print(f"training {run_name(*job)} ...", file=sys.stderr, flush=True)
            running[job] = launch(job, runs, data_root)
        if not running and not elsewhere:
            break
        time.sleep(2)
        for job, proc in list(running.items()):
            if proc.poll() is not None:
                del running[job]
                (runs / run_name(*job) / "worker.pid").unlink(missing_ok=True)
                print(f"{run_name(*job)}: {'FAILED' if proc.returncode else 'done'} "
                      f"(log: {runs / run_name(*job) / 'worker.log'})", file=sys.stderr,
                      flush=True)
    return [r for j in jobs if (r := finished(j, runs)) is not None]
