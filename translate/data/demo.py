"""The demo datasets: unpaired translation tasks with a known answer, built offline in seconds.

Domain A is random crops of public-domain photos that ship inside scikit-image. Domain B is the
task's mapping applied to *other* crops, so the training data is truly unpaired. The test split
holds crops from a held-out strip of every photo, with testB = mapping(testA) under the same
file names: G_ab(testA) can be scored against testB pixel by pixel. Tasks (TASKS):

- "demo": `demo_transform`, an invertible per-pixel colour mapping (what `translate demo` uses);
- "morph": `morph_transform`, a grey dilation that thickens bright structures by a pixel, then
  another colour mapping: the answer changes local shape, not only colour, so a recipe tuned
  to "demo" alone is caught out.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from translate.errors import UserError
from translate.images import save_image

DEMO_ROOT_DEFAULT = Path("datasets/demo")
MARKER = ".demo-complete.json"  # written last: a folder without it is not a finished build
VERSION = 1  # bump when the content changes, so old builds are rebuilt

HUE_SHIFT = 80 / 360  # turns of the colour wheel (80 degrees: not a channel permutation)
SATURATION_GAMMA = 0.75  # s -> s**0.75: more saturated
VALUE_GAMMA = 0.8  # v -> v**0.8: brighter shadows
MORPH_HUE_SHIFT = -50 / 360  # the "morph" task's colour step: another hue rotation,
MORPH_SATURATION_GAMMA = 1.3  # and s -> s**1.3: less saturated
TASKS = {
    "demo": "demo_transform: hue +80 degrees, s**0.75, v**0.8 (per pixel, invertible)",
    "morph": "morph_transform: grey dilation by a 3x3 cross, then hue -50 degrees, s**1.3",
}

# skimage.data loaders whose files ship in the wheel (no download), with their licences.
PHOTOS = {
    "astronaut": "NASA, public domain",
    "coffee": "Rachel Michetti, CC0",
    "chelsea": "Stefan van der Walt, CC0",
    "rocket": "SpaceX, public domain",
    "immunohistochemistry": "CMMI, no known copyright restrictions",
    "hubble_deep_field": "NASA, public domain",
}
_SPLITS = ("trainA", "trainB", "testA", "testB")


# ---------------------------------------------------------------------------- the mapping


def _rgb_to_hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    chroma = v - rgb.min(axis=-1)
    s = np.divide(chroma, v, out=np.zeros_like(v), where=v > 0)
    safe = np.where(chroma > 0, chroma, 1.0)
    h = np.where(v == r, ((g - b) / safe) % 6.0,
                 np.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return np.where(chroma > 0, h / 6.0, 0.0), s, v


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    i = sector.astype(np.int64) % 6
    r = np.choose(i, [v, q, p, p, t, v])
    g = np.choose(i, [t, v, v, q, p, p])
    b = np.choose(i, [p, p, t, v, v, q])
    return np.stack([r, g, b], axis=-1)


def _map_hsv(img: np.ndarray, hue: float, s_gamma: float, v_gamma: float) -> np.ndarray:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected uint8 HxWx3 pixels, got {img.dtype} {img.shape}")
    h, s, v = _rgb_to_hsv(img.astype(np.float64) / 255.0)
    rgb = _hsv_to_rgb((h + hue) % 1.0, s**s_gamma, v**v_gamma)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def demo_transform(img: np.ndarray) -> np.ndarray:
    """A -> B: rotate the hue by 80 degrees, saturate (s**0.75), lift shadows (v**0.8).

    Each step is a bijection of the RGB cube, so the mapping is invertible up to 8-bit
    rounding (`demo_inverse`); it acts on each pixel alone, so a small conv net can learn it.
    """
    return _map_hsv(img, HUE_SHIFT, SATURATION_GAMMA, VALUE_GAMMA)


def demo_inverse(img: np.ndarray) -> np.ndarray:
    """B -> A: the inverse of `demo_transform` (equal to within a few 8-bit levels)."""
    return _map_hsv(img, -HUE_SHIFT, 1 / SATURATION_GAMMA, 1 / VALUE_GAMMA)


def _dilate_cross(img: np.ndarray) -> np.ndarray:
    """Grey dilation of each channel by the 3x3 cross (the pixel and its 4 neighbours), with
    the border replicated: bright lines and spots grow by one pixel, thin dark ones vanish."""
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return np.maximum.reduce([p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2],
                              p[1:-1, 2:]])


def morph_transform(img: np.ndarray) -> np.ndarray:
    """A -> B of the "morph" task: `_dilate_cross`, then rotate the hue by -50 degrees and
    desaturate (s**1.3). Not invertible (dilation loses thin dark detail), and not per pixel:
    a net must look at each pixel's neighbours and change shapes as well as colours."""
    return _map_hsv(_dilate_cross(img), MORPH_HUE_SHIFT, MORPH_SATURATION_GAMMA, 1.0)


def task_transform(task: str) -> Callable[[np.ndarray], np.ndarray]:
    """The A -> B mapping of a task by name (looked up at call time)."""
    if task not in TASKS:
        raise UserError(f"unknown demo task {task!r}; choose from {', '.join(TASKS)}")
    return {"demo": demo_transform, "morph": morph_transform}[task]


# ---------------------------------------------------------------------------- crops


def _load_photos() -> dict[str, np.ndarray]:
    try:
        from skimage import data
    except ImportError:
        raise UserError("the demo dataset needs scikit-image: pip install -e .[demo]") from None
    return {name: getattr(data, name)() for name in PHOTOS}


