"""GAN options: spectral norm, self-attention, minibatch std, unrolled D steps."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, run_cli, tiny_sets
from PIL import Image
from torch import nn

from translate import recipe as recipe_mod
from translate import runner
from translate.core import loop
from translate.core.penalties import clip_weights
from translate.errors import ConfigError
from translate.methods import METHODS
from translate.methods.unrolled import copy_net, unroll_through
from translate.nets import build_net
from translate.nets.attention import SelfAttention
from translate.nets.minibatch_std import MinibatchStd

TOY = [*tiny_sets("toy"), "model.depth=2", "train.log_every=1", "train.sample_every=100",
       "train.save_every=100"]


def _folder(path: Path, n: int = 8, size: int = 32) -> Path:
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy()).save(
            path / f"{i}.png")
    return path


def _image_sets(folder: Path) -> list[str]:
    return ["model.ngf=4", "model.ndf=4", "model.image_size=32", "data.crop_size=32",
            "model.z_dim=8", "train.batch_size=4", f'data.root="{folder}"',
            "train.log_every=1", "train.sample_every=100", "train.save_every=100"]


def _train(recipe: str, sets: list[str], run: Path, steps: int = 2) -> dict:
    cfg = recipe_mod.load(ROOT / "recipes" / recipe, [*sets, f"train.steps={steps}",
                                                  f'run_dir="{run}"'])
    result = runner.train(cfg, progress=False)
    assert result.step == steps
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(logs) == steps
    assert all(math.isfinite(v) for r in logs for v in r.values())
    return logs[-1]


def _sigma(layer: nn.Module) -> float:
    w = layer.weight.detach()
    return torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item()


# ------------------------------------------------------------------------ spectral norm

SN_NETS = [
    ("dcgan_d", {"ndf": 8, "image_size": 16, "norm": "none", "attention": 4}, (4, 3, 16, 16)),
    ("mlp_d", {"hidden": 32, "depth": 2}, (8, 2)),
    ("patchgan", {"ndf": 8, "n_layers": 2}, (2, 3, 32, 32)),
]


@pytest.mark.parametrize("kind,cfg,shape", SN_NETS)
def test_spectral_norm_keeps_top_singular_value_near_one(kind, cfg, shape):
    torch.manual_seed(0)
    net = build_net(kind, **cfg, spectral_norm=True).train()
    plain = build_net(kind, **cfg).train()
    with torch.no_grad():  # weights 10x too big: without SN, sigma grows 10x with them
        for m in [*net.modules(), *plain.modules()]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = m.parametrizations.weight.original if hasattr(m, "parametrizations") \
                    else m.weight
                w.mul_(10)
    for _ in range(10):  # one power iteration per training forward
        net(torch.randn(shape))
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    assert [round(_sigma(m), 2) for m in layers] == pytest.approx([1.0] * len(layers), abs=0.05)
    plain_sigmas = [_sigma(m) for m in plain.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert max(plain_sigmas) > 3


def test_spectral_norm_option_reaches_every_method_d(tmp_path, tiny_unpaired):
    folder = _folder(tmp_path / "images")
    cases = [("toy_gan_ring.toml", TOY), ("dcgan.toml", _image_sets(folder)),
             ("wgan_gp.toml", _image_sets(folder)),
             ("cyclegan_demo.toml", [*TINY_CYCLEGAN, f'data.root="{tiny_unpaired}"',
                                     "train.log_every=1", "train.sample_every=100",
                                     "train.save_every=100"])]
    for i, (recipe, sets) in enumerate(cases):
        cfg = recipe_mod.load(ROOT / "recipes" / recipe, [*sets, "model.spectral_norm=true"])
        method = METHODS[cfg.method].build(cfg)
        ds = [n for n in method.nets if n.startswith("D")]
        for name in ds:
            convs = [m for m in method.nets[name].modules()
                     if isinstance(m, (nn.Conv2d, nn.Linear))]
            assert all(hasattr(m, "parametrizations") for m in convs), (recipe, name)
        _train(recipe, [*sets, "model.spectral_norm=true"], tmp_path / f"run{i}")


# ------------------------------------------------------------------------ self-attention


def test_attention_starts_as_identity_and_gamma_learns():
    torch.manual_seed(0)
    block = SelfAttention(16)
    x = torch.randn(2, 16, 6, 5)
    assert torch.equal(block(x), x)
    block(x).square().sum().backward()
    assert block.gamma.grad is not None and block.gamma.grad.abs() > 0


def test_attention_is_non_local_once_gamma_is_set():
    torch.manual_seed(0)
    block = SelfAttention(16)
    with torch.no_grad():
        block.gamma.fill_(1.0)
    x = torch.randn(1, 16, 8, 8)
    x2 = x.clone()
    x2[0, :, 0, 0] += 3.0  # one corner pixel
    changed = (block(x2) - block(x)).abs().sum(dim=1)[0]
    assert changed[7, 7] > 1e-4  # the opposite corner sees it: a conv of this size could not


def test_attention_option_places_blocks_and_trains(tmp_path):
    g = build_net("dcgan_g", z_dim=8, ngf=4, image_size=32, attention=16)
    d = build_net("dcgan_d", ndf=4, image_size=32, attention=8)
    assert sum(isinstance(m, SelfAttention) for m in g.modules()) == 1
    assert sum(isinstance(m, SelfAttention) for m in d.modules()) == 1
    with pytest.raises(ConfigError, match="feature-map side"):
        build_net("dcgan_g", image_size=32, attention=32)
    folder = _folder(tmp_path / "images")
    with pytest.raises(ConfigError, match="model.self_attention"):
        recipe_mod.load(ROOT / "recipes" / "dcgan.toml", [*_image_sets(folder),
                                                      "model.self_attention=32"])
    with pytest.raises(ConfigError, match="model.self_attention"):
        recipe_mod.load(ROOT / "recipes" / "toy_gan_ring.toml", [*TOY, "model.self_attention=8"])
    _train("dcgan.toml", [*_image_sets(folder), "model.self_attention=8"], tmp_path / "run")


# ------------------------------------------------------------------------ minibatch std


def test_minibatch_std_feature_is_zero_only_for_identical_samples():
    layer = MinibatchStd(4)
    same = torch.randn(1, 3, 4, 4).expand(8, -1, -1, -1)
    out = layer(same)
    assert out.shape == (8, 4, 4, 4)
    assert torch.equal(out[:, :3], same)
    assert out[:, 3].abs().max() < 1e-3
    varied = layer(torch.randn(8, 3, 4, 4))[:, 3]
    assert (varied > 0.1).all()
    # Groups are strided: samples 0, 2, 4, 6 form one group, 1, 3, 5, 7 the other.
    x = torch.randn(8, 5)
    x[0::2] = x[0]
    flat = layer_out = MinibatchStd(4)(x)[:, 5]
    assert layer_out[0::2].abs().max() < 1e-3 and (flat[1::2] > 0.1).all()
    assert flat[1::2].unique().numel() == 1


def test_minibatch_std_group_must_divide_the_batch(tmp_path):
    with pytest.raises(ConfigError, match="must divide"):
        MinibatchStd(3)(torch.randn(8, 2))
    with pytest.raises(ConfigError, match="model.minibatch_std"):
        recipe_mod.load(ROOT / "recipes" / "toy_gan_ring.toml",
                    [*TOY, "model.pack=2", "model.minibatch_std=3"])
    proc = run_cli("train", "recipes/toy_gan_ring.toml", "--set", "model.minibatch_std=3",
                   "--set", "train.batch_size=8", "--dry-run", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "model.minibatch_std" in proc.stderr


def test_minibatch_std_option_trains(tmp_path):
    _train("toy_gan_grid.toml", [*TOY, "model.pack=2", "model.minibatch_std=2"],
           tmp_path / "toy")
    folder = _folder(tmp_path / "images")
    _train("dcgan.toml", [*_image_sets(folder), "model.minibatch_std=4",
                          'model.d_norm="none"'], tmp_path / "img")


# ------------------------------------------------------------------------ unrolled GAN


def _toy_session(tmp_path: Path, k: int, extra: list[str] | None = None) -> loop.Session:
    cfg = recipe_mod.load(ROOT / "recipes" / "toy_gan_ring.toml",
                      [*TOY, f"model.unrolled_steps={k}", f'run_dir="{tmp_path}/k{k}"',
                       *(extra or [])])
    return runner.setup(cfg)


def _g_grads(s: loop.Session, batch: dict) -> list[torch.Tensor]:
    G = s.nets["G"]
    G.zero_grad(set_to_none=True)
    loop.set_trainable(s.nets, ("G",))
    s.method.phases[1].loss(s.nets, batch, {})["loss"].backward()
    return [p.grad.clone() for p in G.parameters()]


def test_unrolled_g_gradient_differs_from_plain(tmp_path):
    plain, unrolled = _toy_session(tmp_path, 0), _toy_session(tmp_path, 3)
    for name in ("G", "D"):  # same seed: same initial weights
        for a, b in zip(plain.nets[name].parameters(), unrolled.nets[name].parameters()):
            assert torch.equal(a, b)
    batch = loop.Batches(plain.cfg, plain.dataset, plain.accelerator, 0).next()
    g0, g3 = _g_grads(plain, batch), _g_grads(unrolled, batch)
    assert torch.equal(g0[0], _g_grads(plain, batch)[0])  # the k = 0 path is deterministic
    diff = sum((a - b).norm() for a, b in zip(g0, g3))
    assert diff > 1e-3 * sum(a.norm() for a in g0)


@pytest.mark.parametrize("net,backprop", [("toy", False), ("toy", True), ("dcgan", True)])
def test_unrolled_g_phase_leaves_d_and_its_optimizer_untouched(tmp_path, net, backprop):
    """Spectral norm's vectors (toy D) and BatchNorm's statistics (DCGAN's D) included."""
    unroll = ["model.unrolled_steps=2", f"model.unrolled_backprop={str(backprop).lower()}"]
    if net == "toy":
        s = _toy_session(tmp_path, 2, ["model.spectral_norm=true", *unroll])
    else:
        s = runner.setup(recipe_mod.load(ROOT / "recipes" / "dcgan.toml", [
            *_image_sets(_folder(tmp_path / "images")), *unroll, f'run_dir="{tmp_path}/run"']))
    batches = loop.Batches(s.cfg, s.dataset, s.accelerator, 0)
    d_phase, g_phase = s.method.phases
    d_opt, g_opt = s.opts
    loop.set_trainable(s.nets, d_phase.nets)
    loop.run_phase(s.accelerator, s.cfg, d_phase, d_opt, s.nets, batches.next(), [{}])
    d_before = {k: v.clone() for k, v in s.nets["D"].state_dict().items()}
    opt_before = {i: {k: v.clone() for k, v in st.items()}
                  for i, st in d_opt.state_dict()["state"].items()}
    g_before = [p.detach().clone() for p in s.nets["G"].parameters()]
    loop.set_trainable(s.nets, g_phase.nets)
    loop.run_phase(s.accelerator, s.cfg, g_phase, g_opt, s.nets, batches.next(), [{}])
    d_after = s.nets["D"].state_dict()
    assert d_after.keys() == d_before.keys()
    assert all(torch.equal(d_after[k], v) for k, v in d_before.items())  # SN's u, v too
    opt_after = d_opt.state_dict()["state"]
    assert all(torch.equal(opt_after[i][k], v) for i, st in opt_before.items()
               for k, v in st.items())
    assert all(p.grad is None for p in s.nets["D"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(g_before, s.nets["G"].parameters()))


@pytest.mark.parametrize("extra", [
    [], ["train.grad_accum=2", 'model.penalty="gp"'], ["model.unrolled_backprop=true"],
    ["model.unrolled_backprop=true", 'model.penalty="gp"', "model.spectral_norm=true"],
    ["model.unrolled_backprop=true", 'train.optimizer="rmsprop"', 'model.penalty="clip"']])
def test_unrolled_toy_run_trains(tmp_path, extra):
    _train("toy_gan_ring.toml", [*TOY, "model.unrolled_steps=2", *extra], tmp_path / "run",
           steps=3)


def test_unrolled_backprop_needs_unrolled_steps(tmp_path):
    with pytest.raises(ConfigError, match="model.unrolled_steps"):
        _toy_session(tmp_path, 0, ["model.unrolled_backprop=true"])


def _d_and_optimizer(kind: str, dtype=torch.float32) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small toy D and its optimizer after two real steps (moments and step count set)."""
    torch.manual_seed(0)
    D = build_net("mlp_d", in_dim=2, hidden=16, depth=2, pack=1, spectral_norm=False,
                  minibatch_std=0).to(dtype)
    opt = (torch.optim.Adam(D.parameters(), lr=1e-2, betas=(0.5, 0.999), fused=True)
           if kind == "adam" else torch.optim.RMSprop(D.parameters(), lr=1e-2))
    for _ in range(2):
        opt.zero_grad()
        D(torch.randn(8, 2, dtype=dtype)).square().mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return D, opt


@pytest.mark.parametrize("kind,clip", [("adam", None), ("rmsprop", 0.05)])
def test_unroll_through_takes_the_optimizers_own_steps(kind, clip):
    """The written-out update equals torch's own (fused Adam; RMSprop with WGAN clipping) over
    3 steps from the optimizer's state, and leaves D and the optimizer as they were."""
    D, opt = _d_and_optimizer(kind)
    x = [torch.randn(8, 2, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    twin = copy_net(D)
    twin_opt = type(opt)(twin.parameters(), **opt.defaults)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # (else they share moments)
    before = ({k: v.clone() for k, v in D.state_dict().items()},
              {i: {k: v.clone() for k, v in st.items()} for i, st in opt.state_dict()["state"].items()})
    for i in range(3):
        twin_opt.zero_grad()
        torch.tanh(twin(x[i])).mean().backward()
        twin_opt.step()
        if clip:
            clip_weights([twin], clip)
    judge = unroll_through(D, lambda D_i, i: torch.tanh(D_i(x[i])).mean(), 3, opt, clip)
    probe = torch.randn(64, 2)
    torch.testing.assert_close(judge(probe), twin(probe), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(D(probe), twin(probe), atol=1e-4)  # the steps did move D
    assert all(torch.equal(D.state_dict()[k], v) for k, v in before[0].items())
    assert all(torch.equal(opt.state_dict()["state"][i][k], v)
               for i, st in before[1].items() for k, v in st.items())
    assert all(p.grad is None for p in D.parameters())


def test_unroll_through_gives_g_the_second_order_gradient():
    """G's gradient through 3 unrolled Adam steps (float64) matches central finite
    differences of the whole unrolled objective; without the term through D's updates (the
    cheap variant) it does not."""
    D, opt = _d_and_optimizer("adam", torch.float64)
    G = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    z = torch.randn(3, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    real = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def objective(through: bool = True) -> torch.Tensor:
        def d_loss(D_i, i):
            fake = G(z[i]) if through else G(z[i]).detach()
            return (nn.functional.softplus(-D_i(real)) + nn.functional.softplus(D_i(fake))).mean()
        judge = unroll_through(D, d_loss, 3, opt, None)
        return nn.functional.softplus(-judge(G(z[0]))).mean()

    direction = [torch.randn_like(p) for p in G.parameters()]
    full = torch.autograd.grad(objective(), list(G.parameters()))
    cheap = torch.autograd.grad(objective(through=False), list(G.parameters()))
    h, values = 1e-6, []
    for step in (h, -2 * h, h):  # to +h, to -h, back
        with torch.no_grad():
            for p, d in zip(G.parameters(), direction):
                p.add_(step * d)
        values.append(objective().item())
    numeric = (values[0] - values[1]) / (2 * h)
    along = [sum((g * d).sum() for g, d in zip(grads, direction)).item() for grads in (full, cheap)]
    assert along[0] == pytest.approx(numeric, rel=1e-6, abs=1e-10)
    assert abs(along[1] - numeric) > 1e-3 * abs(numeric)
