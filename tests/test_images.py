"""translate.images on real files: every colour mode, every broken file, listing, atomic saves."""

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from translate import images
from translate.errors import ImageError
from translate.images import (
    list_images,
    load_image,
    load_image_rgba,
    save_image,
    to_tensor,
    to_uint8,
)


def _ramp(h: int = 6, w: int = 8) -> np.ndarray:
    """An RGB image whose every pixel differs, so swaps and flips are visible."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 30, y * 40, (x + y) * 10], axis=2).astype(np.uint8)


def _assert_one_line_error(err: pytest.ExceptionInfo, path: Path, *words: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}: ") and " — " in msg
    for word in words:
        assert word in msg, msg


# ---------------------------------------------------------------------------- conversions


def test_grayscale_l_to_rgb_and_gray(tmp_path):
    gray = _ramp()[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    rgb = load_image(tmp_path / "g.png")
    assert rgb.shape == (6, 8, 3) and rgb.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], gray)
    np.testing.assert_array_equal(load_image(tmp_path / "g.png", channels=1)[..., 0], gray)
    colour, alpha, info = load_image_rgba(tmp_path / "g.png")
    assert colour.shape == (6, 8, 1) and alpha is None
    assert info.mode == "L" and info.format == "PNG" and not info.had_alpha


def test_rgb_to_gray_is_luma(tmp_path):
    rgb = _ramp()
    Image.fromarray(rgb).save(tmp_path / "c.png")
    gray = load_image(tmp_path / "c.png", channels=1)
    expected = np.asarray(Image.fromarray(rgb).convert("L")).astype(int)
    assert gray.shape == (6, 8, 1)
    assert np.abs(gray[..., 0].astype(int) - expected).max() <= 1


def test_la_drops_alpha_and_rgba_keeps_it(tmp_path):
    gray, alpha = _ramp()[..., 0], _ramp()[..., 1]
    Image.fromarray(np.stack([gray, alpha], 2)).save(tmp_path / "la.png")
    np.testing.assert_array_equal(load_image(tmp_path / "la.png")[..., 2], gray)
    colour, a, info = load_image_rgba(tmp_path / "la.png")
    np.testing.assert_array_equal(colour[..., 0], gray)
    np.testing.assert_array_equal(a, alpha)
    assert info.had_alpha and info.mode == "LA"


def test_rgba(tmp_path):
    rgb, alpha = _ramp(), _ramp()[..., 2]
    Image.fromarray(np.concatenate([rgb, alpha[..., None]], 2)).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)  # dropped, not composited
    colour, a, info = load_image_rgba(tmp_path / "a.png")
    np.testing.assert_array_equal(colour, rgb)
    np.testing.assert_array_equal(a, alpha)
    assert info.had_alpha


@pytest.mark.parametrize("transparent", [False, True])
def test_palette(tmp_path, transparent):
    idx = (np.arange(48).reshape(6, 8) % 4).astype(np.uint8)
    pal = [255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9]
    im = Image.new("P", (8, 6))
    im.putdata(idx.ravel().tolist())
    im.putpalette(pal + [0] * (768 - len(pal)))
    extra = {"transparency": 3} if transparent else {}
    im.save(tmp_path / "p.png", **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns about P+transparency -> RGB; we must not
        rgb = load_image(tmp_path / "p.png")
        colour, alpha, info = load_image_rgba(tmp_path / "p.png")
    expected = np.array(pal).reshape(4, 3)[idx]
    np.testing.assert_array_equal(rgb, expected)
    np.testing.assert_array_equal(colour, expected)
    assert info.mode == "P" and info.had_alpha == transparent
    if transparent:
        np.testing.assert_array_equal(alpha, np.where(idx == 3, 0, 255))
    else:
        assert alpha is None


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in ink
    cmyk.save(tmp_path / "k.jpg", quality=100)
    rgb = load_image(tmp_path / "k.jpg")
    assert rgb.shape == (8, 16, 3)
    r, g, b = rgb.reshape(-1, 3).mean(0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 50000, 65280]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    got = load_image(tmp_path / "d.png", channels=1)[..., 0]
    np.testing.assert_array_equal(got, np.rint(values / 65535 * 255).astype(np.uint8))
    assert got[0, 1] == 1 and got[0, 2] == 128 and got[0, 3] == 255  # clipping would give 255s
    _, _, info = load_image_rgba(tmp_path / "d.png")
    assert info.bit_depth == 16


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_float_tiff(tmp_path, scale):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32) * scale
    Image.fromarray(values).save(tmp_path / "f.tif")
    got = load_image(tmp_path / "f.tif", channels=1)[..., 0]
    np.testing.assert_array_equal(got, [[0, 64, 128, 255]])


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)  # H=10, W=20
    pixels[:4, :4] = (255, 0, 0)  # red top-left corner marker
    im = Image.fromarray(pixels)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(tmp_path / "r.jpg", exif=exif, quality=100)
    rgb = load_image(tmp_path / "r.jpg")
    assert rgb.shape == (20, 10, 3)
    assert rgb[1, -2, 0] > 200 and rgb[1, 1, 0] < 50  # the marker went to the top right
    assert load_image_rgba(tmp_path / "r.jpg")[2].size == (10, 20)


# ---------------------------------------------------------------------------- broken files


def test_zero_byte(tmp_path):
    (tmp_path / "e.png").write_bytes(b"")
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "e.png")
    _assert_one_line_error(err, tmp_path / "e.png", "empty")


def test_truncated_png(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "t.png")
    _assert_one_line_error(err, tmp_path / "t.png", "truncated")


def test_text_file_named_png(tmp_path):
    (tmp_path / "n.png").write_text("hello, I am not a picture\n")
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "n.png")
    _assert_one_line_error(err, tmp_path / "n.png", "not an image")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG claiming a huge size with no pixel data: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_small_limit(tmp_path):
    Image.fromarray(_ramp(40, 40)).save(tmp_path / "b.png")
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "b.png", max_pixels=1000)
    _assert_one_line_error(err, tmp_path / "b.png", "40x40", "1,600", "max_pixels=1600")
    assert load_image(tmp_path / "b.png", max_pixels=1600).shape == (40, 40, 3)
    # The hint names the knob of the command that read the file.
    for limit, words in [(images.TRAIN_LIMIT, "--set data.max_pixels=1600"),
                         (images.APPLY_LIMIT, "--max-pixels 1600")]:
        with pytest.raises(ImageError) as err:
            load_image(tmp_path / "b.png", max_pixels=1000, limit=limit)
        _assert_one_line_error(err, tmp_path / "b.png", words)


def test_huge_header_gives_our_error_not_pils(tmp_path):
    _png_header_only(tmp_path / "bomb.png", 20000, 10000)  # beyond PIL's own error threshold
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageError) as err:
            load_image(tmp_path / "bomb.png")
    _assert_one_line_error(err, tmp_path / "bomb.png", "20000x10000", "max_pixels=200000000")


def test_permission_denied_real_chmod(tmp_path):
    Image.fromarray(_ramp()).save(tmp_path / "x.png")
    os.chmod(tmp_path / "x.png", 0)
    try:
        if os.access(tmp_path / "x.png", os.R_OK):
            pytest.skip("running as root: chmod does not restrict reads (see the patched test)")
        with pytest.raises(ImageError) as err:
            load_image(tmp_path / "x.png")
        _assert_one_line_error(err, tmp_path / "x.png", "permission denied")
    finally:
        os.chmod(tmp_path / "x.png", 0o644)


def test_permission_denied_patched(tmp_path, monkeypatch):
    Image.fromarray(_ramp()).save(tmp_path / "x.png")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(images, "open", denied, raising=False)  # shadows the builtin
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "x.png")
    _assert_one_line_error(err, tmp_path / "x.png", "permission denied")


def test_vanished_file(tmp_path):
    with pytest.raises(ImageError) as err:
        load_image(tmp_path / "gone.png")
    _assert_one_line_error(err, tmp_path / "gone.png", "not found")


# ---------------------------------------------------------------------------- listing


def test_list_images_nested_hidden_and_skipped(tmp_path):
    for rel in ["b/z.png", "a/y.JPG", "a/deep/x.webp", "top.tif", ".hidden/h.png", "a/.h.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_ramp()).save(tmp_path / rel, format="PNG")
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "b" / "README").write_text("x")
    found, skipped = list_images(tmp_path)
    rel = [p.relative_to(tmp_path).as_posix() for p in found]
    assert rel == ["a/deep/x.webp", "a/y.JPG", "b/z.png", "top.tif"]
    assert sorted(p.name for p in skipped) == ["README", "notes.txt"]
    top, _ = list_images(tmp_path, recursive=False)
    assert [p.name for p in top] == ["top.tif"]
    assert list_images(tmp_path / "top.tif") == ([tmp_path / "top.tif"], [])


def test_list_images_follows_links_without_looping(tmp_path):
    (tmp_path / "real").mkdir()
    Image.fromarray(_ramp()).save(tmp_path / "real" / "a.png")
    (tmp_path / "real" / "loop").symlink_to(tmp_path)  # a folder linking to its parent
    (tmp_path / "link").symlink_to(tmp_path / "real")
    found, _ = list_images(tmp_path)
    # each real folder is walked once: a.png is found exactly once, by whichever path is first
    assert len(found) == 1 and found[0].name == "a.png"
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(_ramp()).save(outside / "o.png")
    (tmp_path / "real" / "linked").symlink_to(outside)
    found, _ = list_images(tmp_path / "real")
    assert [p.relative_to(tmp_path / "real").as_posix() for p in found] == [
        "a.png", "linked/o.png"]


def test_list_images_unreadable_dir_is_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "ok").mkdir()
    (tmp_path / "locked").mkdir()
    Image.fromarray(_ramp()).save(tmp_path / "ok" / "a.png")
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)
    monkeypatch.setattr(images.os, "scandir", scandir)
    found, skipped = list_images(tmp_path)
    assert [p.name for p in found] == ["a.png"]
    assert tmp_path / "locked" in skipped


# ---------------------------------------------------------------------------- saving


def test_save_is_atomic_and_leaves_no_temp(tmp_path):
    out = tmp_path / "new" / "sub" / "o.png"
    save_image(out, _ramp())
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.png"]
    np.testing.assert_array_equal(load_image(out), _ramp())
    umask = os.umask(0)
    os.umask(umask)
    assert (out.stat().st_mode & 0o777) == (0o666 & ~umask)


def _break_writes(monkeypatch, exc: BaseException) -> None:
    """Every image write fails part-way with `exc`: PIL's encoders (which write to the file
    descriptor) and the bytes save_image writes itself (8-bit PNGs from OpenCV)."""
    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise exc

    class Failing:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data: bytes) -> int:
            self.f.write(data[:10])
            raise exc

        def __getattr__(self, name: str):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc_info) -> None:
            self.f.close()

    real_fdopen = os.fdopen
    monkeypatch.setattr(Image.Image, "save", broken_save)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Failing(real_fdopen(fd, mode)))


@pytest.mark.parametrize("name", ["o.png", "o.jpg", "o16.png"])
def test_failed_save_leaves_no_file(tmp_path, monkeypatch, name):
    out = tmp_path / name
    pixels = _ramp()[..., :1] if name == "o16.png" else _ramp()
    _break_writes(monkeypatch, OSError(28, "No space left on device"))
    with pytest.raises(ImageError) as err:
        save_image(out, pixels, bit_depth=16 if name == "o16.png" else 8)
    _assert_one_line_error(err, out, "No space left")
    assert list(tmp_path.iterdir()) == []
    # an existing output is never replaced by a broken one
    out.write_bytes(b"old")
    with pytest.raises(ImageError):
        save_image(out, pixels)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.parametrize("name", ["o.png", "o.jpg"])
def test_interrupted_save_cleans_up(tmp_path, monkeypatch, name):
    _break_writes(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_image(tmp_path / name, _ramp())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_writes_the_exact_pixels(tmp_path, channels):
    # 8-bit gray, RGB and RGBA PNGs come from OpenCV's encoder (faster than PIL's): the
    # channel order and alpha must come back exactly as given.
    pixels = np.random.default_rng(channels).integers(0, 256, (23, 31, channels), np.uint8)
    rgb, alpha = (pixels[..., :3], pixels[..., 3]) if channels == 4 else (pixels, None)
    save_image(tmp_path / "a.png", rgb, alpha)
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]
        got = np.asarray(im)
    np.testing.assert_array_equal(got.reshape(pixels.shape), pixels)


@pytest.mark.parametrize("name", ["a.png", "a.webp", "a.tif"])
def test_alpha_round_trip(tmp_path, name):
    rgb, alpha = _ramp(), _ramp()[..., 1]
    save_image(tmp_path / name, rgb, alpha)
    colour, a, info = load_image_rgba(tmp_path / name)
    np.testing.assert_array_equal(a, alpha)
    if name != "a.webp":  # WEBP colour is lossy; alpha is lossless by default
        np.testing.assert_array_equal(colour, rgb)
    assert info.had_alpha


def test_jpeg_drops_alpha_and_format_override(tmp_path):
    save_image(tmp_path / "a.jpg", _ramp(), _ramp()[..., 0])
    assert Image.open(tmp_path / "a.jpg").mode == "RGB"
    save_image(tmp_path / "b.img", _ramp(), format="png")
    assert Image.open(tmp_path / "b.img").format == "PNG"
    with pytest.raises(ImageError):
        save_image(tmp_path / "c.unknown", _ramp())


def test_16bit_gray_png_save(tmp_path):
    wide = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    save_image(tmp_path / "w.png", wide[..., None], bit_depth=16)
    im = Image.open(tmp_path / "w.png")
    assert im.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(im), wide)
    save_image(tmp_path / "n.png", np.array([[0, 1, 255]], np.uint8), bit_depth=16)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "n.png")), [[0, 257, 65535]])
    save_image(tmp_path / "c.png", _ramp(), bit_depth=16)  # colour: documented 8-bit fallback
    assert Image.open(tmp_path / "c.png").mode == "RGB"


# ---------------------------------------------------------------------------- tensors


def test_tensor_round_trip_exact():
    every = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
    t = to_tensor(every)
    assert t.shape == (1, 3, 16, 16) and t.dtype == torch.float32
    assert t.min() == -1.0 and t.max() == 1.0
    np.testing.assert_array_equal(to_uint8(t)[0], every)
    np.testing.assert_array_equal(to_uint8(t[0]), every)
    gray = to_tensor(every[..., 0])
    assert gray.shape == (1, 1, 16, 16)


def test_to_uint8_clamps_and_rounds():
    t = torch.tensor([[[[-3.0, -1.0, 0.0, 0.004, 1.0, 7.0]]]])
    np.testing.assert_array_equal(to_uint8(t)[0, 0, :, 0], [0, 0, 128, 128, 255, 255])
