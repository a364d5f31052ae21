"""The DCGAN generator and discriminator (Radford et al. 2016, as in the PyTorch dcgan example)."""

from torch import Tensor, nn

from translate.errors import ConfigError
from translate.nets.attention import SelfAttention
from translate.nets.layers import check_norm, conv_bias, make_norm, maybe_spectral_norm, register
from translate.nets.minibatch_std import MinibatchStd

_D_NORMS = ("batch", "layer", "instance", "none")


def _levels(image_size: int, net: str) -> int:
    """Number of stride-2 stages between a 4x4 map and the image."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ConfigError(f"{net}: image_size must be a power of two >= 8 (32, 64, 128), "
                          f"got {image_size}")
    return image_size.bit_length() - 3


def _check_attention(attention: int, image_size: int, net: str) -> None:
    sides = [4 * 2**i for i in range(_levels(image_size, net))]  # hidden feature-map sides
    if attention and attention not in sides:
        raise ConfigError(f"{net}: self-attention resolution must be 0 (off) or a feature-map "
                          f"side of a {image_size}px net ({', '.join(map(str, sides))}), "
                          f"got {attention}")


@register("dcgan_g")
class DCGANGenerator(nn.Module):
    """z (N, z_dim) -> image (N, out_channels, image_size, image_size) in [-1, 1].

    A 4x4 projection, then stride-2 transposed convs halving the width at each doubling of the
    side, BatchNorm + ReLU between them and tanh at the end.
    """

    kind: str

    def __init__(
        self,
        z_dim: int = 100,       # latent size
        ngf: int = 64,          # filters of the last hidden layer; 8ngf at 4x4 for 64x64 images
        out_channels: int = 3,  # image channels out
        image_size: int = 64,   # side of the square output: a power of two, e.g. 32, 64, 128
        attention: int = 0,     # SAGAN self-attention on the feature map of this side; 0 = off
    ) -> None:
        super().__init__()
        n_up = _levels(image_size, "dcgan_g")
        _check_attention(attention, image_size, "dcgan_g")
        self.config = {"z_dim": z_dim, "ngf": ngf, "out_channels": out_channels,
                       "image_size": image_size, "attention": attention}
        self.z_dim = z_dim
        self.out_channels = out_channels
        self.image_size = image_size

        width = ngf * 2 ** (n_up - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(z_dim, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        side = 4
        for _ in range(n_up - 1):
            if side == attention:
                layers.append(SelfAttention(width))
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
            side *= 2
        if side == attention:
            layers.append(SelfAttention(width))
        layers += [nn.ConvTranspose2d(width, out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.model(z.reshape(z.shape[0], self.z_dim, 1, 1))


@register("dcgan_d")
class DCGANDiscriminator(nn.Module):
    """Image (N, C, S, S) -> logits (N,): stride-2 convs doubling the width, a 4x4 valid conv last.

    norm="layer" (GroupNorm(1, C)) is the WGAN-GP critic's choice: a gradient penalty taken per
    sample must not see other samples through batch statistics.
    """

    kind: str

    def __init__(
        self,
        in_channels: int = 3,   # image channels in
        ndf: int = 64,          # filters of the first conv
        image_size: int = 64,   # side of the square input: a power of two, e.g. 32, 64, 128
        norm: str = "batch",    # "batch", "layer", "instance" or "none"; not on the first layer
        spectral_norm: bool = False,  # wrap every conv in spectral normalisation
        attention: int = 0,     # SAGAN self-attention on the feature map of this side; 0 = off
        minibatch_std: int = 0,  # ProGAN minibatch-std group size before the last conv; 0 = off
    ) -> None:
        super().__init__()
        check_norm(norm, _D_NORMS, "dcgan_d")
        n_down = _levels(image_size, "dcgan_d")
        _check_attention(attention, image_size, "dcgan_d")
        self.config = {"in_channels": in_channels, "ndf": ndf, "image_size": image_size,
                       "norm": norm, "spectral_norm": spectral_norm, "attention": attention,
                       "minibatch_std": minibatch_std}
        self.in_channels = in_channels
        self.image_size = image_size

        def conv(c_in: int, c_out: int, stride: int, padding: int, bias: bool) -> nn.Module:
            layer = nn.Conv2d(c_in, c_out, 4, stride, padding, bias=bias)
            return maybe_spectral_norm(layer, spectral_norm)

        layers: list[nn.Module] = [conv(in_channels, ndf, 2, 1, False), nn.LeakyReLU(0.2, True)]
        width, side = ndf, image_size // 2
        for _ in range(n_down - 1):
            if side == attention:
                layers.append(SelfAttention(width, spectral_norm))
            layers += [
                conv(width, width * 2, 2, 1, conv_bias(norm)),
                make_norm(norm, width * 2),
                nn.LeakyReLU(0.2, True),
            ]
            width, side = width * 2, side // 2
        if side == attention:
            layers.append(SelfAttention(width, spectral_norm))
        self.trunk_layers = len(layers)  # the feature extractor `features` runs
        if minibatch_std:
            layers.append(MinibatchStd(minibatch_std))
        layers.append(conv(width + (1 if minibatch_std else 0), 1, 1, 0, False))
        self.model = nn.Sequential(*layers)

    def features(self, x: Tensor) -> Tensor:
        """The 4x4 feature maps before the minibatch-std layer and the last conv (N, 8ndf, 4, 4):
        what `translate invert --feature-loss` compares."""
        return self.model[: self.trunk_layers](x)

    def forward(self, x: Tensor) -> Tensor:
        # reshape, not flatten: an input of the wrong size must fail here, not yield N*k logits.
        return self.model(x).reshape(x.shape[0])
