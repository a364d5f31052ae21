"""Small fully connected generator and discriminator for the 2-D toy problems (mixtures)."""

from torch import Tensor, nn

from translate.errors import ConfigError
from translate.nets.layers import maybe_spectral_norm, register
from translate.nets.minibatch_std import MinibatchStd


def _check(depth: int, pack: int, net: str) -> None:
    if depth < 1 or pack < 1:
        raise ConfigError(f"{net}: need depth >= 1 and pack >= 1, got depth={depth}, pack={pack}")


@register("mlp_g")
class MLPGenerator(nn.Module):
    """z (N, z_dim) -> sample (N, out_dim) through `depth` ReLU hidden layers; linear output."""

    kind: str

    def __init__(
        self,
        z_dim: int = 2,     # latent size
        out_dim: int = 2,   # sample size (2 for the plane)
        hidden: int = 512,  # units per hidden layer
        depth: int = 3,     # hidden layers
    ) -> None:
        super().__init__()
        _check(depth, 1, "mlp_g")
        self.config = {"z_dim": z_dim, "out_dim": out_dim, "hidden": hidden, "depth": depth}
        self.z_dim = z_dim
        self.out_dim = out_dim
        layers: list[nn.Module] = []
        width = z_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.ReLU(True)]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.model = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.model(z)


@register("mlp_d")
class MLPDiscriminator(nn.Module):
    """Samples (N, in_dim) -> logits (N / pack,) through `depth` LeakyReLU(0.2) hidden layers.

    pack > 1 is PacGAN (Lin et al. 2018): the critic judges `pack` samples at once, consecutive
    in the batch, which makes a generator that drops modes easier to catch.
    """

    kind: str

    def __init__(
        self,
        in_dim: int = 2,    # sample size
        hidden: int = 512,  # units per hidden layer
        depth: int = 3,     # hidden layers
        pack: int = 1,      # samples judged together (PacGAN); the batch must be a multiple
        spectral_norm: bool = False,  # wrap every linear layer in spectral normalisation
        minibatch_std: int = 0,  # ProGAN minibatch-std group size (over packed rows) before the
                                 # output layer; 0 = off
    ) -> None:
        super().__init__()
        _check(depth, pack, "mlp_d")
        self.config = {"in_dim": in_dim, "hidden": hidden, "depth": depth, "pack": pack,
                       "spectral_norm": spectral_norm, "minibatch_std": minibatch_std}
        self.in_dim = in_dim
        self.pack = pack
        layers: list[nn.Module] = []
        width = in_dim * pack
        for _ in range(depth):
            layers += [maybe_spectral_norm(nn.Linear(width, hidden), spectral_norm),
                       nn.LeakyReLU(0.2, True)]
            width = hidden
        if minibatch_std:
            layers.append(MinibatchStd(minibatch_std))
            width += 1
        layers.append(maybe_spectral_norm(nn.Linear(width, 1), spectral_norm))
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] % self.pack:
            raise ConfigError(f"mlp_d with pack={self.pack} needs a batch size that is a multiple "
                             f"of {self.pack}, got {x.shape[0]}; change the batch size or pack")
        return self.model(x.reshape(x.shape[0] // self.pack, -1)).squeeze(1)
