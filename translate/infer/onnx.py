"""The ONNX backend of inference: an exported .onnx generator run by onnxruntime (fp32).
onnx and onnxruntime are optional (the `onnx` extra): imported where used.

A generator with per-image norm layers is exported with a companion, `<name>.tiles.onnx`
(translate/onnx_export.py): the same net with the norm layers' statistics as an input
("norm_stats", used where "norm_given" is 1) and an output ("norm_stats_out"). With it beside
the .onnx file, large images are tiled with whole-image statistics, as on the torch backend
(translate/infer/tiling.py); without it, each tile is normalised on its own.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from translate.errors import ModelError, UserError
from translate.infer.tiling import ModelInfo

TILES_INPUTS = ("image", "norm_stats", "norm_given")
TILES_OUTPUTS = ("translated", "norm_stats_out")


class ModelWarning(UserWarning):
    """Something about a model file the user should know (printed as one line)."""


def tiles_path(path: Path) -> Path:
    """Where the tiling companion of the ONNX file `path` lives: G_ab.onnx -> G_ab.tiles.onnx."""
    return path.with_name(f"{path.stem}.tiles.onnx")


def companion_metadata(meta: dict[str, str], name: str) -> dict[str, str]:
    """The metadata of the tiling companion of `name`, an export whose metadata is `meta`."""
    return {k: v for k, v in meta.items() if k != "tiles"} | {"tiles_of": name}


def need(module: str):
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"{module} is not installed; pip install -e '.[onnx]'") from None


def model_info(meta: dict[str, str]) -> ModelInfo:
    return ModelInfo(int(meta["in_channels"]), int(meta["out_channels"]),
                     int(meta["size_multiple"]), int(meta.get("min_size", "1")))


def session(path: Path, arena: bool = True):
    """An onnxruntime session of `path` on the CPU. arena=False: memory goes back after each
    run instead of staying in onnxruntime's arena, which grew to hold a tiled image's overview
    and its batches of tiles at once (paper ResNet-9, 2048x2048 px: 3,918 -> 2,162 MB peak,
    80-82 s either way)."""
    ort = need("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    opts.enable_cpu_mem_arena = arena
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
    if [i.name for i in inputs] == list(TILES_INPUTS):
        raise UserError(f"{path}: the tiling companion of {meta.get('tiles_of', 'an export')}; "
                        "pass that file instead (this one is found beside it)")
    if len(inputs) != 1 or len(dims) != 4:
        raise ModelError(f"{path}: expected one NCHW image input, found {len(inputs)} inputs "
                         f"of rank {len(dims)}; this is not an image generator")
    if dims[1].HasField("dim_value") and dims[1].dim_value != int(meta["in_channels"]):
        raise ModelError(f"{path}: input has {dims[1].dim_value} channels but its metadata says "
                         f"{meta['in_channels']}; re-export it")
    return model_info(meta), meta, OnnxForward(path, meta), "onnx", "fp32"


def _companion(path: Path, meta: dict[str, str]):
    """The onnxruntime session of the tiling companion that `meta` names beside `path`, or
    None (with a warning) when it is missing or was written by another export."""
    companion = path.with_name(meta["tiles"])
    why = "is missing"
    if companion.is_file():
        sess = session(companion, arena=False)  # it runs large images' overviews and tiles
        theirs = dict(sess.get_modelmeta().custom_metadata_map)
        if theirs == companion_metadata(meta, path.name):
            return sess
        why = "comes from another export"
    warnings.warn(f"{path}: its tiling companion {companion.name} {why}, so large images are "
                  "tiled with each tile's own statistics (seams are possible); re-export with "
                  "`translate export RUN --onnx`", ModelWarning, stacklevel=4)
    return None


class OnnxForward:
    """The batch function of an ONNX generator (float NCHW in [-1, 1] -> float NCHW). With a
    tiling companion it also has `norm_stats` (translate/infer/tiling.py's NormStats)."""

    def __init__(self, path: Path, meta: dict[str, str]) -> None:
        self.sess = session(path)
        self.name = self.sess.get_inputs()[0].name
        self.tiles = self.norm_stats = None
        self._given: np.ndarray | None = None  # statistics to normalise with (frozen)
        self._seen: list[np.ndarray] | None = None  # statistics met (measuring)
        if "tiles" in meta:
            self.tiles = _companion(path, meta)
            self.norm_stats = self if self.tiles else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().cpu().numpy()
        if self._given is None and self._seen is None:
            return torch.from_numpy(self.sess.run(None, {self.name: x})[0])
        given = self._given is not None
        stats = self._given if given else np.zeros(self.tiles.get_inputs()[1].shape, np.float32)
        y, seen = self.tiles.run(None, {"image": x, "norm_stats": stats,
                                        "norm_given": np.array([float(given)], np.float32)})
        if self._seen is not None:
            self._seen.append(seen[0])
        return torch.from_numpy(y)

    def measure(self, run: Callable[[], torch.Tensor]) -> tuple[np.ndarray, torch.Tensor]:
        """NormStats: the statistics of the first image run() translates, and its result."""
        self._seen = []
        try:
            y = run()
            return self._seen[0], y
        finally:
            self._seen = None

    @contextlib.contextmanager
    def frozen(self, stats: np.ndarray) -> Iterator[None]:
        """NormStats: within the block every image is normalised with `stats`."""
        self._given = stats
        try:
            yield
        finally:
            self._given = None
