"""Evaluation metrics as pure functions: PSNR/SSIM, cycle scores, toy mode coverage, FID/KID.

Images are float tensors (N, C, H, W) in [-1, 1]. The feature extractors for FID/KID live in
translate/eval/fid.py and are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from translate.errors import UserError
from translate.eval.fid import FeatureExtractor, FIDInceptionV3, load_inception, small_feature_net
from translate.images import list_images, load_image, to_tensor

PACGAN_SAMPLES = 2500  # generator samples per evaluation in PacGAN's protocol

__all__ = [
    "GRID_STD",
    "RING_STD",
    "FIDInceptionV3",
    "FeatureExtractor",
    "cycle_scores",
    "fid_from_features",
    "fid_kid_folders",
    "folder_features",
    "frechet_distance",
    "grid_modes",
    "kid_from_features",
    "kid_interval",
    "kid_subsets",
    "load_inception",
    "mean_and_stderr",
    "metric_images",
    "mode_stats",
    "psnr",
    "psnr_per_image",
    "ring_modes",
    "small_feature_net",
    "ssim",
]

# Mode standard deviations of the PacGAN toy benchmarks (Lin et al. 2018, after VEEGAN).
RING_STD = 0.01  # 8 modes on the unit circle
GRID_STD = 0.05  # 25 modes on {-4, -2, 0, 2, 4}^2


# --- Image similarity -------------------------------------------------------------------

def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"expected two NCHW tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")


def _to_unit(x: Tensor) -> Tensor:
    return (x.float() + 1.0) / 2.0


def psnr_per_image(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """PSNR of each image pair in dB, shape (N,). `data_range` is in [-1, 1] units.

    Computed with kornia on images mapped to [0, 1] (peak data_range / 2); PSNR is invariant
    to that rescaling. Identical images give inf.
    """
    _check_pair(x, y)
    peak = data_range / 2.0
    x01, y01 = _to_unit(x), _to_unit(y)
    # kornia pools one MSE over the whole batch, so call it image by image.
    return torch.stack([kornia.metrics.psnr(a, b, peak) for a, b in zip(x01, y01)])


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Mean over the batch of per-image PSNR, in dB (not the PSNR of the pooled MSE)."""
    return psnr_per_image(x, y, data_range).mean()


def ssim(x: Tensor, y: Tensor, window: int = 11) -> Tensor:
    """Mean SSIM (Wang et al. 2004) with kornia: Gaussian window sigma 1.5, K1=0.01, K2=0.03.

    Images are mapped to [0, 1] (data range 1). Only windows that fit inside the image are
    averaged ("valid"), like the reference code and skimage's structural_similarity with
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.
    """
    _check_pair(x, y)
    if min(x.shape[-2:]) < window:
        raise ValueError(f"ssim needs images of at least {window}x{window} pixels, "
                         f"got {tuple(x.shape[-2:])}")
    ssim_map = kornia.metrics.ssim(_to_unit(x), _to_unit(y), window, max_val=1.0,
                                   padding="valid")
    return ssim_map.mean()


def cycle_scores(x: Tensor, x_rec: Tensor) -> dict[str, float]:
    """How well a cycle G_ba(G_ab(x)) reconstructs x: mean PSNR (dB) and mean |x - x_rec|
    (in [-1, 1] units)."""
    _check_pair(x, x_rec)
    return {"cycle_psnr": float(psnr(x, x_rec)),
            "cycle_l1": float((x.float() - x_rec.float()).abs().mean())}


# --- Toy 2-D mixtures (PacGAN protocol) -----------------------------------------------

def checkerboard_peak(y: Tensor, periods: Sequence[int] = (2, 4), window: int = 3) -> float:
    """How strongly images (N, C, H, W) repeat with a period of 2 or 4 pixels: the largest ratio,
    over the frequencies of those periods, of the amplitude spectrum (summed over images and
    channels, means removed, Hann-windowed) to the median of its neighbours within `window` bins. A x2
    upsampling that draws a checkerboard puts a spike there (Odena et al. 2016); on the output
    of a smooth input an artifact-free generator stays near 1, as natural spectra decay
    smoothly. H and W must be multiples of every period."""
    h, w = y.shape[-2:]
    if any(h % p or w % p for p in periods):
        raise ValueError(f"checkerboard_peak: {h}x{w} is not a multiple of {tuple(periods)}")
    y = y.float() - y.float().mean(dim=(-2, -1), keepdim=True)
    # A Hann window: the FFT sees the image as periodic, and the jump between opposite borders
    # would otherwise leak energy along the axes of the spectrum, where periods of 2 and 4 lie.
    hann = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False))
    spectrum = torch.fft.fft2(y * hann).abs().sum(dim=tuple(range(y.dim() - 2)))
    offsets = [(i, j) for i in range(-window, window + 1) for j in range(-window, window + 1)
               if (i, j) != (0, 0)]
    worst = 0.0
    for p in periods:
        for a in range(p):
            for b in range(p):
                if (a, b) == (0, 0):
                    continue
                fy, fx = a * h // p, b * w // p
                around = torch.stack([spectrum[(fy + i) % h, (fx + j) % w] for i, j in offsets])
                worst = max(worst, float(spectrum[fy, fx] / around.median().clamp_min(1e-12)))
    return worst


