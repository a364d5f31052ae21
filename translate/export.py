"""Export trained generators and load them back, with no training setup and no pickle.

An exported generator is `<name>.safetensors` whose metadata (strings) carries everything needed
to rebuild and use the net: architecture kind + config, I/O conventions, domains, provenance.
`--onnx` also writes `<name>.onnx` (dynamic batch, height, width) with the same metadata.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from translate import __version__
from translate import config as config_mod
from translate.compiled import compile_forward
from translate.core import best as best_mod
from translate.core import checkpoint
from translate.core.precision import inference_precision
from translate.errors import ModelError, UserError
from translate.images import match_channels
from translate.infer import ModelInfo, translate_tensor
from translate.methods import METHODS
from translate.nets import NETS, build_net

FORMAT = "translate-generator/1"


def _strip(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key


def split_checkpoint(path: Path, step: int | None) -> tuple[Path, int | None]:
    """(run folder, step) for `RUN/checkpoints/step_N` (which must agree with `step` when given);
    any other path is returned as is."""
    match = checkpoint.STEP_DIR.match(path.name)
    if not (match and path.parent.name == "checkpoints" and (path / "state.json").is_file()):
        return path, step
    found = int(match.group(1))
    if step is not None and step != found:
        raise UserError(f"--step {step}: {path} is the checkpoint of step {found}; drop --step "
                        "or pass the run folder")
    return path.parent.parent, found


def run_generators(run_dir: Path, step: int | None = None, ema: bool = False,
                   best: bool = False) -> tuple[Any, dict[str, nn.Module], Path]:
    """(config, {name: generator with trained weights}, checkpoint folder) of a run folder, or
    of one checkpoint folder `RUN/checkpoints/step_N`; `best`: the run's checkpoints/best."""
    run_dir, step = split_checkpoint(Path(run_dir), step)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir}: not a run folder (no config.json); pass runs/<name> or "
                        "runs/<name>/checkpoints/step_N")
    if best and step is not None:
        raise UserError("--best and --step name two checkpoints; pass one of them")
    cfg = config_mod.load_json(run_dir / "config.json")
    found = [best_mod.require(run_dir)] if best else checkpoint.list_checkpoints(run_dir)
    if step is not None:
        found = [p for p in found if p == checkpoint.step_dir(run_dir, step)]
    if not found:
        what = f"no checkpoint for step {step}" if step is not None else "no complete checkpoint"
        raise UserError(f"{run_dir}: {what}; train first or pick a step from "
                        f"{run_dir / 'checkpoints'}")
    ckpt = found[-1]
    method = METHODS[cfg.method].build(cfg)
    names = list(method.nets)
    nets = {}
    for name in method.generators:
        net = method.nets[name]
        if ema:
            path = ckpt / "ema.safetensors"
            if not path.is_file():
                raise UserError(f"{ckpt}: the run has no EMA weights; drop --ema or train with "
                                "train.ema > 0")
            tensors = {k[len(name) + 1:]: v for k, v in load_file(str(path)).items()
                       if k.startswith(name + "/")}
        else:
            i = names.index(name)
            path = ckpt / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            tensors = {_strip(k): v for k, v in load_file(str(path)).items()}
        net.load_state_dict(tensors)
        nets[name] = net.eval()
    return cfg, nets, ckpt


def metadata(net: nn.Module, cfg: Any, name: str, info: dict[str, Any], step: int, ema: bool
             ) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "name": name,
        "kind": net.kind,
        "config": json.dumps(net.config, sort_keys=True),
        "value_range": "[-1, 1]",
        "layout": "NCHW RGB (or 1 channel)",
        "method": cfg.method,
        "recipe": cfg.name,
        "step": str(step),
        "ema": str(ema).lower(),
        "translate_version": __version__,
    }
    if hasattr(net, "size_multiple"):
        meta.update(in_channels=str(net.in_channels), out_channels=str(net.out_channels),
                    size_multiple=str(net.size_multiple), min_size=str(net.min_size),
                    from_domain=info.get("from", ""), to_domain=info.get("to", ""))
    else:
        meta.update(latent="true", z_dim=str(getattr(net, "z_dim", "")))
        meta.update(info.get("metadata", {}))  # e.g. cgan's class names, infogan's codes
    return meta


