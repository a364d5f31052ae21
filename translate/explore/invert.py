"""GAN inversion: find the latent code z whose image G(z) looks most like a given picture.

`translate invert RUN IMAGE --out OUT.png` optimises z with Adam to minimise the pixel L2
distance between G(z) and the image (resized and centre-cropped to G's size), from several
random starts at once, keeping the best (Zhu et al. 2016, Creswell & Bharath 2018). Options:

- `--feature-loss W` adds W times the L2 distance between the discriminator's last feature maps
  (the 4x4 maps before minibatch std and the final conv, D in eval mode) of G(z) and of the
  image: a perceptual term that cares about what D has learnt to look at, not exact pixels.
- `--encoder` first trains a small encoder E: x -> z on G's own samples (`--encoder-steps`,
  L2 between E(G(z)) and z) and starts the first restart from E(image) ("hybrid" inversion,
  Zhu et al. 2016); the other restarts stay random.

Writes OUT.png (target | reconstruction) and OUT.safetensors (the code, key "z"), and prints the
final pixel MSE (images in [-1, 1]).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from translate import viz
from translate.errors import UserError
from translate.export import _strip, run_generators
from translate.files import atomic_path
from translate.images import load_image, to_tensor
from translate.methods import METHODS


@dataclass
class Inversion:
    z: Tensor               # (1, z_dim): the best code found
    reconstruction: Tensor  # (1, C, S, S): G(z)
    mse: float              # pixel MSE of the best start after the last step
    start_mse: float        # best pixel MSE over the starts before the first step


# ------------------------------------------------------------------------------- the search


def invert(G: nn.Module, target: Tensor, steps: int = 500, lr: float = 0.05, restarts: int = 4,
           seed: int = 0, features: nn.Module | None = None, feature_weight: float = 0.0,
           z_init: Tensor | None = None) -> Inversion:
    """Minimise |G(z) - target|^2 (+ feature term) over z from `restarts` starts in parallel.
    `z_init` (1, z_dim), e.g. an encoder's guess, replaces the first random start."""
    G.eval()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(restarts, G.z_dim, generator=g)
    if z_init is not None:
        z[0] = z_init.reshape(-1)
    z.requires_grad_(True)
    target = target.expand(restarts, -1, -1, -1)
    target_feats = features(target).detach() if features is not None else None
    opt = torch.optim.Adam([z], lr=lr)
    with torch.no_grad():
        start = _pixel_mse(G(z), target).min().item()
    for _ in range(steps):
        x = G(z)
        loss = _pixel_mse(x, target)
        if target_feats is not None:
            loss = loss + feature_weight * (features(x) - target_feats).square().flatten(1).mean(1)
        opt.zero_grad(set_to_none=True)
        loss.sum().backward()  # the starts are independent: each gets its own gradient
        opt.step()
    with torch.no_grad():
        x = G(z)
        errors = _pixel_mse(x, target)
        best = int(errors.argmin())
    return Inversion(z[best : best + 1].detach(), x[best : best + 1], errors[best].item(), start)


def _pixel_mse(x: Tensor, target: Tensor) -> Tensor:
    return (x.float() - target.float()).square().flatten(1).mean(1)


# ------------------------------------------------------------------------------- the encoder


