"""`translate eval`'s command line: which evaluation a command line asks for, and the table
(or JSON object) it prints. The evaluations themselves are in translate/eval/evaluate.py.

    translate eval runs/demo                 CycleGAN: PSNR/SSIM vs the known truth (demo data),
                                             do-nothing baseline, cycle reconstruction
    translate eval G_ab.safetensors --data D an exported generator on D/testA (or testB)
    translate eval MODEL --input A --truth B your own aligned pairs: A/x.jpg translated and
                                             scored against B/x.png (same relative name)
    translate eval runs/toy_gan_ring         toy GAN: PacGAN modes / high quality / reverse KL
    translate eval --folders DIR1 DIR2       FID and KID between two image folders
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from translate import recipe
from translate.config import RunConfig
from translate.errors import UserError
from translate.eval.evaluate import (
    eval_folders,
    eval_pairs,
    eval_toy_run,
    eval_translation,
    load_translators,
)
from translate.eval.protocol import lines as protocol_lines
from translate.methods import METHODS


def evaluate(args: Any) -> dict[str, Any]:
    """The result dict of one `translate eval` command line."""
    features = args.inception_weights or args.fid_features
    if args.folders:
        if args.run:
            raise UserError("pass either RUN_OR_EXPORT or --folders DIR1 DIR2, not both")
        return eval_folders(Path(args.folders[0]), Path(args.folders[1]), features or "small",
                            args.batch_size)
    if args.samples < 1 or args.batch_size < 1:
        raise UserError("--samples and --batch-size must be at least 1")
    if args.input or args.truth:
        return _eval_pairs(args, features)
    if not args.run:
        raise UserError("nothing to evaluate: pass a run folder, an exported generator, or "
                        "--folders DIR1 DIR2")
    path, cfg = _model(args.run)
    if cfg is not None:
        if cfg.data.kind == "toy":
            return eval_toy_run(path, args.step, args.ema, args.samples, args.seed, args.best)
        if not METHODS[cfg.method].image_to_image:
            raise UserError(f"{path}: eval scores image-to-image (cyclegan, cut) and toy runs; "
                            f"for a {cfg.method} image "
                            f"run, write samples with `translate sample {path} --n 1000 "
                            f"--separate SAMPLES` and compare them with the training images: "
                            f"`translate eval --folders SAMPLES {cfg.data.root or 'DATA'}`")
    if args.best and cfg is None:
        raise UserError(f"{path}: --best picks a run's checkpoint; pass the run folder")
    return eval_translation(load_translators(path, args.data, args.step, args.ema,
                                             best=args.best), args.split, features,
                            args.batch_size)


def _model(run: str) -> tuple[Path, RunConfig | None]:
    """RUN_OR_EXPORT as a path, and the run's config when it is a run folder."""
    path = Path(run)
    if not path.exists():
        raise UserError(f"{path}: no such run folder or model file")
    found = path / "config.json"
    return path, recipe.load_json(found) if found.is_file() else None


def _eval_pairs(args: Any, features: str | None) -> dict[str, Any]:
    """`--input DIR --truth DIR`: a CycleGAN run or export on the user's own aligned pairs."""
    if not (args.input and args.truth):
        raise UserError(f"{'--input' if args.truth else '--truth'}: missing; scoring your own "
                        "pairs needs both --input DIR (images to translate) and --truth DIR "
                        "(their true translations, same names)")
    if not args.run or args.folders or args.data:
        raise UserError("--input/--truth: pass the model (run folder, export folder or file) "
                        "as RUN_OR_EXPORT, and neither --folders nor --data")
    path, cfg = _model(args.run)
    if cfg is not None and not METHODS[cfg.method].image_to_image:
        raise UserError(f"{path}: --input/--truth score image-to-image (cyclegan, cut) runs, not "
                        f"{cfg.method}")
    tr = load_translators(path, None, args.step, args.ema, need_root=False,
                          best=args.best and cfg is not None)
    return eval_pairs(tr, Path(args.input), Path(args.truth), args.direction, features,
                      args.batch_size)


# ---------------------------------------------------------------------------- output


def jsonable(result: dict[str, Any]) -> dict[str, Any]:
    """inf/nan become the strings "inf"/"nan" (as in log.jsonl), so the output is strict JSON."""
    return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in result.items()}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        v = 0.0 if abs(v) < 0.5 * 10**-digits else v  # no "-0.000"
        return f"{v:.{digits}f}" if abs(v) < 1e4 or not math.isfinite(v) else f"{v:.3g}"
    return str(v)


TRANSLATION_ROWS = [  # label, key suffix, digits; prefixes "" (A->B), "ba_", "baseline_"
    ("PSNR vs truth (dB)", "psnr", 2),
    ("SSIM vs truth", "ssim", 3),
    ("cycle PSNR (dB)", "cycle_psnr", 2),
    ("cycle L1", "cycle_l1", 4),
    ("FID", "fid", 3),
    ("KID", "kid_mean", 4),
    ("KID 95% low", "kid_lo", 4),
    ("KID 95% high", "kid_hi", 4),
]


def result_table(r: dict[str, Any]) -> Table:
    if r["kind"] == "toy":
        table = Table(title=f"{r['source']} step {r['step']}: {r['samples']} samples "
                            f"(PacGAN protocol, {r['toy']})")
        table.add_column("modes captured", justify="right")
        table.add_column("high quality", justify="right")
        table.add_column("reverse KL", justify="right")
        table.add_row(f"{r['modes']} / {r['n_modes']}", f"{100 * r['hq']:.1f}%", _fmt(r["rkl"]))
        return table
    if r["kind"] == "folders":
        table = Table(title="FID / KID between two folders")
        table.add_column("")
        table.add_column("value")
        table.add_row("folder 1", f"{r['folder1']} ({r['n1']} images)")
        table.add_row("folder 2", f"{r['folder2']} ({r['n2']} images)")
        table.add_row("FID", _fmt(r["fid"]))
        table.add_row("KID", f"{_fmt(r['kid_mean'], 4)} (95% interval {_fmt(r['kid_lo'], 4)} "
                      f"to {_fmt(r['kid_hi'], 4)})")
        table.add_row("features", r["features"])
        return table
    counts = ", ".join(f"{r[f'n_{d}']} {d.upper()}" for d in "ab" if f"n_{d}" in r)
    table = Table(title=f"{r['source']} on {r['data']} ({r['split']}: {counts})")
    for name in ("metric", "A->B", "B->A", "do nothing"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for label, key, digits in TRANSLATION_ROWS:
        cells = [r.get(p + key) for p in ("", "ba_", "baseline_")]
        if any(c is not None for c in cells):
            table.add_row(label, *(_fmt(c, digits) for c in cells))
    notes = [] if r["truth"] else ["no ground truth (PSNR/SSIM need the demo data's testB)"]
    table.caption = "; ".join(notes) or None  # the features are in the protocol lines
    return table


def cmd_eval(args: Any) -> int:
    result = evaluate(args)
    for line in result.get("warnings", []):
        print(f"warning: {line}", file=sys.stderr)
    if args.json:
        print(json.dumps(jsonable(result)))
    else:
        console = Console()
        console.print(result_table(result))
        for line in protocol_lines(result["protocol"]):
            console.print(f"protocol: {line}", highlight=False, soft_wrap=True)
    return 0
