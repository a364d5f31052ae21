"""Small pieces of the core: LR schedules, EMA of weights, per-sample noise, the image pool."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from translate.core import noise
from translate.core.ema import ema_update, make_ema, warmed_decay
from translate.core.schedules import lr_factor
from translate.methods.pool import ImagePool

# ----------------------------------------------------------------------------------------------
# Schedules.


@pytest.mark.parametrize("step", [0, 1, 49, 99, 100, 1000])
def test_constant_schedule_is_always_one(step):
    assert lr_factor(step, 100, "constant") == 1.0
    assert lr_factor(step, 100, "constant", decay_start=30) == 1.0


@pytest.mark.parametrize("total, decay_start, start", [(100, 30, 30), (100, 0, 50),
                                                       (101, 0, 50), (10, 9, 9)])
def test_linear_schedule_is_flat_then_strictly_decreasing_to_zero(total, decay_start, start):
    factors = [lr_factor(s, total, "linear", decay_start) for s in range(total + 1)]
    assert factors[:start] == [1.0] * start
    decaying = factors[start:]
    assert all(0.0 <= f < 1.0 for f in decaying)
    assert all(a > b for a, b in itertools.pairwise(decaying))
    span = total - start
    # The last trained step has 1/(span+1) left, as the reference CycleGAN's last epoch; the step
    # after the end is exactly 0.
    assert factors[total - 1] == pytest.approx(1.0 / (span + 1))
    assert factors[total] == 0.0
    assert lr_factor(total + 50, total, "linear", decay_start) == 0.0


def test_linear_schedule_steps_down_by_equal_amounts():
    total, start = 40, 20
    factors = [lr_factor(s, total, "linear", start) for s in range(start, total + 1)]
    diffs = {round(a - b, 12) for a, b in itertools.pairwise(factors)}
    assert diffs == {round(1.0 / (total - start + 1), 12)}


def test_linear_schedule_reaches_about_zero_for_a_long_run():
    assert lr_factor(199_999, 200_000, "linear") < 1e-4


def test_schedule_is_pure():
    calls = [(s, 100, kind, d) for s in (0, 10, 60, 99) for kind in ("constant", "linear")
             for d in (0, 20)]
    first = [lr_factor(*c) for c in calls]
    # Out of order and repeated: still the same numbers.
    second = [lr_factor(*c) for c in reversed(calls)][::-1]
    assert first == second


def test_unknown_schedule_raises():
    with pytest.raises(ValueError, match="cosine"):
        lr_factor(0, 10, "cosine")


# ----------------------------------------------------------------------------------------------
# EMA.


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _randomise_buffers(net: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    bn = net[1]
    bn.running_mean.copy_(torch.randn(4, generator=gen))
    bn.running_var.copy_(torch.rand(4, generator=gen) + 0.5)
    bn.num_batches_tracked.fill_(seed + 7)


def test_make_ema_is_a_frozen_eval_copy():
    net = _net(0)
    ema = make_ema(net)
    assert ema is not net
    assert not ema.training
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in net.parameters())  # the original stays trainable
    for e, p in zip(ema.parameters(), net.parameters()):
        assert torch.equal(e, p)
        assert e.data_ptr() != p.data_ptr()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    assert not torch.equal(ema[0].weight, net[0].weight)


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 1.0])
def test_ema_update_is_decay_weighted_average_and_copies_buffers(decay):
    net, ema = _net(1), make_ema(_net(2))
    _randomise_buffers(net, 3)
    before = [e.detach().clone() for e in ema.parameters()]
    ema_update(ema, net, decay)
    for old, e, p in zip(before, ema.parameters(), net.parameters()):
        torch.testing.assert_close(e, decay * old + (1 - decay) * p.detach())
        assert not e.requires_grad
    for e, b in zip(ema.buffers(), net.buffers()):
        assert torch.equal(e, b)


def test_ema_decay_zero_copies_and_one_keeps_exactly():
    net, ema = _net(1), make_ema(_net(2))
    kept = [e.detach().clone() for e in ema.parameters()]
    ema_update(ema, net, 1.0)
    assert all(torch.equal(e, k) for e, k in zip(ema.parameters(), kept))
    ema_update(ema, net, 0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), net.parameters()))


def test_ema_update_records_no_graph():
    net, ema = _net(1), make_ema(_net(2))
    loss = net(torch.randn(5, 3)).sum()
    ema_update(ema, net, 0.5)
    loss.backward()
    assert all(e.grad is None and e.grad_fn is None for e in ema.parameters())


# ----------------------------------------------------------------------------------------------
# Per-sample noise.


def test_uniform_shape_dtype_and_range():
    k = torch.arange(2000)
    u = noise.uniform(k, (3, 2), seed=0, stream=0)
    assert u.shape == (2000, 3, 2) and u.dtype == torch.float32
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # Spread over the interval: each tenth holds about a tenth of the draws.
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    assert (counts / u.numel() - 0.1).abs().max() < 0.01


def test_uniform_never_returns_one():
    # Sample 29449110 of (seed 0, stream 0) is 1 - 2**-53 * m with m small enough to round up to
    # 1.0 in float32 (found by scanning k; a 26M-sample scan is too slow for a unit test).
    u = noise.uniform(torch.tensor([29449110]), (1,), seed=0, stream=0)
    assert float(u) < 1.0


def test_normal_has_zero_mean_unit_std():
    z = noise.normal(torch.arange(20_000), (2,), seed=3, stream=1)
    assert z.shape == (20_000, 2) and z.dtype == torch.float32
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 0.03
    assert abs(float(z.std()) - 1.0) < 0.03
    # Tails of a normal: about 4.55% beyond 2 sigma.
    assert abs(float((z.abs() > 2).float().mean()) - 0.0455) < 0.008


@pytest.mark.parametrize("fn", [noise.uniform, noise.normal])
def test_noise_is_a_pure_function_of_seed_stream_and_k(fn):
    k = torch.tensor([5, 0, 123_456_789_012, 7])
    torch.manual_seed(0)
    a = fn(k, (4,), 11, 2)
    torch.manual_seed(999)  # the global RNG plays no part
    torch.rand(10)
    b = fn(k, (4,), 11, 2)
    assert torch.equal(a, b)
    # Each sample depends on its own k only, not on its position or on the others.
    assert torch.equal(fn(k.flip(0), (4,), 11, 2), a.flip(0))
    assert torch.equal(fn(k[2:3], (4,), 11, 2), a[2:3])


@pytest.mark.parametrize("fn", [noise.uniform, noise.normal])
def test_different_k_seed_or_stream_differ(fn):
    k = torch.arange(64)
    base = fn(k, (8,), 1, 0)
    for other in (fn(k + 64, (8,), 1, 0), fn(k, (8,), 2, 0), fn(k, (8,), 1, 1)):
        # Not a shifted copy: (almost) no element coincides, allowing for chance near-misses.
        assert float(torch.isclose(base, other).float().mean()) < 0.01
    # Within one sample, the elements differ too.
    assert (base[:, 1:] != base[:, :1]).all()


@pytest.mark.parametrize("fn", [noise.uniform, noise.normal])
def test_batch_equals_concatenation_of_its_halves(fn):
    # Two processes drawing [k0, k1] and [k2, k3] get what one process drawing [k0..k3] gets.
    k = torch.tensor([40, 41, 42, 43])
    whole = fn(k, (3, 2, 2), 5, 1)
    halves = torch.cat([fn(k[:2], (3, 2, 2), 5, 1), fn(k[2:], (3, 2, 2), 5, 1)])
    assert torch.equal(whole, halves)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_neighbouring_samples_are_uncorrelated():
    u = noise.uniform(torch.arange(10_001), (2,), seed=0, stream=0)
    assert abs(_corr(u[:-1, 0], u[1:, 0])) < 0.05  # sample k vs k + 1
    assert abs(_corr(u[:, 0], u[:, 1])) < 0.05  # elements within a sample
    z = noise.normal(torch.arange(10_001), (1,), seed=0, stream=0)[:, 0]
    assert abs(_corr(z[:-1], z[1:])) < 0.05
    assert abs(_corr(z[:-1] ** 2, z[1:] ** 2)) < 0.05


def test_neighbouring_seeds_and_streams_are_uncorrelated():
    k = torch.arange(10_000)
    u0 = noise.uniform(k, (1,), 0, 0)[:, 0]
    assert abs(_corr(u0, noise.uniform(k, (1,), 1, 0)[:, 0])) < 0.05
    assert abs(_corr(u0, noise.uniform(k, (1,), 0, 1)[:, 0])) < 0.05


def test_uniform_and_normal_streams_do_not_share_draws():
    k = torch.arange(10_000)
    # GAN's pair first (gp eps: uniform stream 2; G's latent: normal stream 1), then all others.
    pairs = [(2, 1)] + [(u, z) for u in range(4) for z in range(2)]
    for u_stream, z_stream in pairs:
        u = noise.uniform(k, (1,), 0, u_stream)[:, 0]
        z = noise.normal(k, (1,), 0, z_stream)[:, 0]
        # |z| = sqrt(-2 log u1) |cos(2 pi u2)|: strongly tied to u if u is u1.
        assert abs(_corr(u, z.abs())) < 0.05, (u_stream, z_stream)


def test_noise_accepts_any_64_bit_seed():
    u = noise.uniform(torch.arange(4), (2,), seed=2**62, stream=0)
    assert u.shape == (4, 2)


# ----------------------------------------------------------------------------------------------
# Image pool.


def _images(n: int, start: float) -> torch.Tensor:
    # Image i is filled with the value start + i, so identities can be read back.
    return (torch.arange(n, dtype=torch.float32) + start).reshape(n, 1, 1, 1).expand(n, 2, 3, 3)


def _ids(images: torch.Tensor) -> list[float]:
    return images[:, 0, 0, 0].tolist()


def test_pool_of_size_zero_passes_through():
    pool = ImagePool(0)
    x = _images(3, 0.0)
    assert pool.query(x) is x
    assert pool.state().numel() == 0


def test_pool_returns_inputs_while_filling():
    pool = ImagePool(5)
    x = _images(3, 0.0).requires_grad_(False)
    out = pool.query(x)
    assert torch.equal(out, x)
    assert len(pool.state()) == 3
    out = pool.query(_images(2, 10.0))
    assert _ids(out) == [10.0, 11.0]
    assert _ids(pool.state()) == [0.0, 1.0, 2.0, 10.0, 11.0]


def test_pool_fills_exactly_to_size_within_one_batch():
    pool = ImagePool(3)
    torch.manual_seed(0)
    out = pool.query(_images(5, 0.0))
    assert len(pool.state()) == 3
    assert _ids(out)[:3] == [0.0, 1.0, 2.0]


def test_pool_output_is_detached():
    pool = ImagePool(2)
    x = _images(3, 0.0).clone().requires_grad_(True)
    assert not pool.query(x * 2).requires_grad


def test_full_pool_returns_a_mix_of_new_and_stored_images():
    pool = ImagePool(4)
    pool.query(_images(4, 0.0))
    torch.manual_seed(0)
    stored, n = 0, 0
    for step in range(50):
        before = _ids(pool.state())
        new = _images(2, 100.0 + 2 * step)
        out = pool.query(new)
        assert out.shape == new.shape
        # Each image is either handed back or kept: none lost, none duplicated.
        assert sorted(_ids(out) + _ids(pool.state())) == sorted(before + _ids(new))
        for got, sent in zip(_ids(out), _ids(new)):
            n += 1
            stored += got != sent
    assert 0.3 < stored / n < 0.7


def test_pool_state_round_trip_continues_identically():
    pool = ImagePool(3)
    torch.manual_seed(1)
    pool.query(_images(3, 0.0))
    pool.query(_images(2, 10.0))
    saved = pool.state().clone()
    rng = torch.get_rng_state()
    expected = [pool.query(_images(2, 20.0 + 2 * i)) for i in range(6)]

    restored = ImagePool(3)
    restored.load(saved, torch.device("cpu"))
    torch.set_rng_state(rng)
    got = [restored.query(_images(2, 20.0 + 2 * i)) for i in range(6)]
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    assert torch.equal(pool.state(), restored.state())


def test_pool_round_trip_of_an_empty_and_a_partial_pool():
    empty = ImagePool(4)
    restored = ImagePool(4)
    restored.load(empty.state(), torch.device("cpu"))
    assert restored.state().numel() == 0
    partial = ImagePool(4)
    partial.query(_images(2, 0.0))
    restored.load(partial.state().clone(), torch.device("cpu"))
    # Still filling: the next two images come back as they are.
    assert _ids(restored.query(_images(2, 5.0))) == [5.0, 6.0]
    assert len(restored.state()) == 4


def test_ema_decay_warms_up_then_holds():
    """(1 + t) / (10 + t) until it reaches the configured decay: the average of a 2,000-step
    run no longer keeps 14% of the untrained weights (0.999 ** 2000)."""
    assert warmed_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_decay(0.999, 90) == pytest.approx(0.91)
    assert warmed_decay(0.999, 10_000) == 0.999
    assert warmed_decay(0.5, 0) == pytest.approx(0.1) and warmed_decay(0.5, 8) == 0.5
    kept = 1.0
    for t in range(2000):
        kept *= warmed_decay(0.999, t)
    assert kept < 1e-4  # the initial weights' share of the average after 2,000 steps


def test_the_loop_averages_with_the_warmed_decay(monkeypatch, tmp_path):
    """A real run with train.ema: each generator step updates the average with the decay of
    its step, warm-up included."""
    from translate import recipe, runner
    from translate.core import loop

    seen = []
    real = loop.ema_update
    monkeypatch.setattr(loop, "ema_update", lambda e, n, d: seen.append(d) or real(e, n, d))
    cfg = recipe.load(Path(__file__).resolve().parent.parent / "recipes" / "toy_gan_ring.toml",
                      ["model.hidden=16", "train.batch_size=8", "train.steps=3",
                       "train.ema=0.999", f'run_dir="{tmp_path / "run"}"',
                       "train.sample_every=1000", 'train.mixed_precision="no"'])
    runner.train(cfg, progress=False)
    assert seen == pytest.approx([warmed_decay(0.999, t) for t in range(3)])
