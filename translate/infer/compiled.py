"""Compiled inference: the torch generator through torch.compile (inductor) with freezing.

Freezing folds the weights into the compiled graph as constants, so inductor prepacks them for
oneDNN once and fuses the norm, activation and padding code between the convolutions; on a
CPU with native bf16 the ResNet-9 generator runs ~2x faster than eager bf16 (bench/speed.py).
The price is a warm-up: one compile per input shape, 10-40 s on a 2-core CPU (less when
inductor's on-disk cache already holds the graph).

So the shapes are kept few: images run one at a time (batch 1 is also the fastest shape on a
CPU: no recompile for a last, smaller batch), and at most MAX_SIZES padded sizes are compiled,
or only the `sizes` chosen (`translate apply --compile auto` picks the sizes that hold enough
pixels to repay a compile); every other size runs eager, as it would without --compile.
Padding images further, to a few size buckets, was tried and dropped: per-image norm layers
(instance norm) then average over the mirrored margin too, and a ResNet's output moved by ~5
grey levels on average for a 300x260 image padded to 320x288 (the test suite's small
ResNet).

Two things make the compiled graph fast, each measured on a 2-core Xeon with AMX (ResNet-9,
256 px, bf16, batch 1):
- freezing must be on while dynamo traces, not only inside inductor: passed as
  `torch.compile(options={"freezing": True})` alone, dynamo has already lifted the weights to
  graph inputs, nothing is folded and every call re-lays the conv weights out (11.8 img/s); with
  `torch._inductor.config.freezing` set around the call the weights are prepacked once for
  oneDNN (12.5 img/s);
- instance norm as sums: inductor computes `var_mean` with Welford updates (a division per
  element): its fused norm/ReLU/padding kernels took ~21 ms of a 74 ms image, ~14 ms as sums
  (the convolutions, ~50 ms, run at the bf16 GEMM rate already); the compiled copy's InstanceNorm2d layers are swapped for
  `SumInstanceNorm` (the same statistics from the sums of x - s and (x - s)^2 in fp32, s one
  sample of each channel so a large mean costs no precision): 13.6 img/s.

On a CPU with 2 or more torch threads, images run in two lanes (translate/infer/lanes.py),
each with its share of the threads; translate_folder hands a lane whole images (decode,
generator, encode). The graph is compiled in a lane, so its kernels use a lane's threads, and
with inductor's C++ wrapper (`cpp_wrapper`): the Python-bound kernels of the default wrapper
hold the GIL while they run, so two lanes' norm kernels would take turns. The same machine,
end to end through translate_folder: 12.7 img/s with one image at a time on both cores, 13.4
in two lanes, 15.6 in two lanes with the C++ wrapper. Calls from outside a lane (the Python
API) split a batch over the lanes; a single image runs in the calling thread (the inductor
kernels on one thread, the convolutions on all: 14.0 img/s for the generator alone, 16.1 on
batches of 4).

Runs also fall back to eager where a compiled graph would be wrong or cannot be made: tiled
runs of norm nets (translate/infer/tiling.py patches the norm layers to whole-image statistics, which
a frozen graph would not see), and a compile that fails (e.g. no C++ compiler: one warning).
"""

from __future__ import annotations

import copy
import functools
import itertools
import threading
import warnings
from collections.abc import Callable, Collection
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from translate.infer.lanes import LanePool
from translate.infer.nnpack import set_in_graphs
from translate.infer.tiling import ModelInfo, Tile, norm_layers, per_image_norm, tile_side

Forward = Callable[[torch.Tensor], torch.Tensor]
MAX_SIZES = 8  # compiled shapes per generator (room is made for them in the recompile limit)
# `translate apply --compile auto` compiles an image size when its images hold at least this
# many pixels. Measured on a 2-core Xeon with AMX, ResNet-9 at 256x256 px: a compile takes 10-40
# s and saves ~1 s per megapixel in bf16 (~2 s in fp32), so 16 megapixels (250 images of
# 256x256 px, 16 of 1024x1024) repay the slowest warm-up.
AUTO_MIN_PIXELS = 16_000_000
# The same where eager runs its large convolutions on NNPACK (translate/infer/nnpack.py), which
# leaves a compile less to gain. Measured on a 2-core AMD EPYC (AVX2), the same net: 2.81 img/s
# eager, 3.32 compiled, 23 s of compile, so a compile saves 0.84 s per megapixel and repays
# itself from ~27 megapixels (420 images of 256x256 px).
AUTO_MIN_PIXELS_NNPACK = 28_000_000


