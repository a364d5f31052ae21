"""`translate eval`: score a run, an exported generator, or two image folders.

    translate eval runs/demo                 CycleGAN, CUT: PSNR/SSIM vs the known truth (demo
                                             data), do-nothing baseline, cycle reconstruction
                                             (where the run has G_ba)
    translate eval G_ab.safetensors --data D an exported generator on D/testA (or testB)
    translate eval runs/toy_gan_ring         toy GAN: PacGAN modes / high quality / reverse KL
    translate eval --folders DIR1 DIR2       FID and KID between two image folders

`--fid-features small|PATH` adds FID/KID of the translations against the target folder. "small"
is a fixed random conv net: its numbers only compare runs scored the same way, never published
FID values. PATH is the pytorch-fid Inception weights file (real FID).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

from translate.errors import UserError

Translator = Callable[[Tensor], Tensor]  # NCHW in [-1, 1] -> same N, H, W, clamped to [-1, 1]
PACGAN_SAMPLES = 2500  # generator samples per evaluation in PacGAN's protocol
SMALL_FEATURES = "small random conv net (relative measure only: not comparable to published FID)"


@dataclass(frozen=True)
class Translators:
    """Whatever generators a run or export provides, by direction: "ab" (A->B), "ba" (B->A)."""

    fns: dict[str, Translator]
    channels: dict[str, int]  # "a", "b": channels the images of each domain are loaded with
    root: Path | None  # dataset root holding testA/testB, if known
    source: str  # for the report, e.g. "runs/demo step 5000"


# ---------------------------------------------------------------------------- scores (pure)


def toy_scores(G: nn.Module, toy: str, n: int = PACGAN_SAMPLES, seed: int = 0
               ) -> dict[str, Any]:
    """PacGAN protocol: n samples from G(z), z ~ N(0, I), scored by translate.metrics.mode_stats
    against the true mixture. Returns modes, hq (a fraction), rkl, n_modes, samples."""
    from translate.data import toy_modes, toy_std
    from translate.metrics import mode_stats

    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = G(z).float()
    modes = toy_modes(toy)
    return {**mode_stats(x, modes, toy_std(toy)), "n_modes": len(modes), "samples": n}


def apply_all(fn: Translator, xs: list[Tensor], batch_size: int = 8) -> list[Tensor]:
    """fn over 1xCxHxW images, batching neighbours of one size together."""
    out: list[Tensor] = []
    i = 0
    while i < len(xs):
        j = i + 1
        while j < len(xs) and j - i < batch_size and xs[j].shape == xs[i].shape:
            j += 1
        out.extend(fn(torch.cat(xs[i:j])).split(1))
        i = j
    return out


def truth_scores(fake: list[Tensor], src: list[Tensor], truth: list[Tensor], prefix: str = ""
                 ) -> dict[str, float]:
    """Mean per-image PSNR/SSIM of the translations against the truth, and of doing nothing
    ("baseline_": the source itself, when it has the truth's channels; PSNR and SSIM are
    symmetric, so both directions share it). SSIM is left out below its 11-pixel window."""
    from translate.metrics import psnr, ssim

    pairs = {prefix: fake}
    if src[0].shape[1] == truth[0].shape[1]:
        pairs["baseline_"] = src
    with_ssim = min(min(y.shape[-2:]) for y in truth) >= 11
    out = {}
    for key, xs in pairs.items():
        out[f"{key}psnr"] = float(np.mean([float(psnr(x, y)) for x, y in zip(xs, truth)]))
        if with_ssim:
            out[f"{key}ssim"] = float(np.mean([float(ssim(x, y)) for x, y in zip(xs, truth)]))
    return out


def cycle_mean(xs: list[Tensor], recs: list[Tensor], prefix: str = "") -> dict[str, float]:
    """Cycle reconstruction scores (translate.metrics.cycle_scores) averaged over images."""
    from translate.metrics import cycle_scores

    per = [cycle_scores(x, r) for x, r in zip(xs, recs)]
    return {f"{prefix}{k}": float(np.mean([p[k] for p in per])) for k in per[0]}


def image_features(xs: list[Tensor], extractor: Callable, batch_size: int = 32) -> np.ndarray:
    """(N, D) features of 1xCxHxW images, resized to the first one's size (bilinear) to batch."""
    size = xs[0].shape[-2:]
    ready = [x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in xs]
    ready = [x if x.shape[-2:] == size else
             F.interpolate(x, size=tuple(size), mode="bilinear", antialias=True) for x in ready]
    with torch.inference_mode():
        return np.concatenate([extractor(torch.cat(ready[i:i + batch_size])).double().numpy()
                               for i in range(0, len(ready), batch_size)])


def fid_kid(f1: np.ndarray, f2: np.ndarray, prefix: str = "") -> dict[str, float]:
    from translate.metrics import fid_from_features, kid_from_features

    kid, kid_std = kid_from_features(f1, f2)
    return {f"{prefix}fid": fid_from_features(f1, f2), f"{prefix}kid_mean": kid,
            f"{prefix}kid_std": kid_std}


# ---------------------------------------------------------------------------- loading


