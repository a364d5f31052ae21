"""The CycleGAN ResNet generator (Zhu et al. 2017, after Johnson et al. 2016)."""

from collections.abc import Sequence

from torch import Tensor, nn

from translate.errors import ConfigError
from translate.nets.layers import (
    ReflectionPad2d,
    Tapped,
    border_conv,
    check_generator,
    conv_bias,
    make_norm,
    register,
    upsample_x2,
)


class ResidualBlock(nn.Module):
    """x + conv-norm-relu-(dropout)-conv-norm(x), with reflection padding to avoid edge seams."""

    def __init__(self, channels: int, norm: str, dropout: float) -> None:
        super().__init__()
        bias = conv_bias(norm)
        layers: list[nn.Module] = [
            ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            make_norm(norm, channels),
            # Not in place: instance norm returns a view, and autograd pays for an in-place op
            # on a view with a copy of the whole tensor in backward (CopySlices).
            nn.ReLU(),
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [
            ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3, bias=bias),
            make_norm(norm, channels),
        ]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


@register("resnet")
class ResnetGenerator(nn.Module):
    """Image-to-image generator: 7x7 stem, 2 stride-2 downsamplings, residual blocks, 2 upsamplings.

    The 9-block net is the CycleGAN choice for 256x256 images, 6 blocks for 128x128.
    Input H and W must be multiples of 4 (`size_multiple`) to come back at the same size.
    The defaults build the paper's net (transposed convs, zero-padded downsampling convs): an
    export whose metadata predates `padding` rebuilds as it was trained.

    Its encoder doubles as a feature extractor (CUT's PatchNCE, Park et al. 2020): feature point
    0 is the input, 1 and 2 the outputs of the two downsampling convs (before their norm), and
    2 + k the output of residual block k; `feature_channels` and `feature_strides` give each
    point's width and its downsampling factor, so heads on them can be built before any forward.
    """

    kind: str
    size_multiple = 4
    min_size = 8  # the 1-pixel reflection padding of the blocks needs >= 2 px at the bottleneck

    def __init__(
        self,
        in_channels: int = 3,   # image channels in: 3 for RGB, 1 for grayscale
        out_channels: int = 3,  # image channels out
        ngf: int = 64,          # filters of the first conv; doubled at each downsampling
        n_blocks: int = 9,      # residual blocks at 1/4 resolution
        norm: str = "instance",  # "instance", "batch" or "none"
        dropout: float = 0.0,   # dropout probability inside each residual block
        upsample: str = "transpose",  # "transpose" (paper), "resize" (nearest x2 + 3x3 conv) or
                                      # "subpixel" (ICNR): the last two avoid checkerboards
        padding: str = "zero",  # border padding of the stride-2 convs: "zero" (paper), "reflect"
    ) -> None:
        super().__init__()
        check_generator("resnet", norm, upsample, padding)
        if n_blocks < 0 or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"resnet: need n_blocks >= 0 and 0 <= dropout < 1, got "
                              f"n_blocks={n_blocks}, dropout={dropout}")
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "ngf": ngf,
                       "n_blocks": n_blocks, "norm": norm, "dropout": dropout,
                       "upsample": upsample, "padding": padding}
        self.in_channels = in_channels
        self.out_channels = out_channels
        bias = conv_bias(norm)

        layers: list[nn.Module] = [
            ReflectionPad2d(3),
            nn.Conv2d(in_channels, ngf, 7, bias=bias),
            make_norm(norm, ngf),
            nn.ReLU(),  # not in place: see ResidualBlock
        ]
        ends = [0]  # feature point i is the output of layers[:ends[i]]
        for mult in (1, 2):
            layers.append(border_conv(ngf * mult, ngf * mult * 2, 3, 2, bias, padding))
            ends.append(len(layers))
            # Not in place: with norm "none" the ReLU would overwrite the conv output that is a
            # feature point.
            layers += [make_norm(norm, ngf * mult * 2), nn.ReLU()]
        for _ in range(n_blocks):
            layers.append(ResidualBlock(ngf * 4, norm, dropout))
            ends.append(len(layers))
        self.feature_ends = tuple(ends)
        self.feature_channels = (in_channels, ngf * 2, *[ngf * 4] * (n_blocks + 1))
        self.feature_strides = (1, 2, *[4] * (n_blocks + 1))
        for mult in (4, 2):
            layers += [
                upsample_x2(upsample, ngf * mult, ngf * mult // 2, bias, kernel=3),
                make_norm(norm, ngf * mult // 2),
                nn.ReLU(),  # not in place: see ResidualBlock
            ]
        layers += [ReflectionPad2d(3), nn.Conv2d(ngf, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor, features: Sequence[int] | None = None,
                taps: Sequence[int] | None = None) -> Tensor | list[Tensor] | Tapped:
        """The translation of x; with `features`, instead the encoder's outputs at those feature
        points, in that order (only the layers up to the deepest point run); with `taps`, both:
        (translation, the outputs at those points) from one pass. All go through forward so
        that a DDP or compiled wrapper sees every call."""
        if features is None and taps is None:
            return self.model(x)
        points = taps if features is None else features
        ends = [self.feature_ends[i] for i in points]
        found = {0: x}
        for n, layer in enumerate(self.model if features is None else self.model[:max(ends)],
                                  start=1):
            x = layer(x)
            if n in ends:
                found[n] = x
        tapped = [found[e] for e in ends]
        return tapped if features is not None else (x, tapped)
