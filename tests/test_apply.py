"""translate.infer on real folders: odd sizes, odd files, padding, tiling, batching, resuming."""

import io
import os
import re
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from torch import nn

from translate.errors import ModelError, UserError
from translate.images import load_image_rgba, to_tensor, to_uint8
from translate.infer import ApplyWarning, ModelInfo, translate_folder, translate_tensor
from translate.infer.lanes import LanePool
from translate.infer.load import TorchForward
from translate.infer.tiling import _mirror_pad

RGB = ModelInfo(in_channels=3, out_channels=3, size_multiple=4)


def _net(c_in: int = 3, c_out: int = 3) -> nn.Module:
    """Two 3x3 convs: receptive radius 2, far below overlap / 4 = 8."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, c_out, 3, padding=1), nn.Tanh()).eval()


def _noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, c) if c > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _snapshot(root: Path) -> list[tuple[str, int, int]]:
    return sorted((p.relative_to(root).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                  for p in root.rglob("*"))


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


@pytest.fixture
def mixed(tmp_path) -> Path:
    """A nested folder holding every kind of input the engine must survive."""
    src = tmp_path / "in"
    (src / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(_noise(50, 70)).save(src / "wide.png")
    Image.fromarray(_noise(1, 1)).save(src / "sub" / "dot.png")
    Image.fromarray(_noise(17, 3000)).save(src / "sub" / "strip.jpg")
    Image.fromarray(_noise(65, 33)).save(src / "sub" / "deeper" / "tall.png")
    Image.fromarray(_noise(20, 30, c=1)).save(src / "gray.png")
    Image.fromarray(_noise(24, 24, c=4)).save(src / "rgba.png")
    Image.fromarray(_noise(12, 10, c=1).astype(np.uint16) * 250).save(src / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_noise(10, 30)).save(src / "rotated.jpg", exif=exif)
    Image.fromarray(_noise(40, 40)).save(src / "corrupt.png")
    data = (src / "corrupt.png").read_bytes()
    (src / "corrupt.png").write_bytes(data[: len(data) // 2])
    (src / "fake.png").write_text("not an image")
    (src / "notes.txt").write_text("not an image either, and not named like one")
    return src


def test_folder_with_every_kind_of_file(tmp_path, mixed):
    before = _snapshot(mixed)
    out = tmp_path / "out"
    report = translate_folder(_net(), RGB, mixed, out, batch_size=2, progress=False)
    assert _snapshot(mixed) == before  # nothing in INPUT modified or created
    assert report.translated == 8 and report.skipped == 0
    assert sorted(p.name for p, _ in report.failed) == ["corrupt.png", "fake.png"]
    assert all(reason.startswith(str(p)) for p, reason in report.failed)
    expected = {"wide.png": (70, 50), "sub/dot.png": (1, 1), "sub/strip.jpg": (3000, 17),
                "sub/deeper/tall.png": (33, 65), "gray.png": (30, 20), "rgba.png": (24, 24),
                "deep16.png": (10, 12), "rotated.jpg": (10, 30)}  # (W, H); EXIF applied
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(expected)
    for rel, size in expected.items():
        assert _size(out / rel) == size, rel
    colour, alpha, _ = load_image_rgba(out / "rgba.png")
    np.testing.assert_array_equal(alpha, _noise(24, 24, c=4)[..., 3])
    assert colour.shape[2] == 3
    assert load_image_rgba(out / "gray.png")[0].shape == (20, 30, 3)  # 3-channel model output
    assert load_image_rgba(out / "deep16.png")[2].bit_depth == 8  # colour output: 8-bit


def test_exact_values_with_pointwise_model(tmp_path):
    """-x maps uint8 v to 255 - v exactly, so any padding/cropping slip shows."""
    src = tmp_path / "in"
    src.mkdir()
    for name, (h, w) in {"a.png": (13, 7), "b.png": (1, 1), "c.png": (3, 41)}.items():
        Image.fromarray(_noise(h, w, seed=h)).save(src / name)
    translate_folder(lambda x: -x, RGB, src, tmp_path / "out", progress=False)
    for name in ["a.png", "b.png", "c.png"]:
        got = np.asarray(Image.open(tmp_path / "out" / name))
        np.testing.assert_array_equal(got, 255 - np.asarray(Image.open(src / name)))


def test_grayscale_model_and_16_bit_output(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    wide = (np.arange(40, dtype=np.uint16).reshape(5, 8) * 1600)
    Image.fromarray(wide).save(src / "d.png")
    rgb = _noise(6, 9)
    Image.fromarray(rgb).save(src / "c.png")
    gray = ModelInfo(in_channels=1, out_channels=1, size_multiple=4)
    translate_folder(lambda x: x, gray, src, tmp_path / "out", progress=False)
    with Image.open(tmp_path / "out" / "d.png") as im:
        assert im.mode.startswith("I")  # 16-bit in, 1-channel model: 16-bit out
        back = np.asarray(im).astype(int)
    # the input was decoded at 8 bits, so values come back on the 257-step grid
    np.testing.assert_array_equal(back, np.rint(wide / 65535 * 255).astype(int) * 257)
    luma = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
    with Image.open(tmp_path / "out" / "c.png") as im:
        assert im.mode == "L"
        assert np.abs(np.asarray(im).astype(int) - luma).max() <= 1


def test_skip_existing_then_overwrite(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_noise(8, 8, seed=i)).save(src / f"{i}.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "1.png").write_bytes(b"keep me")
    report = translate_folder(lambda x: -x, RGB, src, out, progress=False)
    assert (report.translated, report.skipped) == (2, 1)
    assert (out / "1.png").read_bytes() == b"keep me"
    report = translate_folder(lambda x: -x, RGB, src, out, overwrite=True, progress=False)
    assert (report.translated, report.skipped) == (3, 0)
    assert _size(out / "1.png") == (8, 8)


def test_bad_arguments_fail_before_any_work(tmp_path):
    src = tmp_path / "in"
    (src / "inner").mkdir(parents=True)
    Image.fromarray(_noise(8, 8)).save(src / "a.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    before = _snapshot(tmp_path)
    cases = [(src, src / "out", "inside the input"), (src, src, "inside the input"),
             (src / "inner" / "..", src / "inner", "inside the input"),
             (tmp_path / "missing", tmp_path / "o", "no such file"),
             (tmp_path / "empty", tmp_path / "o", "no images found"),
             (src, tmp_path / "file.txt", "is a file"),
             (src / "a.png", src / "a.png", "is the input file"),
             (src / "a.png", src, "is the input folder")]
    (tmp_path / "link").symlink_to(src)
    cases.append((src, tmp_path / "link" / "out", "inside the input"))
    for input_, output, words in cases:
        with pytest.raises(UserError, match=words):
            translate_folder(lambda x: x, RGB, input_, output, progress=False)
    for kwargs, words in [({"format": "gif"}, "unknown image format"),
                          ({"batch_size": 0}, "--batch-size"), ({"tile": -1}, "--tile"),
                          ({"tile": "big"}, "--tile big")]:
        with pytest.raises(UserError, match=words):
            translate_folder(lambda x: x, RGB, src, tmp_path / "o", progress=False, **kwargs)
    assert _snapshot(tmp_path) == before + [("link", (tmp_path / "link").stat().st_mtime_ns,
                                             (tmp_path / "link").stat().st_size)]


def test_glob_input_and_format(tmp_path):
    src = tmp_path / "in"
    (src / "a" / "b").mkdir(parents=True)
    Image.fromarray(_noise(8, 8)).save(src / "a" / "one.jpg")
    Image.fromarray(_noise(8, 8)).save(src / "a" / "b" / "two.jpg")
    Image.fromarray(_noise(8, 8)).save(src / "a" / "skip.png")
    out = tmp_path / "out"
    report = translate_folder(lambda x: -x, RGB, f"{src}/a/**/*.jpg", out, format="png",
                              progress=False)
    assert report.translated == 2
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.*"))
    assert written == ["b/two.png", "one.png"]  # relative to the glob's base: in/a
    assert Image.open(out / "one.png").format == "PNG"


def test_format_collision_is_an_error(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(8, 8)).save(src / "x.jpg")
    Image.fromarray(_noise(8, 8)).save(src / "x.png")
    with pytest.raises(UserError, match="would be written to"):
        translate_folder(lambda x: x, RGB, src, tmp_path / "out", format="png", progress=False)
    assert not (tmp_path / "out").exists()


def test_single_file_to_file_and_to_folder(tmp_path):
    Image.fromarray(_noise(9, 11)).save(tmp_path / "p.jpg")
    translate_folder(lambda x: -x, RGB, tmp_path / "p.jpg", tmp_path / "r.png", progress=False)
    assert _size(tmp_path / "r.png") == (11, 9)
    translate_folder(lambda x: -x, RGB, tmp_path / "p.jpg", tmp_path / "o", progress=False)
    assert _size(tmp_path / "o" / "p.jpg") == (11, 9)


# ---------------------------------------------------------------------------- tiling


def test_tiled_equals_untiled_with_small_receptive_field():
    net = _net()
    x = to_tensor(_noise(200, 168))  # multiples of 4: no padding either way
    whole = translate_tensor(net, RGB, x)
    tiled = translate_tensor(net, RGB, x, tile=64, overlap=32, batch_size=3)
    assert tiled.shape == whole.shape == (1, 3, 200, 168)
    assert (tiled - whole).abs().max() < 1e-5
    x = to_tensor(_noise(203, 171))  # tiles of the padded image: equal up to the edges
    whole = translate_tensor(net, RGB, x)
    tiled = translate_tensor(net, RGB, x, tile=62, overlap=32)  # 62 rounds up to 64
    assert tiled.shape == (1, 3, 203, 171)
    assert (tiled - whole).abs().max() < 1e-5
    # no seam: neighbouring-column steps are no larger than in the untiled result
    assert (tiled.diff(dim=3).abs().max() - whole.diff(dim=3).abs().max()).abs() < 1e-4


def test_tiles_are_blended_without_seams():
    """Each tile outputs its own mean: a hard cut would jump by the difference of means."""
    def tile_mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3), keepdim=True).expand_as(x).clone()
    y, x = np.mgrid[0:128, 0:256]
    ramp = np.repeat(((x + y) * 255 // 384).astype(np.uint8)[..., None], 3, axis=2)
    out = translate_tensor(tile_mean, RGB, to_tensor(ramp), tile=64, overlap=32)
    hard_jump = 32 / 384 * 2  # mean difference of horizontally adjacent tiles (stride 32)
    assert out.diff(dim=3).abs().max() < 0.25 * hard_jump
    assert out.diff(dim=2).abs().max() < 0.25 * hard_jump


def test_pointwise_model_tiled_equals_untiled_exactly():
    x = to_tensor(_noise(150, 97))
    whole = translate_tensor(lambda t: -t, RGB, x)
    tiled = translate_tensor(lambda t: -t, RGB, x, tile=40, overlap=16)
    assert torch.allclose(whole, -x) and torch.allclose(tiled, whole, atol=1e-6)
    np.testing.assert_array_equal(to_uint8(tiled), to_uint8(whole))


@pytest.mark.parametrize("h, w, tile, overlap", [(1, 1, 4, 2), (3000, 17, 256, 32),
                                                 (97, 130, 8, 3), (70, 50, 16, 16),
                                                 (33, 65, 12, 0), (40, 41, 20, 9)])
def test_tiling_covers_every_pixel(h, w, tile, overlap):
    """Identity through any tiling gives the input back: weights never sum to zero."""
    pixels = torch.from_numpy(_noise(h, w)).permute(2, 0, 1)[None]  # uint8 input is allowed
    out = translate_tensor(lambda t: t, RGB, pixels, tile=tile, overlap=overlap)
    assert out.shape == (1, 3, h, w)
    assert torch.allclose(out, to_tensor(_noise(h, w)), atol=1e-6)


@pytest.mark.parametrize("n, size", [(1, 4), (1, 1), (5, 5), (5, 12), (17, 3000), (2, 9)])
def test_mirror_padding_matches_numpy_reflect(n, size):
    x = torch.arange(n, dtype=torch.float32).reshape(1, 1, 1, n).expand(1, 1, n, n)
    padded = _mirror_pad(x, size, size)
    expected = np.pad(np.arange(n, dtype=np.float32), (0, size - n), mode="reflect")
    np.testing.assert_array_equal(padded[0, 0, 0].numpy(), expected)
    assert padded.shape == (1, 1, size, size)


def test_large_image_tiled_through_folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(1024, 1024)).save(src / "big.png")
    shapes = []

    def net(x):
        shapes.append(tuple(x.shape))
        return _NET(x)
    report = translate_folder(net, RGB, src, tmp_path / "out", tile=256, batch_size=4,
                              progress=False)
    assert report.translated == 1 and _size(tmp_path / "out" / "big.png") == (1024, 1024)
    assert max(s[2] for s in shapes) == 256 and max(s[0] for s in shapes) <= 4


_NET = _net()


# ---------------------------------------------------------------------------- batching & output


def test_same_size_images_are_batched(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sizes = [(20, 20), (32, 32), (20, 20), (21, 19), (20, 20), (32, 32), (20, 20), (20, 20)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_noise(h, w, seed=i)).save(src / f"{i}.png")
    shapes = []

    def record(x):
        shapes.append(tuple(x.shape))
        return -x
    report = translate_folder(record, RGB, src, tmp_path / "out", batch_size=2, progress=False)
    assert report.translated == 8
    assert sorted(shapes) == sorted([(2, 3, 20, 20), (2, 3, 20, 20), (1, 3, 20, 20),
                                     (2, 3, 32, 32), (1, 3, 24, 20)])
    for i, (h, w) in enumerate(sizes):  # batching did not mix images up
        got = np.asarray(Image.open(tmp_path / "out" / f"{i}.png"))
        np.testing.assert_array_equal(got, 255 - _noise(h, w, seed=i))


def test_side_by_side(tmp_path):
    src = tmp_path / "in"
    (src / "s").mkdir(parents=True)
    Image.fromarray(_noise(10, 14)).save(src / "s" / "a.png")
    translate_folder(lambda x: -x, RGB, src, tmp_path / "out", side_by_side=True,
                     progress=False)
    pair = np.asarray(Image.open(tmp_path / "out" / "_pairs" / "s" / "a.png"))
    assert pair.shape == (10, 28, 3)
    np.testing.assert_array_equal(pair[:, :14], _noise(10, 14))
    np.testing.assert_array_equal(pair[:, 14:], 255 - _noise(10, 14))
    assert _size(tmp_path / "out" / "s" / "a.png") == (14, 10)


def test_model_failure_is_per_image(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(8, 8)).save(src / "small.png")
    Image.fromarray(_noise(8, 200)).save(src / "wide.png")

    def picky(x):
        if x.shape[3] > 100:
            raise RuntimeError("CPU allocator: cannot allocate memory")
        return x
    report = translate_folder(picky, RGB, src, tmp_path / "out", progress=False)
    assert report.translated == 1
    assert [(p.name, "--tile" in r) for p, r in report.failed] == [("wide.png", True)]


def test_wrong_model_shape_is_a_model_error(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(8, 8)).save(src / "a.png")
    with pytest.raises(ModelError):
        translate_folder(lambda x: x[..., ::2, ::2], RGB, src, tmp_path / "o", progress=False)


def test_interrupted_run_resumes(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(5):
        Image.fromarray(_noise(8, 8 + 4 * i, seed=i)).save(src / f"{i}.png")
    calls = []

    def dies_third(x):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return -x
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        translate_folder(dies_third, RGB, src, out, batch_size=1, progress=False)
    done = sorted(p.name for p in out.iterdir())
    assert done == ["0.png", "1.png"]  # no partial or temp files under any name
    report = translate_folder(lambda x: -x, RGB, src, out, progress=False)
    assert (report.translated, report.skipped) == (3, 2)



def test_no_progress_ends_with_the_summary_on_stdout(generator, tmp_path):
    # Without the live display a script still gets the run's figures (as `train --no-progress`
    # ends with its "done" line), on stdout; stderr holds only the failures.
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(8, 8)).save(src / "a.png")
    (src / "b.png").write_bytes(b"")
    proc = run_cli("apply", str(generator), str(src), str(tmp_path / "out"), "--no-progress",
                   check=False)
    assert proc.returncode == 1
    assert re.fullmatch(r"translated 1, skipped 0, failed 1 in [0-9.]+ s \([0-9.]+ (img/s|s "
                        r"per image)\)\n", proc.stdout), proc.stdout
    line = f"failed: {src / 'b.png'}: empty file (0 bytes) — re-export or delete it"
    assert proc.stderr.splitlines() == [line], proc.stderr

def test_progress_output_under_capture(tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(8, 8)).save(src / "a.png")
    (src / "b.png").write_bytes(b"")
    report = translate_folder(lambda x: x, RGB, src, tmp_path / "out", workers=0)
    err = capsys.readouterr().err
    assert "translated 1, skipped 0, failed 1 in" in err and "img/s" in err
    assert f"{src / 'b.png'}: empty file" in err
    assert report.images_per_s > 0
    assert os.path.exists(tmp_path / "out" / "a.png")


def test_a_rerun_says_how_many_were_skipped(tmp_path, capsys):
    """10 images done, 1 added: the rerun says "10 skipped, 1 to do" before its bar, whose
    1/1 would otherwise read as if the folder held one image."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(10):
        Image.fromarray(_noise(8, 8, seed=i)).save(src / f"{i}.png")
    translate_folder(lambda x: -x, RGB, src, tmp_path / "out", progress=False)
    Image.fromarray(_noise(8, 8, seed=10)).save(src / "10.png")
    report = translate_folder(lambda x: -x, RGB, src, tmp_path / "out")
    err = capsys.readouterr().err
    assert (report.translated, report.skipped) == (1, 10)
    assert ("11 images: 10 skipped (their outputs exist; --overwrite redoes them), 1 to do"
            in err), err
    translate_folder(lambda x: -x, RGB, src, tmp_path / "out2")
    assert "skipped (their" not in capsys.readouterr().err  # a fresh run has nothing to say


