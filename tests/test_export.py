"""Export -> load round trips (safetensors and ONNX) and `translate apply` through the CLI."""

from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_CYCLEGAN, random_image_folder, run_cli
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import translate
from translate import precision
from translate import recipe as recipe_mod
from translate.errors import ModelError, UserError
from translate.export import export_run, run_generators
from translate.runner import train


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_unpaired) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml", TINY_CYCLEGAN + [
        f'data.root="{tiny_unpaired}"', f'run_dir="{run}"', "train.steps=3",
        "train.save_every=2", "train.ema=0.5"])
    train(cfg, progress=False)
    return run


@pytest.fixture(scope="module")
def exported(trained_run) -> Path:
    export_run(trained_run, onnx=True)
    return trained_run / "export"


@pytest.mark.slow
def test_metadata_describes_the_generator(exported):
    with safe_open(str(exported / "G_ab.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["kind"] == "resnet" and meta["size_multiple"] == "4"
    assert meta["in_channels"] == "3" and meta["out_channels"] == "3"
    assert meta["from_domain"] == "A" and meta["to_domain"] == "B"
    assert meta["step"] == "3" and meta["recipe"] == "cyclegan_demo" and meta["ema"] == "false"
    assert json.loads(meta["config"])["n_blocks"] == 1
    assert meta["value_range"] == "[-1, 1]" and meta["translate_version"] == translate.__version__


def test_safetensors_round_trip_equals_trained_net(trained_run, exported):
    _, nets, _ = run_generators(trained_run)
    x = torch.rand(2, 3, 20, 28) * 2 - 1
    with torch.no_grad():
        want = nets["G_ab"](x)
    gen = translate.load_generator(exported / "G_ab.safetensors", precision="fp32")
    torch.testing.assert_close(gen(x), want, rtol=0, atol=1e-6)


def test_ema_export_differs_and_loads(trained_run, exported, tmp_path):
    # `exported`: the plain export, made here if this is the first test of the module to run
    export_run(trained_run, ema=True, out=tmp_path)
    plain = translate.load_generator(exported / "G_ab.safetensors", precision="fp32")
    ema = translate.load_generator(tmp_path / "G_ab.safetensors", precision="fp32")
    assert ema.metadata["ema"] == "true"
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert not torch.allclose(plain(x), ema(x))


def test_export_of_an_older_step(trained_run, tmp_path):
    export_run(trained_run, step=2, out=tmp_path)
    assert translate.load_generator(tmp_path / "G_ab.safetensors").metadata["step"] == "2"
    with pytest.raises(UserError, match="no checkpoint for step 1"):
        export_run(trained_run, step=1, out=tmp_path)


@pytest.mark.parametrize("size", [(13, 29), (37, 6)])
def test_onnx_equals_torch_at_odd_sizes(exported, size):
    torch_gen = translate.load_generator(exported / "G_ab.safetensors", precision="fp32")
    onnx_gen = translate.load_generator(exported / "G_ab.onnx")
    assert onnx_gen.backend == "onnx"
    x = torch.rand(3, 3, *size) * 2 - 1
    assert (onnx_gen(x) - torch_gen(x)).abs().max() < 1e-4


def test_uint8_api_keeps_size_and_convention(exported):
    gen = translate.load_generator(exported / "G_ab.safetensors")
    img = (np.random.default_rng(0).random((33, 47, 3)) * 255).astype(np.uint8)
    out = gen(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert gen(img[None]).shape == (1, 33, 47, 3)
    # A read-only array (np.asarray of a PIL image is one) works, without a warning.
    frozen = np.asarray(Image.fromarray(img))
    assert not frozen.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(gen(frozen), out)


def test_bf16_inference_stays_within_one_level_of_fp32(exported):
    """Issue #6: bf16 (the auto choice on CPUs with native bf16) may differ from fp32 by at most
    1/255 on average. Emulated here, but the rounding is the same arithmetic."""
    img = (np.random.default_rng(1).random((2, 40, 48, 3)) * 255).astype(np.uint8)
    fp32 = translate.load_generator(exported / "G_ab.safetensors", precision="fp32")
    bf16 = translate.load_generator(exported / "G_ab.safetensors", precision="bf16")
    assert bf16.precision == "bf16"
    a, b = fp32(img).astype(np.float64), bf16(img).astype(np.float64)
    assert 0 < np.abs(a - b).mean() <= 1.0, np.abs(a - b).mean()  # levels of 255; 0: no bf16


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_runs_nchw_on_cpus_without_amx(exported, monkeypatch, amx):
    # Where bf16 is AVX-512 BF16 alone (a Zen 4), oneDNN's bf16 convolutions were faster from
    # NCHW; with AMX the layout stays channels_last, as fp32 does off NNPACK. Outputs agree.
    monkeypatch.setattr(translate.infer.load, "cpu_has_amx", lambda: amx)
    path = exported / "G_ab.safetensors"
    bf16 = translate.load_generator(path, precision="bf16", device="cpu")
    fp32 = translate.load_generator(path, precision="fp32", device="cpu", nnpack=False)
    assert bf16.forward.memory_format == (torch.channels_last if amx else torch.contiguous_format)
    conv = next(m for m in bf16.forward.net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=bf16.forward.memory_format)
    assert fp32.forward.memory_format == torch.channels_last
    img = (np.random.default_rng(3).random((40, 48, 3)) * 255).astype(np.uint8)
    assert np.abs(bf16(img).astype(float) - fp32(img).astype(float)).mean() <= 1.0


def test_auto_inference_precision_follows_the_cpu_kind(cpu_kind, exported, tmp_path):
    """`auto` (apply's default) is bf16 on a CPU with native bf16 and fp32 elsewhere, through the
    Python API and the CLI alike; either way within one grey level of fp32 on average."""
    img = (np.random.default_rng(2).random((40, 48, 3)) * 255).astype(np.uint8)
    auto = translate.load_generator(exported / "G_ab.safetensors")
    assert auto.precision == ("bf16" if cpu_kind == "bf16" else "fp32")
    fp32 = translate.load_generator(exported / "G_ab.safetensors", precision="fp32")
    assert np.abs(auto(img).astype(float) - fp32(img).astype(float)).mean() <= 1.0
    (tmp_path / "in").mkdir()
    Image.fromarray(img).save(tmp_path / "in" / "x.png")
    run_cli("apply", str(exported / "G_ab.safetensors"), str(tmp_path / "in"),
            str(tmp_path / "out"), "--no-progress")
    out = np.asarray(Image.open(tmp_path / "out" / "x.png")).astype(float)
    assert out.shape == img.shape and np.abs(out - fp32(img).astype(float)).mean() <= 1.0


def test_loading_never_unpickles_and_rejects_foreign_files(exported, tmp_path):
    # a safetensors file of another architecture under a valid header
    with safe_open(str(exported / "G_ab.safetensors"), framework="pt") as f:
        meta = f.metadata()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"weight": torch.zeros(3)}, str(wrong), meta)
    with pytest.raises(ModelError, match="do not fit"):
        translate.load_generator(wrong)
    # a truncated file
    data = (exported / "G_ab.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cut.safetensors"):
        translate.load_generator(cut)
    # a pickle renamed to .safetensors is not executed, just refused
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'touch " + str(tmp_path / "pwned").encode()
                     + b"'\ntR.")
    with pytest.raises(ModelError):
        translate.load_generator(evil)
    assert not (tmp_path / "pwned").exists()


