"""Discriminator regularisers. Each returns a scalar that the caller ADDS to the adversarial D loss
so the whole D loss goes through one backward: under DDP a second backward is not synchronised
and the ranks' weights drift apart."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def _sq_grad_norm(outputs: Tensor, inputs: Tensor, group: int = 1) -> Tensor:
    """Squared gradient norm per D input: per sample, or per group of `group` consecutive
    samples when D judges packed groups (PacGAN)."""
    (grad,) = torch.autograd.grad(
        outputs=outputs.float().sum(), inputs=inputs, create_graph=True
    )
    return grad.float().reshape(grad.shape[0] // group, -1).pow(2).sum(1)


def gradient_penalty(
    D: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    weight: float = 10.0,
    eps: Tensor | None = None,
    group: int = 1,
) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): weight * E[(||grad D(x_hat)|| - 1)^2] on random
    interpolates x_hat = eps * real + (1 - eps) * fake; `eps` (N, 1, ...) is drawn when None."""
    if eps is None:
        eps_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
        eps = torch.rand(eps_shape, device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = D(x_hat)
    norm = (_sq_grad_norm(out, x_hat, group) + 1e-12).sqrt()
    # 0 * out keeps D's output in the graph, so a step whose loss is only this penalty still
    # touches every parameter and DDP's reducer does not wait for gradients that never come.
    return weight * ((norm - 1.0) ** 2).mean() + 0.0 * out.float().mean()


def r1_penalty(real: Tensor, real_out: Tensor, gamma: float = 10.0) -> Tensor:
    """R1 (Mescheder et al. 2018): gamma/2 * E[||grad D(real)||^2]. `real` must have been
    passed to D with requires_grad=True and `real_out` be that output."""
    return 0.5 * gamma * _sq_grad_norm(real_out, real).mean() + 0.0 * real_out.float().mean()


@torch.no_grad()
def clip_weights(nets: Iterable[nn.Module], c: float = 0.01) -> None:
    """WGAN weight clipping (Arjovsky et al. 2017), applied after each critic step."""
    for net in nets:
        for p in net.parameters():
            p.clamp_(-c, c)
