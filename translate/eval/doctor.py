"""`translate doctor RUN`: what a run's log says about its health, read without touching the run.

Prints the health timeline (the health/* values of each check, `!` where a value is past its
warning threshold: the monitor's verdict, which follows from the value alone), the best step of
every periodic score, the best checkpoint kept by train.keep_best, and the warnings the run
printed. Reads RUN/log.jsonl, RUN/eval_protocol.json and RUN/checkpoints/best/*/best.json
only; writes nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from translate.core import best, runlog
from translate.errors import UserError
from translate.eval import health, protocol
from translate.eval.monitor import KEY, REMEDIES
from translate.eval.periodic import PROTOCOL_FILE
from translate.explore.plot import parse_log

MAX_ROWS = 24  # timeline rows printed without --all (evenly spaced, plus every warning step)

def read_records(run: Path) -> list[dict[str, Any]]:
    path = run / "log.jsonl"
    if not path.is_file():
        raise UserError(f"{path}: no training log; pass a run folder (runs/<name>) that has "
                        "trained for at least train.log_every steps")
    return sorted((r for r in runlog.records(path) if isinstance(r["step"], int)),
                  key=lambda r: r["step"])


def best_scores(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """metric -> {best, step, last, last_step, direction} for every periodic score."""
    log = parse_log([json.dumps(r) for r in records])
    out = {}
    for key, values in log.series.items():
        if not key.startswith("eval/"):
            continue
        steps = [int(s) for s, v in zip(log.steps, values) if math.isfinite(v)]
        finite = [float(v) for v in values if math.isfinite(v)]
        if not finite:
            continue
        direction = best.DIRECTIONS.get(key)
        i = (finite.index(max(finite) if direction == 1 else min(finite))
             if direction else len(finite) - 1)
        out[key] = {"best": finite[i] if direction else None, "step": steps[i] if direction
                    else None, "last": finite[-1], "last_step": steps[-1],
                    "direction": {1: "higher", -1: "lower"}.get(direction, "unknown")}
    return out


def diagnose(run: str | Path) -> dict[str, Any]:
    """Everything `translate doctor` prints, as data."""
    run = Path(run)
    records = read_records(run)
    if not records:
        raise UserError(f"{run / 'log.jsonl'}: no readable log records; train longer than "
                        "train.log_every steps")
    detectors = [d for d in REMEDIES if any(KEY + d in r for r in records)]
    timeline = [{"step": r["step"], **{d: r[KEY + d] for d in detectors if KEY + d in r}}
                for r in records if any(KEY + d in r for d in detectors)]
    warnings = [{"step": r["step"], "line": w} for r in records for w in r.get("warnings", [])]
    kept = best.find(run)
    protocol_file = run / PROTOCOL_FILE
    return {"run": str(run), "steps": records[-1]["step"], "records": len(records),
            "eval_protocol": json.loads(protocol_file.read_text())
            if protocol_file.is_file() else None,
            "detectors": detectors, "timeline": timeline, "scores": best_scores(records),
            "best_checkpoint": None if kept is None else {
                "path": str(kept[0]), **kept[1]},
            "warnings": warnings}


def _rows(timeline: list[dict], warned: set[int], show_all: bool) -> list[dict]:
    if show_all or len(timeline) <= MAX_ROWS:
        return timeline
    spaced = {round(i * (len(timeline) - 1) / (MAX_ROWS - 1)) for i in range(MAX_ROWS)}
    return [row for i, row in enumerate(timeline) if i in spaced or row["step"] in warned]


def report(d: dict[str, Any], show_all: bool = False) -> list[str]:
    """The printed lines."""
    lines = [(f"{d['run']}: {d['steps']} steps, {d['records']} log records, "
              f"{len(d['timeline'])} health checks, {len(d['warnings'])} warnings")]
    if d["timeline"]:
        names = d["detectors"]
        rows = _rows(d["timeline"], {w["step"] for w in d["warnings"]}, show_all)
        lines += ["", "health timeline (! = past the warning threshold"
                  + ("" if len(rows) == len(d["timeline"]) else
                     f"; {len(rows)} of {len(d['timeline'])} checks, --all for every one")
                  + ")", "  step " + "".join(f"{n:>14}" for n in names)]
        for row in rows:
            cells = [f"{row[n]:>13.3f}" + ("!" if health.is_bad(n, row[n]) else " ") if n in row
                     else f"{'-':>13} " for n in names]
            lines.append((f"{row['step']:>6} " + "".join(cells)).rstrip())
    else:
        lines += ["", ("no health checks in the log (train.health = false, or a run from "
                       "before the monitor)")]
    if d["scores"]:
        lines += ["", "scores (best step by each score's direction)"]
        for key, s in d["scores"].items():
            best_part = (f"best {s['best']:.4g} at step {s['step']} ({s['direction']} is "
                         "better)") if s["best"] is not None else "direction unknown"
            lines.append(f"  {key}: {best_part}; last {s['last']:.4g} at step {s['last_step']}")
    if d["eval_protocol"]:
        lines += [f"  protocol: {line}" for line in protocol.lines(d["eval_protocol"])]
    b = d["best_checkpoint"]
    if b is not None:
        lines.append(f"  best checkpoint: {b['path']} ({b['metric']} = {b['value']:.4g}, "
                     f"step {b['step']}); translate export RUN --best")
    lines += ["", "warnings:" if d["warnings"] else "no warnings"]
    lines += [f"  step {w['step']}: {w['line']}" for w in d["warnings"]]
    return lines


def cmd_doctor(args: Any) -> int:
    d = diagnose(args.run)
    print(json.dumps(d) if args.json else "\n".join(report(d, args.all)))
    return 0
