"""CycleGAN (Zhu et al. 2017): G_ab: A -> B and G_ba: B -> A, discriminators D_a and D_b,
adversarial + cycle-consistency + identity losses, with the reference implementation's defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from translate import viz
from translate.augment import diff_augment, diff_augment_pair, parse_policy
from translate.config import RunConfig, choice, fraction, non_negative, positive, probability_target
from translate.core import objectives
from translate.errors import ConfigError
from translate.methods.base import Batch, Nets, Phase
from translate.methods.pool import ImagePool
from translate.nets import build_net, init_weights

# Row labels of the sample grids: each domain's real images, their translation, and the
# translation translated back (the cycle).
SAMPLE_ROWS = ["real A", "translated", "reconstructed", "real B", "translated", "reconstructed"]


@dataclass(frozen=True)
class TranslationNetsConfig:
    """The generator and discriminator keys of the A -> B methods (CycleGAN, CUT)."""

    generator: str = choice("resnet", "resnet", "unet")  # ResNet (paper) or U-Net generators
    n_blocks: int = positive(9)           # ResNet blocks: 9 for 256px, 6 for 128px (paper)
    unet_downs: int = positive(8)         # U-Net downsamplings: 7 for 128px, 8 for 256px
    unet_full_res: bool = False           # U-Net: a full-resolution last level that sees the input
    unet_affine_out: bool = False         # U-Net: write a per-pixel affine colour transform of
                                          # the input (its detail passes exactly), not the image
    ngf: int = positive(64)               # generator width
    ndf: int = positive(64)               # discriminator width
    n_layers_d: int = positive(3)         # PatchGAN depth: 3 gives 70x70 patches
    norm: str = choice("instance", "instance", "batch", "none")
    dropout: float = non_negative(0.0)    # dropout in ResNet blocks / U-Net (reference: off)
    # Generator x2 upsampling, both kinds: "bilinear" (the default) = bilinear x2 + 3x3 conv;
    # "resize" = nearest x2 + 3x3 conv; "subpixel" = conv + PixelShuffle, ICNR-initialised;
    # "transpose" = transposed conv (the paper's), which draws checkerboards (Odena et al.
    # 2016). Only "bilinear" stayed free of a period-2 pattern after training (tests/test_nets).
    upsample: str = choice("bilinear", "transpose", "resize", "bilinear", "conv_bilinear", "subpixel")
    # Border padding of the generators' strided convs: "reflect" (the default; the ResNet's other
    # convs always reflect) or "zero" (the paper's; zero padding draws stripes along the border).
    padding: str = choice("reflect", "zero", "reflect")
    objective: str = choice("lsgan", *objectives.OBJECTIVES)
    real_target: float = probability_target(1.0)    # one-sided label smoothing (D only)
    diff_augment: str = ""                # DiffAugment policy on D's inputs, e.g. "color,translation"
    spectral_norm: bool = False           # spectral normalisation on D's layers

    # What a run's config.json saved before a key existed was trained with (recipe.load_json).
    LEGACY: ClassVar[dict[str, Any]] = {"padding": "zero"}


@dataclass(frozen=True)
class CycleGANConfig(TranslationNetsConfig):
    lambda_cycle: float = non_negative(10.0)  # weight of each direction's L1 cycle loss
    lambda_identity: float = non_negative(0.5)  # identity L1 weight, relative to lambda_cycle
    # Fraction of the run over which the identity weight falls linearly to 0 (0 = constant, as
    # the paper). The identity loss picks the right one of several consistent mappings early,
    # but asks G_ab to leave B-like colours alone, which a true mapping does not.
    identity_until: float = fraction(0.0)
    pool_size: int = non_negative(50)     # image history per direction; 0 disables it


def check(cfg: RunConfig) -> None:
    m, d = cfg.model, cfg.data
    if d.kind != "unpaired":
        raise ConfigError("data.kind: cyclegan trains on two unpaired folders; set data.kind = "
                          "'unpaired' with data.root holding trainA and trainB")
    multiple = 4 if m.generator == "resnet" else 2**m.unet_downs
    if d.preprocess != "none" and d.crop_size % multiple:
        raise ConfigError(f"data.crop_size: {d.crop_size} is not a multiple of {multiple}, the "
                          f"{m.generator} generator's stride; use e.g. "
                          f"{max(multiple, d.crop_size // multiple * multiple)}")
    if m.lambda_identity > 0 and d.channels_a != d.channels_b:
        raise ConfigError("model.lambda_identity: the identity loss needs data.channels_a == "
                          "data.channels_b; set model.lambda_identity = 0")
    if m.diff_augment:
        parse_policy(m.diff_augment)


def build_generator(m: TranslationNetsConfig, cin: int, cout: int):
    if m.generator == "resnet":
        return build_net("resnet", in_channels=cin, out_channels=cout, ngf=m.ngf,
                         n_blocks=m.n_blocks, norm=m.norm, dropout=m.dropout,
                         upsample=m.upsample, padding=m.padding)
    return build_net("unet", in_channels=cin, out_channels=cout, num_downs=m.unet_downs,
                     ngf=m.ngf, norm=m.norm, dropout=m.dropout, upsample=m.upsample,
                     padding=m.padding, full_res=m.unet_full_res,
                     affine_out=m.unet_affine_out)


class CycleGAN:
    def __init__(self, cfg: RunConfig):
        m, ca, cb = cfg.model, cfg.data.channels_a, cfg.data.channels_b
        self.cfg = m
        self.nets: Nets = {
            "G_ab": build_generator(m, ca, cb),
            "G_ba": build_generator(m, cb, ca),
            "D_a": build_net("patchgan", in_channels=ca, ndf=m.ndf, n_layers=m.n_layers_d,
                             norm=m.norm, spectral_norm=m.spectral_norm),
            "D_b": build_net("patchgan", in_channels=cb, ndf=m.ndf, n_layers=m.n_layers_d,
                             norm=m.norm, spectral_norm=m.spectral_norm),
        }
        for net in self.nets.values():
            init_weights(net, 0.02)
        self.pool_a, self.pool_b = ImagePool(m.pool_size), ImagePool(m.pool_size)
        # Is a net's output for an image independent of the rest of its batch? Not with
        # BatchNorm (batch statistics), nor with spectral norm (a power iteration per call).
        self._per_image = m.norm != "batch" and not m.spectral_norm
        # train.compile "auto": compiled bf16 steps measured 1.15-1.26x faster (bench/speed.py).
        self.compile_pays = True
        self.d_obj, self.g_obj = objectives.get(m.objective)
        t = cfg.train
        # G first, then D on the same batch with G's fakes, as in the reference implementation.
        self.phases = [
            Phase("G", ("G_ab", "G_ba"), self.g_loss, t.lr_g, t.betas_g, is_generator=True),
            Phase("D", ("D_a", "D_b"), self.d_loss, t.lr_d, t.betas_d, new_batch=False),
        ]
        self.generators: dict[str, dict[str, Any]] = {
            "G_ab": {"from": "A", "to": "B"},
            "G_ba": {"from": "B", "to": "A"},
        }

    def _aug(self, x: Tensor) -> Tensor:
        # DiffAugment on every input of D, differentiable, so G learns through it while D never
        # sees un-augmented images (Zhao et al. 2020).
        return diff_augment(x, self.cfg.diff_augment) if self.cfg.diff_augment else x

    def _aug_pair(self, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
        # One draw for both batches: real and fake differ only in content, never in augmentation.
        if not self.cfg.diff_augment:
            return real, fake
        return diff_augment_pair(real, fake, self.cfg.diff_augment)

    def _twice(self, net, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(net(x), net(y)), in one call of twice the batch where that is the same thing: the
        nets then make half as many, larger convolution calls, and each weight's gradient is
        accumulated once fewer per step (with bf16, ~15% of a 128 px step at batch 1)."""
        if not self._per_image:
            return net(x), net(y)
        return net(torch.cat([x, y])).split(len(x))

    def g_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        m = self.cfg
        a, b = batch["a"], batch["b"]
        # The identity terms cost a third of G's work; once identity_until has brought their
        # weight to 0 they are not computed (logged as 0, so every record has the same keys).
        scale = self.identity_scale(prev) if m.lambda_identity > 0 else 0.0
        identity = float(scale) > 0  # progress is a CPU tensor: no device sync
        if identity:
            # Each G translates and reproduces its own domain in one call (see _per_image).
            fake_b, idt_b = self._twice(nets["G_ab"], a, b)
            fake_a, idt_a = self._twice(nets["G_ba"], b, a)
        else:
            fake_b, fake_a = nets["G_ab"](a), nets["G_ba"](b)
        rec_a, rec_b = nets["G_ba"](fake_b), nets["G_ab"](fake_a)
        out = {
            "adv_ab": self.g_obj(nets["D_b"](self._aug(fake_b))),
            "adv_ba": self.g_obj(nets["D_a"](self._aug(fake_a))),
            "cycle_a": m.lambda_cycle * F.l1_loss(rec_a.float(), a.float()),
            "cycle_b": m.lambda_cycle * F.l1_loss(rec_b.float(), b.float()),
        }
        if identity:
            w = m.lambda_cycle * m.lambda_identity * scale
            out["idt_a"] = w * F.l1_loss(idt_a.float(), a.float())
            out["idt_b"] = w * F.l1_loss(idt_b.float(), b.float())
        elif m.lambda_identity > 0:
            out["idt_a"] = out["idt_b"] = torch.zeros((), device=a.device)
        out["loss"] = sum(out.values())
        out["fake_a"], out["fake_b"] = fake_a.detach(), fake_b.detach()
        return out

    def identity_scale(self, prev: dict) -> Tensor | float:
        """1, or with identity_until the linear fall to 0 at that fraction of the run."""
        if self.cfg.identity_until == 0:
            return 1.0
        return (1 - prev["progress"] / self.cfg.identity_until).clamp_min(0.0)

    def _d_one(self, D, real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        real, fake = self._aug_pair(real, fake)
        real_out, fake_out = self._twice(D, real, fake)
        # Halved as in the reference: slows D relative to G.
        loss = 0.5 * self.d_obj(real_out, fake_out, self.cfg.real_target)
        return (loss, objectives.real_probability(real_out, self.cfg.objective),
                objectives.real_probability(fake_out, self.cfg.objective))

    def d_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        fake_a = self.pool_a.query(prev["fake_a"])
        fake_b = self.pool_b.query(prev["fake_b"])
        loss_a, real_a, fake_a_p = self._d_one(nets["D_a"], batch["a"], fake_a)
        loss_b, real_b, fake_b_p = self._d_one(nets["D_b"], batch["b"], fake_b)
        return {"loss": loss_a + loss_b, "D_a": loss_a, "D_b": loss_b,
                "real_a": real_a, "fake_a": fake_a_p, "real_b": real_b, "fake_b": fake_b_p}

    def fixed_batch(self, dataset, n: int, seed: int) -> Batch:
        items = [dataset[k] for k in range(n)]
        return {key: torch.stack([it[key] for it in items]) for key in ("a", "b")}

    def sample(self, nets: Nets, fixed: Batch) -> Any:
        dev = next(nets["G_ab"].parameters()).device
        a, b = fixed["a"].to(dev), fixed["b"].to(dev)
        fake_b, fake_a = nets["G_ab"](a), nets["G_ba"](b)
        rows = [a, fake_b, nets["G_ba"](fake_b), b, fake_a, nets["G_ab"](fake_a)]
        return viz.grid([r.float() for r in rows], labels=SAMPLE_ROWS)

    def state(self) -> dict[str, Tensor]:
        return {"pool_a": self.pool_a.state(), "pool_b": self.pool_b.state()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        dev = next(self.nets["G_ab"].parameters()).device
        if "pool_a" in state:
            self.pool_a.load(state["pool_a"], dev)
            self.pool_b.load(state["pool_b"], dev)


def build(cfg: RunConfig) -> CycleGAN:
    return CycleGAN(cfg)
