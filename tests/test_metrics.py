"""Tests for translate.eval.metrics and translate.eval.fid: hand computations and independent references."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from translate.errors import ModelError, UserError
from translate.eval import metrics as M
from translate.eval.fid import FIDInceptionV3


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Structured images (gradients plus texture) in [-1, 1], so SSIM is not trivial."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-0.8, 0.8, size)
    base = (ramp[None, :] * ramp[:, None].flip(0)).expand(n, 3, size, size)
    return (base + 0.2 * torch.randn(n, 3, size, size, generator=g)).clamp(-1, 1)


def _to_hwc01(x: torch.Tensor) -> np.ndarray:
    return ((x.double() + 1) / 2).permute(0, 2, 3, 1).numpy()


# --- PSNR / SSIM ----------------------------------------------------------------------------

def test_psnr_on_known_mse():
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.2  # MSE 0.04 over a range of 2: 10 log10(4 / 0.04) = 20 dB
    y[1] -= 0.1  # MSE 0.01: 10 log10(400) dB
    per_image = M.psnr_per_image(x, y)
    expected = torch.tensor([20.0, 10 * math.log10(400.0)])
    assert torch.allclose(per_image, expected, atol=1e-4)
    # The batch value is the mean of per-image PSNRs, not the PSNR of the pooled MSE.
    assert M.psnr(x, y).item() == pytest.approx(expected.mean().item(), abs=1e-4)


def test_psnr_matches_skimage():
    x = _images(3, seed=1)
    y = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(-1, 1)
    a, b = _to_hwc01(x), _to_hwc01(y)
    reference = [peak_signal_noise_ratio(a[i], b[i], data_range=1.0) for i in range(3)]
    assert torch.allclose(M.psnr_per_image(x, y).double(), torch.tensor(reference), atol=1e-3)


def test_ssim_identical_and_noise():
    x = _images(2)
    assert M.ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert M.ssim(x, noise).item() < 0.5


def test_ssim_matches_skimage():
    x = _images(2, seed=4)
    y = (x + 0.15 * torch.randn(x.shape, generator=torch.Generator().manual_seed(5))).clamp(-1, 1)
    a, b = _to_hwc01(x), _to_hwc01(y)
    reference = np.mean([
        structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0, channel_axis=2)
        for i in range(2)
    ])
    assert 0.3 < reference < 0.99  # the pair is neither identical nor unrelated
    assert M.ssim(x, y).item() == pytest.approx(reference, abs=1e-4)


def test_ssim_rejects_images_smaller_than_window():
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="11x11"):
        M.ssim(x, x)


def test_cycle_scores():
    x = _images(2, size=16) * 0.5
    perfect = M.cycle_scores(x, x)
    assert perfect["cycle_l1"] == 0.0 and perfect["cycle_psnr"] == math.inf
    off = M.cycle_scores(x, x + 0.1)
    assert off["cycle_l1"] == pytest.approx(0.1, abs=1e-6)
    assert off["cycle_psnr"] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-3)


# --- Toy mode coverage --------------------------------------------------------------------

def _mixture(modes: torch.Tensor, std: float, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(len(modes), (n,), generator=g)
    return modes[which] + std * torch.randn(n, 2, generator=g)


def test_mode_layouts():
    ring = M.ring_modes()
    assert ring.shape == (8, 2)
    assert torch.allclose(ring.norm(dim=1), torch.ones(8))
    assert torch.allclose(ring[2], torch.tensor([0.0, 1.0]), atol=1e-6)
    grid = M.grid_modes()
    assert grid.shape == (25, 2)
    assert {tuple(p) for p in grid.tolist()} == {(float(i), float(j)) for i in range(-4, 5, 2)
                                                for j in range(-4, 5, 2)}


@pytest.mark.parametrize("layout,std", [("ring", M.RING_STD), ("grid", M.GRID_STD)])
def test_mode_stats_on_true_samples(layout, std):
    modes = M.ring_modes() if layout == "ring" else M.grid_modes()
    stats = M.mode_stats(_mixture(modes, std, 2500), modes, std)
    assert stats["modes"] == len(modes)
    assert stats["hq"] > 0.99
    assert 0 <= stats["rkl"] < 0.02


def test_mode_stats_collapsed_to_one_mode():
    modes = M.ring_modes()
    samples = modes[3] + M.RING_STD * torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    stats = M.mode_stats(samples, modes, M.RING_STD)
    assert stats["modes"] == 1
    assert stats["rkl"] == pytest.approx(math.log(8), abs=1e-9)


def test_mode_stats_far_samples_are_low_quality():
    modes = M.grid_modes()
    samples = torch.full((100, 2), 10.0)
    stats = M.mode_stats(samples, modes, M.GRID_STD)
    assert stats["hq"] == 0.0 and stats["modes"] == 0 and stats["rkl"] == math.inf


def test_mode_stats_hand_computed():
    modes = M.ring_modes(4)  # (1,0), (0,1), (-1,0), (0,-1)
    s = 0.1
    samples = torch.tensor([
        [1.0, 0.0], [1.05, 0.0], [1.0, 0.25],  # mode 0, all within 3s per axis
        [0.25, 1.25],  # mode 1: 2.5s on both axes (outside the 3s disk, inside the square)
        [-1.35, 0.0],  # nearest is mode 2 but 3.5s away: low quality
    ])
    stats = M.mode_stats(samples, modes, s)
    assert stats["modes"] == 2
    assert stats["hq"] == pytest.approx(4 / 5)
    # p_hat = (3/4, 1/4, 0, 0) against uniform 1/4: 3/4 log 3 + 1/4 log 1.
    assert stats["rkl"] == pytest.approx(0.75 * math.log(3.0), abs=1e-9)


def test_mean_and_stderr():
    mean, stderr = M.mean_and_stderr([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert stderr == pytest.approx(math.sqrt(5 / 3) / 2)
    assert math.isnan(M.mean_and_stderr([7.0])[1])


# --- FID / KID from features ------------------------------------------------------------

def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(100).normal(size=(d, d)) / math.sqrt(d)  # shared correlation
    return rng.normal(size=(n, d)) @ mix + shift


def _reference_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))


def test_fid_matches_direct_scipy_computation():
    f1, f2 = _features(400, 8, 0), _features(300, 8, 1, shift=0.3) * 1.5
    fid = M.fid_from_features(f1, f2)
    assert fid > 1.0
    assert fid == pytest.approx(_reference_fid(f1, f2), rel=1e-8)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # = 5 + 4 + 1 + 0
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_shift():
    f = _features(500, 16, 0)
    scale = np.trace(np.cov(f, rowvar=False))
    assert abs(M.fid_from_features(f, f)) < 1e-6 * scale
    other = _features(500, 16, 1)
    fids = [M.fid_from_features(f, other + shift) for shift in (0.0, 0.3, 1.0)]
    assert fids[0] < fids[1] < fids[2]


def test_fid_with_fewer_samples_than_dimensions_is_finite():
    f1, f2 = _features(6, 20, 0), _features(6, 20, 1)
    assert math.isfinite(M.fid_from_features(f1, f2))


def _reference_kid(x: np.ndarray, y: np.ndarray) -> float:
    d, n = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1) ** 3
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(n)) / (n * n)
    return xx + yy - 2 * xy


def test_kid_matches_brute_force():
    x, y = _features(20, 5, 0), _features(20, 5, 1, shift=0.5)
    mean, std = M.kid_from_features(x, y, subsets=1, subset_size=20)
    assert mean == pytest.approx(_reference_kid(x, y), rel=1e-9)
    assert std == 0.0


def test_kid_is_unbiased_and_detects_shift():
    same = M.kid_from_features(_features(600, 16, 0), _features(600, 16, 1), 20, 200)
    shifted = M.kid_from_features(_features(600, 16, 0), _features(600, 16, 1, 0.3), 20, 200)
    assert shifted[0] > 0.01
    assert abs(same[0]) < 0.1 * shifted[0]
    assert same[1] > 0  # subsets differ, so estimates spread


def test_kid_subset_size_is_clipped_to_the_smaller_set():
    x, y = _features(30, 4, 0), _features(45, 4, 1)
    assert M.kid_from_features(x, y, 5, 1000) == M.kid_from_features(x, y, 5, 30)


def test_kid_interval_has_width_on_small_sets_and_covers_what_it_should():
    x, y = _features(40, 8, 0), _features(40, 8, 1)
    assert M.kid_from_features(x, y)[1] < 1e-12  # 40 < 1000: every subset is the whole set
    low, high, m = M.kid_interval(x, y)
    assert m == 20 and low < 0 < high  # same distribution: 0 is inside, and the width is real
    shifted = _features(40, 8, 1, shift=0.5)
    mean, _ = M.kid_from_features(x, shifted)
    low, high, _ = M.kid_interval(x, shifted)
    assert 0 < low < mean < high
    assert M.kid_interval(x, shifted) == M.kid_interval(x, shifted)  # seeded
    big = M.kid_interval(_features(3000, 4, 0), _features(3000, 4, 1), subsets=5)
    assert big[2] == 1000  # the usual subset size once the sets are large enough


# --- The one way images reach a feature extractor -------------------------------------------

def test_metric_images_are_the_same_whatever_the_file_format(tmp_path):
    """One picture saved losslessly as PNG, BMP, TIFF, WebP and RGBA PNG, and the float tensor
    a generator would output for it, reach the extractor as the same numbers; so do a grey
    picture and its RGB copy."""
    from translate.images import load_image, to_tensor

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(20, 28, 3), dtype=np.uint8)
    folder = tmp_path / "formats"
    folder.mkdir()
    Image.fromarray(rgb).save(folder / "a.png")
    Image.fromarray(rgb).save(folder / "b.bmp")
    Image.fromarray(rgb).save(folder / "c.tif")
    Image.fromarray(rgb).save(folder / "d.webp", lossless=True)
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(folder / "e.png")
    size = (16, 16)
    loaded = [M.metric_images(to_tensor(load_image(p)), size) for p in sorted(folder.iterdir())]
    assert all(torch.equal(loaded[0], x) for x in loaded[1:])
    # A generator's float output of the same pixels (off by less than half a level).
    jitter = (torch.rand(1, 3, 20, 28, generator=torch.Generator().manual_seed(1)) - 0.5) * 0.9
    generated = to_tensor(rgb) + jitter / 127.5
    assert torch.equal(M.metric_images(generated, size), loaded[0])
    grey = rgb[..., :1]
    assert torch.equal(M.metric_images(to_tensor(grey), size),
                       M.metric_images(to_tensor(np.repeat(grey, 3, axis=2)), size))
    # Files through folder_features and tensors through translate eval's path agree.
    from translate.eval.evaluate import image_features

    net = M.small_feature_net()
    from_files = M.folder_features(folder, net, image_size=16)
    in_memory = image_features([generated] * 5, net, size=size)
    assert np.array_equal(from_files, in_memory)
    assert np.array_equal(from_files, M.folder_features(folder, net, image_size=16))


# --- Feature extractors -------------------------------------------------------------------

def test_inception_state_dict_round_trips_strictly(tmp_path):
    torch.manual_seed(0)
    model = FIDInceptionV3()
    with torch.no_grad():  # non-default statistics, so buffers are checked too
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "inception.pth"
    torch.save(model.state_dict(), path)
    loaded = M.load_inception(path)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert not loaded.training
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        feats = loaded(x)
        assert feats.shape == (1, 2048)
        assert torch.allclose(feats, model.eval()(x))


def test_load_inception_rejects_wrong_files(tmp_path):
    other = tmp_path / "other.pth"
    torch.save(M.small_feature_net().state_dict(), other)
    with pytest.raises(ModelError, match="other.pth"):
        M.load_inception(other)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="garbage.pth"):
        M.load_inception(garbage)
    with pytest.raises(ModelError, match="missing.pth"):
        M.load_inception(tmp_path / "missing.pth")


def test_small_feature_net_is_deterministic_and_leaves_global_rng_alone():
    x = _images(2, size=16)
    rng_before = torch.random.get_rng_state()
    a, b, c = M.small_feature_net(0), M.small_feature_net(0), M.small_feature_net(1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert a(x).shape == (2, 64)
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), c(x))


# --- Folders --------------------------------------------------------------------------------

def _write_pngs(folder, n: int, kind: str, seed: int, sizes=((24, 24),)) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        if kind == "smooth":
            ramp = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.3, 1.0, size=(1, 1, 3))
            img = np.broadcast_to(ramp, (h, w, 3))
        else:
            img = rng.integers(0, 256, size=(h, w, 3))
        Image.fromarray(np.ascontiguousarray(img).astype(np.uint8)).save(folder / f"{i:02d}.png")


def test_folder_features_batches_and_resizes(tmp_path):
    folder = tmp_path / "mixed"
    _write_pngs(folder, 5, "smooth", 0, sizes=((24, 24), (20, 30)))
    (folder / "notes.txt").write_text("not an image")
    before = sorted(os.listdir(folder))
    net = M.small_feature_net()
    f_all = M.folder_features(folder, net, batch_size=32)
    f_small = M.folder_features(folder, net, batch_size=2)
    assert f_all.shape == (5, 64) and f_all.dtype == np.float64
    assert np.allclose(f_all, f_small, atol=1e-5)
    assert M.folder_features(folder, net, image_size=16).shape == (5, 64)
    assert sorted(os.listdir(folder)) == before  # nothing written into the input folder


def test_fid_kid_folders(tmp_path):
    smooth, noise = tmp_path / "smooth", tmp_path / "noise"
    _write_pngs(smooth, 8, "smooth", 0)
    _write_pngs(noise, 6, "noise", 1)
    net = M.small_feature_net()
    same = M.fid_kid_folders(smooth, smooth, net, kid_subsets=5)
    assert same["n1"] == same["n2"] == 8
    assert abs(same["fid"]) < 1e-4
    apart = M.fid_kid_folders(smooth, noise, net, kid_subsets=5)
    assert apart["n1"] == 8 and apart["n2"] == 6
    assert apart["fid"] > 1e3 * max(abs(same["fid"]), 1e-6)
    assert apart["kid_mean"] > abs(same["kid_mean"])


def test_folder_errors_name_the_folder(tmp_path):
    net = M.small_feature_net()
    with pytest.raises(UserError, match="nowhere"):
        M.folder_features(tmp_path / "nowhere", net)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="empty"):
        M.folder_features(empty, net)
    single = tmp_path / "single"
    _write_pngs(single, 1, "noise", 0)
    with pytest.raises(UserError, match="single"):
        M.fid_kid_folders(single, single, net)