def export_run(run: str | Path, step: int | None = None, ema: bool = False,
               out: str | Path | None = None, onnx: bool = False, best: bool = False
               ) -> list[str]:
    """Write each generator of a run; returns printable lines describing what was written."""
    cfg, nets, ckpt = run_generators(Path(run), step, ema, best)
    run_dir = ckpt.parents[2] if best else ckpt.parents[1]  # also for a checkpoint folder
    out_dir = Path(out) if out else run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    state = json.loads((ckpt / "state.json").read_text())
    method = METHODS[cfg.method].build(cfg)
    record = json.loads((ckpt / best_mod.RECORD).read_text()) if best else None
    which = f"step {state['step']}" + (
        f", the best by {record['metric']} = {record['value']:.4g}" if record else "")
    lines = []
    for name, net in nets.items():
        meta = metadata(net, cfg, name, method.generators[name], state["step"], ema)
        if record:
            meta["checkpoint"] = f"best by {record['metric']} ({record['value']:.6g})"
        path = out_dir / f"{name}.safetensors"
        tmp = path.with_name("." + path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), meta)
        checkpoint.apply_umask([tmp])  # safetensors creates 0600 files
        tmp.replace(path)
        n = sum(p.numel() for p in net.parameters())
        lines.append(f"wrote {path} ({n / 1e6:.3f} M parameters, {which})")
        if onnx:
            from translate.onnx_export import export_onnx

            lines.append(export_onnx(net, meta, out_dir / f"{name}.onnx"))
    return lines


# ---------------------------------------------------------------------------------- loading


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
        # Lets tiling find the norm layers whose statistics it freezes (translate/tiling.py).
        return getattr(self.forward, "net", None)

    def float_forward(self) -> Any:
        """The batch function for float input: fp32 unless bf16 was asked for."""
        if self.precision == "bf16" and self.requested != "bf16":
            return dataclasses.replace(self.forward, precision="fp32")
        return self.forward

    def __call__(self, images: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        if isinstance(images, torch.Tensor):
            return translate_tensor(self.float_forward(), self.info, images.float())
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
        y = translate_tensor(fn, self.info, x).clamp(-1, 1).add(1).permute(0, 2, 3, 1)
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
    """The torch backend's batch function: channels_last, optional bf16 autocast."""

    net: nn.Module
    precision: str
    device: torch.device

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return self.net(x).float()
        return self.net(x)


def model_info(meta: dict[str, str]) -> ModelInfo:
    return ModelInfo(int(meta["in_channels"]), int(meta["out_channels"]),
                     int(meta["size_multiple"]), int(meta.get("min_size", "1")))


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
                   compile: bool | Collection[tuple[int, int]] = False) -> Generator:
    """Load an exported generator (.safetensors or .onnx) for inference. backend "auto" follows
    the file suffix; an explicit backend that does not match the file is a UserError.
    `compile` (torch backend): run through torch.compile with frozen weights, one warm-up per
    input size (translate/compiled.py); True compiles the first sizes met, a collection of
    (h, w) sizes (padded to the size multiple) only those."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: model file not found; export one with `translate export RUN`")
    if _pick_backend(path, backend, precision) == "onnx":
        if compile is not False:
            raise UserError(f"{path}: --compile is for the torch backend (onnxruntime runs the "
                            "ONNX graph as it is) — drop --compile or pass the .safetensors export")
        from translate.onnx_export import load_onnx

        return load_onnx(path, Generator)
    net, meta = load_torch_generator(path)
    if meta.get("latent") == "true":
        raise UserError(f"{path}: a latent generator (no input image); use `translate sample`")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    resolved = inference_precision(precision, dev)
    net = net.to(dev).to(memory_format=torch.channels_last)
    forward = TorchForward(net, resolved, dev)
    if compile is not False:
        forward = compile_forward(forward, model_info(meta), None if compile is True else compile)
    return Generator(model_info(meta), meta, forward, "torch", resolved, precision)