def feature_extractor(spec: str) -> tuple[Callable, str]:
    """"small" -> the fixed random conv net; anything else is a path to Inception weights."""
    from translate.fid import load_inception, small_feature_net

    if spec == "small":
        return small_feature_net(), SMALL_FEATURES
    return load_inception(spec), f"Inception v3 ({Path(spec).name})"


def _net_translator(net: nn.Module) -> Translator:
    from translate.infer import ModelInfo, translate_tensor

    info = ModelInfo(net.in_channels, net.out_channels, net.size_multiple, net.min_size)
    return lambda x: translate_tensor(net, info, x).clamp(-1, 1)


def _export_translator(path: Path) -> tuple[str, Translator, dict[str, str]]:
    from translate.export import load_generator

    gen = load_generator(path, device="cpu")
    meta = gen.metadata
    direction = (meta.get("from_domain", "") + meta.get("to_domain", "")).lower()
    if direction not in ("ab", "ba"):
        raise UserError(f"{path}: its metadata names no A->B or B->A direction; re-export it "
                        "with `translate export RUN`")
    return direction, lambda x: gen(x).clamp(-1, 1), meta


def load_translators(path: Path, data: str | None = None, step: int | None = None,
                     ema: bool = False) -> Translators:
    """The generators of a run folder, an export folder (G_ab/G_ba.safetensors) or one file."""
    from translate.export import run_generators

    root = Path(data) if data else None
    if (path / "config.json").is_file():
        cfg, nets, ckpt = run_generators(path, step, ema)
        fns = {k[2:].lower(): _net_translator(nets[k]) for k in ("G_ab", "G_ba") if k in nets}
        state = json.loads((ckpt / "state.json").read_text())
        root = root or (Path(cfg.data.root) if cfg.data.root else None)
        return Translators(fns, {"a": cfg.data.channels_a, "b": cfg.data.channels_b}, root,
                           f"{path} step {state['step']}" + (" (EMA)" if ema else ""))
    files = [path / f"{g}.safetensors" for g in ("G_ab", "G_ba")] if path.is_dir() else [path]
    files = [f for f in files if f.is_file()]
    if not files:
        raise UserError(f"{path}: not a run folder (config.json), an export folder "
                        "(G_ab.safetensors) or a model file; pass runs/<name> or a .safetensors")
    fns, channels = {}, {}
    for f in files:
        direction, fn, meta = _export_translator(f)
        fns[direction] = fn
        channels[direction[0]] = int(meta["in_channels"])
        channels[direction[1]] = int(meta["out_channels"])
    if root is None:
        raise UserError(f"{path}: an exported generator does not record its dataset; pass "
                        "--data ROOT (the folder holding testA and testB)")
    return Translators(fns, channels, root, ", ".join(str(f) for f in files))


def load_folder(folder: Path, channels: int) -> tuple[list[str], list[Tensor]]:
    """(relative names, 1xCxHxW tensors in [-1, 1]) of every image under `folder`."""
    from translate.images import list_images, load_image, to_tensor

    if not folder.is_dir():
        raise UserError(f"{folder}: folder not found; the dataset root needs {folder.name}/ "
                        "(pass --data ROOT or --split)")
    paths, _ = list_images(folder)
    if not paths:
        raise UserError(f"{folder}: no images found; put .png/.jpg files in it")
    return ([p.relative_to(folder).as_posix() for p in paths],
            [to_tensor(load_image(p, channels)) for p in paths])


# ---------------------------------------------------------------------------- evaluations


def eval_translation(tr: Translators, split: str = "test", fid_features: str | None = None,
                     batch_size: int = 8) -> dict[str, Any]:
    """Scores of every direction `tr` provides on ROOT/<split>A and ROOT/<split>B (a direction
    whose source folder is missing is skipped, unless no direction is left)."""
    from translate.data.demo import is_complete

    if tr.root is None:
        raise UserError("the run has no data.root; pass --data ROOT (the folder with testA)")
    folders = {"a": tr.root / f"{split}A", "b": tr.root / f"{split}B"}
    loaded = {d: load_folder(f, tr.channels.get(d, 3)) for d, f in folders.items() if f.is_dir()}
    directions = [d for d in tr.fns if d[0] in loaded]
    if not directions:
        load_folder(folders[next(iter(tr.fns))[0]], 3)  # raises, naming the missing folder
    # The demo build's testB[i] is the true translation of testA[i] (same file names).
    paired = split == "test" and len(loaded) == 2 and is_complete(tr.root)
    if paired and (loaded["a"][0] != loaded["b"][0] or any(
            x.shape[-2:] != y.shape[-2:] for x, y in zip(loaded["a"][1], loaded["b"][1]))):
        raise UserError(f"{tr.root}: demo data whose testA and testB files differ in names or "
                        "sizes; rebuild it (translate demo, or delete the folder)")
    if fid_features and min(len(xs) for _, xs in loaded.values()) < 2:
        raise UserError(f"{tr.root}: FID/KID need at least 2 images in each of "
                        f"{split}A and {split}B; add images or drop --fid-features")
    extractor, label = feature_extractor(fid_features) if fid_features else (None, "")
    feats = ({d: image_features(xs, extractor) for d, (_, xs) in loaded.items()}
             if extractor else {})
    result: dict[str, Any] = {"kind": "translation", "source": tr.source, "data": str(tr.root),
                              "split": split, "truth": paired,
                              **{f"n_{d}": len(xs) for d, (_, xs) in loaded.items()}}
    if len(feats) == 2:
        result.update(features=label, **fid_kid(feats["a"], feats["b"], "baseline_"))
    for direction in directions:
        src = loaded[direction[0]][1]
        prefix = "" if direction == "ab" else "ba_"
        fake = apply_all(tr.fns[direction], src, batch_size)
        if paired:
            result.update(truth_scores(fake, src, loaded[direction[1]][1], prefix))
        back = tr.fns.get(direction[::-1])
        if back is not None:
            result.update(cycle_mean(src, apply_all(back, fake, batch_size), prefix))
        if direction[1] in feats:
            result.update(features=label, **fid_kid(image_features(fake, extractor),
                                                    feats[direction[1]], prefix))
    if not any(k.endswith(("psnr", "fid")) for k in result):
        raise UserError(f"{tr.source}: nothing to score without ground truth or a second "
                        "generator; add --fid-features small (or PATH to Inception weights)")
    return result


