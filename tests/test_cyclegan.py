"""CycleGAN's loss terms on tiny inputs against values worked out by hand, with stub nets that
make each expectation exact; plus the default objective and the optimizers a run really builds.
Then the rest of CycleGAN: the paper's settings in the horse2zebra recipe, a run with a
1-channel domain through train/export/apply, dropout in the ResNet generator (unit checks and a
run), and the labelled sample grids.

Stubs: G_ab(x) = x + 0.2, G_ba(x) = 0.5 x, D_a(x) = x, D_b(x) = x - 0.5 (patch maps), and
constant images a = 0.6, b = -0.4. Then fake_b = 0.8, fake_a = -0.2, rec_a = 0.4, rec_b = 0.0,
G_ba(a) = 0.3, G_ab(b) = -0.2, D_b(fake_b) = 0.3, D_a(fake_a) = -0.2, D_a(a) = 0.6, D_b(b) = -0.9.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, run_cli
from PIL import Image
from safetensors import safe_open
from torch import Tensor, nn

import translate
from translate import recipe as recipe_mod
from translate import viz
from translate.config import apply_overrides
from translate.core import objectives
from translate.export import export_run
from translate.methods import METHODS
from translate.methods.cyclegan import CycleGAN, CycleGANConfig
from translate.methods.pool import ImagePool
from translate.nets import build_net
from translate.nets.resnet import ResidualBlock
from translate.recipe import from_dict
from translate.runner import setup

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
    from translate.runner import train

    seen: list[tuple[str, float]] = []
    g_loss, d_loss = CycleGAN.g_loss, CycleGAN.d_loss

    def spy(fn, name):
        def wrapped(self, nets, batch, prev):
            seen.append((name, float(prev["progress"])))
            return fn(self, nets, batch, prev)
        return wrapped

    monkeypatch.setattr(CycleGAN, "g_loss", spy(g_loss, "G"))
    monkeypatch.setattr(CycleGAN, "d_loss", spy(d_loss, "D"))
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml", TINY_CYCLEGAN + [
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
    cfg = recipe_mod.load(path, TINY_CYCLEGAN + [f'data.root="{tiny_unpaired}"',
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


def test_horse2zebra_recipe_has_the_papers_settings():
    """Zhu et al. 2017 / the reference implementation's defaults, as `translate train` resolves
    them (no --steps, so the epochs stay)."""
    proc = run_cli("train", "recipes/cyclegan_horse2zebra.toml", "--dry-run")
    cfg = json.loads(proc.stdout)
    m, d, t = cfg["model"], cfg["data"], cfg["train"]
    assert cfg["method"] == "cyclegan"
    assert (t["epochs"], t["epochs_decay"], t["lr_schedule"]) == (100, 100, "linear")
    assert m["pool_size"] == 50
    assert (m["lambda_cycle"], m["lambda_identity"]) == (10.0, 0.5)
    assert t["optimizer"] == "adam" and t["lr_g"] == t["lr_d"] == 2e-4
    assert t["betas_g"] == t["betas_d"] == [0.5, 0.999]
    assert m["objective"] == "lsgan"
    assert (m["generator"], m["n_blocks"], m["ngf"], m["upsample"]) == ("resnet", 9, 64,
                                                                         "transpose")
    assert (m["ndf"], m["n_layers_d"], m["norm"], m["dropout"]) == (64, 3, "instance", 0.0)
    assert (d["preprocess"], d["load_size"], d["crop_size"], d["flip"]) == (
        "resize_and_crop", 286, 256, True)
    assert t["batch_size"] == 1 and m["diff_augment"] == "" and t["ema"] == 0.0


def _noise_pngs(folder: Path, n: int, mode: str, seed: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (16, 16) if mode == "L" else (16, 16, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
            folder / f"{i}.png")


@pytest.fixture(scope="module")
def gray_to_rgb(tmp_path_factory) -> Path:
    """trainA/testA grayscale ('L' PNGs), trainB/testB RGB."""
    root = tmp_path_factory.mktemp("gray2rgb")
    for split, n in (("train", 6), ("test", 2)):
        _noise_pngs(root / f"{split}A", n, "L", seed=len(split))
        _noise_pngs(root / f"{split}B", n, "RGB", seed=10 + len(split))
    return root


def _train(root: Path, run: Path, extra: list[str], steps: int = 3):
    sets = [a for o in TINY_CYCLEGAN + extra + [f'data.root="{root}"'] for a in ("--set", o)]
    return run_cli("train", "recipes/cyclegan_demo.toml", *sets, "--steps", str(steps),
                   "--run-dir", str(run), "--log-every", "1", "--sample-every", str(steps),
                   "--no-progress")


def _logs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_one_channel_domain_trains_exports_and_applies(gray_to_rgb, tmp_path):
    run = tmp_path / "run"
    proc = _train(gray_to_rgb, run, ["data.channels_a=1", "data.channels_b=3",
                                     "model.lambda_identity=0"])
    assert "done: 3 steps" in proc.stdout
    logs = _logs(run)
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert all(np.isfinite(r["G/loss"]) and np.isfinite(r["D/loss"]) for r in logs)
    assert not any("idt" in key for r in logs for key in r)  # no identity loss across channels
    assert (run / "samples" / "step_0000003.png").is_file()

    run_cli("export", str(run), "--out", str(tmp_path / "export"))
    expected = {"G_ab": ("1", "3"), "G_ba": ("3", "1")}
    for name, (cin, cout) in expected.items():
        with safe_open(str(tmp_path / "export" / f"{name}.safetensors"), framework="pt") as f:
            meta = f.metadata()
        assert (meta["in_channels"], meta["out_channels"]) == (cin, cout), name

    out = tmp_path / "out"
    run_cli("apply", str(tmp_path / "export" / "G_ab.safetensors"), str(gray_to_rgb / "testA"),
            str(out), "--no-progress")
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]
    for p in out.iterdir():
        img = Image.open(p)
        assert img.size == (16, 16) and img.mode == "RGB", (p, img.mode)
    # and back: G_ba makes 1-channel images of RGB ones
    G_ba = translate.load_generator(tmp_path / "export" / "G_ba.safetensors")
    rgb = np.array(Image.open(gray_to_rgb / "testB" / "0.png"))
    assert G_ba(rgb).shape == (16, 16, 1)


def _blocks(net: nn.Module) -> list[ResidualBlock]:
    return [m for m in net.modules() if isinstance(m, ResidualBlock)]


def test_resnet_dropout_sits_in_every_residual_block():
    net = build_net("resnet", ngf=4, n_blocks=3, dropout=0.5)
    blocks = _blocks(net)
    assert len(blocks) == 3
    for block in blocks:
        drops = [m for m in block.body if isinstance(m, nn.Dropout)]
        assert len(drops) == 1 and drops[0].p == 0.5
        # between the two convolutions, after the first ReLU
        kinds = [type(m) for m in block.body]
        assert kinds.index(nn.Dropout) == kinds.index(nn.ReLU) + 1
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 3  # nowhere else
    plain = build_net("resnet", ngf=4, n_blocks=3)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    # dropout has no weights: the parameter count is the same
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in plain.parameters())


def test_resnet_dropout_is_random_in_train_mode_and_off_in_eval():
    torch.manual_seed(0)
    net = build_net("resnet", ngf=4, n_blocks=2, dropout=0.5)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    net.train()
    assert not torch.equal(net(x), net(x))
    net.eval()
    with torch.no_grad():
        first = net(x)
        assert torch.equal(first, net(x))
    # eval mode is exactly train mode with p = 0 (instance norm keeps no running statistics)
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    net.train()
    with torch.no_grad():
        assert torch.equal(net(x), first)


def test_cyclegan_trains_with_dropout(tiny_unpaired, tmp_path):
    run = tmp_path / "run"
    proc = _train(tiny_unpaired, run, ["model.dropout=0.5"], steps=2)
    assert "done: 2 steps" in proc.stdout
    assert json.loads((run / "config.json").read_text())["model"]["dropout"] == 0.5
    assert all(np.isfinite(r["G/loss"]) for r in _logs(run))
    export_run(run, out=tmp_path / "export")
    with safe_open(str(tmp_path / "export" / "G_ab.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["dropout"] == 0.5
    # the exported generator runs deterministically (dropout off at inference)
    gen = translate.load_generator(tmp_path / "export" / "G_ab.safetensors", precision="fp32")
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(gen(x), gen(x), rtol=0, atol=0)


def test_sample_grid_rows_are_labelled(tiny_unpaired):
    """The training sample grid: real A, translated, reconstructed, then the same for B, each
    row with its label in a margin on the left, the images right of it."""
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml",
                      TINY_CYCLEGAN + [f'data.root="{tiny_unpaired}"'])
    method = METHODS["cyclegan"].build(cfg)
    g = torch.Generator().manual_seed(0)
    fixed = {k: torch.rand(3, 3, 16, 16, generator=g) * 2 - 1 for k in ("a", "b")}
    with torch.no_grad():
        img = method.sample(method.nets, fixed)
        fake_b = method.nets["G_ab"](fixed["a"])
    bare = viz.grid([fixed["a"], fake_b])  # the first two rows without labels
    margin = img.shape[1] - bare.shape[1]
    assert img.shape[0] == 2 + 6 * 18 and margin > 30
    np.testing.assert_array_equal(img[:bare.shape[0] - 2, margin:], bare[:-2])
    bands = [img[2 + 18 * r:18 * (r + 1), :margin] for r in range(6)]
    assert all((band.max(-1) < 100).sum() > 10 for band in bands)  # text in every row
    assert not np.array_equal(bands[0], bands[1])  # "real A" is not "translated"
    np.testing.assert_array_equal(bands[1], bands[4])  # "translated" for A and for B
