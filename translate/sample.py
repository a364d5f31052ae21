"""`translate sample`: sample grids and latent interpolations from a latent GAN run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from translate import latent, viz
from translate.errors import UserError
from translate.export import run_generators


def slerp(z0: Tensor, z1: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation (White 2016): stays in the Gaussian's typical shell, where linear
    interpolation passes through the low-norm middle the generator never saw."""
    n0, n1 = z0 / z0.norm(dim=-1, keepdim=True), z1 / z1.norm(dim=-1, keepdim=True)
    omega = torch.acos((n0 * n1).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * z0 + (torch.sin(t * omega) / so) * z1


def interpolation_codes(z_dim: int, rows: int, steps: int, generator: torch.Generator,
                        spherical: bool = True) -> Tensor:
    """(rows * steps, z_dim): each row walks from one random code to another."""
    z0 = torch.randn(rows, 1, z_dim, generator=generator)
    z1 = torch.randn(rows, 1, z_dim, generator=generator)
    t = torch.linspace(0, 1, steps).view(1, steps, 1)
    z = slerp(z0, z1, t) if spherical else (1 - t) * z0 + t * z1
    return z.reshape(rows * steps, z_dim)


def coded_grid(cfg, G: torch.nn.Module, n: int, g: torch.Generator, class_name: str | None,
               vary_code: int | None, other_mode: str | None) -> np.ndarray | None:
    """The grid of a run whose G reads codes beside z (cgan's class, infogan's codes); None
    for the other methods. `other_mode`: a flag asking for another kind of picture."""
    from translate.methods import cgan, infogan

    if class_name is not None and cfg.method != "cgan":
        raise UserError(f"--class: the run's method is {cfg.method}; --class needs a "
                        "class-conditional (cgan) run")
    if vary_code is not None and cfg.method != "infogan":
        raise UserError(f"--vary-code: the run's method is {cfg.method}; --vary-code needs an "
                        "infogan run")
    if cfg.method not in ("cgan", "infogan"):
        return None
    if other_mode:
        raise UserError(f"{other_mode}: not available for {cfg.method} runs; use "
                        + ("--class NAME" if cfg.method == "cgan" else "--vary-code I"))
    if cfg.method == "cgan":
        return cgan.class_grid(cfg, G, n, g, class_name)
    return infogan.code_grid(cfg, G, n, g, vary_code)


def sample_command(run: str | Path, n: int = 64, out: str | Path = "samples.png",
                   interpolate: bool = False, seed: int = 0, step: int | None = None,
                   ema: bool = False, steps: int = 10, linear: bool = False,
                   arithmetic: str | None = None, class_name: str | None = None,
                   vary_code: int | None = None) -> Path:
    cfg, nets, _ = run_generators(Path(run), step, ema)
    if "G" not in nets or not hasattr(nets["G"], "z_dim"):
        raise UserError(f"{run}: `sample` draws from latent GANs (dcgan, wgan_gp, gan); for "
                        "image-to-image runs (cyclegan, cut) use `translate apply`")
    if n < 1:
        raise UserError(f"--n: must be at least 1, got {n}")
    G, g = nets["G"], torch.Generator().manual_seed(seed)
    toy = cfg.model.net == "mlp"
    if arithmetic is not None and toy:
        raise UserError("--arithmetic: needs an image GAN (dcgan, wgan_gp); toy runs make points")
    other_mode = "--interpolate" if interpolate else "--arithmetic" if arithmetic else None
    with torch.no_grad():
        coded = coded_grid(cfg, G, n, g, class_name, vary_code, other_mode)
        if coded is not None:
            image = coded
        elif arithmetic is not None:
            image = latent.arithmetic_image(G, arithmetic, n, seed)[1]
        elif interpolate:
            rows = max(1, n // steps)
            x = G(interpolation_codes(G.z_dim, rows, steps, g, spherical=not linear)).float()
            image = viz.scatter(x) if toy else viz.square_grid(x, steps)
        else:
            x = G(latent.grid_codes(G.z_dim, n, seed)).float()
            if toy:
                from translate.data import toy_modes

                image = viz.scatter(x, toy_modes(cfg.data.toy))
            else:
                image = viz.square_grid(x, max(1, math.isqrt(n)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name("." + out.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(image)).save(tmp, "PNG")
    tmp.replace(out)
    return out
