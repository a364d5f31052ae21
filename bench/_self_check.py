"""The bench's self-check: `translate train`, run as a user runs it, must report the speed the
bench measures in-process for the same config (fp32 and auto, 128 px batch 1). A bench that
sets up its cases differently from the CLI (as one that ran `auto` where it said fp32 did)
fails here."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _paired import Case

ROOT = Path(__file__).resolve().parent.parent
SELF_CHECK_TOLERANCE = 0.15  # |translate train's s/it / the bench's - 1| at most this

WARMUP_STEPS = 2  # steps of translate train left out of its median, as the bench leaves them


def cli_seconds_per_step(log: Path, skip: int = WARMUP_STEPS) -> float | None:
    """Median seconds per step in a run's log.jsonl after its first `skip` steps. With
    log_every 1 each record's `it_s` is one step's rate: a median of steps, like the bench's,
    that one step slowed down by another job on the machine does not move."""
    try:
        records = [json.loads(line) for line in log.read_text().splitlines()]
    except (OSError, ValueError):
        return None
    times = [1.0 / r["it_s"] for r in records if r.get("step", 0) > skip and r.get("it_s")]
    return statistics.median(times) if times else None


def self_check(work: Path, threads: int, cases: list[Case], steps: int = 10
               ) -> dict[str, Any]:
    """`translate train` on the bench's 128 px batch-1 config, fp32 and auto, in a subprocess:
    the median of its own per-step rates (log.jsonl) beside the bench's median. They must
    agree within SELF_CHECK_TOLERANCE."""
    out: dict[str, Any] = {}
    for c in cases:
        if c.group != "train128b1" or c.variant not in ("fp32", "auto") or \
                "median_s" not in c.result:
            continue
        run_dir = work / "selfcheck" / c.variant
        sets = [o for o in c.spec["overrides"] if not o.startswith("run_dir=")]
        sets += [f'run_dir="{run_dir}"', "train.sample_every=100000",
                 "train.save_every=100000", "train.eval_every=0"]
        recipe = ROOT / "recipes" / c.spec["recipe"]
        cmd = [sys.executable, str(ROOT / "cli.py"), "train", str(recipe),
               *[a for o in sets for a in ("--set", o)], "--steps", str(steps + WARMUP_STEPS),
               "--log-every", "1", "--no-progress"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=3600, check=False)
        cli_s = cli_seconds_per_step(run_dir / "log.jsonl")
        bench_s = c.result["median_s"]
        row: dict[str, Any] = {"bench_s": bench_s, "cli_s": cli_s}
        if cli_s is None:
            row["error"] = (proc.stderr.strip().splitlines() or ["no log.jsonl"])[-1][:200]
        else:
            row.update(ratio=cli_s / bench_s, ok=abs(cli_s / bench_s - 1) <= SELF_CHECK_TOLERANCE)
        if m := re.search(r"precision (\w+)", proc.stdout + proc.stderr):
            row["cli_precision"] = m.group(1)
        out[c.variant] = row
        print(f"self-check {c.variant}: done", file=sys.stderr, flush=True)
    return out
