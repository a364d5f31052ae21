"""data.max_items: training on an evenly spaced subset of each training domain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CYCLEGAN, run_cli
from PIL import Image

from translate import recipe as recipe_mod
from translate.config import DataConfig, RunConfig
from translate.data import build_dataset
from translate.errors import ConfigError


def write_solids(folder: Path, values: list[int]) -> None:
    """One 8x8 PNG per value, filled with it, named so that sorted order is value order."""
    folder.mkdir(parents=True)
    for i, v in enumerate(values):
        Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(folder / f"{i:02d}.png")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    write_solids(root / "trainA", [10 * i for i in range(10)])     # 0, 10, ..., 90
    write_solids(root / "trainB", [100 + 10 * i for i in range(7)])  # 100, ..., 160
    write_solids(root / "testA", [200 + i for i in range(5)])
    write_solids(root / "testB", [220 + i for i in range(5)])
    return root


def cfg_for(root: Path, max_items: int, seed: int = 0) -> RunConfig:
    return RunConfig(seed=seed, data=DataConfig(root=str(root), preprocess="none", flip=False,
                                                max_items=max_items))


def values_seen(ds, domain: str, n: int) -> set[int]:
    return {round((ds[k][domain].mean().item() + 1) * 127.5) for k in range(n)}


def test_training_sees_only_the_kept_images(root: Path) -> None:
    ds = build_dataset(cfg_for(root, 3))
    assert len(ds) == 3
    # 10 A images keep positions 0, 3, 6; 7 B images keep 0, 2, 4 (i * n // 3).
    assert values_seen(ds, "a", 60) == {0, 30, 60}
    assert values_seen(ds, "b", 60) == {100, 120, 140}


def test_subset_is_the_same_in_every_build_and_seed(root: Path) -> None:
    picks = [build_dataset(cfg_for(root, 4, seed)).a.images.paths for seed in (0, 0, 7)]
    assert picks[0] == picks[1] == picks[2]
    assert [p.name for p in picks[0]] == ["00.png", "02.png", "05.png", "07.png"]


def test_zero_or_more_than_available_keeps_everything(root: Path) -> None:
    for max_items in (0, 10, 1000):
        ds = build_dataset(cfg_for(root, max_items))
        assert (len(ds.a), len(ds.b)) == (10, 7)


def test_test_split_is_never_cut(root: Path) -> None:
    ds = build_dataset(cfg_for(root, 2), split="test")
    assert (len(ds.a), len(ds.b)) == (5, 5)


@pytest.mark.parametrize(("override", "message"), [
    ("data.max_items=-1", "data.max_items: must be >= 0, got -1"),
    ('data.max_items="ten"', "data.max_items: expected an integer, got 'ten'"),
    ("data.max_items=2.5", "data.max_items: expected an integer, got 2.5"),
])
def test_bad_values_are_one_line_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        recipe_mod.load(None, [override])
    assert str(e.value) == message


def test_toy_data_refuses_a_subset() -> None:
    with pytest.raises(ConfigError, match=r"^data.max_items: the toy data"):
        recipe_mod.load(None, ['data.kind="toy"', "data.max_items=5"])


@pytest.mark.slow
def test_cli_trains_on_the_subset_and_rejects_bad_values(tiny_unpaired: Path,
                                                         tmp_path: Path) -> None:
    recipe = "recipes/cyclegan_demo.toml"
    base = ["--set", f'data.root="{tiny_unpaired}"', "--set", f'run_dir="{tmp_path / "run"}"',
            "--set", "train.steps=2", "--no-progress"]
    for item in TINY_CYCLEGAN:
        base += ["--set", item]
    proc = run_cli("train", recipe, *base, "--set", "data.max_items=3")
    assert f"unpaired {tiny_unpaired} (train): 3 A + 3 B images" in proc.stdout + proc.stderr
    saved = recipe_mod.load_json(tmp_path / "run" / "config.json")
    assert saved.data.max_items == 3

    bad = run_cli("train", recipe, *base, "--set", "data.max_items=-3", check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["error: data.max_items: must be >= 0, got -3"]