@pytest.mark.parametrize("in_lanes", [False, True])
def test_jpg_output_of_transparent_images_warns_once(tmp_path, in_lanes):
    """--format jpg drops alpha (JPEG has none): one warning naming how many inputs lose
    transparency and the first of them; opaque alpha and PNG outputs lose nothing. The same
    when whole images run in lanes."""
    src = tmp_path / "in"
    src.mkdir()
    rgba = np.dstack([_noise(8, 8), np.full((8, 8), 255, np.uint8)])
    Image.fromarray(rgba).save(src / "opaque.png")
    for name in ("a.png", "b.png"):
        rgba[:4, :, 3] = 0
        Image.fromarray(rgba).save(src / name)
    fn = _InLanes(lambda x: -x) if in_lanes else (lambda x: -x)
    with pytest.warns(ApplyWarning) as seen:
        report = translate_folder(fn, RGB, src, tmp_path / "jpg", format="jpg", progress=False)
    assert report.translated == 3 and len(seen) == 1
    assert str(seen[0].message).startswith(
        f"2 input images have transparency (first: {src / 'a.png'}) that .jpg files cannot "
        "store: the outputs have none; use --format png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        translate_folder(lambda x: -x, RGB, src, tmp_path / "png", format="png", progress=False)
    assert np.asarray(Image.open(tmp_path / "png" / "a.png"))[:4, :, 3].max() == 0


class _Meeting:
    """Records the threads that arrive; an arrival waits (10 s at most, once) until a second
    thread has arrived: work this small could otherwise all be done by one thread before
    another starts, and a test of side-by-side work would pass or fail by timing."""

    def __init__(self, wait: bool = True) -> None:
        self.threads: set[int] = set()
        self.met = threading.Event()
        if not wait:
            self.met.set()

    def arrive(self) -> None:
        self.threads.add(threading.get_ident())
        if len(self.threads) > 1 or not self.met.wait(10):
            self.met.set()  # met, or waited once in vain: the test's assertions say so


class _InLanes:
    """A batch function whose `lanes` make translate_folder run whole images side by side (as
    a compiled generator's do on a CPU); it records the threads it ran in. With `meet`, calls
    meet (_Meeting) before they run."""

    def __init__(self, fn, meet: bool = False) -> None:
        self.fn, self.lanes, self.meeting = fn, LanePool(2), _Meeting(wait=meet)
        self.threads = self.meeting.threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.meeting.arrive()
        return self.fn(x)


def test_lanes_translate_every_kind_of_file_as_one_at_a_time(tmp_path, mixed):
    net = _net()
    one = translate_folder(net, RGB, mixed, tmp_path / "one", batch_size=1, progress=False)
    lanes = _InLanes(net, meet=True)
    two = translate_folder(lanes, RGB, mixed, tmp_path / "two", progress=False)
    assert len(lanes.threads) == 2 and threading.get_ident() not in lanes.threads
    assert (two.translated, two.skipped) == (one.translated, one.skipped) == (8, 0)
    assert [(p.name, r.replace("two", "one")) for p, r in two.failed] == \
        [(p.name, r) for p, r in one.failed]
    written = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.*"))
    assert written == sorted(p.relative_to(tmp_path / "two")
                             for p in (tmp_path / "two").rglob("*.*"))
    for rel in written:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "two" / rel)),
                                      np.asarray(Image.open(tmp_path / "one" / rel)), str(rel))


