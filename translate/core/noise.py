"""Per-sample noise that depends only on (seed, stream, global sample number k).

A batch's latent codes are then the same whether the samples are drawn by one process with batch
2b or by two processes with batch b each, and a resumed run draws exactly what the uninterrupted
run would have drawn: no generator state to carry across processes or checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASKS = {s: (1 << (64 - s)) - 1 for s in (27, 30, 31, 40)}


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


_NORMAL_STREAMS = 1 << 32


def _shr(x: Tensor, s: int) -> Tensor:
    return (x >> s) & _MASKS[s]  # logical shift on int64


def splitmix64(x: Tensor) -> Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def uniform(k: Tensor, shape: tuple[int, ...], seed: int, stream: int) -> Tensor:
    """U[0, 1) float32 of shape (len(k), *shape), a pure function of (seed, stream, k)."""
    n = math.prod(shape)
    base = splitmix64(torch.tensor([_signed((seed * 1_000_003 + stream) % (1 << 64))],
                                   dtype=torch.int64))
    per_sample = splitmix64(base + k.detach().to("cpu", torch.int64))
    counters = per_sample[:, None] + torch.arange(n, dtype=torch.int64)[None, :] * _GOLDEN
    # 24 bits: exactly representable in float32, so u < 1 always holds.
    bits = _shr(splitmix64(counters), 40)
    u = bits.to(torch.float32) / float(1 << 24)
    return u.reshape(len(k), *shape).to(k.device)


def normal(k: Tensor, shape: tuple[int, ...], seed: int, stream: int) -> Tensor:
    """N(0, 1) float32 of shape (len(k), *shape) by Box-Muller on two uniform streams that
    no `uniform(..., stream)` call with a small stream number can reach."""
    u1 = 1.0 - uniform(k, shape, seed, _NORMAL_STREAMS + 2 * stream)  # in (0, 1]: log is finite
    u2 = uniform(k, shape, seed, _NORMAL_STREAMS + 2 * stream + 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
