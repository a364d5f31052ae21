"""NNPACK's convolutions (Winograd for 3x3 kernels, FFT for larger ones) for fp32 inference on
a CPU, where they beat oneDNN's direct convolutions. The rule of which convolutions it takes
(`available`, `pays`, `eligible`) is translate/nets/nnpack.py's, shared with training.

torch ships NNPACK but routes a convolution to it only for batches of 16 or more, and only
after oneDNN has declined it: at batch 1 it is never used. Measured on a 2-core AMD EPYC with
AVX2 only (fp32, one thread, as each of `translate apply`'s two lanes runs; ms per call, the
better of oneDNN's NCHW and channels_last against NNPACK):

| convolution | oneDNN | NNPACK |
|---|---:|---:|
| 3x3, 256 -> 256 channels, 64x64 px (the ResNet-9's blocks at 256 px) | 49.6 | 19.5 |
| 3x3, 256 -> 256, 32x32 | 13.0 | 8.0 |
| 3x3, 64 -> 64, 32x32 / 24x24 / 16x16 | 0.84 / 0.50 / 0.25 | 0.77 / 0.50 / 0.40 |
| 7x7, 64 -> 3, 256x256 px (the ResNet-9's last layer) | 42.8 | 21.3 |
| 3x3, 64 -> 3, 64x64 | 0.55 | 1.09 |
| 7x7, 3 -> 64, 256x256 | 14.2 | 13.3 |

So a convolution runs on NNPACK where it has at least MIN_CHANNELS input channels, and also at
least MIN_CHANNELS output channels or a kernel of 7 or more, with an output of at least
MIN_PIXELS pixels, stride 1, zero padding. The ResNet-9 at 256 px, end to end through
translate_folder (bench/speed.py, the same EPYC): 1.46 -> 2.81 img/s eager, 1.79 -> 3.32
compiled. Outputs move by ~0.0005 of a grey level on average (another order of float sums), at
most 1 level.

NNPACK runs on its own thread pool, made once per process by its first call with torch's
thread count at that moment. `sequential_pool` makes that call with one thread, so NNPACK then
runs each convolution on the thread that calls it: two lanes run side by side (a shared pool
would take their calls in turn). A caller with more threads than one (a lone image, the
whole-image statistics pass of a tiled one: translate/infer/lanes.py) would leave cores idle
in NNPACK, so there a convolution either runs on oneDNN, on all threads, or is cut into
horizontal strips, one per thread, each on NNPACK (`_strips`). ms per call on the same EPYC,
a 2-thread caller (oneDNN on both threads / NNPACK on one / NNPACK in 2 strips; the machine's
speed drifted by ~30% between runs):

| convolution | oneDNN | NNPACK | strips |
|---|---:|---:|---:|
| 3x3, 256 -> 256, 32x32 px | 11.3 | 15.8 | 22.2 |
| 3x3, 256 -> 256, 64x64 / 96x96 | 31.2 / 60.1 | 31.3 / 40.7 | 23.6 / 33.0 |
| 3x3, 256 -> 256, 256x256 (a 1024 px image's blocks) | 578.6 | 411.7 | 303.0 |
| 3x3, 128 -> 64, 64x64 / 128x128 | 3.7 / 14.1 | 4.2 / 15.3 | 5.1 / 14.3 |
| 3x3, 64 -> 64, 128x128 | 7.4 | 8.9 | 9.5 |
| 7x7, 64 -> 3, 128x128 / 512x512 | 11.3 / 200.5 | 5.4 / 81.3 | 6.1 / 87.6 |

So a caller with more threads runs a 7x7 (FFT) convolution on NNPACK on its own thread, cuts a
3x3 one into strips of at least STRIP_ROWS output rows where it has STRIP_WORK multiply-adds
per kernel tap or more, and leaves the rest to oneDNN. A compiled graph decides once, when it
is made (`in_graphs`).

The default (`pays`): fp32 on a CPU without AMX. Measured on two AMD EPYCs, 2 cores: one
with AVX2 only (above), and a Zen 4 with AVX-512 BF16, where oneDNN has AVX-512 kernels and
NNPACK still wins (one thread, ms: 3x3 256 -> 256 at 64x64 px 44.9 against 24.7, at 32x32 11.3
against 5.8; 7x7 64 -> 3 at 256x256 58.9 against 15.7; 3x3 64 -> 64 at 16x16 0.20 against
0.33, under MIN_PIXELS; the ResNet-9 at 256 px through translate_folder: 1.56 -> 2.98 img/s
eager). On a CPU with AMX (Intel Xeon, Sapphire Rapids+), where oneDNN's fp32 convolutions
run twice as fast as on the Zen 4 and `auto` computes in bf16 anyway, it was not measured and
is used only when asked for.
"""

from __future__ import annotations

import functools
import itertools
import threading
from concurrent.futures import ThreadPoolExecutor, wait

import torch
import torch.nn.functional as F
from torch import nn

from translate.nets.nnpack import (
    BIG_KERNEL,
    MIN_CHANNELS,
    available,
    eligible,
    output_size,
    pays,
    takes,
)

__all__ = ["MIN_CHANNELS", "NnpackConv2d", "available", "eligible", "pays", "set_in_graphs",
           "use_nnpack"]  # the rule (translate/nets/nnpack.py) with what inference adds

