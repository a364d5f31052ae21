"""translate_folder's progress: the bar (with its img/s column), the tally of outcomes, and the
run's report with its one-line summary."""

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


def _mean_rate(task: Task) -> float | None:
    """Images done (translated or failed) per second since the bar started: the summary's
    figure when none failed. Not rich's own speed, which spans only the advances it sampled:
    images finishing together (a batch, ONNX) made it read ~80,000 img/s in a run of 5 at 4.9."""
    elapsed = task.elapsed
    return task.completed / elapsed if task.completed and elapsed else None


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = _mean_rate(task)
        return Text(f"{rate:.1f} img/s" if rate else "-- img/s")


class _RemainingColumn(ProgressColumn):
    """The time left at the mean rate, h:mm:ss."""

    def render(self, task: Task) -> Text:
        rate = _mean_rate(task)
        if not rate or task.total is None:
            return Text("-:--:--")
        left = round(max(task.total - task.completed, 0) / rate)
        return Text(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")


def progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _RateColumn(), _RemainingColumn(), console=console, disable=not enabled)


@dataclass
class ApplyReport:
    """What a run did. `failed` holds (input file, one-line reason), in input order."""

    translated: int
    skipped: int  # outputs that already existed
    failed: list[tuple[Path, str]]
    seconds: float  # wall time of the whole run

    @property
    def images_per_s(self) -> float:
        return self.translated / self.seconds if self.seconds > 0 else 0.0


def summary(report: ApplyReport) -> str:
    """The run in one line: what was translated, skipped and failed, in how long (and at what
    rate, when it translated any)."""
    line = (f"translated {report.translated}, skipped {report.skipped}, failed "
            f"{len(report.failed)} in {report.seconds:.1f} s")
    return f"{line} ({_rate(report)})" if report.translated else line


def _rate(report: ApplyReport) -> str:
    """img/s, or seconds per image where that is below 1 (large images: not "0.0 img/s")."""
    rate = report.images_per_s
    return f"{rate:.1f} img/s" if rate >= 1 or rate == 0 else f"{1 / rate:.1f} s per image"
