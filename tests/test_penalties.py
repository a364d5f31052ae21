"""Discriminator regularisers on critics whose input gradient is known in closed form:
a linear critic D(x) = w.x (gradient w everywhere) and a quadratic one D(x) = ||x||^2 / 2
(gradient x)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate import state as state_mod
from torch import nn

from translate.core import loop
from translate.core.penalties import clip_weights, gradient_penalty, loss_scale, r1_penalty
from translate.methods.base import Phase

W = [0.6, -0.8, 1.2, 0.5]
W_NORM = math.sqrt(sum(v * v for v in W))


class LinearCritic(nn.Module):
    """D(x) = w . flatten(x) + b, per sample."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) * self.w).sum(1) + self.b


def quadratic_critic(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x.flatten(1).pow(2).sum(1)


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))


def _pair(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


@pytest.mark.parametrize("eps", [None, 0.0, 0.25, 1.0])
@pytest.mark.parametrize("weight", [1.0, 10.0])
def test_gp_on_linear_critic_is_weight_times_norm_minus_one_squared(eps, weight):
    D = LinearCritic(torch.tensor(W))
    real, fake = _pair((5, 4))
    eps_t = None if eps is None else torch.full((5, 1), eps)
    gp = gradient_penalty(D, real, fake, weight=weight, eps=eps_t)
    assert gp.dim() == 0 and gp.dtype == torch.float32
    assert float(gp.detach()) == pytest.approx(weight * (W_NORM - 1.0) ** 2, rel=1e-5)


def test_gp_on_images_uses_the_whole_sample_gradient():
    w = torch.linspace(-0.3, 0.4, 2 * 3 * 3)
    D = LinearCritic(w)
    real, fake = _pair((4, 2, 3, 3))
    gp = gradient_penalty(D, real, fake, weight=10.0)
    assert float(gp.detach()) == pytest.approx(10.0 * (float(w.norm()) - 1.0) ** 2, rel=1e-5)


def test_gp_gradient_wrt_critic_weights_matches_the_analytic_one():
    D = LinearCritic(torch.tensor(W))
    real, fake = _pair((3, 4))
    weight = 10.0
    gradient_penalty(D, real, fake, weight=weight).backward()
    w = torch.tensor(W)
    # d/dw weight * (||w|| - 1)^2 = 2 * weight * (||w|| - 1) * w / ||w||
    expected = 2.0 * weight * (W_NORM - 1.0) * w / W_NORM
    torch.testing.assert_close(D.w.grad, expected, rtol=1e-5, atol=1e-6)
    assert float(D.b.grad) == 0.0


def test_gp_uses_the_given_eps():
    real, fake = _pair((3, 2, 2, 2))
    eps = torch.tensor([0.1, 0.5, 0.9]).reshape(3, 1, 1, 1)
    weight = 2.0
    gp = gradient_penalty(quadratic_critic, real, fake, weight=weight, eps=eps)
    # grad of ||x||^2 / 2 is x, so the norm is ||x_hat|| per sample.
    terms = []
    for i in range(3):
        x_hat = [eps[i].item() * r + (1 - eps[i].item()) * f
                 for r, f in zip(real[i].flatten().tolist(), fake[i].flatten().tolist())]
        terms.append((math.sqrt(sum(v * v for v in x_hat)) - 1.0) ** 2)
    assert float(gp.detach()) == pytest.approx(weight * sum(terms) / 3, rel=1e-5)
    # A different eps gives a different value: it is really used.
    other = gradient_penalty(quadratic_critic, real, fake, weight=weight, eps=1 - eps)
    assert float(other.detach()) != pytest.approx(float(gp.detach()), rel=1e-3)


def test_gp_draws_one_eps_per_sample_from_the_torch_rng():
    real, fake = _pair((4, 2, 3, 3))
    torch.manual_seed(123)
    drawn = gradient_penalty(quadratic_critic, real, fake)
    torch.manual_seed(123)
    eps = torch.rand(4, 1, 1, 1)
    torch.testing.assert_close(drawn, gradient_penalty(quadratic_critic, real, fake, eps=eps))


def test_gp_does_not_backpropagate_into_the_generator():
    g_param = nn.Parameter(torch.tensor(1.5))
    real, fake = _pair((3, 4))
    fake = fake * g_param
    real = real.requires_grad_(True)
    D = LinearCritic(torch.tensor(W))
    gradient_penalty(D, real, fake).backward()
    assert g_param.grad is None
    assert real.grad is None
    assert D.w.grad is not None


@pytest.mark.parametrize("gamma", [1.0, 10.0])
def test_r1_on_linear_critic_is_half_gamma_norm_squared(gamma):
    D = LinearCritic(torch.tensor(W))
    real = _pair((6, 4))[0].requires_grad_(True)
    r1 = r1_penalty(real, D(real), gamma=gamma)
    assert r1.dim() == 0 and r1.dtype == torch.float32
    assert float(r1.detach()) == pytest.approx(gamma / 2 * W_NORM**2, rel=1e-5)
    r1.backward()
    # d/dw gamma/2 ||w||^2 = gamma * w
    torch.testing.assert_close(D.w.grad, gamma * torch.tensor(W), rtol=1e-5, atol=1e-6)


def test_r1_on_quadratic_critic_is_the_mean_squared_input_norm():
    real = _pair((5, 3, 2, 2))[0].requires_grad_(True)
    r1 = r1_penalty(real, quadratic_critic(real), gamma=4.0)
    per_sample = [sum(v * v for v in row) for row in real.detach().flatten(1).tolist()]
    assert float(r1.detach()) == pytest.approx(4.0 / 2 * sum(per_sample) / 5, rel=1e-5)


@pytest.mark.parametrize("kind", ["gp", "r1"])
def test_penalty_alone_reaches_every_critic_parameter(kind):
    # The last layer's bias does not enter the input gradient; only the 0 * out term keeps it in
    # the graph (what DDP's reducer needs).
    D = small_mlp()
    real, fake = _pair((6, 4))
    if kind == "gp":
        loss = gradient_penalty(D, real, fake)
    else:
        real = real.requires_grad_(True)
        loss = r1_penalty(real, D(real))
    loss.backward()
    for name, p in D.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("kind", ["gp", "r1"])
def test_penalties_under_bf16_autocast_are_finite_float32(kind):
    D = small_mlp()
    real, fake = _pair((6, 4))

    def penalty() -> torch.Tensor:
        if kind == "gp":
            return gradient_penalty(D, real, fake, eps=torch.full((6, 1), 0.3))
        x = real.clone().requires_grad_(True)
        return r1_penalty(x, D(x))

    reference = penalty()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = penalty()
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert float(value.detach()) == pytest.approx(float(reference.detach()), rel=0.1, abs=1e-3)
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in D.parameters())


