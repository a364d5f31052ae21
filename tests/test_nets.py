"""The net zoo: every registered kind builds, runs forward and backward, and rebuilds from config."""

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from translate import recipe as recipe_mod
from translate.errors import ConfigError
from translate.eval.metrics import checkerboard_peak
from translate.methods import METHODS
from translate.nets import NETS, build_net, init_weights
from translate.nets.layers import GradInLayout, SubPixelUpsample

# Small widths so that the whole sweep stays fast on CPU; each entry: config, input maker,
# expected output shape.
SMALL: dict[str, tuple[dict, tuple[int, ...], tuple[int, ...]]] = {
    "resnet": ({"ngf": 8, "n_blocks": 2}, (2, 3, 16, 16), (2, 3, 16, 16)),
    "unet": ({"ngf": 8, "num_downs": 4}, (2, 3, 32, 32), (2, 3, 32, 32)),
    "patchgan": ({"ndf": 8}, (2, 3, 32, 32), (2, 1, 2, 2)),
    "dcgan_g": ({"ngf": 8, "z_dim": 16, "image_size": 32}, (2, 16), (2, 3, 32, 32)),
    "dcgan_d": ({"ndf": 8, "image_size": 32}, (2, 3, 32, 32), (2,)),
    "mlp_g": ({"hidden": 16, "depth": 2}, (4, 2), (4, 2)),
    "mlp_d": ({"hidden": 16, "depth": 2}, (4, 2), (4,)),
}


def n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_every_registered_kind_is_swept():
    assert set(SMALL) == set(NETS)


@pytest.mark.parametrize("kind", sorted(NETS))
def test_forward_backward(kind):
    config, in_shape, out_shape = SMALL[kind]
    torch.manual_seed(0)
    net = build_net(kind, **config)
    init_weights(net)
    x = torch.randn(in_shape, requires_grad=True)
    y = net(x)
    assert y.shape == out_shape
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", sorted(NETS))
def test_config_rebuilds_same_architecture(kind):
    net = build_net(kind, **SMALL[kind][0])
    assert net.kind == kind
    config = json.loads(json.dumps(net.config))  # must survive a JSON round trip
    rebuilt = build_net(kind, **config)
    assert rebuilt.config == net.config
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes
    rebuilt.load_state_dict(net.state_dict())  # strict


@pytest.mark.parametrize("kind", sorted(NETS))
def test_config_holds_every_constructor_default(kind):
    params = inspect.signature(NETS[kind]).parameters
    assert set(build_net(kind).config) == set(params)


def test_generators_declare_their_io():
    for kind in ("resnet", "unet"):
        net = build_net(kind, in_channels=1, out_channels=3, ngf=4)
        assert (net.in_channels, net.out_channels) == (1, 3)
    assert build_net("resnet", ngf=4).size_multiple == 4
    g = build_net("dcgan_g", z_dim=7, out_channels=1, image_size=32, ngf=4)
    assert (g.z_dim, g.out_channels, g.image_size) == (7, 1, 32)


def test_reference_parameter_counts():
    # The CycleGAN reference prints 11.378 M for resnet_9blocks and 2.765 M for basic D.
    assert round(n_params(build_net("resnet")) / 1e6, 3) == 11.378
    assert round(n_params(build_net("resnet", n_blocks=6)) / 1e6, 3) == 7.838
    assert round(n_params(build_net("patchgan", n_layers=3)) / 1e6, 3) == 2.765


def test_reference_unet_and_dcgan_counts():
    # pix2pix unet_256 with batch norm: 54.414 M; the PyTorch dcgan example: 3,576,704 / 2,765,568.
    assert round(n_params(build_net("unet", num_downs=8, norm="batch")) / 1e6, 3) == 54.414
    assert n_params(build_net("dcgan_g")) == 3_576_704
    assert n_params(build_net("dcgan_d")) == 2_765_568


def test_resnet_keeps_non_square_size():
    net = build_net("resnet", ngf=4, n_blocks=1)
    assert net(torch.randn(1, 3, 20, 28)).shape == (1, 3, 20, 28)


