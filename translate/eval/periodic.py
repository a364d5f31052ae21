"""Scores during training (train.eval_every): each kind of run is scored the way `translate eval`
scores it, on the live nets of the main process, so quality curves sit next to the losses in
log.jsonl, the progress line, the trackers and `translate plot`.

    toy runs                     eval/modes, eval/hq, eval/rkl   PacGAN protocol, 2,500 samples
    CycleGAN, CUT on the demo    eval/psnr                       G_ab(testA) vs the true testB
    CycleGAN, CUT on other data  eval/kid (+ _lo, _hi: its 95%   G_ab(testA) vs train.eval_data
                                 interval)                       (default ROOT/testB)
    latent GANs on image folders eval/kid (+ _lo, _hi)           G(z) vs train.eval_data

The protocol of the scores (translate/eval/protocol.py) is written to RUN/eval_protocol.json at the
first evaluation. With train.ema > 0 the EMA generators are scored, as in the sample grids. Latent codes are drawn
from a private seeded generator: every evaluation sees the same codes, and the training RNG
streams are not touched (a run with evaluation trains exactly like one without).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from translate import files
from translate.config import RunConfig
from translate.data import toy_modes, toy_std
from translate.data.demo import is_complete
from translate.errors import ConfigError
from translate.eval.evaluate import (
    PACGAN_SAMPLES,
    apply_all,
    feature_extractor,
    feature_label,
    image_features,
    load_folder,
)
from translate.eval.metrics import kid_from_features, kid_interval, mode_stats, psnr
from translate.eval.protocol import describe
from translate.images import list_images
from translate.infer.tiling import ModelInfo, translate_tensor
from translate.methods import METHODS

Nets = dict[str, nn.Module]
Scorer = Callable[[Nets], dict[str, float]]
KID_MAX_IMAGES = 1000  # generated images per KID evaluation (at most the reference's count)
SEED = 0  # latent codes of every evaluation, as `translate eval --seed 0`
# Methods whose G(z) takes z ~ N(0, I) alone (a conditional G also needs its labels or codes).
GAUSSIAN_LATENT = tuple(n for n, spec in METHODS.items() if spec.gaussian_latent)
KEYS = {"toy": ("eval/modes", "eval/hq", "eval/rkl"), "psnr": ("eval/psnr",),
        "kid": ("eval/kid", "eval/kid_lo", "eval/kid_hi")}  # what each kind of scorer logs
PROTOCOL_FILE = "eval_protocol.json"  # in the run folder, written at the first evaluation


def kind_of(cfg: RunConfig) -> str:
    """Which scorer a run gets. Raises ConfigError when the run has nothing to be scored on."""
    t, d = cfg.train, cfg.data
    if d.kind == "toy":
        return "toy"
    if d.kind == "unpaired":
        root = Path(d.root)
        if not (root / "testA").is_dir():
            raise ConfigError(f"train.eval_every: scoring needs {root / 'testA'} (held-out A "
                              "images); add it or set train.eval_every = 0")
        if not t.eval_data and is_complete(root):
            return "psnr"
        reference = Path(t.eval_data) if t.eval_data else root / "testB"
    elif not METHODS[cfg.method].gaussian_latent:
        raise ConfigError(f"train.eval_every: no score during training for {cfg.method} runs "
                          f"yet (KID covers {', '.join(GAUSSIAN_LATENT)}); set it to 0")
    else:
        if not t.eval_data:
            raise ConfigError("train.eval_data: a run on an image folder is scored by KID "
                              "against held-out images; set train.eval_data = FOLDER (or "
                              "train.eval_every = 0)")
        reference = Path(t.eval_data)
    if not reference.is_dir():
        raise ConfigError(f"train.eval_data: {reference} is not a folder of held-out images")
    if len(list_images(reference)[0]) < 2:
        raise ConfigError(f"train.eval_data: KID needs at least 2 images in {reference}")
    if t.eval_features != "small" and not Path(t.eval_features).is_file():
        raise ConfigError(f"train.eval_features: {t.eval_features} is neither 'small' nor a "
                          "file of Inception weights (pytorch-fid's pt_inception-*.pth)")
    return "kid"


def build(cfg: RunConfig, main: bool, device: torch.device) -> Scorer | None:
    """The run's scorer on the main process; None elsewhere and when train.eval_every = 0.
    Every process checks the settings, so a bad one stops all of them alike."""
    if cfg.train.eval_every == 0:
        return None
    kind = kind_of(cfg)
    if cfg.train.keep_best and cfg.train.keep_best not in KEYS[kind]:
        raise ConfigError(f"train.keep_best: {cfg.train.keep_best} is not scored in this run "
                          f"(its periodic scores: {', '.join(KEYS[kind])}); pick one of those")
    if not main:
        return None
    return _writing_protocol(SCORERS[kind](cfg, device), cfg.out_dir / PROTOCOL_FILE,
                             protocol_of(cfg, kind))


def protocol_of(cfg: RunConfig, kind: str) -> dict:
    """The evaluation protocol of a run's periodic scores (translate/eval/protocol.py)."""
    def count(folder: Path) -> int:
        return len(list_images(folder)[0])

    t, d = cfg.train, cfg.data
    which = "the live " + ("EMA " if t.ema > 0 else "") + "generators at each eval step"
    if kind == "toy":
        return describe(which, {"samples": PACGAN_SAMPLES})
    if kind == "psnr":
        return describe(which, {f: count(Path(d.root) / f) for f in ("testA", "testB")})
    reference = Path(t.eval_data) if t.eval_data else Path(d.root) / "testB"
    n_ref = count(reference)
    counts = {"generated": count(Path(d.root) / "testA") if d.kind == "unpaired" else
              min(n_ref, KID_MAX_IMAGES), "reference": n_ref}
    return describe(which, counts, feature_label(t.eval_features), t.eval_features,
                    (d.crop_size, d.crop_size))