def test_onnx_of_wrong_shape_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [inp], [out])
    model = helper.make_model(graph)
    for k, v in {"size_multiple": "4", "in_channels": "3", "out_channels": "3"}.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    path = tmp_path / "flat.onnx"
    onnx.save_model(model, str(path))
    with pytest.raises(ModelError, match="not an image generator"):
        translate.load_generator(path)


@pytest.mark.slow
def test_apply_cli_on_a_folder(exported, tmp_path):
    src = tmp_path / "in" / "nested"
    src.mkdir(parents=True)
    Image.fromarray(np.full((50, 70, 3), 120, np.uint8)).save(src / "a.png")
    Image.fromarray(np.full((17, 3, 3), 10, np.uint8)).save(src / "b.jpg")
    (src / "notes.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for backend, model in (("torch", "G_ab.safetensors"), ("onnx", "G_ab.onnx")):
        out = tmp_path / f"out_{backend}"
        proc = run_cli("apply", str(exported / model), str(tmp_path / "in"), str(out),
                       "--backend", backend, "--no-progress", check=False)
        assert proc.returncode == 1  # the broken file failed, the rest went on
        assert "broken.png" in proc.stderr and "Traceback" not in proc.stderr
        assert Image.open(out / "nested" / "a.png").size == (70, 50)
        assert Image.open(out / "nested" / "b.jpg").size == (3, 17)
    again = run_cli("apply", str(exported / "G_ab.safetensors"), str(src / "a.png"),
                    str(tmp_path / "out_torch" / "nested"), check=False)
    assert again.returncode == 0 and "skipped 1" in again.stderr


@pytest.mark.slow
def test_a_batch_in_python_runs_one_image_per_call_in_the_lanes(exported):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = translate.load_generator(exported / "G_ab.safetensors", precision="fp32")
        calls: list[tuple[int, int, int]] = []
        gen.net.register_forward_hook(lambda m, args, out: calls.append(
            (len(args[0]), torch.get_num_threads(), threading.get_ident())))
        batch = np.random.default_rng(0).integers(0, 256, (4, 40, 48, 3), np.uint8)
        out = gen(batch)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert [c[:2] for c in calls] == [(1, 1)] * 4  # one image, one thread per call
    assert threading.get_ident() not in {c[2] for c in calls}  # in the lanes' threads
    for img, y in zip(batch, out):
        assert np.abs(gen(img).astype(int) - y).max() <= 1


def test_apply_cli_with_two_threads_runs_whole_images_in_lanes(exported, tmp_path):
    # With 2 torch threads on a CPU, `translate apply` takes whole images in two lanes of one
    # thread each (translate/infer/lanes.py): the outputs are a one-thread run's, exactly.
    model = str(exported / "G_ab.safetensors")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        lanes = translate.load_generator(model, precision="fp32").forward.lanes
        assert lanes is not None and (lanes.count, lanes.threads_each) == (2, 1)
    finally:
        torch.set_num_threads(before)
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(50, 70), (17, 3), (50, 70), (64, 40), (33, 33)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(src / f"{i}.png")
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    for threads in ("1", "2"):
        proc = run_cli("apply", model, str(src), str(tmp_path / threads), "--precision", "fp32",
                       "--compile", "off", "--batch-size", "1", "--no-progress", check=False,
                       env={"OMP_NUM_THREADS": threads})
        assert proc.returncode == 1 and "broken.png" in proc.stderr, proc.stderr
        assert sorted(p.name for p in (tmp_path / threads).iterdir()) == \
            [f"{i}.png" for i in range(5)]
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "2" / f"{i}.png")),
                                      np.asarray(Image.open(tmp_path / "1" / f"{i}.png")))


