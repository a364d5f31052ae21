"""The bench's self-check: `translate train`, run as a user runs it, must report the speed the
bench measures in-process for the same config (fp32 and auto, 128 px batch 1). A bench that
sets up its cases differently from the CLI (as one that ran `auto` where it said fp32 did)
fails here.

The bench's figure for the check is measured again around the CLI run (steps of the case's own
child just before and just after it), not taken from the table: on a machine whose speed drifts
by minutes (a 2-core EPYC VM, session 13: the same fp32 step took 4.2 s in one window and 6.2 s
in another) a figure from minutes earlier compares windows, not code paths."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from _paired import Case, ChildError, Worker

ROOT = Path(__file__).resolve().parent.parent
SELF_CHECK_TOLERANCE = 0.15  # |translate train's s/it / the bench's - 1| at most this

WARMUP_STEPS = 2  # steps of translate train left out of its median, as the bench leaves them
BRACKET_STEPS = 3  # bench steps timed just before and again just after the CLI run


def agrees(cli_s: float, bench_s: float) -> bool:
    """translate train's s/it within SELF_CHECK_TOLERANCE of the bench's."""
    return abs(cli_s / bench_s - 1) <= SELF_CHECK_TOLERANCE


def train_command(recipe: Path, sets: list[str], steps: int, prefix: tuple[str, ...] = ()
                  ) -> list[str]:
    """`translate train RECIPE --set ...` for WARMUP_STEPS + `steps` steps, one log record a
    step (what cli_seconds_per_step reads); `prefix` goes between python and cli.py (e.g.
    -m cProfile -o PATH)."""
    return [sys.executable, *prefix, str(ROOT / "cli.py"), "train", str(recipe),
            *[a for o in sets for a in ("--set", o)], "--steps", str(steps + WARMUP_STEPS),
            "--log-every", "1", "--no-progress"]


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


def self_check(work: Path, threads: int, cases: list[Case], script: Path, timeout: float,
               steps: int = 10) -> dict[str, Any]:
    """`translate train` on the bench's 128 px batch-1 config, fp32 and auto, in a subprocess:
    the median of its own per-step rates (log.jsonl) beside the median of the bench's steps of
    the same case timed around it (BRACKET_STEPS before, as many after, in a live child of the
    case). They must agree within SELF_CHECK_TOLERANCE. `table_s`: the case's figure in the
    table, measured earlier."""
    out: dict[str, Any] = {}
    for c in cases:
        if c.group != "train128b1" or c.variant not in ("fp32", "auto") or \
                "median_s" not in c.result:
            continue
        row: dict[str, Any] = {"table_s": c.result["median_s"]}
        try:
            row.update(_bracketed(c, work, threads, script, timeout, steps))
        except ChildError as e:
            row["error"] = f"the bench's child failed: {e}"
        out[c.variant] = row
        print(f"self-check {c.variant}: done", file=sys.stderr, flush=True)
    return out


def _bracketed(c: Case, work: Path, threads: int, script: Path, timeout: float, steps: int
               ) -> dict[str, Any]:
    """The bench's steps of case c timed just before and just after `translate train` runs
    the same config, and the CLI's own median."""
    worker = Worker(script, c.kind, c.spec, work / f"selfcheck_{c.variant}.log", timeout)
    try:
        times = [worker.step()[0] for _ in range(BRACKET_STEPS)]
        cli_s, proc = _cli_run(c, work, threads, steps)
        times += [worker.step()[0] for _ in range(BRACKET_STEPS)]
        worker.close()
    finally:
        worker.kill()
    row: dict[str, Any] = {"bench_s": statistics.median(times), "bench_times": times,
                           "cli_s": cli_s}
    if cli_s is None:
        last = (proc.stderr.strip().splitlines() or ["no log.jsonl"])[-1][:200]
        row["error"] = f"translate train failed: {last}"
    else:
        row.update(ratio=cli_s / row["bench_s"], ok=agrees(cli_s, row["bench_s"]))
    if m := re.search(r"precision (\w+)", proc.stdout + proc.stderr):
        row["cli_precision"] = m.group(1)
    return row


def _cli_run(c: Case, work: Path, threads: int, steps: int
             ) -> tuple[float | None, subprocess.CompletedProcess]:
    """`translate train` on case c's recipe and overrides for WARMUP_STEPS + `steps` steps:
    (its median s/step, the finished process)."""
    run_dir = work / "selfcheck" / c.variant
    sets = [o for o in c.spec["overrides"] if not o.startswith("run_dir=")]
    sets += [f'run_dir="{run_dir}"', "train.sample_every=100000",
             "train.save_every=100000", "train.eval_every=0"]
    cmd = train_command(ROOT / "recipes" / c.spec["recipe"], sets, steps)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=3600, check=False)
    return cli_seconds_per_step(run_dir / "log.jsonl"), proc
