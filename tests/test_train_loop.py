"""The adversarial core inside real (tiny, in-process) runs: n_critic, TTUR, the linear LR
decay, keep-last-K, exact resume of a BatchNorm DCGAN, WGAN weight clipping, and a phase's
parts backpropagated one at a time."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate import state as state_mod
from conftest import ROOT, random_image_folder, tiny_sets
from safetensors.torch import load_file
from test_train import _losses, _weights

from translate import config
from translate import recipe as recipe_mod
from translate.core import checkpoint, loop
from translate.methods import METHODS
from translate.methods.base import Phase
from translate.runner import train

TOY = [*tiny_sets("toy"), "model.z_dim=5"]
TINY_DCGAN = tiny_sets("dcgan")


def _cfg(recipe: str, run: Path, steps: int, sets: list[str]) -> config.RunConfig:
    return recipe_mod.load(ROOT / "recipes" / recipe, [
        f"train.steps={steps}", f'run_dir="{run}"', "train.log_every=1",
        "train.sample_every=1000", "train.save_every=1000", *sets])


def _record_phases(monkeypatch) -> list[tuple[str, float, tuple]]:
    """(phase name, LR, betas) of every optimizer step the loop takes from now on."""
    seen: list[tuple[str, float, tuple]] = []
    real = loop.run_phase

    def spy(accelerator, cfg, phase, opt, *args):
        group = opt.param_groups[0]
        seen.append((phase.name, group["lr"], tuple(group.get("betas", ()))))
        return real(accelerator, cfg, phase, opt, *args)

    monkeypatch.setattr(loop, "run_phase", spy)
    return seen


def _optimizer_states(ckpt: Path) -> list[dict]:
    """The optimizer state dicts of a checkpoint, in phase order (D, G)."""
    files = sorted(ckpt.glob("optimizer*.bin"), key=lambda p: len(p.name))
    return [torch.load(f, weights_only=True) for f in files]


def _shapes(net: torch.nn.Module) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in net.parameters()]


@pytest.mark.parametrize("recipe,sets,k", [
    ("toy_wgan_gp_ring.toml", [], 5),               # the recipe's own n_critic
    ("toy_gan_ring.toml", ["model.n_critic=1"], 1),
    ("toy_gan_ring.toml", ["model.n_critic=3"], 3),
])
def test_d_takes_n_critic_steps_per_generator_step(recipe, sets, k, tmp_path, monkeypatch):
    cfg = _cfg(recipe, tmp_path / "run", 3, TOY + sets)
    assert cfg.model.n_critic == k
    seen = _record_phases(monkeypatch)
    train(cfg, progress=False)
    assert [name for name, _, _ in seen] == (["D"] * k + ["G"]) * 3
    # The optimizers' own step counters, as saved: D's Adam stepped k times per G step.
    nets = METHODS[cfg.method].build(cfg).nets
    opt_d, opt_g = _optimizer_states(tmp_path / "run" / "checkpoints" / "step_0000003")
    for state, net, steps in ((opt_d, nets["D"], 3 * k), (opt_g, nets["G"], 3)):
        per_param = [state["state"][i] for i in sorted(state["state"])]
        assert [tuple(s["exp_avg"].shape) for s in per_param] == _shapes(net)
        assert all(float(s["step"]) == steps for s in per_param)


def test_each_phase_gets_its_own_lr_and_betas(tmp_path, monkeypatch):
    """TTUR: D's optimizer steps with lr_d/betas_d and G's with lr_g/betas_g."""
    sets = TOY + ["train.lr_g=3e-4", "train.lr_d=1e-4", "train.betas_g=[0.5, 0.99]",
                  "train.betas_d=[0.0, 0.9]", "model.n_critic=2"]
    cfg = _cfg("toy_gan_ring.toml", tmp_path / "run", 2, sets)
    seen = _record_phases(monkeypatch)
    train(cfg, progress=False)
    expected = {"D": (1e-4, (0.0, 0.9)), "G": (3e-4, (0.5, 0.99))}
    assert len(seen) == 6
    for name, lr, betas in seen:
        assert lr == pytest.approx(expected[name][0], rel=1e-12) and betas == expected[name][1]
    nets = METHODS[cfg.method].build(cfg).nets
    opt_d, opt_g = _optimizer_states(tmp_path / "run" / "checkpoints" / "step_0000002")
    for state, net, (lr, betas) in ((opt_d, nets["D"], expected["D"]),
                                    (opt_g, nets["G"], expected["G"])):
        (group,) = state["param_groups"]
        assert group["lr"] == pytest.approx(lr, rel=1e-12) and tuple(group["betas"]) == betas
        shapes = [tuple(state["state"][i]["exp_avg"].shape) for i in group["params"]]
        assert shapes == _shapes(net)  # this optimizer holds that phase's nets, and only them


def test_linear_decay_reaches_zero_inside_a_run(tmp_path, monkeypatch):
    """lr_schedule=linear, decay_start=4 of 8 steps: the LR each optimizer steps with is flat,
    then falls by equal amounts to 0 at the end of the run, for both phases."""
    sets = TOY + ["train.lr_g=2e-4", "train.lr_d=1e-4", 'train.lr_schedule="linear"',
                  "train.decay_start=4"]
    run = tmp_path / "run"
    seen = _record_phases(monkeypatch)
    train(_cfg("toy_gan_ring.toml", run, 8, sets), progress=False)
    for name, base in (("G", 2e-4), ("D", 1e-4)):
        factors = np.array([lr / base for n, lr, _ in seen if n == name])
        assert len(factors) == 8
        np.testing.assert_allclose(factors[:4], 1.0, rtol=1e-12)
        # From the last flat step to "step 8" (the end, where it would be 0): equal drops.
        drops = np.diff(np.append(factors[3:], 0.0))
        assert (drops < 0).all()
        np.testing.assert_allclose(drops, drops[0], rtol=1e-9)
        assert factors[-1] < 0.25
    logged = [r["lr_scale"] for r in _losses(run)]
    used = [lr / 2e-4 for n, lr, _ in seen if n == "G"]
    np.testing.assert_allclose(logged, used, rtol=1e-6)  # log.jsonl records the LR in force
    for name in ("G", "D"):  # and each phase's own LR
        used = [lr for n, lr, _ in seen if n == name]
        np.testing.assert_allclose([r[f"lr/{name}"] for r in _losses(run)], used, rtol=1e-6)


@pytest.mark.parametrize("keep", [2, 3])
def test_only_the_newest_k_checkpoints_are_kept(keep, tmp_path):
    run = tmp_path / "run"
    train(_cfg("toy_gan_ring.toml", run, 8, TOY + ["train.save_every=2",
                                                   f"train.keep_checkpoints={keep}"]),
          progress=False)
    steps = [8, 6, 4, 2][:keep][::-1]
    names = [f"step_{s:07d}" for s in steps]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names  # no leftovers
    assert [p.name for p in checkpoint.list_checkpoints(run)] == names
    for s, name in zip(steps, names):
        assert json.loads((run / "checkpoints" / name / "state.json").read_text())["step"] == s
    assert checkpoint.resolve(run, "auto").name == names[-1]


class _Killed(Exception):
    pass


def _kill_after(monkeypatch, step: int) -> None:
    """Make the loop die right after `step` (its checkpoint written), as a kill would."""
    real = loop.run_step

    def dying(s, state, *args):
        out = real(s, state, *args)
        if state.step == step:
            raise _Killed
        return out

    monkeypatch.setattr(loop, "run_step", dying)


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_dcgan_with_batchnorm_resumes_exactly(schedule, tmp_path, monkeypatch):
    """train(6) == train(3) + resume + train(3) for a BatchNorm DCGAN: weights, BatchNorm
    statistics, optimizer moments and logged losses. The linear case decays from step 2, so
    the LR changes at every step across the resume."""
    data = random_image_folder(tmp_path / "img")
    sets = TINY_DCGAN + [f'data.root="{data}"', "train.save_every=3",
                         f'train.lr_schedule="{schedule}"', "train.decay_start=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(_cfg("dcgan.toml", straight, 6, sets), progress=False)
    if schedule == "constant":  # a run of 3 steps, then the same run extended to 6
        train(_cfg("dcgan.toml", split, 3, sets), progress=False)
    else:  # the schedule depends on the total: a run of 6 steps that dies after step 3
        with monkeypatch.context() as m:
            _kill_after(m, 3)
            with pytest.raises(_Killed):
                train(_cfg("dcgan.toml", split, 6, sets), progress=False)
        assert [p.name for p in checkpoint.list_checkpoints(split)] == ["step_0000003"]
    result = train(_cfg("dcgan.toml", split, 6, sets), resume="auto", progress=False)
    assert result.step == 6
    a, b = _weights(straight, 6), _weights(split, 6)
    assert any("running_mean" in k for k in a)  # BatchNorm statistics are compared too
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    early = _weights(straight, 3) if schedule == "constant" else _weights(split, 3)
    assert any(not torch.equal(early[k], a[k]) for k in a)  # steps 4-6 did change them
    for name in ("optimizer.bin", "optimizer_1.bin"):
        sa, sb = (torch.load(r / "checkpoints" / "step_0000006" / name, weights_only=True)
                  for r in (straight, split))
        for i in sa["state"]:
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(sa["state"][i][key], sb["state"][i][key],
                                           rtol=1e-5, atol=1e-7)
    la, lb = _losses(straight), _losses(split)
    assert [r["step"] for r in lb] == list(range(1, 7))
    # Each start's first record has its length: the constant run was extended from 3 to 6.
    starts = [3, None, None, 6] if schedule == "constant" else [6, None, None, 6]
    assert [r.get("run/steps") for r in lb] == starts + [None, None]
    for ra, rb in zip(la, lb):
        for k in ra:
            if ("/" in k and not k.startswith("run/")) or k == "lr_scale":
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-6), (k, ra["step"])


def test_weight_clipping_bounds_every_critic_weight_after_a_run(tmp_path):
    """wgan_clip (c = 0.01, RMSProp, n_critic 5): every parameter of D ends within [-c, c],
    and the bound is reached (the clipping did act); G is not clipped."""
    data = random_image_folder(tmp_path / "img")
    run = tmp_path / "run"
    cfg = _cfg("wgan_clip.toml", run, 2, TINY_DCGAN + [f'data.root="{data}"'])
    c = cfg.model.clip_value
    assert c == 0.01 and cfg.model.penalty == "clip"
    train(cfg, progress=False)
    nets = METHODS[cfg.method].build(cfg).nets
    assert list(nets) == ["G", "D"]  # model.safetensors is G, model_1.safetensors is D
    ckpt = run / "checkpoints" / "step_0000002"
    for name, file in (("G", "model.safetensors"), ("D", "model_1.safetensors")):
        saved = load_file(str(ckpt / file))
        params = [n for n, _ in nets[name].named_parameters()]
        assert set(params) <= set(saved)
        top = max(float(saved[n].abs().max()) for n in params)
        if name == "D":
            assert top == pytest.approx(c, rel=1e-6)  # reached, never exceeded
            assert all(float(saved[n].abs().max()) <= c for n in params)
        else:
            assert top > 5 * c


@pytest.mark.parametrize("accum", [1, 2])
def test_a_phases_parts_are_backpropagated_one_at_a_time(accum):
    """Phase.parts: each part's graph is backpropagated before the next loss is built (so their
    activations are never alive together), the gradients add up to the one-graph sum's, the
    logged values add under shared keys, and a part may only log."""
    state_mod.AcceleratorState._reset_state()
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    events: list[str] = []

    def traced(tag: str, x: torch.Tensor) -> torch.Tensor:
        events.append(f"build {tag}")
        y = net(x)
        y.register_hook(lambda g: events.append(f"back {tag}"))
        return y

    def idt(nets, batch, prev):
        loss = traced("idt", batch["y"]).square().mean()
        return {"loss": loss, "shared": loss.detach(), "idt": loss.detach()}

    def only_logs(nets, batch, prev):
        return {"seen": batch["x"].sum()}

    def main(nets, batch, prev):
        out = traced("main", batch["x"])
        loss = out.abs().mean()
        return {"loss": loss, "shared": loss.detach(), "out": out.detach()}

    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, 3, generator=g)}
    cfg = SimpleNamespace(train=SimpleNamespace(grad_accum=accum, grad_clip=0.0))
    phase = Phase("G", ("N",), main, lr=0.0, parts=(idt, only_logs))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    captured: list[torch.Tensor] = []
    opt.step = lambda: captured.extend(p.grad.clone() for p in net.parameters())
    logs, handed = loop.run_phase(acc, cfg, phase, opt, {"N": net}, batch, [{}] * accum)
    assert events == ["build idt", "back idt", "build main", "back main"] * accum
    net.zero_grad(set_to_none=True)
    total = sum((idt({}, c, {})["loss"] + main({}, c, {})["loss"]) / accum
                for c in loop.split(batch, accum))
    total.backward()
    for got, want in zip(captured, (p.grad for p in net.parameters())):
        torch.testing.assert_close(got, want)  # fp32 on every CPU: no autocast outside it
    ref = [(idt({}, c, {})["idt"].item(), main({}, c, {})["shared"].item())
           for c in loop.split(batch, accum)]
    assert logs["G/shared"].item() == pytest.approx(sum(a + b for a, b in ref) / accum, rel=1e-6)
    assert logs["G/idt"].item() == pytest.approx(sum(a for a, _ in ref) / accum, rel=1e-6)
    assert logs["G/seen"].item() == pytest.approx(batch["x"].sum().item() / accum, rel=1e-5)
    assert [h.keys() for h in handed] == [{"out"}] * accum
