"""The evaluations behind `translate eval` (its command line: translate/eval/report.py): a
CycleGAN or CUT run or export on a dataset's test split, on the user's own aligned pairs, a toy run,
or two image folders.

`--fid-features small|PATH` adds FID/KID of the translations against the target folder. "small"
is a fixed random conv net: its numbers only compare runs scored the same way, never published
FID values. PATH is the pytorch-fid Inception weights file (real FID).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from translate.data import toy_modes, toy_std
from translate.data.demo import is_complete
from translate.errors import UserError
from translate.eval.fid import load_inception, small_feature_net
from translate.eval.metrics import (
    PACGAN_SAMPLES,
    cycle_scores,
    fid_from_features,
    fid_kid_folders,
    kid_from_features,
    kid_interval,
    metric_images,
    mode_stats,
    psnr,
    ssim,
)
from translate.eval.protocol import checkpoint_of, describe, fid_warning
from translate.export import run_generators
from translate.images import list_images, load_image, to_tensor
from translate.infer import ModelInfo, load_generator, translate_tensor
from translate.infer.load import cpu_forward

Translator = Callable[[Tensor], Tensor]  # NCHW in [-1, 1] -> same N, H, W, clamped to [-1, 1]
SMALL_FEATURES = "small random conv net (relative measure only: not comparable to published FID)"


@dataclass(frozen=True)
class Translators:
    """Whatever generators a run or export provides, by direction: "ab" (A->B), "ba" (B->A)."""

    fns: dict[str, Translator]
    channels: dict[str, int]  # "a", "b": channels the images of each domain are loaded with
    root: Path | None  # dataset root holding testA/testB, if known
    source: str  # for the report, e.g. "runs/demo step 5000"
    checkpoint: str = ""  # which weights: "step 5000, the newest (last)", "..., the best by ..."


# ---------------------------------------------------------------------------- scores (pure)


def toy_scores(G: nn.Module, toy: str, n: int = PACGAN_SAMPLES, seed: int = 0
               ) -> dict[str, Any]:
    """PacGAN protocol: n samples from G(z), z ~ N(0, I), scored by translate.eval.metrics.mode_stats
    against the true mixture. Returns modes, hq (a fraction), rkl, n_modes, samples."""
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
    """Cycle reconstruction scores (translate.eval.metrics.cycle_scores) averaged over images."""
    per = [cycle_scores(x, r) for x, r in zip(xs, recs)]
    return {f"{prefix}{k}": float(np.mean([p[k] for p in per])) for k in per[0]}


def image_features(xs: list[Tensor], extractor: Callable, batch_size: int = 32,
                   size: tuple[int, int] | None = None) -> np.ndarray:
    """(N, D) features of 1xCxHxW images, through translate.eval.metrics.metric_images at `size`
    (default: the first image's size, so that they batch)."""
    size = size or tuple(xs[0].shape[-2:])
    ready = [metric_images(x, size) for x in xs]
    with torch.inference_mode():
        return np.concatenate([extractor(torch.cat(ready[i:i + batch_size])).double().numpy()
                               for i in range(0, len(ready), batch_size)])


def fid_kid(f1: np.ndarray, f2: np.ndarray, prefix: str = "") -> dict[str, float]:
    kid, kid_std = kid_from_features(f1, f2)
    low, high, _ = kid_interval(f1, f2)
    return {f"{prefix}fid": fid_from_features(f1, f2), f"{prefix}kid_mean": kid,
            f"{prefix}kid_std": kid_std, f"{prefix}kid_lo": low, f"{prefix}kid_hi": high}


# ---------------------------------------------------------------------------- loading


def feature_label(spec: str) -> str:
    return SMALL_FEATURES if spec == "small" else f"Inception v3 ({Path(spec).name})"


def feature_extractor(spec: str) -> tuple[Callable, str]:
    """"small" -> the fixed random conv net; anything else is a path to Inception weights."""
    extractor = small_feature_net() if spec == "small" else load_inception(spec)
    return extractor, feature_label(spec)


def _net_translator(net: nn.Module) -> Translator:
    info = ModelInfo(net.in_channels, net.out_channels, net.size_multiple, net.min_size)
    forward = cpu_forward(net)  # fp32, as an export scores (below)
    return lambda x: translate_tensor(forward, info, x).clamp(-1, 1)


def _export_translator(path: Path) -> tuple[str, Translator, dict[str, str]]:
    # Scores are computed in fp32 whatever the CPU: "auto" would be bf16 on one with native
    # bf16, and an export must score as its run does (`translate eval RUN`, fp32) everywhere.
    gen = load_generator(path, device="cpu", precision="fp32")
    meta = gen.metadata
    direction = (meta.get("from_domain", "") + meta.get("to_domain", "")).lower()
    if direction not in ("ab", "ba"):
        raise UserError(f"{path}: its metadata names no A->B or B->A direction; re-export it "
                        "with `translate export RUN`")
    return direction, lambda x: gen(x).clamp(-1, 1), meta


def load_translators(path: Path, data: str | None = None, step: int | None = None,
                     ema: bool = False, need_root: bool = True, best: bool = False
                     ) -> Translators:
    """The generators of a run folder, an export folder (G_ab/G_ba.safetensors) or one file.
    `need_root`: an export must then be given its dataset root (`data`); `best`: the run's
    checkpoints/best."""
    root = Path(data) if data else None
    if (path / "config.json").is_file():
        cfg, nets, ckpt = run_generators(path, step, ema, best)
        fns = {k[2:].lower(): _net_translator(nets[k]) for k in ("G_ab", "G_ba") if k in nets}
        state = json.loads((ckpt / "state.json").read_text())
        root = root or (Path(cfg.data.root) if cfg.data.root else None)
        which = checkpoint_of(ckpt, state["step"], step is not None) + (" (EMA)" if ema else "")
        return Translators(fns, {"a": cfg.data.channels_a, "b": cfg.data.channels_b}, root,
                           f"{path} step {state['step']}" + (" (EMA)" if ema else ""), which)
    files = [path / f"{g}.safetensors" for g in ("G_ab", "G_ba")] if path.is_dir() else [path]
    files = [f for f in files if f.is_file()]
    if not files:
        raise UserError(f"{path}: not a run folder (config.json), an export folder "
                        "(G_ab.safetensors) or a model file; pass runs/<name> or a .safetensors")
    fns, channels, which = {}, {}, []
    for f in files:
        direction, fn, meta = _export_translator(f)
        fns[direction] = fn
        channels[direction[0]] = int(meta["in_channels"])
        channels[direction[1]] = int(meta["out_channels"])
        origin = (f"imported from {meta['source'].split(' (')[0]}" if "source" in meta
                  else f"exported from step {meta.get('step', '?')}")
        which.append(f"{f.name}: {origin}"
                     + (f", {meta['checkpoint']}" if "checkpoint" in meta else ""))
    if root is None and need_root:
        raise UserError(f"{path}: an exported generator does not record its dataset; pass "
                        "--data ROOT (the folder holding testA and testB), or your own pairs "
                        "with --input DIR --truth DIR")
    return Translators(fns, channels, root, ", ".join(str(f) for f in files), "; ".join(which))


def load_folder(folder: Path, channels: int) -> tuple[list[str], list[Tensor]]:
    """(relative names, 1xCxHxW tensors in [-1, 1]) of every image under `folder`."""
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
    if not (paired or fid_features or any(d[::-1] in tr.fns for d in directions)):
        _nothing_to_score(tr)  # said before translating anything
    if fid_features and min(len(xs) for _, xs in loaded.values()) < 2:
        raise UserError(f"{tr.root}: FID/KID need at least 2 images in each of "
                        f"{split}A and {split}B; add images or drop --fid-features")
    extractor, label = feature_extractor(fid_features) if fid_features else (None, "")
    # One size for every set (the first image's), so fakes and reals are resized alike.
    size = tuple(next(iter(loaded.values()))[1][0].shape[-2:])
    feats = ({d: image_features(xs, extractor, size=size) for d, (_, xs) in loaded.items()}
             if extractor else {})
    counts = {f"{split}{d.upper()}": len(xs) for d, (_, xs) in loaded.items()}
    result: dict[str, Any] = {"kind": "translation", "source": tr.source, "data": str(tr.root),
                              "split": split, "truth": paired,
                              **{f"n_{d}": len(xs) for d, (_, xs) in loaded.items()},
                              "protocol": describe(tr.checkpoint, counts, label or None,
                                                   fid_features, size),
                              "warnings": [w for w in [fid_warning(counts)] if extractor and w]}
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
            result.update(features=label, **fid_kid(image_features(fake, extractor, size=size),
                                                    feats[direction[1]], prefix))
    if not any(k.endswith(("psnr", "fid")) for k in result):
        _nothing_to_score(tr)
    return result


def _nothing_to_score(tr: Translators) -> None:
    raise UserError(f"{tr.source}: nothing to score without ground truth or a second "
                    "generator; add --fid-features small (or PATH to Inception weights)")


def pair_folders(input_dir: Path, truth_dir: Path) -> list[tuple[Path, Path]]:
    """(input, truth) image pairs: the truth of INPUT/sub/x.jpg is TRUTH/sub/x.<any image
    extension>. Every input needs its truth; truth images without an input are left out."""
    for folder, flag in ((input_dir, "--input"), (truth_dir, "--truth")):
        if not folder.is_dir():
            raise UserError(f"{flag} {folder}: folder not found")
    inputs = list_images(input_dir)[0]
    if not inputs:
        raise UserError(f"--input {input_dir}: no images found; put the images to translate "
                        "there")
    truths: dict[str, Path] = {}
    for p in list_images(truth_dir)[0]:
        key = p.relative_to(truth_dir).with_suffix("").as_posix()
        if key in truths:
            raise UserError(f"--truth {truth_dir}: {truths[key].name} and {p.name} are both "
                            f"the truth of {key}; keep one")
        truths[key] = p
    names = [p.relative_to(input_dir).with_suffix("").as_posix() for p in inputs]
    missing = [p for p, key in zip(inputs, names) if key not in truths]
    if missing:
        raise UserError(f"--truth {truth_dir}: no image named like "
                        f"{missing[0].relative_to(input_dir)} ({len(missing)} of {len(inputs)} "
                        "inputs lack one); name each truth like its input (any image extension)")
    return [(p, truths[key]) for p, key in zip(inputs, names)]


def eval_pairs(tr: Translators, input_dir: Path, truth_dir: Path, direction: str | None = None,
               fid_features: str | None = None, batch_size: int = 8) -> dict[str, Any]:
    """PSNR/SSIM of the translations of INPUT against their aligned truth in TRUTH (and of
    doing nothing), cycle scores when the other generator is there, FID/KID on request."""
    direction = direction or ("ab" if "ab" in tr.fns else next(iter(tr.fns)))
    if direction not in tr.fns:
        raise UserError(f"--direction {direction}: {tr.source} has no G_{direction}; it has "
                        f"{', '.join('G_' + d for d in tr.fns)}")
    pairs = pair_folders(Path(input_dir), Path(truth_dir))
    src = [to_tensor(load_image(a, tr.channels.get(direction[0], 3))) for a, _ in pairs]
    truth = [to_tensor(load_image(b, tr.channels.get(direction[1], 3))) for _, b in pairs]
    for (a, b), x, y in zip(pairs, src, truth):
        if x.shape[-2:] != y.shape[-2:]:
            raise UserError(f"{b}: {y.shape[-1]}x{y.shape[-2]} pixels, but its input {a} is "
                            f"{x.shape[-1]}x{x.shape[-2]}; aligned pairs have the same size")
    if fid_features and len(pairs) < 2:
        raise UserError(f"--input {input_dir}: FID/KID need at least 2 pairs; add images or "
                        "drop --fid-features")
    prefix = "" if direction == "ab" else "ba_"
    fake = apply_all(tr.fns[direction], src, batch_size)
    result: dict[str, Any] = {"kind": "translation", "source": tr.source, "split": "pairs",
                              "data": f"{input_dir} vs {truth_dir}", "truth": True,
                              f"n_{direction[0]}": len(pairs),
                              **truth_scores(fake, src, truth, prefix)}
    back = tr.fns.get(direction[::-1])
    if back is not None:
        result.update(cycle_mean(src, apply_all(back, fake, batch_size), prefix))
    counts, size = {"pairs": len(pairs)}, tuple(truth[0].shape[-2:])
    result.update(protocol=describe(tr.checkpoint, counts), warnings=[])
    if fid_features:
        extractor, label = feature_extractor(fid_features)
        result.update(features=label, **fid_kid(image_features(fake, extractor, size=size),
                                                image_features(truth, extractor, size=size),
                                                prefix),
                      protocol=describe(tr.checkpoint, counts, label, fid_features, size),
                      warnings=[w for w in [fid_warning(counts)] if w])
    return result


def eval_toy_run(run: Path, step: int | None = None, ema: bool = False,
                 n: int = PACGAN_SAMPLES, seed: int = 0, best: bool = False) -> dict[str, Any]:
    """PacGAN scores of a toy run's generator (newest checkpoint unless `step` or `best`)."""
    cfg, nets, ckpt = run_generators(run, step, ema, best)
    state = json.loads((ckpt / "state.json").read_text())
    which = checkpoint_of(ckpt, state["step"], step is not None) + (" (EMA)" if ema else "")
    return {"kind": "toy", "source": str(run), "toy": cfg.data.toy, "method": cfg.method,
            "step": state["step"], "ema": ema, **toy_scores(nets["G"], cfg.data.toy, n, seed),
            "protocol": describe(which, {"samples": n})}


def eval_folders(folder1: Path, folder2: Path, fid_features: str = "small",
                 batch_size: int = 32) -> dict[str, Any]:
    extractor, label = feature_extractor(fid_features)
    scores = fid_kid_folders(folder1, folder2, extractor, batch_size)
    counts = {"folder1": scores["n1"], "folder2": scores["n2"]}
    return {"kind": "folders", "folder1": str(folder1), "folder2": str(folder2),
            "features": label, **scores,
            "protocol": describe("none (two folders)", counts, label, fid_features,
                                 "each folder at its first image's size"),
            "warnings": [w for w in [fid_warning(counts)] if w]}
