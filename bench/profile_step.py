"""Where one training iteration's time goes, by op (issue #18).

    python bench/profile_step.py [--recipe cyclegan_horse2zebra.toml] [--size 128] [--batch 1]
                                 [--precision bf16] [--steps 5] [--set KEY=VALUE ...] [--top 25]
                                 [--floor]

Builds the recipe's run in-process (translate.runner.setup, the real train_step, synthetic
PNGs of the given size), takes 3 warm-up steps, then profiles `--steps` steps with
torch.profiler and prints: the median step time outside the profiler, the ops with the most
self CPU time, and that time grouped by what it is (convolution arithmetic, norms, padding,
dtype conversions and copies, elementwise, losses and reductions, the optimizer, the rest).
The groups are what issue #18 asks about: how much of a step is not convolution arithmetic.

--floor: every convolution call of the step (forward and backward, with its shapes, strides and
which gradients it computed) is timed again on its own, in the step's dtype, with warm caches,
in the faster of the NCHW and channels_last layouts, and the sum is printed beside the step's
own convolution time: what the step's convolutions cost at their best on this machine, so the
part of a step no fusion or layout change outside the convolutions can remove.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
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
    ap.add_argument("--floor", action="store_true",
                    help="time each convolution of the step on its own (see the docstring)")
    args = ap.parse_args(argv)

    import torch
    from _common import time_calls, train_steps, write_unpaired
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_unpaired(Path(tmp) / "data", args.size)
        sets = [f'data.root="{data}"', 'data.preprocess="crop"', f"data.load_size={args.size}",
                f"data.crop_size={args.size}", f"train.batch_size={args.batch}",
                "data.num_workers=0", f'train.mixed_precision="{args.precision}"',
                "train.compile=false", "train.eval_every=0", f'run_dir="{Path(tmp) / "run"}"',
                *args.sets]
        _, _, step = train_steps(args.recipe, sets)
        times = time_calls(step, warmup=3, repeats=args.steps, budget_s=float("inf"))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=args.floor) as prof:
            for _ in range(args.steps):
                step()
    report(prof, statistics.median(times), args)
    if args.floor:
        conv_floor(prof, args)


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


def conv_calls(prof, steps: int) -> dict[tuple, float]:
    """{(kind, shapes, non-tensor arguments, dtype): calls per step} of the profiled steps'
    aten::convolution (forward) and aten::convolution_backward calls."""
    calls: dict[tuple, float] = defaultdict(float)
    for e in prof.events():
        if e.name not in ("aten::convolution", "aten::convolution_backward"):
            continue
        # convolution: input, weight, bias (shape [] when None), then stride ... groups;
        # convolution_backward: grad_output, input, weight, bias sizes, stride ... output_mask
        shapes = tuple(tuple(s) for s in e.input_shapes[:3])
        args = tuple(tuple(a) if isinstance(a, list) else a for a in e.concrete_inputs[3:])
        calls[(e.name, shapes, args, e.input_dtypes[0])] += 1 / steps
    return calls


def time_conv(key: tuple, channels_last: bool, repeats: int = 20) -> float:
    """Median seconds of one call `key` (from conv_calls) on random tensors."""
    import torch
    from _common import time_calls

    name, shapes, args, dtype = key
    dt = {"c10::BFloat16": torch.bfloat16, "c10::Half": torch.float16}.get(dtype, torch.float32)
    args = tuple(list(a) if isinstance(a, tuple) else a for a in args)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(shape):
        if not shape:
            return None
        t = torch.randn(shape, dtype=dt)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t

    if name == "aten::convolution":
        x, w, bias = (rand(s) for s in shapes)

        def call():
            torch.ops.aten.convolution(x, w, bias, *args)
    else:
        g, x, w = (rand(s) for s in shapes)

        def call():
            torch.ops.aten.convolution_backward(g, x, w, *args)
    return statistics.median(time_calls(call, warmup=3, repeats=repeats, budget_s=float("inf")))


def conv_floor(prof, args: argparse.Namespace) -> None:
    calls = conv_calls(prof, args.steps)
    in_step = {name: sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == k)
               / args.steps / 1e6 for name, k in (("forward", "aten::mkldnn_convolution"),
                                                  ("backward", "aten::convolution_backward"))}
    alone = {"forward": 0.0, "backward": 0.0}
    for key, n in calls.items():
        best = min(time_conv(key, False), time_conv(key, True))
        alone["forward" if key[0] == "aten::convolution" else "backward"] += n * best
    print(f"\nconvolutions, {len(calls)} kinds of call: each timed alone (warm caches, the "
          "faster of NCHW and channels_last) against their self time in the step")
    print("\n| | alone s/step | in the step s/step |\n|---|---:|---:|")
    for part in ("forward", "backward"):
        print(f"| {part} | {alone[part]:.3f} | {in_step[part]:.3f} |")
    print(f"| total | {sum(alone.values()):.3f} | {sum(in_step.values()):.3f} |")


if __name__ == "__main__":
    main()
