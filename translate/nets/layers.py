"""The net registry and the small blocks several nets share: norm layers by name, spectral norm,
border padding and upsampling layers by name."""

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from translate.errors import ConfigError

NETS: dict[str, type[nn.Module]] = {}
_Net = TypeVar("_Net", bound=type[nn.Module])
Tapped = tuple[Tensor, list[Tensor]]  # a generator's translation and its feature points


def register(name: str) -> Callable[[_Net], _Net]:
    """Class decorator: file the net under `name` in NETS and set its `kind` to that name."""

    def wrap(cls: _Net) -> _Net:
        cls.kind = name
        NETS[name] = cls
        return cls

    return wrap


def _instance_norm(channels: int) -> nn.Module:
    # No affine and no running stats, as in the CycleGAN reference: each image is normalised by
    # its own statistics at train and test time alike.
    return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)


_NORMS: dict[str, Callable[[int], nn.Module]] = {
    "instance": _instance_norm,
    "batch": nn.BatchNorm2d,
    "layer": lambda channels: nn.GroupNorm(1, channels),  # LayerNorm over (C, H, W)
    "none": lambda channels: nn.Identity(),
}


class ReflectionPad2d(nn.ReflectionPad2d):
    """nn.ReflectionPad2d that pads in its input's dtype under autocast too.

    CPU autocast lists reflection_pad2d among the ops it runs in fp32, so under bf16 every pad
    in a ResNet block turned the bf16 activation into fp32 and the next convolution turned the
    padded copy back into bf16: two copies of the tensor per pad and the same again backward
    (~6% of a bf16 CycleGAN step at 128 px). A pad only moves values, so its result is the same
    in either dtype."""

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return border_pad(x, self.padding, "reflect")


def border_pad(x: Tensor, pad: tuple[int, ...], mode: str) -> Tensor:
    """F.pad, except that a map too small to mirror (a U-Net's 1x1 bottleneck on small images)
    repeats its edge instead: reflection needs more pixels than the pad."""
    if mode == "reflect" and (x.shape[-1] <= max(pad[:2]) or x.shape[-2] <= max(pad[2:])):
        mode = "replicate"
    return F.pad(x, pad, mode=mode)


def check_norm(norm: str, allowed: tuple[str, ...], net: str) -> None:
    """Raise ConfigError unless `norm` is one of the names `net` accepts."""
    if norm not in allowed:
        raise ConfigError(
            f"{net}: unknown norm {norm!r}; use one of {', '.join(repr(n) for n in allowed)}"
        )


def make_norm(norm: str, channels: int) -> nn.Module:
    """A 2-D norm layer by name: 'instance', 'batch', 'layer' (GroupNorm(1, C)) or 'none'."""
    return _NORMS[norm](channels)


def conv_bias(norm: str) -> bool:
    """Whether a conv followed by this norm gets a bias.

    Batch and layer norm carry their own learned shift, so a bias before them is dead weight;
    with affine-free instance norm or no norm the reference keeps the bias.
    """
    return norm in ("instance", "none")


def maybe_spectral_norm(layer: nn.Module, enabled: bool) -> nn.Module:
    """Wrap a conv or linear layer in spectral normalisation (Miyato et al. 2018) if enabled."""
    return _spectral_norm(layer) if enabled else layer


PADDINGS = ("zero", "reflect")
UPSAMPLES = ("transpose", "resize", "bilinear", "conv_bilinear", "subpixel")


def check_choice(value: str, allowed: tuple[str, ...], net: str, option: str) -> None:
    """Raise ConfigError unless `value` is one of the names `net` accepts for `option`."""
    if value not in allowed:
        raise ConfigError(f"{net}: {option} must be one of "
                          f"{', '.join(repr(n) for n in allowed)}, got {value!r}")


GENERATOR_NORMS = ("instance", "batch", "none")


def check_generator(net: str, norm: str, upsample: str, padding: str) -> None:
    """Raise ConfigError unless the image-to-image generator `net` accepts these options."""
    check_norm(norm, GENERATOR_NORMS, net)
    check_choice(upsample, UPSAMPLES, net, "upsample")
    check_choice(padding, PADDINGS, net, "padding")


