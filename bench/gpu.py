"""The README's GPU row, from one prepared run on a lent GPU (or on the CPU, as the tests run it).

    python bench/gpu.py [--size 128] [--steps 20] [--apply-size 256] [--apply-images 32]
                        [--train fp32,bf16,fp16,bf16+compile] [--apply fp32,bf16,bf16+compile]
                        [--set KEY=VALUE ...] [--cli-profile PATH] [--json]

On the machine's accelerator (CUDA when torch sees one, else the CPU), each case in a fresh
subprocess, one at a time, so its peak memory is its own:
- `train`: CycleGAN iterations of recipes/cyclegan_horse2zebra.toml at --size px batch 1 (the
  paper's ResNet-9 and 70x70 PatchGAN) through translate.runner.setup + loop.train_step, in
  fp32, bf16 or fp16 (accelerate's GradScaler; CUDA only), eager or `train.compile`: the median
  of --steps timed steps after 3 warm-up steps (with the compile), the device synchronised
  around each step; peak memory is torch's max_memory_allocated on CUDA, the peak RSS on a CPU.
- `apply`: an exported ResNet-9 (untrained, the paper's size) through load_generator +
  translate_folder on --apply-images PNGs of --apply-size px, decode + generator + encode,
  images/s over the second and third pass (the first compiles); and the generator alone on a
  batch of 8 on the device (images/s, synchronised).
- the self-check: `translate train` run as a user runs it on the same config as the first
  training case, its own per-step rate (log.jsonl) beside the bench's, PASS where they agree
  within bench/_self_check.py's tolerance (15%), as bench/speed.py's (`self_check_pass`).
`--cli-profile PATH`: the self-check's run again under cProfile, its stats in PATH and its top
functions printed (where `translate train` spends what the bench's step does not).
`--set` overrides every training case's recipe (tiny nets for a smoke run:
`--set model.ngf=8 --set model.n_blocks=1 --set model.ndf=8`). `--json` ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from a checkout that is not pip-installed
        sys.path.insert(0, str(p))

TRAIN = {  # case -> (train.mixed_precision, train.compile)
    "fp32": ("no", False), "bf16": ("bf16", False), "fp16": ("fp16", False),
    "bf16+compile": ("bf16", True), "fp16+compile": ("fp16", True)}
APPLY = {  # case -> (load_generator precision, compile)
    "fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True),
    "fp32+compile": ("fp32", True)}
WARMUP = 3


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mb(device) -> float:
    import torch
    from _common import peak_rss_mb

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def _median_s(call, device, repeats: int) -> float:
    """Median seconds of `repeats` calls, the device synchronised after each (and before)."""
    from _common import time_calls

    def synced():
        call()
        _sync(device)

    _sync(device)
    return statistics.median(time_calls(synced, 0, repeats, float("inf")))


def train_case(spec: dict[str, Any]) -> dict[str, Any]:
    from _common import train_steps

    s, _, step = train_steps("cyclegan_horse2zebra.toml", spec["sets"])
    device = s.accelerator.device
    began = time.perf_counter()
    for _ in range(WARMUP):
        step()
    _sync(device)
    warm = time.perf_counter() - began
    median = _median_s(step, device, spec["steps"])
    return {"median_s": median, "warmup_s": warm, "peak_mb": _peak_mb(device),
            "device": str(device), "precision": s.accelerator.mixed_precision,
            "compiled": s.compiled}


def apply_case(spec: dict[str, Any]) -> dict[str, Any]:
    import torch
    from _common import apply_folder

    from translate.infer import load_generator

    gen = load_generator(spec["model"], precision=spec["precision"], compile=spec["compile"])
    device = gen.forward.device

    def folder():
        return apply_folder(gen, spec["input"], spec["output"])

    began = time.perf_counter()
    folder()  # the compile, where compiled
    warm = time.perf_counter() - began
    seconds = _median_s(folder, device, 2)
    x = torch.rand(8, 3, spec["size"], spec["size"], device=device) * 2 - 1
    gen.forward(x)
    alone = _median_s(lambda: gen.forward(x), device, 5)
    return {"img_s": spec["images"] / seconds, "alone_img_s": 8 / alone, "warmup_s": warm,
            "peak_mb": _peak_mb(device), "device": str(device), "precision": gen.precision}


def self_check(spec: dict[str, Any], work: Path, profile: Path | None = None) -> float | None:
    """translate train's own median s/it on the first training case's config. With `profile`,
    the same run again under cProfile (its stats written there, its top functions printed):
    where translate train spends what the bench's in-process step does not."""
    from _self_check import cli_seconds_per_step, train_command

    def cli(run_dir: Path, prefix: tuple[str, ...] = ()) -> Path:
        sets = [*spec["sets"], f'run_dir="{run_dir}"', "train.sample_every=100000",
                "train.save_every=100000"]
        cmd = train_command(ROOT / "recipes" / "cyclegan_horse2zebra.toml", sets,
                            spec["steps"], prefix)
        subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600, check=False)
        return run_dir / "log.jsonl"

    cli_s = cli_seconds_per_step(cli(work / "selfcheck"))
    if profile is not None:
        cli(work / "selfcheck_profiled", ("-m", "cProfile", "-o", str(profile)))
        if profile.is_file():
            stats = pstats.Stats(str(profile))
            print(f"\ntranslate train under cProfile ({profile}), by cumulative time:")
            stats.sort_stats("cumulative").print_stats(25)
    return cli_s


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """One case in a fresh subprocess: its result, or {"error": the last line it printed}."""
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, timeout=3600, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--apply-size", type=int, default=256)
    ap.add_argument("--apply-images", type=int, default=32)
    ap.add_argument("--train", default="fp32,bf16,fp16,bf16+compile")
    ap.add_argument("--apply", default="fp32,bf16,bf16+compile")
    ap.add_argument("--ngf", type=int, default=64, help="the apply generator's width")
    ap.add_argument("--blocks", type=int, default=9, help="the apply generator's blocks")
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cli-profile", type=Path, default=None,
                    help="also run the self-check's translate train under cProfile, stats here")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        kind, spec = args.worker
        print(json.dumps((train_case if kind == "train" else apply_case)(json.loads(spec))))
        return 0

    import torch

    cuda = torch.cuda.is_available()
    where = torch.cuda.get_device_name(0) if cuda else "CPU (no CUDA device)"
    print(f"device: {where}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rows, checked = train_rows(args, work, cuda)
        rows.update(apply_rows(args, work))
        key, spec = checked or (None, None)
        cli_s = self_check(spec, work, args.cli_profile) if spec else None
    verdict = check_verdict(rows.get(key or "", {}), cli_s)
    print_table(rows, where, args, key, cli_s, verdict)
    if args.json:
        print(json.dumps({"device": where, "cli_s": cli_s, "self_check_pass": verdict, **rows}))
    return 0


def train_rows(args: argparse.Namespace, work: Path, cuda: bool
               ) -> tuple[dict[str, dict[str, Any]], tuple[str, dict[str, Any]] | None]:
    """The training cases' rows, and (row, spec) of the first one that ran: the self-check's."""
    from _common import write_unpaired

    data = write_unpaired(work / "unpaired", args.size)
    rows: dict[str, dict[str, Any]] = {}
    checked = None
    for case in [c for c in args.train.split(",") if c]:
        precision, compiled = TRAIN[case]
        if precision == "fp16" and not cuda:
            rows[f"train/{case}"] = {"error": "fp16 training needs a CUDA device"}
            continue
        sets = [f'data.root="{data}"', 'data.preprocess="crop"',
                f"data.load_size={args.size}", f"data.crop_size={args.size}",
                "train.batch_size=1", "data.num_workers=0", "train.eval_every=0",
                f'train.mixed_precision="{precision}"', f"train.compile={str(compiled).lower()}",
                f'run_dir="{work / "runs" / case}"', *args.sets]
        spec = {"sets": sets, "steps": args.steps}
        checked = checked or (f"train/{case}", spec)
        rows[f"train/{case}"] = run_worker("train", spec)
        print(f"train/{case}: {rows[f'train/{case}']}", flush=True)
    return rows, checked


def apply_rows(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """The apply cases' rows, on an exported ResNet and PNGs written for them."""
    from _common import export_resnet9, write_pngs

    model = work / "G.safetensors"
    export_resnet9(model, args.ngf, args.blocks)
    write_pngs(work / "photos", args.apply_size, args.apply_images, seed=5)
    rows: dict[str, dict[str, Any]] = {}
    for case in [c for c in args.apply.split(",") if c]:
        precision, compiled = APPLY[case]
        spec = {"model": str(model), "input": str(work / "photos"),
                "output": str(work / "out" / case), "precision": precision,
                "compile": compiled, "size": args.apply_size, "images": args.apply_images}
        rows[f"apply/{case}"] = run_worker("apply", spec)
        print(f"apply/{case}: {rows[f'apply/{case}']}", flush=True)
    return rows


def check_verdict(bench: dict[str, Any], cli_s: float | None) -> bool | None:
    """Whether translate train's s/it agrees with the bench row's within the bench's tolerance
    (bench/_self_check.py); None where either figure is missing."""
    from _self_check import agrees

    if "median_s" not in bench or not cli_s:
        return None
    return agrees(cli_s, bench["median_s"])


def print_table(rows: dict[str, dict[str, Any]], where: str, args: argparse.Namespace,
                checked: str | None, cli_s: float | None, verdict: bool | None) -> None:
    from _self_check import SELF_CHECK_TOLERANCE

    print(f"\n{where}: CycleGAN {args.size} px batch 1 (s/it), apply {args.apply_size} px "
          "(img/s end to end; generator alone, batch 8)\n")
    print("| case | figure | warm-up s | peak MB | precision |\n|---|---|---:|---:|---|")
    for key, r in rows.items():
        if "error" in r:
            print(f"| {key} | {r['error']} | | | |")
            continue
        figure = (f"{r['median_s']:.3f} s/it" if "median_s" in r
                  else f"{r['img_s']:.1f} img/s (alone {r['alone_img_s']:.1f})")
        print(f"| {key} | {figure} | {r['warmup_s']:.0f} | {r['peak_mb']:.0f} | "
              f"{r['precision']} |")
    if checked is not None:
        bench = rows[checked]
        if verdict is not None:
            print(f"\nself-check: bench {bench['median_s']:.3f} s/it, translate train "
                  f"{cli_s:.3f} s/it (ratio {cli_s / bench['median_s']:.2f}): "
                  f"{'PASS' if verdict else 'FAIL'} (within {SELF_CHECK_TOLERANCE:.0%})")
        else:
            print("\nself-check: no figure (see the rows above)")


if __name__ == "__main__":
    sys.exit(main())