def test_resnet_pads_in_bf16_under_autocast_with_the_same_result(monkeypatch):
    # CPU autocast runs reflection_pad2d in fp32; the ResNet's own pad keeps bf16 (no casts to
    # fp32 and back around every pad) and must compute exactly what the cast round trip did.
    from translate.nets import layers

    torch.manual_seed(0)
    net, x = build_net("resnet", ngf=8, n_blocks=2), torch.randn(2, 3, 16, 16)
    pads = [m for m in net.modules() if isinstance(m, nn.ReflectionPad2d)]
    assert pads and all(isinstance(m, layers.ReflectionPad2d) for m in pads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pads[1](torch.ones(1, 2, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
        ours = net(x)
        monkeypatch.setattr(layers.ReflectionPad2d, "forward", nn.ReflectionPad2d.forward)
        assert pads[1](torch.ones(1, 2, 4, 4, dtype=torch.bfloat16)).dtype == torch.float32
        torch_pads = net(x)
    assert torch.equal(ours, torch_pads)


def test_resnet_one_channel_and_tanh_range():
    net = build_net("resnet", in_channels=1, out_channels=1, ngf=4, n_blocks=1)
    y = net(torch.randn(1, 1, 12, 8) * 10)
    assert y.shape == (1, 1, 12, 8)
    assert y.abs().max() <= 1


@pytest.mark.parametrize("kind,config", [
    ("resnet", {"ngf": 4, "n_blocks": 2, "norm": "none"}),
    ("unet", {"ngf": 4, "num_downs": 3, "norm": "none"}),
])
def test_encoder_feature_points(kind, config):
    """forward(x, features): the encoder's outputs at the chosen points (CUT's PatchNCE), of the
    widths and strides the net declares, the very tensors the translation passes through, and
    not overwritten by an in-place ReLU (norm "none" puts one right after a feature point)."""
    torch.manual_seed(0)
    net = build_net(kind, **config)
    x = torch.randn(2, 3, 16, 24)
    points = list(range(len(net.feature_channels)))
    seen: list[torch.Tensor] = []
    layers = net.model if kind == "resnet" else net.down
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out.clone()))
             for m in layers]
    full = net(x)
    for h in hooks:
        h.remove()
    feats = net(x, points)
    assert torch.equal(net(x), full) and torch.equal(feats[0], x)
    for i, f in zip(points, feats):
        stride = net.feature_strides[i]
        assert f.shape == (2, net.feature_channels[i], 16 // stride, 24 // stride), i
    # Each feature is what the full forward computed there (recorded before any later layer).
    ends = net.feature_ends if kind == "resnet" else range(len(net.down) + 1)
    for i, end in zip(points[1:], list(ends)[1:]):
        assert torch.equal(feats[i], seen[end - 1]), i
    if kind == "resnet":
        assert (feats[1] < 0).any()  # the conv output before its ReLU
    assert [f.shape for f in net(x, [2, 0])] == [feats[2].shape, feats[0].shape]


@pytest.mark.parametrize("num_downs", [3, 5])
def test_unet_size_multiple(num_downs):
    net = build_net("unet", ngf=4, num_downs=num_downs)
    m = net.size_multiple
    assert m == 2**num_downs
    assert net(torch.randn(1, 3, m, 2 * m)).shape == (1, 3, m, 2 * m)


def test_unet_dropout_only_in_inner_levels():
    net = build_net("unet", ngf=4, num_downs=7, dropout=0.5)
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    assert len(dropouts) == 7 - 5  # the reference's num_downs - 5 levels between 8ngf levels


@pytest.mark.parametrize("kind", ["resnet", "unet", "patchgan"])
def test_instance_norm_has_no_affine_params(kind):
    net = build_net(kind, **SMALL[kind][0])
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms
    assert all(not m.affine and not m.track_running_stats for m in norms)
    assert not any(".running_" in k for k in net.state_dict())


@pytest.mark.parametrize("norm", ["batch", "layer", "instance", "none"])
def test_dcgan_d_norms(norm):
    net = build_net("dcgan_d", ndf=4, image_size=32, norm=norm)
    assert net(torch.randn(3, 3, 32, 32)).shape == (3,)
    if norm == "layer":
        assert any(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in net.modules())


def test_dcgan_sizes_and_bad_size():
    for size in (32, 64):
        g = build_net("dcgan_g", ngf=4, z_dim=8, image_size=size)
        d = build_net("dcgan_d", ndf=4, image_size=size)
        assert d(g(torch.randn(2, 8))).shape == (2,)
    with pytest.raises(ConfigError, match="image_size"):
        build_net("dcgan_g", image_size=48)


def test_dcgan_d_rejects_wrong_image_size():
    d = build_net("dcgan_d", ndf=4, image_size=32)
    with pytest.raises(RuntimeError):
        d(torch.randn(2, 3, 64, 64))


def test_init_weights_statistics():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64), nn.Linear(8, 8))
    init_weights(net, gain=0.02)
    conv, bn, _ = net
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert conv.weight.mean().abs().item() < 0.002
    assert conv.bias.abs().max() == 0
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.bias.abs().max() == 0


