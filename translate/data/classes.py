"""A labelled image folder: ROOT/<class>/... with one subfolder of images per class.

Class-conditional methods (cgan) name their classes in `model.classes`; the label of an image is
the index of its top-level subfolder in that tuple. Every item is a pure function of (seed, k),
like the plain folder's, so labels need no sampler state under resume or sharding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from translate.config import DataConfig
from translate.data.folders import DataError, _domain, item_rng, position
from translate.images import list_images


def _subfolders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_classes(root: str, method: str) -> tuple[str, ...]:
    """The sorted subfolder names of `root`: the classes of a conditional run."""
    if not root:
        raise DataError(f"data.root is empty: {method} needs an image folder with one subfolder "
                        "per class; set data.root or pass --data PATH")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: dataset folder not found — check data.root (or --data PATH)")
    names = _subfolders(path)
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise DataError(
            f"{path}: {method} needs one subfolder of images per class, at least two (found "
            f"{found}) — arrange it as {path}/<class>/*.png, e.g. {path}/cat and {path}/dog, or "
            "train an unconditional recipe (dcgan.toml) on it")
    return tuple(names)


class LabelledImages(Dataset):
    """Items {"x": CxHxW, "y": class index (int64)} from ROOT/<class>/ (searched recursively).

    The classes' images are laid end to end; one seeded permutation per epoch runs over all of
    them, so classes are drawn in proportion to their size."""

    def __init__(self, root: Path, split: str, data: DataConfig, seed: int,
                 classes: tuple[str, ...]) -> None:
        found = _subfolders(root)
        missing = [c for c in classes if c not in found]
        if missing:
            raise DataError(
                f"{root}: no class folder {', '.join(map(repr, missing))} (found: "
                f"{', '.join(found) or 'none'}) — model.classes must name subfolders of data.root")
        loose, _ = list_images(root, recursive=False)
        if loose:
            raise DataError(f"{root}: {len(loose)} images lie outside the class subfolders "
                            f"(e.g. {loose[0].name}) — move each into its class folder")
        self.root, self.split, self.seed, self.classes = root, split, seed, classes
        self.shuffle = split == "train"
        self.domains = [_domain(root / c, data.channels_a, data, train=self.shuffle)
                        for c in classes]
        # starts[c] = position of class c's first image in the end-to-end listing.
        self.starts = np.cumsum([0] + [len(d) for d in self.domains])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i = position(self.seed, k, len(self), self.shuffle)
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        # A broken file is replaced within its own class, so the label stays right.
        x = self.domains[c].load(i - int(self.starts[c]), item_rng(self.seed, k))
        return {"x": x, "y": torch.tensor(c, dtype=torch.int64)}

    def describe(self) -> str:
        counts = ", ".join(f"{c} {len(d)}" for c, d in zip(self.classes, self.domains))
        return f"labelled folder {self.root}: {len(self)} images in {len(self.classes)} " \
               f"classes ({counts})"
