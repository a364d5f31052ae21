"""ONNX export of an image generator (dynamic batch, height, width; one file) and an
onnxruntime-backed loader. onnx/onnxruntime are the optional `onnx` extra."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from translate.errors import ModelError, UserError


def _need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{module} is not installed; pip install -e '.[onnx]'") from None


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
    """Write `path` and check it against PyTorch on two odd sizes; returns a report line."""
    onnx = _need("onnx")
    _need("onnxruntime")
    net = net.float().eval()
    m, c = int(meta["size_multiple"]), int(meta["in_channels"])
    example = torch.zeros(1, c, 2 * m if m >= 32 else 64, 2 * m if m >= 32 else 64)
    batch, height, width = (torch.export.Dim("batch", min=1), torch.export.Dim("height"),
                            torch.export.Dim("width"))
    with _quiet():
        program = torch.onnx.export(
            net, (example,), dynamo=True, opset_version=opset, external_data=False,
            input_names=["image"], output_names=["translated"],
            dynamic_shapes=({0: batch, 2: height, 3: width},), verbose=False,
        )
    model = program.model_proto
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    tmp = path.with_name("." + path.name + ".tmp")
    onnx.save_model(model, str(tmp), save_as_external_data=False)
    tmp.replace(path)
    worst = 0.0
    sess = _session(path)
    for n, h, w in ((1, 3 * m, 5 * m), (2, 7 * m, 2 * m)):
        x = torch.randn(n, c, h, w).clamp(-1, 1)
        with torch.no_grad():
            ref = net(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        worst = max(worst, float(np.abs(got - ref).max()))
    if worst > 1e-4:
        path.unlink()
        raise ModelError(f"{path}: ONNX output differs from PyTorch by {worst:.2e} (> 1e-4); "
                         "not written — please report this with your torch/onnx versions")
    return f"wrote {path} (ONNX opset {opset}, max |onnx - torch| = {worst:.1e} on 2 sizes)"


def _session(path: Path):
    ort = _need("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own, unexported types
        raise ModelError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]}); "
                         "re-export with `translate export RUN --onnx`") from None


def load_onnx(path: Path, generator_cls: Any):
    onnx = _need("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common base
        raise ModelError(f"{path}: not a readable ONNX file ({e}); re-export it") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if "size_multiple" not in meta:
        raise ModelError(f"{path}: ONNX file without translate metadata; export it with "
                         "`translate export RUN --onnx`")
    inputs = model.graph.input
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    if len(inputs) != 1 or len(dims) != 4:
        raise ModelError(f"{path}: expected one NCHW image input, found {len(inputs)} inputs "
                         f"of rank {len(dims)}; this is not an image generator")
    if dims[1].HasField("dim_value") and dims[1].dim_value != int(meta["in_channels"]):
        raise ModelError(f"{path}: input has {dims[1].dim_value} channels but its metadata says "
                         f"{meta['in_channels']}; re-export it")
    sess = _session(path)
    name = sess.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.float().cpu().numpy()})[0])

    from translate.export import model_info

    return generator_cls(model_info(meta), meta, forward, "onnx", "fp32")