def test_export_cli_and_missing_run(trained_run, tmp_path):
    proc = run_cli("export", str(trained_run), "--out", str(tmp_path / "e"))
    assert "G_ba.safetensors" in proc.stdout
    bad = run_cli("export", str(tmp_path / "nope"), check=False)
    assert bad.returncode == 2 and "not a run folder" in bad.stderr


# ------------------------------------------------------------ backend choice and the CLI flags


def _picture(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    return (np.stack([np.sin(5 * x + y), np.cos(3 * y), np.sin(4 * (x - y))], -1) * 127 + 128
            ).astype(np.uint8)


def test_backend_follows_the_model_file_and_mismatches_are_one_line(exported, tmp_path, capsys):
    from translate import cli

    st, onnx = exported / "G_ab.safetensors", exported / "G_ab.onnx"
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_picture(20, 24)).save(src / "a.png")
    for model, backend in ((onnx, "onnx"), (st, "torch")):
        gen = translate.load_generator(model)
        assert gen.backend == backend and (gen.net is None) == (backend == "onnx")
    run_cli("apply", str(onnx), str(src), str(tmp_path / "o"), "--no-progress")  # auto: onnx
    assert Image.open(tmp_path / "o" / "a.png").size == (24, 20)
    proc = run_cli("apply", str(st), str(src), str(tmp_path / "x"), "--backend", "onnx",
                   check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--backend onnx needs the .onnx export — pass G_ab.onnx" in proc.stderr
    for args, words in (((onnx, "--backend", "torch"), "use --backend onnx"),
                        ((onnx, "--precision", "bf16"), "--precision bf16 is for the torch")):
        capsys.readouterr()
        code = cli.main(["apply", str(args[0]), str(src), str(tmp_path / "x"), *args[1:]])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "x").exists()


