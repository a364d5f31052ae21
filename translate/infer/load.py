"""Load an exported generator (.safetensors or .onnx) for inference, with no training setup
and no pickle: the net is rebuilt from the architecture its metadata names."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from translate.errors import ModelError, UserError
from translate.images import match_channels
from translate.infer.compiled import compile_forward
from translate.infer.lanes import LanePool, cpu_lanes
from translate.infer.nnpack import available as nnpack_available
from translate.infer.nnpack import eligible as nnpack_eligible
from translate.infer.nnpack import pays as nnpack_pays
from translate.infer.nnpack import use_nnpack
from translate.infer.onnx import load_onnx, model_info
from translate.infer.tiling import DEFAULT_OVERLAP, ModelInfo, Tile, translate_tensor
from translate.nets import NETS, build_net
from translate.precision import cpu_has_amx, inference_precision

FORMAT = "translate-generator/1"  # the metadata's "format": what export writes, what this reads


def read_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e}); re-export it with "
                         "`translate export RUN`") from None
    if meta.get("format") != FORMAT:
        raise ModelError(f"{path}: not a generator exported by translate (no "
                         f"'{FORMAT}' metadata); export one with `translate export RUN`")
    return meta


def build_from_metadata(path: Path, meta: dict[str, str]) -> nn.Module:
    kind = meta.get("kind", "")
    if kind not in NETS:
        raise ModelError(f"{path}: unknown generator kind {kind!r}; this translate version "
                         f"knows {', '.join(sorted(NETS))}")
    try:
        return build_net(kind, **json.loads(meta["config"]))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelError(f"{path}: broken architecture config in metadata ({e})") from None


def load_torch_generator(path: Path) -> tuple[nn.Module, dict[str, str]]:
    meta = read_metadata(path)
    net = build_from_metadata(path, meta)
    try:
        tensors = load_file(str(path))
        net.load_state_dict(tensors)
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path}: truncated or corrupt weights ({e}); re-export it") from None
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit the {meta['kind']} architecture in its "
                         f"metadata ({str(e).splitlines()[0]}); re-export it") from None
    return net.eval(), meta


@dataclass
class Generator:
    """A loaded generator. `gen(images)` takes uint8 HxWxC / NxHxWxC arrays (returns uint8),
    float HxWxC / NxHxWxC arrays in [0, 1] (returns float32 in [0, 1]) or float NCHW tensors in
    [-1, 1] (returns float tensors); any size is padded to the size multiple and cropped back.
    Arrays may be gray, gray+alpha, RGB or RGBA: colour is matched to the model's channels and
    alpha carried through unchanged, as `translate apply` does. `precision` is what uint8
    images compute in; float input computes in fp32 unless bf16 was asked for by name (bf16
    keeps 8 mantissa bits: float output would come out in coarse steps).
    `gen.forward` is the raw batch function; `gen.net` the torch module (None for ONNX)."""

    info: ModelInfo
    metadata: dict[str, str]
    forward: Any
    backend: str
    precision: str
    requested: str = "auto"  # the precision asked for at load_generator

    @property
    def net(self) -> nn.Module | None:
        # Lets tiling find the norm layers whose statistics it freezes (translate/infer/tiling.py).
        return getattr(self.forward, "net", None)

    @property
    def norm_stats(self) -> Any:
        # The ONNX backend's way to the same (translate/infer/onnx.py); None elsewhere.
        return getattr(self.forward, "norm_stats", None)

    def float_forward(self) -> Any:
        """The batch function for float input: fp32 unless bf16 was asked for."""
        if self.precision == "bf16" and self.requested != "bf16":
            # A compiled forward holds bf16 constants: float input runs its eager forward.
            return dataclasses.replace(getattr(self.forward, "eager", self.forward),
                                       precision="fp32")
        return self.forward

    def __call__(self, images: np.ndarray | torch.Tensor, *, tile: Tile = None,
                 overlap: int = DEFAULT_OVERLAP) -> np.ndarray | torch.Tensor:
        """`tile`: as `translate apply --tile` (None or 0: whole images, the default here;
        "auto": tiles of 512 px above 1024x1024; N: tiles of at most N px), `overlap` too."""
        run = functools.partial(translate_tensor, tile=tile, overlap=overlap)
        if isinstance(images, torch.Tensor):
            return run(self.float_forward(), self.info, images.float())
        arr = np.asarray(images)
        floats = np.issubdtype(arr.dtype, np.floating)
        if not (arr.dtype == np.uint8 or floats) or arr.ndim not in (3, 4):
            raise UserError("load_generator: pass HxWxC or NxHxWxC arrays (uint8, or float in "
                            f"[0, 1]) or float NCHW tensors in [-1, 1], not a {arr.dtype} "
                            f"array of shape {arr.shape}")
        batch = arr[None] if arr.ndim == 3 else arr
        colour, alpha = _split_channels(batch, self.info.in_channels)
        # A copy: arrays such as np.asarray(PIL image) are read-only, which torch warns about.
        x = torch.from_numpy(np.array(colour)).permute(0, 3, 1, 2).float()
        x = x / (0.5 if floats else 127.5) - 1.0
        fn = self.float_forward() if floats else self.forward
        y = run(fn, self.info, x).clamp(-1, 1).add(1).permute(0, 2, 3, 1)
        out = y.mul(0.5).numpy() if floats else y.mul(127.5).round().to(torch.uint8).numpy()
        if alpha is not None:
            out = np.concatenate([out, alpha.astype(out.dtype)], axis=-1)
        return out[0] if arr.ndim == 3 else out


def _split_channels(batch: np.ndarray, channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(colour matched to the model's `channels`, alpha NxHxWx1 or None) of an NxHxWxC array
    holding gray (1), gray+alpha (2), RGB (3) or RGBA (4)."""
    c = batch.shape[-1]
    if c not in (1, 2, 3, 4):
        raise UserError(f"load_generator: the last axis must hold 1 (gray), 2 (gray+alpha), 3 "
                        f"(RGB) or 4 (RGBA) channels, got {c}; pass HxWxC or NxHxWxC arrays, "
                        "channels last")
    alpha = batch[..., c - 1:] if c in (2, 4) else None
    colour = batch[..., :c - 1] if alpha is not None else batch
    return match_channels(colour, channels), alpha


