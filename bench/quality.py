"""Quality benchmark: mode coverage on the PacGAN 2-D mixtures, beside the published numbers.

    python bench/quality.py --toy --seeds 5 [--method NAME|both|all] [--jobs 2] [--json]

For every seed and each of ring and grid it trains one method's recipe from scratch
(translate.config.load + translate.core.loop.train), then scores 2,500 generator samples with the
PacGAN protocol (translate.eval.evaluate.eval_toy_run): modes captured, fraction of high-quality
samples, reverse KL. It prints mean ± standard error over seeds beside Table 1 of Lin et al.,
"PacGAN" (NeurIPS 2018) and our targets; `--json` adds one JSON line per method at the end.
Methods (METHODS below): wgan_gp, gan (plain, drops modes), and the GAN's mode-collapse remedies,
each the plain GAN recipe plus one key (gan_pack, gan_mbstd, gan_unrolled; gan_unrolled_full adds
the full method's backprop to gan_unrolled) so they compare as an ablation, and pacgan, the
tuned packed GAN of recipes/toy_pacgan_<toy>.toml. `both` = wgan_gp and gan; `all` = every
method. Each run reports its wall-clock and CPU seconds (one thread with
OMP_NUM_THREADS=1; the CPU time is what a shared machine does not inflate).

Runs go to a temporary folder (deleted) unless `--runs DIR` keeps them; kept runs resume, so an
interrupted benchmark continues (use a fresh DIR after changing settings).

    python bench/quality.py --translation [frontier.py options]

hands over to bench/frontier.py: CycleGAN recipes on the known-truth translation tasks, PSNR and
SSIM to the truth against training time (the quality/time frontier).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from a checkout that is not pip-installed
        sys.path.insert(0, str(p))

from _common import in_folder, map_jobs

TOYS = ("ring", "grid")
METRICS = ("modes", "hq", "rkl")
# method -> (recipe name pattern, overrides applied before the user's --set ones).
METHODS: dict[str, tuple[str, tuple[str, ...]]] = {
    "wgan_gp": ("toy_wgan_gp_{toy}.toml", ()),
    "gan": ("toy_gan_{toy}.toml", ()),
    "gan_pack": ("toy_gan_{toy}.toml", ("model.pack=2",)),            # PacGAN2 (Lin et al.)
    "gan_mbstd": ("toy_gan_{toy}.toml", ("model.minibatch_std=4",)),  # Karras et al. 2018
    "gan_unrolled": ("toy_gan_{toy}.toml", ("model.unrolled_steps=5",)),  # Metz et al. 2017
    # ... the paper's full method: G's gradient through the 5 steps, from D's optimizer state
    "gan_unrolled_full": ("toy_gan_{toy}.toml", ("model.unrolled_steps=5",
                                                 "model.unrolled_backprop=true")),
    "pacgan": ("toy_pacgan_{toy}.toml", ()),
}
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
    from translate import recipe as config
    from translate.eval.evaluate import eval_toy_run
    from translate.runner import train

    pattern, method_sets = METHODS[method]
    ours = [f"seed={seed}", f"run_dir={json.dumps(str(run_dir))}"]
    if steps is not None:
        ours.append(f"train.steps={steps}")
    cfg = config.load(ROOT / "recipes" / pattern.format(toy=toy),
                      [*method_sets, *overrides, *ours])
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = train(cfg, resume="auto-or-new", progress=False)
    scores = eval_toy_run(run_dir, ema=ema, n=samples, seed=seed)
    # A resumed run only counts the time of this process's part of it.
    return {"toy": toy, "seed": seed, "step": result.step,
            "seconds": round(time.perf_counter() - t0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1),
            **{k: scores[k] for k in METRICS}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, float]:
    """{toy_metric: mean over seeds, toy_metric_se: standard error} for every toy run."""
    from translate.eval.metrics import mean_and_stderr

    out: dict[str, float] = {}
    for toy in TOYS:
        for metric in METRICS:
            values = [r[metric] for r in runs if r["toy"] == toy]
            if values:
                mean, se = mean_and_stderr(values)
                out[f"{toy}_{metric}"], out[f"{toy}_{metric}_se"] = mean, se
        for clock in ("seconds", "cpu_seconds"):
            times = [r[clock] for r in runs if r["toy"] == toy and clock in r]
            if times:
                out[f"{toy}_{clock}"] = round(sum(times) / len(times), 1)
    return out


def meets(toy: str, metric: str, value: float) -> bool:
    target = TARGETS[toy][METRICS.index(metric)]
    return value <= target if metric == "rkl" else value >= target - 1e-9


def _show(metric: str, value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return {"hq": f"{100 * value:.1f}%", "rkl": f"{value:.3f}"}.get(metric, f"{value:.2f}")


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
        t.add_row(f"{toy} s/run", f"{summary[f'{toy}_seconds']:.0f} wall, "
                  f"{summary[f'{toy}_cpu_seconds']:.0f} cpu", *("" for _ in PUBLISHED), "", "")
    t.caption = ("published: Lin et al. 2018 (PacGAN) Table 1; hq = share of samples within "
                 "3 std of their nearest mode; rkl = KL(mode histogram || uniform)")
    return t


def _cell(metric: str, mean: float, se: float) -> str:
    fmt = {"modes": "{:.1f}", "hq": "{:.1%}", "rkl": "{:.3f}"}[metric]
    return fmt.format(mean) + ("" if math.isnan(se) else " ± " + fmt.format(se))


def markdown(reports: list[dict[str, Any]]) -> str:
    """The README's results table: one row per method, mean ± se over seeds, time per run."""
    lines = ["| method | seeds | " + " | ".join(f"{toy} {m}" for toy in TOYS for m in METRICS)
             + " | CPU s per run (ring / grid) |", "|---" * (3 + 2 * len(METRICS)) + "|"]
    for r in reports:
        cells = [_cell(m, r[f"{toy}_{m}"], r[f"{toy}_{m}_se"]) if f"{toy}_{m}" in r else ""
                 for toy in TOYS for m in METRICS]
        times = " / ".join(f"{r.get(f'{toy}_cpu_seconds', float('nan')):.0f}" for toy in TOYS)
        lines.append(f"| {r['method']} | {r['seeds']} | " + " | ".join(cells) + f" | {times} |")
    return "\n".join(lines)


