"""What a run writes besides checkpoints: log.jsonl, sample PNGs, and the live terminal view."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

from translate import files

if TYPE_CHECKING:
    from translate.core.tracking import Trackers


# Prefix of the keys that describe the run's shape (processes, global batch), logged in the first
# record of each start: facts about the run, not curves or per-step values.
RUN_SHAPE = "run/"


def format_logs(values: dict[str, float], limit: int = 6) -> str:
    # Losses first, then the periodic scores (they come rarely and matter most), then the rest;
    # not the run's shape (run/...), which the start line already printed.
    rank = {k: 0 if k.endswith("/loss") else 1 if k.startswith("eval/") else 2 for k in values}
    keys = sorted((k for k in values if not k.startswith(RUN_SHAPE)), key=lambda k: rank[k])
    return "  ".join(f"{k} {values[k]:.3g}" for k in keys[:limit])


def _record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class _TrainBar(Progress):
    """Step count, bar, rate, elapsed time and ETA on one line, the latest losses on the next:
    the first line fits 80 columns (the bar shrinks), the losses are cut to the width."""

    def __init__(self, console: Console):
        fixed = Column(no_wrap=True)  # never shortened: only the bar gives way
        super().__init__(
            TextColumn("[bold]step", table_column=fixed), MofNCompleteColumn(table_column=fixed),
            BarColumn(bar_width=None), TextColumn("{task.fields[rate]}", table_column=fixed),
            TimeElapsedColumn(table_column=fixed), TextColumn("eta", table_column=fixed),
            TimeRemainingColumn(table_column=fixed), console=console, transient=False)

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            if task.fields.get("logs"):
                yield Text(task.fields["logs"], no_wrap=True, overflow="ellipsis")


def records(path: Path) -> list[dict]:
    """The readable records of a log.jsonl (a line cut short by a kill is left out)."""
    if not Path(path).is_file():
        return []
    lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    return [r for line in lines if (r := _record(line)) is not None and "step" in r]


class RunLog:
    """Main-process only (the loop creates it with enabled=False elsewhere)."""

    def __init__(self, run_dir: Path, enabled: bool, total: int, start: int, progress: bool,
                 trackers: Trackers | None = None):
        self.enabled = enabled
        self.trackers = trackers  # get the same scalars and sample grids as the files
        self.path = Path(run_dir) / "log.jsonl"
        self.samples = Path(run_dir) / "samples"
        self.console = Console(stderr=True, soft_wrap=True)
        self.live = progress and enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = (start, self.t0)
        self.bar: Progress | None = None
        if not enabled:
            return
        self._truncate_after(start)
        self.total, self.start = total, start
        if self.live:
            self.bar = _TrainBar(console=self.console)
            self.task = self.bar.add_task("train", total=total, completed=start, rate="", logs="")
            self.bar.start()

    def _truncate_after(self, step: int) -> None:
        # A resumed run rewrites history from its checkpoint on; drop lines logged after it,
        # and a last line cut short by a killed process. Rewritten atomically: a kill now must
        # not cost the whole log.
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if (record := _record(line)) is not None and record.get("step", 0) <= step]
        files.write_text(self.path, "".join(line + "\n" for line in kept))

    def rewind(self, step: int) -> None:
        """Continue from `step` again (a NaN rollback): later lines are dropped."""
        if self.enabled:
            self._truncate_after(step)
        self.last = (step, time.perf_counter())
        self.advance(step)

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, highlight=False)

    def advance(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step)

    def log(self, step: int, values: dict[str, float], warnings: list[str] = ()) -> None:
        """One record of scalars; `warnings` (lines of text) go into the record under
        "warnings" and to the terminal, not to the trackers (scalars only)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (step - self.last[0]) / max(now - self.last[1], 1e-9)
        self.last = (step, now)
        record = {"step": step, "time": round(now - self.t0, 3), "it_s": round(rate, 4)}
        record.update({k: (v if math.isfinite(v) else str(v)) for k, v in values.items()})
        if warnings:
            record["warnings"] = list(warnings)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(step, {"time": record["time"], "it_s": record["it_s"], **values})
        if self.bar is not None:
            self.bar.update(self.task, completed=step, rate=f"{rate:.2f} it/s",
                            logs=format_logs(values, 4))
        else:
            self.print(f"step {step}/{self.total}  {rate:.2f} it/s  eta {self._eta(step, now)}  "
                       f"{format_logs(values)}")
        for line in warnings:
            self.print(f"warning: {line}")

    def _eta(self, step: int, now: float) -> str:
        """h:mm:ss left at the mean rate of this start (setup time included, so it errs long)."""
        done = step - self.start
        if done <= 0:
            return "-:--:--"
        left = round((self.total - step) * (now - self.t0) / done)
        return f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"

    def sample(self, step: int, image: np.ndarray) -> Path | None:
        if not self.enabled:
            return None
        self.samples.mkdir(parents=True, exist_ok=True)
        path = self.samples / f"step_{step:07d}.png"
        with files.atomic_path(path) as tmp:
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(tmp, "PNG")
        if self.trackers is not None:
            self.trackers.image(step, image)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
