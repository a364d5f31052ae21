"""Unrolled GAN (Metz et al. 2017): the generator is judged by the discriminator it would face
after D took k more steps, which penalises generators that only fool the current D by jumping
to the mode it is weakest on, the mechanism of mode collapse.

This is the cheap, common variant: the k steps run on a fresh copy of D with a fresh optimizer
and the generator's gradient does NOT flow back through them (the paper's full version
differentiates through the k updates, which costs second-order terms and k times the memory).
The copy is rebuilt from D's registry kind and config and loaded with its state dict, so the
real D, its buffers and its optimizer state are never touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from translate.nets import build_net

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def unwrap(net: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        inner = getattr(net, "module", None) or getattr(net, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return net
        net = inner


def copy_net(net: nn.Module) -> nn.Module:
    """A new module of the same architecture holding the same weights and buffers (spectral
    norm's power-iteration vectors included)."""
    net = unwrap(net)
    twin = build_net(net.kind, **net.config)
    twin.load_state_dict(net.state_dict())
    param = next(net.parameters())
    return twin.to(param.device).train(net.training)


def unroll(D: nn.Module, d_loss: Callable[[nn.Module, int], Tensor], steps: int,
           make_optimizer: OptimizerFactory, after_step: Callable[[nn.Module], None] | None
           ) -> nn.Module:
    """A copy of D after `steps` optimizer steps on `d_loss(D_copy, i)` (i = 0 .. steps-1),
    frozen, ready to judge the generator."""
    D_k = copy_net(D).requires_grad_(True)
    params = [p for p in D_k.parameters() if p.requires_grad]
    opt = make_optimizer(params)
    for i in range(steps):
        # autograd.grad, not backward: nothing outside the copy (G's .grad) can be written to.
        grads = torch.autograd.grad(d_loss(D_k, i), params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
        if after_step is not None:
            after_step(D_k)
    return D_k.requires_grad_(False)
