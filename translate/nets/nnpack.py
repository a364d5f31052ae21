"""NNPACK's convolutions (Winograd for 3x3 kernels, FFT for larger ones) on a CPU in fp32: the
rule of which convolutions it takes (`available`, `pays`, `eligible`), shared by inference
(translate/infer/nnpack.py), and the training convolution (`TrainConv2d`, `use_in_training`).

torch ships NNPACK but routes a convolution to it only for batches of 16 or more, and has no
NNPACK backward. Training here runs a convolution's forward and its input gradient on NNPACK
(the input gradient of a stride-1 convolution is the convolution of the output gradient with
the kernel flipped and transposed, zero-padded by kernel - 1 - padding), one image per call
(its inference path; measured faster than its batch path), and its weight and bias gradients
on oneDNN (NNPACK's kernel gradient is not in torch). Measured on a 2-core AMD EPYC with AVX2
only, fp32, 2 threads (NNPACK's pool made with torch's 2 threads), ms per call:

| convolution | forward: oneDNN / NNPACK | input gradient: oneDNN / NNPACK | weight gradient (oneDNN) |
|---|---:|---:|---:|
| 3x3, 256 -> 256, 64x64 px (the ResNet-9's blocks at 256 px) | 29.0 / 12.7 | 29.1 / 12.8 | 35.5 |
| 3x3, 256 -> 256, 32x32 (the blocks at 128 px) | 10.0 / 9.4 | 10.0 / 9.5 | 17.7 |
| 3x3, 128 -> 64, 128x128 | 18.4 / 13.4 | 18.6 / 9.6 | 25.5 |
| 7x7, 64 -> 3, 256x256 (the ResNet-9's last layer) | 45.6 / 13.4 | 37.0 / 9.8 | 33.3 |
| 4x4, 256 -> 512, 16x16 (the PatchGAN's; FFT) | 8.6 / 12.4 | | |

So training takes 3x3 and 7x7-or-wider kernels (not the PatchGAN's 4x4) whose output has at
least TRAIN_MIN_PIXELS pixels. A CycleGAN step of the paper's nets at 256 px, fp32, the same
EPYC, NNPACK against oneDNN in alternated steps of one process: 1.15-1.20x; at 128 px, where
the residual blocks convolve 32x32 maps, 1.05x. NNPACK's results do not depend on its thread
count (the same bits with 1 and 2 threads), so a run resumes exactly whichever pool it finds.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from translate import precision as cpu_precision

MIN_CHANNELS = 64  # input channels (and output channels, for kernels under 7x7)
BIG_KERNEL = 7  # kernels this wide run on NNPACK (FFT) whatever their output channels
TRAIN_MIN_SIDE = 48
TRAIN_MIN_PIXELS = TRAIN_MIN_SIDE**2  # output pixels of one image, for a training convolution


@functools.cache
def available() -> bool:
    """Whether this torch has NNPACK and it runs on this CPU. Its first call initialises
    NNPACK, which must happen before any NNPACK convolution (they fail otherwise)."""
    return bool(torch._nnpack_available())


def pays(device: torch.device, precision: str) -> bool:
    """The default: NNPACK for fp32 on a CPU, except where oneDNN runs AVX-512 kernels on a
    CPU with AMX (not measured there). With torch limited to AVX2 (ATEN_CPU_CAPABILITY=avx2),
    on any."""
    wide = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return (device.type == "cpu" and precision == "fp32" and available()
            and not (wide and cpu_precision.cpu_has_amx()))


def eligible(m: nn.Module) -> bool:
    """A plain convolution NNPACK runs and that it speeds up in inference (see
    translate/infer/nnpack.py's table)."""
    return (type(m) is nn.Conv2d and m.stride == (1, 1) and m.dilation == (1, 1)
            and m.groups == 1 and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
            and 3 <= min(m.kernel_size) and max(m.kernel_size) <= 16
            and _channels(m.in_channels, m.out_channels, m.kernel_size))


def _channels(cin: int, cout: int, kernel: tuple[int, ...]) -> bool:
    return cin >= MIN_CHANNELS and (cout >= MIN_CHANNELS or min(kernel) >= BIG_KERNEL)


def output_size(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    """(rows, columns) of a stride-1 convolution's output for the input `x`."""
    return (x.shape[-2] + 2 * conv.padding[0] - conv.kernel_size[0] + 1,
            x.shape[-1] + 2 * conv.padding[1] - conv.kernel_size[1] + 1)


def takes(x: torch.Tensor) -> bool:
    """Whether NNPACK can compute on `x`: fp32 on a CPU, outside autocast."""
    return (x.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


def for_training(choice: str, device: torch.device, precision: str) -> bool:
    """train.nnpack: whether a run's convolutions go to NNPACK. "auto": where `pays` (fp32 on
    a CPU without AMX); "on": fp32 on any CPU with NNPACK; "off": never. `precision` is the
    run's resolved autocast ("no" = fp32)."""
    fp32 = "fp32" if precision == "no" else precision
    if choice == "auto":
        return pays(device, fp32)
    return choice == "on" and device.type == "cpu" and fp32 == "fp32" and available()


def use_in_training(net: nn.Module) -> int:
    """Swap, in place, each of `net`'s convolutions that training runs on NNPACK (eligible,
    with a 3x3 or a 7x7-or-wider kernel) for a TrainConv2d holding the same parameters (the
    same state dict); returns how many."""
    found = [(parent, name, child) for parent in net.modules()
             for name, child in parent.named_children()
             if eligible(child) and (child.kernel_size[0] == child.kernel_size[1] == 3
                                     or min(child.kernel_size) >= BIG_KERNEL)]
    for parent, name, child in found:
        new = TrainConv2d(child.in_channels, child.out_channels, child.kernel_size,
                          padding=child.padding, bias=child.bias is not None, device="meta")
        new.weight, new.bias = child.weight, child.bias
        new.train(child.training)
        setattr(parent, name, new)
    return len(found)


class TrainConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, same state dict) whose forward and input gradient run on
    NNPACK where they pay (see the module's docstring): fp32 on a CPU, no autocast, not
    while torch.compile traces it (compiled graphs keep oneDNN's convolutions)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = output_size(self, x)
        if rows * cols < TRAIN_MIN_PIXELS or not takes(x) or torch.compiler.is_compiling():
            return super().forward(x)
        return _NnpackConv.apply(x, self.weight, self.bias, self.padding)


class _NnpackConv(torch.autograd.Function):
    """A stride-1, zero-padded convolution: forward on NNPACK; backward: the input gradient
    on NNPACK where that convolution pays (`_grad_on_nnpack`), the rest on oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding):
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.has_bias = tuple(padding), bias is not None
        return _per_image(x, weight, bias, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if want_x and _grad_on_nnpack(weight, x):
            (kh, kw), (ph, pw) = weight.shape[2:], ctx.padding
            flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
            grad_x, want_x = _per_image(grad, flipped, None, (kh - 1 - ph, kw - 1 - pw)), False
        if want_x or want_w or want_b:
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            gx, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad, x, weight, bias_sizes, [1, 1], list(ctx.padding), [1, 1], False, [0, 0],
                1, [want_x, want_w, want_b and ctx.has_bias])
            grad_x = gx if grad_x is None else grad_x
        return grad_x, grad_w, grad_b, None


def _grad_on_nnpack(weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether the input gradient's convolution (output channels -> input channels, an output
    the input's size) is one NNPACK takes in training: both sides wide, or a 7x7-or-wider
    kernel (FFT) with one side wide (7x7 64 -> 3: its input gradient, 3 -> 64, 9.8 ms where
    oneDNN's takes 37.0 at 256x256 px)."""
    cout, cin = weight.shape[:2]
    wide = min(cin, cout) >= MIN_CHANNELS or \
        min(weight.shape[2:]) >= BIG_KERNEL and max(cin, cout) >= MIN_CHANNELS
    return wide and x.shape[-2] * x.shape[-1] >= TRAIN_MIN_PIXELS


def _per_image(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              padding) -> torch.Tensor:
    """NNPACK's convolution of a batch, one image per call: its inference path, which beat
    its batch path here (3x3 256 -> 128 at 64x64 px, batch 2: 20 against 40 ms)."""
    pad = [int(p) for p in padding]
    x = x.contiguous()
    if len(x) == 1:
        return torch._nnpack_spatial_convolution(x, weight, bias, pad)
    return torch.cat([torch._nnpack_spatial_convolution(x[i:i + 1], weight, bias, pad)
                      for i in range(len(x))])
