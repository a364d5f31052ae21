"""Minibatch standard deviation (Karras et al. 2018, ProGAN): a discriminator feature that
measures how varied a group of samples is, so a generator that collapses to few outputs is
easy to tell from real data, which is always varied."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from translate.errors import ConfigError


class MinibatchStd(nn.Module):
    """Append one feature: the standard deviation over groups of `group_size` samples, averaged
    over all features (and positions), broadcast to every sample of the group.

    Works on (N, C, H, W) maps (one extra channel) and on (N, F) vectors (one extra feature).
    Groups are strided as in the ProGAN code: sample i belongs to group i % (N / group_size).
    The batch size must be a multiple of `group_size`.
    """

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        if group_size < 1:
            raise ConfigError(f"minibatch_std: group size must be >= 1, got {group_size}")
        self.group_size = group_size

    def forward(self, x: Tensor) -> Tensor:
        n, rest = x.shape[0], x.shape[1:]
        gs = self.group_size
        if n % gs:
            raise ConfigError(f"model.minibatch_std: group size {gs} must divide the batch the "
                              f"discriminator sees ({n}); change the batch size or the group size")
        groups = x.reshape(gs, n // gs, *rest).float()
        # Biased std plus a small epsilon: finite gradient even for identical samples.
        std = (groups.var(dim=0, unbiased=False) + 1e-8).sqrt()     # (N/gs, *rest)
        feature = std.flatten(1).mean(dim=1)                         # (N/gs,)
        feature = feature.repeat(gs).to(x.dtype)                     # back to (N,), strided
        shape = (n, 1, *rest[1:])
        return torch.cat([x, feature.reshape(n, *([1] * len(rest))).expand(shape)], dim=1)