def test_lanes_keep_finished_work_when_interrupted(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.fromarray(_noise(8, 8 + 4 * i, seed=i)).save(src / f"{i}.png")

    def dies_on_2(x):
        if x.shape[3] == 16:  # image 2
            raise KeyboardInterrupt
        return -x
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        translate_folder(_InLanes(dies_on_2), RGB, src, out, progress=False)
    done = sorted(p.name for p in out.iterdir())  # whole outputs only: no temp files
    assert {"0.png", "1.png"} <= set(done) <= {f"{i}.png" for i in (0, 1, 3, 4, 5)}
    report = translate_folder(_InLanes(lambda x: -x), RGB, src, out, progress=False)
    assert (report.translated, report.skipped) == (6 - len(done), len(done))
    for i in range(6):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{i}.png")),
                                      255 - _noise(8, 8 + 4 * i, seed=i))



def test_a_run_of_one_image_gets_all_threads_and_a_last_image_beside_a_busy_lane_does_not(
        tmp_path):
    # One image alone would leave the other lane idle: it runs on both threads (one 1024 px
    # ResNet-9 image, fp32: 35.9 s on one thread, 20.3 on two). The last of several runs on
    # all threads only when no other image is still in flight.
    def folder(name: str, widths: list[int]) -> Path:
        (tmp_path / name).mkdir()
        for i, width in enumerate(widths):
            Image.fromarray(_noise(8, width, seed=i)).save(tmp_path / name / f"{i}.png")
        return tmp_path / name

    def recorded(calls: list[tuple[int, int]]):
        def fn(x: torch.Tensor) -> torch.Tensor:
            if x.shape[3] == 16:
                time.sleep(0.5)  # the slow image
            calls.append((x.shape[3], torch.get_num_threads()))
            return -x
        return fn

    lone, three = folder("one", [16]), folder("three", [16, 8, 12])  # 8, then 12 pass 16
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        calls: list[tuple[int, int]] = []
        translate_folder(_InLanes(recorded(calls)), RGB, lone, tmp_path / "out1", progress=False)
        assert calls == [(16, 2)]
        calls.clear()
        report = translate_folder(_InLanes(recorded(calls)), RGB, three, tmp_path / "out3",
                                  progress=False)
        assert report.translated == 3 and torch.get_num_threads() == 2
        assert sorted(calls) == [(8, 1), (12, 1), (16, 1)]  # 2 (last) beside 0 (busy)
    finally:
        torch.set_num_threads(before)


