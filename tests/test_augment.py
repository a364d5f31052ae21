"""DiffAugment on kornia: shapes, gradients, per-sample randomness, seeding, policy names, bf16
autocast, one draw shared by real and fake, no clipping, and G's gradient through it in CycleGAN."""

import pytest
import torch
from torch import Tensor, nn

from translate.augment import (
    POLICIES,
    apply_params,
    diff_augment,
    diff_augment_pair,
    parse_policy,
    sample_params,
)
from translate.config import apply_overrides
from translate.errors import ConfigError
from translate.methods.cyclegan import CycleGAN
from translate.recipe import from_dict


def images(n: int = 4, c: int = 3, h: int = 16, w: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 1.6 - 0.8  # inside [-1, 1], never exactly 0


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("policy", ["color", "translation", "cutout", "color,translation,cutout"])
def test_shape_dtype_and_gradient(policy):
    x = images().requires_grad_(True)
    y = diff_augment(x, policy, generator=seeded())
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("policy", list(POLICIES))
def test_each_policy_changes_images(policy):
    x = images()
    y = diff_augment(x, policy, generator=seeded())
    changed = (y != x).flatten(1).any(dim=1)
    assert changed.sum() >= 3  # a zero shift for one sample is possible, for most it is not


def test_translation_shifts_whole_pixels_with_zero_fill():
    x = images(n=8)
    ((_, drawn),) = sample_params(x.shape, "translation", generator=seeded())
    for key, limit in (("translate_x", 3), ("translate_y", 2)):  # 1/8 of 24 and 16, rounded
        assert torch.equal(drawn[key], drawn[key].round()) and drawn[key].abs().max() <= limit
    y = diff_augment(x, "translation", generator=seeded())
    for xi, yi in zip(x, y):
        # Every output pixel is either zero fill or an input pixel moved by one common shift.
        nonzero = yi != 0
        assert nonzero.any()
        found = False
        for dy in range(-2, 3):
            for dx in range(-3, 4):
                moved = torch.roll(xi, shifts=(dy, dx), dims=(1, 2))
                if torch.equal(yi[nonzero], moved[nonzero]):
                    found = True
        assert found
        assert (yi == 0).sum() <= xi.numel() * (1 - (1 - 2 / 16) * (1 - 3 / 24)) + 1e-6


def test_cutout_zeroes_a_half_size_square():
    x = images(n=6, h=16, w=16)
    y = diff_augment(x, "cutout", generator=seeded())
    for xi, yi in zip(x, y):
        zeroed = (yi == 0).all(dim=0)
        kept = ~zeroed
        assert torch.equal(yi[:, kept], xi[:, kept])
        rows = zeroed.any(dim=1).sum().item()
        cols = zeroed.any(dim=0).sum().item()
        assert 1 <= rows <= 8 and 1 <= cols <= 8
        assert zeroed.sum().item() == rows * cols  # one axis-aligned rectangle


def test_color_is_not_clamped():
    x = torch.full((8, 3, 4, 4), 0.95)
    x[:, 0] = -0.95
    y = diff_augment(x, "color", generator=seeded())
    assert y.abs().max() > 1  # clamping to [-1, 1] would kill gradients at the edges


def test_parameters_differ_per_sample():
    x = images(n=1).expand(8, -1, -1, -1).contiguous()
    for policy in POLICIES:
        y = diff_augment(x, policy, generator=seeded())
        distinct = {tuple(yi.flatten().tolist()) for yi in y}
        assert len(distinct) > 1, policy


def test_seeded_generator_is_deterministic():
    x = images()
    a = diff_augment(x, generator=seeded(5))
    b = diff_augment(x, generator=seeded(5))
    c = diff_augment(x, generator=seeded(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_parse_policy():
    assert parse_policy("color, translation,cutout") == ["color", "translation", "cutout"]
    assert parse_policy("") == [] and parse_policy("none") == []
    assert torch.equal(diff_augment(images(), "none"), images())


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="'colour'") as info:
        parse_policy("colour,cutout")
    assert all(name in str(info.value) for name in POLICIES)
    with pytest.raises(ConfigError):
        diff_augment(images(), "translation,flip")


def test_bf16_autocast_on_cpu():
    conv = torch.nn.Conv2d(3, 3, 3, padding=1)
    x = images().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fake = conv(x)
        assert fake.dtype == torch.bfloat16
        y = diff_augment(fake, generator=seeded())
        assert y.dtype == torch.bfloat16 and y.shape == fake.shape
        loss = y.float().square().mean()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_real_and_fake_share_one_draw():
    real, fake = images(seed=1), images(seed=2)
    ra, fa = diff_augment_pair(real, fake, generator=seeded(3))
    params = sample_params(real.shape, generator=seeded(3))
    assert torch.equal(ra, apply_params(real, params)) and torch.equal(fa, apply_params(fake, params))
    assert torch.equal(*diff_augment_pair(real, real.clone(), generator=seeded(4)))
    # translation + cutout leave the same zeroed pixels in both
    r, f = diff_augment_pair(real, fake, "translation,cutout", generator=seeded(6))
    assert (r == 0).any() and torch.equal(r == 0, f == 0)
    with pytest.raises(ValueError, match="differ in shape"):
        diff_augment_pair(real, fake[:2])


def test_kornia_does_not_clip():
    x = torch.full((8, 3, 16, 16), 0.98)
    x[:, 1] = -0.98
    y = diff_augment(x, generator=seeded())
    assert y.max() > 1 and y.min() < -1


class Identity(nn.Module):
    """A discriminator that passes its input through, remembering it."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return x


def tiny_cyclegan(policy: str, *sets: str) -> CycleGAN:
    return CycleGAN(from_dict(apply_overrides({}, [
        "model.ngf=4", "model.n_blocks=1", "model.pool_size=0", "model.lambda_cycle=0",
        "model.lambda_identity=0", f'model.diff_augment="{policy}"', *sets])))


def test_d_sees_real_and_fake_through_the_same_augmentation():
    m = tiny_cyclegan("color,translation,cutout")
    nets = {**m.nets, "D_a": Identity(), "D_b": Identity()}
    a = images(n=2, h=16, w=16, seed=1)
    b = images(n=2, h=16, w=16, seed=2)
    m.d_loss(nets, {"a": a, "b": b}, {"fake_a": a.clone(), "fake_b": b.clone()})
    for d, x in (("D_a", a), ("D_b", b)):
        # D judges real and fake in one call (a batch of both) or in two: either way, halves.
        seen_real, seen_fake = torch.cat(nets[d].inputs).chunk(2)
        assert torch.equal(seen_real, seen_fake)  # same image in, same augmentation applied
        assert not torch.equal(seen_real, x)      # and it was augmented


def test_g_gets_gradients_through_the_augmentation():
    """With D = identity and only cutout, d adv_ab / d G_ab(a) is zero exactly where the cutout
    hid the fake from D and non-zero elsewhere; G_ab's weights receive gradients."""
    m = tiny_cyclegan("cutout")
    nets = {**m.nets, "D_a": Identity(), "D_b": Identity()}
    kept: list[Tensor] = []

    def keep(module, inputs, output):
        output.retain_grad()
        kept.append(output)

    hook = nets["G_ab"].register_forward_hook(keep)
    a = images(n=2, h=16, w=16, seed=1)
    out = m.g_loss(nets, {"a": a, "b": images(n=2, h=16, w=16, seed=2)}, {})
    hook.remove()
    out["adv_ab"].backward()
    grad = kept[0].grad
    hidden = (grad == 0).all(dim=1)  # (N, H, W)
    assert torch.equal(hidden.sum(dim=(1, 2)), torch.tensor([64, 64]))  # an 8x8 square each
    weights = [p.grad for p in nets["G_ab"].parameters()]
    assert all(g is not None for g in weights) and sum(g.abs().sum() for g in weights) > 0
