"""Image files in and out: robust decoding to uint8 arrays, atomic saving, tensor conversion.

Every way a file can be unusable (empty, truncated, not an image, unreadable, too large, odd
colour mode) becomes one `ImageError` line: "<path>: <what is wrong> — <fix>".
"""

from __future__ import annotations

import contextlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from translate.errors import ImageError, UserError
from translate.files import TEMP_NAME, TEMP_STEM_BYTES, atomic_path, temp_name

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
DEFAULT_MAX_PIXELS = 128_000_000  # decompression-bomb guard, in pixels (width * height)
# How the user raises the pixel limit, in the hint of a refused image ({} = the pixels needed).
APPLY_LIMIT = "--max-pixels {}"             # translate apply
TRAIN_LIMIT = "--set data.max_pixels={}"    # translate train (the recipe key)
PYTHON_LIMIT = "max_pixels={}"              # the Python argument, for other callers

# Our per-call `max_pixels` is the only size limit. PIL's global limit would otherwise warn
# between 89 and 179 megapixels and raise its own traceback above that, ignoring the user's
# --max-pixels; the check in `_decode` runs on the header, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
            ".tif": "TIFF", ".tiff": "TIFF"}
_ALPHA_FORMATS = ("PNG", "WEBP", "TIFF")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_GRAY_MODES = ("1", "L", "LA", "La")
_HIGH_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "WEBP": {"quality": 95}}


@dataclass(frozen=True)
class ImageInfo:
    """What the source file was, so outputs can be written like it."""

    format: str  # PIL format name: "PNG", "JPEG", ...
    mode: str  # PIL mode of the file as decoded: "RGB", "I;16", "P", ...
    bit_depth: int  # 8 or 16 bits per channel in the file
    had_alpha: bool  # the file carried transparency (alpha channel or tRNS key)
    size: tuple[int, int]  # (width, height) after EXIF orientation


# ---------------------------------------------------------------------------- listing


