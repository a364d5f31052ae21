"""Shared fixtures: tiny data made on the fly, and a helper to run the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from no_empty_run import pytest_sessionfinish  # noqa: F401  (the hook: a run must pass a test)

ROOT = Path(__file__).resolve().parent.parent

# Two cores are shared by the test process and its subprocesses.
torch.set_num_threads(1)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, check: bool = True,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python cli.py ARGS` in a real subprocess; returns the completed process."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=timeout, env=full_env,
                          check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"translate {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def cli_main(argv: list[str]) -> int:
    """`translate ARGV` in this process (translate.cli.main): its exit code."""
    from translate import cli

    return cli.main(argv)


def cli_error(capsys, argv: list[str]) -> str:
    """The one-line error of `translate ARGV`, which must exit with code 2."""
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def random_image_folder(path: Path, n: int = 8, size: int = 32) -> Path:
    """`n` PNGs of uniform RGB noise (seeded: the same files every time) in a new folder."""
    import torch
    from PIL import Image

    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(path / f"{i}.png")
    return path


# What "auto" resolves to follows the CPU (bf16 where it is native); TRANSLATE_NATIVE_BF16 makes
# it resolve as on the other kind. Tests of "auto" itself take this fixture and run once as
# each kind, so one test command exercises both on any machine (subprocesses inherit it).
CPU_KINDS = {"native-bf16": "1", "no-native-bf16": "0"}


@pytest.fixture(params=list(CPU_KINDS))
def cpu_kind(request, monkeypatch) -> str:
    """Run the test as on a CPU with, then without, native bf16; returns "bf16" or "no", what
    "auto" then resolves to for training."""
    monkeypatch.setenv("TRANSLATE_NATIVE_BF16", CPU_KINDS[request.param])
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    return "bf16" if CPU_KINDS[request.param] == "1" else "no"


@pytest.fixture(scope="session")
def tiny_unpaired(tmp_path_factory) -> Path:
    """A tiny unpaired dataset in the CycleGAN layout (demo data at 16x16)."""
    from translate.data.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("data") / "demo16", size=16, n_train=12, n_test=4)


# --set overrides that make any CycleGAN recipe tiny (a few seconds for a few steps).
TINY_CYCLEGAN = [
    'model.generator="resnet"', "model.ngf=4", "model.ndf=4", "model.n_blocks=1", "model.n_layers_d=1",
    'data.preprocess="crop"', "data.load_size=16", "data.crop_size=16", "train.batch_size=2",
    "model.pool_size=4",
    # The tiny ResNet needs its norm layers: without them its 0.02-std initial weights shrink
    # the signal to nothing over its layers (the demo recipe itself has none: its U-Net's affine
    # output carries the input).
    'model.norm="instance"',
]


# The same for CUT recipes: a ResNet whose 4 feature points all have >= 16 positions at 16 px.
TINY_CUT = [
    'model.generator="resnet"', "model.ngf=4", "model.ndf=4", "model.n_blocks=1", "model.n_layers_d=1",
    "model.nce_layers=[0, 1, 2, 3]", "model.num_patches=16", "model.head_width=8",
    'data.preprocess="crop"', "data.load_size=16", "data.crop_size=16", "train.batch_size=2",
    'model.norm="instance"',  # as TINY_CYCLEGAN: the tiny ResNet needs its norm layers
]

# Every tiny model the tests train, by name: (recipe, --set overrides). The one place these
# sizes are written; tests take them through tiny_sets / tiny_config / tiny_cli.
TINY = {
    "cyclegan": ("cyclegan_demo.toml", TINY_CYCLEGAN),
    "cut": ("cut_demo.toml", TINY_CUT),
    "toy": ("toy_gan_ring.toml", ["model.hidden=16", "train.batch_size=8"]),
    "dcgan": ("dcgan.toml", ["model.ngf=4", "model.ndf=4", "model.image_size=32",
                             "data.crop_size=32", "model.z_dim=8", "train.batch_size=4"]),
}


def tiny_sets(method: str) -> list[str]:
    """The --set overrides (KEY=VALUE) that make `method`'s recipe tiny."""
    return list(TINY[method][1])


def set_args(sets: list[str]) -> list[str]:
    """KEY=VALUE overrides as command-line arguments: --set KEY=VALUE ..."""
    return [a for s in sets for a in ("--set", s)]


def tiny_cli(method: str) -> list[str]:
    """tiny_sets(method) as command-line arguments."""
    return set_args(TINY[method][1])


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f'"{value}"' if isinstance(value, (str, Path)) else str(value)


def tiny_config(method: str, *sets: str, **overrides: object):
    """`method`'s recipe made tiny, then `sets` ("train.steps=2") and `overrides` (keyword
    form: run_dir=PATH, train__steps=2 for train.steps=2), as `translate train --set` would."""
    from translate import recipe as recipe_mod

    recipe, tiny = TINY[method]
    extra = [f"{k.replace('__', '.')}={_toml(v)}" for k, v in overrides.items()]
    return recipe_mod.load(ROOT / "recipes" / recipe, [*tiny, *sets, *extra])


@pytest.fixture(scope="session")
def generator(tmp_path_factory, tiny_unpaired) -> Path:
    """G_ab of a 1-step tiny CycleGAN run on tiny_unpaired, exported as safetensors (read-only:
    tests that damage a model copy it first)."""
    from translate.export import export_run
    from translate.runner import train

    run = tmp_path_factory.mktemp("gen") / "run"
    cfg = tiny_config("cyclegan", data__root=tiny_unpaired, run_dir=run, train__steps=1)
    train(cfg, progress=False)
    export_run(run)
    return run / "export" / "G_ab.safetensors"
