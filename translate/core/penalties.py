"""Discriminator regularisers. Each returns a scalar that the caller ADDS to the adversarial D loss
so the whole D loss goes through one backward: under DDP a second backward is not synchronised
and the ranks' weights drift apart.

Under fp16 autocast with a GradScaler, the penalty's own input gradient is taken the way torch's
AMP recipe says: of the output times the loss scale, divided back in float32, so D's fp16
backward does not flush small gradients to zero. The loop sets the scale with `loss_scale`
around each phase; the functions also take it as an argument."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar

import torch
from torch import Tensor, nn

Scale = float | Tensor  # a GradScaler's scale: a number, or its 1-element device tensor
_LOSS_SCALE: ContextVar[Scale] = ContextVar("loss_scale", default=1.0)


@contextlib.contextmanager
def loss_scale(scale: Scale) -> Iterator[None]:
    """The GradScaler's current scale for the penalties computed inside (1.0: no scaler)."""
    token = _LOSS_SCALE.set(scale)
    try:
        yield
    finally:
        _LOSS_SCALE.reset(token)


def _sq_grad_norm(outputs: Tensor, inputs: Tensor, group: int = 1,
                  scale: Scale | None = None) -> Tensor:
    """Squared gradient norm per D input: per sample, or per group of `group` consecutive
    samples when D judges packed groups (PacGAN). `scale` (None: the one `loss_scale` set)
    multiplies the output before differentiation and divides the gradient after, in float32;
    with 1.0 both are exact no-ops."""
    scale = _LOSS_SCALE.get() if scale is None else scale
    (grad,) = torch.autograd.grad(
        outputs=outputs.float().sum() * scale, inputs=inputs, create_graph=True
    )
    return (grad.float() / scale).reshape(grad.shape[0] // group, -1).pow(2).sum(1)


def gradient_penalty(
    D: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    weight: float = 10.0,
    eps: Tensor | None = None,
    group: int = 1,
    scale: Scale | None = None,
) -> Tensor:
    """WGAN-GP (Gulrajani et al. 2017): weight * E[(||grad D(x_hat)|| - 1)^2] on random
    interpolates x_hat = eps * real + (1 - eps) * fake; `eps` (N, 1, ...) is drawn when None.
    `scale`: the fp16 loss scale (see the module note)."""
    if eps is None:
        eps_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
        eps = torch.rand(eps_shape, device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1 - eps) * fake.detach()).requires_grad_(True)
    out = D(x_hat)
    norm = (_sq_grad_norm(out, x_hat, group, scale) + 1e-12).sqrt()
    # 0 * out keeps D's output in the graph, so a step whose loss is only this penalty still
    # touches every parameter and DDP's reducer does not wait for gradients that never come.
    return weight * ((norm - 1.0) ** 2).mean() + 0.0 * out.float().mean()


def r1_penalty(real: Tensor, real_out: Tensor, gamma: float = 10.0,
               scale: Scale | None = None) -> Tensor:
    """R1 (Mescheder et al. 2018): gamma/2 * E[||grad D(real)||^2]. `real` must have been
    passed to D with requires_grad=True and `real_out` be that output. `scale`: the fp16 loss
    scale (see the module note)."""
    sq = _sq_grad_norm(real_out, real, scale=scale)
    return 0.5 * gamma * sq.mean() + 0.0 * real_out.float().mean()


@torch.no_grad()
def clip_weights(nets: Iterable[nn.Module], c: float = 0.01) -> None:
    """WGAN weight clipping (Arjovsky et al. 2017), applied after each critic step."""
    for net in nets:
        for p in net.parameters():
            p.clamp_(-c, c)
