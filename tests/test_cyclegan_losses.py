"""CycleGAN's loss terms on tiny inputs against values worked out by hand, with stub nets that
make each expectation exact; plus the default objective and the optimizers a run really builds.

Stubs: G_ab(x) = x + 0.2, G_ba(x) = 0.5 x, D_a(x) = x, D_b(x) = x - 0.5 (patch maps), and
constant images a = 0.6, b = -0.4. Then fake_b = 0.8, fake_a = -0.2, rec_a = 0.4, rec_b = 0.0,
G_ba(a) = 0.3, G_ab(b) = -0.2, D_b(fake_b) = 0.3, D_a(fake_a) = -0.2, D_a(a) = 0.6, D_b(b) = -0.9.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN
from torch import Tensor, nn

from translate import config
from translate.config import apply_overrides, from_dict
from translate.core import objectives
from translate.core.loop import setup
from translate.methods.cyclegan import CycleGAN, CycleGANConfig
from translate.methods.pool import ImagePool

A, B = 0.6, -0.4


class Stub(nn.Module):
    """y = scale * x + shift, remembering every input it was called on."""

    def __init__(self, scale: float, shift: float) -> None:
        super().__init__()
        self.scale, self.shift = scale, shift
        self.inputs: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        self.inputs.append(x.detach().clone())
        return self.scale * x + self.shift


def image_means(stub: Stub) -> list[float]:
    """The mean of every image the stub was called on, in call order."""
    return torch.cat(stub.inputs).mean(dim=(1, 2, 3)).tolist()


def stub_nets() -> dict[str, Stub]:
    return {"G_ab": Stub(1.0, 0.2), "G_ba": Stub(0.5, 0.0),
            "D_a": Stub(1.0, 0.0), "D_b": Stub(1.0, -0.5)}


def method(*sets: str) -> CycleGAN:
    sets_ = ["model.ngf=4", "model.ndf=4", "model.n_blocks=1", "model.n_layers_d=1", *sets]
    return CycleGAN(from_dict(apply_overrides({}, sets_)))


def batch() -> dict[str, Tensor]:
    return {"a": torch.full((2, 3, 4, 4), A), "b": torch.full((2, 3, 4, 4), B)}


def close(t: Tensor, value: float) -> bool:
    return abs(t.item() - value) < 1e-6


def test_generator_terms_by_hand():
    out = method().g_loss(stub_nets(), batch(), {})
    # cycle: lambda_cycle 10 x L1 per direction
    assert close(out["cycle_a"], 10 * abs(0.4 - A))   # 2.0
    assert close(out["cycle_b"], 10 * abs(0.0 - B))   # 4.0
    # identity: lambda_cycle x lambda_identity = 5 x L1(G_ba(a), a) and L1(G_ab(b), b)
    assert close(out["idt_a"], 5 * abs(0.3 - A))      # 1.5
    assert close(out["idt_b"], 5 * abs(-0.2 - B))     # 1.0
    # adversarial, lsgan: (D_b(G_ab(a)) - 1)^2 and (D_a(G_ba(b)) - 1)^2; a swapped D or swapped
    # fake would give 0.04 or 2.89 instead
    assert close(out["adv_ab"], (0.3 - 1) ** 2)       # 0.49
    assert close(out["adv_ba"], (-0.2 - 1) ** 2)      # 1.44
    assert close(out["loss"], 2.0 + 4.0 + 1.5 + 1.0 + 0.49 + 1.44)
    assert close(out["fake_b"].mean(), 0.8) and close(out["fake_a"].mean(), -0.2)
    assert not out["fake_a"].requires_grad


def test_identity_weight_falls_to_zero_by_identity_until():
    m = method("model.identity_until=0.4")
    for progress, scale in ((0.0, 1.0), (0.1, 0.75), (0.3, 0.25), (0.4, 0.0), (0.9, 0.0)):
        out = m.g_loss(stub_nets(), batch(), {"progress": torch.tensor(progress)})
        assert close(out["idt_a"], scale * 1.5) and close(out["idt_b"], scale * 1.0), progress
        assert close(out["cycle_a"], 2.0)  # the other terms keep their weights
    # once the weight is 0 the identity images are not translated at all (a third of G's work)
    for progress, images in ((0.3, 3 * 2), (0.4, 2 * 2)):
        nets = stub_nets()
        m.g_loss(nets, batch(), {"progress": torch.tensor(progress)})
        assert len(image_means(nets["G_ab"])) == images, progress  # a, (b,) fake_a
    # the default keeps the paper's constant weight whatever the progress
    late = method().g_loss(stub_nets(), batch(), {"progress": torch.tensor(0.9)})
    assert close(late["idt_a"], 1.5)


def test_the_loop_hands_every_phase_the_progress_of_the_run(tiny_unpaired, tmp_path,
                                                            monkeypatch):
    from translate.core.loop import train

    seen: list[tuple[str, float]] = []
    g_loss, d_loss = CycleGAN.g_loss, CycleGAN.d_loss

    def spy(fn, name):
        def wrapped(self, nets, batch, prev):
            seen.append((name, float(prev["progress"])))
            return fn(self, nets, batch, prev)
        return wrapped

    monkeypatch.setattr(CycleGAN, "g_loss", spy(g_loss, "G"))
    monkeypatch.setattr(CycleGAN, "d_loss", spy(d_loss, "D"))
    cfg = config.load(ROOT / "recipes" / "cyclegan_demo.toml", TINY_CYCLEGAN + [
        f'data.root="{tiny_unpaired}"', f'run_dir="{tmp_path / "run"}"', "train.steps=4"])
    train(cfg, progress=False)
    assert seen == [(p, s / 4) for s in range(4) for p in ("G", "D")]


def test_lambdas_scale_their_terms_only():
    out = method("model.lambda_cycle=3", "model.lambda_identity=0.1").g_loss(
        stub_nets(), batch(), {})
    assert close(out["cycle_a"], 3 * 0.2) and close(out["cycle_b"], 3 * 0.4)
    assert close(out["idt_a"], 0.3 * 0.3) and close(out["idt_b"], 0.3 * 0.2)
    assert close(out["adv_ab"], 0.49) and close(out["adv_ba"], 1.44)


def test_identity_terms_are_absent_at_zero():
    nets = stub_nets()
    out = method("model.lambda_identity=0").g_loss(nets, batch(), {})
    assert "idt_a" not in out and "idt_b" not in out
    assert close(out["loss"], 2.0 + 4.0 + 0.49 + 1.44)
    # G_ba ran on b and on fake_b only, never on a itself
    assert [x.mean().item() for x in nets["G_ba"].inputs] == pytest.approx([B, 0.8])


def test_discriminator_terms_are_halved():
    out = method("model.pool_size=0").d_loss(
        stub_nets(), batch(), {"fake_a": torch.full((2, 3, 4, 4), -0.2),
                               "fake_b": torch.full((2, 3, 4, 4), 0.8)})
    # 0.5 * ((D(real) - 1)^2 + D(fake)^2)
    assert close(out["D_a"], 0.5 * ((A - 1) ** 2 + 0.2**2))          # 0.1
    assert close(out["D_b"], 0.5 * ((B - 0.5 - 1) ** 2 + 0.3**2))    # 1.85
    assert close(out["loss"], 0.1 + 1.85)
    assert close(out["real_a"], A) and close(out["fake_b"], 0.3)  # mean D output, logged


class FixedPool:
    """Hands back `value` images whatever it is asked, remembering the query."""

    def __init__(self, value: float) -> None:
        self.value, self.queries = value, []

    def query(self, images: Tensor) -> Tensor:
        self.queries.append(images)
        return torch.full_like(images, self.value)


def test_discriminators_judge_the_pooled_fakes():
    m, nets = method(), stub_nets()
    m.pool_a, m.pool_b = FixedPool(0.1), FixedPool(0.7)
    prev = {"fake_a": torch.full((2, 3, 4, 4), -0.2), "fake_b": torch.full((2, 3, 4, 4), 0.8)}
    out = m.d_loss(nets, batch(), prev)
    assert m.pool_a.queries[0] is prev["fake_a"] and m.pool_b.queries[0] is prev["fake_b"]
    assert close(out["D_a"], 0.5 * ((A - 1) ** 2 + 0.1**2))
    assert close(out["D_b"], 0.5 * ((B - 0.5 - 1) ** 2 + (0.7 - 0.5) ** 2))
    # real images first, then the pool's (in one call or two: see CycleGAN._twice)
    assert image_means(nets["D_a"]) == pytest.approx([A, A, 0.1, 0.1])


def test_a_full_history_pool_feeds_old_fakes_to_d():
    m = method("model.pool_size=2")
    old = {"fake_a": torch.full((2, 3, 4, 4), 0.1), "fake_b": torch.full((2, 3, 4, 4), 0.7)}
    m.d_loss(stub_nets(), batch(), old)  # fills both pools
    new = {"fake_a": torch.full((2, 3, 4, 4), -0.2), "fake_b": torch.full((2, 3, 4, 4), 0.8)}
    torch.manual_seed(0)
    seen = set()
    for _ in range(10):  # each image comes from the history with probability 1/2
        nets = stub_nets()
        m.d_loss(nets, batch(), new)
        seen.update(round(v, 4) for v in image_means(nets["D_a"])[2:])  # the fakes
    assert seen == {0.1, -0.2}


def test_lsgan_is_the_default_objective():
    assert CycleGANConfig().objective == "lsgan"
    m = method()
    assert m.d_obj is objectives.lsgan_d and m.g_obj is objectives.lsgan_g
    hinge = method('model.objective="hinge"').g_loss(stub_nets(), batch(), {})
    assert close(hinge["adv_ab"], -0.3) and close(hinge["adv_ba"], 0.2)


def test_real_nets_cycle_and_identity_match_their_definitions():
    m = method()
    g = torch.Generator().manual_seed(0)
    data = {k: torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for k in ("a", "b")}
    out = m.g_loss(m.nets, data, {})
    nets = m.nets
    with torch.no_grad():
        rec_a = nets["G_ba"](nets["G_ab"](data["a"]))
        idt_b = nets["G_ab"](data["b"])
    torch.testing.assert_close(out["cycle_a"], 10 * (rec_a - data["a"]).abs().mean())
    torch.testing.assert_close(out["idt_b"], 5 * (idt_b - data["b"]).abs().mean())


def test_real_nets_d_terms_match_separate_calls():
    # D judges real and fake in one call of twice the batch: with per-image norms that is the
    # same as the reference's two calls.
    m = method("model.pool_size=0")
    g = torch.Generator().manual_seed(0)
    data = {k: torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for k in ("a", "b")}
    prev = {k: torch.rand(2, 3, 16, 16, generator=g) * 2 - 1 for k in ("fake_a", "fake_b")}
    out = m.d_loss(m.nets, data, prev)
    with torch.no_grad():
        real, fake = m.nets["D_a"](data["a"]), m.nets["D_a"](prev["fake_a"])
    torch.testing.assert_close(out["D_a"], 0.5 * ((real - 1) ** 2 + fake**2).mean())


@pytest.mark.parametrize("sets", [[], ["model.norm='batch'"], ["model.spectral_norm=true"]])
def test_nets_run_once_per_pair_only_when_images_do_not_mix(sets):
    # BatchNorm's statistics and spectral norm's power iteration depend on each call: there
    # the nets are called separately, as in the reference.
    m, nets = method(*sets), stub_nets()
    m.d_loss(nets, batch(), {"fake_a": torch.zeros(2, 3, 4, 4), "fake_b": torch.zeros(2, 3, 4, 4)})
    m.g_loss(nets, batch(), {})
    apart = bool(sets)
    assert len(nets["D_a"].inputs) == (2 if apart else 1) + 1  # + G's adversarial term
    assert len(nets["G_ab"].inputs) == (3 if apart else 2)  # translation + identity, cycle
    assert image_means(nets["G_ab"])[:4] == pytest.approx([A, A, B, B])


@pytest.mark.parametrize("recipe", [None, "cyclegan_horse2zebra.toml"])
def test_optimizers_are_adam_2e4_betas_half(recipe, tiny_unpaired, tmp_path):
    path = ROOT / "recipes" / recipe if recipe else None
    cfg = config.load(path, TINY_CYCLEGAN + [f'data.root="{tiny_unpaired}"',
                                             f'run_dir="{tmp_path / "run"}"'])
    s = setup(cfg)
    names = [ph.name for ph in s.method.phases]
    assert names == ["G", "D"]
    for phase, opt, trained in zip(s.method.phases, s.opts, (("G_ab", "G_ba"), ("D_a", "D_b"))):
        assert phase.nets == trained
        assert isinstance(opt.optimizer, torch.optim.Adam)
        (group,) = opt.param_groups
        assert group["lr"] == 2e-4 and group["betas"] == (0.5, 0.999)
        want = {id(p) for n in trained for p in s.nets[n].parameters()}
        assert {id(p) for p in group["params"]} == want


def test_pool_is_a_history_pool_of_the_configured_size():
    m = method()
    assert isinstance(m.pool_a, ImagePool) and m.pool_a.size == m.pool_b.size == 50
