"""translate.data: index-determinism, batching/sharding/resume, preprocessing, bad input."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from translate.config import DataConfig, RunConfig
from translate.data import (
    DataError,
    DataWarning,
    batches,
    build_dataset,
    describe,
    sample_toy,
    steps_per_epoch,
    toy_modes,
    toy_std,
)
from translate.errors import ImageError, UserError


def cfg_for(root: Path | str = "", seed: int = 0, **data) -> RunConfig:
    data.setdefault("load_size", 20)
    data.setdefault("crop_size", 16)
    return RunConfig(seed=seed, data=DataConfig(root=str(root), **data))


def write_png(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def solid(value: int, h: int = 24, w: int = 28) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def noise(rng: np.random.Generator, h: int = 24, w: int = 28) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_unpaired(root: Path, n_a: int, n_b: int, split: str = "train") -> Path:
    rng = np.random.default_rng(123)
    for i in range(n_a):
        write_png(root / f"{split}A" / f"a{i}.png", noise(rng))
    for i in range(n_b):
        write_png(root / f"{split}B" / f"b{i}.png", noise(rng))
    return root


def solid_values(t: torch.Tensor) -> int:
    """The 0..255 value of a solid-colour image tensor."""
    return round((t.mean().item() + 1) * 127.5)


@pytest.fixture
def unpaired(tmp_path: Path) -> Path:
    return make_unpaired(tmp_path / "ds", 3, 5)


# ---------------------------------------------------------------------------- indexing


def test_uneven_domains_epoch_is_max_and_covers_both(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    for i in range(3):
        write_png(root / "trainA" / f"{i}.png", solid(10 + 10 * i))
    for i in range(7):
        write_png(root / "trainB" / f"{i}.png", solid(100 + 10 * i))
    ds = build_dataset(cfg_for(root, preprocess="resize", flip=False, serial_b=True))
    assert len(ds) == 7
    items = [ds[k] for k in range(7)]
    a_seen = [solid_values(it["a"]) for it in items]
    b_seen = [solid_values(it["b"]) for it in items]
    assert sorted(set(a_seen)) == [10, 20, 30]
    assert max(a_seen.count(v) for v in set(a_seen)) == 3  # 7 positions spread over 3 images
    assert b_seen == [100 + 10 * i for i in range(7)]  # serial_b: B in order
    # The next epoch is another permutation of the same A images.
    next_epoch = [solid_values(ds[k]["a"]) for k in range(7, 14)]
    assert sorted(set(next_epoch)) == [10, 20, 30]


def test_same_k_same_item_and_seeds_differ(unpaired: Path) -> None:
    one = build_dataset(cfg_for(unpaired, seed=1))
    again = build_dataset(cfg_for(unpaired, seed=1))
    other = build_dataset(cfg_for(unpaired, seed=2))
    ks = [0, 3, 4, 17, 1000]
    for k in ks:
        for key in ("a", "b"):
            assert torch.equal(one[k][key], again[k][key])
    assert any(not torch.equal(one[k]["a"], other[k]["a"]) for k in ks)
    assert not all(torch.equal(one[k]["a"], one[k + 1]["a"]) for k in ks)


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def assert_batches_equal(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> None:
    assert x.keys() == y.keys()
    for key, value in x.items():
        assert torch.equal(value, y[key]), key


def test_two_ranks_see_what_one_rank_sees(unpaired: Path) -> None:
    ds = build_dataset(cfg_for(unpaired))
    single = batches(ds, batch_size=4)
    rank0 = batches(ds, batch_size=2, rank=0, world_size=2)
    rank1 = batches(ds, batch_size=2, rank=1, world_size=2)
    for _ in range(3):
        assert_batches_equal(next(single), concat([next(rank0), next(rank1)]))


def test_start_batch_resumes_exactly(unpaired: Path) -> None:
    ds = build_dataset(cfg_for(unpaired))
    stream = batches(ds, batch_size=3)
    from_start = [next(stream) for _ in range(4)]
    resumed = batches(build_dataset(cfg_for(unpaired)), batch_size=3, start_batch=2)
    assert_batches_equal(next(resumed), from_start[2])
    assert_batches_equal(next(resumed), from_start[3])


def test_workers_give_the_same_batches(unpaired: Path) -> None:
    ds = build_dataset(cfg_for(unpaired, seed=5))
    plain = batches(ds, batch_size=2, start_batch=1, rank=1, world_size=2)
    loaded = batches(ds, batch_size=2, start_batch=1, rank=1, world_size=2, num_workers=1)
    for _ in range(4):
        assert_batches_equal(next(plain), next(loaded))


def test_datasets_pickle_for_spawned_workers(unpaired: Path) -> None:
    ds = build_dataset(cfg_for(unpaired))
    copy = pickle.loads(pickle.dumps(ds))
    assert torch.equal(copy[5]["b"], ds[5]["b"])


def test_steps_per_epoch(unpaired: Path) -> None:
    ds = build_dataset(cfg_for(unpaired))  # 5 samples per epoch
    assert steps_per_epoch(ds, 2, 1) == 3
    assert steps_per_epoch(ds, 2, 2) == 2
    assert steps_per_epoch(ds, 5, 1) == 1


def test_bad_batch_arguments() -> None:
    ds = build_dataset(cfg_for(kind="toy"))
    with pytest.raises(ValueError):
        batches(ds, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError):
        batches(ds, batch_size=0)


# ---------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("mode, train_hw, test_hw", [
    ("resize_and_crop", (16, 16), (16, 16)),
    ("scale_width_and_crop", (16, 16), (16, 16)),
    ("crop", (16, 16), (16, 16)),
    ("resize", (16, 16), (16, 16)),
    ("none", (28, 40), (28, 40)),  # 30x41 trimmed to multiples of 4
])
def test_preprocess_output_shapes(tmp_path: Path, mode: str, train_hw, test_hw) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        write_png(tmp_path / f"{split}A" / "wide.png", noise(rng, 30, 41))
        write_png(tmp_path / f"{split}B" / "tall.png", noise(rng, 30, 41))
    for split, hw in (("train", train_hw), ("test", test_hw)):
        ds = build_dataset(cfg_for(tmp_path, preprocess=mode), split)
        item = ds[0]
        assert item["a"].shape == (3, *hw) and item["b"].shape == (3, *hw)
        assert item["a"].dtype == torch.float32
        assert -1.0 <= item["a"].min() and item["a"].max() <= 1.0


def test_albumentations_loads_only_for_a_resize(tmp_path: Path) -> None:
    """albumentations (~55 MB of memory, ~0.7 s to import) loads when an image is resized, not
    with the training stack nor for images already the crop size (checked on a fresh
    interpreter: this one has loaded it already)."""
    rng = np.random.default_rng(0)
    for split in ("trainA", "trainB"):
        write_png(tmp_path / "exact" / split / "x.png", noise(rng, 16, 16))
        write_png(tmp_path / "big" / split / "x.png", noise(rng, 30, 41))
    code = ("import sys, translate.runner; from tests.test_data import cfg_for; "
            "from translate.data import build_dataset; from pathlib import Path; "
            "seen = ['albumentations' in sys.modules]; "
            "build_dataset(cfg_for(Path(sys.argv[1]), preprocess='crop'))[0]; "
            "seen.append('albumentations' in sys.modules); "
            "build_dataset(cfg_for(Path(sys.argv[2]), preprocess='resize_and_crop'))[0]; "
            "seen.append('albumentations' in sys.modules); print(seen)")
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "exact"),
                          str(tmp_path / "big")], capture_output=True, text=True, cwd=root,
                         check=True, env={**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}"})
    assert out.stdout.strip() == "[False, False, True]", out.stderr


def test_crop_refuses_images_smaller_than_the_crop_and_scale_width_fits_short_ones(
        tmp_path: Path) -> None:
    """preprocess "crop" on an image smaller than crop_size would train on mirrored borders:
    refused, naming the file and the key, in the API and through the CLI before any run folder
    exists."""
    write_png(tmp_path / "small" / "big.png", noise(np.random.default_rng(1), 40, 40))
    write_png(tmp_path / "small" / "s.png", noise(np.random.default_rng(1), 12, 40))
    with pytest.raises(DataError, match=r"s\.png: 40x12 pixels is smaller than data.crop_size 16"):
        build_dataset(cfg_for(tmp_path / "small", kind="folder", preprocess="crop"))
    proc = run_cli("train", "recipes/dcgan.toml", "--data", str(tmp_path / "small"), "--steps",
                   "1", "--run-dir", str(tmp_path / "run"), "--set", 'data.preprocess="crop"',
                   "--set", "data.crop_size=32", "--set", "model.image_size=32", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "s.png: 40x12 pixels is smaller than data.crop_size 32" in proc.stderr
    assert not (tmp_path / "run").exists()
    write_png(tmp_path / "flat" / "f.png", noise(np.random.default_rng(1), 5, 60))
    ds = build_dataset(cfg_for(tmp_path / "flat", kind="folder", preprocess="scale_width_and_crop"))
    assert ds[0]["x"].shape == (3, 16, 16)


def test_crop_positions_vary(tmp_path: Path) -> None:
    write_png(tmp_path / "f" / "n.png", noise(np.random.default_rng(2), 40, 40))
    ds = build_dataset(cfg_for(tmp_path / "f", kind="folder", preprocess="crop", flip=False))
    crops = {ds[k]["x"].numpy().tobytes() for k in range(20)}
    assert len(crops) > 10


def test_test_split_is_in_order_and_not_random(tmp_path: Path) -> None:
    for i in range(3):
        write_png(tmp_path / "testA" / f"{i}.png", solid(10 * (i + 1)))
        write_png(tmp_path / "testB" / f"{i}.png", solid(100 + i))
    write_png(tmp_path / "testA" / "3.png", noise(np.random.default_rng(0), 30, 30))
    x = build_dataset(cfg_for(tmp_path, seed=0), "test")
    y = build_dataset(cfg_for(tmp_path, seed=9), "test")
    assert len(x) == 4
    assert [solid_values(x[k]["a"]) for k in range(3)] == [10, 20, 30]
    assert [solid_values(x[k]["b"]) for k in range(4)] == [100, 101, 102, 100]
    for k in range(8):
        assert torch.equal(x[k]["a"], y[k]["a"])  # no seeded crop or flip
    assert torch.equal(x[3]["a"], x[7]["a"])


def horizontal_ramp(h: int = 16, w: int = 16) -> np.ndarray:
    ramp = np.linspace(0, 255, w).astype(np.uint8)
    return np.repeat(np.repeat(ramp[None, :, None], h, 0), 3, 2)


@pytest.mark.parametrize("flip", [True, False])
def test_flip_about_half_the_time(tmp_path: Path, flip: bool) -> None:
    write_png(tmp_path / "f" / "ramp.png", horizontal_ramp())
    ds = build_dataset(cfg_for(tmp_path / "f", kind="folder", preprocess="resize", flip=flip))
    n = 300
    flipped = sum(bool(ds[k]["x"][0, 0, 0] > ds[k]["x"][0, 0, -1]) for k in range(n))
    if flip:
        assert 0.4 * n < flipped < 0.6 * n
    else:
        assert flipped == 0


# ---------------------------------------------------------------------------- channels


def write_odd_formats(folder: Path) -> None:
    folder.mkdir(parents=True)
    rgb = noise(np.random.default_rng(3))
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(
        folder / "rgba.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(folder / "gray16.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "pal.png")
    Image.fromarray(rgb).save(folder / "photo.jpg")


@pytest.mark.parametrize("channels", [1, 3])
def test_odd_formats_load_to_the_configured_channels(tmp_path: Path, channels: int) -> None:
    write_odd_formats(tmp_path / "imgs")
    ds = build_dataset(cfg_for(tmp_path / "imgs", kind="folder", preprocess="resize",
                               channels_a=channels))
    assert len(ds) == 5
    for k in range(5):
        assert ds[k]["x"].shape == (channels, 16, 16)


def test_sixteen_bit_gray_is_scaled(tmp_path: Path) -> None:
    (tmp_path / "g").mkdir()
    Image.fromarray(np.full((16, 16), 65535, np.uint16)).save(tmp_path / "g" / "white.png")
    ds = build_dataset(cfg_for(tmp_path / "g", kind="folder", preprocess="resize", channels_a=1))
    assert torch.allclose(ds[0]["x"], torch.ones(1, 16, 16))


def test_one_channel_domain(unpaired: Path) -> None:
    ds = build_dataset(cfg_for(unpaired, channels_a=1, channels_b=3))
    batch = next(batches(ds, batch_size=2))
    assert batch["a"].shape == (2, 1, 16, 16)
    assert batch["b"].shape == (2, 3, 16, 16)


# ---------------------------------------------------------------------------- bad input


def test_non_image_files_are_counted(unpaired: Path) -> None:
    (unpaired / "trainA" / "notes.txt").write_text("hi")
    (unpaired / "trainB" / "labels.csv").write_text("x")
    (unpaired / "trainB" / ".DS_Store").write_text("hidden files are not counted")
    ds = build_dataset(cfg_for(unpaired))
    line = describe(ds)
    assert "3 A + 5 B images" in line and "2 non-image files ignored" in line
    assert "0 unreadable" in line and "\n" not in line


def test_corrupt_image_is_skipped_or_raises_when_strict(unpaired: Path) -> None:
    bad = unpaired / "trainA" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.warns(DataWarning, match="broken.png"):
        ds = build_dataset(cfg_for(unpaired))
    assert "1 unreadable" in describe(ds)
    assert len(ds.a) == 3
    with pytest.raises(ImageError, match="broken.png"):
        build_dataset(cfg_for(unpaired, strict=True))


def test_file_failing_during_training_falls_back(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    for i in range(3):
        write_png(folder / f"{i}.png", solid(50 * (i + 1)))
    ds = build_dataset(cfg_for(folder, kind="folder", preprocess="resize", flip=False))
    strict = build_dataset(cfg_for(folder, kind="folder", preprocess="resize", strict=True))
    k_gone = [solid_values(ds[k]["x"]) for k in range(3)].index(100)
    (folder / "1.png").write_bytes(b"truncated")  # breaks after the build-time scan
    with pytest.warns(DataWarning, match="1.png"):
        value = solid_values(ds[k_gone]["x"])
    assert value == 150  # the next file in listing order stands in, in every process
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file failing again stays quiet
        assert solid_values(ds[k_gone]["x"]) == 150
    with pytest.raises(ImageError, match="1.png"):
        strict[k_gone]


def test_worker_errors_arrive_as_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    write_png(folder / "only.png", solid(9))
    ds = build_dataset(cfg_for(folder, kind="folder", strict=True))
    (folder / "only.png").unlink()
    with pytest.raises(ImageError) as info:
        next(batches(ds, batch_size=1, num_workers=1))
    assert "only.png" in str(info.value) and "\n" not in str(info.value)


def test_mixed_sizes_with_preprocess_none(tmp_path: Path) -> None:
    write_png(tmp_path / "f" / "a.png", solid(1, 16, 16))
    write_png(tmp_path / "f" / "b.png", solid(2, 20, 16))
    ds = build_dataset(cfg_for(tmp_path / "f", kind="folder", preprocess="none"))
    with pytest.raises(DataError, match="batch_size=1"):
        next(batches(ds, batch_size=2))


def test_empty_domain_folder(unpaired: Path) -> None:
    for p in (unpaired / "trainB").iterdir():
        p.unlink()
    (unpaired / "trainB" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as info:
        build_dataset(cfg_for(unpaired))
    msg = str(info.value)
    assert "trainB" in msg and "no images found" in msg and "(1 non-image file;" in msg


def test_all_images_unreadable(tmp_path: Path) -> None:
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "x.png").write_bytes(b"nope")
    with pytest.raises(DataError, match="none of the 1 images"):
        build_dataset(cfg_for(tmp_path / "f", kind="folder"))


def test_missing_domain_folder(tmp_path: Path) -> None:
    make_unpaired(tmp_path, 2, 0)
    with pytest.raises(DataError) as info:
        build_dataset(cfg_for(tmp_path))
    msg = str(info.value)
    assert "no trainB folder" in msg and "found: trainA" in msg and "ROOT/trainA" in msg
    assert "\n" not in msg


def test_empty_root_and_missing_root(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(UserError, match="set data.root in the recipe or pass --data PATH"):
        build_dataset(cfg_for(""))
    with pytest.raises(UserError, match="not found") as info:
        build_dataset(cfg_for(tmp_path / "nowhere"))
    assert "translate demo" not in str(info.value)
    monkeypatch.chdir(tmp_path)  # the demo recipe's datasets/demo, before `translate demo`
    with pytest.raises(UserError, match=r"datasets/demo: dataset folder not found — the demo "
                                        r"data is built by `translate demo`"):
        build_dataset(cfg_for("datasets/demo"))


def test_a_gan_refuses_the_root_of_an_unpaired_dataset(tmp_path: Path) -> None:
    """--data pointed at ROOT (trainA, trainB, testA, testB) would train a GAN on both domains
    and the test images at once: refused, naming a domain folder to pass instead."""
    make_unpaired(tmp_path / "root", 4, 4)
    make_unpaired(tmp_path / "root", 2, 2, split="test")
    with pytest.raises(DataError, match=r"unpaired \(CycleGAN\) dataset .* not training data "
                                        r"for cyclegan; pass one domain's folder"):
        build_dataset(cfg_for(tmp_path / "root", kind="folder"))
    proc = run_cli("train", "recipes/dcgan.toml", "--data", str(tmp_path / "root"), "--steps",
                   "1", "--run-dir", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"pass one domain's folder, e.g. --data {tmp_path / 'root' / 'trainA'}" in proc.stderr
    assert not (tmp_path / "run").exists()
    assert len(build_dataset(cfg_for(tmp_path / "root" / "trainA", kind="folder"))) == 4


# ---------------------------------------------------------------------------- toy


@pytest.mark.parametrize("name, k, std", [("ring", 8, 0.01), ("grid", 25, 0.05)])
def test_toy_statistics(name: str, k: int, std: float) -> None:
    modes = toy_modes(name)
    assert modes.shape == (k, 2) and toy_std(name) == std
    ds = build_dataset(cfg_for(kind="toy", toy=name, seed=3))
    from_dataset = next(batches(ds, batch_size=20_000))["x"]
    from_torch = sample_toy(name, 20_000, torch.Generator().manual_seed(0))
    for x in (from_dataset, from_torch):
        nearest = torch.cdist(x.double(), modes.double()).argmin(dim=1)
        counts = torch.bincount(nearest, minlength=k).double()
        assert counts.min() > 0.7 * len(x) / k  # every mode, about equally often
        offsets = x.double() - modes.double()[nearest]
        assert offsets.mean(0).abs().max() < 0.1 * std  # centred on the modes
        assert abs(offsets.std().item() / std - 1) < 0.05
    assert toy_std(name) == std


def test_toy_is_index_deterministic_and_test_split_is_fresh() -> None:
    ds = build_dataset(cfg_for(kind="toy", seed=4))
    assert torch.equal(ds[7]["x"], next(batches(ds, batch_size=8))["x"][7])
    assert not torch.equal(ds[7]["x"], build_dataset(cfg_for(kind="toy", seed=5))[7]["x"])
    assert not torch.equal(ds[7]["x"], build_dataset(cfg_for(kind="toy", seed=4), "test")[7]["x"])
    assert len(ds) == DataConfig().toy_epoch
