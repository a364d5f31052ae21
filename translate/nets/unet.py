"""The pix2pix / CycleGAN U-Net generator (Isola et al. 2017, after Ronneberger et al. 2015)."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translate.errors import ConfigError
from translate.nets.layers import (
    Tapped,
    border_conv,
    check_generator,
    conv_bias,
    make_norm,
    register,
    upsample_x2,
)


@register("unet")
class UnetGenerator(nn.Module):
    """Encoder of `num_downs` stride-2 4x4 convs, mirrored decoder, skips joined by concatenation.

    Channels go ngf, 2ngf, 4ngf, then stay at 8ngf; the bottleneck is 1x1 when the input side is
    2**num_downs (7 for 128x128, 8 for 256x256). As in the reference, dropout (if any) acts on
    the decoder levels that sit between two 8ngf levels. The defaults build the reference's net
    (transposed convs, zero padding): an export whose metadata predates `upsample` and
    `padding` rebuilds as it was trained.

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
        upsample: str = "transpose",  # decoder x2 layers: "transpose" (reference, 4x4), "resize"
                                      # (nearest x2 + 3x3 conv) or "subpixel" (ICNR); see layers
        padding: str = "zero",  # border padding of the encoder convs: "zero" (reference), "reflect"
        full_res: bool = False,  # add a level at full resolution: a 3x3 conv of the input whose
                                 # features skip to the last layers (not in the reference)
        affine_out: bool = False,  # the last layer predicts, per pixel, an affine colour
                                   # transform of the input pixel instead of the output itself
    ) -> None:
        super().__init__()
        check_generator("unet", norm, upsample, padding)
        if num_downs < 2 or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"unet: need num_downs >= 2 and 0 <= dropout < 1, got "
                              f"num_downs={num_downs}, dropout={dropout}")
        self.config = {"in_channels": in_channels, "out_channels": out_channels,
                       "num_downs": num_downs, "ngf": ngf, "norm": norm, "dropout": dropout,
                       "upsample": upsample, "padding": padding, "full_res": full_res,
                       "affine_out": affine_out}
        self.affine_out = affine_out
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.size_multiple = 2**num_downs
        self.min_size = self.size_multiple
        widths = [ngf * min(2**i, 8) for i in range(num_downs)]
        self.feature_channels = (in_channels, *widths)
        self.feature_strides = tuple(2**i for i in range(num_downs + 1))
        self.stem, self.down = _encoder(in_channels, widths, norm, padding, full_res)
        self.up, self.out = _decoder(out_channels * (in_channels + 1) if affine_out
                                     else out_channels, widths, norm, dropout, upsample,
                                     padding, full_res, affine_out)

    def forward(self, x: Tensor, features: Sequence[int] | None = None,
                taps: Sequence[int] | None = None) -> Tensor | list[Tensor] | Tapped:
        """The translation of x; with `features`, instead the encoder's outputs at those feature
        points, in that order (only the levels up to the deepest point run); with `taps`, both:
        (translation, the outputs at those points) from one pass. All go through forward so
        that a DDP or compiled wrapper sees every call."""
        if features is not None:
            found = [x]
            h = self.stem(x) if self.stem is not None else x
            for down in self.down[:max(features)]:
                h = down(h)
                found.append(h)
            return [found[i] for i in features]
        image = x
        if self.stem is not None:
            x = self.stem(x)
        full, skips = x, []
        for down in self.down:
            x = down(x)
            skips.append(x)
        points = [image, *skips]  # the feature points: the input, then each level down
        x = self.up[-1](skips.pop())
        for up in reversed(self.up[:-1]):
            x = up(torch.cat([skips.pop(), x], dim=1))
        if self.out is not None:
            x = self.out(torch.cat([full, x], dim=1))
        y = self._apply_affine(x, image) if self.affine_out else x
        return y if taps is None else (y, [points[i] for i in taps])

    def _apply_affine(self, coef: Tensor, image: Tensor) -> Tensor:
        cin, cout = self.in_channels, self.out_channels
        # Channel o*cin + i of coef multiplies input channel i: one product with the image
        # repeated cout times along channels, then a sum over each group of cin. The same
        # products and sums as broadcasting the (cout, cin) matrix against image.unsqueeze(1),
        # in about half the time forward and backward (channels_last tensors keep their layout).
        # unflatten, not reshape(n, ...): an ONNX export keeps batch and size dynamic
        products = coef[:, : cout * cin] * image.repeat(1, cout, 1, 1)
        y = products.unflatten(1, (cout, cin)).sum(dim=2) + coef[:, cout * cin:]
        return F.hardtanh(y)  # the [-1, 1] range, without tanh's squeeze at the ends


