"""The ONNX backend of inference: an exported .onnx generator run by onnxruntime (fp32).
onnx and onnxruntime are optional (the `onnx` extra): imported where used."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from translate.errors import ModelError, UserError
from translate.infer.tiling import ModelInfo


def need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{module} is not installed; pip install -e '.[onnx]'") from None


def model_info(meta: dict[str, str]) -> ModelInfo:
    return ModelInfo(int(meta["in_channels"]), int(meta["out_channels"]),
                     int(meta["size_multiple"]), int(meta.get("min_size", "1")))


def session(path: Path):
    ort = need("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own, unexported types
        raise ModelError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]}); "
                         "re-export with `translate export RUN --onnx`") from None


def load_onnx(path: Path) -> tuple[ModelInfo, dict[str, str], Callable, str, str]:
    """(info, metadata, batch function, backend, precision) of an image generator's ONNX file."""
    onnx = need("onnx")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors have no common base
        raise ModelError(f"{path}: not a readable ONNX file ({e}); re-export it") from None
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get("latent") == "true":
        raise UserError(f"{path}: a latent generator (input z, no image); run it with "
                        "onnxruntime directly (input 'z', output 'sample'), or sample the run "
                        "with `translate sample RUN`")
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
    sess = session(path)
    name = sess.get_inputs()[0].name

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.float().cpu().numpy()})[0])

    return model_info(meta), meta, forward, "onnx", "fp32"