def _split_photo(photo: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(training part, held-out strip): the right quarter of each photo is kept for testing."""
    width = photo.shape[1]
    strip = max(size, width // 4)
    return photo[:, : width - strip], photo[:, width - strip:]


def _random_crops(regions: list[np.ndarray], n: int, size: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """n size x size crops: a random region, a random square of side size..4*size, shrunk."""
    crops = []
    for _ in range(n):
        region = regions[rng.integers(len(regions))]
        h, w = region.shape[:2]
        side = int(rng.integers(size, min(4 * size, h, w) + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        square = Image.fromarray(np.ascontiguousarray(region[top:top + side, left:left + side]))
        crops.append(np.asarray(square.resize((size, size), Image.Resampling.BICUBIC)))
    return crops


def _write(folder: Path, images: list[np.ndarray]) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        save_image(folder / f"{i:04d}.png", img)


# ---------------------------------------------------------------------------- building


def _params(size: int, n_train: int, n_test: int, seed: int, task: str) -> dict[str, int | str]:
    return {"version": VERSION, "task": task, "size": size, "n_train": n_train,
            "n_test": n_test, "seed": seed}


def is_complete(root: Path, params: dict[str, int | str] | None = None) -> bool:
    """True if `root` holds a finished demo build (with these parameters, if given)."""
    try:
        found = json.loads((root / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return params is None or found == params


def _fill(folder: Path, size: int, n_train: int, n_test: int, seed: int, task: str) -> None:
    transform = task_transform(task)
    photos = _load_photos()
    parts = [_split_photo(p, size) for p in photos.values()]
    train_regions = [t for t, _ in parts]
    test_regions = [h for _, h in parts]
    # Separate streams: B's crops are not A's crops, so no pairing leaks into training.
    rng_a, rng_b, rng_test = (np.random.default_rng([seed, i]) for i in (1, 2, 3))
    test_a = _random_crops(test_regions, n_test, size, rng_test)
    _write(folder / "trainA", _random_crops(train_regions, n_train, size, rng_a))
    _write(folder / "trainB", [transform(x)
                               for x in _random_crops(train_regions, n_train, size, rng_b)])
    _write(folder / "testA", test_a)
    _write(folder / "testB", [transform(x) for x in test_a])
    (folder / "README.txt").write_text(_readme(size, n_train, n_test, seed, task),
                                       encoding="utf-8")


def build_demo(root: Path = DEMO_ROOT_DEFAULT, size: int = 64, n_train: int = 400,
               n_test: int = 40, seed: int = 0, force: bool = False, task: str = "demo"
               ) -> Path:
    """Build a known-truth dataset of `task` (TASKS) at `root`, or return at once if it is
    already there.

    The build happens in a hidden sibling folder that is renamed into place when complete,
    so an interrupted build leaves nothing under `root`.
    """
    root = Path(root)
    if not 8 <= size <= 128:
        raise UserError(f"demo image size {size} is outside 8..128 pixels")
    if n_train < 1 or n_test < 1:
        raise UserError("the demo dataset needs at least 1 training and 1 test image")
    task_transform(task)  # an unknown task fails before anything is written
    params = _params(size, n_train, n_test, seed, task)
    if is_complete(root, params) and not force:
        return root
    if root.exists() and not _is_ours(root):
        raise UserError(f"{root}: exists and is not a demo dataset — remove it or build the "
                        "demo somewhere else")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.with_name(f".{root.name}.building-{uuid.uuid4().hex[:8]}")
    try:
        _fill(tmp, size, n_train, n_test, seed, task)
        (tmp / MARKER).write_text(json.dumps(params) + "\n", encoding="utf-8")
        _replace_dir(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _is_ours(root: Path) -> bool:
    """A folder we may delete: a demo build (finished or not) and nothing else."""
    if not root.is_dir():
        return False
    allowed = set(_SPLITS) | {"README.txt", MARKER}
    return all(p.name in allowed for p in root.iterdir())


def _replace_dir(tmp: Path, root: Path, params: dict[str, int | str]) -> None:
    old = root.with_name(f".{root.name}.old-{uuid.uuid4().hex[:8]}")
    if root.exists():
        root.rename(old)
    try:
        tmp.rename(root)
    except OSError:
        # Another process (another rank) finished the same build first: use theirs.
        if not is_complete(root, params):
            raise
    shutil.rmtree(old, ignore_errors=True)


_ABOUT = {
    "demo": """demo_transform (translate.data.demo): per pixel in HSV, rotate the hue by 80 degrees,
s -> s**0.75 (more saturated), v -> v**0.8 (brighter shadows). It is invertible up to 8-bit
rounding (demo_inverse). A CycleGAN trained on trainA/trainB should learn G_ab ~ demo_transform
without ever seeing a pair.""",
    "morph": """morph_transform (translate.data.demo): a grey dilation of each channel by the 3x3 cross
(bright structures grow by one pixel, thin dark ones vanish), then per pixel in HSV the hue
rotated by -50 degrees and s -> s**1.3 (less saturated). It changes local shape as well as
colour and is not invertible.""",
}


def _readme(size: int, n_train: int, n_test: int, seed: int, task: str) -> str:
    credits = "\n".join(f"  - {name}: {who}" for name, who in PHOTOS.items())
    mapping = TASKS[task].split(":")[0]
    return f"""translate demo dataset, task "{task}" (built by translate.data.demo.build_demo, seed {seed})

An unpaired image-to-image translation task whose answer is known.

  trainA/  {n_train} crops ({size}x{size} PNG) of photos
  trainB/  {n_train} *other* crops of the same photos, passed through {mapping}
  testA/   {n_test} crops from a held-out strip (the right quarter) of every photo
  testB/   {mapping}(testA), same file names: the ground truth for G_ab(testA)

{_ABOUT[task]}

Source photos (from scikit-image's bundled sample data):
{credits}
"""
