"""Pictures for people: image grids and 2-D scatter plots as uint8 arrays (no plotting library)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor


def to_rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at `px` pixels (no font file needed)."""
    try:
        return ImageFont.load_default(size=px)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def grid(rows: list[Tensor], pad: int = 2, labels: list[str] | None = None,
         gap_after: int | None = None) -> np.ndarray:
    """Rows of NCHW images in [-1, 1] (same C, H, W; rows may hold different numbers of
    images) -> one HxWx3 uint8 picture on white. `labels`: one text per row, in a margin on
    the left; `gap_after`: a wider gap after that many columns (e.g. a mean and its samples)."""
    rows = [to_rgb(r.detach().float().cpu()) for r in rows]
    h, w = rows[0].shape[2:]
    cols = max(len(r) for r in rows)
    gap = [pad + (3 * pad if j == gap_after else 0) for j in range(cols)]
    left = [pad + sum(gap[1:j + 1]) + j * w for j in range(cols)]
    out = torch.ones(3, len(rows) * (h + pad) + pad, left[-1] + w + pad)
    for i, r in enumerate(rows):
        y = pad + i * (h + pad)
        for j in range(len(r)):
            out[:, y : y + h, left[j] : left[j] + w] = r[j]
    img = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return img if labels is None else _label_rows(img, labels, h, pad)


def _label_rows(img: np.ndarray, labels: list[str], h: int, pad: int) -> np.ndarray:
    """The picture with a white margin on its left holding labels[i] beside row i."""
    face = font(max(9, min(14, h // 2)))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(int(probe.textlength(t, font=face)) for t in labels) + 3 * pad
    canvas = Image.new("RGB", (img.shape[1] + margin, img.shape[0]), "white")
    canvas.paste(Image.fromarray(img), (margin, 0))
    d = ImageDraw.Draw(canvas)
    for i, text in enumerate(labels):
        d.text((margin - pad, pad + i * (h + pad) + h / 2), text, fill=(20, 20, 20), font=face,
               anchor="rm")
    return np.asarray(canvas)


def square_grid(images: Tensor, columns: int) -> np.ndarray:
    """N images -> rows of `columns` images."""
    n = images.shape[0] // columns * columns
    return grid(list(images[:n].reshape(-1, columns, *images.shape[1:])))


def scatter(points: Tensor, modes: Tensor | None = None, size: int = 512, extent: float = 0.0
            ) -> np.ndarray:
    """2-D samples as black dots on white, true modes as red crosses."""
    pts = points.detach().float().cpu().numpy()
    ref = modes.detach().float().cpu().numpy() if modes is not None else pts
    lim = extent or float(np.abs(ref).max()) * 1.5 + 1e-6
    img = np.full((size, size, 3), 255, dtype=np.uint8)

    def pix(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ij = ((p / lim + 1) * 0.5 * (size - 1)).round().astype(int)
        keep = (ij >= 0).all(1) & (ij < size).all(1)
        return ij[keep, 0], (size - 1) - ij[keep, 1]

    x, y = pix(pts)
    img[y, x] = (30, 30, 30)
    if modes is not None:
        mx, my = pix(ref)
        for d in range(-4, 5):
            img[np.clip(my + d, 0, size - 1), mx] = (220, 30, 30)
            img[my, np.clip(mx + d, 0, size - 1)] = (220, 30, 30)
    return img
