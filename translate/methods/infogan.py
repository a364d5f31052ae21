"""InfoGAN (Chen et al. 2016): latent codes c beside the noise z, read back from G's images by a
head Q on D's trunk. Maximising that variational lower bound on the mutual information
I(c; G(z, c)) makes the codes steer distinct factors of the images, with no labels.

Codes: `n_cat` categorical codes of `cat_dim` values (uniform prior, one-hot into G), then
`n_cont` continuous codes ~ U(-1, 1); `translate sample --vary-code i` numbers them in that
order. Q gives logits for each categorical code and a mean for each continuous one. The MI loss is
lambda_cat * cross-entropy + lambda_cont * Gaussian NLL with the standard deviation fixed at 1
(= half the squared error, up to a constant): the paper's factored Gaussian without a learned
variance, which cannot blow up by shrinking the variance. As in the paper the MI loss enters both
players' losses: the D phase trains D's trunk and Q on G's samples, the G phase trains G to make
its codes readable (D and Q frozen).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translate import viz
from translate.config import RunConfig, non_negative, positive
from translate.core import noise, objectives
from translate.errors import ConfigError, UserError
from translate.methods import gan
from translate.methods.base import Batch, CodedSampling, Nets
from translate.methods.cgan import split_d
from translate.nets import build_net, init_weights

CODE_STREAM = 100      # uniform noise streams of the codes (GAN uses 0-2)
CONT_RANGE = 2.0       # --vary-code sweeps a continuous code over [-2, 2]: past the prior's +-1
CONT_STEPS = 10        # columns of a continuous sweep


@dataclass(frozen=True)
class InfoGANConfig(gan.GANConfig):
    n_cat: int = non_negative(1)           # categorical codes
    cat_dim: int = positive(10)            # values of each categorical code (>= 2)
    n_cont: int = non_negative(2)          # continuous codes, each ~ U(-1, 1)
    lambda_cat: float = non_negative(1.0)  # weight of the categorical MI term (cross-entropy)
    lambda_cont: float = non_negative(0.1)  # weight of the continuous MI term (NLL, std 1)
    q_hidden: int = positive(128)          # width of Q's hidden layer


def check(cfg: RunConfig) -> None:
    gan.check(cfg)
    m = cfg.model
    if m.net != "dcgan":
        raise ConfigError("model.net: infogan uses the dcgan nets; set model.net = 'dcgan'")
    if m.n_cat + m.n_cont == 0:
        raise ConfigError("model.n_cat: infogan needs at least one code; set model.n_cat or "
                          "model.n_cont > 0")
    if m.n_cat and m.cat_dim < 2:
        raise ConfigError(f"model.cat_dim: a categorical code needs >= 2 values, got {m.cat_dim}")
    if m.penalty != "none" or m.objective == "wasserstein":
        raise ConfigError("model.penalty: infogan trains without a penalty or critic; use "
                          "penalty 'none' and a non-Wasserstein objective")
    if m.pack != 1 or m.unrolled_steps:
        raise ConfigError("model.pack: infogan reads each sample's codes back; set model.pack = "
                          "1 and model.unrolled_steps = 0")


class InfoD(nn.Module):
    """image -> (D's logits (N,), Q's outputs (N, n_cat * cat_dim + n_cont)) on one trunk."""

    def __init__(self, D: nn.Module, q_out: int, hidden: int) -> None:
        super().__init__()
        self.phi, self.psi = split_d(D)
        self.q = nn.Sequential(nn.Flatten(), nn.Linear(self.psi.in_channels * 16, hidden),
                               nn.LeakyReLU(0.2, True), nn.Linear(hidden, q_out))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.phi(x)  # N x C x 4 x 4 for every dcgan_d size
        return self.psi(h).reshape(x.shape[0]), self.q(h)


def generator_input(m: InfoGANConfig, z: Tensor, cat: Tensor, cont: Tensor) -> Tensor:
    """G's input: noise, the one-hot categorical codes, the continuous codes."""
    one_hot = F.one_hot(cat, m.cat_dim).flatten(1)
    return torch.cat([z, one_hot.to(z.dtype), cont.to(z.dtype)], 1)