def run_toy(args: argparse.Namespace, runs_root: Path) -> list[dict[str, Any]]:
    from rich.console import Console

    methods = {"both": ["wgan_gp", "gan"], "all": list(METHODS)}.get(args.method, [args.method])
    reports = []
    for method in methods:
        jobs = [(method, toy, seed, runs_root / f"{method}_{toy}_seed{seed}", args.steps,
                 args.set or [], args.ema, args.samples)
                for seed in range(args.seeds) for toy in TOYS]
        runs = []
        for run in map_jobs(train_and_score, jobs, args.jobs):
            print(f"{method} {run['toy']} seed {run['seed']}: {run}", file=sys.stderr)
            runs.append(run)
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
    p.add_argument("--method", choices=(*METHODS, "both", "all"), default="pacgan",
                   help="which recipe(s) to train (see METHODS); both = wgan_gp and gan")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="recipe override for every run, e.g. --set model.pack=2 (repeatable)")
    p.add_argument("--ema", action="store_true", help="score the EMA generator (needs "
                   "--set train.ema=0.999 or similar)")
    p.add_argument("--samples", type=int, default=2500, help="generator samples per score")
    p.add_argument("--runs", type=Path, help="keep runs here (and resume them); default: a "
                   "temporary folder")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own "
                   "process (keep OMP_NUM_THREADS=1 and jobs <= cores)")
    p.add_argument("--markdown", action="store_true", help="print the results as a markdown "
                   "table (the README's)")
    p.add_argument("--json", action="store_true", help="end with one JSON line per method")
    args = p.parse_args(argv)
    if not args.toy:
        p.error("choose a benchmark: --toy, or --translation (bench/frontier.py)")
    if min(args.seeds, args.samples, args.jobs, args.steps or 1) < 1:
        p.error("--seeds, --samples, --jobs and --steps must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--translation" in argv:
        import frontier

        return frontier.main([a for a in argv if a != "--translation"])
    args = parse(argv)
    from translate.errors import UserError
    from translate.eval.report import jsonable

    try:
        reports = in_folder(args.runs, "bench_quality_", lambda folder: run_toy(args, folder))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        print(markdown(reports))
    if args.json:
        for report in reports:
            runs = [jsonable(r) for r in report.pop("runs")]
            print(json.dumps({**jsonable(report), "runs": runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
