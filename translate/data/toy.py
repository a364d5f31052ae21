"""2-D Gaussian mixtures for mode-collapse experiments, as in PacGAN (Lin et al., 2018):
"ring" = 8 modes on the unit circle, std 0.01; "grid" = 25 modes on {-4,-2,0,2,4}^2, std 0.05.

Toy batches are large and the nets tiny, so the per-sample generators of the image datasets
would dominate a step; samples come from a counter-based hash of (seed, k) instead, evaluated
for a whole batch at once and still a pure function of (seed, k).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

_STD = {"ring": 0.01, "grid": 0.05}
_U64 = (1 << 64) - 1
_SPLIT_STREAMS = {"train": 0, "test": 3}  # first of the three hash streams each split uses


def toy_modes(name: str) -> torch.Tensor:
    """The K x 2 mode centres of mixture `name`."""
    if name == "ring":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return torch.stack([angles.cos(), angles.sin()], dim=1).float()
    if name == "grid":
        axis = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
        return torch.cartesian_prod(axis, axis)
    raise ValueError(f"unknown toy mixture {name!r}; choose one of {', '.join(_STD)}")


def toy_std(name: str) -> float:
    """The standard deviation of every mode of mixture `name`."""
    toy_modes(name)  # validates the name
    return _STD[name]


def sample_toy(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """n points (n x 2) from mixture `name`, each mode equally likely."""
    modes = toy_modes(name)
    which = torch.randint(len(modes), (n,), generator=generator)
    return modes[which] + toy_std(name) * torch.randn(n, 2, generator=generator)


# ---------------------------------------------------------------------------- dataset


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer: a bijective mix of 64-bit integers (wrapping arithmetic)."""
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, ks: np.ndarray, stream: int) -> np.ndarray:
    """A uniform number in [0, 1) per sample number in `ks`, independent across streams."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([(seed & _U64) ^ (stream * 0x632BE59BD9B4E019 & _U64)],
                                   dtype=np.uint64))
        bits = _splitmix64(key ^ _splitmix64(ks.astype(np.uint64)))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def toy_points(name: str, seed: int, ks: np.ndarray, split: str = "train") -> np.ndarray:
    """Sample k of the toy dataset for each k in `ks`, as float32 len(ks) x 2. The test split
    draws from its own streams, so its points are fresh, not the training points again."""
    modes = toy_modes(name).double().numpy()
    base = _SPLIT_STREAMS[split]
    u_mode, u_radius, u_angle = (hash_uniform(seed, ks, base + i) for i in range(3))
    which = np.minimum((u_mode * len(modes)).astype(np.int64), len(modes) - 1)
    # Box-Muller: two uniforms give two independent standard normals.
    radius = np.sqrt(-2.0 * np.log1p(-u_radius))
    angle = 2.0 * math.pi * u_angle
    noise = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    return (modes[which] + toy_std(name) * noise).astype(np.float32)


class ToyMixture(Dataset):
    """Items {"x": (2,)}; `epoch` only sets len(), the data never repeats."""

    def __init__(self, name: str, seed: int, epoch: int, split: str = "train") -> None:
        toy_modes(name)
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(_SPLIT_STREAMS)}")
        self.name, self.seed, self.epoch, self.split = name, seed, epoch, split

    def __len__(self) -> int:
        return self.epoch

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return {"x": self.batch([k])["x"][0]}

    def batch(self, samples: list[int]) -> dict[str, torch.Tensor]:
        """The collated batch of `samples` in one vectorised call (see translate.data.fetch)."""
        ks = np.asarray(samples, dtype=np.uint64)
        return {"x": torch.from_numpy(toy_points(self.name, self.seed, ks, self.split))}

    def describe(self) -> str:
        shape = {"ring": "ring of 8 Gaussians (radius 1", "grid": "grid of 25 Gaussians (spacing 2"}
        return (f"toy: {shape[self.name]}, std {toy_std(self.name)}), "
                f"{self.epoch} samples per epoch")