def test_init_weights_reaches_spectral_norm_original():
    net = build_net("mlp_d", hidden=256, depth=1, spectral_norm=True)
    init_weights(net, gain=0.5)
    first = net.model[0]
    assert first.parametrizations.weight.original.std().item() == pytest.approx(0.5, rel=0.05)


def _top_singular_value(layer: nn.Module) -> float:
    return torch.linalg.matrix_norm(layer.weight.detach().flatten(1), ord=2).item()


@pytest.mark.parametrize("kind", ["patchgan", "dcgan_d", "mlp_d"])
def test_spectral_norm_bounds_top_singular_value(kind):
    config, in_shape, _ = SMALL[kind]
    torch.manual_seed(0)
    net = build_net(kind, **config, spectral_norm=True)
    init_weights(net, gain=1.0)  # big weights: unnormalised, sigma would be far above 1
    net.train()
    for _ in range(5):  # each training forward runs one power iteration
        net(torch.randn(in_shape))
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    for layer in layers:
        assert _top_singular_value(layer) == pytest.approx(1.0, abs=0.05)
    plain = build_net(kind, **config)
    init_weights(plain, gain=1.0)
    assert max(_top_singular_value(m) for m in plain.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))) > 2


def test_mlp_d_pack_groups_the_batch():
    torch.manual_seed(0)
    net = build_net("mlp_d", hidden=8, depth=1, pack=3)
    x = torch.randn(6, 2)
    y = net(x)
    assert y.shape == (2,)
    # Consecutive samples form a pack: changing sample 4 changes only the second logit.
    x2 = x.clone()
    x2[4] += 1
    y2 = net(x2)
    assert y2[0] == y[0] and y2[1] != y[1]
    with pytest.raises(ConfigError, match="multiple of 3"):
        net(torch.randn(7, 2))


def test_unknown_kind_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        build_net("resnet50")
    message = str(info.value)
    assert "resnet50" in message
    assert all(kind in message for kind in NETS)


def test_unknown_option_and_bad_norm_are_config_errors():
    with pytest.raises(ConfigError, match="'n_block'"):
        build_net("resnet", n_block=6)
    with pytest.raises(ConfigError, match="group"):
        build_net("patchgan", norm="group")


def test_resnet_resize_upsampling_keeps_size_and_rebuilds():
    net = build_net("resnet", ngf=4, n_blocks=1, upsample="resize")
    x = torch.randn(2, 3, 20, 28)
    assert net(x).shape == x.shape
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    again = build_net(net.kind, **net.config)
    again.load_state_dict(net.state_dict())
    with pytest.raises(ConfigError, match="upsample"):
        build_net("resnet", upsample="bicubic")


# ---------------------------------------------------------------------------- artifacts
# The CycleGAN generators by default: bilinear upsampling and reflect padding (issue #13). Their
# output for a smooth input must carry no spike at the upsampling periods (2 and 4 pixels) of
# the amplitude spectrum, where transposed convolutions put one. Measured at 64 px (4 seeds,
# ngf 8) at initialisation: resize/bilinear/subpixel nets 1.2-4.3 times their spectral
# neighbourhood, transposed ones 10-31 times; after 40 training steps at a high LR: bilinear
# 1.1-1.4, nearest resize 2.2-7.1, subpixel 7.1-23, transposed 9-14.
CHECKERBOARD = 5.0