class CompiledForward:
    """A batch function like the eager `forward` it wraps, running each image through a frozen
    torch.compile graph of `net`. `net` is the module to compile (the eager one, or a bf16
    copy); `eager` runs whatever is not compiled. `sizes`: the (h, w) input sizes (padded to
    the size multiple) to compile, None for any (the first MAX_SIZES met)."""

    def __init__(self, eager: Forward, net: nn.Module, info: ModelInfo, dtype: torch.dtype,
                 device: torch.device, sizes: Collection[tuple[int, int]] | None = None) -> None:
        self.eager = eager
        self.info, self.dtype, self.device = info, dtype, device
        self.sizes = None if sizes is None else set(sizes)
        self.seen: set[tuple[int, int]] = set()
        self.failed: str | None = None
        self._norms = norm_layers(eager)
        self.compiled_net = net
        # Imported here: it adds ~1 s to `translate apply`'s start, needed only when compiling.
        import torch._inductor.config as inductor_config

        self._inductor_config = inductor_config
        _room_for_more_graphs()
        self._graph = torch.compile(net, dynamic=False)
        self._compiling = threading.Lock()
        # Images run side by side, each on its share of the cores (translate/infer/lanes.py);
        # translate_folder runs whole images (decode, generator, encode) in these lanes.
        self.lanes: LanePool | None = getattr(eager, "lanes", None)

    @property
    def net(self) -> nn.Module | None:
        """The eager module (tiling looks for its norm layers here)."""
        return getattr(self.eager, "net", None)

    def _runs_compiled(self, h: int, w: int) -> bool:
        if self.failed or any("forward" in m.__dict__ or m._forward_hooks for m in self._norms):
            return False  # tiling patched or hooked the norm layers: only eager follows that
        if self.sizes is not None:
            return (h, w) in self.sizes
        return (h, w) in self.seen or len(self.seen) < MAX_SIZES

    def compiles(self, h: int, w: int) -> bool:
        """Will a call on h x w inputs compile a new graph first (the slow warm-up)?"""
        return self._runs_compiled(h, w) and (h, w) not in self.seen

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        if not self._runs_compiled(h, w):
            return self.eager(x)
        layout = getattr(self.eager, "memory_format", torch.channels_last)
        xs = [xi.to(self.device, self.dtype).contiguous(memory_format=layout)
              for xi in x.split(1)]
        calls = [functools.partial(self._one, xi, h, w) for xi in xs]
        try:
            if self.lanes is None or len(calls) == 1 and (h, w) in self.seen:
                ys = [call() for call in calls]  # one image: here, convolutions on all threads
            elif (h, w) in self.seen:
                ys = self.lanes.run(calls)
            else:  # the first alone: it compiles
                ys = self.lanes.run(calls[:1]) + self.lanes.run(calls[1:])
        except Exception as e:  # noqa: BLE001 - inductor raises many kinds (compiler missing...)
            self.failed = " ".join(str(e).split())[:200]
            warnings.warn(f"torch.compile failed, running eager instead: {self.failed}",
                          RuntimeWarning, stacklevel=2)
            return self.eager(x)
        self.seen.add((h, w))
        return torch.cat(ys).float()

    def _one(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """One image; compiled first if its size is new. One compile at a time (lanes may
        meet a new size together): inductor's config is process-wide. Freezing must be on
        while dynamo traces too, and the kernels take the calling thread's torch thread count
        (a lane's share; set explicitly, so it is part of inductor's cache key)."""
        with torch.no_grad():
            if (h, w) in self.seen:
                return self._graph(x)
            options = {"freezing": True}
            if self.device.type == "cpu":  # the C++ wrapper releases the GIL for the lanes
                options.update({"cpp_wrapper": True, "cpp.threads": torch.get_num_threads()})
            with self._compiling, self._inductor_config.patch(options):
                return self._graph(x)


_forwards_made = itertools.count(1)


def _room_for_more_graphs() -> None:
    """All generators of a class run one forward function, so all their graphs count against
    that function's torch.compile recompile limit (8 by default): past it, a new size or a
    second generator in the process would run eager without a word. Room for MAX_SIZES each."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, MAX_SIZES * next(_forwards_made))


def compile_forward(eager, info: ModelInfo,
                    sizes: Collection[tuple[int, int]] | None = None) -> CompiledForward:
    """The compiled counterpart of a torch backend forward (translate.export.TorchForward: its
    `net`, `precision` and `device`). It compiles a copy of the net with its instance norms as
    sums (SumInstanceNorm); bf16 casts that copy's weights rather than using autocast: the
    frozen graph then holds bf16 constants and casts nothing per call (a little faster, the
    same outputs)."""
    dtype = torch.bfloat16 if eager.precision == "bf16" else torch.float32
    net = with_sum_norms(copy.deepcopy(eager.net)).to(dtype)
    # NNPACK layers (fp32 on some CPUs) go into the graphs where these run on one thread: in
    # lanes of one thread each, as on 2 cores (translate/infer/nnpack.py).
    lanes = getattr(eager, "lanes", None)
    set_in_graphs(net, (lanes.threads_each if lanes else torch.get_num_threads()) == 1)
    return CompiledForward(eager, net, info, dtype, eager.device, sizes)


class SumInstanceNorm(nn.Module):
    """InstanceNorm2d without running statistics, computed from plain sums in fp32 so that
    inductor emits two vectorised reductions instead of Welford updates. `s`, the first pixel
    of each channel, is subtracted first: var = E[(x-s)^2] - E[x-s]^2 then loses no precision
    when a channel's mean is large against its spread."""

    def __init__(self, norm: nn.InstanceNorm2d) -> None:
        super().__init__()
        self.eps = norm.eps
        self.weight, self.bias = norm.weight, norm.bias  # None unless affine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        d = xf - xf[:, :, :1, :1]
        mean_d = d.mean((2, 3), keepdim=True)
        var = ((d * d).mean((2, 3), keepdim=True) - mean_d * mean_d).clamp_min(0)
        y = (d - mean_d) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight.float()[:, None, None] + self.bias.float()[:, None, None]
        return y.to(x.dtype)


def with_sum_norms(net: nn.Module) -> nn.Module:
    """`net` with each InstanceNorm2d that normalises by the image's own statistics replaced,
    in place, by a SumInstanceNorm."""
    for name, child in net.named_children():
        if isinstance(child, nn.InstanceNorm2d) and per_image_norm(child):
            setattr(net, name, SumInstanceNorm(child))
        else:
            with_sum_norms(child)
    return net


EXIF_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that load_image turns by 90 degrees


def image_sizes(paths: list[Path], resize: int | None) -> list[tuple[int, int]]:
    """(h, w) of each image as apply will see it, from its header: EXIF rotation, then
    `resize`. Unreadable files are left out (the run reports them)."""
    out = []
    for path in paths:
        try:
            with warnings.catch_warnings(), Image.open(path) as im:
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                w, h = im.size
                if im.getexif().get(0x0112) in EXIF_TRANSPOSED:
                    w, h = h, w
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        if resize is not None:
            scale = resize / max(h, w)
            h, w = max(1, round(h * scale)), max(1, round(w * scale))
        out.append((h, w))
    return out


def sizes_worth_compiling(sizes: list[tuple[int, int]], info: ModelInfo,
                          tile: Tile = "auto", min_pixels: int | None = None,
                          nnpack: bool = False) -> list[tuple[int, int]]:
    """The padded sizes (at most MAX_SIZES, largest first) whose images, run whole, hold at
    least `min_pixels` pixels (by default AUTO_MIN_PIXELS, or AUTO_MIN_PIXELS_NNPACK where eager
    runs on NNPACK): where a compile repays its warm-up (`--compile auto`)."""
    if min_pixels is None:
        min_pixels = AUTO_MIN_PIXELS_NNPACK if nnpack else AUTO_MIN_PIXELS
    pixels: dict[tuple[int, int], int] = {}
    for h, w in sizes:
        if tile_side(tile, info, h, w) is not None:
            continue  # tiled: norm nets run those eager anyway
        key = (info.padded(h), info.padded(w))
        pixels[key] = pixels.get(key, 0) + h * w
    chosen = sorted((p, k) for k, p in pixels.items() if p >= min_pixels)[::-1]
    return [k for _, k in chosen[:MAX_SIZES]]