def ring_modes(n: int = 8, radius: float = 1.0) -> Tensor:
    """(n, 2) means evenly spaced on a circle, the first at (radius, 0)."""
    angle = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return (radius * torch.stack([angle.cos(), angle.sin()], dim=1)).float()


def grid_modes() -> Tensor:
    """(25, 2) means on {-4, -2, 0, 2, 4}^2, x-major."""
    axis = torch.arange(-4.0, 5.0, 2.0)
    return torch.cartesian_prod(axis, axis)


def mode_stats(samples: Tensor, modes: Tensor, std: float) -> dict[str, float | int]:
    """Mode coverage of 2-D samples against an isotropic Gaussian mixture with equal weights.

    Each sample is assigned to its nearest mode (Euclidean). It is high-quality when its
    offset from that mode is below 3*std on BOTH axes (a 6*std square; PacGAN's released code
    uses a disk of radius 3*std instead, which keeps 98.9% of true samples rather than 99.5%).
    Returns:
      "modes": number of modes with at least one high-quality sample;
      "hq":    fraction of all samples that are high-quality;
      "rkl":   reverse KL, KL(p_hat || uniform) = sum_k p_k log(K p_k), with p_hat the
               normalised histogram of the high-quality samples over their nearest modes
               (as PacGAN's code does: low-quality samples are left out); 0 log 0 = 0, so
               empty modes add nothing. inf when there is no high-quality sample.
    """
    if samples.dim() != 2 or modes.dim() != 2 or samples.shape[1] != modes.shape[1]:
        raise ValueError(f"expected samples (N, D) and modes (K, D), got "
                         f"{tuple(samples.shape)} and {tuple(modes.shape)}")
    if len(samples) == 0 or std <= 0:
        raise ValueError("mode_stats needs at least one sample and std > 0")
    offsets = samples.double()[:, None, :] - modes.double()[None, :, :]  # (N, K, D)
    nearest = offsets.square().sum(-1).argmin(1)
    offset = offsets[torch.arange(len(samples)), nearest].abs()
    is_hq = (offset < 3 * std).all(dim=1)
    counts = torch.bincount(nearest[is_hq], minlength=len(modes)).double()
    n_hq = counts.sum()
    if n_hq == 0:
        rkl = math.inf
    else:
        p = counts[counts > 0] / n_hq
        rkl = float((p * (p * len(modes)).log()).sum())
    return {"modes": int((counts > 0).sum()), "hq": float(n_hq / len(samples)), "rkl": rkl}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n)); the error is nan for one value."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("mean_and_stderr needs at least one value")
    if v.size == 1:
        return float(v[0]), math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size))


# --- FID / KID from features ----------------------------------------------------------

def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), the Frechet distance of Gaussians.

    sqrtm(S1 S2) can be non-finite when the product is singular (fewer samples than
    dimensions); then eps*I is added to both covariances. Round-off gives it tiny imaginary
    parts, which are dropped; large ones mean the input is broken and raise ValueError.
    """
    from scipy import linalg  # optional dependency (the "metrics" extra)

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part "
                             f"({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _check_features(f: np.ndarray, name: str, min_rows: int = 2) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or len(f) < min_rows:
        raise ValueError(f"{name}: expected features (N >= {min_rows}, D), got {f.shape}")
    return f


def fid_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID between two feature sets (N1, D) and (N2, D): Gaussians fitted with the unbiased
    covariance (np.cov), as in the original TF and pytorch-fid code."""
    f1, f2 = _check_features(f1, "f1"), _check_features(f2, "f2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False),
                            f2.mean(0), np.cov(f2, rowvar=False))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d, m = x.shape[1], len(x)
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    # Unbiased: the within-set sums leave out k(x_i, x_i).
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.mean())


def kid_subsets(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                seed: int = 0) -> np.ndarray:
    """(subsets,) unbiased MMD^2 estimates, each on `subset_size` random rows of each set
    (drawn without replacement, clipped to the smaller set)."""
    f1, f2 = _check_features(f1, "f1"), _check_features(f2, "f2")
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature sizes differ: {f1.shape[1]} vs {f2.shape[1]}")
    m = min(subset_size, len(f1), len(f2))
    rng = np.random.default_rng(seed)
    return np.array([
        _mmd2_unbiased(f1[rng.choice(len(f1), m, replace=False)],
                       f2[rng.choice(len(f2), m, replace=False)])
        for _ in range(subsets)
    ])


