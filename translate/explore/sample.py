"""`translate sample`: sample grids and latent interpolations from a latent GAN run."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from translate import viz
from translate.data import toy_modes
from translate.errors import UserError
from translate.explore import latent
from translate.export import run_generators
from translate.files import atomic_path
from translate.images import save_image, to_uint8
from translate.methods import METHODS, cgan, infogan
from translate.methods.base import CodedSampling

SEPARATE_BATCH = 256  # codes per generator call when writing separate files (bounds memory)


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


def check_codes(cfg, class_name: str | None, vary_code: int | None) -> None:
    """--class and --vary-code each need a run whose G reads that kind of code."""
    coded = METHODS[cfg.method].coded
    for spec, value in ((cgan.SAMPLING, class_name), (infogan.SAMPLING, vary_code)):
        if value is not None and (coded is None or coded.flag != spec.flag):
            raise UserError(f"{spec.flag}: the run's method is {cfg.method}; {spec.flag} needs "
                            f"{spec.needs}")


def _option(coded: CodedSampling, class_name: str | None, vary_code: int | None):
    """The value of the option that picks `coded`'s codes (None: not given)."""
    return {"--class": class_name, "--vary-code": vary_code}[coded.flag]


def coded_grid(cfg, G: torch.nn.Module, n: int, g: torch.Generator, class_name: str | None,
               vary_code: int | None, other_mode: str | None) -> np.ndarray | None:
    """The grid of a run whose G reads codes beside z (cgan's class, infogan's codes); None
    for the other methods. `other_mode`: a flag asking for another kind of picture."""
    coded = METHODS[cfg.method].coded
    if coded is None:
        return None
    if other_mode:
        raise UserError(f"{other_mode}: not available for {cfg.method} runs; use {coded.usage}")
    return coded.grid(cfg, G, n, g, _option(coded, class_name, vary_code))


def sample_command(run: str | Path, n: int = 64, out: str | Path | None = None,
                   interpolate: bool = False, seed: int = 0, step: int | None = None,
                   ema: bool = False, steps: int = 10, linear: bool = False,
                   arithmetic: str | None = None, class_name: str | None = None,
                   vary_code: int | None = None, separate: str | Path | None = None) -> Path:
    """Write one picture (default RUN/samples/<kind>_step<S>_n<N>_seed<seed>.png, a name per
    kind of picture) or, with `separate`, n samples as separate PNGs into that folder.
    Returns the path written."""
    cfg, nets, ckpt = run_generators(Path(run), step, ema)
    if "G" not in nets or not hasattr(nets["G"], "z_dim"):
        raise UserError(f"{run}: `sample` draws from latent GANs (dcgan, wgan_gp, gan); for "
                        "image-to-image runs (cyclegan, cut) use `translate apply`")
    if n < 1:
        raise UserError(f"--n: must be at least 1, got {n}")
    check_codes(cfg, class_name, vary_code)
    toy = cfg.model.net == "mlp"
    if arithmetic is not None and toy:
        raise UserError("--arithmetic: needs an image GAN (dcgan, wgan_gp); toy runs make points")
    other_mode = "--interpolate" if interpolate else "--arithmetic" if arithmetic else None
    if separate is not None:
        if toy or other_mode or vary_code is not None:
            drop = other_mode or "--vary-code"
            raise UserError(f"--separate: writes samples of an image GAN drawn from the prior; "
                            f"{'toy runs make points' if toy else 'drop ' + drop}")
        with torch.no_grad():
            return write_separate(cfg, nets["G"], n, seed, class_name, Path(separate))
    with torch.no_grad():
        image = coded_grid(cfg, nets["G"], n, torch.Generator().manual_seed(seed), class_name,
                           vary_code, other_mode)
        if image is None:
            image = _picture(cfg, nets["G"], n, seed, interpolate, steps, linear, arithmetic)
    if out is None:
        kind = picture_kind(cfg.method, interpolate, linear, arithmetic, class_name, vary_code)
        step_done = json.loads((ckpt / "state.json").read_text())["step"]
        out = ckpt.parents[1] / "samples" / (f"{kind}_step{step_done}_n{n}_seed{seed}"
                                             f"{'_ema' if ema else ''}.png")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, "PNG")
    return out


def _picture(cfg, G: torch.nn.Module, n: int, seed: int, interpolate: bool, steps: int,
             linear: bool, arithmetic: str | None) -> np.ndarray:
    """The picture of an unconditional GAN: grid, interpolation or arithmetic."""
    toy = cfg.model.net == "mlp"
    if arithmetic is not None:
        return latent.arithmetic_image(G, arithmetic, n, seed)[1]
    if interpolate:
        rows, g = max(1, n // steps), torch.Generator().manual_seed(seed)
        x = G(interpolation_codes(G.z_dim, rows, steps, g, spherical=not linear)).float()
        return viz.scatter(x) if toy else viz.square_grid(x, steps)
    x = G(latent.grid_codes(G.z_dim, n, seed)).float()
    if toy:
        return viz.scatter(x, toy_modes(cfg.data.toy))
    return viz.square_grid(x, max(1, math.isqrt(n)))


def picture_kind(method: str, interpolate: bool, linear: bool, arithmetic: str | None,
                 class_name: str | None, vary_code: int | None) -> str:
    """The file name part that tells one kind of picture from another."""
    if arithmetic is not None:
        expr = re.sub(r"\s+", "", arithmetic)  # digits , + - only: parse() accepted it
        if len(expr) > 40:
            expr = hashlib.sha1(expr.encode()).hexdigest()[:10]
        return f"arithmetic_{expr}"
    if interpolate:
        return "interpolate_linear" if linear else "interpolate"
    if class_name is not None:
        return "class_" + re.sub(r"[^\w.-]", "_", class_name)
    if vary_code is not None:
        return f"code{vary_code}"
    coded = METHODS[method].coded
    return coded.picture if coded is not None else "grid"


def write_separate(cfg, G: torch.nn.Module, n: int, seed: int, class_name: str | None,
                   folder: Path) -> Path:
    """n samples as folder/<seed>_<i>.png (cgan without --class: n per class, in
    folder/<class>/), e.g. for `translate eval --folders FOLDER DATA`. Sample i of a plain GAN
    is cell i of the grid `translate sample --n N --seed S` draws. Each file is complete
    under its name (written to a temporary name first)."""
    g = torch.Generator().manual_seed(seed)
    coded = METHODS[cfg.method].coded
    if coded is not None:
        for sub, draw in coded.separate(cfg, G, g, _option(coded, class_name, None)):
            _write_batches(folder / sub if sub else folder, n, seed, draw)
    else:
        codes = iter(latent.grid_codes(G.z_dim, n, seed).split(SEPARATE_BATCH))
        _write_batches(folder, n, seed, lambda k: G(next(codes)).float())
    return folder


def _write_batches(folder: Path, n: int, seed: int, draw) -> None:
    """draw(k) -> k images (NCHW in [-1, 1]), called for SEPARATE_BATCH at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    for start in range(0, n, SEPARATE_BATCH):
        images = to_uint8(draw(min(SEPARATE_BATCH, n - start)))
        for i, image in enumerate(images, start):
            save_image(folder / f"{seed}_{i:05d}.png", image)