def test_clip_weights_bounds_every_parameter_of_every_net():
    nets = [small_mlp(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(4, 2))]
    for net in nets:
        for p in net.parameters():
            p.data.mul_(100.0)
    before = [p.detach().clone() for net in nets for p in net.parameters()]
    c = 0.05
    clip_weights(nets, c)
    after = [p for net in nets for p in net.parameters()]
    for b, a in zip(before, after):
        assert a.abs().max() <= c
        torch.testing.assert_close(a.detach(), b.clamp(-c, c))
        assert a.requires_grad and a.grad_fn is None  # still a trainable leaf


def test_clip_weights_leaves_small_weights_alone():
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[0.001, -0.002, 0.0], [0.005, -0.009, 0.0099]]))
        net.bias.copy_(torch.tensor([0.5, -0.5]))
    weight = net.weight.detach().clone()
    clip_weights([net], 0.01)
    assert torch.equal(net.weight, weight)
    assert net.bias.tolist() == pytest.approx([0.01, -0.01])


# ---------------------------------------------------------------------------- fp16 loss scaling
# fp16 loss scaling reaches the penalties' own input gradient (torch's AMP recipe), so D's fp16
# backward does not flush it to zero.


class TinyOutputD(nn.Module):
    """D(x) = 1e-4 * (1e-4 * sum(w * x)) computed in fp16: the input gradient 1e-8 * w is below
    fp16's smallest subnormal (6e-8), so an unscaled fp16 backward returns exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.6, -0.8, 1.2, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.half() * self.w.half()).sum(1)
        return (h * 1e-4) * 1e-4


def _fp32_twin(D: TinyOutputD):
    return lambda x: ((x * D.w).sum(1) * 1e-4) * 1e-4


def test_penalties_with_a_loss_scale_equal_the_unscaled_ones_in_fp32():
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    real, fake = torch.randn(6, 4), torch.randn(6, 4)
    eps = torch.rand(6, 1)
    values, grads = {}, {}
    for scale in (1.0, 2.0**12, 3.0):
        x = real.clone().requires_grad_(True)
        gp = gradient_penalty(D, real, fake, eps=eps, scale=scale)
        r1 = r1_penalty(x, D(x), scale=scale)
        (gp + r1).backward()  # the scaled graph must give D the same gradient
        values[scale] = (gp.detach(), r1.detach())
        grads[scale] = [p.grad.clone() for p in D.parameters()]
        D.zero_grad()
    for scale in (2.0**12, 3.0):
        torch.testing.assert_close(values[scale], values[1.0], rtol=1e-6, atol=0)
        torch.testing.assert_close(grads[scale], grads[1.0], rtol=1e-5, atol=1e-7)
    # loss_scale sets the scale for calls that do not pass one.
    x = real.clone().requires_grad_(True)
    with loss_scale(2.0**12):
        torch.testing.assert_close(r1_penalty(x, D(x)), values[1.0][1], rtol=1e-6, atol=0)


def test_the_loss_scale_keeps_an_fp16_penalty_gradient_from_underflowing():
    D = TinyOutputD()
    real = torch.randn(5, 4)
    x = real.clone().requires_grad_(True)
    exact = r1_penalty(x, _fp32_twin(D)(x), gamma=2.0)
    assert exact > 0
    x = real.clone().requires_grad_(True)
    assert float(r1_penalty(x, D(x), gamma=2.0).detach()) == 0.0  # flushed to zero: why scaling matters
    x = real.clone().requires_grad_(True)
    scaled = r1_penalty(x, D(x), gamma=2.0, scale=2.0**15)
    torch.testing.assert_close(scaled, exact, rtol=2e-3, atol=0)


def test_run_phase_gives_the_grad_scalers_scale_to_the_penalties():
    """An fp16 run has accelerate's GradScaler (CUDA only); here one is attached by hand."""
    state_mod.AcceleratorState._reset_state()
    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**15)
    D = TinyOutputD()
    real = torch.randn(5, 4)

    def d_loss(nets, batch, prev):
        x = batch["x"].detach().requires_grad_(True)
        r1 = r1_penalty(x, nets["D"](x), gamma=2.0)
        return {"loss": r1, "r1": r1}

    phase = Phase("D", ("D",), d_loss, lr=0.0)
    cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=1, grad_clip=0.0))
    opt = torch.optim.SGD(D.parameters(), lr=0.0)
    x = real.clone().requires_grad_(True)
    exact = r1_penalty(x, _fp32_twin(D)(x), gamma=2.0)
    logs, _ = loop.run_phase(acc, cfg, phase, opt, {"D": D}, {"x": real}, [{}])
    torch.testing.assert_close(logs["D/r1"], exact.detach(), rtol=2e-3, atol=0)
    # Once the scaler has scaled a loss its scale is a tensor, passed on without a host sync.
    acc.scaler.scale(torch.ones(()))
    assert isinstance(acc.scaler._scale, torch.Tensor)
    logs, _ = loop.run_phase(acc, cfg, phase, opt, {"D": D}, {"x": real}, [{}])
    torch.testing.assert_close(logs["D/r1"], exact.detach(), rtol=2e-3, atol=0)
