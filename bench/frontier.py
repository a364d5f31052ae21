"""The quality/time frontier of CycleGAN recipes on the known-truth tasks (issue #13).

    OMP_NUM_THREADS=1 python bench/frontier.py --runs runs/frontier [--recipes a,b]
        [--tasks demo,morph] [--size N] [--set KEY=VALUE ...] [--jobs 2] [--threads 1]
        [--markdown] [--json]

Each recipe of RECIPES (a recipe file plus a few `--set` overrides) trains on each task's data
(translate.data.demo.build_demo: "demo", the per-pixel colour mapping of `translate demo`, at
64 px; "morph", a dilation plus another colour mapping that changes local shape, at 32 px),
one process per run. Every run is then exported and scored the way `translate demo` scores
(translate.demo.score, fp32 inference): PSNR and SSIM of G_ab(testA) against the true testB,
and the cycle PSNR of G_ba(G_ab(testA)) against testA. The table has one row per recipe and
task: steps, batch, wall-clock training seconds, seconds per step, PSNR, SSIM, cycle PSNR, and
the do-nothing row (testA as is) per task.

Every run trains on the same data settings (the task's images at full size, random flips), so
the recipes differ only in nets, losses and schedule. Wall-clock times depend on the machine
and on whatever else runs on it: compare the rows of one invocation (`--jobs 2` trains two
runs side by side, one thread each by default), never rows of different days. A finished run
is read back from its `frontier.json` (delete the run folder to train it again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from a checkout that is not pip-installed
        sys.path.insert(0, str(p))

from _common import in_folder, map_jobs


@dataclass(frozen=True)
class Recipe:
    file: str                     # under recipes/
    sets: tuple[str, ...]         # --set overrides on top of it
    about: str                    # one line for the notes under the table


# The demo recipe as it was before issue #13 (U-Net, transposed convs, zero padding), written
# out key by key so that it stays measurable beside today's recipe.
OLD_DEMO = ('model.generator="unet"', "model.unet_downs=4", "model.ngf=16", "model.ndf=16",
            "model.n_layers_d=2", 'model.norm="instance"', "train.channels_last=false",
            'model.upsample="transpose"', 'model.padding="zero"',
            "model.unet_full_res=false", "model.unet_affine_out=false",
            "model.identity_until=0",
            "model.lambda_identity=0.5", "train.steps=2000", "train.batch_size=4",
            "train.lr_g=2e-4", "train.lr_d=2e-4", 'train.lr_schedule="linear"',
            "train.decay_start=0")
# The paper's nets and losses (recipes/cyclegan_horse2zebra.toml) on a step budget like the
# reference's on small data: 3,000 steps at batch 1, constant LR then linear decay.
PAPER = ("train.epochs=0", "train.epochs_decay=0", "train.steps=3000", "train.batch_size=1")

RECIPES: dict[str, Recipe] = {
    "demo": Recipe("cyclegan_demo.toml", (), "recipes/cyclegan_demo.toml"),
    "demo_old": Recipe("cyclegan_demo.toml", OLD_DEMO, "the demo recipe before issue #13: "
                       "U-Net, 4 downsamplings, ngf 16, transposed convs, zero padding"),
    "small": Recipe("cyclegan_small.toml", (), "recipes/cyclegan_small.toml"),
    "paper": Recipe("cyclegan_horse2zebra.toml", PAPER, "recipes/cyclegan_horse2zebra.toml "
                    "(ResNet-9, ngf 64, 70x70 PatchGAN) for 3,000 steps at batch 1"),
}
TASKS = {"demo": 64, "morph": 32}  # task -> its image side in pixels
DEFAULT_RECIPES = ("demo", "demo_old", "small", "paper")


# ---------------------------------------------------------------------------- one run


def run_name(recipe: str, task: str, size: int, extra: tuple[str, ...]) -> str:
    tag = "-x" + hashlib.sha1("\n".join(extra).encode()).hexdigest()[:8] if extra else ""
    return f"{recipe}-{task}{size}{tag}"


def overrides(recipe: str, data_root: Path, run_dir: Path, size: int,
              extra: tuple[str, ...]) -> list[str]:
    return [*RECIPES[recipe].sets, f"data.root={json.dumps(str(data_root))}",
            f"run_dir={json.dumps(str(run_dir))}", 'data.preprocess="crop"',
            f"data.load_size={size}", f"data.crop_size={size}", "data.flip=true",
            "data.num_workers=0", "train.eval_every=0", *extra]


def train_and_score(recipe: str, task: str, size: int, data_root: Path, run_dir: Path,
                    extra: tuple[str, ...], threads: int) -> dict[str, Any]:
    """Train one recipe on one task (or read back its saved result), export it, score it.

    A run stopped by a signal has saved a checkpoint and the seconds it trained
    (`frontier_partial.json`); the next call resumes it and adds them up."""
    saved, partial = run_dir / "frontier.json", run_dir / "frontier_partial.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    import torch

    from translate import recipe as config_mod
    from translate.core.faults import Interrupted
    from translate.demo import find_recipe
    from translate.precision import training_precision
    from translate.runner import train

    torch.set_num_threads(threads)
    cfg = config_mod.load(find_recipe(RECIPES[recipe].file),
                          overrides(recipe, data_root, run_dir, size, extra))
    before = json.loads(partial.read_text()) if partial.is_file() else {"seconds": 0.0,
                                                                          "sessions": 0}
    t0 = time.perf_counter()
    try:
        result = train(cfg, resume="auto" if partial.is_file() else None, progress=False)
    except Interrupted:
        _write_json(partial, {"seconds": before["seconds"] + time.perf_counter() - t0,
                              "sessions": before["sessions"] + 1})
        raise
    seconds = before["seconds"] + time.perf_counter() - t0
    out = {"recipe": recipe, "task": task, "size": size, "extra": list(extra),
           "steps": result.step, "batch": cfg.train.batch_size, "threads": threads,
           "sessions": before["sessions"] + 1,
           "train_seconds": round(seconds, 1), "s_per_step": round(seconds / result.step, 4),
           "precision": training_precision(cfg.train.mixed_precision, None,
                                           torch.device("cpu"))[0],
           **score_run(run_dir, data_root)}
    _write_json(saved, out)
    return out


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.replace(path)


def score_run(run_dir: Path, data_root: Path) -> dict[str, Any]:
    """Export, translate testA in fp32 and score it as `translate demo` does."""
    from translate.demo import score, side_by_side
    from translate.export import export_run, load_generator
    from translate.infer import translate_folder

    export_run(run_dir)
    test_a, test_b = data_root / "testA", data_root / "testB"
    gen_ab = load_generator(run_dir / "export" / "G_ab.safetensors", precision="fp32")
    gen_ba = load_generator(run_dir / "export" / "G_ba.safetensors", precision="fp32")
    folder = run_dir / "translated"
    translate_folder(gen_ab.forward, gen_ab.info, test_a, folder, overwrite=True, progress=False)
    side_by_side(test_a, folder, test_b, run_dir / "side_by_side.png")
    return score(gen_ab, gen_ba, test_a, test_b, folder)


# ---------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| task | recipe | px | batch | steps | train s | s/step | PSNR (dB) | SSIM | "
            "cycle PSNR (dB) |")
    lines = [head, "|" + "---|" * 10]
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task]
        for r in mine:
            name = r["recipe"] + (" " + " ".join(r["extra"]) if r["extra"] else "")
            lines.append(f"| {task} | {name} | {r['size']} | {r['batch']} | {r['steps']} | "
                         f"{r['train_seconds']:.0f} | {r['s_per_step']:.3f} | {r['psnr']:.2f} | "
                         f"{r['ssim']:.3f} | {r['cycle_psnr']:.2f} |")
        lines.append(f"| {task} | do nothing (testA as is) | {mine[0]['size']} | | | | | "
                     f"{mine[0]['baseline_psnr']:.2f} | {mine[0]['baseline_ssim']:.3f} | |")
    lines.append("")
    lines += [f"- {name}: {RECIPES[name].about}"
              for name in dict.fromkeys(r["recipe"] for r in rows)]
    return "\n".join(lines)


def table(rows: list[dict[str, Any]], threads: int, jobs: int) -> Any:
    from rich.table import Table

    t = Table(title=f"CycleGAN quality/time frontier ({jobs} run(s) at a time, {threads} "
                    "thread(s) each)")
    for name in ("task", "recipe", "px", "batch", "steps", "train s", "s/step", "PSNR dB",
                 "SSIM", "cycle PSNR dB"):
        t.add_column(name, justify="left" if name in ("task", "recipe") else "right")
    for r in rows:
        t.add_row(r["task"], r["recipe"] + ("*" if r["extra"] else ""), str(r["size"]),
                  str(r["batch"]), str(r["steps"]), f"{r['train_seconds']:.0f}",
                  f"{r['s_per_step']:.3f}", f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
                  f"{r['cycle_psnr']:.2f}")
    for task in dict.fromkeys(r["task"] for r in rows):
        r = next(r for r in rows if r["task"] == task)
        t.add_row(task, "do nothing", str(r["size"]), "", "", "", "",
                  f"{r['baseline_psnr']:.2f}", f"{r['baseline_ssim']:.3f}", "")
    if any(r["extra"] for r in rows):
        t.caption = "* with --set " + " ".join(next(r["extra"] for r in rows if r["extra"]))
    return t


# ---------------------------------------------------------------------------- main


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES),
                   help=f"comma-separated, from: {', '.join(RECIPES)}")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"from: {', '.join(TASKS)}")
    p.add_argument("--size", type=int, help="image side for every task (default: the task's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override for every run, e.g. --set train.steps=500")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--runs", type=Path, help="keep runs here (a finished run is read back); "
                   "default: a temporary folder")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    p.add_argument("--json", action="store_true", help="end with one JSON line of every row")
    args = p.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    args.tasks = [t for t in args.tasks.split(",") if t]
    bad = [r for r in args.recipes if r not in RECIPES] + [t for t in args.tasks
                                                            if t not in TASKS]
    if bad:
        p.error(f"unknown recipe or task {bad[0]!r}; recipes: {', '.join(RECIPES)}; tasks: "
                f"{', '.join(TASKS)}")
    if min(args.jobs, args.threads) < 1:
        p.error("--jobs and --threads must be at least 1")
    return args


def run(args: argparse.Namespace, runs: Path) -> list[dict[str, Any]]:
    from translate.data.demo import build_demo

    extra = tuple(args.set)
    jobs = []
    for task in args.tasks:
        size = args.size or TASKS[task]
        data = build_demo(runs / f"data-{task}{size}", size=size, task=task).resolve()
        jobs += [(recipe, task, size, data, runs / run_name(recipe, task, size, extra), extra,
                  args.threads) for recipe in args.recipes]
    rows = []
    for row in map_jobs(train_and_score, jobs, args.jobs):
        print(f"{row['recipe']} on {row['task']}: {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}, "
              f"{row['train_seconds']:.0f} s", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from rich.console import Console

    from translate.errors import UserError

    try:
        rows = in_folder(args.runs.resolve() if args.runs else None, "bench_frontier_",
                         lambda folder: run(args, folder))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Console().print(table(rows, args.threads, args.jobs))
    if args.markdown:
        print(markdown(rows))
    if args.json:
        print(json.dumps({"rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