class Encoder(nn.Module):
    """Image (N, C, S, S) -> code (N, z_dim): stride-2 convs down to 4x4, then a linear layer."""

    def __init__(self, channels: int, image_size: int, z_dim: int, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, side = channels, image_size
        while side > 4:
            layers += [nn.Conv2d(c_in, width, 4, 2, 1), nn.LeakyReLU(0.2, True)]
            c_in, side = width, side // 2
            width = min(width * 2, 256)
        layers += [nn.Flatten(), nn.Linear(c_in * side * side, z_dim)]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def train_encoder(G: nn.Module, steps: int = 300, batch_size: int = 32, lr: float = 1e-3,
                  seed: int = 0) -> Encoder:
    """E trained to recover z from G(z) on fresh samples of G (no real data needed)."""
    G.eval()
    torch.manual_seed(seed)  # E's initial weights
    E = Encoder(G.out_channels, G.image_size, G.z_dim)
    g = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(E.parameters(), lr=lr)
    for _ in range(steps):
        z = torch.randn(batch_size, G.z_dim, generator=g)
        with torch.no_grad():
            x = G(z)
        loss = F.mse_loss(E(x), z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return E.eval()


# ------------------------------------------------------------------------------- files


def load_target(path: str | Path, channels: int, size: int) -> Tensor:
    """The image as (1, C, size, size) in [-1, 1]: shorter side resized to `size`, centre crop."""
    arr = load_image(path, channels=channels)
    im = Image.fromarray(arr[..., 0] if channels == 1 else arr)
    w, h = im.size
    scale = size / min(w, h)
    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                   Image.Resampling.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return to_tensor(np.array(im.crop((left, top, left + size, top + size))))


def load_discriminator(cfg: Any, ckpt: Path) -> nn.Module:
    """The run's trained D (for the feature loss), in eval mode."""
    method = METHODS[cfg.method].build(cfg)
    names = list(method.nets)
    D = method.nets.get("D")
    if D is None or not hasattr(D, "features"):
        raise UserError(f"--feature-loss: the {cfg.method} run has no discriminator with "
                        "feature maps (dcgan nets); drop --feature-loss")
    i = names.index("D")
    path = ckpt / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
    D.load_state_dict({_strip(k): v for k, v in load_file(str(path)).items()})
    return D.eval().requires_grad_(False)


def _save(out: Path, target: Tensor, result: Inversion, meta: dict[str, str]) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = viz.grid([torch.cat([target, result.reconstruction.detach()])])
    with atomic_path(out) as tmp:
        Image.fromarray(np.ascontiguousarray(picture)).save(tmp, "PNG")
    z_path = out.with_suffix(".safetensors")
    with atomic_path(z_path) as tmp:
        save_file({"z": result.z.contiguous()}, str(tmp), meta)
    return z_path


def invert_command(run: str | Path, image: str | Path, out: str | Path, steps: int = 500,
                   lr: float = 0.05, restarts: int = 4, feature_loss: float = 0.0,
                   encoder: bool = False, encoder_steps: int = 300, seed: int = 0,
                   step: int | None = None, ema: bool = False) -> tuple[Inversion, Path]:
    if steps < 0 or restarts < 1 or lr <= 0 or feature_loss < 0 or encoder_steps < 1:
        raise UserError("invert: need --steps >= 0, --restarts >= 1, --lr > 0, "
                        "--feature-loss >= 0 and --encoder-steps >= 1")
    cfg, nets, ckpt = run_generators(Path(run), step, ema)
    G = nets.get("G")
    if G is None or not hasattr(G, "image_size"):
        raise UserError(f"{run}: `invert` needs an image GAN run (dcgan, wgan_gp); toy and "
                        "CycleGAN runs have no image latent space")
    if METHODS[cfg.method].coded is not None:
        # Their G input is noise + a one-hot label / codes: a free z would leave that space.
        raise UserError(f"{run}: `invert` works on unconditional GANs (dcgan, wgan_gp, gan); "
                        f"a {cfg.method} generator also takes labels or codes")
    G.requires_grad_(False)
    target = load_target(image, G.out_channels, G.image_size)
    D = load_discriminator(cfg, ckpt) if feature_loss > 0 else None
    z_init = None
    if encoder:
        E = train_encoder(G, encoder_steps, seed=seed)
        with torch.no_grad():
            z_init = E(target)
    result = invert(G, target, steps, lr, restarts, seed, D.features if D else None,
                    feature_loss, z_init)
    meta = {"run": str(run), "image": str(image), "mse": f"{result.mse:.6g}",
            "settings": json.dumps({"steps": steps, "lr": lr, "restarts": restarts,
                                    "feature_loss": feature_loss, "encoder": encoder})}
    return result, _save(Path(out), target, result, meta)


def cmd_invert(args: argparse.Namespace) -> int:
    result, z_path = invert_command(
        args.run, args.image, args.out, steps=args.steps, lr=args.lr, restarts=args.restarts,
        feature_loss=args.feature_loss, encoder=args.encoder, encoder_steps=args.encoder_steps,
        seed=args.seed, step=args.step, ema=args.ema)
    print(f"wrote {args.out} (target | reconstruction) and {z_path}")
    print(f"reconstruction MSE {result.mse:.6f} (best start {result.start_mse:.6f}; "
          "images in [-1, 1])")
    return 0
