"""Cases measured in live subprocesses side by side (bench/speed.py): a child per case, the
group's fp32 baseline kept alive and stepped in alternation with each other variant, so every
speed-up compares steps that saw the same machine load."""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import wait_for_idle

# A child sets up one case (nets, data, warm-up), prints READY, then runs one timed unit per
# "step" line on stdin and answers TIME <seconds per item>; "done" gets DONE <json>. A parent
# can so alternate two live children step by step: their time ratio then holds even while
# other jobs on the machine speed up or slow down both.

MARK = "BENCH "


class ChildError(RuntimeError):
    """A child failed or timed out; the message is its last stderr line."""


def serve(unit: Callable[[], int], finish: Callable[[], dict[str, Any]]) -> None:
    """Child side: `unit()` does one timed piece of work and returns how many items it did."""
    print(MARK + "READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "step":
            t, cpu = time.perf_counter(), time.process_time()
            items = unit()
            wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            print(f"{MARK}TIME {wall / items!r} {cpu / items!r}", flush=True)
        elif line.strip() == "done":
            print(MARK + "DONE " + json.dumps(finish()), flush=True)
            return


class Worker:
    """Parent side: one live child running `script --child kind spec`."""

    def __init__(self, script: Path, kind: str, spec: dict[str, Any], log: Path,
                 timeout: float) -> None:
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), "--child", kind, json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
                cwd=script.parent.parent)
        self.timer = threading.Timer(timeout, self.proc.kill)  # unblocks a hung readline
        self.timer.start()
        self._expect("READY")

    def _expect(self, tag: str) -> str:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            if line.startswith(MARK + tag):
                return line[len(MARK + tag):].strip()
        self.proc.wait()
        self.timer.cancel()
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {self.proc.returncode} (killed: timeout?)"
        raise ChildError(reason[:200])

    def _send(self, command: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # the child died; _expect reports why

    def step(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of the child) per item of one timed unit."""
        self._send("step")
        wall, cpu = self._expect("TIME").split()
        return float(wall), float(cpu)

    def close(self) -> dict[str, Any]:
        self._send("done")
        result = json.loads(self._expect("DONE"))
        self.proc.wait()
        self.timer.cancel()
        return result

    def kill(self) -> None:
        self.timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ------------------------------------------------------------------ paired measurement


@dataclass
class Case:
    key: str                  # e.g. "train128b1/compile"; --only matches substrings of it
    kind: str                 # gemm | train | apply
    spec: dict[str, Any]      # what the child needs
    label: str                # first table column
    variant: str              # second table column
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """Cases of one group share a shape; their first variant is the fp32 reference."""
        return self.key.split("/")[0]


def groups(cases: list[Case]) -> list[list[Case]]:
    """Cases by group, in order; the GEMM cases each alone."""
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(c.key if c.kind == "gemm" else c.group, []).append(c)
    return list(out.values())


def run_group(script: Path, group: list[Case], work: Path, timeout: float,
              idle_wait: float = 0.0) -> None:
    """Measure the cases of one group. The first (the baseline) child stays alive and each
    other variant alternates steps with it, so every speed-up compares steps taken side by
    side. Results (or {"error": ...}) land in each case's `result`."""
    busy: list[float] = []

    def quiet() -> None:
        if idle_wait > 0:
            busy.append(wait_for_idle(idle_wait))

    base, others = group[0], group[1:]
    began = time.perf_counter()

    def start(c: Case) -> Worker:
        return Worker(script, c.kind, c.spec, work / f"{c.key.replace('/', '_')}.log", timeout)

    try:
        bw = start(base)
    except ChildError as e:
        for c in group:
            c.result = {"error": str(e)}
        return
    base_times: list[tuple[float, float]] = []
    try:
        if not others and base.kind != "gemm":
            base_times = _repeat(lambda: [bw.step()], base.spec, quiet)
        for c in others:
            t = time.perf_counter()
            w = None
            try:
                w = start(c)
                pairs = _repeat(lambda w=w: [_pair(bw, w)], c.spec, quiet)
                c.result = w.close()
                _store_times(c.result, [v for _, v in pairs])
                # Per-pair ratios: the two steps of a pair saw the same machine load.
                c.result["speedup"] = statistics.median(b[0] / v[0] for b, v in pairs)
                base_times += [b for b, _ in pairs]
            except ChildError as e:
                c.result = {"error": str(e)}
                if w is not None:
                    w.kill()
            _progress(c, t)
        base.result = bw.close()
        if base_times:
            _store_times(base.result, base_times)
        if busy:  # how busy the machine was just before the timed steps
            base.result["busy_before_steps"] = round(statistics.median(busy), 2)
        _progress(base, began)
    except ChildError as e:
        base.result = {"error": f"fp32 reference failed: {e}"}
        bw.kill()


def _store_times(result: dict[str, Any], times: list[tuple[float, float]]) -> None:
    result["times"] = [wall for wall, _ in times]
    result["cpu_times"] = [cpu for _, cpu in times]


def _pair(base: Any, other: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    """(base step time, other step time), run in a random order: a load that rises or falls
    during the pair then favours neither on average."""
    if random.random() < 0.5:
        return base.step(), other.step()
    t_other = other.step()
    return base.step(), t_other


MIN_STEPS = 5  # timed steps behind every median, whatever the budget: no one-step figures


def _repeat(fn: Callable[[], list], spec: dict[str, Any], before: Callable[[], None]) -> list:
    """fn() `repeats` times, fewer (never under MIN_STEPS) when they would overrun the budget;
    `before()` (waiting for a quiet machine) runs ahead of each and is not counted."""
    out: list = []
    spent = 0.0
    while len(out) < max(spec.get("repeats", MIN_STEPS), MIN_STEPS):
        before()
        t = time.perf_counter()
        out += fn()
        last = time.perf_counter() - t
        spent += last
        if len(out) >= MIN_STEPS and spent + last > spec["budget"]:
            break
    return out


def _progress(c: Case, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {c.key}: {c.result.get('error') or 'ok'}",
          file=sys.stderr, flush=True)
