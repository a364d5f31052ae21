"""The pix2pix / CycleGAN U-Net generator (Isola et al. 2017, after Ronneberger et al. 2015)."""

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from translate.errors import ConfigError
from translate.nets.layers import check_norm, conv_bias, make_norm, register

_NORMS = ("instance", "batch", "none")


@register("unet")
class UnetGenerator(nn.Module):
    """Encoder of `num_downs` stride-2 4x4 convs, mirrored decoder, skips joined by concatenation.

    Channels go ngf, 2ngf, 4ngf, then stay at 8ngf; the bottleneck is 1x1 when the input side is
    2**num_downs (7 for 128x128, 8 for 256x256). As in the reference, dropout (if any) acts on
    the decoder levels that sit between two 8ngf levels.

    Its encoder doubles as a feature extractor (CUT's PatchNCE): feature point 0 is the input and
    point i the output of encoder level i (what its skip carries), at 1/2**i of the input size.
    """

    kind: str

    def __init__(
        self,
        in_channels: int = 3,   # image channels in
        out_channels: int = 3,  # image channels out
        num_downs: int = 7,     # stride-2 downsamplings; input sides must be multiples of 2**this
        ngf: int = 64,          # filters of the first conv
        norm: str = "instance",  # "instance", "batch" or "none"
        dropout: float = 0.0,   # dropout probability in the inner decoder levels (reference: 0.5)
    ) -> None:
        super().__init__()
        check_norm(norm, _NORMS, "unet")
        if num_downs < 2 or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"unet: need num_downs >= 2 and 0 <= dropout < 1, got "
                              f"num_downs={num_downs}, dropout={dropout}")
        self.config = {"in_channels": in_channels, "out_channels": out_channels,
                       "num_downs": num_downs, "ngf": ngf, "norm": norm, "dropout": dropout}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.size_multiple = 2**num_downs
        self.min_size = self.size_multiple
        bias = conv_bias(norm)
        widths = [ngf * min(2**i, 8) for i in range(num_downs)]
        innermost = num_downs - 1
        self.feature_channels = (in_channels, *widths)
        self.feature_strides = tuple(2**i for i in range(num_downs + 1))

        self.down = nn.ModuleList([nn.Conv2d(in_channels, ngf, 4, 2, 1, bias=bias)])
        for i in range(1, num_downs):
            layers: list[nn.Module] = [
                nn.LeakyReLU(0.2),
                nn.Conv2d(widths[i - 1], widths[i], 4, 2, 1, bias=bias),
            ]
            if i != innermost:
                layers.append(make_norm(norm, widths[i]))
            self.down.append(nn.Sequential(*layers))

        # up[i] mirrors down[i]: it reads level i's output (joined with its skip, except at the
        # bottleneck) and writes level i-1's resolution and width.
        self.up = nn.ModuleList([nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(widths[0] * 2, out_channels, 4, 2, 1),
            nn.Tanh(),
        )])
        for i in range(1, num_downs):
            width_in = widths[i] if i == innermost else widths[i] * 2
            layers = [
                nn.ReLU(),
                nn.ConvTranspose2d(width_in, widths[i - 1], 4, 2, 1, bias=bias),
                make_norm(norm, widths[i - 1]),
            ]
            if dropout > 0 and i != innermost and widths[i - 1] == ngf * 8:
                layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))

    def forward(self, x: Tensor, features: Sequence[int] | None = None) -> Tensor | list[Tensor]:
        """The translation of x; with `features`, instead the encoder's outputs at those feature
        points, in that order (only the levels up to the deepest point run). Both go through
        forward so that a DDP or compiled wrapper sees every call."""
        if features is not None:
            found = [x]
            for down in self.down[:max(features)]:
                found.append(down(found[-1]))
            return [found[i] for i in features]
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = self.up[-1](skips.pop())
        for up in reversed(self.up[:-1]):
            x = up(torch.cat([skips.pop(), x], dim=1))
        return x