def test_onnx_generator_takes_uint8_and_float_arrays(exported):
    ref = translate.load_generator(exported / "G_ab.safetensors", precision="fp32")
    gen = translate.load_generator(exported / "G_ab.onnx")
    img = _picture(30, 22)
    out = gen(img)
    assert out.dtype == np.uint8 and out.shape == img.shape
    assert np.abs(out.astype(int) - ref(img).astype(int)).max() <= 1
    floats = gen(img.astype(np.float32) / 255)
    assert floats.dtype == np.float32 and floats.shape == img.shape
    assert 0 <= floats.min() and floats.max() <= 1
    assert np.abs(floats * 255 - out).max() <= 0.51  # the same result, before rounding
    assert gen(np.stack([img, img]).astype(np.float64) / 255).shape == (2, 30, 22, 3)
    assert np.abs(ref(img.astype(np.float32) / 255) * 255 - ref(img)).max() <= 0.51
    with pytest.raises(UserError, match="not a int32 array"):
        gen(img.astype(np.int32))


@pytest.mark.parametrize("model", ["G_ab.safetensors", "G_ab.onnx"])
def test_arrays_with_alpha_or_gray_are_handled_like_apply(exported, model):
    """RGBA and gray+alpha arrays: colour through the model, alpha carried through unchanged
    (uint8 and float, single and batched); gray is matched to an RGB model; any other
    channel count is one clear line, not a raw torch/onnxruntime error."""
    gen = translate.load_generator(exported / model, precision="fp32")
    rgb = _picture(30, 22)
    alpha = np.random.default_rng(3).integers(0, 256, (30, 22, 1), dtype=np.uint8)
    out = gen(np.concatenate([rgb, alpha], axis=-1))
    assert out.dtype == np.uint8 and out.shape == (30, 22, 4)
    np.testing.assert_array_equal(out[..., :3], gen(rgb))
    np.testing.assert_array_equal(out[..., 3:], alpha)
    rgba = np.concatenate([rgb, alpha], axis=-1).astype(np.float32) / 255
    floats = gen(np.stack([rgba, rgba]))
    assert floats.shape == (2, 30, 22, 4) and floats.dtype == np.float32
    np.testing.assert_array_equal(floats[1, ..., 3:], rgba[..., 3:])
    np.testing.assert_allclose(floats[0, ..., :3], gen(rgba[..., :3]), atol=1e-6)  # batch 2 vs 1
    gray = rgb[..., :1]
    np.testing.assert_array_equal(gen(gray), gen(np.repeat(gray, 3, axis=-1)))
    gray_alpha = gen(np.concatenate([gray, alpha], axis=-1))
    assert gray_alpha.shape == (30, 22, 4)  # the model's 3 colours + the alpha
    np.testing.assert_array_equal(gray_alpha[..., 3:], alpha)
    with pytest.raises(UserError, match=r"1 \(gray\), 2 \(gray\+alpha\), 3 \(RGB\) or 4 "
                                        r"\(RGBA\) channels, got 5") as e:
        gen(np.zeros((8, 8, 5), np.uint8))
    assert "\n" not in str(e.value)


