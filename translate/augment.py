"""DiffAugment (Zhao et al. 2020) on kornia.augmentation: augmentations that gradients flow through.

Applied right before the discriminator, they keep D from memorising a small dataset while G still
receives gradients through the augmented fakes. Each sample draws its own parameters; a D step
draws them once and applies them to the real and the fake batch alike (`diff_augment_pair`).

Every op runs with kornia's clipping off, on images in [-1, 1] as they are: with
`clip_output=False` kornia's brightness is a plain addition, so it needs no mapping to [0, 1],
and a clamp would both break the [-1, 1] convention and zero D's gradient at the edges. kornia's
saturation and contrast always clamp (and its contrast scales about black, not about the image's
mean), so those two are small kornia augmentations of our own with DiffAugment's formulas.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import kornia.augmentation as K
import torch
from kornia.augmentation import random_generator as rg
from torch import Tensor

from translate.errors import ConfigError

TRANSLATION_RATIO = 0.125  # largest shift, as a fraction of each side
CUTOUT_RATIO = 0.5  # sides of the zeroed rectangle, as a fraction of the image's sides

# One draw for a batch: each augmentation with the parameters it sampled, in policy order.
Params = list[tuple[K.AugmentationBase2D, dict[str, Tensor]]]


class _ScaleAboutMean(K.IntensityAugmentationBase2D):
    """DiffAugment's saturation and contrast: scale each value's distance to a mean by a factor
    drawn from U(low, high), unclamped. Saturation: the mean over channels (each pixel's grey),
    U(0, 2); contrast: the mean over the whole image, U(0.5, 1.5)."""

    def __init__(self, name: str, low: float, high: float, mean_dims: tuple[int, ...]) -> None:
        super().__init__(p=1.0)
        self._param_generator = rg.PlainUniformGenerator(((low, high), name, None, None))
        self.key, self.mean_dims = name, mean_dims

    def apply_transform(self, input: Tensor, params: dict[str, Tensor], flags: dict[str, Any],
                        transform: Tensor | None = None) -> Tensor:
        factor = params[self.key].to(input.device, input.dtype).view(-1, 1, 1, 1)
        mean = input.mean(dim=self.mean_dims, keepdim=True)
        return (input - mean) * factor + mean


class _PixelTranslate(K.RandomTranslate):
    """RandomTranslate by whole pixels with zero fill, as DiffAugment shifts: nearest sampling of
    an integer shift copies pixels exactly, where a fractional bilinear shift would blur."""

    def __init__(self) -> None:
        bound = (-TRANSLATION_RATIO, TRANSLATION_RATIO)
        super().__init__(translate_x=bound, translate_y=bound, resample="nearest",
                         padding_mode="zeros", p=1.0)

    def generate_parameters(self, batch_shape: tuple[int, ...]) -> dict[str, Tensor]:
        params = super().generate_parameters(batch_shape)
        return {key: value.round() for key, value in params.items()}


def _color(h: int, w: int) -> list[K.AugmentationBase2D]:
    # Brightness +-0.5 in [-1, 1] units, then saturation x0..2, then contrast x0.5..1.5.
    return [K.RandomBrightness((0.5, 1.5), clip_output=False, p=1.0),
            _ScaleAboutMean("saturation", 0.0, 2.0, (1,)),
            _ScaleAboutMean("contrast", 0.5, 1.5, (1, 2, 3))]


def _translation(h: int, w: int) -> list[K.AugmentationBase2D]:
    return [_PixelTranslate()]


def _cutout(h: int, w: int) -> list[K.AugmentationBase2D]:
    # Area CUTOUT_RATIO^2 of the image at aspect h/w gives sides h * CUTOUT_RATIO, w * CUTOUT_RATIO.
    # Unlike the original, kornia keeps the whole rectangle inside the image.
    return [K.RandomErasing(scale=(CUTOUT_RATIO**2,) * 2, ratio=(h / w,) * 2, value=0.0, p=1.0)]


POLICIES: dict[str, Callable[[int, int], list[K.AugmentationBase2D]]] = {
    "color": _color,
    "translation": _translation,
    "cutout": _cutout,
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


@functools.lru_cache(maxsize=32)
def _augmentations(policy: str, h: int, w: int) -> tuple[K.AugmentationBase2D, ...]:
    # Built once per policy and image size: construction costs more than a call. The modules hold
    # no state we rely on; parameters always travel explicitly through `Params`.
    return tuple(aug for name in parse_policy(policy) for aug in POLICIES[name](h, w))


@contextlib.contextmanager
def _rng(generator: torch.Generator | None) -> Iterator[None]:
    # kornia draws from torch's global RNG; a given generator seeds a forked copy of it instead,
    # so seeded calls repeat and leave the global stream (which checkpoints restore) untouched.
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def sample_params(
    shape: torch.Size | tuple[int, ...],  # (N, C, H, W) of the batch(es) to augment
    policy: str = "color,translation,cutout",  # comma-separated names from POLICIES, in order
    generator: torch.Generator | None = None,  # source of randomness; None uses the global RNG
) -> Params:
    """One draw of per-sample parameters for `policy`, to apply to one or more batches."""
    h, w = shape[-2:]
    with _rng(generator):
        return [(aug, aug.forward_parameters(torch.Size(shape)))
                for aug in _augmentations(policy, h, w)]


def apply_params(x: Tensor, params: Params) -> Tensor:
    """Augment `x` with drawn parameters; same shape and dtype, differentiable in x, unclamped."""
    y = x
    for aug, p in params:
        y = aug(y, params=p)
    return y.to(x.dtype)  # the caller's dtype, whatever precision kornia computed in


def diff_augment(
    x: Tensor,  # images (N, C, H, W), in [-1, 1] by convention (not enforced, not clamped)
    policy: str = "color,translation,cutout",  # comma-separated names from POLICIES, in order
    generator: torch.Generator | None = None,  # source of randomness; None uses the global RNG
) -> Tensor:
    """Apply each augmentation of `policy` in order, with fresh parameters for each sample."""
    return apply_params(x, sample_params(x.shape, policy, generator))


def diff_augment_pair(
    real: Tensor,  # real images (N, C, H, W)
    fake: Tensor,  # fake images of the same shape
    policy: str = "color,translation,cutout",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Augment real and fake with one draw: sample i of each gets the same transforms, so D
    cannot tell them apart by the augmentation."""
    if real.shape != fake.shape:
        raise ValueError(f"diff_augment_pair: real {tuple(real.shape)} and fake "
                         f"{tuple(fake.shape)} differ in shape")
    params = sample_params(real.shape, policy, generator)
    return apply_params(real, params), apply_params(fake, params)
