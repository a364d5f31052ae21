"""Running a generator on images of any size: mirror padding to the size multiple (and the
minimum size), batching of equal padded sizes, and seamless overlapping tiles for large images.

Pure tensor code, shared by `translate apply` (translate/infer.py), `load_generator`'s callable
(translate/export.py) and `translate eval`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from translate.errors import ModelError

Generator = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelInfo:
    """What the engine must know about a generator."""

    in_channels: int  # channels the generator reads: 1 (gray) or 3 (RGB)
    out_channels: int  # channels it writes: 1 or 3
    size_multiple: int  # H and W fed to it must be multiples of this (2 ** downsamplings)
    min_size: int = 1  # and at least this large (ResNet: reflection padding at the bottleneck)

    def padded(self, n: int) -> int:
        """The size an image side of n pixels is padded to before the generator runs."""
        m = self.size_multiple
        return max(-(-n // m) * m, -(-self.min_size // m) * m)



def translate_tensor(fn: Generator, info: ModelInfo, x: torch.Tensor, *, tile: int | None = None,
                     overlap: int = 32, batch_size: int = 4) -> torch.Tensor:
    """NCHW float in [-1, 1] (or uint8 in [0, 255]) -> float NCHW output of the same H and W,
    not clamped. uint8 input is converted one batch of tiles at a time, which keeps the memory
    of tiled runs small.

    Images larger than `tile` (rounded up to size_multiple) in either dimension are translated
    in overlapping tiles, `batch_size` tiles at a time, so memory is bounded by the tile size.
    """
    tile = None if tile is None else -(-tile // info.size_multiple) * info.size_multiple
    with torch.inference_mode():
        if tile is None or max(x.shape[2:]) <= tile:
            return torch.cat(_run_padded(fn, info, list(x.split(1))))
        return torch.cat([_run_tiled(fn, info, xi, tile, overlap, batch_size)
                          for xi in x.split(1)])


def _run_padded(fn: Generator, info: ModelInfo, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run 1xCxhxw images whose sizes round up to the same multiple as one batch."""
    hp, wp = (info.padded(max(x.shape[2] for x in xs)), info.padded(max(x.shape[3] for x in xs)))
    batch = torch.cat([_mirror_pad(x, hp, wp) for x in xs])
    if batch.dtype == torch.uint8:
        batch = batch.float().div_(127.5).sub_(1.0)  # the same arithmetic as images.to_tensor
    y = fn(batch)
    if y.shape[0] != batch.shape[0] or y.shape[2:] != batch.shape[2:]:
        raise ModelError(f"the generator turned a {tuple(batch.shape)} batch into "
                         f"{tuple(y.shape)} — it must keep N, H and W (an image-to-image model)")
    if y.shape[1] != info.out_channels:
        raise ModelError(f"the generator made {y.shape[1]} channels, its description says "
                         f"{info.out_channels} — re-export the model")
    y = y.detach().float().cpu()
    return [y[i:i + 1, :, :x.shape[2], :x.shape[3]] for i, x in enumerate(xs)]


def _mirror_pad(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    """Reflect-pad bottom/right to hp x wp; reflects repeatedly when the pad exceeds the image
    (1x1 or 3000x17 inputs), where torch's reflect mode would refuse."""
    h, w = x.shape[2:]
    if (h, w) == (hp, wp):
        return x
    return x.index_select(2, _mirror_index(h, hp)).index_select(3, _mirror_index(w, wp))


def _mirror_index(n: int, size: int) -> torch.Tensor:
    i = torch.arange(size)
    if n == 1:
        return torch.zeros(size, dtype=torch.long)
    period = 2 * (n - 1)
    j = i % period
    return torch.where(j < n, j, period - j)


def _run_tiled(fn: Generator, info: ModelInfo, x: torch.Tensor, tile: int, overlap: int,
               batch_size: int) -> torch.Tensor:
    """Translate one 1xCxHxW image tile by tile and blend the tiles into a float canvas."""
    _, _, h, w = x.shape
    overlap = max(0, min(overlap, tile // 2))
    th, tw = min(tile, h), min(tile, w)
    boxes = [(y0, x0) for y0 in _starts(h, th, overlap) for x0 in _starts(w, tw, overlap)]
    out = weight_sum = None
    for k in range(0, len(boxes), batch_size):
        chunk = boxes[k:k + batch_size]
        ys = _run_padded(fn, info, [x[..., y0:y0 + th, x0:x0 + tw] for y0, x0 in chunk])
        if out is None:
            out = torch.zeros(1, ys[0].shape[1], h, w)
            weight_sum = torch.zeros(1, 1, h, w)
        for (y0, x0), y in zip(chunk, ys):
            wgt = _axis_weights(y0, th, h, overlap)[:, None] * _axis_weights(x0, tw, w, overlap)
            out[..., y0:y0 + th, x0:x0 + tw] += y * wgt
            weight_sum[..., y0:y0 + th, x0:x0 + tw] += wgt
    return out.div_(weight_sum)


def _starts(total: int, length: int, overlap: int) -> list[int]:
    if total <= length:
        return [0]
    return list(range(0, total - length, length - overlap)) + [total - length]


def _axis_weights(start: int, length: int, total: int, overlap: int) -> torch.Tensor:
    """Blend weights along one axis of a tile. On a side shared with a neighbour, the outer
    quarter of the overlap gets weight 0 (that is where zero padding inside the net corrupts
    tile edges) and the middle half a cosine cross-fade, so seams are invisible and a net
    whose receptive field is under overlap/4 gives exactly the untiled result."""
    w = torch.ones(length)
    if overlap == 0:
        return w
    margin = overlap // 4
    ramp_len = max(1, overlap - 2 * margin)
    rise = 0.5 - 0.5 * torch.cos(math.pi * (torch.arange(ramp_len) + 0.5) / ramp_len)
    # A side has a neighbour only when the axis holds several tiles, and then length == tile
    # >= 2 * overlap, so both ramps fit.
    if start > 0:
        w[:margin] = 0.0
        w[margin:margin + ramp_len] *= rise
    if start + length < total:
        w[length - margin:] = 0.0
        w[length - margin - ramp_len:length - margin] *= rise.flip(0)
    return w