def test_float_input_computes_in_fp32_unless_bf16_is_asked(exported, monkeypatch):
    """Where `auto` resolves to bf16 (forced here, as on a CPU with native bf16), uint8 images
    use bf16 but float arrays and tensors come back in fp32's fine steps; asking for bf16 by
    name keeps bf16 for floats too."""
    monkeypatch.setenv(precision.SWITCH, "1")
    path = exported / "G_ab.safetensors"
    auto, fp32 = (translate.load_generator(path, precision=p) for p in ("auto", "fp32"))
    bf16 = translate.load_generator(path, precision="bf16")
    assert auto.precision == "bf16" and fp32.precision == "fp32"
    # fp32 to its last bits but for the order of float sums: bf16's net may run in another
    # layout (NCHW on a CPU without AMX), and bf16 itself would be ~1e-2 off.
    x = np.random.default_rng(4).random((40, 48, 3)).astype(np.float32)
    np.testing.assert_allclose(auto(x), fp32(x), rtol=0, atol=1e-5)
    t = torch.rand(1, 3, 40, 48) * 2 - 1
    torch.testing.assert_close(auto(t), fp32(t), rtol=0, atol=1e-5)
    coarse, fine = len(np.unique(bf16(x))), len(np.unique(fp32(x)))
    print(f"\ndistinct float outputs: bf16 {coarse}, fp32 (and auto) {fine}")
    assert coarse < 0.5 * fine
    img = (x * 255).astype(np.uint8)
    np.testing.assert_array_equal(auto(img), bf16(img))  # uint8 keeps auto's bf16


@pytest.mark.slow
def test_export_check_line_and_rejection(exported, tmp_path, monkeypatch):
    from translate import onnx_export
    from translate.infer.load import load_torch_generator

    net, meta = load_torch_generator(exported / "G_ab.safetensors")
    lines = onnx_export.export_onnx(net, meta, tmp_path / "G.onnx")
    assert len(lines) == 2  # the net and its tiling companion (the net has instance norms)
    for line in lines:
        assert "max |onnx - torch| = " in line
        assert float(line.split("max |onnx - torch| = ")[1].split()[0].rstrip(")")) < 1e-4
    # no external data file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.onnx", "G.tiles.onnx"]
    real = onnx_export._session

    class Off:  # a session whose every output is 1e-3 away from PyTorch's
        def __init__(self, path):
            self.inner = real(path)

        def run(self, names, feeds):
            return [y + 1e-3 for y in self.inner.run(names, feeds)]
    monkeypatch.setattr(onnx_export, "_session", Off)
    with pytest.raises(ModelError, match="differs from PyTorch by 1.0") as e:
        onnx_export.export_onnx(net, meta, tmp_path / "bad.onnx")
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.onnx", "G.tiles.onnx"]
    monkeypatch.setattr(onnx_export, "_session", real)
    monkeypatch.setattr(onnx_export, "_tiles_gap", lambda *args: 2e-3)  # the companion only
    with pytest.raises(ModelError, match="tiling companion differs from PyTorch by 2.00e-03"):
        onnx_export.export_onnx(net, meta, tmp_path / "bad.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.onnx", "G.tiles.onnx"]

    def unexportable(*args):
        raise RuntimeError("torch.export:\n  cannot trace this")
    monkeypatch.setattr(onnx_export, "_TilesGraph", unexportable)
    with pytest.raises(ModelError, match="could not be exported .torch.export: cannot trace"):
        onnx_export.export_onnx(net, meta, tmp_path / "bad.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["G.onnx", "G.tiles.onnx"]


@pytest.mark.slow
def test_export_and_apply_flags_through_the_cli(trained_run, tmp_path):
    from translate.infer import ModelInfo, model_info, read_metadata

    proc = run_cli("export", str(trained_run), "--step", "2", "--ema", "--out",
                   str(tmp_path / "e"), "--onnx")
    assert proc.stdout.count("max |onnx - torch| = ") == 4  # each net and its companion
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == [
        "G_ab.onnx", "G_ab.safetensors", "G_ab.tiles.onnx", "G_ba.onnx", "G_ba.safetensors",
        "G_ba.tiles.onnx"]
    meta = read_metadata(tmp_path / "e" / "G_ab.safetensors")
    assert (meta["step"], meta["ema"], meta["value_range"]) == ("2", "true", "[-1, 1]")
    assert meta["translate_version"] == translate.__version__
    assert model_info(meta) == ModelInfo(3, 3, 4, 8)
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_picture(40, 300)).save(src / "p.jpg")
    out = tmp_path / "out"
    run_cli("apply", str(tmp_path / "e" / "G_ab.safetensors"), str(src), str(out), "--format",
            "png", "--tile", "64", "--overlap", "16", "--precision", "fp32", "--no-progress")
    with Image.open(out / "p.png") as im:
        assert im.format == "PNG" and im.size == (300, 40)
    bad = run_cli("export", str(trained_run), "--step", "7", "--out", str(tmp_path / "e2"),
                  check=False)
    assert bad.returncode == 2 and "no checkpoint for step 7" in bad.stderr


