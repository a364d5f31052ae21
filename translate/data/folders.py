"""Image-folder datasets: unpaired domains (ROOT/trainA + ROOT/trainB) and one plain folder.

Every item is a pure function of (seed, k) for the global sample number k = 0, 1, 2, ...:
epoch = k // len, position = k % len, the A order is a seeded permutation per epoch, B is drawn
per k (or in order), and crop/flip come from a generator seeded by (seed, k). Resuming at any
batch and sharding across processes therefore need no sampler state.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from translate.config import DataConfig
from translate.data.transforms import Draw, Preprocess, draw
from translate.errors import DataError, ImageError
from translate.images import IMAGE_EXTENSIONS, TRAIN_LIMIT, list_images, load_image, to_tensor

_U64 = (1 << 64) - 1
_ORDER_STREAM, _ITEM_STREAM = 0, 1


class DataWarning(UserWarning):
    """Images were skipped: the run goes on, but the user should know."""


# ---------------------------------------------------------------------------- seeding


def item_rng(seed: int, k: int) -> np.random.Generator:
    """The generator of sample k: everything random about it comes from here."""
    return np.random.default_rng([seed & _U64, _ITEM_STREAM, k])


@functools.lru_cache(maxsize=8)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The shuffled order of positions 0..n-1 in `epoch` (cached: every sample of an epoch
    needs it, and building it costs O(n))."""
    order = np.random.default_rng([seed & _U64, _ORDER_STREAM, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def position(seed: int, k: int, n: int, shuffle: bool) -> int:
    """Which of n items sample k shows: shuffled per epoch for training; in listing order for
    the test split, so test item k is file k of testA (and of testB), as evaluation expects."""
    return int(epoch_order(seed, k // n, n)[k % n]) if shuffle else k % n


# ---------------------------------------------------------------------------- scanning


@dataclass(frozen=True)
class ImageList:
    """The usable images of one folder, and what was left out."""

    folder: Path
    paths: tuple[Path, ...]
    n_non_images: int  # files without an image extension (and unreadable sub-folders)
    n_unreadable: int  # image files whose header PIL could not read (or too large)


def scan(folder: Path, data: DataConfig) -> ImageList:
    """List `folder` recursively and check each image's header (no full decode).

    Unreadable images are dropped with one warning (or the first raises with data.strict).
    """
    if not folder.is_dir():
        raise DataError(f"{folder}: folder not found — check data.root (or --data PATH)")
    images, skipped = list_images(folder, recursive=True)
    if not images:
        raise DataError(
            f"{folder}: no images found ({_count(len(skipped), 'non-image file')}; looking for "
            f"{' '.join(IMAGE_EXTENSIONS)}) — put this domain's images there")
    good, bad = [], []
    for path in images:
        reason, size = read_header(path, data.max_pixels)
        if reason is None:
            _check_crop(path, size, data)
            good.append(path)
        elif data.strict:
            raise ImageError(reason + " (--strict / data.strict=true stops on unreadable "
                             "images)")
        else:
            bad.append(reason)
    if not good:
        raise DataError(f"{folder}: none of the {len(images)} images can be read "
                        f"(first: {bad[0]})")
    if bad:
        warnings.warn(f"{folder}: skipping {len(bad)} unreadable of {len(images)} images "
                      f"(first: {bad[0]})", DataWarning, stacklevel=3)
    return ImageList(folder, tuple(good), len(skipped), len(bad))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def read_header(path: Path, max_pixels: int) -> tuple[str | None, tuple[int, int]]:
    """(why `path` cannot be used, judged from its header alone, or None; its width and
    height, (0, 0) when unreadable)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except PermissionError:
        return (f"{path}: permission denied — make the file readable (chmod +r) or remove it",
                (0, 0))
    except Exception as e:  # noqa: BLE001 — PIL raises many types (OSError, SyntaxError, ...)
        detail = " ".join(str(e).split()) or type(e).__name__
        return f"{path}: not a readable image ({detail}) — re-export or remove it", (0, 0)
    if w * h > max_pixels:
        return (f"{path}: {w}x{h} pixels is more than data.max_pixels={max_pixels} — "
                f"shrink the image or raise the limit with {TRAIN_LIMIT.format(w * h)}"), (w, h)
    return None, (w, h)


def _check_crop(path: Path, size: tuple[int, int], data: DataConfig) -> None:
    """preprocess "crop" takes crops of the images as they are: one smaller than the crop would
    be padded with mirrored borders that the nets then learn as content."""
    w, h = size
    if data.preprocess == "crop" and min(w, h) < data.crop_size:
        raise DataError(f"{path}: {w}x{h} pixels is smaller than data.crop_size "
                        f"{data.crop_size} with data.preprocess = \"crop\" (crops without "
                        "resizing); lower data.crop_size, use preprocess resize_and_crop, or "
                        "remove the image")


# ---------------------------------------------------------------------------- loading


@dataclass
class Domain:
    """The images of one domain and how they become tensors."""

    images: ImageList
    channels: int
    preprocess: Preprocess
    max_pixels: int
    strict: bool

    def __post_init__(self) -> None:
        # A per-process memory of files already reported, so a broken file that keeps being
        # drawn warns once instead of flooding the log (each DataLoader worker has its own).
        self.warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.images.paths)

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """Image `index` as CxHxW in [-1, 1]; a file that fails now (vanished, truncated) is
        replaced by the next one, the same way in every process, unless data.strict."""
        d = draw(rng)
        paths = self.images.paths
        for step in range(len(paths)):
            path = paths[(index + step) % len(paths)]
            try:
                return to_tensor(self._pixels(path, d))[0]
            except ImageError as e:
                if self.strict:
                    raise
                if path not in self.warned:
                    self.warned.add(path)
                    warnings.warn(f"{e} (using the next image instead; --strict / "
                                  "data.strict=true stops here)", DataWarning, stacklevel=2)
        raise DataError(f"{self.images.folder}: no image could be loaded — check the files")

    def _pixels(self, path: Path, d: Draw) -> np.ndarray:
        img = load_image(path, channels=self.channels, max_pixels=self.max_pixels,
                         limit=TRAIN_LIMIT)
        try:
            return self.preprocess(img, d)
        except ImageError as e:
            raise ImageError(f"{path}: {e}") from e


def subset(images: ImageList, max_items: int) -> ImageList:
    """At most `max_items` of the images (0 = all), evenly spaced through the sorted listing:
    datasets often list their files grouped by source, so the first N would be a biased pick."""
    n = len(images.paths)
    if max_items == 0 or max_items >= n:
        return images
    keep = tuple(images.paths[i * n // max_items] for i in range(max_items))
    return dataclasses.replace(images, paths=keep)


def _domain(folder: Path, channels: int, data: DataConfig, train: bool) -> Domain:
    images = scan(folder, data)
    if train:  # the test split stays whole, so runs on different subsets score alike
        images = subset(images, data.max_items)
    return Domain(images, channels, Preprocess.from_config(data, train),
                  data.max_pixels, data.strict)


# ---------------------------------------------------------------------------- datasets


class UnpairedImages(Dataset):
    """Items {"a": CxHxW, "b": CxHxW} from two unaligned folders; len = max(|A|, |B|).

    Split "test" reads testA/testB in listing order with no random crop or flip.
    """

    def __init__(self, root: Path, split: str, data: DataConfig, seed: int) -> None:
        train = split == "train"
        folders = [root / f"{split}A", root / f"{split}B"]
        missing = [f.name for f in folders if not f.is_dir()]
        if missing:
            found = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name[0] != ".")
            raise DataError(
                f"{root}: no {' or '.join(missing)} folder (found: {', '.join(found) or 'none'}) "
                f"— an unpaired dataset is ROOT/trainA and ROOT/trainB (plus testA, testB), "
                "one folder of images per domain")
        self.root, self.split, self.seed, self.serial_b = root, split, seed, data.serial_b
        self.shuffle = train
        self.a = _domain(folders[0], data.channels_a, data, train)
        self.b = _domain(folders[1], data.channels_b, data, train)

    def __len__(self) -> int:
        return max(len(self.a), len(self.b))

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        n = len(self)
        # Positions run over max(|A|, |B|); modulo |A| spreads the smaller domain evenly.
        i_a = position(self.seed, k, n, self.shuffle) % len(self.a)
        rng = item_rng(self.seed, k)
        in_order = self.serial_b or not self.shuffle
        i_b = k % len(self.b) if in_order else int(rng.integers(len(self.b)))
        return {"a": self.a.load(i_a, rng), "b": self.b.load(i_b, rng)}

    def describe(self) -> str:
        a, b = self.a.images, self.b.images
        return (f"unpaired {self.root} ({self.split}): {len(a.paths)} A + {len(b.paths)} B "
                f"images ({a.n_non_images + b.n_non_images} non-image files ignored, "
                f"{a.n_unreadable + b.n_unreadable} unreadable)")


class FolderImages(Dataset):
    """Items {"x": CxHxW} from one folder of images (searched recursively)."""

    def __init__(self, root: Path, split: str, data: DataConfig, seed: int) -> None:
        self.root, self.split, self.seed = root, split, seed
        self.shuffle = split == "train"
        self.x = _domain(root, data.channels_a, data, train=self.shuffle)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        i = position(self.seed, k, len(self), self.shuffle)
        return {"x": self.x.load(i, item_rng(self.seed, k))}

    def describe(self) -> str:
        x = self.x.images
        return (f"folder {self.root}: {len(x.paths)} images ({x.n_non_images} non-image files "
                f"ignored, {x.n_unreadable} unreadable)")
