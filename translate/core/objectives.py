"""GAN objectives by name. Each maps discriminator outputs (logits or critic values, any shape)
to a scalar loss; every term is a mean over all elements, so PatchGAN maps and vectors both work.

`real_target` is one-sided label smoothing (Salimans et al. 2016): the real label becomes e.g. 0.9
for the discriminator only; the generator's target stays 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from translate.errors import ConfigError


def _bce(logits: Tensor, target: float) -> Tensor:
    # softplus form of binary cross-entropy: stable for large |logits|, fine under bf16 autocast.
    logits = logits.float()
    return (target * F.softplus(-logits) + (1.0 - target) * F.softplus(logits)).mean()


def minimax_d(real: Tensor, fake: Tensor, real_target: float = 1.0) -> Tensor:
    return _bce(real, real_target) + _bce(fake, 0.0)


def minimax_g(fake: Tensor) -> Tensor:
    # Goodfellow 2014's original min log(1 - D(G(z))): saturates when D wins, kept for study.
    return -F.softplus(fake.float()).mean()


def nonsaturating_g(fake: Tensor) -> Tensor:
    return _bce(fake, 1.0)


def lsgan_d(real: Tensor, fake: Tensor, real_target: float = 1.0) -> Tensor:
    return ((real.float() - real_target) ** 2).mean() + (fake.float() ** 2).mean()


def lsgan_g(fake: Tensor) -> Tensor:
    return ((fake.float() - 1.0) ** 2).mean()


def hinge_d(real: Tensor, fake: Tensor, real_target: float = 1.0) -> Tensor:
    return F.relu(real_target - real.float()).mean() + F.relu(1.0 + fake.float()).mean()


def hinge_g(fake: Tensor) -> Tensor:
    return -fake.float().mean()


def wasserstein_d(real: Tensor, fake: Tensor, real_target: float = 1.0) -> Tensor:
    # The critic maximises E[D(real)] - E[D(fake)]; label smoothing has no meaning here.
    return fake.float().mean() - real.float().mean()


def wasserstein_g(fake: Tensor) -> Tensor:
    return -fake.float().mean()


OBJECTIVES: dict[str, tuple[Callable[..., Tensor], Callable[[Tensor], Tensor]]] = {
    "minimax": (minimax_d, minimax_g),
    "nonsaturating": (minimax_d, nonsaturating_g),
    "lsgan": (lsgan_d, lsgan_g),
    "hinge": (hinge_d, hinge_g),
    "wasserstein": (wasserstein_d, wasserstein_g),
}


def get(name: str) -> tuple[Callable[..., Tensor], Callable[[Tensor], Tensor]]:
    """(d_loss(real, fake, real_target), g_loss(fake)) for an objective name."""
    if name not in OBJECTIVES:
        raise ConfigError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def real_probability(logits: Tensor, name: str) -> Tensor:
    """Mean D(x) in a readable unit for logs: a probability for the logistic objectives,
    the raw score otherwise (lsgan targets 0/1 directly; wasserstein/hinge are unbounded)."""
    if name in ("minimax", "nonsaturating"):
        return torch.sigmoid(logits.detach().float()).mean()
    return logits.detach().float().mean()
