"""Bad input and odd paths, fed for real through the CLI: every broken or unusual image kind,
recipes and flags that must be refused before any file is written, foreign model files,
unusual and very long file names. (No network and file modes: test_security.py;
the faults that need a setup of their own: test_environment_faults.py.)

`cli.main` is called in-process where only its messages and exit code matter; real
subprocesses are used where the process itself is what is tested (the full apply/train runs
over bad folders, non-UTF-8 output).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, run_cli, tiny_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from translate import cli
from translate.infer import ModelInfo, translate_folder

TINY_SETS = tiny_cli("cyclegan")
RECIPE = "recipes/cyclegan_demo.toml"
NAME_MAX = os.pathconf("/", "PC_NAME_MAX")  # bytes in one path component
PATH_MAX = os.pathconf("/", "PC_PATH_MAX")  # bytes in a whole path


# ---------------------------------------------------------------------------- fixtures


def _noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG claiming a huge size with no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


LONG_NAME = "n" * (NAME_MAX - len(".png")) + ".png"  # exactly NAME_MAX bytes
ODD_NAMES = ["sp ace.png", "ünï 日本.png", "quo'te\".png", os.fsdecode(b"\xff\xfe.png"), LONG_NAME]
GOOD = {  # name: (width, height) of images that must translate
    "deep16.png": (10, 12), "cmyk.jpg": (9, 7), "palette_trns.png": (8, 6), "dot.png": (1, 1),
    "strip.png": (4000, 3), **{n: (5, 4) for n in ODD_NAMES}}
BAD = {  # name: what the one-line reason must say
    "zero.png": "empty file (0 bytes)", "truncated.png": "corrupt or truncated",
    "text.png": "not an image file", "bomb.png": "20000x10000 = 200,000,000 pixels"}


def _every_kind_of_image(folder: Path) -> Path:
    """Good images of every odd kind, broken ones of every kind, a symlink loop."""
    folder.mkdir(parents=True)
    Image.fromarray(_noise(12, 10, c=1).astype(np.uint16) * 257).save(folder / "deep16.png")
    Image.fromarray(_noise(7, 9)).convert("CMYK").save(folder / "cmyk.jpg")
    pal = Image.fromarray(_noise(6, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    pal.save(folder / "palette_trns.png", transparency=0)
    Image.fromarray(_noise(1, 1)).save(folder / "dot.png")
    Image.fromarray(_noise(3, 4000)).save(folder / "strip.png")
    for name in ODD_NAMES:
        Image.fromarray(_noise(4, 5)).save(os.path.join(folder, name), format="PNG")
    (folder / "zero.png").write_bytes(b"")
    Image.fromarray(_noise(64, 64)).save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("hello, I am not a picture\n")
    _png_header_only(folder / "bomb.png", 20000, 10000)
    (folder / "loop").symlink_to(folder)  # walking it must not loop
    return folder


def _main(capsys, *argv: str) -> tuple[int, str]:
    """`translate ARGV` in this process; returns (exit code, stderr)."""
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------- images


def test_apply_over_every_kind_of_image_and_name(generator, tmp_path):
    src = _every_kind_of_image(tmp_path / "in")
    out = tmp_path / "out"
    proc = run_cli("apply", str(generator), str(src), str(out), "--no-progress", check=False)
    assert proc.returncode == 1, proc.stderr  # some failed, the rest went on
    assert "Traceback" not in proc.stderr
    failed = proc.stderr.strip().splitlines()
    assert len(failed) == len(BAD), proc.stderr
    for name, words in BAD.items():
        line = next(x for x in failed if x.startswith(f"failed: {src / name}: "))
        assert words in line and " — " in line, line  # what is wrong — how to fix it
    for name, size in GOOD.items():
        with Image.open(os.path.join(out, name)) as im:
            assert im.size == size, name
    written = {os.fsencode(p.name) for p in out.iterdir()}
    assert b"\xff\xfe.png" in written  # the exact bytes of the name, not a mangled copy
    assert not (out / "loop").exists() and not (out / "zero.png").exists()
    bomb = run_cli("apply", str(generator), str(src / "strip.png"), str(tmp_path / "o2"),
                   "--max-pixels", "11999", check=False)
    assert bomb.returncode == 1 and "--max-pixels 12000" in bomb.stderr


def test_apply_when_files_vanish_mid_run(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(_noise(8, 8, seed=i)).save(src / f"{i}.png")
    rgb = ModelInfo(in_channels=3, out_channels=3, size_multiple=4)

    def deletes_the_last(x):
        (src / "5.png").unlink(missing_ok=True)
        return -x
    report = translate_folder(deletes_the_last, rgb, src, tmp_path / "out", batch_size=1,
                              workers=1, progress=False)
    assert report.translated == 5
    [(path, reason)] = report.failed
    assert path == src / "5.png" and "file not found (moved or deleted?)" in reason


def _train_cmd(data: Path, run: Path, *extra: str) -> list[str]:
    return ["train", RECIPE, *TINY_SETS, "--data", str(data), "--run-dir", str(run),
            "--steps", "2", "--no-progress", "--eval-every", "0", *extra]  # no testA here


def _dataset_with_bad_images(root: Path, tiny_unpaired: Path) -> Path:
    shutil.copytree(tiny_unpaired / "trainB", root / "trainB")
    _every_kind_of_image(root / "trainA")
    return root


def test_training_skips_bad_images_with_a_count(tiny_unpaired, tmp_path):
    data = _dataset_with_bad_images(tmp_path / "data", tiny_unpaired)
    run = tmp_path / "run"
    # Some good images are smaller than the 16 px crop (9x7): resize them first, as "crop"
    # refuses images smaller than the crop.
    proc = run_cli(*_train_cmd(data, run, "--set", 'data.preprocess="resize_and_crop"',
                               "--set", "data.load_size=16"), check=False)
    assert proc.returncode == 0, proc.stderr
    warned = [x for x in proc.stderr.splitlines() if x.startswith("warning: ")]
    scan = f"warning: {data / 'trainA'}: skipping 3 unreadable of {len(GOOD) + len(BAD)} images"
    assert any(x.startswith(scan) for x in warned), proc.stderr
    assert "Traceback" not in proc.stderr and "warnings.warn" not in proc.stderr
    assert "3 unreadable" in proc.stderr  # the run's summary line counts them too
    assert (run / "checkpoints" / "step_0000002" / "state.json").is_file()


def test_strict_data_fails_fast_before_the_run_folder_exists(tiny_unpaired, tmp_path):
    data = _dataset_with_bad_images(tmp_path / "data", tiny_unpaired)
    run = tmp_path / "run"
    proc = run_cli(*_train_cmd(data, run, "--set", "data.strict=true"), check=False)
    assert proc.returncode == 2
    line = _one_line(proc.stderr)
    assert line.startswith(f"error: {data / 'trainA'}/") and "data.strict=true" in line
    assert not run.exists()


# ---------------------------------------------------------------------------- recipes, flags


def _no_images(root: Path, tiny: Path) -> Path:
    shutil.copytree(tiny / "trainA", root / "trainA")
    (root / "trainB").mkdir()
    (root / "trainB" / "readme.txt").write_text("x")
    return root


def _unreadable(root: Path, tiny: Path) -> Path:
    shutil.copytree(tiny / "trainA", root / "trainA")
    (root / "trainB").mkdir()
    for i in range(3):
        (root / "trainB" / f"{i}.jpg").write_bytes(b"\xff\xd8 not really")
    return root


@pytest.mark.parametrize("extra,needle", [
    (["--set", "train.stepz=3"], "train.stepz: unknown key"),
    (["--set", "data.flip=1"], "data.flip: expected true or false"),
    (["--set", "train.batch_size=-2"], "train.batch_size: must be > 0"),
    (["--set", "data.crop_size=0"], "data.crop_size: must be > 0"),
    (["--set", 'data.preprocess="resize_and_crop"', "--set", "data.crop_size=32"],
     "data.crop_size: 32 is larger than data.load_size 16"),
    (["--set", "data.load_size=18", "--set", "data.crop_size=18"], "data.crop_size: 18"),
    (["--mixed-precision", "fp16"], "fp16 is not available on CPU"),
    (["--data", "MISSING"], "MISSING: dataset folder not found"),
    (["--data", "NO_IMAGES"], "trainB: no images found"),
    (["--data", "UNREADABLE"], "trainB: none of the 3 images can be read"),
], ids=["unknown", "type", "negative", "zero", "crop>load", "stride", "fp16", "missing",
        "empty", "unreadable"])
def test_bad_recipes_and_data_are_refused_before_any_file_is_written(extra, needle, tiny_unpaired,
                                                                      tmp_path, capsys):
    made = {"MISSING": lambda: tmp_path / "missing",
            "NO_IMAGES": lambda: _no_images(tmp_path / "empty", tiny_unpaired),
            "UNREADABLE": lambda: _unreadable(tmp_path / "bad", tiny_unpaired)}
    extra = [str(made[x]()) if x in made else x for x in extra]
    needle = needle.replace("MISSING", str(tmp_path / "missing"))
    run = tmp_path / "run"
    data = [] if "--data" in extra else ["--data", str(tiny_unpaired)]
    code, err = _main(capsys, "train", RECIPE, *TINY_SETS, *data, "--run-dir", str(run),
                      "--steps", "2", *extra)
    assert code == 2
    assert needle in _one_line(err) and _one_line(err).startswith("error: ")
    assert not run.exists()  # not even config.json


# ---------------------------------------------------------------------------- models


def _wrong_architecture(generator: Path, path: Path) -> None:
    with safe_open(str(generator), framework="pt") as f:
        meta = f.metadata()
    save_file({"weight": torch.zeros(3)}, str(path), meta)


def _truncated(generator: Path, path: Path) -> None:
    data = generator.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flat_onnx(generator: Path, path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                [inp], [out]))
    for k, v in {"size_multiple": "4", "in_channels": "3", "out_channels": "3"}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save_model(model, str(path))


@pytest.mark.parametrize("name,make,needle", [
    ("other.safetensors", _wrong_architecture, "weights do not fit the resnet architecture"),
    ("cut.safetensors", _truncated, "not a readable safetensors file"),
    ("flat.onnx", _flat_onnx, "not an image generator"),
    ("junk.onnx", lambda g, p: p.write_bytes(b"\x00garbage" * 10), "not a readable ONNX file"),
    ("absent.safetensors", lambda g, p: None, "model file not found"),
])
def test_foreign_model_files_are_refused_in_one_line(name, make, needle, generator, tmp_path,
                                                     capsys):
    model = tmp_path / name
    make(generator, model)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(8, 8)).save(src / "a.png")
    code, err = _main(capsys, "apply", str(model), str(src), str(tmp_path / "out"))
    assert code == 2
    line = _one_line(err)
    assert line.startswith(f"error: {model}: ") and needle in line, line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- paths


def test_apply_output_equal_to_or_inside_the_input(generator, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(8, 8)).save(src / "a.png")
    for out in (src, src / "sub"):
        code, err = _main(capsys, "apply", str(generator), str(src), str(out))
        assert code == 2 and "choose an OUTPUT folder outside it" in _one_line(err)
    assert sorted(p.name for p in src.iterdir()) == ["a.png"]


@pytest.mark.slow
def test_unusual_characters_in_data_run_and_output_folders(tiny_unpaired, tmp_path):
    odd = "sp ace ü 日本 'q\" "
    data = tmp_path / os.fsdecode(odd.encode() + b"data \xff")  # not UTF-8: fine for data
    shutil.copytree(tiny_unpaired, data)
    run, out = tmp_path / f"{odd}run", tmp_path / f"{odd}out"
    # A real process: its stderr escapes what is not UTF-8 instead of failing on it.
    _run_driver(tmp_path, [_train_cmd(data, run), ["export", str(run)],
                           ["apply", str(run / "export" / "G_ab.safetensors"),
                            str(data / "testA"), str(out), "--no-progress"]])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in
                                                           (data / "testA").iterdir())
    # A run folder whose name is not UTF-8 could never be resumed or exported (safetensors
    # opens UTF-8 paths only): refused up front, nothing written.
    bad_run = tmp_path / os.fsdecode(b"run \xff")
    proc = run_cli(*_train_cmd(data, bad_run), check=False)
    assert proc.returncode == 2 and "has bytes that are not UTF-8" in _one_line(proc.stderr)
    assert not bad_run.exists()


def _deep(base: Path, length: int) -> Path:
    """A folder path of about `length` characters, in components of 200."""
    p = base
    while len(str(p)) < length - 201:
        p = p / ("d" * 200)
    return p / ("e" * (length - len(str(p)) - 1))


def test_paths_near_path_max(generator, tiny_unpaired, tmp_path, capsys):
    src = _deep(tmp_path / "in", PATH_MAX - 40)
    src.mkdir(parents=True)
    Image.fromarray(_noise(6, 6)).save(src / "a.png")
    out = tmp_path / "o"
    code, err = _main(capsys, "apply", str(generator), str(tmp_path / "in"), str(out),
                      "--no-progress")
    assert code == 0, err  # the longest path that fits works
    deeper = tmp_path / ("x" * 100)
    code, err = _main(capsys, "apply", str(generator), str(tmp_path / "in"), str(deeper),
                      "--no-progress")
    assert code == 1  # the output would pass PATH_MAX: that file fails, in one line
    line = _one_line(err)
    assert line.startswith(f"failed: {src / 'a.png'}: ") and "File name too long" in line
    run = _deep(tmp_path / "run", PATH_MAX - 30)  # fits, its checkpoint files do not
    code, err = _main(capsys, *_train_cmd(tiny_unpaired, run))
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert "could not write checkpoint step 2 (File name too long)" in line
    assert "Traceback" not in err


# ---------------------------------------------------------------------------- driver

DRIVER = """
import json, os, sys
sys.path.insert(0, {root!r})
os.umask(int(sys.argv[2], 8))
{prelude}
from translate import cli
for argv in json.loads(sys.argv[1]):
    code = cli.main(argv)
    if code != 0:
        sys.exit(code)
"""


def _run_driver(tmp_path: Path, commands: list[list[str]], umask: int = 0o022,
                env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """Run translate commands one after the other in one fresh interpreter (one start-up),
    after the Python code `prelude`."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT), prelude=prelude))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.run([sys.executable, str(driver), json.dumps(commands), oct(umask)],
                          cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc
