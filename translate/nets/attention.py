"""The self-attention block of SAGAN (Zhang et al. 2018), for generators and discriminators.

Convolutions see a few pixels at a time; this block lets every position of a feature map look
at every other one, so distant parts of an image can be made (or judged) consistent.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from translate.nets.layers import maybe_spectral_norm


class SelfAttention(nn.Module):
    """x + gamma * o, where o = h(x) softmax-weighted over positions by f(x)^T g(x).

    f and g are 1x1 convs to C/8 channels (queries and keys), h a 1x1 conv to C/8 channels
    (values) followed by a 1x1 conv back to C, as in the SAGAN reference code. gamma starts
    at 0: the block is the identity at first and the net learns how much non-local evidence
    to mix in, so inserting it does not disturb the initial convolutional behaviour.
    """

    def __init__(self, channels: int, spectral_norm: bool = False) -> None:
        super().__init__()
        inner = max(1, channels // 8)

        def conv(c_in: int, c_out: int) -> nn.Module:
            return maybe_spectral_norm(nn.Conv2d(c_in, c_out, 1, bias=False), spectral_norm)

        self.f, self.g, self.h = conv(channels, inner), conv(channels, inner), conv(channels, inner)
        self.out = conv(inner, channels)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        n, _, hgt, wid = x.shape
        q = self.f(x).flatten(2)                  # (N, C/8, HW)
        k = self.g(x).flatten(2)                  # (N, C/8, HW)
        v = self.h(x).flatten(2)                  # (N, C/8, HW)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (N, HW query, HW key)
        o = (v @ attn.transpose(1, 2)).reshape(n, -1, hgt, wid)
        return x + self.gamma * self.out(o)