def _smooth(side: int = 64) -> torch.Tensor:
    """A colour field with under one period across the image: no content at 2 or 4 pixels."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side),
                            indexing="ij")
    field = torch.stack([torch.sin(2 * math.pi * xx), torch.cos(1.4 * math.pi * yy), xx + yy - 1])
    return 0.8 * field.unsqueeze(0)


def _cyclegan_g(kind: str, seed: int, *sets: str) -> nn.Module:
    """G_ab as CycleGAN builds and initialises it from its default [model] settings (small)."""
    torch.manual_seed(seed)
    cfg = recipe_mod.load(None, [f'model.generator="{kind}"', "model.ngf=8", "model.n_blocks=2",
                             "model.unet_downs=4", *sets])
    return METHODS["cyclegan"].build(cfg).nets["G_ab"].eval()


@pytest.mark.parametrize("kind", ["unet", "resnet"])
def test_default_generators_draw_no_checkerboard_and_transposed_ones_do(kind):
    for seed in range(3):
        with torch.no_grad():
            clean = checkerboard_peak(_cyclegan_g(kind, seed)(_smooth()))
            grid = checkerboard_peak(_cyclegan_g(kind, seed, 'model.upsample="transpose"')(
                _smooth()))
        assert clean < CHECKERBOARD < grid, (seed, clean, grid)
    for other in ("resize", "subpixel"):  # clean at initialisation (not after training)
        with torch.no_grad():
            net = _cyclegan_g(kind, 0, f'model.upsample="{other}"')
            assert checkerboard_peak(net(_smooth())) < CHECKERBOARD


CYCLEGAN_RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("cyclegan_*.toml"))


@pytest.mark.parametrize("recipe", CYCLEGAN_RECIPES, ids=lambda p: p.stem)
def test_recipes_draw_checkerboards_only_where_they_reproduce_the_paper(recipe):
    """The recipes that reproduce the paper keep its transposed convs (and their checkerboards);
    every other CycleGAN recipe's generator is clean."""
    torch.manual_seed(0)
    cfg = recipe_mod.load(recipe)
    with torch.no_grad():
        peak = checkerboard_peak(METHODS["cyclegan"].build(cfg).nets["G_ab"].eval()(_smooth()))
    assert (peak > CHECKERBOARD) == (cfg.model.upsample == "transpose"), peak


@pytest.fixture(scope="module")
def demo32(tmp_path_factory) -> Path:
    from translate.data.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("d") / "demo32", size=32, n_train=8, n_test=2)


@pytest.mark.parametrize("kind", ["unet", "resnet"])
def test_no_checkerboard_after_a_short_training_either(kind, demo32, tmp_path):
    """A real CycleGAN run (the training loop, 40 steps at 10x the paper's LR on 32 px crops,
    so the weights move far from their start): the default G_ab still draws no checkerboard
    at 64 px, the transposed variant of the same run does."""
    from translate.export import run_generators
    from translate.runner import train

    peaks = {}
    for name, sets in (("clean", []), ("transpose", ['model.upsample="transpose"'])):
        run = tmp_path / name
        cfg = recipe_mod.load(None, [
            f'model.generator="{kind}"', "model.ngf=8", "model.ndf=8", "model.n_blocks=2",
            "model.unet_downs=4", "model.n_layers_d=2", f'data.root="{demo32}"',
            'data.preprocess="crop"', "data.load_size=32", "data.crop_size=32",
            "train.batch_size=2", "train.steps=40", "train.lr_g=2e-3", "train.lr_d=2e-3",
            'train.mixed_precision="no"', "train.save_every=40", "train.sample_every=40",
            f'run_dir="{run}"', *sets])
        train(cfg, progress=False)
        _, nets, _ = run_generators(run)
        with torch.no_grad():
            peaks[name] = checkerboard_peak(nets["G_ab"](_smooth()))
    assert peaks["clean"] < CHECKERBOARD < peaks["transpose"], peaks


