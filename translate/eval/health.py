"""Training health detectors: pure functions that each turn a few tensors (or logged values)
into one number and a verdict. They answer the questions users ask days too late: is the output
just the input, are the colours inverted, is there a checkerboard, did the outputs collapse to
one, has D won, has a loss exploded. translate/eval/monitor.py runs them during training.

Images are NCHW float tensors in [-1, 1]. Each detector returns a `Verdict`, or None where it
does not apply (no source image, different channel counts, 2-D points instead of images).
Thresholds are module constants, chosen so that the trigger cases in tests/test_health.py fire
and a good translation (the demo's exact colour mapping) and tiny healthy runs stay silent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Identity collapse: G moved the colours less than this share of the distance between the two
# domains' colour distributions (a G that reaches B's distribution scores at least 1).
IDENTITY_RATIO = 0.25
MIN_DOMAIN_GAP = 0.02  # below this (in [-1, 1] units) the domains look alike: no verdict
IDENTITY_CELLS = 8  # identity is judged on the mean colours of an 8x8 grid of blocks
# Colour inversion: the inverted output is closer to the target colours by this margin.
INVERSION_MARGIN = 0.25
# Checkerboard: this many times (log2) more periodic energy than the reference images have.
CHECKERBOARD_LOG2 = 1.0
PERIODS = (2, 4, 8)  # the x2 upsamplings' periods in pixels (Nyquist of each stage)
# Mode collapse: outputs differ from each other less than this share of the reference's spread.
DIVERSITY_RATIO = 0.1
MAX_PAIRS_SAMPLES = 256  # pairwise distances on at most this many samples
# D wins: mean D(real) - D(fake) above this, on the probability scale of the objectives below.
D_WINS_MARGIN = 0.8
D_WINS_OBJECTIVES = ("minimax", "nonsaturating", "lsgan")  # D outputs target 1 (real) / 0 (fake)
# Loss explosion: a loss this many times its running median (at least EXPLOSION_FLOOR of it).
EXPLOSION_RATIO = 10.0
EXPLOSION_FLOOR = 0.1
QUANTILES = 64  # points of each channel's colour distribution
MAX_PIXELS = 16384  # values per channel the quantiles are taken from


# detector -> (+1: bad above the threshold, -1: bad below it; the threshold). A verdict follows
# from its logged value alone, so a resumed run and `translate doctor` recover it from the log.
THRESHOLDS: dict[str, tuple[int, float]] = {
    "identity": (-1, IDENTITY_RATIO),
    "inversion": (1, INVERSION_MARGIN),
    "checkerboard": (1, CHECKERBOARD_LOG2),
    "diversity": (-1, DIVERSITY_RATIO),
    "d_wins": (1, D_WINS_MARGIN),
    "explosion": (1, EXPLOSION_RATIO),
}


def is_bad(detector: str, value: float) -> bool:
    sign, threshold = THRESHOLDS[detector]
    return sign * (value - threshold) > 0


@dataclass(frozen=True)
class Verdict:
    detector: str  # a key of THRESHOLDS
    value: float   # logged as health/<detector>
    detail: str    # the numbers behind it, for the warning line

    @property
    def bad(self) -> bool:
        """The condition holds at this check."""
        return is_bad(self.detector, self.value)


# ---------------------------------------------------------------------------- colour statistics


def _quantiles(x: Tensor) -> Tensor:
    """(C, QUANTILES): each channel's colour distribution over the batch (from an evenly
    strided subset of at most MAX_PIXELS values: sorting them all is the slow part)."""
    flat = x.detach().float().transpose(0, 1).reshape(x.shape[1], -1)
    flat = flat[:, ::max(1, flat.shape[1] // MAX_PIXELS)]
    q = torch.linspace(0, 1, QUANTILES, dtype=flat.dtype)
    return torch.quantile(flat, q, dim=1).T


def colour_distance(x: Tensor, y: Tensor) -> float:
    """Mean over channels of the 1-D Wasserstein distance between the two batches' pixel values
    (the mean gap between matching quantiles). Any pixelwise map from x to y moves the pixels
    by at least this much on average: mean |G(x) - x| >= colour_distance(G(x), x)."""
    return float((_quantiles(x) - _quantiles(y)).abs().mean())


def coarse(x: Tensor) -> Tensor:
    """Mean colours of an IDENTITY_CELLS x IDENTITY_CELLS grid of blocks: what a blurry copy
    shares with its original."""
    side = min(IDENTITY_CELLS, *x.shape[-2:])
    return F.adaptive_avg_pool2d(x.detach().float(), side)


def identity_collapse(source: Tensor, output: Tensor, target: Tensor) -> Verdict | None:
    """G(x) ~ x while the domains differ, compared on coarse() blocks (so that a blurred copy
    still counts as a copy). value = mean |G(x) - x| / colour_distance(x, target): 0 for the
    identity, >= ~1 for any G whose outputs have the target domain's colours."""
    if source.dim() != 4 or source.shape != output.shape or source.shape[1] != target.shape[1]:
        return None
    source, output, target = coarse(source), coarse(output), coarse(target)
    change = float((output - source).abs().mean())
    gap = colour_distance(source, target)
    if gap < MIN_DOMAIN_GAP:
        return None
    ratio = change / gap
    return Verdict("identity", ratio, f"mean |G(x) - x| = {change:.3f} (8x8 blocks), "
                   f"{ratio:.0%} of the colour gap {gap:.3f} between the domains")


