"""NNPACK convolutions for fp32 inference (translate/infer/nnpack.py, `translate apply --nnpack`):
which layers move to it, when a call runs on it, results within a grey level of oneDNN's,
compiled graphs that hold it, the default rule, and the one-line refusals. Then in training
(translate/nets/nnpack.py, train.nnpack): forward and gradients against oneDNN's, the rule,
and a real run."""

from __future__ import annotations

import argparse
import json
import threading

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_error, random_image_folder, run_cli, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import translate
from translate import config, precision
from translate.errors import UserError
from translate.infer import compiled, nnpack, translate_folder

pytestmark = pytest.mark.skipif(not nnpack.available(), reason="this torch has no NNPACK")
OP = "translate::nnpack_conv2d"


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """An exported ResNet generator with 64-channel residual blocks (ngf 16): the blocks are
    NNPACK's, the rest oneDNN's. Trained weights are not needed: outputs are compared."""
    from translate import recipe
    from translate.export import metadata
    from translate.nets import build_net, init_weights

    torch.manual_seed(0)
    G = build_net("resnet", ngf=16, n_blocks=2).eval()
    init_weights(G, 0.02)
    cfg = recipe.load(ROOT / "recipes" / "cyclegan_horse2zebra.toml",
                      ["model.ngf=16", "model.n_blocks=2"])
    path = tmp_path_factory.mktemp("nnpack") / "G.safetensors"
    save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(path),
              metadata(G, cfg, "G_ab", {"from": "A", "to": "B"}, 0, False))
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return random_image_folder(tmp_path_factory.mktemp("nnpack_in") / "photos", n=3, size=128)


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_only_convolutions_it_speeds_up_move():
    def conv(cin, cout, k, **kw):
        return nn.Conv2d(cin, cout, k, **kw)

    assert nnpack.eligible(conv(64, 64, 3)) and nnpack.eligible(conv(256, 256, 3, padding=1))
    assert nnpack.eligible(conv(64, 3, 7))  # FFT: ~2x even with 3 output channels
    for no in (conv(64, 3, 3), conv(32, 32, 3), conv(3, 64, 7), conv(64, 64, 3, stride=2),
               conv(64, 64, 3, groups=2), conv(64, 64, 3, dilation=2), conv(64, 64, 1),
               conv(64, 64, 3, padding=1, padding_mode="reflect"), conv(64, 64, 3, padding="same"),
               nn.ConvTranspose2d(64, 64, 3)):
        assert not nnpack.eligible(no), no
    net = nn.Sequential(conv(3, 64, 7), nn.Sequential(conv(64, 64, 3), nn.ReLU()), conv(64, 3, 7))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert nnpack.use_nnpack(net) == 2
    assert [type(m).__name__ for m in net.modules() if isinstance(m, nn.Conv2d)] == \
        ["Conv2d", "NnpackConv2d", "NnpackConv2d"]
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())  # same weights


@torch.no_grad()
def test_a_call_runs_on_nnpack_only_where_it_pays():
    holder = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1))
    nnpack.use_nnpack(holder)
    fast = holder[0]
    x = torch.randn(1, 64, 32, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a lane's thread: NNPACK (its pool runs on the caller)
        assert OP in _ops(lambda: fast(x))
        y = fast(x)
        torch.set_num_threads(2)  # more threads: oneDNN uses them all, NNPACK would not
        assert OP not in _ops(lambda: fast(x))
        torch.set_num_threads(1)
        assert OP not in _ops(lambda: fast(torch.randn(1, 64, 16, 16)))  # too few pixels
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert OP not in _ops(lambda: fast(x))
    finally:
        torch.set_num_threads(before)
    ref = nn.functional.conv2d(x, fast.weight, fast.bias, padding=1)
    assert not torch.equal(y, ref)  # another algorithm ran...
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-4)  # ...to the same result


