"""Export trained generators (the loading side is translate/infer/load.py).

An exported generator is `<name>.safetensors` whose metadata (strings) carries everything needed
to rebuild and use the net: architecture kind + config, I/O conventions, domains, provenance.
`--onnx` also writes `<name>.onnx` (dynamic batch, height, width) with the same metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import nn

from translate import recipe
from translate.core import best as best_mod
from translate.core import checkpoint
from translate.errors import UserError
from translate.files import atomic_path
from translate.infer.load import FORMAT, load_generator, model_info, read_metadata  # noqa: F401
from translate.methods import METHODS
from translate.onnx_export import export_onnx
from translate.version import __version__


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
    cfg = recipe.load_json(run_dir / "config.json")
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


def net_metadata(net: nn.Module, name: str) -> dict[str, str]:
    """What every exported generator's metadata says of its net (translate/infer/load.py
    rebuilds it from this): the format, the architecture, the value convention and, for an
    image-to-image net, its channels and size multiple."""
    meta = {"format": FORMAT, "name": name, "kind": net.kind,
            "config": json.dumps(net.config, sort_keys=True), "value_range": "[-1, 1]",
            "layout": "NCHW RGB (or 1 channel)", "translate_version": __version__}
    if hasattr(net, "size_multiple"):
        meta.update(in_channels=str(net.in_channels), out_channels=str(net.out_channels),
                    size_multiple=str(net.size_multiple), min_size=str(net.min_size))
    return meta


def metadata(net: nn.Module, cfg: Any, name: str, info: dict[str, Any], step: int, ema: bool
             ) -> dict[str, str]:
    meta = {**net_metadata(net, name), "method": cfg.method, "recipe": cfg.name,
            "step": str(step), "ema": str(ema).lower()}
    if hasattr(net, "size_multiple"):
        meta.update(from_domain=info.get("from", ""), to_domain=info.get("to", ""))
    else:
        meta.update(latent="true", z_dim=str(getattr(net, "z_dim", "")))
        meta.update(info.get("metadata", {}))  # e.g. cgan's class names, infogan's codes
    return meta


def write_generator(net: nn.Module, meta: dict[str, str], path: Path) -> str:
    """Write `net`'s weights and `meta` to `path` atomically; returns its size for the report
    line ("0.302 M parameters")."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp), meta)
        checkpoint.apply_umask([tmp])  # safetensors creates 0600 files
    return f"{sum(p.numel() for p in net.parameters()) / 1e6:.3f} M parameters"


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
        lines.append(f"wrote {path} ({write_generator(net, meta, path)}, {which})")
        if onnx:
            lines.extend(export_onnx(net, meta, out_dir / f"{name}.onnx"))
    return lines