def _writing_protocol(scorer: Scorer, path: Path, protocol: dict) -> Scorer:
    """`scorer` that first writes the protocol next to the run's log (once per start)."""
    written = []

    def score(nets: Nets) -> dict[str, float]:
        if not written:
            files.write_text(path, json.dumps(protocol, indent=2) + "\n")
            written.append(path)
        return scorer(nets)

    return score


def evaluate(scorer: Scorer, nets: Nets) -> dict[str, float]:
    """scorer(nets) in eval mode (BatchNorm statistics must not move: exact resume), without
    gradients, with the global RNG states put back afterwards."""
    modes = {n: m.training for n, m in nets.items()}
    for m in nets.values():
        m.eval()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            return scorer(nets)
    finally:
        for n, m in nets.items():
            m.train(modes[n])


# ---------------------------------------------------------------------------- scorers


def toy_scorer(cfg: RunConfig, device: torch.device) -> Scorer:
    modes, std = toy_modes(cfg.data.toy), toy_std(cfg.data.toy)

    def score(nets: Nets) -> dict[str, float]:
        G = nets["G"]
        z = torch.randn(PACGAN_SAMPLES, G.z_dim, generator=torch.Generator().manual_seed(SEED))
        s = mode_stats(G(z.to(device)).float().cpu(), modes, std)
        return {"eval/modes": float(s["modes"]), "eval/hq": s["hq"], "eval/rkl": s["rkl"]}

    return score


def _translator(G: nn.Module, device: torch.device) -> Callable[[Tensor], Tensor]:
    """G over CPU images of any size (reflect-padded to its size multiple, as `translate eval`)."""
    info = ModelInfo(G.in_channels, G.out_channels, G.size_multiple, G.min_size)
    return lambda x: translate_tensor(lambda b: G(b.to(device)).float().cpu(), info,
                                      x).clamp(-1, 1)


def psnr_scorer(cfg: RunConfig, device: torch.device) -> Scorer:
    root = Path(cfg.data.root)
    _, test_a = load_folder(root / "testA", cfg.data.channels_a)
    _, truth = load_folder(root / "testB", cfg.data.channels_b)

    def score(nets: Nets) -> dict[str, float]:
        fake = apply_all(_translator(nets["G_ab"], device), test_a)
        return {"eval/psnr": float(np.mean([float(psnr(x, y)) for x, y in zip(fake, truth)]))}

    return score


def _features(xs: list[Tensor], extractor: Callable, size: int) -> np.ndarray:
    return image_features(xs, extractor, size=(size, size))


def kid_scorer(cfg: RunConfig, device: torch.device) -> Scorer:
    """KID against held-out images, both sides resized to the training crop size (the size the
    nets see), with the features of train.eval_features."""
    t, d, size = cfg.train, cfg.data, cfg.data.crop_size
    extractor, _ = feature_extractor(t.eval_features)
    unpaired = d.kind == "unpaired"
    reference = Path(t.eval_data) if t.eval_data else Path(d.root) / "testB"
    _, ref = load_folder(reference, d.channels_b if unpaired else d.channels_a)
    ref_feats = _features(ref, extractor, size)
    sources = load_folder(Path(d.root) / "testA", d.channels_a)[1] if unpaired else None
    n = min(len(ref), KID_MAX_IMAGES)

    def score(nets: Nets) -> dict[str, float]:
        if sources is not None:
            fake = apply_all(_translator(nets["G_ab"], device), sources)
        else:
            G = nets["G"]
            z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(SEED))
            fake = [G(c.to(device)).float().cpu().clamp(-1, 1) for c in z.split(32)]
            fake = list(torch.cat(fake).split(1))
        fake_feats = _features(fake, extractor, size)
        kid, _ = kid_from_features(fake_feats, ref_feats)
        low, high, _ = kid_interval(fake_feats, ref_feats)
        return {"eval/kid": kid, "eval/kid_lo": low, "eval/kid_hi": high}

    return score


SCORERS: dict[str, Callable[[RunConfig, torch.device], Scorer]] = {
    "toy": toy_scorer,
    "psnr": psnr_scorer,
    "kid": kid_scorer,
}
