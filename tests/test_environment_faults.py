"""What a run does when its environment fails, each fault real: a read-only or unwritable
checkpoint folder, image files whose permission bits forbid reading them, `--strict`,
`data.max_pixels` in training, `--debug`, the temp files a killed `apply` leaves, and the
NaN-weights message. Real files and real subprocesses throughout.

File modes do not bind root. Where the tests run as root, the "unprivileged" subprocesses
drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (the capabilities that let root ignore file
modes) before exec, so the kernel makes the same permission check as for any other user.
Switching to uid 65534 instead would need the interpreter to be reachable by that user, and
here it lives under /root (mode 0700). As a normal user, chmod is enough.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, set_args, tiny_cli, tiny_sets
from PIL import Image

from translate import config
from translate import data as data_mod
from translate import recipe as recipe_mod
from translate.core import checkpoint, faults
from translate.errors import ImageError, UserError
from translate.images import TRAIN_LIMIT
from translate.runner import train

TOY_RECIPE = "recipes/toy_gan_ring.toml"
TOY = tiny_sets("toy")
RECIPE = "recipes/cyclegan_demo.toml"
TINY_SETS = tiny_cli("cyclegan")
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2


# ---------------------------------------------------------------------------- helpers


def _cli(*args: str, preexec: Callable[[], None] | None = None,
         env: dict | None = None) -> subprocess.CompletedProcess:
    """`translate ARGS` in a real subprocess, optionally unprivileged (see the module doc)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1",
                **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=300, check=False,
                          preexec_fn=preexec)


