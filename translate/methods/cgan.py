"""Class-conditional GAN (Mirza & Osindero 2014) on the DCGAN nets, with a projection
discriminator (Miyato & Koyama 2018).

Labels are the subfolder names of one image folder (ROOT/<class>/*.png), indexed in the order of
`model.classes` (sorted by name unless the recipe lists them). G reads z concatenated with the
one-hot label, as in Mirza & Osindero, so G is a plain dcgan_g whose first z_dim inputs are noise
and whose last n_classes are the label: export and its loader need nothing new. D scores
psi(phi(x)) + <embed(y), sum-pooled phi(x)>; the projection conditions D through one inner
product instead of label maps stacked on the image, which trains more stably (Miyato & Koyama).
Fakes take the labels of the real batch, so each class is asked for as often as the data has it.

The losses are GAN's own (objective, R1, gradient penalty) with G and D bound to the labels.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translate import viz
from translate.config import RunConfig
from translate.core import noise
from translate.data.classes import find_classes
from translate.errors import ConfigError, UserError
from translate.methods import gan
from translate.methods.base import Batch, CodedSampling, Nets
from translate.nets import build_net, init_weights

MAX_SAMPLE_ROWS = 32  # classes shown in the training sample grid


@dataclass(frozen=True)
class CGANConfig(gan.GANConfig):
    classes: tuple[str, ...] = ()  # class names in label order; () = the subfolders of
                                   # data.root sorted by name, filled in when the recipe is
                                   # loaded (so config.json and exports carry them)


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill in model.classes from data.root's subfolders. A missing or empty root is left for
    the data loader to report when training starts (recipes must load without their data)."""
    d = cfg.data
    if cfg.model.classes or d.kind != "folder" or not d.root:
        return cfg
    if not Path(d.root).expanduser().is_dir():
        return cfg
    return replace(cfg, model=replace(cfg.model, classes=find_classes(d.root, cfg.method)))


def check(cfg: RunConfig) -> None:
    gan.check(cfg)
    m = cfg.model
    if m.net != "dcgan":
        raise ConfigError(f"model.net: {cfg.method} conditions the dcgan nets; set "
                          "model.net = 'dcgan'")
    if m.pack != 1:
        raise ConfigError(f"model.pack: {cfg.method} judges each image with its own label; "
                          "set model.pack = 1")
    if m.unrolled_steps:
        raise ConfigError(f"model.unrolled_steps: not available for {cfg.method}; set it to 0")
    dup = sorted({c for c in m.classes if m.classes.count(c) > 1})
    if dup:
        raise ConfigError(f"model.classes: {dup[0]!r} is listed twice; name each class once")


def split_d(D: nn.Module) -> tuple[nn.Sequential, nn.Conv2d]:
    """A dcgan_d as its trunk phi (image -> N x C x 4 x 4 features) and its last 4x4 conv psi
    (features -> logit), so a class projection or a Q head can share the trunk."""
    layers = list(D.model)
    return nn.Sequential(*layers[:-1]), layers[-1]


class ProjectionD(nn.Module):
    """(image, label) -> logits (N,) = psi(phi(x)) + <embed(y), sum of phi(x) over the 4x4>."""

    def __init__(self, D: nn.Module, n_classes: int, spectral_norm: bool) -> None:
        super().__init__()
        self.phi, self.psi = split_d(D)
        embed = nn.Embedding(n_classes, self.psi.in_channels)
        nn.init.normal_(embed.weight, 0.0, 0.02)  # DCGAN's init scale, like the convs
        self.embed = nn.utils.parametrizations.spectral_norm(embed) if spectral_norm else embed

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.phi(x)
        return self.psi(h).reshape(x.shape[0]) + (self.embed(y) * h.sum((2, 3))).sum(1)


def generator_input(z: Tensor, y: Tensor, n_classes: int) -> Tensor:
    """G's input: noise, then the one-hot label."""
    return torch.cat([z, F.one_hot(y, n_classes).to(z.dtype)], 1)


