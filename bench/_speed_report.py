"""The report of bench/speed.py: derived figures (median, speed-up, share of the ceiling), the
table, the headline JSON summary and the issue's targets."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

from _common import Case

BASE_VARIANTS = ("fp32", "torch fp32")  # first in their group; the others are timed against it
# Measured by the author for the reference implementation (fp32, batch 1).
REFERENCE = {
    "train64b1": "ref impl. 0.78 s/it, 1.6 GB",
    "train128b1": "ref impl. 2.38 s/it, 2.0 GB",
    "apply256": "ref G only 0.45 s/img = 2.2 img/s",
}
TARGETS = {"train128_speedup": 3.0, "train128_rss_mb": 2000.0, "apply256_img_s": 8.0}


def fill_derived(cases: list[Case], apply_flops: dict[str, float], ceiling: float) -> None:
    """Median times; FLOPs (counted on fp32, the same arithmetic for every variant); share of
    the ceiling."""
    flops = {c.group: c.result.get("flops") for c in cases if c.variant in BASE_VARIANTS}
    flops.update(apply_flops)
    for c in cases:
        r = c.result
        if "times" not in r:
            continue
        r["median_s"] = statistics.median(r["times"])
        if c.variant in BASE_VARIANTS:
            r["speedup"] = 1.0
        r["flops"] = r.get("flops") or flops.get(c.group)  # CUT in CycleGAN's group: its own
        if r["flops"] and ceiling > 0:
            r["ceiling"] = r["flops"] / r["median_s"] / (ceiling * 1e9)


def _row(c: Case) -> list[str]:
    r = c.result
    if "error" in r:
        return [c.label, c.variant, "failed: " + r["error"][:60], "", "", "", "", "", ""]
    if c.kind == "gemm":
        return [c.label, c.variant, f"{r['gflops']:.1f} GFLOP/s at n={r['n']}", "", "", "",
                f"{r['rss_mb']:.0f}", "", ""]
    t = r["median_s"]
    return [c.label, c.variant, f"{1 / t:.2f} img/s" if c.kind == "apply" else f"{t:.2f} s/it",
            f"{r['speedup']:.2f}x" if "speedup" in r else "",
            f"{r['flops'] / 1e9:.0f}" if r.get("flops") else "",
            f"{100 * r['ceiling']:.0f}%" if "ceiling" in r else "", f"{r['rss_mb']:.0f}",
            f"{1000 * r['data_s']:.0f}" if "data_s" in r else "",
            REFERENCE.get(c.group, "") if c.variant in BASE_VARIANTS else ""]


def print_table(cases: list[Case], info: dict[str, Any]) -> None:
    head = ["case", "variant", "time", "speed-up", "GFLOP", "ceiling", "RSS MB", "data ms",
            "reference"]
    rows = [head] + [_row(c) for c in cases]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    print("\nmachine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    for i, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print("speed-up: over fp32 eager (torch fp32 for apply) of the same case, median ratio of "
          "alternated steps; GFLOP: per iteration or image; ceiling: FLOP/s over the best GEMM "
          "rate; data ms: loading one iteration's batches in-process (decode + augment), the "
          "most the data pipeline could cost a step")


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
    variant, top = best("train128b1")
    out.update(train128_fp32_s=fp32.get("median_s"), train128_best_s=top.get("median_s"),
               train128_best_variant=variant, train128_best_speedup=top.get("speedup"),
               train128_peak_rss_mb=top.get("rss_mb"), train128_fp32_peak_rss_mb=fp32.get("rss_mb"))
    for name in ("cut", "fastcut"):  # timed beside the CycleGAN fp32 step (issue #14)
        r = by_key.get(f"train128b1/{name}", {})
        out.update({f"train128_{name}_s": r.get("median_s"),
                    f"train128_{name}_speedup_over_cyclegan": r.get("speedup"),
                    f"train128_{name}_peak_rss_mb": r.get("rss_mb")})
    a32 = by_key.get("apply256/torch fp32", {})
    variant, top = best("apply256")
    out.update(apply256_fp32_img_s=1 / a32["median_s"] if "median_s" in a32 else None,
               apply256_best_img_s=1 / top["median_s"] if top else None,
               apply256_best_variant=variant)
    out["rows"] = {c.key: {k: v for k, v in c.result.items() if k != "times"} for c in cases}
    return out


def print_targets(s: dict[str, Any]) -> None:
    def line(what: str, value: float | None, shown: str, ok: Callable[[float], bool]) -> None:
        verdict = "n/a" if value is None else "PASS" if ok(value) else "MISS"
        print(f"target {what}: {'-' if value is None else shown} {verdict}")

    x, rss, img_s = s["train128_best_speedup"], s["train128_peak_rss_mb"], s["apply256_best_img_s"]
    line(f"train 128 b1 >= {TARGETS['train128_speedup']:.0f}x fp32 eager", x,
         f"{x or 0:.2f}x ({s['train128_best_variant']})", lambda v: v >= TARGETS["train128_speedup"])
    line(f"train 128 b1 peak RSS <= {TARGETS['train128_rss_mb']:.0f} MB", rss, f"{rss or 0:.0f} MB",
         lambda v: v <= TARGETS["train128_rss_mb"])
    line(f"apply 256 >= {TARGETS['apply256_img_s']:.0f} img/s", img_s,
         f"{img_s or 0:.2f} img/s ({s['apply256_best_variant']})",
         lambda v: v >= TARGETS["apply256_img_s"])