@pytest.mark.parametrize("kind", ["unet", "resnet"])
def test_reflect_padding_draws_no_border(kind):
    """Every conv of the default generators sees reflected borders, so a flat image stays
    exactly flat up to the edges; zero padding makes the border differ (the stripes)."""
    flat = torch.full((1, 3, 32, 32), 0.3)
    with torch.no_grad():
        clean = _cyclegan_g(kind, 0)(flat)
        zero = _cyclegan_g(kind, 0, 'model.padding="zero"')(flat)
    assert (clean - clean[..., 16:17, 16:17]).abs().max() < 1e-5
    inner = zero[..., 16:17, 16:17]
    assert (zero[..., 0, :] - inner[..., 0]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["unet", "resnet"])
def test_subpixel_upsampling_starts_as_conv_then_nearest_resize(kind):
    """ICNR: after init_weights the four kernels of each sub-pixel are equal, so every 2x2 block
    of the layer's output is one value (a conv followed by nearest-neighbour resizing)."""
    net = _cyclegan_g(kind, 0, 'model.upsample="subpixel"')
    layers = [m for m in net.modules() if isinstance(m, SubPixelUpsample)]
    assert len(layers) == 2 if kind == "resnet" else len(layers) == 4
    for layer in layers:
        y = layer(torch.randn(1, layer[1].in_channels, 8, 8))
        assert torch.equal(y, F.interpolate(y[..., ::2, ::2], scale_factor=2.0))
        assert y[..., ::2, ::2].std() > 0


def _fit_error(x: torch.Tensor, target: torch.Tensor, **unet: object) -> float:
    """The L1 error of a small reflect-padded U-Net after 150 Adam steps fitting x -> target."""
    torch.manual_seed(0)
    net = build_net("unet", ngf=8, num_downs=3, padding="reflect", **unet)
    init_weights(net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(150):
        loss = (net(x) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_unet_full_res_level_passes_fine_detail_through():
    """Fitting the identity on pixel noise (detail at the finest scale there is): the reference
    U-Net decodes every pixel from half-resolution features and stays far off; with the
    full-resolution level the same short fit gets several times closer."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    errors = {full_res: _fit_error(x, x, upsample="bilinear", full_res=full_res)
              for full_res in (False, True)}
    assert errors[True] < 0.5 * errors[False], errors
    net = build_net("unet", ngf=8, num_downs=3, upsample="bilinear", full_res=True)
    assert net(torch.randn(1, 3, 16, 24)).shape == (1, 3, 16, 24)
    plain = build_net("unet", ngf=4, num_downs=3)
    assert plain.stem is None and plain.out is None  # the reference's layout is unchanged


def test_unet_affine_out_applies_its_per_pixel_colour_transform_to_the_input():
    """affine_out: the last layer's 12 channels are a 3x3 matrix and an offset per pixel,
    applied to that input pixel (clamped to [-1, 1]). Set the layer to a constant transform
    (zero weights, the transform in the bias): the output is that transform of the input,
    pixel for pixel, fine detail included."""
    net = build_net("unet", ngf=4, num_downs=3, upsample="conv_bilinear", padding="reflect",
                    full_res=True, affine_out=True).eval()
    head = net.out[1]
    assert isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1) and head.out_channels == 12
    matrix = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.0, 0.0, -1.0]])
    offset = torch.tensor([0.1, -0.2, 0.3])
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.cat([matrix.flatten(), offset]))
        x = torch.rand(2, 3, 16, 24) * 2 - 1
        want = (torch.einsum("oc,nchw->nohw", matrix, x) + offset.view(1, 3, 1, 1)).clamp(-1, 1)
        torch.testing.assert_close(net(x), want, rtol=0, atol=1e-6)
    gray = build_net("unet", in_channels=1, out_channels=3, ngf=4, num_downs=3,
                     full_res=True, affine_out=True)
    assert gray(torch.rand(1, 1, 16, 16)).shape == (1, 3, 16, 16)
    assert gray.out[1].out_channels == 3 * (1 + 1)


def test_unet_affine_out_fits_a_colour_mapping_with_its_detail():
    """Fitting a fixed per-pixel colour mapping on pixel noise: the affine output carries the
    input's detail through and gets far closer than the same net writing the image itself."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    target = torch.stack([x[:, 1], 0.5 * (x[:, 0] + x[:, 2]), -x[:, 2] * 0.8], dim=1)
    errors = {affine: _fit_error(x, target, upsample="conv_bilinear", full_res=True,
                                 affine_out=affine) for affine in (False, True)}
    assert errors[True] < 0.2 * errors[False], errors  # measured: 0.004 vs 0.054


def test_border_conv_reflects_as_nn_conv_does_and_pads_in_bf16_under_autocast():
    """Same numbers and state dict as nn.Conv2d with reflect padding; under CPU autocast the
    pad stays in bf16 (nn.Conv2d's F.pad goes through fp32 and back)."""
    from translate.nets.layers import BorderConv2d

    torch.manual_seed(0)
    ours = BorderConv2d(3, 5, 4, 2, 1, padding_mode="reflect")
    ref = nn.Conv2d(3, 5, 4, 2, 1, padding_mode="reflect")
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, 16, 12)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)
    copies = {}
    for name, conv in (("ours", ours), ("nn", ref)):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as prof:
            y = conv(x.bfloat16())
        assert y.dtype == torch.bfloat16
        copies[name] = [e.name for e in prof.events()].count("aten::_to_copy")
    # nn.Conv2d: the pad in fp32 and its result back to bf16, beside the weight and bias casts
    assert copies["ours"] == copies["nn"] - 2, copies
    zero = BorderConv2d(3, 5, 3, 1, 1)
    torch.testing.assert_close(zero(x), nn.functional.conv2d(x, zero.weight, zero.bias, 1, 1))