@dataclass(frozen=True)
class TorchForward:
    """The torch backend's batch function: channels_last, optional bf16 autocast. `lanes`:
    translate_folder runs whole images side by side in them (translate/infer/lanes.py), and
    a batch runs there one image per call."""

    net: nn.Module
    precision: str
    device: torch.device
    lanes: LanePool | None = field(default=None, compare=False)
    # NCHW for nets on NNPACK (translate/infer/nnpack.py), which takes no other layout
    memory_format: torch.memory_format = torch.channels_last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.lanes is not None and len(x) > 1:
            # A batch (images in Python, the tiles of an image) one image per call, side by
            # side in the lanes (infer/lanes.py): ResNet-9, 256 px, fp32, batches of 8 on the
            # 2-core AVX2 EPYC: 1.08 img/s as one call on both threads, 3.06 in the lanes (on
            # NNPACK, which a one-thread caller gets).
            return torch.cat(self.lanes.run([functools.partial(self._run, xi)
                                             for xi in x.split(1)]))
        return self._run(x)

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=self.memory_format)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.net(x).float()
        return self.net(x)


def _pick_backend(path: Path, backend: str, precision: str) -> str:
    """The backend for a model file: chosen by its suffix, or checked against it."""
    is_onnx = path.suffix.lower() == ".onnx"
    if backend == "auto":
        backend = "onnx" if is_onnx else "torch"
    elif backend == "torch" and is_onnx:
        raise UserError(f"{path}: an ONNX file runs on onnxruntime — use --backend onnx (or "
                        "omit --backend), or pass the .safetensors export for --backend torch")
    elif backend == "onnx" and not is_onnx:
        raise UserError(f"{path}: --backend onnx needs the .onnx export — pass "
                        f"{path.with_suffix('.onnx').name} (made by `translate export RUN "
                        "--onnx`) or omit --backend to run this file with torch")
    elif backend not in ("torch", "onnx"):
        raise UserError(f"backend {backend!r}: unknown — use auto, torch or onnx")
    if backend == "onnx" and precision == "bf16":
        raise UserError(f"{path}: --precision bf16 is for the torch backend (onnxruntime runs "
                        "fp32) — drop --precision or pass the .safetensors export")
    return backend


