"""ONNX export of an image generator (dynamic batch, height, width; one file) and an
onnxruntime-backed loader. onnx/onnxruntime are the optional `onnx` extra."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from translate.errors import ModelError
from translate.files import atomic_path
from translate.infer.onnx import need as _need
from translate.infer.onnx import session as _session


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


def export_onnx(net: nn.Module, meta: dict[str, str], path: Path, opset: int = 18) -> str:
    """Write `path` and check it against PyTorch on two inputs; returns a report line.

    Image-to-image generators take "image" (N, C, H, W; dynamic batch, height and width) and
    give "translated"; latent generators (dcgan, wgan_gp, cgan, infogan, toy) take "z"
    (N, z_dim, with cgan's one-hot class and infogan's codes in its last entries, as the
    metadata describes) and give "sample" (N, C, S, S images, or N x 2 toy points)."""
    onnx = _need("onnx")
    _need("onnxruntime")
    net = net.float().eval()
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
    model = program.model_proto
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)
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