def list_images(root: str | Path, recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """Return (image files sorted by relative path, skipped non-image files and unreadable dirs).

    Symlinked folders are followed, each real folder at most once, so links to a parent folder
    cannot loop. Hidden names (".DS_Store", ".git", our own ".tmp" files) are ignored entirely.
    A file given directly is returned as the only image (if its extension is an image one).
    """
    root = Path(root)
    if root.is_file():
        return ([root], []) if _is_image_name(root.name) else ([], [root])
    if not root.is_dir():
        raise UserError(f"{root}: no such file or folder — check the path")
    images: list[Path] = []
    skipped: list[Path] = []
    seen: set[Path] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        real = folder.resolve()
        if real in seen:
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            skipped.append(folder)
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder / entry.name
            if _is_dir(entry):
                subfolders.append(path)
            elif _is_image_name(entry.name) and _is_file(entry):
                images.append(path)
            else:
                skipped.append(path)
        if recursive:
            pending.extend(reversed(subfolders))  # depth-first, in name order

    def by_relative(p: Path) -> tuple[str, ...]:
        return p.relative_to(root).parts
    return sorted(images, key=by_relative), sorted(skipped, key=by_relative)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:
        return False


def _is_file(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:
        return False


# ---------------------------------------------------------------------------- loading


def load_image(path: str | Path, channels: int = 3,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, limit: str = PYTHON_LIMIT
               ) -> np.ndarray:
    """Decode any supported file to a uint8 HxWxC array with C = `channels` (1 or 3).

    Alpha is dropped (not composited), EXIF orientation applied, 16-bit and float data scaled
    to 8 bits. `max_pixels=None` disables the size guard; `limit` is how the caller's user
    raises it (TRAIN_LIMIT, APPLY_LIMIT, ...), named in the error.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    colour, _, _ = _decode(Path(path), max_pixels, limit)
    return match_channels(colour, channels)


def load_image_rgba(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    limit: str = APPLY_LIMIT) -> tuple[np.ndarray, np.ndarray | None, ImageInfo]:
    """Decode for inference: (colour uint8 HxWx3, or HxWx1 for grayscale files; alpha uint8 HxW
    or None; ImageInfo). Grayscale stays 1-channel so the caller can match its model."""
    return _decode(Path(path), max_pixels, limit)


def match_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """Replicate gray to RGB, or reduce RGB to ITU-R 601 luma (what PIL's "L" mode uses).
    Channels last (HxWxC or NxHxWxC); uint8 stays uint8, float arrays stay float32."""
    have = img.shape[-1]
    if have == channels:
        return img
    if have == 1 and channels == 3:
        return np.repeat(img, 3, axis=-1)
    if have == 3 and channels == 1:
        luma = img.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if img.dtype == np.uint8:
            luma = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
        return luma[..., None]
    raise ValueError(f"cannot convert {have} channels to {channels}")


def _decode(path: Path, max_pixels: int | None, limit: str
            ) -> tuple[np.ndarray, np.ndarray | None, ImageInfo]:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise ImageError(f"{path}: empty file (0 bytes) — re-export or delete it")
            im = Image.open(f)
            _check_pixels(path, im.size, max_pixels, limit)
            bit_depth = _bit_depth(im)
            fmt = im.format or "?"
            im.load()  # full decode now, so truncated data fails here, not later
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, struct.error, ...)
        raise ImageError(_describe_failure(path, e, limit)) from e
    mode = im.mode
    im = _orient(im)
    try:
        colour, alpha, had_alpha = _split_alpha(im)
    except (ValueError, OSError) as e:
        raise ImageError(f"{path}: unsupported colour mode {mode} ({_one_line(e)}) — "
                         "convert it to an RGB or grayscale PNG") from e
    info = ImageInfo(format=fmt, mode=mode, bit_depth=bit_depth, had_alpha=had_alpha,
                     size=im.size)
    return colour, alpha, info


def _check_pixels(path: Path, size: tuple[int, int], max_pixels: int | None, limit: str
                  ) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageError(
            f"{path}: image is {w}x{h} = {w * h:,} pixels, more than the limit of "
            f"{max_pixels:,} (a guard against decompression bombs) — if you trust the file, "
            f"raise the limit with {limit.format(w * h)}")


def _bit_depth(im: Image.Image) -> int:
    if im.mode in _HIGH_GRAY_MODES:
        return 16
    # 16-bit colour PNG/TIFF decode to 8-bit "RGB"; only the raw mode of the tile tells.
    rawmodes = " ".join(str(t.args) for t in getattr(im, "tile", []) or [])
    return 16 if "16" in rawmodes else 8


def _orient(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except (ValueError, TypeError, KeyError, OSError, SyntaxError, struct.error):
        # a malformed EXIF block should not cost the user the picture
        return im


def _split_alpha(im: Image.Image) -> tuple[np.ndarray, np.ndarray | None, bool]:
    had_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if im.mode in _HIGH_GRAY_MODES:
        return _high_gray_to_u8(im)[..., None], None, had_alpha
    if im.mode in _GRAY_MODES:
        if had_alpha:
            la = np.array(im.convert("LA"))
            return np.ascontiguousarray(la[..., :1]), np.ascontiguousarray(la[..., 1]), True
        return np.array(im.convert("L"))[..., None], None, False
    if had_alpha:
        rgba = np.array(im.convert("RGBA"))
        return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3]), True
    return np.array(im.convert("RGB")), None, False


def _high_gray_to_u8(im: Image.Image) -> np.ndarray:
    a = np.asarray(im).astype(np.float64)
    if im.mode == "F":
        top = 1.0 if a.size == 0 or a.max() <= 1.0 else a.max()  # [0,1] data, else by its max
    else:
        top = max(65535.0, a.max() if a.size else 0.0)  # 16-bit range unless wider ints
    a = np.nan_to_num(a, nan=0.0, posinf=top, neginf=0.0)
    return np.rint(np.clip(a / top, 0.0, 1.0) * 255.0).astype(np.uint8)


def _describe_failure(path: Path, e: BaseException, limit: str) -> str:
    if isinstance(e, FileNotFoundError):
        return f"{path}: file not found (moved or deleted?) — check the path and run again"
    if isinstance(e, PermissionError):
        return f"{path}: permission denied — make the file readable (chmod +r) and run again"
    if isinstance(e, IsADirectoryError):
        return f"{path}: is a folder, not an image file — pass image files or their folder"
    if isinstance(e, UnidentifiedImageError):
        return (f"{path}: not an image file PIL can read (wrong extension or unknown format) — "
                "convert it to PNG or JPEG, or remove it")
    if isinstance(e, Image.DecompressionBombError):
        return (f"{path}: {_one_line(e)} — raise the limit with {limit.format('N')} if you "
                "trust it")
    return (f"{path}: corrupt or truncated image data ({type(e).__name__}: {_one_line(e)}) — "
            "re-download or re-export the file")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------- saving


def stores_alpha(path: str | Path) -> bool:
    """Whether save_image writes alpha into a file of this name (PNG, WEBP, TIFF do; JPEG and
    BMP do not)."""
    return _FORMATS.get(Path(path).suffix.lower()) in _ALPHA_FORMATS


def save_image(path: str | Path, rgb: np.ndarray, alpha: np.ndarray | None = None,
               bit_depth: int = 8, format: str | None = None) -> None:
    """Write an image atomically: a hidden temp file in the same folder, then os.replace.

    `rgb` is HxWx3, HxWx1 or HxW, uint8 (or uint16, for 16-bit grayscale). Alpha is written
    for PNG/WEBP/TIFF and dropped for JPEG/BMP. `bit_depth=16` gives a 16-bit file only for
    grayscale PNG/TIFF without alpha (uint8 data is scaled by 257); PIL cannot write 16-bit
    colour or 16-bit gray+alpha, so those are saved as 8-bit.
    """
    path = Path(path)
    fmt = (format or _FORMATS.get(path.suffix.lower(), "")).upper()
    fmt = {"JPG": "JPEG", "TIF": "TIFF"}.get(fmt, fmt)
    if not fmt:
        raise ImageError(f"{path}: unknown image extension — use one of "
                         f"{', '.join(IMAGE_EXTENSIONS)} or pass a format")
    im = _to_pil(rgb, alpha if fmt in _ALPHA_FORMATS else None, bit_depth, fmt)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A name `clear_stale_temps` recognises, so a rerun removes what a killed run left.
        with atomic_path(path, temp_name(path.name)) as tmp:
            # The umask decides the rest (mkstemp would force 0o600); never world-writable.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o664)
            with os.fdopen(fd, "wb") as f:
                data = _png_bytes(im) if fmt == "PNG" else None
                if data is None:
                    im.save(f, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
                else:
                    f.write(data)
    except OSError as e:
        raise ImageError(f"{path}: cannot write ({_one_line(e)}) — check free disk space "
                         "and folder permissions") from e




def is_temp_name(name: str) -> bool:
    """True for exactly the names `save_image` gives its temp files (an image name, or its
    first 200 bytes, between a dot and `.<8 hex>.tmp`), so a cleanup removes nothing else."""
    m = TEMP_NAME.fullmatch(name)
    if m is None:
        return False
    stem = m.group(1)
    return _is_image_name(stem) or len(os.fsencode(stem)) == TEMP_STEM_BYTES


def clear_stale_temps(folders: set[Path]) -> int:
    """Delete the temp files a killed `save_image` left in `folders` (not recursive); returns
    how many. Run before writing, so a rerun leaves no hidden litter behind the killed run."""
    removed = 0
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not created yet, or unreadable: nothing of ours to clear there
            continue
        for entry in entries:
            with contextlib.suppress(OSError):
                if is_temp_name(entry.name) and entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def _png_bytes(im: Image.Image) -> bytes | None:
    """An 8-bit gray, RGB or RGBA image as PNG bytes from OpenCV's libpng with zlib's RLE
    strategy: 3.1 ms for a 256x256 RGB image where PIL's encoder takes 9.4 ms (5.3 with RLE),
    files as small (a 256 px photo-like test image: 131.5 KB, PIL 135.2 KB). The same pixels;
    None for the modes it does not write (gray+alpha, 16-bit), which PIL writes."""
    if im.mode not in ("L", "RGB", "RGBA"):
        return None
    import cv2  # here: ~0.1 s of import that only PNG writes need

    pixels = np.asarray(im)
    if im.mode != "L":  # OpenCV's channel order: BGR(A)
        pixels = pixels[..., [2, 1, 0, 3][:pixels.shape[2]]]
    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE])
    return buf.tobytes() if ok else None


def _to_pil(rgb: np.ndarray, alpha: np.ndarray | None, bit_depth: int, fmt: str) -> Image.Image:
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    if rgb.ndim != 3 or rgb.shape[2] not in (1, 3):
        raise ValueError(f"expected HxWx1 or HxWx3 pixels, got shape {rgb.shape}")
    if alpha is not None and alpha.shape != rgb.shape[:2]:
        raise ValueError(f"alpha shape {alpha.shape} does not match pixels {rgb.shape[:2]}")
    gray = rgb.shape[2] == 1
    if bit_depth == 16 and gray and alpha is None and fmt in ("PNG", "TIFF"):
        wide = rgb[..., 0].astype(np.uint16) * 257 if rgb.dtype == np.uint8 else rgb[..., 0]
        return Image.fromarray(np.ascontiguousarray(wide, dtype=np.uint16))  # mode "I;16"
    if rgb.dtype == np.uint16:
        rgb = np.rint(rgb / 257.0).astype(np.uint8)
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected uint8 or uint16 pixels, got {rgb.dtype}")
    planes = rgb if alpha is None else np.concatenate([rgb, alpha.astype(np.uint8)[..., None]], 2)
    # fromarray picks L / LA / RGB / RGBA from the channel count.
    return Image.fromarray(np.ascontiguousarray(planes[..., 0] if gray and alpha is None
                                                else planes))


# ---------------------------------------------------------------------------- tensors


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HxWxC (or HxW) uint8 -> 1xCxHxW float32 in [-1, 1]."""
    if img.ndim == 2:
        img = img[..., None]
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).unsqueeze(0)
    return t.float().div_(127.5).sub_(1.0)


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """NCHW or CHW float in [-1, 1] (clamped, rounded) -> NxHxWxC or HxWxC uint8."""
    t = t.detach().float().clamp(-1.0, 1.0).add(1.0).mul_(127.5).round_().to(torch.uint8)
    perm = (1, 2, 0) if t.dim() == 3 else (0, 2, 3, 1)
    return t.permute(*perm).contiguous().cpu().numpy()
