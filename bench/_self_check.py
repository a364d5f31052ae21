"""The bench's self-check: `translate train`, run as a user runs it, must report the speed the
bench measures in-process for the same config (fp32 and auto, 128 px batch 1). A bench that
sets up its cases differently from the CLI (as one that ran `auto` where it said fp32 did)
fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import Case

ROOT = Path(__file__).resolve().parent.parent
SELF_CHECK_TOLERANCE = 0.15  # |translate train's s/it / the bench's - 1| at most this

CLI_RATE = re.compile(r"step (\d+)(?:/\d+)?\s+([0-9.]+) it/s")  # "step 2/4  0.61 it/s"


def cli_seconds_per_step(text: str) -> float | None:
    """Seconds per step from the last `step N  X it/s` line `translate train` printed."""
    found = CLI_RATE.findall(text)
    return 1.0 / float(found[-1][1]) if found and float(found[-1][1]) > 0 else None


def self_check(work: Path, threads: int, cases: list[Case], steps: int = 10
               ) -> dict[str, Any]:
    """`translate train` on the bench's 128 px batch-1 config, fp32 and auto, in a subprocess:
    its own it/s over the last steps/2 steps (the first half is its warm-up) beside the
    bench's median. They must agree within SELF_CHECK_TOLERANCE."""
    out: dict[str, Any] = {}
    for c in cases:
        if c.group != "train128b1" or c.variant not in ("fp32", "auto") or \
                "median_s" not in c.result:
            continue
        sets = [o for o in c.spec["overrides"] if not o.startswith("run_dir=")]
        sets += [f'run_dir="{work / "selfcheck" / c.variant}"', "train.sample_every=100000",
                 "train.save_every=100000", "train.eval_every=0"]
        recipe = ROOT / "recipes" / c.spec["recipe"]
        cmd = [sys.executable, str(ROOT / "cli.py"), "train", str(recipe),
               *[a for o in sets for a in ("--set", o)], "--steps", str(steps),
               "--log-every", str(steps // 2), "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=3600, check=False)
        cli_s = cli_seconds_per_step(proc.stdout + proc.stderr)
        bench_s = c.result["median_s"]
        row: dict[str, Any] = {"bench_s": bench_s, "cli_s": cli_s}
        if cli_s is None:
            row["error"] = (proc.stderr.strip().splitlines() or ["no it/s printed"])[-1][:200]
        else:
            row.update(ratio=cli_s / bench_s, ok=abs(cli_s / bench_s - 1) <= SELF_CHECK_TOLERANCE)
        if m := re.search(r"precision (\w+)", proc.stdout + proc.stderr):
            row["cli_precision"] = m.group(1)
        out[c.variant] = row
        print(f"self-check {c.variant}: done", file=sys.stderr, flush=True)
    return out