def load_generator(path: str | Path, backend: str = "auto", precision: str = "auto",
                   device: str | None = None,
                   compile: bool | Collection[tuple[int, int]] = False,
                   nnpack: bool | None = None) -> Generator:
    """Load an exported generator (.safetensors or .onnx) for inference. backend "auto" follows
    the file suffix; an explicit backend that does not match the file is a UserError.
    `compile` (torch backend): run through torch.compile with frozen weights, one warm-up per
    input size (translate/infer/compiled.py); True compiles the first sizes met, a collection of
    (h, w) sizes (padded to the size multiple) only those. `nnpack` (torch backend, fp32 on a
    CPU): run the large convolutions on NNPACK (translate/infer/nnpack.py); None: where that was
    measured to pay (CPUs without AMX)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found; export one with `translate export RUN`")
    if _pick_backend(path, backend, precision) == "onnx":
        if compile is not False or nnpack:
            flag = "--compile" if compile is not False else "--nnpack"
            raise UserError(f"{path}: {flag} is for the torch backend (onnxruntime runs the "
                            f"ONNX graph as it is) — drop {flag} or pass the .safetensors export")
        return Generator(*load_onnx(path))
    net, meta = load_torch_generator(path)
    if meta.get("latent") == "true":
        raise UserError(f"{path}: a latent generator (no input image); use `translate sample`")
    dev = _device(device)
    resolved = inference_precision(precision, dev)
    forward = _torch_forward(net, dev, resolved, _nnpack_choice(path, nnpack, dev, resolved))
    if compile is not False:
        forward = compile_forward(forward, model_info(meta), None if compile is True else compile)
    return Generator(model_info(meta), meta, forward, "torch", resolved, precision)


def _torch_forward(net: nn.Module, device: torch.device, precision: str,
                   nnpack: bool) -> TorchForward:
    swapped = use_nnpack(net) if nnpack else 0
    layout = _layout(device, precision, swapped > 0)
    net = net.to(device).to(memory_format=layout)
    return TorchForward(net, precision, device, cpu_lanes(device), layout)


def _layout(device: torch.device, precision: str, on_nnpack: bool) -> torch.memory_format:
    """NCHW for nets on NNPACK, which takes no other layout, and for bf16 on a CPU without AMX
    (AVX-512 BF16 alone, as on a Zen 4 EPYC, where oneDNN's bf16 convolutions reorder less
    from NCHW: the eager ResNet-9 end to end there, alternated, 256 px 3.10-3.23 -> 3.28-3.32
    img/s, 1024 px 10.4-10.6 -> 8.6-9.2 s an image; compiled graphs pick their own layouts and
    ran the same either way). channels_last elsewhere."""
    if on_nnpack or (device.type, precision) == ("cpu", "bf16") and not cpu_has_amx():
        return torch.contiguous_format
    return torch.channels_last


def cpu_forward(net: nn.Module) -> TorchForward:
    """A generator in memory run as load_generator runs an export on a CPU in fp32: NNPACK
    where that pays, batches in the lanes (`translate eval` of a run). Changes `net` in place
    (its layout, NNPACK's layers: same parameters)."""
    cpu = torch.device("cpu")
    return _torch_forward(net, cpu, "fp32", nnpack_pays(cpu, "fp32"))


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def runs_nnpack(path: str | Path, precision: str = "auto", device: str | None = None,
                nnpack: bool | None = None, meta: dict[str, str] | None = None) -> bool:
    """Whether load_generator(path, precision=, device=, nnpack=) puts some of the net's
    convolutions on NNPACK (`--compile auto` weighs a compile against that eager speed). The
    same one-line errors as load_generator for an `nnpack` that cannot run. `meta`: the file's
    metadata where the caller has read it already."""
    path, dev = Path(path), _device(device)
    if not _nnpack_choice(path, nnpack, dev, inference_precision(precision, dev)):
        return False
    with torch.device("meta"):  # the architecture only: no weights read, no memory
        net = build_from_metadata(path, meta if meta is not None else read_metadata(path))
    return any(nnpack_eligible(m) for m in net.modules())


def _nnpack_choice(path: Path, asked: bool | None, device: torch.device, precision: str) -> bool:
    """Whether the net's large convolutions run on NNPACK: `asked`, or by default where it pays."""
    if asked is None:
        return nnpack_pays(device, precision)
    if asked and not (device.type == "cpu" and precision == "fp32"):
        raise UserError(f"{path}: --nnpack on: it runs fp32 on a CPU, not {precision} on "
                        f"{device.type} — drop --nnpack on, or add --precision fp32")
    if asked and not nnpack_available():
        raise UserError(f"{path}: --nnpack on: this torch has no NNPACK, or it does not run on "
                        "this CPU — drop --nnpack on")
    return asked
