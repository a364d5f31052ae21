"""Per-sample noise that depends only on (seed, stream, global sample number k).

A batch's latent codes are then the same whether the samples are drawn by one process with batch
2b or by two processes with batch b each, and a resumed run draws exactly what the uninterrupted
run would have drawn: no generator state to carry across processes or checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_MASKS = {s: (1 << (64 - s)) - 1 for s in (27, 30, 31, 11)}


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


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
    base = splitmix64(torch.tensor([seed * 1_000_003 + stream], dtype=torch.int64))
    per_sample = splitmix64(base + k.detach().to("cpu", torch.int64))
    counters = per_sample[:, None] + torch.arange(n, dtype=torch.int64)[None, :] * _GOLDEN
    bits = _shr(splitmix64(counters), 11)  # 53 random bits
    u = bits.to(torch.float64) / float(1 << 53)
    return u.to(torch.float32).reshape(len(k), *shape).to(k.device)


def normal(k: Tensor, shape: tuple[int, ...], seed: int, stream: int) -> Tensor:
    """N(0, 1) float32 of shape (len(k), *shape) by Box-Muller on two uniform streams."""
    u1 = uniform(k, shape, seed, 2 * stream).clamp_min(1e-12)
    u2 = uniform(k, shape, seed, 2 * stream + 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