@torch.no_grad()
def test_a_caller_with_more_threads_cuts_large_convolutions_into_strips(monkeypatch):
    # A lone image has all threads: a large 3x3 convolution runs in strips, one per thread, on
    # NNPACK; a 7x7 one on NNPACK on the caller's thread; a small one on oneDNN. Same results.
    threads: list[int] = []
    conv = nnpack._conv
    monkeypatch.setattr(nnpack, "_conv", lambda *a: threads.append(threading.get_ident())
                        or conv(*a))
    big = nnpack._swapped(nn.Conv2d(256, 256, 3, padding=1))
    fft = nnpack._swapped(nn.Conv2d(64, 3, 7, padding=3))
    small = nnpack._swapped(nn.Conv2d(64, 64, 3, padding=1))
    nnpack.sequential_pool()
    nnpack.register_op()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for net, x, strips in ((big, torch.randn(2, 256, 67, 72), 2),  # odd rows, a batch
                               (fft, torch.randn(1, 64, 64, 64), 0),
                               (small, torch.randn(1, 64, 64, 64), 0)):
            threads.clear()
            ops = _ops(lambda net=net, x=x: net(x))
            assert (OP in ops) == (net is not small)
            assert len(threads) == strips and len(set(threads)) == strips
            ref = nn.functional.conv2d(x, net.weight, net.bias, padding=net.padding)
            torch.testing.assert_close(net(x), ref, rtol=0, atol=1e-4)
        torch.set_num_threads(1)
        threads.clear()
        assert OP in _ops(lambda: big(torch.randn(1, 256, 67, 40))) and threads == []  # whole
    finally:
        torch.set_num_threads(before)


def test_gradients_fall_back_to_onednn():
    fast = nnpack._swapped(nn.Conv2d(64, 64, 3))
    x = torch.randn(1, 64, 40, 40, requires_grad=True)
    fast(x).square().mean().backward()
    assert x.grad is not None and fast.weight.grad is not None


def test_folder_output_within_a_grey_level_of_onednn(resnet, photos, tmp_path):
    # fp32 named (auto would be bf16 on an AMX CPU); the suite runs torch with one thread.
    on = translate.load_generator(resnet, precision="fp32", device="cpu", nnpack=True)
    off = translate.load_generator(resnet, precision="fp32", device="cpu", nnpack=False)
    assert sum(isinstance(m, nnpack.NnpackConv2d) for m in on.net.modules()) == 4
    assert not any(isinstance(m, nnpack.NnpackConv2d) for m in off.net.modules())
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    assert OP in _ops(lambda: on.forward(x)) and OP not in _ops(lambda: off.forward(x))
    for gen, name in ((on, "on"), (off, "off")):
        assert translate_folder(gen.forward, gen.info, photos, tmp_path / name,
                                progress=False).translated == 3
    diffs = [np.abs(np.asarray(Image.open(tmp_path / "on" / f"{i}.png"), dtype=int)
                    - np.asarray(Image.open(tmp_path / "off" / f"{i}.png"), dtype=int))
             for i in range(3)]
    assert np.mean(diffs) <= 0.05 and max(d.max() for d in diffs) <= 1


