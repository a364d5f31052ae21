"""GAN objectives against hand-computed formulas: values, gradients, label smoothing, shapes,
bf16 inputs, saturation, the name registry and the logged real probability."""

from __future__ import annotations

import math

import pytest
import torch

from translate.core import objectives
from translate.core.objectives import OBJECTIVES, get, real_probability
from translate.errors import ConfigError, UserError

# Logits away from hinge kinks (+-1) so every formula is differentiable at them.
REAL = [[0.3, -1.7], [2.5, 0.05]]
FAKE = [[-0.4, 1.3], [-2.2, 0.6]]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _mean(values) -> float:
    values = [v for row in values for v in row]
    return sum(values) / len(values)


def _map(fn, rows):
    return [[fn(v) for v in row] for row in rows]


# Each objective's D and G loss per element, in plain Python floats (the brief's formulas).
def _hand_d(name: str, real, fake, real_target: float = 1.0) -> float:
    t = real_target
    if name in ("minimax", "nonsaturating"):
        real_term = _map(lambda r: -t * math.log(_sigmoid(r)) - (1 - t) * math.log(1 - _sigmoid(r)),
                         real)
        fake_term = _map(lambda f: -math.log(1 - _sigmoid(f)), fake)
    elif name == "lsgan":
        real_term = _map(lambda r: (r - t) ** 2, real)
        fake_term = _map(lambda f: f**2, fake)
    elif name == "hinge":
        real_term = _map(lambda r: max(0.0, t - r), real)
        fake_term = _map(lambda f: max(0.0, 1 + f), fake)
    elif name == "wasserstein":
        real_term = _map(lambda r: -r, real)
        fake_term = _map(lambda f: f, fake)
    else:
        raise AssertionError(f"no hand formula for {name}")
    return _mean(real_term) + _mean(fake_term)


def _hand_g(name: str, fake) -> float:
    per_element = {
        "minimax": lambda f: math.log(1 - _sigmoid(f)),
        "nonsaturating": lambda f: -math.log(_sigmoid(f)),
        "lsgan": lambda f: (f - 1) ** 2,
        "hinge": lambda f: -f,
        "wasserstein": lambda f: -f,
    }[name]
    return _mean(_map(per_element, fake))