def info_loss(m: InfoGANConfig, q: Tensor, cat: Tensor, cont: Tensor) -> dict[str, Tensor]:
    """The weighted MI loss "mi" and its logged parts: cross-entropy summed over categorical
    codes, Q's accuracy on them, and the continuous codes' Gaussian NLL (std 1, no constant)."""
    q = q.float()
    split = m.n_cat * m.cat_dim
    out: dict[str, Tensor] = {}
    mi = q.new_zeros(())
    if m.n_cat:
        logits = q[:, :split].reshape(-1, m.n_cat, m.cat_dim)
        out["mi_cat"] = F.cross_entropy(logits.reshape(-1, m.cat_dim), cat.reshape(-1)) * m.n_cat
        out["q_acc"] = (logits.argmax(-1) == cat).float().mean().detach()
        mi = mi + m.lambda_cat * out["mi_cat"]
    if m.n_cont:
        out["mi_cont"] = 0.5 * ((q[:, split:] - cont) ** 2).sum(1).mean()
        mi = mi + m.lambda_cont * out["mi_cont"]
    out["mi"] = mi
    return out


class InfoGAN(gan.GAN):
    def __init__(self, cfg: RunConfig):
        m = cfg.model
        self.code_dim = m.n_cat * m.cat_dim + m.n_cont
        super().__init__(cfg)  # objective, phases, settings, and build_nets below
        self.generators = {"G": {"latent": True, "metadata": {
            "noise_dim": str(m.z_dim), "codes": describe_codes(m)}}}

    def build_nets(self, cfg: RunConfig) -> Nets:
        """G reads noise + codes; D shares its trunk with the Q head (InfoD)."""
        m, channels = cfg.model, cfg.data.channels_a
        G = build_net("dcgan_g", z_dim=m.z_dim + self.code_dim, ngf=m.ngf,
                      out_channels=channels, image_size=m.image_size, attention=m.self_attention)
        D = build_net("dcgan_d", in_channels=channels, ndf=m.ndf, image_size=m.image_size,
                      norm=m.d_norm, spectral_norm=m.spectral_norm, attention=m.self_attention,
                      minibatch_std=m.minibatch_std)
        info_d = InfoD(D, self.code_dim, m.q_hidden)
        init_weights(G)
        init_weights(info_d)
        return {"G": G, "D": info_d}

    def codes(self, k: Tensor, stream: int) -> tuple[Tensor, Tensor]:
        """Per-sample codes from the prior: (categorical (N, n_cat) int64, continuous (N, n_cont))."""
        m = self.cfg
        u = noise.uniform(k, (m.n_cat,), self.seed, CODE_STREAM + 2 * stream)
        cat = (u * m.cat_dim).long().clamp_max(m.cat_dim - 1)
        cont = noise.uniform(k, (m.n_cont,), self.seed, CODE_STREAM + 2 * stream + 1) * 2 - 1
        return cat, cont

    def d_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        m, D = self.cfg, nets["D"]
        cat, cont = self.codes(batch["k"], 0)
        with torch.no_grad():
            fake = nets["G"](generator_input(m, self.z(batch, 0), cat, cont))
        real_out, _ = D(batch["x"])
        fake_out, q = D(fake)
        adv = self.d_obj(real_out, fake_out, m.real_target)
        info = info_loss(m, q, cat, cont)
        return {"loss": adv + info["mi"], "adv": adv,
                "real": objectives.real_probability(real_out, m.objective),
                "fake": objectives.real_probability(fake_out, m.objective), **info}

    def g_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        m = self.cfg
        cat, cont = self.codes(batch["k"], 1)
        fake_out, q = nets["D"](nets["G"](generator_input(m, self.z(batch, 1), cat, cont)))
        adv = self.g_obj(fake_out)
        info = info_loss(m, q, cat, cont)
        return {"loss": adv + info["mi"], "adv": adv, **info}

    def fixed_batch(self, dataset: Any, n: int, seed: int) -> Batch:
        return {"k": torch.arange(n) + 10**12}

    def sample(self, nets: Nets, fixed: Batch) -> Any:
        """Code 0 varied along each row, z and the other codes fixed per row."""
        m, dev = self.cfg, next(nets["G"].parameters()).device
        z = noise.normal(fixed["k"], (m.z_dim,), self.seed, 0)
        cat, cont = self.codes(fixed["k"], 0)
        x, columns = vary_code_input(m, 0, z, cat, cont)
        return viz.square_grid(nets["G"](x.to(dev)).float(), columns)