class BorderConv2d(nn.Conv2d):
    """nn.Conv2d whose reflect padding runs in its input's dtype under autocast, as
    `ReflectionPad2d` does (nn.Conv2d pads through F.pad, which CPU autocast runs in fp32:
    a U-Net with reflect padding took ~30% longer per bf16 step than with zero padding).
    Same parameters and state dict as nn.Conv2d."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        if self.padding_mode == "zeros" or not any(self.padding):
            # (a 1x1 conv pads nothing: no copy of its, often full-resolution, input)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation,
                            self.groups)
        with torch.autocast(x.device.type, enabled=False):
            x = border_pad(x, self._reversed_padding_repeated_twice, self.padding_mode)
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


def border_conv(cin: int, cout: int, kernel: int, stride: int, bias: bool,
                padding: str) -> BorderConv2d:
    """A conv whose borders are padded by name (`PADDINGS`) by (kernel - 1) // 2 pixels: the
    same size out at stride 1, half at stride 2. Zero padding tells every conv where the border
    is, and a net with several stacked layers learns to draw stripes along it; reflection keeps
    image statistics at the border (no new parameters, same state dict)."""
    return BorderConv2d(cin, cout, kernel, stride, (kernel - 1) // 2, bias=bias,
                        padding_mode={"zero": "zeros", "reflect": "reflect"}[padding])


class SubPixelUpsample(nn.Sequential):
    """x2 by sub-pixel convolution (Shi et al. 2016): a 3x3 conv to 4x the channels, then
    PixelShuffle. Initialised by ICNR (Aitken et al. 2017, `icnr_`): the four sub-pixel kernels
    start equal, so at initialisation it is a conv followed by nearest-neighbour resizing and
    draws no checkerboard."""

    def __init__(self, cin: int, cout: int, bias: bool) -> None:
        super().__init__(ReflectionPad2d(1), nn.Conv2d(cin, 4 * cout, 3, bias=bias),
                         nn.PixelShuffle(2))
        self.icnr_()  # init_weights redraws the kernels and calls this again

    @torch.no_grad()
    def icnr_(self) -> None:
        """Copy the kernel of each output channel's first sub-pixel onto the other three."""
        conv = self[1]
        # PixelShuffle reads output channel c at sub-pixel k from conv channel 4c + k.
        conv.weight.copy_(conv.weight[::4].repeat_interleave(4, dim=0))
        if conv.bias is not None:
            conv.bias.copy_(conv.bias[::4].repeat_interleave(4))


class _ChannelsLastGrad(torch.autograd.Function):
    """The identity; its backward hands the gradient on channels_last-contiguous."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class GradInLayout(nn.Module):
    """The identity, except that a channels_last input's gradient comes back channels_last-
    contiguous. A U-Net level's output is concatenated with its skip, so the gradient that
    reaches it is a channel slice of the concatenation's: strided, neither layout. CPU kernels
    such as bilinear upsampling's backward then copy it to NCHW and take their slow NCHW path
    (measured, 2-core Xeon, bf16, 8x16x32x32 -> 64x64: 1.39 ms against 0.21 channels_last)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and x.is_contiguous(memory_format=torch.channels_last) \
                and not x.is_contiguous():
            return _ChannelsLastGrad.apply(x)
        return x


def upsample_x2(how: str, cin: int, cout: int, bias: bool, kernel: int) -> nn.Module:
    """A x2 upsampling layer by name.

    "transpose": a stride-2 transposed conv of `kernel` (4: pix2pix's U-Net, 3: the CycleGAN
    ResNet); odd and even output pixels get different kernel taps, the source of checkerboard
    artifacts (Odena et al. 2016). "bilinear": bilinear x2, then a reflect-padded 3x3 conv;
    bilinear resizing carries a linear ramp over exactly, so the conv after it sees no period-2
    pattern to amplify. "resize": the same with nearest-neighbour x2, whose 2x2 blocks turn
    a ramp into steps that a trained conv can sharpen into stripes. "conv_bilinear": the 3x3
    conv first, at the low resolution (4x fewer operations), then bilinear x2: smooth, but
    no detail finer than the input's; for U-Nets with a full-resolution level. "subpixel":
    `SubPixelUpsample`, free of checkerboards at initialisation only.
    """
    if how == "transpose":
        # padding 1 with output_padding kernel % 2 gives exactly twice the input side
        return nn.ConvTranspose2d(cin, cout, kernel, stride=2, padding=1,
                                  output_padding=kernel % 2, bias=bias)
    if how == "subpixel":
        return SubPixelUpsample(cin, cout, bias)
    if how == "conv_bilinear":
        return nn.Sequential(ReflectionPad2d(1), nn.Conv2d(cin, cout, 3, bias=bias),
                             nn.Upsample(scale_factor=2, mode="bilinear"), GradInLayout())
    # Upsample + ReflectionPad2d + Conv2d as separate modules: the state-dict keys of the
    # ResNet "resize" exports made before the other choices existed.
    mode = "bilinear" if how == "bilinear" else "nearest"
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=mode), ReflectionPad2d(1),
                         nn.Conv2d(cin, cout, 3, bias=bias))