def _encoder(cin: int, widths: list[int], norm: str, padding: str, full_res: bool
             ) -> tuple[nn.Module | None, nn.ModuleList]:
    """(stem, down levels). full_res adds a level at the input's resolution (as Ronneberger et
    al.'s U-Net has; the reference's first conv already halves it): a 3x3 conv whose features
    skip to the last layer, so each output pixel is decoded with its full-resolution
    surroundings rather than from half-resolution features alone."""
    bias, ngf, innermost = conv_bias(norm), widths[0], len(widths) - 1
    stem = border_conv(cin, ngf, 3, 1, True, padding) if full_res else None
    first: nn.Module = (nn.Sequential(nn.LeakyReLU(0.2), border_conv(ngf, ngf, 4, 2, bias, padding),
                                      make_norm(norm, ngf))
                        if full_res else border_conv(cin, ngf, 4, 2, bias, padding))
    down = nn.ModuleList([first])
    for i in range(1, len(widths)):
        layers: list[nn.Module] = [nn.LeakyReLU(0.2),
                                   border_conv(widths[i - 1], widths[i], 4, 2, bias, padding)]
        if i != innermost:
            layers.append(make_norm(norm, widths[i]))
        down.append(nn.Sequential(*layers))
    return stem, down


def _decoder(n_out: int, widths: list[int], norm: str, dropout: float, upsample: str,
             padding: str, full_res: bool, affine_out: bool
             ) -> tuple[nn.ModuleList, nn.Module | None]:
    """(up levels, the full-resolution head or None). up[i] mirrors down[i]: it reads level
    i's output (joined with its skip, except at the bottleneck) and writes level i-1's
    resolution and width; the last one writes the image (n_out channels).

    affine_out (after the local affine colour models of Gharbi et al. 2017, HDRNet): the last
    layer writes a cout x cin matrix and an offset per pixel (n_out of them), applied to that
    pixel of the input, so the input's detail reaches the output exactly and the net only has
    to learn how colours change. The layer starts at the usual random init, not at the
    identity: a G that starts as the identity meets the identity and cycle L1 losses exactly,
    and their kinks held it there (the demo stayed at the do-nothing 19.2 dB)."""
    bias, ngf, innermost = conv_bias(norm), widths[0], len(widths) - 1
    last: nn.Module = nn.Identity() if affine_out else nn.Tanh()
    out = None
    if full_res:
        up = nn.ModuleList([nn.Sequential(
            nn.ReLU(), upsample_x2(upsample, ngf * 2, ngf, bias, kernel=4), make_norm(norm, ngf))])
        out = nn.Sequential(nn.ReLU(), border_conv(2 * ngf, n_out, 1 if affine_out else 3, 1,
                                                   True, padding), last)
    else:
        up = nn.ModuleList([nn.Sequential(
            nn.ReLU(), upsample_x2(upsample, ngf * 2, n_out, True, kernel=4), last)])
    for i in range(1, len(widths)):
        width_in = widths[i] if i == innermost else widths[i] * 2
        layers = [nn.ReLU(), upsample_x2(upsample, width_in, widths[i - 1], bias, kernel=4),
                  make_norm(norm, widths[i - 1])]
        if dropout > 0 and i != innermost and widths[i - 1] == ngf * 8:
            layers.append(nn.Dropout(dropout))
        up.append(nn.Sequential(*layers))
    return up, out
