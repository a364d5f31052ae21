"""The net zoo: every registered kind builds, runs forward and backward, and rebuilds from config."""

import inspect
import json

import pytest
import torch
from torch import nn

from translate.errors import ConfigError
from translate.nets import NETS, build_net, init_weights

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