class CGAN(gan.GAN):
    def __init__(self, cfg: RunConfig):
        m = cfg.model
        if not m.classes:
            find_classes(cfg.data.root, cfg.method)  # raises the reason (no root, no subfolders)
            raise ConfigError("model.classes: empty; list the class subfolders of data.root")
        self.classes = m.classes
        super().__init__(cfg)  # objective, phases, settings, and build_nets below
        self.generators = {"G": {"latent": True, "metadata": {
            "classes": json.dumps(list(self.classes)), "noise_dim": str(m.z_dim)}}}

    def build_nets(self, cfg: RunConfig) -> Nets:
        """G reads noise + one-hot label; D is a DCGAN D with a projection head."""
        m, n, channels = cfg.model, len(self.classes), cfg.data.channels_a
        G = build_net("dcgan_g", z_dim=m.z_dim + n, ngf=m.ngf, out_channels=channels,
                      image_size=m.image_size, attention=m.self_attention)
        D = build_net("dcgan_d", in_channels=channels, ndf=m.ndf, image_size=m.image_size,
                      norm=m.d_norm, spectral_norm=m.spectral_norm, attention=m.self_attention,
                      minibatch_std=m.minibatch_std)
        init_weights(G)
        init_weights(D)
        return {"G": G, "D": ProjectionD(D, n, m.spectral_norm)}

    def bind(self, nets: Nets, y: Tensor) -> dict[str, Callable[[Tensor], Tensor]]:
        """G and D with the labels y filled in: GAN's losses then run on them unchanged."""
        G, D, n = nets["G"], nets["D"], len(self.classes)
        return {**nets, "G": lambda z: G(generator_input(z, y, n)), "D": lambda x: D(x, y)}

    def d_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        return super().d_loss(self.bind(nets, batch["y"]), batch, prev)

    def g_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        return super().g_loss(self.bind(nets, batch["y"]), batch, prev)

    def fixed_batch(self, dataset: Any, n: int, seed: int) -> Batch:
        rows = min(len(self.classes), MAX_SAMPLE_ROWS)
        # The same n codes in every row: down a column only the class changes.
        return {"k": torch.arange(n).repeat(rows) + 10**12,
                "y": torch.arange(rows).repeat_interleave(n)}

    def sample(self, nets: Nets, fixed: Batch) -> Any:
        dev = next(nets["G"].parameters()).device
        z = noise.normal(fixed["k"], (self.cfg.z_dim,), self.seed, 0).to(dev)
        x = self.bind(nets, fixed["y"].to(dev))["G"](z).float()
        rows = int(fixed["y"].max()) + 1
        return viz.square_grid(x, len(x) // rows)


def class_grid(cfg: RunConfig, G: nn.Module, n: int, generator: torch.Generator,
               class_name: str | None) -> np.ndarray:
    """`translate sample --class NAME`: n samples of one class in a square grid; without a
    class, one row per class with the same noise down each column."""
    classes, columns = cfg.model.classes, max(1, math.isqrt(n))
    if class_name is not None:
        return viz.square_grid(class_samples(cfg, G, n, generator, class_name), columns)
    z = torch.randn(columns, cfg.model.z_dim, generator=generator).repeat(len(classes), 1)
    y = torch.arange(len(classes)).repeat_interleave(columns)
    x = G(generator_input(z, y, len(classes))).float()
    return viz.square_grid(x, columns)


def class_samples(cfg: RunConfig, G: nn.Module, n: int, generator: torch.Generator,
                  class_name: str) -> Tensor:
    """n samples (N, C, H, W in [-1, 1]) of one class, each with its own noise."""
    classes = cfg.model.classes
    if class_name not in classes:
        raise UserError(f"--class: {class_name!r} is not a class of this run; valid: "
                        f"{', '.join(classes)}")
    z = torch.randn(n, cfg.model.z_dim, generator=generator)
    y = torch.full((n,), classes.index(class_name))
    return G(generator_input(z, y, len(classes))).float()


def separate_samples(cfg: RunConfig, G: nn.Module, generator: torch.Generator,
                     class_name: str | None) -> list:
    """`sample --separate`: one class into the folder, or every class into its subfolder."""
    names = [class_name] if class_name is not None else list(cfg.model.classes)
    return [(name if class_name is None else "",
             lambda k, name=name: class_samples(cfg, G, k, generator, name)) for name in names]


SAMPLING = CodedSampling("--class", "--class NAME", "a class-conditional (cgan) run", "classes",
                         class_grid, separate_samples)


def build(cfg: RunConfig) -> CGAN:
    return CGAN(cfg)
