"""Quality benchmark: mode coverage on the PacGAN 2-D mixtures, beside the published numbers.

    python bench/quality.py --toy --seeds 5 [--steps N] [--method wgan_gp|gan|both] [--json]

For every seed and each of ring and grid it trains recipes/toy_<method>_<toy>.toml from scratch
(translate.config.load + translate.core.loop.train), then scores 2,500 generator samples with the
PacGAN protocol (translate.evaluate.eval_toy_run): modes captured, fraction of high-quality
samples, reverse KL. It prints mean ± standard error over seeds beside Table 1 of Lin et al.,
"PacGAN" (NeurIPS 2018) and our targets; `--json` adds one JSON line per method at the end.

Runs go to a temporary folder (deleted) unless `--runs DIR` keeps them; kept runs resume, so an
interrupted benchmark continues (use a fresh DIR after changing settings). A `--demo` part
(CycleGAN on the demo data) is planned.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(ROOT))

TOYS = ("ring", "grid")
METRICS = ("modes", "hq", "rkl")
RECIPES = {"wgan_gp": "toy_wgan_gp_{toy}.toml", "gan": "toy_gan_{toy}.toml"}
# Lin et al. 2018, Table 1: (modes, high-quality fraction, reverse KL), means over trials.
PUBLISHED = {
    "GAN": {"ring": (6.3, 0.982, 0.45), "grid": (17.3, 0.948, 0.70)},
    "PacGAN2": {"ring": (7.9, 0.956, 0.07), "grid": (23.8, 0.913, 0.13)},
    "PacGAN4": {"ring": (7.8, 0.959, 0.07), "grid": (24.8, 0.936, 0.04)},
}
# What we aim for: every mode, PacGAN-level quality or better, near-uniform mode weights.
TARGETS = {"ring": (8.0, 0.98, 0.03), "grid": (25.0, 0.95, 0.03)}


def train_and_score(method: str, toy: str, seed: int, run_dir: Path, steps: int | None,
                    overrides: list[str], ema: bool, samples: int) -> dict[str, Any]:
    """Train one toy run (resuming a finished or interrupted one in run_dir) and score it."""
    from translate import config
    from translate.core.loop import train
    from translate.evaluate import eval_toy_run

    ours = [f"seed={seed}", f"run_dir={json.dumps(str(run_dir))}"]
    if steps is not None:
        ours.append(f"train.steps={steps}")
    cfg = config.load(ROOT / "recipes" / RECIPES[method].format(toy=toy), overrides + ours)
    t0 = time.perf_counter()
    result = train(cfg, resume="auto", progress=False)
    scores = eval_toy_run(run_dir, ema=ema, n=samples, seed=seed)
    return {"toy": toy, "seed": seed, "step": result.step,
            "seconds": round(time.perf_counter() - t0, 1),
            **{k: scores[k] for k in METRICS}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """{toy_metric: mean over seeds, toy_metric_se: standard error} for every toy run."""
    from translate.metrics import mean_and_stderr

    out: dict[str, float] = {}
    for toy in TOYS:
        for metric in METRICS:
            values = [r[metric] for r in runs if r["toy"] == toy]
            if values:
                mean, se = mean_and_stderr(values)
                out[f"{toy}_{metric}"], out[f"{toy}_{metric}_se"] = mean, se
    return out


def meets(toy: str, metric: str, value: float) -> bool:
    target = TARGETS[toy][METRICS.index(metric)]
    return value <= target if metric == "rkl" else value >= target - 1e-9


def _show(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{100 * value:.1f}%" if metric == "hq" else f"{value:.2f}"


def table(method: str, summary: dict[str, float], seeds: int, steps: str) -> Any:
    from rich.table import Table

    t = Table(title=f"{method} on the PacGAN mixtures: {seeds} seed(s), {steps} steps, "
                    "2,500 samples each")
    for name in ("", "ours (mean ± se)", *PUBLISHED, "target", "met"):
        t.add_column(name, justify="left" if not name else "right")
    for toy in TOYS:
        if f"{toy}_modes" not in summary:
            continue
        for i, metric in enumerate(METRICS):
            mean, se = summary[f"{toy}_{metric}"], summary[f"{toy}_{metric}_se"]
            ours = _show(metric, mean) + ("" if math.isnan(se) else f" ± {_show(metric, se)}")
            target = TARGETS[toy][i]
            t.add_row(f"{toy} {metric}", ours,
                      *(_show(metric, PUBLISHED[p][toy][i]) for p in PUBLISHED),
                      ("<= " if metric == "rkl" else ">= ") + _show(metric, target),
                      "yes" if meets(toy, metric, mean) else "no")
    t.caption = ("published: Lin et al. 2018 (PacGAN) Table 1; hq = share of samples within "
                 "3 std of their nearest mode; rkl = KL(mode histogram || uniform)")
    return t


def run_toy(args: argparse.Namespace, runs_root: Path) -> list[dict[str, Any]]:
    from rich.console import Console

    methods = list(RECIPES) if args.method == "both" else [args.method]
    reports = []
    for method in methods:
        runs = []
        for seed in range(args.seeds):
            for toy in TOYS:
                run_dir = runs_root / f"{method}_{toy}_seed{seed}"
                runs.append(train_and_score(method, toy, seed, run_dir, args.steps,
                                            args.set or [], args.ema, args.samples))
                print(f"{method} {toy} seed {seed}: {runs[-1]}", file=sys.stderr)
        summary = summarize(runs)
        steps = sorted({r["step"] for r in runs})
        Console().print(table(method, summary, args.seeds, "/".join(map(str, steps))))
        reports.append({"method": method, "seeds": args.seeds, "steps": steps[-1],
                        "samples": args.samples, **summary, "runs": runs})
    return reports


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--toy", action="store_true", help="the 2-D mixture benchmark (PacGAN)")
    p.add_argument("--seeds", type=int, default=3, help="training seeds 0..K-1 per mixture")
    p.add_argument("--steps", type=int, help="generator steps (default: the recipe's)")
    p.add_argument("--method", choices=(*RECIPES, "both"), default="wgan_gp")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="recipe override for every run, e.g. --set model.pack=2 (repeatable)")
    p.add_argument("--ema", action="store_true", help="score the EMA generator (needs "
                   "--set train.ema=0.999 or similar)")
    p.add_argument("--samples", type=int, default=2500, help="generator samples per score")
    p.add_argument("--runs", type=Path, help="keep runs here (and resume them); default: a "
                   "temporary folder")
    p.add_argument("--json", action="store_true", help="end with one JSON line per method")
    args = p.parse_args(argv)
    if not args.toy:
        p.error("choose a benchmark: --toy (the --demo part is not written yet)")
    if args.seeds < 1 or args.samples < 1 or (args.steps is not None and args.steps < 1):
        p.error("--seeds, --samples and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from translate.errors import UserError
    from translate.evaluate import jsonable

    try:
        if args.runs is not None:
            reports = run_toy(args, args.runs)
        else:
            with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
                reports = run_toy(args, Path(tmp))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        for report in reports:
            runs = [jsonable(r) for r in report.pop("runs")]
            print(json.dumps({**jsonable(report), "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
