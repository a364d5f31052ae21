"""ONNX export of a generator (dynamic batch, height, width; one file) and, for image
generators with per-image norm layers, its tiling companion `<name>.tiles.onnx`: the same net
with the norm layers' statistics as an input and an output, so that onnxruntime can tile a
large image with whole-image statistics as the torch backend does (translate/infer/tiling.py).
onnx/onnxruntime are the optional `onnx` extra."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from translate.errors import ModelError
from translate.files import atomic_path
from translate.infer.onnx import TILES_INPUTS, TILES_OUTPUTS, companion_metadata, tiles_path
from translate.infer.onnx import need as _need
from translate.infer.onnx import session as _session
from translate.infer.tiling import ModuleNormStats, norm_layers, per_image_norm


@contextlib.contextmanager
def _quiet():
    """The exporter logs about torchvision ops and deprecations that concern no generator."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(net: nn.Module, meta: dict[str, str], path: Path, opset: int = 18
                ) -> list[str]:
    """Write `path` (and its tiling companion, see the module docstring) and check each
    against PyTorch on two inputs; returns report lines.

    Image-to-image generators take "image" (N, C, H, W; dynamic batch, height and width) and
    give "translated"; latent generators (dcgan, wgan_gp, cgan, infogan, toy) take "z"
    (N, z_dim, with cgan's one-hot class and infogan's codes in its last entries, as the
    metadata describes) and give "sample" (N, C, S, S images, or N x 2 toy points)."""
    _need("onnx")
    _need("onnxruntime")
    net = net.float().eval()
    tiled = meta.get("latent") != "true" and bool(norm_layers(net))
    if tiled:
        meta = {**meta, "tiles": tiles_path(path).name}
    lines = [_export_main(net, meta, path, opset)]
    if tiled:
        try:
            lines.append(_export_tiles(net, companion_metadata(meta, path.name),
                                       tiles_path(path), opset))
        except Exception as e:  # torch.export raises many kinds
            path.unlink()  # no export without its companion
            if isinstance(e, ModelError):
                raise
            raise ModelError(f"{tiles_path(path)}: the tiling companion could not be exported "
                             f"({' '.join(str(e).split())[:200]}); export without --onnx, and "
                             "please report this with your torch/onnx versions") from None
    return lines


def _export_main(net: nn.Module, meta: dict[str, str], path: Path, opset: int) -> str:
    if meta.get("latent") == "true":
        example, names, checks = _latent_io(int(meta["z_dim"]))
        dynamic = ({0: torch.export.Dim("batch", min=1)},)
    else:
        example, names, checks = _image_io(int(meta["size_multiple"]), int(meta["in_channels"]))
        dynamic = ({0: torch.export.Dim("batch", min=1), 2: torch.export.Dim("height"),
                    3: torch.export.Dim("width")},)
    with _quiet():
        program = torch.onnx.export(
            net, (example,), dynamo=True, opset_version=opset, external_data=False,
            input_names=[names[0]], output_names=[names[1]], dynamic_shapes=dynamic,
            verbose=False,
        )
    _save(program.model_proto, meta, path)
    worst = 0.0
    sess = _session(path)
    for x in checks:
        with torch.no_grad():
            ref = net(x).numpy()
        got = sess.run(None, {names[0]: x.numpy()})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > 1e-4:
        path.unlink()
        raise ModelError(f"{path}: ONNX output differs from PyTorch by {worst:.2e} (> 1e-4); "
                         "not written — please report this with your torch/onnx versions")
    what = "batch sizes" if meta.get("latent") == "true" else "sizes"
    return f"wrote {path} (ONNX opset {opset}, max |onnx - torch| = {worst:.1e} on 2 {what})"


def _image_io(m: int, c: int) -> tuple[torch.Tensor, tuple[str, str], list[torch.Tensor]]:
    """Example input, (input, output) names and two checks at odd multiples of the size."""
    side = 2 * m if m >= 32 else 64
    checks = [torch.randn(n, c, h, w).clamp(-1, 1) for n, h, w in ((1, 3 * m, 5 * m),
                                                                   (2, 7 * m, 2 * m))]
    return torch.zeros(1, c, side, side), ("image", "translated"), checks


def _latent_io(z_dim: int) -> tuple[torch.Tensor, tuple[str, str], list[torch.Tensor]]:
    """Example input, (input, output) names and two checks of other batch sizes."""
    g = torch.Generator().manual_seed(0)
    checks = [torch.randn(n, z_dim, generator=g) for n in (1, 5)]
    return torch.zeros(1, z_dim), ("z", "sample"), checks


def _save(model, meta: dict[str, str], path: Path) -> None:
    onnx = _need("onnx")
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


# The companion computes each norm layer's mean, variance and scaling op by op where the plain
# export has one InstanceNormalization, so it rounds differently: a random-init paper ResNet-9
# (23 norm layers, activations of tiny variance) came out 6.1e-5 from PyTorch, the plain file
# 1.0e-5. 1e-3 on [-1, 1] is 0.13 of a grey level.
TILES_TOLERANCE = 1e-3


