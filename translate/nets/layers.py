"""The net registry and the small blocks several nets share: norm layers by name, spectral norm."""

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from translate.errors import ConfigError

NETS: dict[str, type[nn.Module]] = {}
_Net = TypeVar("_Net", bound=type[nn.Module])


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
            return super().forward(x)


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
