"""Preprocessing of training images: the reference CycleGAN `--preprocess` modes, made
deterministic per sample.

The random parts (crop position, flip) are drawn by the caller from a generator seeded by
(seed, sample number) and passed in, and only albumentations' deterministic functional ops do the
pixel work. We do not seed an `A.Compose` per item: `Compose.set_random_seed` hands the *same*
seed to every child transform, so RandomCrop's first draw and HorizontalFlip's first draw would be
the same number and crop position and flip would be correlated.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from translate.config import DataConfig
from translate.errors import ImageError

MODES = ("resize_and_crop", "scale_width_and_crop", "crop", "resize", "none")
SIZE_MULTIPLE = 4  # "none" keeps the image size but trims it to a multiple of this


@dataclass(frozen=True)
class Draw:
    """The random choices for one image, drawn before its size is known."""

    u_y: float  # crop top, as a fraction of the free rows, in [0, 1)
    u_x: float  # crop left, as a fraction of the free columns, in [0, 1)
    flip: bool  # mirror left-right


def draw(rng: np.random.Generator) -> Draw:
    """Always three draws, whatever the mode, so the stream of a sample never shifts."""
    u_y, u_x, u_f = rng.random(3)
    return Draw(u_y=float(u_y), u_x=float(u_x), flip=bool(u_f < 0.5))


@dataclass(frozen=True)
class Preprocess:
    """uint8 HxWxC in, uint8 crop x crop x C out (or a multiple of 4 for mode "none")."""

    mode: str
    load_size: int  # pixels
    crop_size: int  # pixels
    flip: bool
    train: bool  # False: no random crop or flip (test split)

    @classmethod
    def from_config(cls, data: DataConfig, train: bool) -> Preprocess:
        if data.preprocess not in MODES:
            raise ValueError(f"unknown preprocess mode {data.preprocess!r}")
        return cls(data.preprocess, data.load_size, data.crop_size, data.flip, train)

    def __call__(self, img: np.ndarray, d: Draw) -> np.ndarray:
        if self.train:
            img = self._train_geometry(img, d)
            if self.flip and d.flip:
                img = img[:, ::-1]
        else:
            img = self._test_geometry(img)
        return np.ascontiguousarray(img)

    def _train_geometry(self, img: np.ndarray, d: Draw) -> np.ndarray:
        load, crop = self.load_size, self.crop_size
        if self.mode == "resize_and_crop":
            return crop_at(resize(img, load, load), crop, d.u_y, d.u_x)
        if self.mode == "scale_width_and_crop":
            return crop_at(scale_width(img, load, crop), crop, d.u_y, d.u_x)
        if self.mode == "crop":
            return crop_at(pad_to(img, crop), crop, d.u_y, d.u_x)
        if self.mode == "resize":
            return resize(img, crop, crop)
        return trim_to_multiple(img, SIZE_MULTIPLE)

    def _test_geometry(self, img: np.ndarray) -> np.ndarray:
        crop = self.crop_size
        if self.mode in ("resize_and_crop", "resize"):
            return resize(img, crop, crop)
        if self.mode == "scale_width_and_crop":
            return crop_at(scale_width(img, crop, crop), crop, 0.5, 0.5)
        if self.mode == "crop":
            return crop_at(pad_to(img, crop), crop, 0.5, 0.5)
        return trim_to_multiple(img, SIZE_MULTIPLE)


@functools.cache
def _geometric() -> tuple[ModuleType, ModuleType]:
    """(albumentations' geometric functions, cv2), imported on first use: albumentations loads
    all of its transforms on import, ~55 MB of memory and ~0.7 s. Only a resize or a pad needs
    it: a run whose images are already the crop size never pays, and with data workers only the
    workers do."""
    os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations checks PyPI on import
    import cv2
    from albumentations.augmentations.geometric import functional

    return functional, cv2


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = img.shape[:2]
    # Area averaging does not alias when shrinking; cubic is the reference's choice to enlarge.
    shrink = height <= h and width <= w
    fgeometric, cv2 = _geometric()
    return fgeometric.resize(img, (height, width), cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def scale_width(img: np.ndarray, width: int, min_height: int) -> np.ndarray:
    """Width to `width` keeping the aspect ratio, scaled up further if the height would fall
    below `min_height` (the reference stretches the height instead; we keep shapes round)."""
    h, w = img.shape[:2]
    scale = max(width / w, min_height / h)
    return resize(img, max(min_height, round(h * scale)), max(width, round(w * scale)))


def pad_to(img: np.ndarray, size: int) -> np.ndarray:
    """Reflect-pad (centred) so both sides are at least `size`; no-op for large images."""
    h, w = img.shape[:2]
    if h >= size and w >= size:
        return img
    top, left = max(0, size - h) // 2, max(0, size - w) // 2
    bottom, right = max(0, size - h) - top, max(0, size - w) - left
    fgeometric, cv2 = _geometric()
    border = cv2.BORDER_REFLECT_101 if min(h, w) > 1 else cv2.BORDER_REPLICATE
    return fgeometric.pad_with_params(img, top, bottom, left, right, border, None)


def crop_at(img: np.ndarray, size: int, u_y: float, u_x: float) -> np.ndarray:
    """A size x size window whose offset is the fraction (u_y, u_x) of the free range."""
    h, w = img.shape[:2]
    top = min(int(u_y * (h - size + 1)), h - size)
    left = min(int(u_x * (w - size + 1)), w - size)
    return img[top:top + size, left:left + size]


def trim_to_multiple(img: np.ndarray, multiple: int) -> np.ndarray:
    """Centre-crop H and W down to multiples of `multiple` (the nets' stride needs it)."""
    h, w = img.shape[:2]
    th, tw = h - h % multiple, w - w % multiple
    if th == 0 or tw == 0:
        raise ImageError(f"image is {w}x{h} pixels, smaller than {multiple}x{multiple} — "
                         "use a larger image or another data.preprocess mode")
    top, left = (h - th) // 2, (w - tw) // 2
    return img[top:top + th, left:left + tw]
