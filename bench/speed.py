"""Speed benchmark (issue #6): training iterations, `apply` throughput and the machine's ceiling.

    python bench/speed.py [--quick] [--json] [--only KEY,KEY] [--repeats N]

Measures, each in a fresh subprocess (so the peak RSS is the variant's own), with every variant
stepped in alternation with a live fp32 process of the same case (so its speed-up holds while
other jobs on a shared machine come and go):
- the machine's ceiling: fp32 and bf16 n x n x n matmul rates (n = 4096 unless too slow);
- a full CycleGAN iteration with the paper's nets (ResNet-9 ngf 64, 70x70 PatchGAN) through the
  real loop (translate.core.loop.setup + train_step) at 128 and 256 px, batch 1 and 4, for
  fp32 eager, bf16 autocast, channels_last, torch.compile and the Winograd prototype;
- a DCGAN and a WGAN-GP iteration (5 critic steps) at 64 px, batch 64;
- `apply` end to end (translate_folder on PNGs: decode, generator, encode) at 256 and 1024 px
  for torch fp32, torch bf16, onnx and torch fp32 + Winograd.

Times are medians over repeats after warm-up; speed-ups are ratios of medians of the
alternated steps; FLOPs are counted with FlopCounterMode on the
fp32 eager run; "ceiling" is achieved FLOP/s over the best GEMM rate. `--quick` keeps 128 px
batch 1 and apply at 256 px, one repeat, fp32 DCGAN/WGAN-GP, no bf16 where the CPU lacks it.
The machine is shared: compare ratios within one run; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from a checkout that is not pip-installed
        sys.path.insert(0, str(p))

THREADS = 2
# Train variants: config overrides, plus the bench-only Winograd prototype (marked *).
VARIANTS: dict[str, list[str]] = {
    "fp32": [],
    "bf16": ['train.mixed_precision="bf16"'],
    "channels_last": ["train.channels_last=true"],
    "compile": ["train.compile=true"],
    "winograd*": [],
}
BACKENDS = ("torch fp32", "torch bf16", "onnx", "torch fp32 winograd*")
BASE_VARIANTS = ("fp32", "torch fp32")  # listed first in their group; others are timed against it
# Measured by the author for the reference implementation (fp32, batch 1).
REFERENCE = {
    "train64b1": "ref impl. 0.78 s/it, 1.6 GB",
    "train128b1": "ref impl. 2.38 s/it, 2.0 GB",
    "apply256": "ref G only 0.45 s/img = 2.2 img/s",
}
TARGETS = {"train128_speedup": 3.0, "train128_rss_mb": 2000.0, "apply256_img_s": 8.0}


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


# ------------------------------------------------------------------------------- children
# Each sets up one case in a fresh process and returns (one timed unit, final report).


def child_gemm(spec: dict[str, Any]) -> tuple[Callable[[], int], Callable[[], dict]]:
    import torch
    from _common import gemm_gflops, peak_rss_mb

    rate, n = gemm_gflops(getattr(torch, spec["dtype"]), budget_s=spec["budget"])
    return lambda: 1, lambda: {"gflops": rate, "n": n, "rss_mb": peak_rss_mb()}


def child_train(spec: dict[str, Any]) -> tuple[Callable[[], int], Callable[[], dict]]:
    from _common import install_winograd, peak_rss_mb
    from torch.utils.flop_counter import FlopCounterMode

    from translate import config
    from translate.core import checkpoint, loop

    if spec["variant"] == "winograd*":
        install_winograd()
    cfg = config.load(ROOT / "recipes" / spec["recipe"], spec["overrides"])
    s = loop.setup(cfg)
    state = checkpoint.TrainState(fingerprint="bench")
    batches = loop.Batches(cfg, s.dataset, s.accelerator, 0)

    def step() -> int:
        loop.train_step(s, state, batches)
        return 1

    def finish() -> dict[str, Any]:
        flops = None
        if spec["count_flops"]:
            with FlopCounterMode(display=False) as counter:
                step()
            flops = counter.get_total_flops()
        return {"flops": flops, "rss_mb": peak_rss_mb()}

    for _ in range(spec["warmup"]):
        step()
    return step, finish


def child_apply(spec: dict[str, Any]) -> tuple[Callable[[], int], Callable[[], dict]]:
    from _common import install_winograd, peak_rss_mb

    from translate.export import load_generator
    from translate.infer import translate_folder

    backend = spec["backend"]
    if backend.endswith("winograd*"):
        install_winograd()
    path = spec["onnx"] if backend == "onnx" else spec["model"]
    gen = load_generator(path, backend="onnx" if backend == "onnx" else "torch",
                         precision="bf16" if "bf16" in backend else "fp32")

    def run() -> int:
        report = translate_folder(gen.forward, gen.info, spec["input"], spec["output"],
                                  overwrite=True, progress=False)
        if report.failed:
            raise RuntimeError(f"apply failed: {report.failed[0][1]}")
        return report.translated

    for _ in range(spec["warmup"]):
        run()
    return run, lambda: {"rss_mb": peak_rss_mb()}


CHILDREN = {"gemm": child_gemm, "train": child_train, "apply": child_apply}


def child_main(kind: str, spec_json: str) -> None:
    import torch
    from _common import serve

    torch.set_num_threads(THREADS)
    serve(*CHILDREN[kind](json.loads(spec_json)))


def run_group(group: list[Case], work: Path, timeout: float, idle_wait: float = 0.0) -> None:
    """Measure the cases of one shape. The first (fp32) child stays alive and each other
    variant alternates steps with it, so every speed-up compares steps taken side by side."""
    from _common import ChildError, Worker, wait_for_idle

    script = Path(__file__).resolve()
    busy: list[float] = []

    def quiet() -> None:
        if idle_wait > 0:
            busy.append(wait_for_idle(idle_wait))

    base, others = group[0], group[1:]

    def start(c: Case) -> Worker:
        return Worker(script, c.kind, c.spec, work / f"{c.key.replace('/', '_')}.log", timeout)

    try:
        bw = start(base)
    except ChildError as e:
        for c in group:
            c.result = {"error": str(e)}
        return
    base_times: list[float] = []
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
                c.result["times"] = [v for _, v in pairs]
                c.result["speedup"] = (statistics.median(b for b, _ in pairs)
                                       / statistics.median(c.result["times"]))
                base_times += [b for b, _ in pairs]
            except ChildError as e:
                c.result = {"error": str(e)}
                if w is not None:
                    w.kill()
            _progress(c, t)
        t = time.perf_counter()
        base.result = bw.close()
        if base_times:
            base.result["times"] = base_times
        if busy:  # how busy the machine was just before the timed steps
            base.result["busy_before_steps"] = round(statistics.median(busy), 2)
        _progress(base, t)
    except ChildError as e:
        base.result = {"error": f"fp32 reference failed: {e}"}
        bw.kill()


def _pair(base: Any, other: Any) -> tuple[float, float]:
    """(base step time, other step time), run in a random order: a load that rises or falls
    during the pair then favours neither on average."""
    if random.random() < 0.5:
        return base.step(), other.step()
    t_other = other.step()
    return base.step(), t_other


def _repeat(fn: Callable[[], list], spec: dict[str, Any], before: Callable[[], None]) -> list:
    """fn() `repeats` times, fewer (at least once) when they would overrun the budget;
    `before()` (waiting for a quiet machine) runs ahead of each and is not counted."""
    out: list = []
    spent = 0.0
    while len(out) < spec.get("repeats", 1):
        before()
        t = time.perf_counter()
        out += fn()
        last = time.perf_counter() - t
        spent += last
        if spent + last > spec["budget"]:
            break
    return out


def _progress(c: Case, start: float) -> None:
    print(f"[{time.perf_counter() - start:6.0f} s] {c.key}: {c.result.get('error') or 'ok'}",
          file=sys.stderr, flush=True)


# -------------------------------------------------------------------------------- planning


def _train_case(work: Path, quick: bool, native_bf16: bool, repeats: int, key: str,
                label: str, recipe: str, variant: str, overrides: list[str]) -> Case:
    slow_bf16 = variant == "bf16" and not native_bf16
    warmup = {"compile": 3, "bf16": 1 if slow_bf16 else 2}.get(variant, 2) - (1 if quick else 0)
    spec = {"recipe": recipe, "variant": variant, "count_flops": variant == "fp32",
            "overrides": [*overrides, "data.num_workers=0",
                          f'run_dir="{work / "runs" / key.replace("/", "_")}"',
                          *VARIANTS[variant]],
            "warmup": max(warmup, 1), "repeats": 1 if slow_bf16 else repeats,
            "budget": 20.0 if quick else 150.0}
    return Case(key, "train", spec, label, variant)


def train_cases(work: Path, quick: bool, native_bf16: bool, repeats: int) -> list[Case]:
    cases = []
    shapes = [(128, 1)] if quick else [(64, 1), (128, 1), (128, 4), (256, 1), (256, 4)]
    for size, batch in shapes:
        for variant in VARIANTS:
            if size == 64 and variant != "fp32":
                continue  # only there to stand beside the reference's 64 px number
            if variant == "bf16" and not native_bf16 and (quick or (size, batch) != (128, 1)):
                continue  # ~10x slower without bf16 hardware: measured once, at 128 px b1
            data = [f'data.root="{work / f"unpaired{size}"}"', 'data.preprocess="crop"',
                    f"data.load_size={size}", f"data.crop_size={size}",
                    f"train.batch_size={batch}", "train.epochs=0", "train.epochs_decay=0"]
            cases.append(_train_case(work, quick, native_bf16, repeats,
                                     f"train{size}b{batch}/{variant}",
                                     f"cyclegan {size}px b{batch}", "cyclegan_horse2zebra.toml",
                                     variant, data))
    for method in ("dcgan", "wgan_gp"):
        for variant in VARIANTS:
            if variant == "winograd*" or (variant != "fp32" and quick):
                continue  # no 3x3 stride-1 convs in the DCGAN nets
            if variant == "bf16" and not native_bf16:
                continue
            data = [f'data.root="{work / "folder64"}"', "train.batch_size=64"]
            cases.append(_train_case(work, quick, native_bf16, repeats,
                                     f"{method}64b64/{variant}", f"{method} 64px b64",
                                     f"{method}.toml", variant, data))
    return cases


def apply_cases(work: Path, quick: bool, native_bf16: bool, repeats: int) -> list[Case]:
    cases = []
    for size in (256,) if quick else (256, 1024):
        for backend in BACKENDS:
            slow_bf16 = backend == "torch bf16" and not native_bf16
            if slow_bf16 and size > 256:
                continue
            spec = {"backend": backend, "model": str(work / "G.safetensors"),
                    "onnx": str(work / "G.onnx"), "input": str(work / f"photos{size}"),
                    "output": str(work / "out" / f"{size}_{backend.replace(' ', '_')}"),
                    "warmup": 1 if size <= 256 and not slow_bf16 else 0,
                    "repeats": 1 if slow_bf16 else repeats, "budget": 20.0 if quick else 150.0}
            cases.append(Case(f"apply{size}/{backend}", "apply", spec, f"apply {size}px",
                              backend))
    return cases


def prepare(work: Path, quick: bool, cases: list[Case]) -> dict[str, float]:
    """Write the synthetic data and the exported generator; returns G's forward FLOPs per
    image for each apply size (convs only, so they scale exactly with the pixel count)."""
    import torch
    from _common import write_pngs, write_unpaired
    from safetensors.torch import save_file
    from torch.utils.flop_counter import FlopCounterMode

    from translate import config
    from translate.export import metadata
    from translate.nets import build_net, init_weights

    keys = " ".join(c.key for c in cases)
    for size in (64, 128, 256):
        if f"train{size}" in keys:
            write_unpaired(work / f"unpaired{size}", size)
    if "dcgan" in keys or "wgan" in keys:
        write_pngs(work / "folder64", 64, 16, seed=3)
    flops: dict[str, float] = {}
    if "apply" not in keys:
        return flops
    torch.manual_seed(0)
    G = build_net("resnet", ngf=64, n_blocks=9)
    init_weights(G, 0.02)
    G.eval()
    cfg = config.load(ROOT / "recipes" / "cyclegan_horse2zebra.toml")
    meta = metadata(G, cfg, "G_ab", {"from": "A", "to": "B"}, 0, False)
    save_file({k: v.contiguous() for k, v in G.state_dict().items()},
              str(work / "G.safetensors"), meta)
    if "onnx" in keys:
        from translate.onnx_export import export_onnx

        export_onnx(G, meta, work / "G.onnx")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        G(torch.zeros(1, 3, 64, 64))
    for size, count in ((256, 4 if quick else 8), (1024, 2)):
        if f"apply{size}" in keys:
            write_pngs(work / f"photos{size}", size, count, seed=size)
            flops[f"apply{size}"] = counter.get_total_flops() * (size / 64) ** 2
    return flops


# --------------------------------------------------------------------------------- report


def fill_derived(cases: list[Case], apply_flops: dict[str, float], ceiling: float) -> None:
    """Median times; FLOPs (counted on fp32 eager, the same arithmetic for every variant);
    share of the ceiling."""
    flops = {c.group: c.result.get("flops") for c in cases if c.variant in BASE_VARIANTS}
    flops.update(apply_flops)
    for c in cases:
        r = c.result
        if "times" not in r:
            continue
        r["median_s"] = statistics.median(r["times"])
        if c.variant in BASE_VARIANTS:
            r["speedup"] = 1.0
        r["flops"] = flops.get(c.group)
        if r["flops"] and ceiling > 0:
            r["ceiling"] = r["flops"] / r["median_s"] / (ceiling * 1e9)


def _row(c: Case) -> list[str]:
    r = c.result
    if "error" in r:
        return [c.label, c.variant, "failed: " + r["error"], "", "", "", "", ""]
    if c.kind == "gemm":
        return [c.label, c.variant, f"{r['gflops']:.1f} GFLOP/s at n={r['n']}", "", "", "",
                f"{r['rss_mb']:.0f}", ""]
    t = r["median_s"]
    timing = f"{1 / t:.2f} img/s" if c.kind == "apply" else f"{t:.2f} s/it"
    return [c.label, c.variant, timing, f"{r['speedup']:.2f}x" if "speedup" in r else "",
            f"{r['flops'] / 1e9:.0f}" if r.get("flops") else "",
            f"{100 * r['ceiling']:.0f}%" if "ceiling" in r else "", f"{r['rss_mb']:.0f}",
            REFERENCE.get(c.group, "") if c.variant in BASE_VARIANTS else ""]


def print_table(cases: list[Case], info: dict[str, Any]) -> None:
    head = ["case", "variant", "time", "speed-up", "GFLOP", "ceiling", "RSS MB", "reference"]
    rows = [head] + [_row(c) for c in cases]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print(f"\nmachine: {info}")
    for i, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("speed-up: vs fp32 eager (torch fp32 for apply) of the same case; GFLOP: per "
          "iteration or image; ceiling: FLOP/s over the best GEMM rate; *: bench-only "
          "prototype (bench/_common.py), not yet in translate")


def summary(cases: list[Case], info: dict[str, Any]) -> dict[str, Any]:
    by_key = {c.key: c.result for c in cases}

    def best(group: str) -> tuple[str | None, dict[str, Any]]:
        """The variant with the largest speed-up (timed side by side with fp32)."""
        found = [(c.variant, c.result) for c in cases
                 if c.group == group and "speedup" in c.result]
        return max(found, key=lambda vr: vr[1]["speedup"]) if found else (None, {})

    out: dict[str, Any] = {"machine": info}
    for dtype in ("fp32", "bf16"):
        out[f"gemm_{dtype}_gflops"] = by_key.get(f"gemm/{dtype}", {}).get("gflops")
    fp32 = by_key.get("train128b1/fp32", {})
    variant, best_r = best("train128b1")
    out.update(train128_fp32_s=fp32.get("median_s"), train128_best_s=best_r.get("median_s"),
               train128_best_variant=variant, train128_best_speedup=best_r.get("speedup"),
               train128_peak_rss_mb=best_r.get("rss_mb"),
               train128_fp32_peak_rss_mb=fp32.get("rss_mb"))
    a32 = by_key.get("apply256/torch fp32", {})
    variant, best_a = best("apply256")
    out.update(apply256_fp32_img_s=1 / a32["median_s"] if "median_s" in a32 else None,
               apply256_best_img_s=1 / best_a["median_s"] if best_a else None,
               apply256_best_variant=variant)
    out["rows"] = {c.key: {k: v for k, v in c.result.items() if k != "times"} for c in cases}
    return out


def print_targets(s: dict[str, Any]) -> None:
    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    speedup = s["train128_best_speedup"]
    rss, img_s = s["train128_peak_rss_mb"], s["apply256_best_img_s"]
    print(f"target train 128 b1 >= {TARGETS['train128_speedup']:.0f}x fp32 eager: "
          f"{'-' if speedup is None else f'{speedup:.2f}x'} ({s['train128_best_variant']}) "
          f"{verdict(None if speedup is None else speedup >= TARGETS['train128_speedup'])}")
    print(f"target train 128 b1 peak RSS <= {TARGETS['train128_rss_mb']:.0f} MB: "
          f"{'-' if rss is None else f'{rss:.0f} MB'} "
          f"{verdict(None if rss is None else rss <= TARGETS['train128_rss_mb'])}")
    print(f"target apply 256 >= {TARGETS['apply256_img_s']:.0f} img/s: "
          f"{'-' if img_s is None else f'{img_s:.2f} img/s'} ({s['apply256_best_variant']}) "
          f"{verdict(None if img_s is None else img_s >= TARGETS['apply256_img_s'])}")


# ----------------------------------------------------------------------------------- main


def plan(work: Path, args: argparse.Namespace, native_bf16: bool) -> list[Case]:
    budget = 6.0 if args.quick else 40.0
    cases = [Case(f"gemm/{d}", "gemm", {"dtype": {"fp32": "float32", "bf16": "bfloat16"}[d],
                                        "budget": budget}, "gemm n^3", d)
             for d in ("fp32", "bf16")]
    cases += train_cases(work, args.quick, native_bf16, args.repeats)
    cases += apply_cases(work, args.quick, native_bf16, args.repeats)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        # The GEMM rate is the ceiling every share is computed against: always measured.
        chosen = {c.group for c in cases if any(w in c.key for w in wanted)}
        # The GEMM rate is the ceiling every share is computed against, and a variant is
        # timed against the fp32 run of its case: both always come along.
        cases = [c for c in cases if c.kind == "gemm" or (c.group in chosen and (
            c.variant in BASE_VARIANTS or any(w in c.key for w in wanted)))]
    return cases


def groups(cases: list[Case]) -> list[list[Case]]:
    """Cases by group, in order; the GEMM cases each alone."""
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(c.key if c.kind == "gemm" else c.group, []).append(c)
    return list(out.values())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 px b1 and apply 256 only, 1 repeat")
    ap.add_argument("--json", action="store_true", help="end with one JSON line of results")
    ap.add_argument("--only", default="", help="comma-separated substrings of case keys, "
                    "e.g. train128b1,apply256/onnx")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                    help="before each timed step, wait up to S seconds for the machine to be "
                    "idle (other jobs below 15%% CPU); for shared machines")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return 0
    args.repeats = args.repeats or (1 if args.quick else 5)
    from _common import machine

    info = machine()
    info["threads"] = THREADS
    with tempfile.TemporaryDirectory(prefix="translate-bench-") as tmp:
        work = Path(tmp)
        cases = plan(work, args, bool(info["native_bf16"]))
        apply_flops = prepare(work, args.quick, cases)
        for group in groups(cases):
            run_group(group, work, args.timeout, args.wait_idle)
        # Again at the end: the load changes during a long run and the ceiling is the best rate.
        for c in [c for c in cases if c.kind == "gemm"]:
            again = Case(c.key, c.kind, c.spec, c.label, c.variant)
            run_group([again], work, args.timeout)
            if again.result.get("gflops", 0.0) > c.result.get("gflops", 0.0):
                c.result = again.result
    gemm = [c.result.get("gflops", 0.0) for c in cases if c.kind == "gemm"]
    info["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    fill_derived(cases, apply_flops, max(gemm, default=0.0))
    print_table(cases, info)
    s = summary(cases, info)
    print_targets(s)
    if args.json:
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
