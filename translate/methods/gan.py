"""Unconditional GANs on the core: DCGAN (Radford et al. 2015), WGAN-GP (Gulrajani et al. 2017),
WGAN with weight clipping (Arjovsky et al. 2017), and MLP variants for 2-D toy mixtures.

One method with the objective, penalty and nets chosen by name; the registered names differ only
in their defaults (see translate/methods/__init__.py).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from torch import Tensor

from translate import viz
from translate.config import RunConfig, choice, non_negative, positive, probability_target
from translate.core import noise, objectives
from translate.core.penalties import clip_weights, gradient_penalty, r1_penalty
from translate.data import toy_modes
from translate.errors import ConfigError
from translate.methods.base import Batch, Nets, Phase
from translate.methods.unrolled import OptimizerFactory, unroll, unroll_through
from translate.nets import build_net, init_weights

OBJECTIVE_NAMES = tuple(objectives.OBJECTIVES)


@dataclass(frozen=True)
class GANConfig:
    net: str = choice("dcgan", "dcgan", "mlp")  # dcgan: conv nets on images; mlp: 2-D toy data
    z_dim: int = positive(100)            # latent size
    image_size: int = choice(64, 32, 64, 128)  # pixels (dcgan nets); must equal data.crop_size
    ngf: int = positive(64)               # generator width (dcgan)
    ndf: int = positive(64)               # discriminator width (dcgan)
    d_norm: str = choice("batch", "batch", "layer", "instance", "none")  # D norm (dcgan)
    hidden: int = positive(512)           # MLP width (toy)
    depth: int = positive(3)              # MLP hidden layers (toy)
    pack: int = positive(1)               # PacGAN: D judges `pack` samples jointly
    spectral_norm: bool = False           # spectral normalisation on D's layers
    self_attention: int = non_negative(0)  # SAGAN self-attention in G and D at this feature-map
                                          # side in pixels, e.g. 16 for 64px images (dcgan); 0 = off
    minibatch_std: int = non_negative(0)  # ProGAN minibatch std in D: group size (divides the
                                          # batch / pack), e.g. 4; 0 = off
    unrolled_steps: int = non_negative(0)  # Unrolled GAN: G is judged by a copy of D after this
                                          # many extra D steps (see methods/unrolled.py); 0 = off
    unrolled_backprop: bool = False       # G's gradient flows through the unrolled D steps,
                                          # which start from D's optimizer state (Metz et al.'s
                                          # full method); false: the cheap copy without it
    objective: str = choice("nonsaturating", *OBJECTIVE_NAMES)
    real_target: float = probability_target(1.0)    # one-sided label smoothing, e.g. 0.9 (D only)
    penalty: str = choice("none", "none", "gp", "r1", "clip")
    gp_weight: float = non_negative(10.0)  # WGAN-GP lambda
    r1_gamma: float = non_negative(10.0)  # R1 gamma
    clip_value: float = positive(0.01)    # WGAN weight clipping c
    n_critic: int = positive(1)           # D steps per G step

    # Keys added since checkpoints began to carry a fingerprint, with the value that means "as
    # before the key existed" (translate.core.checkpoint.fingerprint). A new key goes here.
    NEW_KEYS: ClassVar[dict[str, Any]] = {"unrolled_backprop": False}


@dataclass(frozen=True)
class WGANGPConfig(GANConfig):
    d_norm: str = choice("layer", "batch", "layer", "instance", "none")  # no BatchNorm in a GP critic
    objective: str = choice("wasserstein", *OBJECTIVE_NAMES)
    penalty: str = choice("gp", "none", "gp", "r1", "clip")
    n_critic: int = positive(5)


def check(cfg: RunConfig) -> None:
    m, d = cfg.model, cfg.data
    if m.net == "mlp" and d.kind != "toy":
        raise ConfigError(f"model.net: 'mlp' nets need data.kind = 'toy', got {d.kind!r}")
    if m.net == "dcgan":
        if d.kind != "folder":
            raise ConfigError(f"data.kind: {cfg.method} trains on one image folder; set "
                              "data.kind = 'folder'")
        if d.crop_size != m.image_size:
            raise ConfigError(f"data.crop_size: {d.crop_size} must equal model.image_size "
                              f"{m.image_size} for {cfg.method}")
    if cfg.train.batch_size % m.pack:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} must be a multiple of "
                          f"model.pack {m.pack}")
    _check_options(cfg)
    if m.penalty in ("gp", "r1") and cfg.train.compile is True:  # "auto" leaves it off
        raise ConfigError(f"train.compile: torch.compile cannot differentiate the {m.penalty} "
                          "penalty's gradient again (double backward); set train.compile = false")
    if m.penalty == "gp" and m.d_norm == "batch" and m.net == "dcgan":
        raise ConfigError("model.d_norm: BatchNorm makes the gradient penalty wrong (it mixes "
                          "samples); use 'layer' or 'none' with penalty 'gp'")


def _check_options(cfg: RunConfig) -> None:
    m, rows = cfg.model, cfg.train.batch_size // cfg.model.pack  # rows: samples D sees at once
    if m.unrolled_backprop and not m.unrolled_steps:
        raise ConfigError("model.unrolled_backprop: there are no unrolled D steps to "
                          "differentiate through; set model.unrolled_steps, e.g. 5")
    if m.minibatch_std and rows % m.minibatch_std:
        raise ConfigError(f"model.minibatch_std: group size {m.minibatch_std} must divide the "
                          f"{rows} samples D judges at once (train.batch_size / model.pack)")
    sides = [4 * 2**i for i in range(max(0, m.image_size.bit_length() - 3))]
    if m.self_attention and (m.net != "dcgan" or m.self_attention not in sides):
        raise ConfigError(f"model.self_attention: {m.self_attention} must be 0 or, with dcgan "
                          f"nets, a feature-map side ({', '.join(map(str, sides))})")


class GAN:
    def __init__(self, cfg: RunConfig):
        m = cfg.model
        self.cfg, self.seed = m, cfg.seed
        self.toy = m.net == "mlp"
        self.toy_name = cfg.data.toy
        self.nets: Nets = self.build_nets(cfg)  # built once, by the subclass if it has its own
        self.d_obj, self.g_obj = objectives.get(m.objective)
        t = cfg.train
        self.clip = m.clip_value if m.penalty == "clip" else None  # WGAN's c, else None
        after = partial(_clip, c=self.clip) if self.clip is not None else None
        self.unroll_settings = (_optimizer_factory(cfg), after)
        # Unrolling gives G its own fresh batch: the copy of D should not train on the very
        # images the real D has just stepped on.
        self.phases = [
            Phase("D", ("D",), self.d_loss, t.lr_d, t.betas_d, m.n_critic, True, after),
            Phase("G", ("G",), self.g_loss, t.lr_g, t.betas_g, 1, m.unrolled_steps > 0, None,
                  True),
        ]
        self.generators: dict[str, dict[str, Any]] = {"G": {"latent": True}}

    def build_nets(self, cfg: RunConfig) -> Nets:
        """G and D, initialised (a subclass with other nets overrides this)."""
        m = cfg.model
        channels = cfg.data.channels_a
        if self.toy:
            G = build_net("mlp_g", z_dim=m.z_dim, out_dim=2, hidden=m.hidden, depth=m.depth)
            D = build_net("mlp_d", in_dim=2, hidden=m.hidden, depth=m.depth, pack=m.pack,
                          spectral_norm=m.spectral_norm, minibatch_std=m.minibatch_std)
        else:
            G = build_net("dcgan_g", z_dim=m.z_dim, ngf=m.ngf, out_channels=channels,
                          image_size=m.image_size, attention=m.self_attention)
            D = build_net("dcgan_d", in_channels=channels, ndf=m.ndf, image_size=m.image_size,
                          norm=m.d_norm, spectral_norm=m.spectral_norm,
                          attention=m.self_attention, minibatch_std=m.minibatch_std)
            init_weights(G)
            init_weights(D)
        return {"G": G, "D": D}

    def _pack(self, x: Tensor) -> Tensor:
        # PacGAN for conv nets: stack `pack` samples along channels; MLP D packs internally.
        p = self.cfg.pack
        if p == 1 or self.toy:
            return x
        return x.reshape(x.shape[0] // p, p * x.shape[1], *x.shape[2:])

    def z(self, batch: Batch, stream: int) -> Tensor:
        return noise.normal(batch["k"], (self.cfg.z_dim,), self.seed, stream)

    def d_loss(self, nets: Nets, batch: Batch, prev: dict, through_g: bool = False
               ) -> dict[str, Tensor]:
        """D's loss; `through_g`: keep G's graph in the fakes (the full unrolled GAN)."""
        m, D = self.cfg, nets["D"]
        real = batch["x"]
        with nullcontext() if through_g else torch.no_grad():
            fake = nets["G"](self.z(batch, 0))
        if m.penalty == "r1":
            real = real.detach().requires_grad_(True)
        real_out, fake_out = D(self._pack(real)), D(self._pack(fake))
        adv = self.d_obj(real_out, fake_out, m.real_target)
        out = {"real": objectives.real_probability(real_out, m.objective),
               "fake": objectives.real_probability(fake_out, m.objective)}
        loss = adv
        if m.penalty in ("gp", "r1"):
            out["adv"] = adv
        if m.penalty == "gp":
            eps = noise.uniform(batch["k"], (1,) * (real.dim() - 1), self.seed, 2)
            out["gp"] = gradient_penalty(lambda x: D(self._pack(x)), real, fake, m.gp_weight,
                                         eps=eps.to(real.dtype), group=m.pack)
            loss = loss + out["gp"]
        elif m.penalty == "r1":
            out["r1"] = r1_penalty(real, real_out, m.r1_gamma)
            loss = loss + out["r1"]
        if m.objective == "wasserstein":
            out["w_dist"] = -adv.detach()  # the critic's Wasserstein estimate
        out["loss"] = loss
        return out

    def g_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        D = nets["D"]
        if self.cfg.unrolled_steps:
            D = self.unrolled_d(nets, batch)
        fake = nets["G"](self.z(batch, 1))
        return {"loss": self.g_obj(D(self._pack(fake)))}

    def bind_optimizers(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        """The loop hands over each phase's optimizer: the full unroll starts from D's state."""
        self.d_optimizer = optimizers["D"]

    def unrolled_d(self, nets: Nets, batch: Batch) -> Callable[[Tensor], Tensor]:
        """D after `unrolled_steps` D steps on this batch's real images, each step with fresh
        latent codes (sample numbers shifted far from any other stream's): a frozen copy, or
        with `unrolled_backprop` a function of the graph of those steps."""
        through = self.cfg.unrolled_backprop

        def loss(D_k: Callable[[Tensor], Tensor], i: int) -> Tensor:
            shifted = {**batch, "k": batch["k"] + (i + 1) * 2**48}
            return self.d_loss({"G": nets["G"], "D": D_k}, shifted, {}, through)["loss"]

        if through:
            return unroll_through(nets["D"], loss, self.cfg.unrolled_steps, self.d_optimizer,
                                  self.clip)
        make_optimizer, after = self.unroll_settings
        clip = (lambda D_k: after({"D": D_k})) if after is not None else None
        return unroll(nets["D"], loss, self.cfg.unrolled_steps, make_optimizer, clip)

    def fixed_batch(self, dataset, n: int, seed: int) -> Batch:
        count = 2500 if self.toy else n * n
        return {"k": torch.arange(count) + 10**12}  # far from any training sample number

    def sample(self, nets: Nets, fixed: Batch) -> Any:
        z = noise.normal(fixed["k"], (self.cfg.z_dim,), self.seed, 0)
        dev = next(nets["G"].parameters()).device
        out = nets["G"](z.to(dev)).float()
        if self.toy:
            return viz.scatter(out, toy_modes(self.toy_name))
        return viz.square_grid(out, int(len(out) ** 0.5))

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass


def _clip(nets: Nets, c: float) -> None:
    clip_weights([nets["D"]], c)


def _optimizer_factory(cfg: RunConfig) -> OptimizerFactory:
    """D's optimizer as the loop builds it (base learning rate: the schedule is not applied)."""
    t = cfg.train
    if t.optimizer == "rmsprop":
        return partial(torch.optim.RMSprop, lr=t.lr_d)
    return partial(torch.optim.Adam, lr=t.lr_d, betas=t.betas_d)


def build(cfg: RunConfig) -> GAN:
    return GAN(cfg)