def eval_toy_run(run: Path, step: int | None = None, ema: bool = False,
                 n: int = PACGAN_SAMPLES, seed: int = 0) -> dict[str, Any]:
    """PacGAN scores of a toy run's generator (newest checkpoint unless `step`)."""
    from translate.export import run_generators

    cfg, nets, ckpt = run_generators(run, step, ema)
    state = json.loads((ckpt / "state.json").read_text())
    return {"kind": "toy", "source": str(run), "toy": cfg.data.toy, "method": cfg.method,
            "step": state["step"], "ema": ema, **toy_scores(nets["G"], cfg.data.toy, n, seed)}


def eval_folders(folder1: Path, folder2: Path, fid_features: str = "small",
                 batch_size: int = 32) -> dict[str, Any]:
    from translate.metrics import fid_kid_folders

    extractor, label = feature_extractor(fid_features)
    scores = fid_kid_folders(folder1, folder2, extractor, batch_size)
    return {"kind": "folders", "folder1": str(folder1), "folder2": str(folder2),
            "features": label, **scores}


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
    if not args.run:
        raise UserError("nothing to evaluate: pass a run folder, an exported generator, or "
                        "--folders DIR1 DIR2")
    path = Path(args.run)
    if not path.exists():
        raise UserError(f"{path}: no such run folder or model file")
    if (path / "config.json").is_file():
        from translate import config as config_mod

        cfg = config_mod.load_json(path / "config.json")
        if cfg.data.kind == "toy":
            return eval_toy_run(path, args.step, args.ema, args.samples, args.seed)
        from translate.methods import METHODS

        if not METHODS[cfg.method].image_to_image:
            raise UserError(f"{path}: eval scores image-to-image (cyclegan, cut) and toy runs; "
                            f"for a {cfg.method} image run, write samples with `translate "
                            "sample` and compare folders with `translate eval --folders`")
    return eval_translation(load_translators(path, args.data, args.step, args.ema), args.split,
                            features, args.batch_size)


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
        table.add_row("KID", f"{_fmt(r['kid_mean'], 4)} ± {_fmt(r['kid_std'], 4)}")
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
    if "features" in r:
        notes.append(f"FID/KID features: {r['features']}")
    table.caption = "; ".join(notes) or None
    return table


def cmd_eval(args: Any) -> int:
    result = evaluate(args)
    if args.json:
        print(json.dumps(jsonable(result)))
    else:
        Console().print(result_table(result))
    return 0


def add_eval_parser(sub: Any) -> None:
    p = sub.add_parser("eval", help="scores: PSNR/SSIM vs truth, cycle, FID/KID, toy modes")
    p.add_argument("run", nargs="?", metavar="RUN_OR_EXPORT",
                   help="run folder, export folder or exported generator (.safetensors/.onnx)")
    p.add_argument("--folders", nargs=2, metavar=("DIR1", "DIR2"),
                   help="FID and KID between two image folders instead")
    p.add_argument("--data", metavar="ROOT", help="dataset root with testA/testB (default: "
                   "the run's data.root; needed for an exported generator)")
    p.add_argument("--split", choices=("test", "train"), default="test")
    p.add_argument("--fid-features", metavar="small|PATH", help="add FID/KID: 'small' (a fixed "
                   "random net, relative measure only) or the pytorch-fid Inception weights file")
    p.add_argument("--inception-weights", metavar="PATH",
                   help="Inception weights for FID/KID (same as --fid-features PATH)")
    p.add_argument("--step", type=int, help="checkpoint step (default: newest)")
    p.add_argument("--ema", action="store_true", help="use the EMA generator weights")
    p.add_argument("--samples", type=int, default=PACGAN_SAMPLES, help="toy runs: samples drawn")
    p.add_argument("--seed", type=int, default=0, help="toy runs: seed of the latent codes")
    p.add_argument("--batch-size", type=int, default=8, help="images per generator call")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(func=cmd_eval)