def colour_inversion(output: Tensor, target: Tensor) -> Verdict | None:
    """The output's colour distribution mirrored: its negative matches the target domain's
    colours better than the output itself. value = (d(G, B) - d(-G, B)) / (d(G, B) + d(-G, B)),
    in [-1, 1]; near 0 when B's colours are symmetric (then inversion cannot be seen, and
    does not change the colour statistics)."""
    if output.dim() != 4 or output.shape[1] != target.shape[1]:
        return None
    q_out, q_target = _quantiles(output), _quantiles(target)
    straight = float((q_out - q_target).abs().mean())
    inverted = float((-q_out.flip(1) - q_target).abs().mean())  # the quantiles of -output
    value = (straight - inverted) / max(straight + inverted, 1e-8)
    ratio = straight / max(inverted, 1e-8)
    return Verdict("inversion", value, f"the inverted output is {ratio:.1f}x closer to the "
                   "target domain's colours")


# ---------------------------------------------------------------------------- checkerboard


def periodic_energy(x: Tensor, periods: Sequence[int] = PERIODS) -> float:
    """log2 of how far the power spectrum rises at the frequencies of a pattern repeating every
    p pixels (p in `periods`; the lattice of multiples of H/p, W/p) above its 8 neighbours,
    the strongest period counted. Natural images have a smooth spectrum (about 0); the
    checkerboard of a stride-2 transposed convolution is a spike at Nyquist (p = 2), one more
    per earlier upsampling (p = 4, 8)."""
    h, w = x.shape[-2:]
    centred = x.detach().float() - x.detach().float().mean(dim=(-2, -1), keepdim=True)
    power = torch.fft.fft2(centred).abs().square().mean(dim=(0, 1))  # (H, W)
    best = -math.inf
    for p in periods:
        if h % p or w % p or min(h, w) < 2 * p:
            continue
        u = torch.arange(p) * (h // p)
        v = torch.arange(p) * (w // p)
        lattice = [(int(i), int(j)) for i in u for j in v if (i, j) != (0, 0)]
        peak = sum(float(power[i, j]) for i, j in lattice) / len(lattice)
        ring = [float(power[(i + di) % h, (j + dj) % w]) for i, j in lattice
                for di in (-1, 0, 1) for dj in (-1, 0, 1) if (di, dj) != (0, 0)]
        best = max(best, math.log2((peak + 1e-12) / (sum(ring) / len(ring) + 1e-12)))
    return best


def checkerboard(output: Tensor, reference: Tensor) -> Verdict | None:
    """Periodic energy of the output above the reference's (the input images for a translator,
    real images for a latent GAN), in log2 units: 1 = twice the reference's."""
    if output.dim() != 4 or reference.dim() != 4 or min(output.shape[-2:]) < 4:
        return None
    out, ref = periodic_energy(output), periodic_energy(reference)
    if not (math.isfinite(out) and math.isfinite(ref)):
        return None
    value = out - ref
    return Verdict("checkerboard", value, f"{2 ** value:.1f}x the periodic energy that real "
                   "images have at the upsampling periods")


# ---------------------------------------------------------------------------- diversity


def mean_pairwise_distance(x: Tensor) -> float:
    """Mean |x_i - x_j| per element over pairs of samples (the first MAX_PAIRS_SAMPLES)."""
    flat = x.detach().float()[:MAX_PAIRS_SAMPLES].reshape(min(len(x), MAX_PAIRS_SAMPLES), -1)
    n = len(flat)
    if n < 2:
        return math.nan
    d = torch.cdist(flat, flat, p=1).sum() / (n * (n - 1))
    return float(d) / flat.shape[1]


def diversity(output: Tensor, reference: Tensor) -> Verdict | None:
    """Mode collapse: how much outputs for different inputs differ from each other, relative to
    how much the reference samples (the inputs, or real samples for a latent GAN) do. About 1
    for a healthy generator, 0 for a constant one."""
    spread = mean_pairwise_distance(reference)
    if len(output) < 2 or not spread > 0:
        return None
    value = mean_pairwise_distance(output) / spread
    return Verdict("diversity", value, f"outputs differ from each other by {value:.0%} of "
                   "what real samples do")


# ---------------------------------------------------------------------------- logged losses


def d_pairs(keys: Sequence[str]) -> list[tuple[str, str]]:
    """(D/real..., D/fake...) keys logged by the discriminator phases, paired by suffix."""
    keys = set(keys)
    return sorted((k, "D/fake" + k[len("D/real"):]) for k in keys
                  if k.startswith("D/real") and "D/fake" + k[len("D/real"):] in keys)


def d_wins(window: Sequence[dict[str, float]], objective: str) -> Verdict | None:
    """D(real) -> 1 and D(fake) -> 0: the largest mean D(real) - D(fake) over the logged
    discriminators in `window` (the log records of the last check interval)."""
    if objective not in D_WINS_OBJECTIVES or not window:
        return None
    pairs = d_pairs(window[-1])
    if not pairs:
        return None
    margins = {}
    for real, fake in pairs:
        values = [r[real] - r[fake] for r in window if real in r and fake in r]
        margins[real] = sum(values) / len(values)
    key = max(margins, key=margins.get)
    name = key[len("D/real"):].lstrip("_") or "D"
    label = "D" if name == "D" else f"D_{name}"
    return Verdict("d_wins", margins[key], f"{label}(real) - {label}(fake) = {margins[key]:.2f}")


def loss_explosion(window: Sequence[dict[str, float]], history: Sequence[dict[str, float]]
                   ) -> Verdict | None:
    """The largest mean |loss| over the log records of `window` / max(its median over the
    earlier records of `history`, EXPLOSION_FLOOR), over the phases' losses (*/loss). No
    verdict before the history holds three records."""
    if len(history) < 3 or not window:
        return None
    worst, detail = 0.0, ""
    for key in sorted(k for k in window[-1] if k.endswith("/loss")):
        now = [abs(r[key]) for r in window if key in r and math.isfinite(r[key])]
        before = sorted(abs(h[key]) for h in history if key in h and math.isfinite(h[key]))
        if not now or not before:
            continue
        level = max(before[len(before) // 2], EXPLOSION_FLOOR)
        ratio = (sum(now) / len(now)) / level
        if ratio > worst:
            worst, detail = ratio, (f"|{key}| = {sum(now) / len(now):.3g}, {ratio:.0f}x its "
                                    f"median so far ({level:.3g})")
    if not detail:
        return None
    return Verdict("explosion", worst, detail)
