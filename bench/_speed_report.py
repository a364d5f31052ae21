"""The report of bench/speed.py: derived figures (median, speed-up, share of the ceiling), the
table, the headline JSON summary, the self-check and the issue's targets."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from _paired import Case
from _self_check import SELF_CHECK_TOLERANCE

BASE_VARIANTS = ("fp32", "torch fp32")  # first in their group; the others are timed against it
# The reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix, not vendored): figures
# quoted from the issues, with the machine they were measured on.
REFERENCE_MACHINE = "2-core Xeon with AMX, 2 threads (issue #18)"
REFERENCE = {
    "train64b1": "ref impl. 0.78 s/it, 1.6 GB (issue #6, AVX-512/AMX CPU)",
    "train128b1": f"ref impl. 1.93 s/it ({REFERENCE_MACHINE})",
    "apply256": "ref impl. G only 2.2 img/s (issue #6, AVX-512/AMX CPU)",
}
REFERENCE_TRAIN128_S = 1.93
TARGETS = {"train128_s": 0.45, "train128_rss_mb": 2000.0, "apply256_img_s": 15.0,
           "cut128_rss_share": 0.70}  # issue #14: CUT's peak RSS over CycleGAN's (fp32, 128 px)


def fill_derived(cases: list[Case], apply_flops: dict[str, float], ceiling: float) -> None:
    """Median times; FLOPs (counted on fp32, the same arithmetic for every variant); share of
    the ceiling."""
    flops = {c.group: c.result.get("flops") for c in cases if c.variant in BASE_VARIANTS}
    flops.update(apply_flops)
    for c in cases:
        r = c.result
        if "times" not in r:
            continue
        r["steps"] = len(r["times"])
        r["median_s"] = statistics.median(r["times"])
        r["cpu_median_s"] = statistics.median(r["cpu_times"])
        if c.variant in BASE_VARIANTS:
            r["speedup"] = 1.0
        r["flops"] = r.get("flops") or flops.get(c.group)  # CUT in CycleGAN's group: its own
        if r["flops"] and ceiling > 0:
            r["ceiling"] = r["flops"] / r["median_s"] / (ceiling * 1e9)


def variant_label(c: Case) -> str:
    """The variant as the table shows it: `auto` with what it resolved to here."""
    resolved = c.result.get("resolved")
    return f"{c.variant} = {resolved}" if "auto" in c.variant and resolved else c.variant


def _rate(c: Case, seconds: float) -> str:
    return f"{1 / seconds:.2f} img/s" if c.kind == "apply" else f"{seconds:.2f} s/it"


def _row(c: Case) -> list[str]:
    r = c.result
    if "error" in r:
        return [c.label, c.variant, "failed: " + r["error"][:60], "", "", "", "", "", "", "", ""]
    if c.kind == "gemm":
        return [c.label, c.variant, f"{r['gflops']:.1f} GFLOP/s at n={r['n']}", "", "", "", "",
                f"{r['rss_mb']:.0f}", "", "", ""]
    warm = r.get("warmup_s", 0.0)
    return [c.label, variant_label(c), _rate(c, r["median_s"]), _rate(c, r["cpu_median_s"]),
            f"{r['speedup']:.2f}x" if "speedup" in r else "",
            f"{r['flops'] / 1e9:.0f}" if r.get("flops") else "",
            f"{100 * r['ceiling']:.0f}%" if "ceiling" in r else "", f"{r['rss_mb']:.0f}",
            f"{warm:.0f}" if "compile" in c.variant else "",
            f"{1000 * r['data_s']:.0f}" if "data_s" in r else "",
            REFERENCE.get(c.group, "") if c.variant in BASE_VARIANTS else ""]


def print_table(cases: list[Case], info: dict[str, Any]) -> None:
    head = ["case", "variant", "time", "by CPU time", "speed-up", "GFLOP", "ceiling", "RSS MB",
            "warm-up s", "data ms", "reference"]
    rows = [head] + [_row(c) for c in cases]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print("\nmachine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    for i, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("time: median wall time of the timed steps (at least 5 per case); by CPU time: the "
          "same from the process's CPU seconds (with --threads 1, what a quiet machine's wall "
          "time would be); speed-up: over fp32 eager (torch fp32 for apply) of the same case, "
          "median ratio of alternated steps; GFLOP: per iteration or image; ceiling: FLOP/s "
          "over the best GEMM rate; warm-up: seconds before the first timed step (the compile); "
          "data ms: loading one iteration's batches in-process (decode + augment)")


def _best(cases: list[Case], group: str, recipe: str | None = None
          ) -> tuple[str | None, dict[str, Any]]:
    """The variant with the largest speed-up (timed side by side with fp32); of `recipe`'s
    runs only, if given (the CUT rows share CycleGAN's 128 px group)."""
    found = [(c.variant, c.result) for c in cases if c.group == group and "speedup" in c.result
             and (recipe is None or c.spec.get("recipe") == recipe)]
    return max(found, key=lambda vr: vr[1]["speedup"]) if found else (None, {})


def summary(cases: list[Case], info: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
    by_key = {c.key: c.result for c in cases}

    def rate(key: str) -> float | None:
        median = by_key.get(key, {}).get("median_s")
        return 1 / median if median else None

    out: dict[str, Any] = {"machine": info}
    for dtype in ("fp32", "bf16"):
        out[f"gemm_{dtype}_gflops"] = by_key.get(f"gemm/{dtype}", {}).get("gflops")
    fp32, auto = by_key.get("train128b1/fp32", {}), by_key.get("train128b1/auto", {})
    variant, top = _best(cases, "train128b1", "cyclegan_horse2zebra.toml")
    out.update(train128_fp32_s=fp32.get("median_s"), train128_auto_s=auto.get("median_s"),
               train128_auto_precision=auto.get("resolved"),
               train128_best_s=top.get("median_s"), train128_best_variant=variant,
               train128_best_speedup=top.get("speedup"), train128_peak_rss_mb=top.get("rss_mb"),
               train128_fp32_peak_rss_mb=fp32.get("rss_mb"),
               train128_reference_s=REFERENCE_TRAIN128_S, reference_machine=REFERENCE_MACHINE)
    for method in ("cut", "fastcut"):  # beside CycleGAN's fp32 step, also in fp32
        rss = by_key.get(f"train128b1/{method}", {}).get("rss_mb")
        out[f"{method}128_peak_rss_mb"] = rss
        out[f"{method}128_rss_share"] = rss / fp32["rss_mb"] if rss and fp32.get("rss_mb") else None
    native = bool(info.get("native_bf16"))
    variant, top = _best(cases, "apply256")
    out.update(apply256_fp32_img_s=rate("apply256/torch fp32"),
               apply256_auto_img_s=rate("apply256/torch auto"),
               apply256_auto_precision=by_key.get("apply256/torch auto", {}).get("resolved"),
               # compiled as auto runs here (bf16; else fp32, on NNPACK where that is the default)
               apply256_compiled_img_s=rate(
                   "apply256/torch bf16 compiled" if native else "apply256/torch fp32 nnpack "
                   "compiled" if info.get("nnpack_default") else "apply256/torch fp32 compiled"),
               apply256_fp32_compiled_img_s=rate("apply256/torch fp32 compiled"),
               apply256_nnpack_img_s=rate("apply256/torch fp32 nnpack"),
               apply256_nnpack_compiled_img_s=rate("apply256/torch fp32 nnpack compiled"),
               apply256_onnx_img_s=rate("apply256/onnx"),
               apply256_best_img_s=1 / top["median_s"] if top else None,
               apply256_best_variant=variant)
    out["self_check"] = checked
    out["rows"] = {c.key: {k: v for k, v in c.result.items() if k not in ("times", "cpu_times")}
                   for c in cases}
    return out


def print_targets(s: dict[str, Any]) -> None:
    def line(what: str, value: float | None, shown: str, ok: Callable[[float], bool]) -> None:
        verdict = "n/a" if value is None else "PASS" if ok(value) else "MISS"
        print(f"target {what}: {'-' if value is None else shown} {verdict}")

    for variant, r in s["self_check"].items():
        if "error" in r:
            print(f"self-check {variant}: {r['error']} MISS")
            continue
        print(f"self-check {variant}: bench {r['bench_s']:.2f} s/it (timed around the CLI run; "
              f"the table's {r['table_s']:.2f}), translate train {r['cli_s']:.2f} s/it "
              f"(precision {r.get('cli_precision', '?')}), ratio {r['ratio']:.2f} "
              f"{'PASS' if r['ok'] else 'MISS'} (within {SELF_CHECK_TOLERANCE:.0%})")
    t, rss, img_s = s["train128_best_s"], s["train128_peak_rss_mb"], s["apply256_best_img_s"]
    line(f"train 128 b1 <= {TARGETS['train128_s']} s/it", t,
         f"{t or 0:.2f} s/it ({s['train128_best_variant']}; {REFERENCE_TRAIN128_S / (t or 1):.1f}x "
         f"the reference's {REFERENCE_TRAIN128_S} s/it on {REFERENCE_MACHINE})",
         lambda v: v <= TARGETS["train128_s"])
    line(f"train 128 b1 peak RSS <= {TARGETS['train128_rss_mb']:.0f} MB", rss,
         f"{rss or 0:.0f} MB", lambda v: v <= TARGETS["train128_rss_mb"])
    line(f"apply 256 >= {TARGETS['apply256_img_s']:.0f} img/s", img_s,
         f"{img_s or 0:.2f} img/s ({s['apply256_best_variant']})",
         lambda v: v >= TARGETS["apply256_img_s"])
    for method in ("cut", "fastcut"):
        share = s.get(f"{method}128_rss_share")
        line(f"{method} 128 b1 peak RSS <= {TARGETS['cut128_rss_share']:.0%} of cyclegan's "
             "(fp32, issue #14)", share,
             f"{share or 0:.0%} ({s[f'{method}128_peak_rss_mb'] or 0:.0f} MB against "
             f"{s['train128_fp32_peak_rss_mb'] or 0:.0f})",
             lambda v: v <= TARGETS["cut128_rss_share"])
    fp32, compiled = s["apply256_fp32_img_s"], s["apply256_fp32_compiled_img_s"]
    if fp32 and compiled:
        print(f"apply 256 fp32 (as on a CPU without native bf16): compiled {compiled:.2f} vs "
              f"eager {fp32:.2f} img/s = {compiled / fp32:.2f}x")
    nn_eager, nn_compiled = s["apply256_nnpack_img_s"], s["apply256_nnpack_compiled_img_s"]
    if fp32 and nn_eager and nn_compiled:
        print(f"apply 256 fp32 on NNPACK: eager {nn_eager:.2f} img/s = {nn_eager / fp32:.2f}x, "
              f"compiled {nn_compiled:.2f} img/s = {nn_compiled / fp32:.2f}x oneDNN's eager")