def test_the_default_is_fp32_on_cpus_without_amx(resnet, monkeypatch):
    cpu = torch.device("cpu")
    amx = (torch.backends.cpu.get_cpu_capability().startswith("AVX512")
           and precision.cpu_has_amx())
    assert nnpack.pays(cpu, "fp32") is not amx
    assert not nnpack.pays(cpu, "bf16") and not nnpack.pays(torch.device("cuda"), "fp32")
    gen = translate.load_generator(resnet, precision="fp32", device="cpu")
    assert any(isinstance(m, nnpack.NnpackConv2d) for m in gen.net.modules()) is not amx
    # Each kind of CPU, whichever this is: AVX2 only, AVX-512 without AMX (Zen 4), with AMX.
    for capability, has_amx, expected in (("AVX2", False, True), ("AVX512", False, True),
                                          ("AVX512", True, False), ("AVX2", True, True)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(precision, "cpu_has_amx", lambda a=has_amx: a)
        assert nnpack.pays(cpu, "fp32") is expected, (capability, has_amx)
    monkeypatch.undo()
    bf16 = translate.load_generator(resnet, precision="bf16", device="cpu")
    assert not any(isinstance(m, nnpack.NnpackConv2d) for m in bf16.net.modules())


@pytest.mark.slow
def test_a_compiled_graph_holds_nnpack(resnet, photos, tmp_path):
    eager = translate.load_generator(resnet, precision="fp32", device="cpu", nnpack=False)
    fast = translate.load_generator(resnet, precision="fp32", device="cpu", nnpack=True,
                                    compile=True)
    x = torch.rand(1, 3, 128, 128) * 2 - 1
    y = fast.forward(x)  # compiles
    assert OP in _ops(lambda: fast.forward(x))
    assert (y - eager.forward(x)).abs().mean() <= 1 / 255


def test_cli_refuses_nnpack_where_it_cannot_run(resnet, photos, tmp_path, capsys):
    line = cli_error(capsys, ["apply", str(resnet), str(photos), str(tmp_path / "o"), "--nnpack",
                              "on", "--precision", "bf16"])
    assert line == (f"error: {resnet}: --nnpack on: it runs fp32 on a CPU, not bf16 on cpu — "
                    "drop --nnpack on, or add --precision fp32")
    onnx = tmp_path / "G.onnx"
    onnx.write_bytes(b"not read")
    line = cli_error(capsys, ["apply", str(onnx), str(photos), str(tmp_path / "o"), "--nnpack",
                              "on"])
    assert "--nnpack is for the torch backend" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_apply_nnpack_on_matches_off(resnet, photos, tmp_path):
    for flag in ("on", "off"):
        out = run_cli("apply", str(resnet), str(photos), str(tmp_path / flag), "--nnpack", flag,
                      "--precision", "fp32", "--compile", "off", "--no-progress")
        assert out.returncode == 0, out.stderr
    for i in range(3):
        a, b = (np.asarray(Image.open(tmp_path / f / f"{i}.png"), dtype=int) for f in ("on", "off"))
        assert np.abs(a - b).max() <= 1


def _auto_args(model, src, tmp_path, nnpack_flag: str) -> argparse.Namespace:
    return argparse.Namespace(compile="auto", model=str(model), backend="auto", input=str(src),
                              output=str(tmp_path / "out"), format=None, overwrite=False,
                              resize=None, tile="auto", precision="fp32", nnpack=nnpack_flag)


def test_compile_auto_asks_more_pixels_of_nnpack(resnet, generator, photos, tmp_path,
                                                 monkeypatch):
    """Eager on NNPACK leaves a compile less to gain: --compile auto needs more pixels."""
    from translate.cli import _compile_choice

    monkeypatch.setattr(compiled, "AUTO_MIN_PIXELS", 3 * 128 * 128)  # the 3 photos: enough
    monkeypatch.setattr(compiled, "AUTO_MIN_PIXELS_NNPACK", 3 * 128 * 128 + 1)  # not enough
    assert _compile_choice(_auto_args(resnet, photos, tmp_path, "off")) == [(128, 128)]
    assert _compile_choice(_auto_args(resnet, photos, tmp_path, "on")) is False
    default = _compile_choice(_auto_args(resnet, photos, tmp_path, "auto"))
    assert default == (False if nnpack.pays(torch.device("cpu"), "fp32") else [(128, 128)])
    # the tiny test generator has no convolution NNPACK takes: the oneDNN rule
    assert _compile_choice(_auto_args(generator, photos, tmp_path, "on")) == [(128, 128)]
    bf16 = _auto_args(resnet, photos, tmp_path, "on")
    bf16.precision = "bf16"
    with pytest.raises(UserError, match="--nnpack on: it runs fp32 on a CPU"):
        _compile_choice(bf16)


# ------------------------------------------------------------------ training (train.nnpack)


def _counting(monkeypatch) -> list[tuple[int, ...]]:
    """The input shapes of every NNPACK convolution from now on."""
    calls: list[tuple[int, ...]] = []
    real = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution",
                        lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a))
    return calls