def kid_from_features(f1: np.ndarray, f2: np.ndarray, subsets: int = 100,
                      subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3.

    Averaged over `subsets` random subsets of `subset_size` rows from each set (drawn without
    replacement, clipped to the smaller set). Returns (mean, std over subsets). Unbiased, so
    it can be slightly negative when both sets come from one distribution. With at most
    `subset_size` images every subset is the whole set and the std is 0: see kid_interval.
    """
    estimates = kid_subsets(f1, f2, subsets, subset_size, seed)
    return float(np.mean(estimates)), float(np.std(estimates))


def kid_interval(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float, int]:
    """A confidence interval for KID by subset bootstrap: the central `level` share of the KID
    estimates on `subsets` random subsets of m = min(subset_size, n1 // 2, n2 // 2) rows (at
    least 2). Half the images at most, so that the subsets differ even for small test sets;
    an estimate on m images varies more than one on all of them, so the interval errs wide.
    Returns (low, high, m)."""
    m = max(2, min(subset_size, len(f1) // 2, len(f2) // 2))
    estimates = kid_subsets(f1, f2, subsets, m, seed + 1)  # not the point estimate's draws
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high), m


# --- The one way images reach a feature extractor ---------------------------------------

def metric_images(x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Images (N, C, H, W) in [-1, 1] as every FID/KID here feeds them to an extractor: RGB
    (a grey channel repeated), rounded to the 256 levels of an 8-bit file, then resized to
    `size` with torch's antialiased bilinear filter (half-pixel centres). Rounding first makes a
    generator's float output and the same image saved losslessly (PNG, BMP, TIFF, lossless
    WebP) and read back give identical features; the filter is the same for every input."""
    x = x.detach().float().clamp(-1, 1)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = torch.round((x + 1) * 127.5) / 127.5 - 1
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                          antialias=True)
    return x


# --- Features of image folders --------------------------------------------------------

def _device_of(extractor: FeatureExtractor) -> torch.device:
    if isinstance(extractor, torch.nn.Module):
        for p in extractor.parameters():
            return p.device
    return torch.device("cpu")


def _load_resized(path: Path, size: tuple[int, int] | None) -> Tensor:
    return metric_images(to_tensor(load_image(path, channels=3)), size)


def folder_features(folder: str | Path, extractor: FeatureExtractor, batch_size: int = 32,
                    image_size: int | None = None) -> np.ndarray:
    """Features (N, D) of every image under `folder` (recursive, sorted as listed).

    Images are resized (bilinear) to image_size x image_size, or to the first image's size
    when image_size is None, so that they batch. Non-image files are ignored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder; pass a folder of images")
    paths, _skipped = list_images(folder, recursive=True)
    if not paths:
        raise UserError(f"{folder}: no images found; put .png/.jpg files in it")
    size = None if image_size is None else (image_size, image_size)
    device = _device_of(extractor)
    chunks = []
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start:start + batch_size]:
            x = _load_resized(path, size)
            size = size or tuple(x.shape[-2:])
            batch.append(x)
        with torch.inference_mode():
            feats = extractor(torch.cat(batch).to(device))
        if feats.dim() != 2 or len(feats) != len(batch):
            raise ValueError(f"extractor returned {tuple(feats.shape)} for {len(batch)} images; "
                             f"expected (N, D)")
        chunks.append(feats.double().cpu().numpy())
    return np.concatenate(chunks)


def fid_kid_folders(folder1: str | Path, folder2: str | Path, extractor: FeatureExtractor,
                    batch_size: int = 32, image_size: int | None = None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000,
                    seed: int = 0) -> dict[str, float | int]:
    """FID and KID between the images of two folders, with one extractor.

    Returns {"fid", "kid_mean", "kid_std", "n1", "n2"}. Both need at least 2 images; FID is
    strongly biased upwards for small sets, so compare values only at equal image counts.
    """
    f1 = folder_features(folder1, extractor, batch_size, image_size)
    f2 = folder_features(folder2, extractor, batch_size, image_size)
    for folder, f in ((folder1, f1), (folder2, f2)):
        if len(f) < 2:
            raise UserError(f"{folder}: FID/KID need at least 2 images, found {len(f)}; "
                            f"add images")
    kid_mean, kid_std = kid_from_features(f1, f2, kid_subsets, kid_subset_size, seed)
    kid_lo, kid_hi, _ = kid_interval(f1, f2, kid_subsets, kid_subset_size, seed)
    return {"fid": fid_from_features(f1, f2), "kid_mean": kid_mean, "kid_std": kid_std,
            "kid_lo": kid_lo, "kid_hi": kid_hi, "n1": len(f1), "n2": len(f2)}