def test_reflect_padding_reaches_a_one_pixel_bottleneck():
    """4 downsamplings of a 16 px image leave a 1x1 map, too small to mirror: its pad repeats
    the edge instead of stopping the run (the demo recipe on the tests' 16 px data)."""
    from translate.nets.layers import ReflectionPad2d

    net = build_net("unet", ngf=4, num_downs=4, upsample="conv_bilinear", padding="reflect",
                    full_res=True, affine_out=True)
    assert net(torch.rand(2, 3, 16, 16) * 2 - 1).shape == (2, 3, 16, 16)
    one = torch.arange(2.0).view(1, 2, 1, 1)
    assert torch.equal(ReflectionPad2d(1)(one), one.expand(1, 2, 3, 3))
    x = torch.rand(1, 2, 5, 5)
    assert torch.equal(ReflectionPad2d(2)(x), nn.ReflectionPad2d(2)(x))  # else unchanged


def test_a_u_net_levels_gradient_comes_back_channels_last_for_the_upsampling_backward():
    """A U-Net level's output is concatenated with its skip, so its gradient arrives as a channel
    slice (strided, neither layout), and bilinear upsampling's CPU backward then takes its slow
    NCHW path. GradInLayout hands it on channels_last-contiguous; the values are untouched."""
    net = build_net("unet", ngf=4, num_downs=3, norm="none", upsample="conv_bilinear",
                    full_res=True, affine_out=True).to(memory_format=torch.channels_last)
    layouts = []

    def watch(_module, _args, out):
        out.register_hook(lambda g: layouts.append(
            g.is_contiguous(memory_format=torch.channels_last)))

    for m in net.modules():
        if isinstance(m, nn.Upsample):
            m.register_forward_hook(watch)
    x = torch.rand(2, 3, 16, 16).to(memory_format=torch.channels_last)
    net(x).square().sum().backward()
    assert layouts and all(layouts), layouts
    # The identity otherwise: the same values and gradients as without it, NCHW untouched.
    layer = GradInLayout()
    s = torch.rand(2, 8, 4, 4).to(memory_format=torch.channels_last)[:, 2:6].requires_grad_()
    cl = s.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    y = layer(cl)
    assert torch.equal(y, cl)
    y.backward(s.detach() * 3)
    assert cl.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl.grad, s.detach() * 3)
    plain = torch.rand(2, 3, 4, 4)
    assert layer(plain) is plain
