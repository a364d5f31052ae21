"""Speed benchmark (issues #6, #18): training iterations, `apply` throughput, the ceiling.

    python bench/speed.py [--quick] [--json] [--only KEY,KEY] [--repeats N] [--threads N]

Every case runs in its own subprocess (so its peak RSS is its own), and every variant is stepped
in alternation with a live fp32 process of the same case, so its speed-up holds while other
jobs on a shared machine come and go. Every variant names its precision: `fp32` is
mixed_precision "no", `bf16` is bf16 autocast, and `auto` (what a user gets by default) is a
row of its own, shown with what it resolved to on this machine. Measured:
- the ceiling: fp32 and bf16 n x n x n matmul rates (n = 4096 unless that would take minutes);
- a full CycleGAN iteration with the paper's nets (ResNet-9 ngf 64, 70x70 PatchGAN) through the
  real loop (translate.core.loop.setup + train_step) at 128 and 256 px, batch 1 and 4, eager
  and torch.compile, per precision, and fp32 with oneDNN's convolutions only where `fp32`
  (train.nnpack "auto") runs some on NNPACK (translate/nets/nnpack.py); the demo recipe the
  same way;
- a CUT and a FastCUT iteration with the paper's nets at 128 px batch 1 (fp32), each stepped in
  alternation with the CycleGAN fp32 step of that size;
- a DCGAN and a WGAN-GP iteration (5 critic steps) at 64 px, batch 64;
- `apply` end to end (translate_folder on PNGs: decode, generator, encode) at 256 and 1024 px:
  torch eager and compiled (translate/infer/compiled.py) per precision, fp32 with oneDNN's and
  with NNPACK's convolutions (translate/infer/nnpack.py; 256 px), and onnxruntime;
- a self-check: `translate train` run as a subprocess on the 128 px batch-1 config in fp32 and
  auto; its own it/s must agree within 15% with the bench's steps of the same case, timed just
  before and just after it (bench/_self_check.py; the table's figure is shown beside).

Times are medians of at least 5 timed steps after warm-up (also with --quick), speed-ups
medians of the per-pair ratios; "CPU s" is the child's CPU time per step (with 1 thread, what
a quiet machine's wall time would be); FLOPs are counted with FlopCounterMode on the fp32 run;
"ceiling" is achieved FLOP/s over the best GEMM rate. `--quick`: 128 px batch 1 (fp32, auto,
compiled) and apply at 256 px only, bf16 only where the CPU has it natively.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from a checkout that is not pip-installed
        sys.path.insert(0, str(p))

from _common import machine
from _paired import MIN_STEPS, Case, groups, run_group
from _self_check import self_check
from _speed_report import (
    BASE_VARIANTS,
    fill_derived,
    print_table,
    print_targets,
    summary,
)

THREADS = 2  # torch threads per child unless --threads says otherwise
EAGER = ["train.compile=false", "train.channels_last=false"]
VARIANTS: dict[str, list[str]] = {  # training variants: config overrides, precision named
    "fp32": ['train.mixed_precision="no"', *EAGER],  # NNPACK as train.nnpack "auto" says
    "fp32 oneDNN": ['train.mixed_precision="no"', 'train.nnpack="off"', *EAGER],
    "auto": ['train.mixed_precision="auto"', *EAGER],  # the row shows what it resolved to
    "bf16": ['train.mixed_precision="bf16"', *EAGER],
    "bf16+channels_last": ['train.mixed_precision="bf16"', "train.compile=false",
                           "train.channels_last=true"],
    "fp32+compile": ['train.mixed_precision="no"', "train.compile=true"],
    "bf16+compile": ['train.mixed_precision="bf16"', "train.compile=true"],
}
BACKENDS: dict[str, dict[str, Any]] = {  # apply variants: load_generator arguments
    "torch fp32": {"precision": "fp32", "nnpack": False},  # oneDNN's convolutions
    "torch fp32 compiled": {"precision": "fp32", "compile": True, "nnpack": False},
    "torch fp32 nnpack": {"precision": "fp32", "nnpack": True},  # translate/infer/nnpack.py
    "torch fp32 nnpack compiled": {"precision": "fp32", "compile": True, "nnpack": True},
    "torch auto": {"precision": "auto"},  # the row shows what it resolved to
    "torch bf16": {"precision": "bf16"},
    "torch bf16 compiled": {"precision": "bf16", "compile": True},
    "onnx": {"backend": "onnx"},
}


# -------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    work: Path      # temporary folder: data, exports, runs
    quick: bool
    native: bool    # the CPU computes bf16 natively: bf16 variants are measured
    nnpack: bool    # torch has NNPACK and it runs here: the fp32 nnpack apply rows are measured
    repeats: int    # timed steps per case (at least _paired.MIN_STEPS)
    threads: int    # torch threads per child

    def budget(self) -> float:
        """Seconds of timed steps per case beyond MIN_STEPS."""
        return 20.0 if self.quick else 150.0

    def compiled(self, prefix: str = "", suffix: str = "+compile") -> str:
        """The compiled variant in the precision `auto` picks here."""
        return f"{prefix}{'bf16' if self.native else 'fp32'}{suffix}"


def _train_case(p: Plan, key: str, label: str, recipe: str, variant: str,
                overrides: list[str]) -> Case:
    spec = {"recipe": recipe, "variant": variant, "count_flops": variant == "fp32",
            "overrides": [*overrides, "data.num_workers=0",
                          f'run_dir="{p.work / "runs" / key.replace("/", "_")}"',
                          *VARIANTS[variant]],
            # 2 steps: with torch.compile the first compiles, the second runs what it made.
            "warmup": 2, "repeats": p.repeats, "budget": p.budget(), "threads": p.threads}
    return Case(key, "train", spec, label, variant)


def train_variants(p: Plan, main: bool) -> list[str]:
    """fp32 first (the reference every variant is paired with). bf16 only with native bf16
    (emulated it is ~30x slower than fp32: README); `auto` always on the main case (the
    self-check needs it), elsewhere only where it differs from fp32."""
    if p.quick:
        return ["fp32", "auto", p.compiled()]
    if main:
        every = [v for v in VARIANTS if v != "fp32 oneDNN"]
        return every if p.native else [v for v in every if "bf16" not in v]
    return ["fp32", "auto", p.compiled()] if p.native else ["fp32", p.compiled()]


def train_cases(p: Plan) -> list[Case]:
    def add(key: str, label: str, recipe: str, overrides: list[str], variants: list[str]):
        for v in variants:
            cases.append(_train_case(p, f"{key}/{v}", label, recipe, v, overrides))

    cases: list[Case] = []
    shapes = [(128, 1)] if p.quick else [(64, 1), (128, 1), (128, 4), (256, 1), (256, 4)]
    for size, batch in shapes:
        data = [f'data.root="{p.work / f"unpaired{size}"}"', 'data.preprocess="crop"',
                f"data.load_size={size}", f"data.crop_size={size}", f"train.batch_size={batch}",
                "train.epochs=0", "train.epochs_decay=0"]
        # 64 px: only there to stand beside the reference's 64 px number.
        variants = ["fp32"] if size == 64 else train_variants(p, (size, batch) == (128, 1))
        if p.nnpack and size > 64:  # the paper's nets: fp32 takes NNPACK where auto says
            variants.append("fp32 oneDNN")
        add(f"train{size}b{batch}", f"cyclegan {size}px b{batch}", "cyclegan_horse2zebra.toml",
            data, variants)
        if (size, batch) == (128, 1):
            cases += cut_cases(p, data)
    if p.quick:
        return cases
    add("demo64b4", "cyclegan demo 64px b4", "cyclegan_demo.toml",
        [f'data.root="{p.work / "unpaired64"}"', "train.eval_every=0"], train_variants(p, False))
    for method in ("dcgan", "wgan_gp"):
        # torch.compile cannot do the gradient penalty's double backward (refused by the config).
        variants = [v for v in train_variants(p, False)
                    if not (method == "wgan_gp" and "compile" in v)]
        add(f"{method}64b64", f"{method} 64px b64", f"{method}.toml",
            [f'data.root="{p.work / "folder64"}"', "train.batch_size=64"], variants)
    return cases


CUT_VARIANTS = {  # issue #14: beside CycleGAN's fp32 step, in its group (timed side by side)
    "cut": [],
    "fastcut": ["model.lambda_nce=10", "model.nce_idt=false", "model.flip_equivariance=true"],
}


def cut_cases(p: Plan, data: list[str]) -> list[Case]:
    """One CUT and one FastCUT iteration of recipes/cut_horse2zebra.toml (ResNet-9 ngf 64,
    70x70 PatchGAN, PatchNCE on 5 feature points) in the 128 px batch 1 group: their speed-up
    is over the CycleGAN fp32 step taken beside them."""
    cases = []
    for name, sets in CUT_VARIANTS.items():
        key = f"train128b1/{name}"
        spec = {"recipe": "cut_horse2zebra.toml", "variant": "fp32", "count_flops": True,
                "overrides": [*data, *sets, "data.num_workers=0",
                              f'run_dir="{p.work / "runs" / key.replace("/", "_")}"',
                              *VARIANTS["fp32"]],
                "warmup": 2, "repeats": p.repeats, "budget": p.budget(), "threads": p.threads}
        cases.append(Case(key, "train", spec, f"{name} 128px b1 (speed-up: over cyclegan)",
                          f"{name} fp32"))
    return cases


def apply_cases(p: Plan) -> list[Case]:
    cases = []
    for size in (256,) if p.quick else (256, 1024):
        for backend, args in BACKENDS.items():
            if "bf16" in backend and not p.native or p.quick and backend == "torch bf16":
                continue  # quick: `torch auto` is the bf16 eager row where bf16 is native
            if "nnpack" in backend and (not p.nnpack or size > 256):
                continue  # at 1024 px `torch auto` is the NNPACK row where NNPACK is the default
            if size > 256 and backend in ("torch bf16", "torch fp32 compiled") and p.native:
                continue  # the rows that matter at 1024 px: fp32, auto, compiled in auto's, onnx
            spec = {"backend": backend, "args": args,
                    "model": str(p.work / "G.safetensors"),
                    "onnx": str(p.work / "G.onnx"), "input": str(p.work / f"photos{size}"),
                    "output": str(p.work / "out" / f"{size}_{backend.replace(' ', '_')}"),
                    "warmup": 1, "repeats": p.repeats, "budget": p.budget(),
                    "threads": p.threads}
            cases.append(Case(f"apply{size}/{backend}", "apply", spec, f"apply {size}px",
                              backend))
    return cases


def plan(p: Plan, only: str) -> list[Case]:
    budget = 6.0 if p.quick else 40.0
    cases = [Case(f"gemm/{d}", "gemm", {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[d],
                                        "budget": budget, "threads": p.threads}, "gemm n^3", d)
             for d in ("fp32", "bf16")]
    cases += train_cases(p)
    cases += apply_cases(p)
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        chosen = {c.group for c in cases if any(w in c.key for w in wanted)}
        # The GEMM rate is the ceiling every share is computed against, and a variant is
        # timed against the fp32 run of its case: both always come along.
        cases = [c for c in cases if c.kind == "gemm" or (c.group in chosen and (
            c.variant in BASE_VARIANTS or any(w in c.key for w in wanted)))]
    return cases


def prepare(work: Path, cases: list[Case]) -> dict[str, float]:
    """Write the synthetic data and the exported generator; returns G's forward FLOPs per
    image for each apply size (convs only, so they scale exactly with the pixel count)."""
    import torch
    from _common import export_resnet9, write_pngs, write_unpaired
    from torch.utils.flop_counter import FlopCounterMode

    keys = " ".join(c.key for c in cases)
    for size in (64, 128, 256):
        if f"train{size}" in keys or (size == 64 and "demo64" in keys):
            write_unpaired(work / f"unpaired{size}", size)
    if "dcgan" in keys or "wgan" in keys:
        write_pngs(work / "folder64", 64, 16, seed=3)
    if "apply" not in keys:
        return {}
    G, meta = export_resnet9(work / "G.safetensors")
    if "onnx" in keys:
        from translate.onnx_export import export_onnx

        export_onnx(G, meta, work / "G.onnx")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        G(torch.zeros(1, 3, 64, 64))
    flops = {}
    for size, count in ((256, 8), (1024, 2)):
        if f"apply{size}" in keys:
            write_pngs(work / f"photos{size}", size, count, seed=size)
            flops[f"apply{size}"] = counter.get_total_flops() * (size / 64) ** 2
    return flops


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 px b1 and apply 256 only")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of results")
    ap.add_argument("--only", default="", help="comma-separated substrings of case keys, "
                    "e.g. train128b1,apply256/onnx")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed steps per case (at least {MIN_STEPS}; default 5, full run 7)")
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads per process")
    ap.add_argument("--no-self-check", action="store_true",
                    help="skip the `translate train` subprocess runs")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each timed step, wait up to S seconds for the machine to be "
                    "idle (other jobs below 15%% CPU); for shared machines")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        from _speed_children import child_main

        child_main(*args.child)
        return 0
    repeats = max(args.repeats or (5 if args.quick else 7), MIN_STEPS)
    info = machine(args.threads)
    script = Path(__file__).resolve()
    with tempfile.TemporaryDirectory(prefix="translate-bench-") as tmp:
        p = Plan(Path(tmp), args.quick, bool(info["native_bf16"]), bool(info["nnpack"]),
                 repeats, args.threads)
        cases = plan(p, args.only)
        apply_flops = prepare(p.work, cases)
        for group in groups(cases):
            run_group(script, group, p.work, args.timeout, args.wait_idle)
        # Again at the end: the load changes during a long run and the ceiling is the best rate.
        for c in [c for c in cases if c.kind == "gemm"]:
            again = Case(c.key, c.kind, c.spec, c.label, c.variant)
            run_group(script, [again], p.work, args.timeout, args.wait_idle)
            if again.result.get("gflops", 0.0) > c.result.get("gflops", 0.0):
                c.result = again.result
        fill_derived(cases, apply_flops, max(
            (c.result.get("gflops", 0.0) for c in cases if c.kind == "gemm"), default=0))
        checked = ({} if args.no_self_check else
                   self_check(p.work, p.threads, cases, script, args.timeout))
    info["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    print_table(cases, info)
    s = summary(cases, info, checked)
    print_targets(s)
    if args.json:
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