# The same formulas in torch, for autograd to differentiate independently of the module.
def _torch_d(name: str, r: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if name in ("minimax", "nonsaturating"):
        return (-torch.log(torch.sigmoid(r))).mean() + (-torch.log(1 - torch.sigmoid(f))).mean()
    if name == "lsgan":
        return ((r - 1) ** 2).mean() + (f**2).mean()
    if name == "hinge":
        return torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
    return f.mean() - r.mean()


def _torch_g(name: str, f: torch.Tensor) -> torch.Tensor:
    if name == "minimax":
        return torch.log(1 - torch.sigmoid(f)).mean()
    if name == "nonsaturating":
        return (-torch.log(torch.sigmoid(f))).mean()
    if name == "lsgan":
        return ((f - 1) ** 2).mean()
    return (-f).mean()


def test_registry_holds_the_five_objectives():
    assert set(OBJECTIVES) == {"minimax", "nonsaturating", "lsgan", "hinge", "wasserstein"}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_d_loss_matches_hand_computed_value(name):
    d_loss, _ = get(name)
    got = d_loss(torch.tensor(REAL), torch.tensor(FAKE))
    assert got.dim() == 0
    assert float(got) == pytest.approx(_hand_d(name, REAL, FAKE), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_g_loss_matches_hand_computed_value(name):
    _, g_loss = get(name)
    got = g_loss(torch.tensor(FAKE))
    assert got.dim() == 0
    assert float(got) == pytest.approx(_hand_g(name, FAKE), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradients_match_autograd_of_the_explicit_formula(name):
    d_loss, g_loss = get(name)
    r1 = torch.tensor(REAL, requires_grad=True)
    f1 = torch.tensor(FAKE, requires_grad=True)
    r2 = torch.tensor(REAL, requires_grad=True)
    f2 = torch.tensor(FAKE, requires_grad=True)
    d_loss(r1, f1).backward()
    _torch_d(name, r2, f2).backward()
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-5, atol=1e-6)

    g1 = torch.tensor(FAKE, requires_grad=True)
    g2 = torch.tensor(FAKE, requires_grad=True)
    g_loss(g1).backward()
    _torch_g(name, g2).backward()
    torch.testing.assert_close(g1.grad, g2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["minimax", "nonsaturating", "lsgan", "hinge"])
def test_label_smoothing_changes_only_the_real_term(name):
    d_loss, _ = get(name)
    real = torch.tensor(REAL)
    smoothed = float(d_loss(real, torch.tensor(FAKE), 0.9))
    assert smoothed == pytest.approx(_hand_d(name, REAL, FAKE, 0.9), rel=1e-5, abs=1e-6)
    assert smoothed != pytest.approx(float(d_loss(real, torch.tensor(FAKE), 1.0)), abs=1e-4)
    # The difference made by smoothing must not depend on the fakes at all.
    other_fake = torch.tensor([[3.0, -0.2], [0.9, -5.0]])
    delta_1 = smoothed - float(d_loss(real, torch.tensor(FAKE)))
    delta_2 = float(d_loss(real, other_fake, 0.9)) - float(d_loss(real, other_fake))
    assert delta_1 == pytest.approx(delta_2, abs=1e-5)
    # And the fake gradient is the same with and without smoothing.
    f1 = torch.tensor(FAKE, requires_grad=True)
    f2 = torch.tensor(FAKE, requires_grad=True)
    d_loss(real, f1, 0.9).backward()
    d_loss(real, f2, 1.0).backward()
    torch.testing.assert_close(f1.grad, f2.grad)


def test_wasserstein_ignores_label_smoothing():
    d_loss, _ = get("wasserstein")
    real, fake = torch.tensor(REAL), torch.tensor(FAKE)
    assert float(d_loss(real, fake, 0.9)) == float(d_loss(real, fake, 1.0))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_patchgan_maps_are_averaged_over_every_element(name):
    d_loss, g_loss = get(name)
    gen = torch.Generator().manual_seed(1)
    real = torch.randn(3, 1, 4, 5, generator=gen)
    fake = torch.randn(3, 1, 4, 5, generator=gen)
    rows_r, rows_f = real.reshape(1, -1).tolist(), fake.reshape(1, -1).tolist()
    assert float(d_loss(real, fake)) == pytest.approx(_hand_d(name, rows_r, rows_f), rel=1e-5,
                                                      abs=1e-5)
    assert float(g_loss(fake)) == pytest.approx(_hand_g(name, rows_f), rel=1e-5, abs=1e-5)
    # Same elements, any shape: a vector of critic scores gives the same loss.
    torch.testing.assert_close(d_loss(real, fake), d_loss(real.flatten(), fake.flatten()))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_bf16_inputs_give_float32_losses(name):
    d_loss, g_loss = get(name)
    real_bf = torch.tensor(REAL, dtype=torch.bfloat16)
    fake_bf = torch.tensor(FAKE, dtype=torch.bfloat16)
    d, g = d_loss(real_bf, fake_bf, 0.9), g_loss(fake_bf)
    assert d.dtype == torch.float32 and g.dtype == torch.float32
    # Computed in float32 on the bf16-rounded values, not in bf16.
    torch.testing.assert_close(d, d_loss(real_bf.float(), fake_bf.float(), 0.9))
    torch.testing.assert_close(g, g_loss(fake_bf.float()))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_losses_are_finite_for_extreme_logits(name):
    d_loss, g_loss = get(name)
    big = torch.tensor([-200.0, -50.0, 50.0, 200.0], requires_grad=True)
    loss = d_loss(big, big) + g_loss(big)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(big.grad).all()


def test_minimax_g_saturates_and_nonsaturating_does_not():
    minimax_g, nonsat_g = get("minimax")[1], get("nonsaturating")[1]
    grads = {}
    for label, fn in (("minimax", minimax_g), ("nonsaturating", nonsat_g)):
        for f0 in (-5.0, -20.0):
            f = torch.tensor([f0], requires_grad=True)
            fn(f).backward()
            grads[label, f0] = abs(float(f.grad))
    # d/df log(1 - sigmoid(f)) = -sigmoid(f) -> 0 as the discriminator wins (f -> -inf) ...
    assert grads["minimax", -5.0] == pytest.approx(_sigmoid(-5.0), rel=1e-4)
    assert grads["minimax", -20.0] < 1e-8
    # ... while d/df -log sigmoid(f) = -(1 - sigmoid(f)) -> -1.
    assert grads["nonsaturating", -20.0] == pytest.approx(1.0, abs=1e-6)
    assert grads["nonsaturating", -5.0] == pytest.approx(1 - _sigmoid(-5.0), rel=1e-4)


def test_minimax_and_nonsaturating_share_the_discriminator_loss():
    assert get("minimax")[0] is get("nonsaturating")[0]
    assert objectives.minimax_d is get("minimax")[0]


def test_unknown_objective_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as info:
        get("wgan")
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message
    assert "'wgan'" in message
    for name in OBJECTIVES:
        assert name in message


@pytest.mark.parametrize("name", ["minimax", "nonsaturating"])
def test_real_probability_is_a_probability_for_logistic_objectives(name):
    logits = torch.tensor(REAL, requires_grad=True)
    p = real_probability(logits, name)
    assert float(p) == pytest.approx(_mean(_map(_sigmoid, REAL)), rel=1e-6)
    assert not p.requires_grad
    assert p.dtype == torch.float32


@pytest.mark.parametrize("name", ["lsgan", "hinge", "wasserstein"])
def test_real_probability_is_the_raw_mean_otherwise(name):
    scores = torch.tensor(REAL, dtype=torch.bfloat16, requires_grad=True)
    p = real_probability(scores, name)
    assert float(p) == pytest.approx(float(scores.detach().float().mean()), rel=1e-6)
    assert not p.requires_grad
    assert p.dtype == torch.float32