def test_lanes_run_a_tiled_image_alone_on_all_threads(tmp_path):
    # Tiling hooks and patches the net's norm layers for one image's statistics: with the net
    # shared by both lanes, nothing else may run meanwhile. The tiled image gets every thread.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 3, 3, padding=1)).eval()
    norm = net[1]

    def patched() -> bool:
        return "forward" in norm.__dict__ or bool(norm._forward_hooks)

    class Watched:
        def __init__(self) -> None:
            self.net, self.lanes, self.calls = net, LanePool(2), []

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            during = patched()
            if x.shape[2] == 16:
                time.sleep(0.05)  # a window for a tiled image in the other lane to patch in
            y = net(x)
            self.calls.append((x.shape[2], torch.get_num_threads(), during or patched()))
            return y

    src = tmp_path / "in"
    src.mkdir()
    sizes = [16, 64, 16, 16, 64, 16]
    for i, side in enumerate(sizes):
        Image.fromarray(_noise(side, side, seed=i)).save(src / f"{i}.png")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        watched = Watched()
        report = translate_folder(watched, RGB, src, tmp_path / "two", tile=32, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert report.translated == 6
    small = [c for c in watched.calls if c[0] == 16]
    assert len(small) == 4 and not any(c[2] for c in small)  # unpatched
    assert all(c[1] == 1 for c in small[:-1])  # in a lane
    # The run's last image runs alone on all threads when nothing else is left in flight
    # (LanePool.last): then it is the last call of all.
    assert small[-1][1] == 1 or watched.calls[-1] is small[-1]
    assert {c[1:] for c in watched.calls if c[0] > 16} == {(2, True)}  # alone, all threads
    translate_folder(net, RGB, src, tmp_path / "one", tile=32, progress=False)
    for i in range(6):
        a, b = (np.asarray(Image.open(tmp_path / d / f"{i}.png"), np.int16) for d in ("one", "two"))
        assert np.abs(a - b).max() <= 1, i


def test_the_tiles_of_an_image_alone_spread_over_the_lanes(tmp_path):
    # The torch backend's forward takes a batch of tiles one tile per call, side by side on the
    # alone turn's thread and a helper, one torch thread each (with the norm layers patched for
    # the image); the whole-image pass before them keeps all threads.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 3, 3, padding=1)).eval()
    calls: list[tuple[int, int, int, int, bool]] = []  # batch, rows, threads, thread, patched
    tiles_meet = _Meeting()  # tiles this small could all run on the first thread

    def record(m, args, out):
        calls.append((args[0].shape[0], args[0].shape[2], torch.get_num_threads(),
                      threading.get_ident(), "forward" in net[1].__dict__))
        if args[0].shape[2] == 32:
            tiles_meet.arrive()

    net.register_forward_hook(record)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(96, 96)).save(src / "big.png")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fwd = TorchForward(net, "fp32", torch.device("cpu"), LanePool(2),
                           torch.contiguous_format)
        report = translate_folder(fwd, RGB, src, tmp_path / "two", tile=32, overlap=8,
                                  progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert report.translated == 1
    overview = [c for c in calls if c[1] != 32]
    tiles = [c for c in calls if c[1] == 32]
    assert [(c[0], c[2], c[4]) for c in overview] == [(1, 2, False)]  # whole image, all threads
    assert len(tiles) == 16 and {(c[0], c[2], c[4]) for c in tiles} == {(1, 1, True)}
    assert len({c[3] for c in tiles}) == 2  # two threads took tiles
    translate_folder(net, RGB, src, tmp_path / "one", tile=32, overlap=8, progress=False)
    a, b = (np.asarray(Image.open(tmp_path / d / "big.png"), np.int16) for d in ("one", "two"))
    assert np.abs(a - b).max() <= 1


def test_an_alone_turn_spreads_calls_with_a_lanes_threads_and_stops_at_an_error():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = LanePool(2)
        with pool.alone():
            assert torch.get_num_threads() == 2  # whole-image passes: all threads
            assert pool.run([torch.get_num_threads]) == [1]  # one call too: a lane's share
            both = threading.Barrier(2, timeout=30)  # one call at a time would time out
            assert sorted(pool.run([both.wait, both.wait])) == [0, 1]
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    ran: list[int] = []

    def call(i: int) -> int:
        if i == 1:
            raise ValueError("tile 1")
        time.sleep(0.01)
        ran.append(i)
        return i

    with pool.alone():
        assert pool.run([lambda i=i: i for i in range(5)]) == list(range(5))
        with pytest.raises(ValueError, match="tile 1"):
            pool.run([lambda i=i: call(i) for i in range(40)])
    assert len(ran) < 39  # the rest were dropped once the error was seen
    assert not pool.spreads()


def test_the_rate_line_says_seconds_per_image_below_one_image_per_second():
    from translate.infer.progress import ApplyReport, _rate

    assert _rate(ApplyReport(300, 0, [], 100.0)) == "3.0 img/s"
    assert _rate(ApplyReport(2, 0, [], 57.0)) == "28.5 s per image"
    assert _rate(ApplyReport(0, 3, [], 0.1)) == "0.0 img/s"


def test_a_run_that_translated_nothing_states_no_rate():
    from translate.infer.progress import ApplyReport, summary

    assert summary(ApplyReport(0, 5, [], 0.04)) == "translated 0, skipped 5, failed 0 in 0.0 s"
    assert summary(ApplyReport(8, 0, [], 2.0)).endswith("in 2.0 s (4.0 img/s)")


def test_the_bar_shows_the_mean_rate_when_images_finish_together():
    # 5 images in 1 s, the last 4 within 10 us of the first (a batch): the bar says 5 img/s and
    # 1 s left for 5 more, as the summary would, not rich's ~400,000 img/s over the burst.
    from rich.console import Console

    from translate.infer.progress import progress_bar

    now = [0.0]
    bar = progress_bar(Console(file=io.StringIO()), enabled=True)
    bar.get_time = lambda: now[0]
    task = bar.add_task("translating", total=10)
    now[0] = 1.0
    bar.advance(task)
    now[0] = 1.00001
    bar.advance(task, 4)
    rate, left = bar.columns[3], bar.columns[4]
    t = bar.tasks[0]
    assert t.speed > 1000  # rich's own figure, which the bar no longer shows
    assert rate.render(t).plain == "5.0 img/s" and left.render(t).plain == "0:00:01"
