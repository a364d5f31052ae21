"""DiffAugment (Zhao et al. 2020): augmentations that gradients flow through.

Applied to both real and fake images right before the discriminator, they keep D from memorising
a small dataset while G still receives gradients through the augmented fakes. Each sample draws
its own parameters.

Written with plain tensor ops rather than kornia.augmentation: kornia's colour jitter clamps its
output (which breaks the [-1, 1] convention and zeroes gradients at the clamp) and its
translation resamples bilinearly, whereas DiffAugment shifts by whole pixels.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from translate.errors import ConfigError

TRANSLATION_RATIO = 0.125  # largest shift, as a fraction of each side
CUTOUT_RATIO = 0.5  # side of the zeroed square, as a fraction of each side


def _uniform(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """One U(0, 1) draw per sample, shaped to broadcast over (C, H, W), in x's dtype."""
    u = torch.rand(x.shape[0], 1, 1, 1, device=x.device, generator=generator)
    return u.to(x.dtype)


def color(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5), per sample."""
    x = x + (_uniform(x, generator) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(x, generator) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(x, generator) + 0.5) + mean


def _shift_axis(x: Tensor, dim: int, shift: Tensor) -> Tensor:
    """Shift each sample by shift[n] pixels along `dim` (2 or 3), filling with zeros."""
    size = x.shape[dim]
    source = torch.arange(size, device=x.device).unsqueeze(0) - shift.unsqueeze(1)  # (N, size)
    inside = (source >= 0) & (source < size)
    view = [x.shape[0], 1, 1, 1]
    view[dim] = size
    index = source.clamp(0, size - 1).reshape(view).expand_as(x)
    return torch.gather(x, dim, index) * inside.reshape(view).to(x.dtype)


def translation(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Shift each image by up to 1/8 of its height and width, filling the gap with zeros."""
    for dim in (2, 3):
        limit = int(x.shape[dim] * TRANSLATION_RATIO + 0.5)
        shift = torch.randint(-limit, limit + 1, (x.shape[0],), device=x.device,
                              generator=generator)
        x = _shift_axis(x, dim, shift)
    return x


def cutout(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Zero a square of half the image's side at a random centre in each image (may clip edges)."""
    n, _, h, w = x.shape
    inside = torch.ones(n, 1, h, w, dtype=torch.bool, device=x.device)
    for dim, size in ((2, h), (3, w)):
        side = int(size * CUTOUT_RATIO + 0.5)
        centre = torch.randint(0, size, (n,), device=x.device, generator=generator)
        start = (centre - side // 2).unsqueeze(1)
        pos = torch.arange(size, device=x.device).unsqueeze(0)
        view = [n, 1, 1, 1]
        view[dim] = size
        inside = inside & ((pos >= start) & (pos < start + side)).reshape(view)
    return x * (~inside).to(x.dtype)


POLICIES: dict[str, Callable[[Tensor, torch.Generator | None], Tensor]] = {
    "color": color,
    "translation": translation,
    "cutout": cutout,
}


def parse_policy(policy: str) -> list[str]:
    """'color,translation' -> ['color', 'translation']; '' or 'none' -> []."""
    names = [name.strip() for name in policy.split(",") if name.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in POLICIES:
            raise ConfigError(f"unknown DiffAugment policy {name!r} in {policy!r}; "
                              f"use a comma-separated subset of {', '.join(POLICIES)} or 'none'")
    return names


def diff_augment(
    x: Tensor,  # images (N, C, H, W), in [-1, 1] by convention (not enforced, not clamped)
    policy: str = "color,translation,cutout",  # comma-separated names from POLICIES, in order
    generator: torch.Generator | None = None,  # source of randomness; None uses the global RNG
) -> Tensor:
    """Apply each augmentation of `policy` in order; same shape and dtype, differentiable in x."""
    for name in parse_policy(policy):
        x = POLICIES[name](x, generator)
    return x
