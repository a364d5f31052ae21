"""Security promises of the running package, in real subprocesses: no network access at run
time (every command, and every module imported, under a socket block) and no world-writable
output file or folder, whatever the umask.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_image_folder, set_args
from test_cli_errors import _run_driver, _train_cmd

NO_NETWORK = """
import os, socket, traceback

LOG = os.environ["NETWORK_LOG"]


def _blocked(what):
    with open(LOG, "a") as f:
        f.write(what + "\\n" + "".join(traceback.format_stack(limit=12)) + "---\\n")
    raise OSError(101, "network access blocked by the test: " + what)


_init = socket.socket.__init__


def _socket(self, family=-1, type=-1, proto=-1, fileno=None):
    if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
        _blocked("socket(family=%r)" % (family,))
    _init(self, family, type, proto, fileno)


socket.socket.__init__ = _socket
for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "create_connection"):
    setattr(socket, _name, lambda *a, _n=_name, **k: _blocked(_n + repr(a[:2])))
"""

# Every module of the package, so that none opens a connection when it is imported.
IMPORT_ALL = """
import importlib, pkgutil, translate
for _m in pkgutil.walk_packages(translate.__path__, "translate."):
    importlib.import_module(_m.name)
"""


def _pipeline(tiny_unpaired: Path, tmp_path: Path, onnx: bool) -> list[list[str]]:
    run, out = tmp_path / "run", tmp_path / "out"
    model = run / "export" / ("G_ab.onnx" if onnx else "G_ab.safetensors")
    return [_train_cmd(tiny_unpaired, run, "--sample-every", "1"),
            ["export", str(run)] + (["--onnx"] if onnx else []),
            ["apply", str(model), str(tiny_unpaired / "testA"), str(out), "--side-by-side"]]


def _latent_gan(tmp_path: Path) -> list[list[str]]:
    """Train a tiny DCGAN, then sample, and invert one of its training images."""
    images, run = random_image_folder(tmp_path / "images"), tmp_path / "gan"
    sets = ["model.ngf=4", "model.ndf=4", "model.image_size=32", "data.crop_size=32",
            "model.z_dim=8"]
    return [["train", "recipes/dcgan.toml", *set_args(sets),
             "--data", str(images), "--batch-size", "4", "--steps", "2", "--run-dir", str(run),
             "--no-progress"],
            ["sample", str(run), "--n", "4", "--out", str(tmp_path / "grid.png")],
            ["invert", str(run), str(images / "0.png"), "--out", str(tmp_path / "inv.png"),
             "--steps", "2", "--restarts", "1"]]


@pytest.fixture
def blocked(tmp_path) -> dict:
    """Environment for a subprocess whose sockets are blocked (and logged to NETWORK_LOG),
    without NO_ALBUMENTATIONS_UPDATE: the package must turn that update check off itself."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    log = tmp_path / "network.log"
    env = {"PYTHONPATH": str(site), "NETWORK_LOG": str(log), "NO_ALBUMENTATIONS_UPDATE": None}
    # Guard: the block is in place in a fresh interpreter, and silent when nothing connects.
    full = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
    fetch = "import urllib.request as u; u.urlopen('http://example.com', timeout=2)"
    probe = subprocess.run([sys.executable, "-c", fetch], env=full, capture_output=True,
                           text=True, check=False)
    assert probe.returncode != 0 and "blocked by the test" in probe.stderr and log.exists()
    log.unlink()
    subprocess.run([sys.executable, "-c", ""], env=full, check=True)
    assert not log.exists()
    return env


@pytest.mark.slow
def test_no_network_access_at_run_time(blocked, tiny_unpaired, tmp_path):
    run = tmp_path / "run"
    commands = _pipeline(tiny_unpaired, tmp_path, onnx=True) + [
        ["eval", str(run), "--fid-features", "small", "--json"],  # PSNR/SSIM + FID/KID, no weights
        ["plot", str(run), "--out", str(tmp_path / "plot.png")],
    ] + _latent_gan(tmp_path)
    _run_driver(tmp_path, commands, env=blocked, prelude=IMPORT_ALL)
    log = Path(blocked["NETWORK_LOG"])
    assert not log.exists(), log.read_text()
    assert len(list((tmp_path / "out").iterdir())) > 1
    for name in ("plot.png", "grid.png", "inv.png"):
        assert (tmp_path / name).is_file(), name


@pytest.mark.slow  # ~25 s: the demo's data build, training, ONNX export, apply and scores
def test_the_demo_runs_without_network(blocked, tmp_path):
    _run_driver(tmp_path, [["demo", "--root", str(tmp_path / "demo"), "--run-dir",
                            str(tmp_path / "run"), "--steps", "3", "--size", "16",
                            "--no-progress"]], env=blocked)
    log = Path(blocked["NETWORK_LOG"])
    assert not log.exists(), log.read_text()
    assert (tmp_path / "run" / "demo_scores.json").is_file()


@pytest.mark.parametrize("umask,onnx", [(0o000, True), (0o022, False), (0o077, False)],
                         ids=["umask000", "umask022", "umask077"])
@pytest.mark.slow
def test_no_output_is_world_writable_and_the_umask_is_respected(umask, onnx, tiny_unpaired,
                                                                tmp_path):
    _run_driver(tmp_path, _pipeline(tiny_unpaired, tmp_path, onnx=onnx), umask=umask)
    files = dirs = 0
    for top in (tmp_path / "run", tmp_path / "out"):
        for p in [top, *top.rglob("*")]:
            mode = p.stat().st_mode & 0o777
            if p.is_dir():
                dirs += 1
                assert mode == 0o777 & ~umask & ~0o002, (p, oct(mode))
            else:
                files += 1
                assert mode == 0o666 & ~umask & ~0o002, (p, oct(mode))
    assert files > 15 and dirs > 4
    assert (tmp_path / "run" / "export" / "G_ab.safetensors").is_file()
    assert (tmp_path / "run" / "export" / "G_ab.onnx").is_file() == onnx
    assert (tmp_path / "out" / "_pairs").is_dir()
