"""Weight initialisation of the DCGAN paper, also used by the CycleGAN and pix2pix reference."""

import torch
from torch import nn
from torch.nn.utils import parametrize

from translate.nets.layers import SubPixelUpsample

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm, nn.LayerNorm)


@torch.no_grad()
def init_weights(net: nn.Module, gain: float = 0.02) -> None:
    """Conv/linear weights ~ N(0, gain), norm weights ~ N(1, gain), all biases 0. In place.

    Sub-pixel upsampling layers then get their ICNR start (their random kernels made equal
    across the four sub-pixels), which a plain normal draw would undo."""
    for module in net.modules():
        if isinstance(module, _WEIGHTED):
            _weight_tensor(module).normal_(0.0, gain)
            _refresh_spectral_norm(module)
        elif isinstance(module, _NORMS) and getattr(module, "weight", None) is not None:
            module.weight.normal_(1.0, gain)
        else:
            continue
        if module.bias is not None:
            module.bias.zero_()
    for module in net.modules():
        if isinstance(module, SubPixelUpsample):
            module.icnr_()


def _weight_tensor(module: nn.Module) -> torch.Tensor:
    # Under spectral norm `module.weight` is computed on the fly; the parameter is the original.
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def _refresh_spectral_norm(module: nn.Module) -> None:
    # Spectral norm's power-iteration vectors were estimated from the old weights; without a
    # fresh estimate the first steps would divide by a wrong singular value.
    if not parametrize.is_parametrized(module, "weight"):
        return
    for fn in module.parametrizations.weight:
        if hasattr(fn, "_power_method"):
            weight_mat = fn._reshape_weight_to_matrix(module.parametrizations.weight.original)
            fn._power_method(weight_mat, 15)
