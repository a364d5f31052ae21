"""CUT and FastCUT (Park, Efros, Zhang, Zhu 2020, "Contrastive Learning for Unpaired
Image-to-Image Translation"): one generator G_ab: A -> B, one PatchGAN D_b, and PatchNCE, which
keeps each patch of G_ab(x) closest, among the patches of x, to the patch of x at the same place.

The features are G_ab's own encoder's (translate.nets.resnet feature points); a two-layer MLP
head per chosen point (the paper's H_l) projects the sampled patches onto the unit sphere. The
heads are one net, "H", built from the encoder's known widths before the optimizer, so
checkpoints, resume, DDP and EMA treat it like any other net (the reference builds them lazily
on the first batch).

CUT = lambda_nce 1 + the identity term PatchNCE(y, G_ab(y)) for y in B; FastCUT = lambda_nce 10,
no identity term, flip equivariance (G_ab of a mirrored x, mirrored back, must match x's
features). Unlike the reference, each image draws its own patch positions and its own flip from
(seed, global sample number), so 2 processes with batch b train exactly as 1 with batch 2b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from translate import viz
from translate.augment import parse_policy
from translate.config import RunConfig, fraction, non_negative, positive
from translate.core import noise, objectives
from translate.errors import ConfigError
from translate.methods.base import Batch, Nets, Phase
from translate.methods.cyclegan import CycleGAN, TranslationNetsConfig, build_generator
from translate.nets import build_net, init_weights

_FLIP_STREAM = 1  # noise streams of this method: flips, then one per feature point
_PATCH_STREAM = 2


@dataclass(frozen=True)
class CUTConfig(TranslationNetsConfig):  # generator and D keys as CycleGAN's
    lambda_gan: float = non_negative(1.0)  # weight of G's adversarial loss
    lambda_nce: float = non_negative(1.0)  # PatchNCE weight: CUT 1, FastCUT 10
    nce_idt: bool = True                  # identity PatchNCE on G_ab(y), y in B (CUT; FastCUT: off)
    flip_equivariance: bool = False       # FastCUT: compare G_ab(mirrored x), mirrored back, with x
    # Encoder feature points. ResNet: 0 = the input, 1-2 = the downsampling convs, 2 + k =
    # residual block k (the paper's layers 0, 4, 8, 12, 16 are the input, both downsamplings,
    # blocks 1 and 5). U-Net: 0 = the input, i = encoder level i (1/2**i of the input size).
    nce_layers: tuple[int, ...] = (0, 1, 2, 3, 7)
    num_patches: int = positive(256)      # patches sampled per image and feature point
    nce_t: float = positive(0.07)         # InfoNCE temperature
    head_width: int = positive(256)       # units of both layers of each projection head
    # Not in the paper: an L1 identity term lambda_idt_l1 * L1(G_ab(y), y), y in B (CycleGAN's
    # identity loss; with nce_idt G_ab(y) is computed anyway). PatchNCE keeps structure, not
    # colour: on the demo this term lifted CUT from 25.8 to 28.8 dB at 1,500 steps. With
    # identity_until > 0 its weight falls linearly to 0 at that fraction of the run (0: constant).
    lambda_idt_l1: float = non_negative(0.0)
    identity_until: float = fraction(0.0)
    # The identity terms as a graph apart, built and backpropagated before the translation's,
    # so the activations of G's two passes are never alive together: CUT's peak RSS at 128 px
    # with the paper's nets 1,071 -> 907 MB at the same s/step. Off, x and y share one pass of
    # twice the batch: on small nets (the demo's) 17% faster per step.
    idt_apart: bool = True

    # Keys added since CUT's checkpoints began to carry a fingerprint, with the value that means
    # "as before the key existed": at that value they are left out of the fingerprint, so older
    # checkpoints still resume (translate.core.checkpoint.fingerprint). A new key goes here.
    NEW_KEYS: ClassVar[dict[str, Any]] = {"diff_augment": "", "spectral_norm": False}


def check(cfg: RunConfig) -> None:
    m, d = cfg.model, cfg.data
    if d.kind != "unpaired":
        raise ConfigError("data.kind: cut trains on two unpaired folders; set data.kind = "
                          "'unpaired' with data.root holding trainA and trainB")
    multiple = _strides(m)[-1]
    if d.preprocess != "none" and d.crop_size % multiple:
        raise ConfigError(f"data.crop_size: {d.crop_size} is not a multiple of {multiple}, the "
                          f"{m.generator} generator's stride; use e.g. "
                          f"{max(multiple, d.crop_size // multiple * multiple)}")
    if m.nce_idt and d.channels_a != d.channels_b:
        raise ConfigError("model.nce_idt: the identity term feeds B images to G_ab, which needs "
                          "data.channels_a == data.channels_b; set model.nce_idt = false")
    points = len(_strides(m))
    if not m.nce_layers or len(set(m.nce_layers)) != len(m.nce_layers):
        raise ConfigError(f"model.nce_layers: {list(m.nce_layers)} must name at least one "
                          "feature point, each once, e.g. [0, 1, 2, 3]")
    beyond = [i for i in m.nce_layers if not 0 <= i < points]
    if beyond:
        what = (f"a ResNet with n_blocks = {m.n_blocks} (0 input, 1-2 downsampling convs, 2 + k "
                "residual block k); lower it or raise model.n_blocks" if m.generator == "resnet"
                else f"a U-Net with unet_downs = {m.unet_downs} (0 input, i encoder level i); "
                "lower it")
        raise ConfigError(f"model.nce_layers: {beyond[0]} is beyond the encoder's feature points "
                          f"0..{points - 1} of {what}")
    if d.preprocess != "none":
        check_patches(m, d.crop_size, d.crop_size)
    if m.diff_augment:
        parse_policy(m.diff_augment)


def check_patches(m: CUTConfig, height: int, width: int) -> None:
    """num_patches must fit in every chosen feature map of a height x width input."""
    strides = _strides(m)
    side = min(-(-height // strides[i]) * -(-width // strides[i]) for i in m.nce_layers)
    if m.num_patches > side:
        raise ConfigError(f"model.num_patches: {m.num_patches} is more than the {side} positions "
                          f"of the smallest chosen feature map at {height}x{width} px; lower it "
                          f"to at most {side} or drop the deep points from model.nce_layers")


def _strides(m: CUTConfig) -> tuple[int, ...]:
    """Each feature point's downsampling factor, as the generator's `feature_strides`."""
    if m.generator == "resnet":
        return (1, 2, *[4] * (m.n_blocks + 1))
    return tuple(2**i for i in range(m.unet_downs + 1))


class ProjectionHeads(nn.Module):
    """One MLP per feature point (Linear-ReLU-Linear, `width` units), L2-normalised output."""

    def __init__(self, channels: list[int], width: int) -> None:
        super().__init__()
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(c, width), nn.ReLU(), nn.Linear(width, width))
            for c in channels)

    def forward(self, patches: list[Tensor]) -> list[Tensor]:
        return [F.normalize(mlp(p), dim=-1, eps=1e-7) for mlp, p in zip(self.mlps, patches)]


def patch_nce(q: Tensor, k: Tensor, t: float) -> Tensor:
    """PatchNCE of N images: q and k are (N, P, D) unit vectors of P patches at the same
    positions; for query i of an image the positive is key i of the same image and the
    negatives are its other P - 1 keys (never another image's). Returns the (N,) mean
    cross-entropy over each image's queries, computed in float32."""
    logits = torch.bmm(q.float(), k.float().transpose(1, 2)) / t  # (N, P, P)
    target = torch.arange(q.shape[1], device=q.device).repeat(q.shape[0])
    loss = F.cross_entropy(logits.flatten(0, 1), target, reduction="none")
    return loss.view(q.shape[0], -1).mean(1)


def patch_positions(keys: Tensor, positions: int, n: int, seed: int, stream: int) -> Tensor:
    """(len(keys), n) distinct positions in [0, positions) per image: a pure function of
    (seed, stream, key), so it does not depend on the process count or the resume point.
    The positions of the n smallest draws, ties to the lower position (a stable argsort's
    first n), found by topk on unique integer keys: a full sort of every position cost a CUT
    demo step ~3 ms (topk: ~0.2)."""
    u = noise.uniform(keys, (positions,), seed, stream)  # multiples of 2**-24: exact below
    order = (u * float(1 << 24)).long() * positions + torch.arange(positions, device=u.device)
    return torch.topk(order, n, dim=1, largest=False, sorted=True).indices


def mirrored(x: Tensor, flipped: Tensor) -> Tensor:
    """The (N, C, H, W) batch x with image i mirrored left-right where flipped[i] (N,)."""
    return torch.where(flipped[:, None, None, None], x.flip(3), x)


def gather(feature: Tensor, idx: Tensor) -> Tensor:
    """The (N, P, C) feature vectors of an (N, C, H, W) map at flat positions idx (N, P)."""
    flat = feature.flatten(2).transpose(1, 2)  # (N, H*W, C)
    return torch.gather(flat, 1, idx[:, :, None].expand(-1, -1, flat.shape[2]))


class CUT:
    def __init__(self, cfg: RunConfig):
        m, ca, cb = cfg.model, cfg.data.channels_a, cfg.data.channels_b
        self.cfg, self.seed = m, cfg.seed
        G = build_generator(m, ca, cb)
        self.nets: Nets = {
            "G_ab": G,
            "D_b": build_net("patchgan", in_channels=cb, ndf=m.ndf, n_layers=m.n_layers_d,
                             norm=m.norm, spectral_norm=m.spectral_norm),
            "H": ProjectionHeads([G.feature_channels[i] for i in m.nce_layers], m.head_width),
        }
        for net in self.nets.values():
            init_weights(net, 0.02)
        self.d_obj, self.g_obj = objectives.get(m.objective)
        # D's real and fake in one call (CycleGAN._twice) unless that changes what D computes.
        self._per_image = m.norm != "batch" and not m.spectral_norm
        t, identity = cfg.train, m.nce_idt or m.lambda_idt_l1 > 0
        # G first, then D on the same batch with G's fakes (as CycleGAN here; the reference
        # steps D first): one forward of G per step. The heads train with G.
        self.phases = [
            Phase("G", ("G_ab", "H"), self.g_loss, t.lr_g, t.betas_g, is_generator=True,
                  parts=(self.g_loss_idt,) if m.idt_apart and identity else ()),
            Phase("D", ("D_b",), self.d_loss, t.lr_d, t.betas_d, new_batch=False),
        ]
        self.generators: dict[str, dict[str, Any]] = {"G_ab": {"from": "A", "to": "B"}}

    def nce(self, G: nn.Module, H: nn.Module, src: Tensor, out: Tensor, keys: Tensor,
            flipped: Tensor | None = None, feat_k: list[Tensor] | None = None) -> Tensor:
        """(N,) PatchNCE of each output out[i] = G(src[i]) against its source, averaged over the
        feature points; `flipped` (N,) marks outputs of a mirrored source, mirrored back here.
        `feat_k`: src's features at the NCE layers when the pass that made `out` gave them."""
        m, layers = self.cfg, list(self.cfg.nce_layers)
        feat_q = G(out, layers)
        if flipped is not None:
            feat_q = [mirrored(f, flipped) for f in feat_q]
        if feat_k is None:
            with torch.no_grad():
                feat_k = G(src, layers)
        feat_k = [f.detach() for f in feat_k]  # the keys get no gradient (as the reference)
        check_patches(m, *src.shape[-2:])  # with preprocess "none" the size is known only now
        idx = [patch_positions(keys, f.shape[2] * f.shape[3], m.num_patches, self.seed,
                               _PATCH_STREAM + i).to(f.device) for i, f in zip(layers, feat_k)]
        q = H([gather(f, j) for f, j in zip(feat_q, idx)])
        with torch.no_grad():
            k = H([gather(f, j) for f, j in zip(feat_k, idx)])
        return torch.stack([patch_nce(a, b, m.nce_t) for a, b in zip(q, k)]).mean(0)

    def flips(self, batch: Batch) -> Tensor | None:
        """(N,) which images of the batch go through G mirrored (FastCUT), or None: drawn from
        (seed, sample number), the same for x_i and its y_i."""
        if not self.cfg.flip_equivariance:
            return None
        return noise.uniform(batch["k"], (), self.seed, _FLIP_STREAM).to(batch["a"].device) < 0.5

    def translate(self, nets: Nets, src: Tensor, keys: Tensor,
                  flipped: Tensor | None) -> tuple[Tensor, Tensor]:
        """(G_ab(src), its (N,) PatchNCE against src), src mirrored where `flipped`."""
        G, layers = nets["G_ab"], list(self.cfg.nce_layers)
        if flipped is None:  # the keys come from the same pass that translates src
            out, taps = G(src, taps=layers)
            return out, self.nce(G, nets["H"], src, out, keys, None, taps)
        out = G(mirrored(src, flipped))
        return out, self.nce(G, nets["H"], src, out, keys, flipped)

    def g_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        """G's adversarial loss and PatchNCE of x, and with idt_apart off the identity terms in
        the same graph (with the identity PatchNCE, x and y go through G in one batch)."""
        m, a, b, k = self.cfg, batch["a"], batch["b"], batch["k"]
        n, joint = len(a), m.nce_idt and not m.idt_apart
        flipped = self.flips(batch)
        if joint:  # each y's patches draw from keys 2k + 1
            src, keys = torch.cat([a, b]), torch.cat([2 * k, 2 * k + 1])
            flipped = None if flipped is None else flipped.repeat(2)
        else:
            src, keys = a, 2 * k
        gen, nce = self.translate(nets, src, keys, flipped)
        fake_b = gen[:n]
        out = {"adv": m.lambda_gan * self.g_obj(nets["D_b"](self._aug(fake_b))),
               "nce": nce[:n].mean()}
        out["loss"] = out["adv"] + m.lambda_nce * (0.5 if m.nce_idt else 1.0) * out["nce"]
        if not m.idt_apart:
            idt = self.identity_terms(nets, batch, prev, (gen[n:], nce[n:]) if joint else None)
            out = {**out, **idt, "loss": out["loss"] + idt.get("loss", 0.0)}
        out["fake_b"] = fake_b.detach()
        return out

    def g_loss_idt(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        """The identity terms as a graph apart from g_loss's (idt_apart), backpropagated before
        it is built (Phase.parts): the two passes of G are never alive together."""
        return self.identity_terms(nets, batch, prev)

    def identity_terms(self, nets: Nets, batch: Batch, prev: dict,
                       made: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
        """CUT's identity PatchNCE on G_ab(y), y in B (each y's patches from keys 2k + 1), and
        the L1 identity term; `made`: (G_ab(y), its PatchNCE) when g_loss's pass made them."""
        m, b = self.cfg, batch["b"]
        scale = self.identity_scale(prev) if m.lambda_idt_l1 > 0 else 0.0
        l1_idt = float(scale) > 0  # progress is a CPU tensor: no device sync
        out: dict[str, Tensor] = {}
        if m.nce_idt:
            flipped = self.flips(batch)
            fed = b if flipped is None else mirrored(b, flipped)
            same, nce = made or self.translate(nets, b, 2 * batch["k"] + 1, flipped)
            out["nce_idt"] = nce.mean()
            out["loss"] = m.lambda_nce * 0.5 * out["nce_idt"]
        elif l1_idt:  # G_ab(y) only for the L1 term
            fed, same = b, nets["G_ab"](b)
        if l1_idt:
            out["idt_l1"] = m.lambda_idt_l1 * scale * F.l1_loss(same.float(), fed.float())
            out["loss"] = out.get("loss", 0.0) + out["idt_l1"]
        elif m.lambda_idt_l1 > 0:
            out["idt_l1"] = torch.zeros((), device=b.device)
        return out

    def d_loss(self, nets: Nets, batch: Batch, prev: dict) -> dict[str, Tensor]:
        loss, real_b, fake_b = self._d_one(nets["D_b"], batch["b"], prev["fake_b"])
        return {"loss": loss, "real_b": real_b, "fake_b": fake_b}

    fixed_batch = CycleGAN.fixed_batch  # the first n (a, b) pairs
    identity_scale = CycleGAN.identity_scale  # 1, or falling to 0 at identity_until
    _twice = CycleGAN._twice  # (net(x), net(y)), in one call unless BatchNorm mixes images
    _d_one = CycleGAN._d_one  # D's halved loss on DiffAugmented real and fake, and its outputs
    _aug, _aug_pair = CycleGAN._aug, CycleGAN._aug_pair  # DiffAugment (model.diff_augment)

    def sample(self, nets: Nets, fixed: Batch) -> Any:
        """Rows: A, G_ab(A), B, G_ab(B) (what the identity term keeps close to B)."""
        G = nets["G_ab"]
        dev = next(G.parameters()).device
        a, b = fixed["a"].to(dev), fixed["b"].to(dev)
        rows = [a, G(a), b, G(b)] if a.shape[1] == b.shape[1] else [a, G(a), b]
        return viz.grid([r.float() for r in rows])

    def state(self) -> dict[str, Tensor]:
        return {}

    def load_state(self, state: dict[str, Tensor]) -> None:
        pass


def build(cfg: RunConfig) -> CUT:
    return CUT(cfg)
