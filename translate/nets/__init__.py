"""Generators and discriminators, chosen by name through NETS.

Every net keeps its complete constructor arguments in `net.config` (JSON-serialisable) and its
registry name in `net.kind`, so `build_net(net.kind, **net.config)` rebuilds the architecture.
"""

import inspect

from torch import nn

from translate.errors import ConfigError
from translate.nets import dcgan, mlp, patchgan, resnet, unet
from translate.nets.init import init_weights
from translate.nets.layers import NETS, register

__all__ = [
    "NETS",
    "build_net",
    "dcgan",
    "init_weights",
    "mlp",
    "patchgan",
    "register",
    "resnet",
    "unet",
]


def build_net(kind: str, **config: object) -> nn.Module:
    """Construct the net registered as `kind` with keyword arguments `config`."""
    if kind not in NETS:
        raise ConfigError(f"unknown net kind {kind!r}; valid kinds: {', '.join(sorted(NETS))}")
    cls = NETS[kind]
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ConfigError(f"net {kind!r} has no option {', '.join(map(repr, unknown))}; "
                          f"valid options: {', '.join(accepted)}")
    return cls(**config)
