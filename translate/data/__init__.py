"""Training data: datasets indexed by a global sample number (the batch stream over them is
translate/core/batches.py, re-exported here).

Item k of every dataset is a pure function of (seed, k). `batches` gives batch n on rank r the
samples k = (n * world_size + r) * batch_size + j, so resuming is "start at batch n", and
2 ranks with batch b together see exactly what 1 rank with batch 2b sees.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from translate.config import RunConfig
from translate.core.batches import batch_samples, batches, collate, fetch, steps_per_epoch  # noqa: F401
from translate.data.classes import LabelledImages
from translate.data.demo import DEMO_ROOT_DEFAULT
from translate.data.folders import DataError, DataWarning, FolderImages, UnpairedImages
from translate.data.toy import ToyMixture, sample_toy, toy_modes, toy_std

__all__ = [
    "DataError", "DataWarning", "batches", "build_dataset", "describe", "sample_toy",
    "steps_per_epoch", "toy_modes", "toy_std",
]

SPLITS = ("train", "test")


def _root(cfg: RunConfig) -> Path:
    if not cfg.data.root:
        raise DataError("data.root is empty: set data.root in the recipe or pass --data PATH")
    root = Path(cfg.data.root).expanduser()
    if not root.exists():
        hint = ("the demo data is built by `translate demo` (run it once in this folder), or "
                if root == DEMO_ROOT_DEFAULT else "")
        raise DataError(f"{root}: dataset folder not found — {hint}check data.root (or --data "
                        "PATH)")
    if not root.is_dir():
        raise DataError(f"{root}: is a file, not a folder — data.root must be a folder of images")
    return root


def _unpaired(cfg: RunConfig, split: str) -> Dataset:
    return UnpairedImages(_root(cfg), split, cfg.data, cfg.seed)


def _folder(cfg: RunConfig, split: str) -> Dataset:
    root = _root(cfg)
    classes = getattr(cfg.model, "classes", ())  # class-conditional methods label by subfolder
    if all((root / name).is_dir() for name in ("trainA", "trainB")):
        # Searched recursively (or read as classes), the root of an unpaired dataset would mix
        # both domains and the test images into one training set.
        fix = ("a folder with one subfolder per class" if classes else
               f"one domain's folder, e.g. --data {root / 'trainA'}")
        raise DataError(f"{root}: an unpaired (CycleGAN) dataset (trainA, trainB, ...), not "
                        f"training data for {cfg.method}; pass {fix}")
    if classes:
        return LabelledImages(root, split, cfg.data, cfg.seed, classes)
    return FolderImages(root, split, cfg.data, cfg.seed)


def _toy(cfg: RunConfig, split: str) -> Dataset:
    return ToyMixture(cfg.data.toy, cfg.seed, cfg.data.toy_epoch, split)


BUILDERS: dict[str, Callable[[RunConfig, str], Dataset]] = {
    "unpaired": _unpaired,
    "folder": _folder,
    "toy": _toy,
}


def build_dataset(cfg: RunConfig, split: str = "train") -> Dataset:
    """The dataset of `cfg.data.kind`; every problem with the data is raised here, up front."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return BUILDERS[cfg.data.kind](cfg, split)


def describe(dataset: Dataset) -> str:
    """One line for the log, e.g. "unpaired data/h2z (train): 1067 A + 1334 B images (...)"."""
    return dataset.describe()


# ---------------------------------------------------------------------------- batches
