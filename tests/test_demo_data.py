"""The embedded demo dataset: layout, known mapping, unpairedness, idempotent atomic builds."""

from __future__ import annotations

import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from translate.config import DataConfig, RunConfig
from translate.data import build_dataset, demo, describe
from translate.data.demo import MARKER, build_demo, demo_inverse, demo_transform
from translate.errors import UserError
from translate.images import to_uint8

SMALL = {"size": 32, "n_train": 24, "n_test": 6, "seed": 0}


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: read(p) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    root = tmp_path_factory.mktemp("d") / "demo"
    start = time.perf_counter()
    build_demo(root, **SMALL)
    return root, time.perf_counter() - start


def test_build_is_fast_and_complete(built: tuple[Path, float]) -> None:
    root, seconds = built
    assert seconds < 10
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["trainA", "trainB", "testA", "testB", "README.txt", MARKER])
    counts = {d: len(list((root / d).glob("*.png"))) for d in ("trainA", "trainB", "testA", "testB")}
    assert counts == {"trainA": 24, "trainB": 24, "testA": 6, "testB": 6}
    for folder in ("trainA", "testB"):
        for img in read_folder(root / folder).values():
            assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert "demo_transform" in (root / "README.txt").read_text()
    assert json.loads((root / MARKER).read_text())["size"] == 32
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temp dirs


def test_test_b_is_the_exact_truth(built: tuple[Path, float]) -> None:
    root, _ = built
    test_a, test_b = read_folder(root / "testA"), read_folder(root / "testB")
    assert test_a.keys() == test_b.keys()
    for name in test_a:
        assert np.array_equal(demo_transform(test_a[name]), test_b[name]), name


def test_training_domains_are_unpaired(built: tuple[Path, float]) -> None:
    root, _ = built
    mapped_a = np.stack([demo_transform(x) for x in read_folder(root / "trainA").values()])
    for name, b in read_folder(root / "trainB").items():
        errors = np.abs(mapped_a.astype(np.int16) - b.astype(np.int16)).mean(axis=(1, 2, 3))
        assert errors.min() > 3, f"trainB/{name} is nearly T(some trainA image)"


def test_test_crops_come_from_a_held_out_strip() -> None:
    photo = np.arange(300 * 451 * 3, dtype=np.int64).reshape(300, 451, 3)  # unique pixels
    train, held_out = demo._split_photo(photo, 32)
    assert train.shape[1] + held_out.shape[1] == 451 and held_out.shape[1] >= 32
    assert not np.intersect1d(train, held_out).size  # disjoint pixels: no test pixel trains


def test_demo_loads_as_an_unpaired_dataset(built: tuple[Path, float]) -> None:
    root, _ = built
    cfg = RunConfig(data=DataConfig(root=str(root), load_size=36, crop_size=32))
    train = build_dataset(cfg)
    assert "24 A + 24 B images (0 non-image files ignored, 0 unreadable)" in describe(train)
    assert train[0]["a"].shape == (3, 32, 32)
    test = build_dataset(cfg, "test")
    assert len(test) == 6
    for k in range(6):  # test item k pairs testA/k with its truth testB/k
        a, b = to_uint8(test[k]["a"]), to_uint8(test[k]["b"])
        assert np.array_equal(demo_transform(a), b)


# ---------------------------------------------------------------------------- the mapping


def test_transform_is_invertible_nontrivial_and_per_pixel() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    y = demo_transform(x)
    assert np.abs(demo_inverse(y).astype(int) - x).max() <= 2
    assert np.abs(y.astype(int) - x).mean() > 30  # clearly visible
    for perm in itertools.permutations(range(3)):  # not a mere channel swap
        assert np.abs(y.astype(int) - x[..., perm]).mean() > 10
    pixelwise = np.stack([[demo_transform(x[i:i + 1, j:j + 1])[0, 0] for j in range(8)]
                          for i in range(8)])
    assert np.array_equal(pixelwise, y[:8, :8])
    with pytest.raises(ValueError):
        demo_transform(x.astype(np.float32))


# ---------------------------------------------------------------------------- builds


def test_second_call_is_a_no_op(built: tuple[Path, float]) -> None:
    root, _ = built
    stamp = (root / "trainA" / "0000.png").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_demo(root, **SMALL) == root
    assert time.perf_counter() - start < 0.5
    assert (root / "trainA" / "0000.png").stat().st_mtime_ns == stamp


def test_builds_are_deterministic(tmp_path: Path, built: tuple[Path, float]) -> None:
    again = build_demo(tmp_path / "again", **SMALL)
    root, _ = built
    for folder in ("trainA", "trainB", "testA"):
        ours, theirs = read_folder(root / folder), read_folder(again / folder)
        assert all(np.array_equal(ours[n], theirs[n]) for n in ours)


def test_missing_marker_or_new_parameters_rebuild(tmp_path: Path) -> None:
    root = build_demo(tmp_path / "demo", size=16, n_train=4, n_test=2)
    (root / MARKER).unlink()  # as if a build had stopped before finishing
    (root / "trainB" / "0003.png").unlink()
    build_demo(root, size=16, n_train=4, n_test=2)
    assert (root / MARKER).exists() and (root / "trainB" / "0003.png").exists()
    build_demo(root, size=24, n_train=5, n_test=2)
    assert read(root / "trainA" / "0004.png").shape == (24, 24, 3)
    assert json.loads((root / MARKER).read_text())["n_train"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(images: list[np.ndarray]) -> np.ndarray:
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "demo_transform", broken)
    with pytest.raises(KeyboardInterrupt):
        build_demo(tmp_path / "demo", size=16, n_train=4, n_test=2)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(UserError, match="not a demo dataset"):
        build_demo(mine, size=16, n_train=2, n_test=1)
    assert (mine / "holiday.jpg").read_bytes() == b"precious"


def test_missing_scikit_image_names_the_fix(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)  # makes `import skimage` fail
    with pytest.raises(UserError, match=r"pip install -e \.\[demo\]"):
        build_demo(tmp_path / "demo", size=16, n_train=2, n_test=1)
    assert list(tmp_path.iterdir()) == []