class _GivenStatsNorm(nn.Module):
    """Stands in for a per-image norm layer (InstanceNorm2d, GroupNorm) in the tiling
    companion: normalises with its own statistics where `given` is 0 and with its slice of the
    `stats` input where it is 1, and hands its own statistics to the output. Per channel:
    mean, then biased variance, as the torch backend's tiling records them."""

    def __init__(self, norm: nn.Module, io: dict, index: int, offset: int) -> None:
        super().__init__()
        self.channels = norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features
        self.groups = norm.num_groups if isinstance(norm, nn.GroupNorm) else self.channels
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias
        self.io, self.index, self.offset = io, index, offset  # io: a plain dict, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, g = x.shape[0], self.channels, self.groups
        if g == c:  # no reshape: its -1 would make torch.export guard the smallest sizes
            mean = x.mean((2, 3))
            var = (x - mean[:, :, None, None]).pow(2).mean((2, 3))
        else:
            flat = x.reshape(n, g, -1)
            mean = flat.mean(2)
            var = (flat - mean[:, :, None]).pow(2).mean(2)
            mean = mean[:, :, None].expand(n, g, c // g).reshape(n, c)
            var = var[:, :, None].expand(n, g, c // g).reshape(n, c)
        self.io["seen"][self.index] = torch.cat([mean, var], 1)
        stats, given, k = self.io["stats"], self.io["given"], self.offset
        mean = mean * (1 - given) + stats[k:k + c] * given
        var = var * (1 - given) + stats[k + c:k + 2 * c] * given
        y = (x - mean[:, :, None, None]) * torch.rsqrt(var + self.eps)[:, :, None, None]
        if self.weight is not None:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


class _TilesGraph(nn.Module):
    """(image, norm_stats, norm_given) -> (translated, norm_stats_out): a copy of `net` whose
    per-image norm layers are _GivenStatsNorm, in the order of net.modules()."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = copy.deepcopy(net)
        self.io: dict = {}
        norms = [(name, m) for name, m in self.net.named_modules() if per_image_norm(m)]
        offset = 0
        for index, (name, norm) in enumerate(norms):
            layer = _GivenStatsNorm(norm, self.io, index, offset)
            parent, _, child = name.rpartition(".")
            setattr(self.net.get_submodule(parent), child, layer)
            offset += 2 * layer.channels
        self.layers, self.size = len(norms), offset

    def forward(self, image: torch.Tensor, norm_stats: torch.Tensor, norm_given: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        self.io.update(stats=norm_stats, given=norm_given, seen={})
        y = self.net(image)
        seen = self.io.pop("seen")
        if len(seen) < self.layers:
            raise ModelError(f"{self.layers - len(seen)} norm layers never ran; the generator "
                             "cannot be tiled with whole-image statistics")
        return y, torch.cat([seen[i] for i in range(self.layers)], 1)


def _flat(stats: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The torch backend's recorded statistics in the companion's layout."""
    return torch.cat([torch.cat([mean, var]) for mean, var in stats])


def _export_tiles(net: nn.Module, meta: dict[str, str], path: Path, opset: int) -> str:
    """Write the tiling companion and check it (_tiles_gap); returns a report line."""
    graph = _TilesGraph(net).eval()
    m, c = int(meta["size_multiple"]), int(meta["in_channels"])
    image, _, checks = _image_io(m, c)
    example = (image, torch.zeros(graph.size), torch.zeros(1))
    # Tiles and padded images are multiples of the size and at least its minimum: said so,
    # torch.export need not prove the norm arithmetic for sizes that never come.
    least = max(1, -(-int(meta.get("min_size", "1")) // m))
    dims = {0: torch.export.Dim("batch", min=1), 2: m * torch.export.Dim("rows", min=least),
            3: m * torch.export.Dim("columns", min=least)}
    with _quiet():
        program = torch.onnx.export(
            graph, example, dynamo=True, opset_version=opset, external_data=False,
            input_names=list(TILES_INPUTS), output_names=list(TILES_OUTPUTS),
            dynamic_shapes=(dims, None, None), verbose=False)
    _save(program.model_proto, meta, path)
    worst = _tiles_gap(net, path, checks[0], checks[1][:1])
    if worst > TILES_TOLERANCE:
        path.unlink()
        raise ModelError(f"{path}: the tiling companion differs from PyTorch by {worst:.2e} "
                         f"(> {TILES_TOLERANCE:g}); not written — please report this with your "
                         "torch/onnx versions")
    return (f"wrote {path} (for tiling large images with whole-image statistics, "
            f"{graph.layers} norm layers; max |onnx - torch| = {worst:.1e})")


def _tiles_gap(net: nn.Module, path: Path, x: torch.Tensor, other: torch.Tensor) -> float:
    """The largest difference between the companion at `path` and the torch backend's tiling
    arithmetic on the image `x`, in both modes: own statistics (the output must equal net(x),
    the statistics out what tiling records) and the image `other`'s statistics frozen."""
    source = ModuleNormStats(norm_layers(net))
    with torch.no_grad():
        own, want = source.measure(lambda: net(x))
        theirs, _ = source.measure(lambda: net(other))
        with source.frozen(theirs):
            frozen = net(x)
    sess = _session(path)
    feeds = [(_flat(theirs) * 0, 0.0, want, _flat(own)), (_flat(theirs), 1.0, frozen, None)]
    worst = 0.0
    for stats, given, out, seen in feeds:
        got, got_stats = sess.run(None, {"image": x.numpy(), "norm_stats": stats.numpy(),
                                         "norm_given": np.array([given], np.float32)})
        worst = max(worst, float(np.abs(got - out.numpy()).max()))
        if seen is not None:
            worst = max(worst, float(np.abs(got_stats[0] - seen.numpy()).max()))
    return worst
