"""Running a generator on images of any size: mirror padding to the size multiple (and the
minimum size), batching of equal padded sizes, and seamless overlapping tiles for large images.

Pure tensor code, shared by `translate apply` (translate/infer.py), `load_generator`'s callable
(translate/export.py) and `translate eval`.

Tiling nets with per-image normalisation (InstanceNorm, GroupNorm/LayerNorm: the ResNet and
U-Net generators): each tile would otherwise be normalised by its own statistics, so tiles of
a sky and of a forest come out in different tones and the seams show. When the generator is an
`nn.Module`, or a callable with a `.net` module (the torch backend of `load_generator`), the
net first runs once on a copy of the whole image scaled down to the pixels of one tile batch,
recording every such norm layer's per-channel mean and variance; all tiles are then normalised
with those frozen statistics, so they are normalised alike and blend without seams. A callable
with a `norm_stats` attribute (NormStats: the ONNX backend with its `.tiles.onnx` companion,
translate/infer/onnx.py) measures and freezes the statistics its own way. Nets without such
layers, and other opaque callables, run tiles as they are.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from translate.errors import ModelError

Generator = Callable[[torch.Tensor], torch.Tensor]
Tile = int | Literal["auto"] | None  # a tile side in pixels; "auto": AUTO_TILE for large images
AUTO_TILE = 512  # the tile side "auto" picks: ResNet-9 activations of 4 such tiles fit in ~1 GB
AUTO_TILE_ABOVE = 1024 * 1024  # "auto" tiles images with more pixels than this
# Pixels shared by neighbouring tiles. Tile edges are wrong as far as the net sees (padding
# inside it). Max error vs untiled (of 2.0) at tile 512, overlap 32 / 64 / 96: random-init
# ResNet-9 (ngf 8) 0.65 / 0.07 / 0.009; trained 3-block ResNet 0.11 / 0.004 / 0.0001; trained
# 4-level U-Net 1.09 / 0.15 / 0.009. Deeper U-Nets see further still and want 96-128.
DEFAULT_OVERLAP = 64


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


def tile_side(tile: Tile, info: ModelInfo, h: int, w: int) -> int | None:
    """The tile side (a multiple of size_multiple) an h x w image is translated in, or None
    when it runs whole: tile None or 0 never tiles, "auto" tiles images above AUTO_TILE_ABOVE
    pixels, and an image that fits in one tile runs whole anyway."""
    if tile == "auto":
        tile = AUTO_TILE if h * w > AUTO_TILE_ABOVE else None
    if not tile:
        return None
    side = -(-tile // info.size_multiple) * info.size_multiple
    return side if max(h, w) > side else None


def translate_tensor(fn: Generator, info: ModelInfo, x: torch.Tensor, *, tile: Tile = None,
                     overlap: int = DEFAULT_OVERLAP, batch_size: int = 4) -> torch.Tensor:
    """NCHW float in [-1, 1] (or uint8 in [0, 255]) -> float NCHW output of the same H and W,
    not clamped. uint8 input is converted one batch of tiles at a time, which keeps the memory
    of tiled runs small.

    Images larger than `tile` (rounded up to size_multiple) in either dimension are translated
    in overlapping tiles, `batch_size` tiles at a time, so memory is bounded by the tile size;
    per-image norm layers get whole-image statistics (see the module docstring).
    """
    side = tile_side(tile, info, *x.shape[2:])
    with torch.inference_mode():
        if side is None:
            return torch.cat(_run_padded(fn, info, list(x.split(1))))
        return torch.cat([_run_tiled(fn, info, xi, side, overlap, batch_size)
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
    """Translate one 1xCxHxW image tile by tile and blend the tiles into a float canvas.

    The tiles cover the image mirror-padded to the size multiple, as the untiled run sees it,
    and the canvas is cropped back: tiles cut from the bare image would end at its last pixel,
    where the untiled net sees mirrored pixels, and the right and bottom edges came out
    differently (a trained U-Net, 470 px wide: 2.1 grey levels on average over the last 40
    columns, 5x the interior's, and up to 42).
    """
    h, w = x.shape[2:]
    x = _mirror_pad(x, info.padded(h), info.padded(w))
    source = norm_stats(fn)
    if source is None:
        return _blend(fn, info, x, tile, overlap, batch_size)[..., :h, :w]
    stats, whole = _overview(fn, info, x, source, batch_size * tile * tile)
    if whole is not None:  # it fitted in the memory of one batch of tiles: exact result
        return whole[..., :h, :w]
    with source.frozen(stats):
        return _blend(fn, info, x, tile, overlap, batch_size)[..., :h, :w]


def _blend(fn: Generator, info: ModelInfo, x: torch.Tensor, tile: int, overlap: int,
           batch_size: int) -> torch.Tensor:
    _, _, h, w = x.shape
    overlap = max(0, min(overlap, tile // 2))
    th, tw = (tile_length(n, tile, overlap, info.size_multiple) for n in (h, w))
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


def tile_length(total: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The side of the tiles along an axis of `total` pixels: as few tiles as tiles of `tile`
    would need, each as short as covers the axis with `overlap` between neighbours (a multiple
    of `multiple`, at most `tile`). Tiles of the full side would reach past the image by up to
    a tile, and the last one overlap its neighbour by that much: computed twice. A 2000x1504
    image in tiles of 512, overlap 64: 5 x 4 tiles of 452 x 424 px (3.8 megapixels) instead of
    512 x 512 (5.2)."""
    if total <= tile:
        return total
    count = -(-(total - overlap) // (tile - overlap))
    length = -(-(total + (count - 1) * overlap) // count)
    return min(tile, -(-length // multiple) * multiple)


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


# ------------------------------------------------------------- whole-image norm statistics


def per_image_norm(m: nn.Module) -> bool:
    """Does `m` normalise each image by its own statistics (InstanceNorm2d without running
    stats, GroupNorm)?"""
    return isinstance(m, nn.GroupNorm) or (
        isinstance(m, nn.InstanceNorm2d) and (m.training or not m.track_running_stats))


def norm_layers(fn: Generator) -> list[nn.Module]:
    """The layers of `fn` (an nn.Module, or a callable with a `.net` module) that normalise
    each image by its own statistics (per_image_norm)."""
    net = fn if isinstance(fn, nn.Module) else getattr(fn, "net", None)
    if not isinstance(net, nn.Module):
        return []
    return [m for m in net.modules() if per_image_norm(m)]


class NormStats(Protocol):
    """Whole-image statistics of a generator's per-image norm layers, for tiling."""

    def measure(self, run: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """(the statistics the norm layers met during run(), run()'s result)."""

    def frozen(self, stats: Any) -> AbstractContextManager[None]:
        """Within the block the generator normalises every input with `stats`."""


@dataclass
class ModuleNormStats:
    """NormStats of torch norm layers: forward hooks record, patched forwards freeze."""

    norms: list[nn.Module]

    def measure(self, run: Callable[[], torch.Tensor]
                ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

        def record(module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor
                   ) -> None:
            seen[module] = _moments(module, args[0])

        hooks = [m.register_forward_hook(record) for m in self.norms]
        try:
            y = run()
        finally:
            for hook in hooks:
                hook.remove()
        if len(seen) < len(self.norms):
            raise ModelError(f"{len(self.norms) - len(seen)} norm layers of the generator never "
                             "ran; it cannot be tiled with whole-image statistics — use --tile 0")
        return [seen[m] for m in self.norms], y

    def frozen(self, stats: list[tuple[torch.Tensor, torch.Tensor]]
               ) -> AbstractContextManager[None]:
        return _frozen(self.norms, stats)


def norm_stats(fn: Generator) -> NormStats | None:
    """How tiling gets whole-image statistics for `fn`; None when it has nothing to freeze."""
    own = getattr(fn, "norm_stats", None)
    if own is not None:
        return own
    norms = norm_layers(fn)
    return ModuleNormStats(norms) if norms else None


def _overview(fn: Generator, info: ModelInfo, x: torch.Tensor, source: NormStats,
              max_pixels: int) -> tuple[Any, torch.Tensor | None]:
    """The statistics of the norm layers for the whole 1xCxHxW image, measured on a copy
    scaled down to at most `max_pixels` (the memory of one batch of tiles); and the output
    itself when no scaling was needed (then it is the exact untiled result)."""
    h, w = x.shape[2:]
    scale = math.sqrt(max_pixels / (h * w))
    if scale < 1.0:  # sides rounded to the size multiple: stretched a pixel, never padded
        size = (info.padded(round(h * scale)), info.padded(round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    stats, y = source.measure(lambda: _run_padded(fn, info, [x])[0])
    return stats, y if scale >= 1.0 else None


def _moments(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel of one image, as the layer itself would compute them."""
    c = x.shape[1]
    groups = module.num_groups if isinstance(module, nn.GroupNorm) else c
    flat = x[:1].float().reshape(groups, -1)
    mean, var = flat.mean(1), flat.var(1, unbiased=False)
    return mean.repeat_interleave(c // groups), var.repeat_interleave(c // groups)


@contextlib.contextmanager
def _frozen(norms: list[nn.Module], stats: list[tuple[torch.Tensor, torch.Tensor]]
            ) -> Iterator[None]:
    """Within the block each norm layer normalises every input with its recorded statistics.
    The layers are patched in place (and restored), so call sites need no changes."""
    try:
        for module, (mean, var) in zip(norms, stats):
            module.forward = functools.partial(_normalise, module, mean, var)
        yield
    finally:
        for module in norms:
            module.__dict__.pop("forward", None)


def _normalise(module: nn.Module, mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor
               ) -> torch.Tensor:
    # batch_norm in eval mode is exactly "normalise with given per-channel statistics", then
    # the layer's own affine weight and bias (None for the affine-free InstanceNorm).
    mean, var = mean.to(x.device), var.to(x.device)
    return F.batch_norm(x, mean, var, getattr(module, "weight", None),
                        getattr(module, "bias", None), training=False, eps=module.eps)