@pytest.mark.parametrize("cin, cout, k, pad, size, batch, bias, on_nnpack", [
    (64, 64, 3, 1, 48, 2, True, (2, 2)),   # forward and input gradient, one image per call
    (64, 3, 7, 3, 48, 1, False, (1, 1)),   # FFT: the input gradient (3 -> 64) too
    (128, 64, 3, 0, 52, 3, True, (3, 3)),  # no padding: the gradient pads by kernel - 1
    (64, 64, 3, 1, 40, 2, True, (0, 0)),   # under TRAIN_MIN_PIXELS: oneDNN
])
def test_a_training_convolution_on_nnpack_computes_what_onednn_does(
        cin, cout, k, pad, size, batch, bias, on_nnpack, monkeypatch):
    # fp32 (NNPACK takes nothing else). Forward and input gradient within 1e-4 of oneDNN's
    # (relative to the largest value), weight and bias gradients the same (oneDNN's own).
    from translate.nets import nnpack as nets_nnpack

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, bias=bias))
    ref = nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, bias=bias))
    ref.load_state_dict(net.state_dict())
    assert nets_nnpack.use_in_training(net) == 1 and isinstance(net[0], nets_nnpack.TrainConv2d)
    x = torch.randn(batch, cin, size, size, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    calls = _counting(monkeypatch)
    y = net(x)
    forward_calls = len(calls)
    y_ref = ref(x_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert (forward_calls, len(calls) - forward_calls) == on_nnpack
    for got, want in ((y, y_ref), (x.grad, x_ref.grad)):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    if on_nnpack[0]:
        assert not torch.equal(y, y_ref)  # another algorithm ran
    assert torch.equal(net[0].weight.grad, ref[0].weight.grad)
    assert not bias or torch.equal(net[0].bias.grad, ref[0].bias.grad)


def test_training_takes_nnpack_where_inference_does(monkeypatch):
    from translate.nets import nnpack as nets_nnpack

    cpu = torch.device("cpu")
    for capability, has_amx in (("AVX2", False), ("AVX512", False), ("AVX512", True)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        monkeypatch.setattr(precision, "cpu_has_amx", lambda a=has_amx: a)
        assert nets_nnpack.for_training("auto", cpu, "no") is nnpack.pays(cpu, "fp32")
        assert nets_nnpack.for_training("on", cpu, "no")  # asked for: also with AMX
        assert not nets_nnpack.for_training("off", cpu, "no")
        for choice in config.NNPACK_CHOICES:
            assert not nets_nnpack.for_training(choice, cpu, "bf16")
            assert not nets_nnpack.for_training(choice, torch.device("cuda"), "no")
    assert not nets_nnpack.use_in_training(nn.Sequential(
        nn.Conv2d(256, 512, 4, padding=1),  # the PatchGAN's 4x4 (FFT): slower on NNPACK
        nn.Conv2d(64, 64, 3, stride=2), nn.Conv2d(32, 32, 3)))


@pytest.mark.slow
def test_a_run_trains_on_nnpack_repeatably_and_close_to_onednn(tiny_unpaired, tmp_path,
                                                               monkeypatch, capsys):
    """A real training run (3 CycleGAN steps, ResNet generators of width 64 at 48 px, fp32):
    train.nnpack="on" puts the generators' large convolutions on NNPACK, gives the same
    weights twice (as a resume needs) and first-step losses within 1e-4 (relative) of "off"'s
    (oneDNN's)."""
    from translate.nets import nnpack as nets_nnpack
    from translate.runner import setup, train

    wide = ("model.ngf=64", "train.channels_last=false")  # NNPACK takes NCHW only

    def weights(choice: str, name: str) -> dict[str, torch.Tensor]:
        cfg = tiny_config("cyclegan", *wide, 'data.preprocess="resize"',
                          "data.load_size=48", "data.crop_size=48",
                          'train.mixed_precision="no"', f'train.nnpack="{choice}"',
                          data__root=tiny_unpaired, run_dir=tmp_path / name, train__steps=3,
                          train__log_every=1)
        train(cfg, progress=False)
        ckpt = tmp_path / name / "checkpoints" / "step_0000003"
        return {f"{f.name}/{k}": v for f in sorted(ckpt.glob("model*.safetensors"))
                for k, v in load_file(f).items()}

    s = setup(tiny_config("cyclegan", *wide, 'train.mixed_precision="no"',
                          'train.nnpack="on"', data__root=tiny_unpaired,
                          run_dir=tmp_path / "probe"))
    swapped = [type(m) for m in s.method.nets["G_ab"].modules()]
    assert swapped.count(nets_nnpack.TrainConv2d) == 5  # 1 block x 2, 2 upsampling, the last
    assert nets_nnpack.TrainConv2d not in [type(m) for m in s.method.nets["D_a"].modules()]
    capsys.readouterr()
    calls = _counting(monkeypatch)
    on = weights("on", "on")
    assert calls  # the run did use NNPACK (the 48x48 convolutions)
    # the start line says so: 5 in each generator
    assert "(set by the recipe or --mixed-precision; train.nnpack on: 10 convolutions on " \
        "NNPACK at 48x48 px and more)" in capsys.readouterr().err
    assert all(torch.equal(v, w) for v, w in zip(on.values(), weights("on", "again").values()))
    capsys.readouterr()
    off = weights("off", "off")
    assert "NNPACK" not in capsys.readouterr().err
    assert on.keys() == off.keys() and any(not torch.equal(on[k], off[k]) for k in on)
    # The first step's losses (before any update), not weights: Adam's first steps are about
    # the sign of each gradient, so rounding noise in the gradients that are near zero (e.g.
    # of the biases before instance norms, which cancel them) becomes steps of the learning
    # rate's size, and two runs part by ~1e-3 within 3 steps.
    first = {name: json.loads((tmp_path / name / "log.jsonl").read_text().splitlines()[0])
             for name in ("on", "off")}
    losses = [k for k in first["off"] if k.split("/")[0] in ("G", "D") and first["off"][k]]
    assert first["on"]["step"] == 1 and len(losses) >= 6
    for k in losses:
        assert abs(first["on"][k] - first["off"][k]) <= 1e-4 * abs(first["off"][k]), k
