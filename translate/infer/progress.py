"""translate_folder's progress: the bar (with its img/s column) and the tally of outcomes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from translate.infer.plan import Job


@dataclass
class Tally:
    """Outcomes, recorded by the main thread only (it is the one reading the futures)."""

    bar: Progress
    task: TaskID
    quiet: bool
    translated: int = 0
    failed: dict[int, tuple[Path, str]] = field(default_factory=dict)
    alpha_dropped: list[Job] = field(default_factory=list)  # transparent inputs, opaque outputs

    def done(self) -> None:
        self.translated += 1
        self.bar.advance(self.task)

    def fail(self, job: Job, reason: str) -> None:
        self.failed[job.index] = (job.src, reason)
        if not self.quiet:
            self.bar.console.print(reason, markup=False, highlight=False, soft_wrap=True)
        self.bar.advance(self.task)


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "-- img/s")


def progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _RateColumn(), TimeRemainingColumn(), console=console, disable=not enabled)
