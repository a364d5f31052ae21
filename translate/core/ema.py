"""Exponential moving average of generator weights (Karras et al. 2018; Yazici et al. 2019)."""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_ema(net: nn.Module) -> nn.Module:
    ema = copy.deepcopy(net).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema


def warmed_decay(decay: float, step: int) -> float:
    """The decay used at `step` (0-based): min(decay, (1 + step) / (10 + step)). The average
    starts as a copy of the untrained generator; with a fixed 0.999 it would still hold ~14% of
    those random weights after 2,000 steps. The warm-up lets the early average follow the net
    (as TensorFlow's ExponentialMovingAverage with num_updates does)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, for parameters; buffers (BatchNorm stats) copied."""
    averaged = list(ema.parameters())
    current = [p.detach().to(e.dtype) for e, p in zip(averaged, net.parameters())]
    # One multi-tensor kernel instead of a Python loop of small ones (GPU: no launch per tensor).
    torch._foreach_lerp_(averaged, current, 1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)