def describe_codes(m: InfoGANConfig) -> str:
    """e.g. "0: categorical (10 values); 1-2: continuous" """
    parts = []
    if m.n_cat:
        first = "0" if m.n_cat == 1 else f"0-{m.n_cat - 1}"
        parts.append(f"{first}: categorical ({m.cat_dim} values)")
    if m.n_cont:
        last = m.n_cat + m.n_cont - 1
        first = str(m.n_cat) if m.n_cont == 1 else f"{m.n_cat}-{last}"
        parts.append(f"{first}: continuous")
    return "; ".join(parts)


def vary_code_input(m: InfoGANConfig, code: int, z: Tensor, cat: Tensor, cont: Tensor
                    ) -> tuple[Tensor, int]:
    """G inputs for rows of (z, cat, cont) along which code `code` takes every category (or
    CONT_STEPS values over [-CONT_RANGE, CONT_RANGE]). Returns (inputs, columns)."""
    if code < m.n_cat:
        values = torch.arange(m.cat_dim)
    else:
        values = torch.linspace(-CONT_RANGE, CONT_RANGE, CONT_STEPS)
    cols, rows = len(values), len(z)
    z, cat, cont = (t.repeat_interleave(cols, 0) for t in (z, cat, cont))
    if code < m.n_cat:
        cat[:, code] = values.repeat(rows)
    else:
        cont[:, code - m.n_cat] = values.repeat(rows)
    return generator_input(m, z, cat, cont), cols


def prior_codes(m: InfoGANConfig, n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    z = torch.randn(n, m.z_dim, generator=generator)
    cat = torch.randint(m.cat_dim, (n, m.n_cat), generator=generator)
    cont = torch.rand(n, m.n_cont, generator=generator) * 2 - 1
    return z, cat, cont


def code_grid(cfg: RunConfig, G: nn.Module, n: int, generator: torch.Generator,
              code: int | None) -> np.ndarray:
    """`translate sample`: n samples with codes from the prior; with `--vary-code i`, rows in
    which only code i changes (every category, or a sweep of a continuous code)."""
    m = cfg.model
    if code is None:
        return viz.square_grid(prior_samples(cfg, G, n, generator), max(1, int(n ** 0.5)))
    if not 0 <= code < m.n_cat + m.n_cont:
        raise UserError(f"--vary-code: {code} is not a code of this run; valid: "
                        f"{describe_codes(m)}")
    cols = m.cat_dim if code < m.n_cat else CONT_STEPS
    inputs, cols = vary_code_input(m, code, *prior_codes(m, max(1, n // cols), generator))
    return viz.square_grid(G(inputs).float(), cols)


def prior_samples(cfg: RunConfig, G: nn.Module, n: int, generator: torch.Generator) -> Tensor:
    """n samples (N, C, H, W in [-1, 1]) with z and the codes drawn from their priors."""
    return G(generator_input(cfg.model, *prior_codes(cfg.model, n, generator))).float()


@torch.no_grad()
def q_accuracy(cfg: RunConfig, G: nn.Module, D: nn.Module, n: int = 256, seed: int = 0
               ) -> list[float]:
    """How often Q reads each categorical code back from n fresh samples of G (chance is
    1 / cat_dim). D judges the whole batch with batch statistics, as in training, on a copy:
    its BatchNorm running statistics mix real and fake batches, so in eval mode Q would read
    fakes through statistics that fit neither."""
    m = cfg.model
    z, cat, cont = prior_codes(m, n, torch.Generator().manual_seed(seed))
    _, q = copy.deepcopy(D).train()(G(generator_input(m, z, cat, cont)))
    logits = q[:, : m.n_cat * m.cat_dim].reshape(n, m.n_cat, m.cat_dim)
    return (logits.argmax(-1) == cat).float().mean(0).tolist()


def separate_samples(cfg: RunConfig, G: nn.Module, generator: torch.Generator,
                     _code: int | None) -> list:
    """`sample --separate`: samples with codes from their priors."""
    return [("", lambda k: prior_samples(cfg, G, k, generator))]


SAMPLING = CodedSampling("--vary-code", "--vary-code I", "an infogan run", "grid", code_grid,
                         separate_samples)


def build(cfg: RunConfig) -> InfoGAN:
    return InfoGAN(cfg)