# Keys that exported generators gained after their first release, with the values that rebuild
# the nets made before (the nets' constructor defaults are those older architectures).
LATER_KEYS = {"unet": ("upsample", "padding", "full_res", "affine_out"), "resnet": ("padding",)}


@pytest.mark.parametrize("kind,config", [
    ("unet", {"num_downs": 3, "ngf": 4, "upsample": "transpose", "padding": "zero"}),
    ("resnet", {"ngf": 4, "n_blocks": 1, "upsample": "transpose", "padding": "zero"}),
    ("resnet", {"ngf": 4, "n_blocks": 1, "upsample": "resize", "padding": "zero"}),
])
def test_exports_from_before_the_artifact_free_options_load_as_trained(kind, config, tmp_path):
    """A file written before `upsample`/`padding`/`full_res` existed carries a config without
    them: it must rebuild the transposed-conv, zero-padded net it was trained as."""
    from translate.export import FORMAT
    from translate.nets import build_net, init_weights

    torch.manual_seed(0)
    old = build_net(kind, **config)
    init_weights(old)
    stored = {k: v for k, v in old.config.items() if k not in LATER_KEYS[kind]}
    path = tmp_path / "old.safetensors"
    save_file(old.state_dict(), str(path), {
        "format": FORMAT, "name": "G_ab", "kind": kind, "config": json.dumps(stored),
        "in_channels": "3", "out_channels": "3", "size_multiple": str(old.size_multiple),
        "min_size": str(old.min_size)})
    gen = translate.load_generator(path, precision="fp32")
    assert gen.net.config == old.config
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(gen(x), old.eval()(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_onnx_export_of_a_dcgan_run(tmp_path):
    """`translate export RUN --onnx` on a latent GAN writes G.onnx (input z with a dynamic
    batch, output images) that onnxruntime runs like the torch generator; loading it for
    apply says what it is instead of a raw error."""
    ort = pytest.importorskip("onnxruntime")
    data, run = random_image_folder(tmp_path / "img"), tmp_path / "run"
    run_cli("train", "recipes/dcgan.toml", "--data", str(data), "--steps", "2", "--run-dir",
            str(run), "--batch-size", "4", "--no-progress", "--set", "model.ngf=4", "--set",
            "model.ndf=4", "--set", "model.image_size=32", "--set", "data.crop_size=32",
            "--set", "model.z_dim=8")
    proc = run_cli("export", str(run), "--onnx")
    assert "G.onnx (ONNX opset 18, max |onnx - torch| = " in proc.stdout, proc.stdout
    assert sorted(p.name for p in (run / "export").iterdir()) == ["G.onnx", "G.safetensors"]
    _, nets, _ = run_generators(run)
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(5))
    sess = ort.InferenceSession(str(run / "export" / "G.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["z"]
    got = sess.run(None, {"z": z.numpy()})[0]
    with torch.no_grad():
        want = nets["G"](z).numpy()
    assert got.shape == (3, 3, 32, 32) and np.abs(got - want).max() < 1e-4
    with pytest.raises(UserError, match="a latent generator .*input 'z', output 'sample'"):
        translate.load_generator(run / "export" / "G.onnx")