MIN_PIXELS = 32 * 32  # output pixels of one image
STRIP_ROWS = 32  # output rows of a strip, at least (a caller with several threads)
STRIP_WORK = 1 << 28  # output pixels x in x out channels: a 3x3 convolution worth cutting

_pool_lock = threading.Lock()
# threads that take strips beside the caller's own (made as needed, up to the caller's count)
_strip_threads = ThreadPoolExecutor(max_workers=256, thread_name_prefix="translate-strips",
                                    initializer=torch.set_num_threads, initargs=(1,))


@functools.cache
def sequential_pool() -> None:
    """Make NNPACK's process-wide thread pool with one thread, so it runs each convolution on
    its caller's thread (lanes side by side). Its first convolution makes the pool; once made,
    it stays."""
    with _pool_lock:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            torch._nnpack_spatial_convolution(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3),
                                              None, [0, 0])
        finally:
            torch.set_num_threads(threads)


@functools.cache
def register_op() -> None:
    """torch.ops.translate.nnpack_conv2d, an op torch.compile can put in a graph (torch's own
    NNPACK op has no shape function for its tracer). Registered by use_nnpack, not at import."""

    @torch.library.custom_op("translate::nnpack_conv2d", mutates_args=())
    def nnpack_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      padding: list[int]) -> torch.Tensor:
        return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, padding)

    @nnpack_conv2d.register_fake
    def _(x, weight, bias, padding):
        n, _, h, w = x.shape
        kh, kw = weight.shape[2:]
        return x.new_empty(n, weight.shape[0], h + 2 * padding[0] - kh + 1,
                           w + 2 * padding[1] - kw + 1)


class NnpackConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state dict) that runs on NNPACK where that pays: fp32
    on a CPU, no gradient, no autocast, an output of MIN_PIXELS or more, and a caller with one
    thread (eager) or `in_graphs` (while torch.compile traces it); with more threads, in
    strips or on the caller's thread where that beats oneDNN (see the module's docstring)."""

    in_graphs: bool = False  # compiled graphs use NNPACK (they run in one-thread lanes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = output_size(self, x)
        pixels = rows * cols
        plain = (pixels < MIN_PIXELS or not takes(x)
                 or torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        threads = 0 if plain else self._threads(rows, pixels)
        if threads == 0:
            return super().forward(x)
        if threads == 1:
            return torch.ops.translate.nnpack_conv2d(x, self.weight, self.bias,
                                                     list(self.padding))
        return _strips(x, self.weight, self.bias, self.padding, rows, threads)

    def _threads(self, rows: int, pixels: int) -> int:
        """How many threads run this call on NNPACK, one strip each; 0: oneDNN runs it."""
        if torch.compiler.is_compiling():
            return 1 if self.in_graphs else 0
        threads = torch.get_num_threads()
        if threads == 1 or min(self.kernel_size) >= BIG_KERNEL:
            return 1  # a lane's thread; or FFT, where strips gained nothing
        if pixels * self.in_channels * self.out_channels < STRIP_WORK:
            return 0  # oneDNN, on all threads
        return min(threads, rows // STRIP_ROWS)


def _strips(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            padding: tuple[int, int], rows: int, count: int) -> torch.Tensor:
    """The convolution (`rows` output rows) in `count` horizontal strips of its output, side by
    side: the first on this thread, the others on helper threads, each on NNPACK (its pool
    runs on the caller). The strips' inputs are cut here, on all of this thread's threads."""
    (ph, pw), k, height = padding, weight.shape[2], x.shape[2]
    cuts = [rows * i // count for i in range(count + 1)]
    parts = []
    for top, end in itertools.pairwise(cuts):
        # Output rows top:end read padded input rows top:end + k - 1, rows lo:hi of x; the
        # zero rows of the padding that fall in them are added here.
        lo, hi = top - ph, end + k - 1 - ph
        part = x[:, :, max(lo, 0):min(hi, height)]
        parts.append(F.pad(part, [pw, pw, max(-lo, 0), max(hi - height, 0)]).contiguous())
    helpers = [_strip_threads.submit(_conv, part, weight, bias) for part in parts[1:]]
    try:
        first = _conv(parts[0], weight, bias)
    finally:
        wait(helpers)  # no strip left running, also after an error here
    return torch.cat([first, *(h.result() for h in helpers)], 2)


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.translate.nnpack_conv2d(x, weight, bias, [0, 0])


def use_nnpack(net: nn.Module) -> int:
    """Swap, in place, each of `net`'s eligible nn.Conv2d for an NnpackConv2d holding the same
    parameters; returns how many. Makes NNPACK's pool sequential first."""
    sequential_pool()
    register_op()
    found = [(parent, name, child) for parent in net.modules()
             for name, child in parent.named_children() if eligible(child)]
    for parent, name, child in found:
        setattr(parent, name, _swapped(child))
    return len(found)


def _swapped(conv: nn.Conv2d) -> NnpackConv2d:
    new = NnpackConv2d(conv.in_channels, conv.out_channels, conv.kernel_size,
                       padding=conv.padding, bias=conv.bias is not None, device="meta")
    new.weight, new.bias = conv.weight, conv.bias
    new.train(conv.training)
    return new


def set_in_graphs(net: nn.Module, on: bool) -> None:
    """Whether graphs compiled from `net` run its NnpackConv2d layers on NNPACK."""
    for m in net.modules():
        if isinstance(m, NnpackConv2d):
            m.in_graphs = on
