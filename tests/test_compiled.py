"""Compiled inference (translate/infer/compiled.py, `translate apply --compile`): results within one
grey level of eager in a named precision, the eager fallbacks, the auto rule, the warm-up."""

from __future__ import annotations

import argparse
import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

import translate
from translate.errors import UserError
from translate.infer import ModelInfo, compiled, translate_folder, translate_tensor
from translate.infer.compiled import MAX_SIZES, sizes_worth_compiling
from translate.infer.lanes import LanePool

RGB = ModelInfo(in_channels=3, out_channels=3, size_multiple=4, min_size=8)


def _picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colours plus noise: a generator's output on it is not flat."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([np.sin(5 * xx), np.cos(4 * yy), np.sin(3 * xx * yy)], -1) * 100 + 128
    return (img + rng.normal(0, 20, img.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture
def two_threads():
    """torch with 2 threads (the suite runs with 1): compiled generators then run in lanes."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_lanes_split_the_threads_and_leave_the_callers_alone(two_threads):
    pool = LanePool(2)
    assert pool.run([torch.get_num_threads] * 2) == [1, 1]
    assert torch.get_num_threads() == 2
    later: list[int] = []  # a thread started later gets the caller's count, not a lane's
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert later == [2]
    both = threading.Barrier(2, timeout=30)  # one call at a time would time out here
    assert sorted(pool.run([both.wait, both.wait])) == [0, 1]


@pytest.mark.slow
def test_a_folder_runs_in_lanes_as_eager_within_one_level(generator, tmp_path, two_threads):
    # Two lanes of one thread each take whole images; the first of each size compiles alone.
    eager = translate.load_generator(generator, precision="fp32", device="cpu")
    fast = translate.load_generator(generator, precision="fp32", device="cpu", compile=True)
    assert fast.forward.lanes is not None and fast.forward.lanes.threads_each == 1
    src = tmp_path / "in"
    src.mkdir()
    sizes = [(40, 48), (40, 48), (36, 52), (40, 48), (36, 52)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_picture(h, w, seed=i)).save(src / f"{i}.png")
    report = translate_folder(fast.forward, fast.info, src, tmp_path / "out", progress=False)
    assert (report.translated, report.failed) == (5, [])
    assert fast.forward.failed is None and fast.forward.seen == {(40, 48), (36, 52)}
    for i, (h, w) in enumerate(sizes):
        got = np.asarray(Image.open(tmp_path / "out" / f"{i}.png"), np.float64)
        want = eager(_picture(h, w, seed=i)).astype(np.float64)
        assert np.abs(got - want).mean() <= 1.0, i
    # From Python: one image runs in this thread, a batch is split over the lanes.
    batch = np.stack([_picture(40, 48, seed=s) for s in (7, 8, 9)])
    for x in (batch[:1], batch):
        assert np.abs(fast(x).astype(np.float64) - eager(x)).mean() <= 1.0
    assert fast.forward.seen == {(40, 48), (36, 52)}  # nothing compiled again


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.slow
def test_compiled_matches_eager_within_one_level(generator, precision):
    # A 300x260 image (padded to 300x260: the size multiple is 4) compiles once; a batch runs
    # image by image through the same graph (no new shape for the batch dimension).
    eager = translate.load_generator(generator, precision=precision, device="cpu")
    fast = translate.load_generator(generator, precision=precision, device="cpu", compile=True)
    assert fast.precision == precision
    batch = np.stack([_picture(300, 260, seed=s) for s in (1, 2)])
    a, b = eager(batch).astype(np.float64), fast(batch).astype(np.float64)
    assert b.shape == batch.shape
    assert np.abs(a - b).mean() <= 1.0, (precision, np.abs(a - b).mean())  # levels of 255
    assert fast.forward.failed is None and fast.forward.seen == {(300, 260)}


@pytest.mark.slow
def test_the_compiled_graph_holds_frozen_weights(generator):
    # Freezing folds the weights into the graph as constants (prepacked for oneDNN once).
    # Without it the weights stay graph inputs, re-laid out on every call: zeroing the compiled
    # net's weights after the compile would then change its outputs.
    fast = translate.load_generator(generator, precision="fp32", device="cpu", compile=True)
    img = _picture(40, 48)
    before = fast(img)
    assert fast.forward.seen == {(40, 48)}
    _zero_conv_weights(fast.forward.compiled_net)
    np.testing.assert_array_equal(fast(img), before)


def _zero_conv_weights(net: torch.nn.Module) -> None:
    """Zero the convolutions' weights, which a frozen graph holds prepacked, in copies of its
    own. Not the biases: a constant that needs no re-layout may stay the parameter's own tensor
    (a frozen graph need not copy it), and on a Zen 4 EPYC (AVX-512 BF16) inductor keeps the
    biases of the 16-channel convolutions before instance norms so: zeroing those moved one
    pixel by 1/255 (a bias before an instance norm cancels, but for its rounding)."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()


@pytest.mark.slow
def test_each_generator_gets_its_own_room_in_the_recompile_limit(generator, monkeypatch):
    # All generators of a class share one forward, and so one torch.compile recompile limit
    # (8 by default): a second generator compiled in the same process, past that limit, would
    # silently run eager (its zeroed weights would then show). Here a limit of 1 size each.
    monkeypatch.setattr(compiled, "MAX_SIZES", 1)
    torch.compiler.reset()
    img = _picture(40, 48)
    with torch._dynamo.config.patch(recompile_limit=1):
        first = translate.load_generator(generator, precision="fp32", device="cpu", compile=True)
        first(img)
        second = translate.load_generator(generator, precision="fp32", device="cpu",
                                          compile=True)
        before = second(img)
        _zero_conv_weights(second.forward.compiled_net)
        np.testing.assert_array_equal(second(img), before)


@pytest.mark.parametrize("affine", [False, True])
def test_sum_instance_norm_equals_instance_norm(affine):
    # The compiled copy's instance norms compute their statistics from sums: the result of
    # instance norm in float64, also for a channel whose mean is large against its spread
    # (there E[x^2] - E[x]^2 without the shift is off by ~3.5, and torch's own fp32 norm ~5e-3).
    torch.manual_seed(0)
    norm = torch.nn.InstanceNorm2d(3, affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 3, 17, 23)
    x[:, 1] = 1000 + 0.01 * x[:, 1]
    net = compiled.with_sum_norms(torch.nn.Sequential(torch.nn.Identity(), norm))
    assert isinstance(net[1], compiled.SumInstanceNorm)
    with torch.no_grad():
        y = net(x).double()
        torch.testing.assert_close(y, norm.double()(x.double()), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_sizes_beyond_the_chosen_run_eager(generator):
    eager = translate.load_generator(generator, precision="fp32", device="cpu")
    fast = translate.load_generator(generator, precision="fp32", device="cpu",
                                    compile=[(40, 48)])
    img = _picture(36, 44)
    np.testing.assert_array_equal(fast(img), eager(img))  # not chosen: the eager forward ran
    assert not fast.forward.compiles(36, 44) and fast.forward.compiles(40, 48)
    assert fast.forward.seen == set()


def test_tiled_norm_generators_run_eager(generator):
    # Tiling patches the norm layers to whole-image statistics, which a frozen graph would not
    # see: the compiled generator then runs eager, and gives exactly the eager result.
    eager = translate.load_generator(generator, precision="fp32", device="cpu")
    fast = translate.load_generator(generator, precision="fp32", device="cpu", compile=True)
    x = torch.from_numpy(_picture(200, 120)).permute(2, 0, 1)[None].float() / 127.5 - 1
    want = translate_tensor(eager, eager.info, x, tile=64, overlap=16, batch_size=2)
    got = translate_tensor(fast, fast.info, x, tile=64, overlap=16, batch_size=2)
    assert torch.equal(want, got) and fast.forward.seen == set()


def test_a_failed_compile_warns_once_and_runs_eager(generator, monkeypatch):
    eager = translate.load_generator(generator, precision="fp32", device="cpu")
    fast = translate.load_generator(generator, precision="fp32", device="cpu", compile=True)

    def broken(x):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(fast.forward, "_graph", broken)
    img = _picture(40, 48)
    with pytest.warns(RuntimeWarning, match="no C.. compiler"):
        out = fast(img)
    np.testing.assert_array_equal(out, eager(img))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(img)  # the failure is remembered: no second attempt, no second warning
    assert "no C++ compiler" in fast.forward.failed


def test_a_cpu_compile_uses_the_cpp_wrapper_and_a_gpu_compile_does_not(generator, monkeypatch):
    """On a CPU the graph compiles with freezing, inductor's C++ wrapper (which releases the
    GIL, so lanes run side by side) and the calling thread's thread count; on another device
    (a GPU) with freezing only: the C++ wrapper is a CPU choice."""
    import torch._inductor.config as inductor

    fast = translate.load_generator(generator, precision="fp32", device="cpu", compile=True)
    seen = []

    def spy(x):
        seen.append((inductor.freezing, inductor.cpp_wrapper, inductor.cpp.threads))
        return x

    monkeypatch.setattr(fast.forward, "_graph", spy)
    x = torch.zeros(1, 3, 8, 8)
    fast.forward._one(x, 8, 8)
    monkeypatch.setattr(fast.forward, "device", torch.device("cuda"))
    fast.forward._one(x, 8, 12)
    assert seen == [(True, True, torch.get_num_threads()),
                    (True, False, inductor.cpp.threads)]
    assert not inductor.freezing and not inductor.cpp_wrapper  # the settings were put back


def test_onnx_refuses_compile(tmp_path):
    path = tmp_path / "G.onnx"
    path.write_bytes(b"not read: the flag is refused first")
    with pytest.raises(UserError, match="--compile is for the torch backend"):
        translate.load_generator(path, compile=True)


def test_auto_compiles_only_sizes_with_enough_pixels():
    many, few = [(256, 256)] * 250, [(500, 375)] * 10
    assert sizes_worth_compiling(many + few, RGB) == [(256, 256)]
    assert sizes_worth_compiling(many[:200], RGB) == []  # 13 megapixels: below the rule
    assert sizes_worth_compiling([(2000, 3000)] * 10, RGB) == []  # tiled: runs eager anyway
    assert sizes_worth_compiling([(2000, 3000)] * 10, RGB, tile=0) == [(2000, 3000)]
    assert sizes_worth_compiling([(255, 255)] * 250, RGB) == [(256, 256)]  # padded to 4
    odd = [(h, 64) for h in range(64, 64 * 40, 64)]
    assert len(sizes_worth_compiling(odd, RGB, min_pixels=1)) == MAX_SIZES
    # Where eager runs on NNPACK a compile gains less: 420 images of 256x256 (27.5 megapixels)
    # are not enough, 430 (28.2) are.
    assert sizes_worth_compiling(many * 2, RGB) == [(256, 256)]
    assert sizes_worth_compiling([(256, 256)] * 420, RGB, nnpack=True) == []
    assert sizes_worth_compiling([(256, 256)] * 430, RGB, nnpack=True) == [(256, 256)]


def test_cli_auto_reads_sizes_from_headers(generator, tmp_path, monkeypatch):
    from translate.cli import _compile_choice

    src = tmp_path / "in"
    src.mkdir()
    for i, (h, w) in enumerate([(64, 48), (30, 200)]):
        Image.fromarray(_picture(h, w)).save(src / f"{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x64, shown (and translated) 64x48
    Image.fromarray(_picture(48, 64)).save(src / "turned.jpg", exif=exif)
    args = argparse.Namespace(compile="auto", model=str(generator), backend="auto",
                              input=str(src), output=str(tmp_path / "out"), format=None,
                              overwrite=False, resize=None, tile="auto", precision="fp32",
                              nnpack="off")
    assert _compile_choice(args) is False  # a few small images never repay a compile
    monkeypatch.setattr(compiled, "AUTO_MIN_PIXELS", 6100)  # 2 x 64 x 48 above, 30 x 200 below
    assert _compile_choice(args) == [(64, 48)]
    args.resize = 32  # the longer side becomes 32: 32x24 is a size of its own
    monkeypatch.setattr(compiled, "AUTO_MIN_PIXELS", 1500)
    assert _compile_choice(args) == [(32, 24)]


@pytest.mark.slow
def test_progress_bar_shows_the_warm_up(monkeypatch, tmp_path):
    from rich.progress import Progress

    class Compiling:
        """A batch function that 'compiles' on the first call of each size."""

        def __init__(self) -> None:
            self.seen: set[tuple[int, int]] = set()

        def compiles(self, h: int, w: int) -> bool:
            return (h, w) not in self.seen

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            self.seen.add(tuple(x.shape[2:]))
            return x

    shown: list[str] = []
    update = Progress.update

    def record(self, task, **kw):
        if "description" in kw:
            shown.append(kw["description"])
        return update(self, task, **kw)

    monkeypatch.setattr(Progress, "update", record)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        Image.fromarray(_picture(20, 24, seed=i)).save(src / f"{i}.png")
    report = translate_folder(Compiling(), RGB, src, tmp_path / "out", batch_size=1)
    assert report.translated == 3
    assert shown == ["compiling for 20x24 px (one-time warm-up)", "translating"]


@pytest.mark.slow
def test_apply_cli_compile_on_matches_off(generator, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    sizes = [(70, 50), (71, 52), (40, 100)]  # two padded sizes: 72x52 (twice) and 40x100
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(_picture(h, w, seed=i)).save(src / f"{i}.png")
    outs = {}
    for mode in ("on", "off"):
        outs[mode] = tmp_path / mode
        run_cli("apply", str(generator), str(src), str(outs[mode]), "--compile", mode,
                "--precision", "fp32", "--no-progress")
    for i, (h, w) in enumerate(sizes):
        on = np.asarray(Image.open(outs["on"] / f"{i}.png"), np.float64)
        off = np.asarray(Image.open(outs["off"] / f"{i}.png"), np.float64)
        assert on.shape == (h, w, 3) and np.abs(on - off).mean() <= 1.0


@pytest.mark.slow
def test_apply_cli_computes_in_the_resolved_precision_compiled_or_not(generator, tmp_path):
    # `auto` resolving to bf16 (forced here, so any CPU runs it): `translate apply` writes what
    # the bf16 generator makes of the image files, with and without --compile (the CLI once
    # handed the files to the float-input path, which computes in fp32, and crashed compiled).
    src = tmp_path / "in"
    src.mkdir()
    img = _picture(40, 48)
    Image.fromarray(img).save(src / "0.png")
    bf16 = translate.load_generator(generator, precision="bf16", device="cpu")(img)
    fp32 = translate.load_generator(generator, precision="fp32", device="cpu")(img)
    assert not np.array_equal(bf16, fp32)  # the picture tells the two precisions apart
    for mode in ("off", "on"):
        out = tmp_path / mode
        run_cli("apply", str(generator), str(src), str(out), "--compile", mode, "--precision",
                "auto", "--no-progress", env={"TRANSLATE_NATIVE_BF16": "1"})
        got = np.asarray(Image.open(out / "0.png")).astype(np.float64)
        if mode == "off":
            np.testing.assert_array_equal(got, bf16)
        else:
            assert np.abs(got - bf16).mean() <= 1.0


def test_float_input_to_a_compiled_bf16_generator_runs_eager_fp32(generator, monkeypatch):
    # Float input computes in fp32 unless bf16 was asked for by name; a compiled forward holds
    # bf16 constants, so float input takes its eager forward in fp32 (no compile at all).
    monkeypatch.setenv("TRANSLATE_NATIVE_BF16", "1")
    fast = translate.load_generator(generator, device="cpu", compile=True)
    assert fast.precision == "bf16"
    x = torch.from_numpy(_picture(40, 48)).permute(2, 0, 1)[None].float() / 127.5 - 1
    fp32 = translate.load_generator(generator, precision="fp32", device="cpu")
    # fp32 but for the order of float sums (the bf16 net's layout may differ); bf16: ~1e-2
    torch.testing.assert_close(fast(x), fp32(x), rtol=0, atol=1e-5)
    assert fast.forward.seen == set()
