"""Where one training iteration's time goes, by op (issue #18).

    python bench/profile_step.py [--recipe cyclegan_horse2zebra.toml] [--size 128] [--batch 1]
                                 [--precision bf16] [--steps 5] [--set KEY=VALUE ...] [--top 25]

Builds the recipe's run in-process (translate.runner.setup, the real train_step, synthetic
PNGs of the given size), takes 3 warm-up steps, then profiles `--steps` steps with
torch.profiler and prints: the median step time outside the profiler, the ops with the most
self CPU time, and that time grouped by what it is (convolution arithmetic, norms, padding,
dtype conversions and copies, elementwise, losses and reductions, the optimizer, the rest).
The groups are what issue #18 asks about: how much of a step is not convolution arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from a checkout that is not pip-installed
        sys.path.insert(0, str(p))

GROUPS = [  # (group, substrings of aten op names), first match wins
    ("convolution", ("conv", "mkldnn_convolution", "_convolution", "addmm", "mm", "bmm",
                     "linear")),
    ("norm", ("instance_norm", "batch_norm", "native_batch_norm", "group_norm", "layer_norm",
              "var_mean", "native_group_norm")),
    ("padding / resize", ("pad", "reflection", "replication", "upsample", "interpolate")),
    ("dtype conversion / copy", ("to_copy", "copy_", "_to_copy", "clone", "contiguous",
                                 "empty_like", "cat")),
    ("optimizer", ("_foreach", "adam", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("losses / reductions", ("mse", "l1", "mean", "sum", "abs", "sub", "pow", "norm")),
    ("elementwise / activations", ("relu", "leaky", "tanh", "hardtanh", "mul", "add", "div",
                                   "threshold", "where", "fill", "zero", "neg", "sigmoid")),
]


def group_of(name: str) -> str:
    name = name.lower().removeprefix("aten::")
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="cyclegan_horse2zebra.toml")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--precision", default="bf16", choices=["no", "bf16", "auto"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--set", action="append", default=[], dest="sets")
    args = ap.parse_args(argv)

    import torch
    from _common import write_unpaired
    from torch.profiler import ProfilerActivity, profile

    from translate import recipe, runner
    from translate.core import checkpoint, loop

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_unpaired(Path(tmp) / "data", args.size)
        sets = [f'data.root="{data}"', 'data.preprocess="crop"', f"data.load_size={args.size}",
                f"data.crop_size={args.size}", f"train.batch_size={args.batch}",
                "data.num_workers=0", f'train.mixed_precision="{args.precision}"',
                "train.compile=false", "train.eval_every=0", f'run_dir="{Path(tmp) / "run"}"',
                *args.sets]
        cfg = recipe.load(ROOT / "recipes" / args.recipe, sets)
        s = runner.setup(cfg)
        state = checkpoint.TrainState(fingerprint="profile")
        batches = loop.Batches(cfg, s.dataset, s.accelerator, 0)
        for _ in range(3):
            loop.train_step(s, state, batches)
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            loop.train_step(s, state, batches)
            times.append(time.perf_counter() - t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                loop.train_step(s, state, batches)
    report(prof, statistics.median(times), args)


def report(prof, step_s: float, args: argparse.Namespace) -> None:
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e6
    print(f"{args.recipe} {args.size}px batch {args.batch}, precision {args.precision}: "
          f"{step_s:.3f} s/step (median of {args.steps}, unprofiled); profiled aten self time "
          f"{total:.3f} s/step")
    print("\n| op | calls/step | self ms/step | share |\n|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
        ms = e.self_cpu_time_total / args.steps / 1e3
        print(f"| {e.key} | {e.count / args.steps:.0f} | {ms:.1f} | {ms / 1e3 / total:.1%} |")
    by_group: dict[str, float] = defaultdict(float)
    for e in events:
        by_group[group_of(e.key)] += e.self_cpu_time_total / args.steps / 1e6
    print("\n| group | s/step | share |\n|---|---:|---:|")
    for group, sec in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"| {group} | {sec:.3f} | {sec / total:.1%} |")


if __name__ == "__main__":
    main()
