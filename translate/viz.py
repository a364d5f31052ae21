"""Pictures for people: image grids and 2-D scatter plots as uint8 arrays (no plotting library)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def to_rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def grid(rows: list[Tensor], pad: int = 2) -> np.ndarray:
    """Rows of NCHW images in [-1, 1] (same N, H, W) -> one HxWx3 uint8 picture."""
    rows = [to_rgb(r.detach().float().cpu()) for r in rows]
    n, _, h, w = rows[0].shape
    out = torch.ones(3, len(rows) * (h + pad) + pad, n * (w + pad) + pad)
    for i, r in enumerate(rows):
        for j in range(n):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[:, y : y + h, x : x + w] = r[j]
    img = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return img.permute(1, 2, 0).numpy()


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