def _last_line(err: str) -> str:
    """The error line that ends a run (a training run prints progress lines before it)."""
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _noise(path: Path, size: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def _drop_file_overrides() -> None:
    """preexec_fn: take away the capabilities that let root read and write regardless of modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture(scope="module")
def unprivileged(tmp_path_factory) -> Callable[[], None] | None:
    """The preexec_fn for a subprocess that file permissions apply to (None: they already do).
    Guard: such a process really cannot read a mode-000 file."""
    preexec = _drop_file_overrides if os.geteuid() == 0 else None
    secret = tmp_path_factory.mktemp("probe") / "secret"
    secret.write_text("x")
    secret.chmod(0)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(secret)!r}).read()"],
                               preexec_fn=preexec, capture_output=True, text=True, check=False)
    except subprocess.SubprocessError as e:  # the capability could not be dropped
        pytest.skip(f"cannot start a process that file permissions apply to: {e}")
    if "PermissionError" not in probe.stderr:
        pytest.skip("cannot start a process that file permissions apply to here")
    return preexec


def _train_cmd(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", RECIPE, *TINY_SETS, "--data", str(data), "--run-dir", str(run),
            "--steps", "2", "--no-progress", "--eval-every", "0", *extra]


# ---------------------------------------------------------------------------- unwritable run


READ_ONLY_SITE = '''
import builtins, errno, io, os

_RO = os.path.realpath(os.environ["READ_ONLY_DIR"])
_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _inside(path):
    if isinstance(path, int):
        return False
    p = os.path.realpath(os.fsdecode(path))
    return p == _RO or p.startswith(_RO + os.sep)


def _refuse(path):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))


def _guard(real, writes=lambda *a, **k: True):
    def guarded(path, *args, **kwargs):
        if _inside(path) and writes(*args, **kwargs):
            if real.__name__ == "mkdir" and os.path.lexists(path):  # as the kernel answers
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            _refuse(path)
        return real(path, *args, **kwargs)
    return guarded


def _two(real):
    def guarded(src, dst, *args, **kwargs):
        for p in (src, dst):
            if _inside(p):
                _refuse(p)
        return real(src, dst, *args, **kwargs)
    return guarded


os.open = _guard(os.open, lambda flags, *a, **k: bool(flags & _WRITES))
builtins.open = io.open = _guard(io.open, lambda mode="r", *a, **k: any(c in mode for c in "wax+"))
for _name in ("mkdir", "rmdir", "unlink", "remove"):
    setattr(os, _name, _guard(getattr(os, _name)))
os.replace, os.rename = _two(os.replace), _two(os.rename)
'''


@contextlib.contextmanager
def _read_only_mount(folder: Path, tmp_path: Path) -> Iterator[dict]:
    """A real read-only file system over `folder`: a read-only bind mount (root only)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) for a real read-only mount")
    if subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True,
                      check=False).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True,
                          check=False).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield {}
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@contextlib.contextmanager
def _read_only_patched(folder: Path, tmp_path: Path) -> Iterator[dict]:
    """The same fault where mounting is not allowed: the subprocess's file calls answer EROFS
    for anything that would change `folder` (its sitecustomize patches them)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(READ_ONLY_SITE)
    yield {"PYTHONPATH": str(site), "READ_ONLY_DIR": str(folder)}


@contextlib.contextmanager
def _no_write_permission(folder: Path, tmp_path: Path) -> Iterator[dict]:
    mode = stat.S_IMODE(folder.stat().st_mode)
    folder.chmod(0o555)
    try:
        yield {}
    finally:
        folder.chmod(mode)


READ_ONLY_FIX = ("the file system is read-only: remount it read-write, or copy the run folder "
                 "to a writable disk and pass that as --run-dir")
PERMISSION_FIX = "make that folder writable for this user (chmod/chown)"
FAULTS = {"read-only mount": (_read_only_mount, "Read-only file system", READ_ONLY_FIX),
          "read-only patched": (_read_only_patched, "Read-only file system", READ_ONLY_FIX),
          "permission denied": (_no_write_permission, "Permission denied", PERMISSION_FIX)}


def _toy_cfg(run: Path, steps: int) -> config.RunConfig:
    return recipe_mod.load(ROOT / TOY_RECIPE, TOY + [
        f"train.steps={steps}", "train.epochs=0", "train.epochs_decay=0", f'run_dir="{run}"',
        "train.save_every=2", "train.sample_every=1000000"])


def _toy_args(run: Path, steps: int, *extra: str) -> list[str]:
    sets = set_args(TOY)
    return ["train", TOY_RECIPE, *sets, "--steps", str(steps), "--run-dir", str(run),
            "--save-every", "2", "--sample-every", "1000000", "--no-progress", *extra]


@pytest.mark.parametrize("fault,scope", [
    ("read-only mount", "checkpoints"), ("read-only mount", "run"),
    ("read-only patched", "checkpoints"),
    ("permission denied", "checkpoints"), ("permission denied", "run")])
def test_unwritable_run_folder_keeps_the_checkpoint_and_says_what_to_do(fault, scope, tmp_path,
                                                                         request):
    run = tmp_path / "run"
    train(_toy_cfg(run, 2), progress=False)
    folder = run / "checkpoints" if scope == "checkpoints" else run
    before = _digest(folder)
    make, strerror, fix = FAULTS[fault]
    preexec = request.getfixturevalue("unprivileged") if fault == "permission denied" else None
    with make(folder, tmp_path) as env:
        proc = _cli(*_toy_args(run, 4, "--resume", "auto"), preexec=preexec, env=env)
    assert proc.returncode == 2, proc.stderr
    line = _last_line(proc.stderr)
    if scope == "checkpoints":  # training went on until the save at step 4
        assert line == (f"error: {folder}: could not write checkpoint step 4 ({strerror}); the "
                        f"previous checkpoint step_0000002 is intact; {fix}, then resume with "
                        "--resume auto"), line
    else:  # nothing of the run can be written: refused before the first step
        assert line == (f"error: {run}: cannot write the run's config.json ({strerror}); {fix}, "
                        "then run again"), line
    assert _digest(folder) == before  # not a byte of the old run changed
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000002"]
    # Writable again: the kept checkpoint resumes.
    assert train(_toy_cfg(run, 4), resume="auto", progress=False).step == 4
    assert checkpoint.list_checkpoints(run)[-1] == checkpoint.step_dir(run, 4)


# ---------------------------------------------------------------------------- unreadable images


def test_training_skips_an_unreadable_file_with_a_warning_and_a_count(unprivileged,
                                                                      tiny_unpaired, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_unpaired, data)
    bad = data / "trainA" / "0003.png"
    bad.chmod(0)
    run = tmp_path / "run"
    proc = _cli(*_train_cmd(data, run), preexec=unprivileged)
    assert proc.returncode == 0, proc.stderr
    n = len(list((data / "trainA").iterdir()))
    assert (f"warning: {data / 'trainA'}: skipping 1 unreadable of {n} images (first: {bad}: "
            "permission denied — make the file readable (chmod +r) or remove it)"
            ) in proc.stderr.splitlines(), proc.stderr
    summary = next(x for x in proc.stderr.splitlines() if x.startswith("cyclegan '"))
    assert "1 unreadable" in summary
    assert (run / "checkpoints" / "step_0000002" / "state.json").is_file()


def test_apply_reports_an_unreadable_file_by_name_and_goes_on(unprivileged, generator, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate("abcd"):
        _noise(src / f"{name}.png", 8, seed=i)
    bad = src / "b.png"
    bad.chmod(0)
    out = tmp_path / "out"
    proc = _cli("apply", str(generator), str(src), str(out), "--no-progress", preexec=unprivileged)
    assert proc.returncode == 1
    assert _one_line(proc.stderr) == (f"failed: {bad}: permission denied — make the file readable "
                                      "(chmod +r) and run again")
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png", "d.png"]


# ---------------------------------------------------------------------------- --strict, max_pixels


@pytest.mark.slow
def test_strict_flag_stops_at_a_truncated_image_that_is_skipped_without_it(tiny_unpaired,
                                                                            tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_unpaired / "trainB", data / "trainB")
    (data / "trainA").mkdir()
    for name in ("0000.png", "0001.png"):
        shutil.copy(tiny_unpaired / "trainA" / name, data / "trainA" / name)
    cut = _noise(data / "trainA" / "cut.png", 64)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # the header still reads
    # 2 steps of batch 2 draw all 3 images of trainA at least once.
    lenient = _cli(*_train_cmd(data, tmp_path / "lenient"))
    assert lenient.returncode == 0, lenient.stderr
    warned = [x for x in lenient.stderr.splitlines() if x.startswith(f"warning: {cut}: ")]
    assert len(warned) == 1 and "corrupt or truncated image data" in warned[0], lenient.stderr
    assert warned[0].endswith("(using the next image instead; --strict / data.strict=true "
                              "stops here)")
    assert checkpoint.list_checkpoints(tmp_path / "lenient")
    strict = _cli(*_train_cmd(data, tmp_path / "strict", "--strict"))
    assert strict.returncode == 2
    assert _last_line(strict.stderr).startswith(f"error: {cut}: corrupt or truncated image data")
    assert not checkpoint.list_checkpoints(tmp_path / "strict")


@pytest.mark.slow
def test_data_max_pixels_skips_or_refuses_a_larger_training_image(tiny_unpaired, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_unpaired, data)
    big = _noise(data / "trainA" / "big.png", 40)  # 1600 pixels; the others have 256
    n = len(list((data / "trainA").iterdir()))
    limit = ["--set", "data.max_pixels=1000"]
    reason = (f"{big}: 40x40 pixels is more than data.max_pixels=1000 — shrink the image or "
              "raise the limit with --set data.max_pixels=1600")
    proc = _cli(*_train_cmd(data, tmp_path / "run", *limit))
    assert proc.returncode == 0, proc.stderr
    assert (f"warning: {data / 'trainA'}: skipping 1 unreadable of {n} images (first: "
            f"{reason})") in proc.stderr.splitlines(), proc.stderr
    strict = _cli(*_train_cmd(data, tmp_path / "strict", *limit, "--strict"))
    assert strict.returncode == 2
    assert _one_line(strict.stderr) == (f"error: {reason} (--strict / data.strict=true stops on "
                                        "unreadable images)")
    assert not (tmp_path / "strict").exists()


def test_an_image_grown_after_the_scan_names_the_training_setting(tiny_unpaired, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_unpaired, data)
    cfg = recipe_mod.load(ROOT / RECIPE, TINY_CYCLEGAN + [
        f'data.root="{data}"', "data.max_pixels=1000", "data.strict=true"])
    dataset = data_mod.build_dataset(cfg)
    for p in (data / "trainA").iterdir():  # every file grows past the limit after the scan
        _noise(p, 40)
    with pytest.raises(ImageError) as err:
        dataset[0]
    assert TRAIN_LIMIT.format(1600) in str(err.value) and "--max-pixels" not in str(err.value)


# ---------------------------------------------------------------------------- --debug


def test_debug_shows_the_traceback_and_the_default_does_not(tmp_path):
    args = ["train", TOY_RECIPE, "--set", "train.stepz=3", "--run-dir", str(tmp_path / "run")]
    plain = _cli(*args)
    assert plain.returncode == 2
    assert _one_line(plain.stderr).startswith("error: ") and "train.stepz" in plain.stderr
    debug = _cli(*args, "--debug")  # accepted after the command too
    assert debug.returncode != 0
    assert debug.stderr.startswith("Traceback (most recent call last):"), debug.stderr
    assert "ConfigError: train.stepz: unknown key" in debug.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- stale temp files


def test_apply_rerun_removes_the_temp_files_of_a_killed_run_and_nothing_else(generator,
                                                                              tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i, name in enumerate("abc"):
        _noise(src / f"{name}.png", 8, seed=i)
    out = tmp_path / "out"
    (out / "_pairs").mkdir(parents=True)
    stale = [out / ".a.png.0123abcd.tmp", out / "_pairs" / ".b.png.89abcdef.tmp"]
    kept = [out / ".notes.tmp", out / ".a.png.0123ABCD.tmp", out / ".a.png.0123abcd.tmp.bak",
            out / "a.png.0123abcd.tmp", out / ".a.txt.0123abcd.tmp", out / ".keep",
            out / ".a.png.0123abc.tmp"]
    for p in stale + kept:
        p.write_bytes(b"half an image")
    proc = _cli("apply", str(generator), str(src), str(out), "--side-by-side", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in stale if p.exists()]
    assert all(p.read_bytes() == b"half an image" for p in kept)
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png", "c.png"]


# ---------------------------------------------------------------------------- NaN in weights


def test_nan_weights_message_names_the_phase_and_step():
    finite, broken = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.no_grad():
        broken.weight[0, 0] = float("nan")
    phase_of = {"G": "G", "D": "D"}
    faults.check_weights({"G": finite, "D": finite}, {"G": finite}, phase_of, 7)  # all finite
    with pytest.raises(UserError, match=r"^step 7, phase D: weights of D contain NaN/Inf; not "):
        faults.check_weights({"G": finite, "D": broken}, {}, phase_of, 7)
    with pytest.raises(UserError, match=r"^step 9, phase G: weights of EMA of G contain NaN"):
        faults.check_weights({"G": finite, "D": finite}, {"G": broken}, phase_of, 9)
