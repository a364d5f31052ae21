"""The 70x70 PatchGAN discriminator of pix2pix and CycleGAN (Isola et al. 2017)."""

from torch import Tensor, nn

from translate.errors import ConfigError
from translate.nets.layers import check_norm, conv_bias, make_norm, maybe_spectral_norm, register

_NORMS = ("instance", "batch", "none")


@register("patchgan")
class PatchDiscriminator(nn.Module):
    """Fully convolutional critic: one real/fake logit per overlapping image patch.

    With n_layers=3 each output logit sees a 70x70 receptive field. The output is (N, 1, H', W')
    with H' about H/8 - 2; the objective averages over patches.
    """

    kind: str

    def __init__(
        self,
        in_channels: int = 3,   # image channels in
        ndf: int = 64,          # filters of the first conv; doubled per layer up to 8ndf
        n_layers: int = 3,      # stride-2 convs after the first; 3 gives 70x70 patches
        norm: str = "instance",  # "instance", "batch" or "none"
        spectral_norm: bool = False,  # wrap every conv in spectral normalisation
    ) -> None:
        super().__init__()
        check_norm(norm, _NORMS, "patchgan")
        if n_layers < 1:
            raise ConfigError(f"patchgan: need n_layers >= 1, got {n_layers}")
        self.config = {"in_channels": in_channels, "ndf": ndf, "n_layers": n_layers,
                       "norm": norm, "spectral_norm": spectral_norm}
        self.in_channels = in_channels

        def conv(c_in: int, c_out: int, stride: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, 4, stride=stride, padding=1, bias=bias)
            return maybe_spectral_norm(layer, spectral_norm)

        layers: list[nn.Module] = [conv(in_channels, ndf, 2, True), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            # The last of these keeps the resolution: it widens the receptive field to 70x70.
            stride = 2 if n < n_layers else 1
            width_out = ndf * min(2**n, 8)
            layers += [
                conv(width, width_out, stride, conv_bias(norm)),
                make_norm(norm, width_out),
                # Not in place: instance norm returns a view, and autograd pays for an in-place
                # op on a view with a copy of the whole tensor in backward (CopySlices).
                nn.LeakyReLU(0.2),
            ]
            width = width_out
        layers.append(conv(width, 1, 1, True))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)
