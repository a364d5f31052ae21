"""Generators trained by the reference implementation (junyanz/pytorch-CycleGAN-and-pix2pix),
turned into translate's export format (`translate import`).

The reference saves a generator as a pickled state dict (`latest_net_G_A.pth`: A -> B,
`latest_net_G_B.pth`: B -> A, in a checkpoint folder with the discriminators and other
epochs' `<epoch>_net_*.pth`; its published pretrained models: `latest_net_G.pth`). Its two
image generators are the ones translate's `resnet` and `unet` build with their default options
(transposed convs, zero-padded strided convs), layer for layer:
- ResnetGenerator (`resnet_9blocks`, `resnet_6blocks`; CycleGAN's): `model.<i>` are the same
  layers in the same order; a residual block's `conv_block` is our `body`;
- UnetGenerator (`unet_256`, `unet_128`; pix2pix's): skip blocks nested one in the next
  (`model.model.1.model.3.model...`), which ours holds as two flat lists, `down` and `up`.
What is read from the file: widths and depth (the tensors' shapes), the norm (a norm layer
with weights: batch; a conv with a bias before a weightless one: instance; neither: none,
whose convs the reference builds without a bias: zeros here) and the residual blocks' dropout
(where their keys sit). `torch.load(weights_only=True)` reads the file: no code in it runs.
It computes as the reference's `test.py --eval` does: dropout off, batch norm on its running
statistics (without `--eval` the reference tests in training mode).
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from translate.errors import ModelError, UserError
from translate.export import net_metadata, write_generator
from translate.nets import build_net
from translate.onnx_export import export_onnx

SOURCE = "junyanz/pytorch-CycleGAN-and-pix2pix"
StateDict = dict[str, Tensor]
# Kept by norm layers that the net rebuilt may lack (InstanceNorm2d saved by torch < 0.4 kept
# running statistics, which the reference's own loader deletes) or that old files lack.
_NORM_STATE = ("running_mean", "running_var", "num_batches_tracked")


def read_state_dict(path: Path) -> tuple[StateDict, str]:
    """(the tensors of a state dict saved by torch.save, the file's sha256), from one read of
    the file and without running pickled code."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass a generator saved by the reference "
                        "implementation, e.g. checkpoints/NAME/latest_net_G_A.pth")
    data = path.read_bytes()
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        why = " ".join(str(e).split())[:160]
        raise ModelError(f"{path}: not a state dict that torch.load(weights_only=True) can read "
                         f"({why}); pass the .pth file of a generator's state dict, as the "
                         "reference's save_networks writes") from None
    if not isinstance(sd, dict) or not sd or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ModelError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors; "
                         "pass the .pth file of a generator's state dict")
    return {k.removeprefix("module."): v for k, v in sd.items()}, hashlib.sha256(data).hexdigest()


def _norm(sd: StateDict, conv: str, norm: str) -> str:
    """The reference's --norm, read from a conv and the norm layer after it."""
    if f"{norm}.weight" in sd:
        return "batch"
    return "instance" if f"{conv}.bias" in sd else "none"


def _resnet(sd: StateDict) -> tuple[dict, dict[str, str]]:
    """(our resnet's config, {reference layer: our layer}) of a ResnetGenerator."""
    top = sorted({int(m.group(1)) for k in sd if (m := re.match(r"model\.(\d+)\.weight$", k))})
    blocks = {m.group(1) for k in sd if (m := re.match(r"model\.(\d+)\.conv_block\.", k))}
    config = {"in_channels": sd["model.1.weight"].shape[1], "ngf": sd["model.1.weight"].shape[0],
              "out_channels": sd[f"model.{top[-1]}.weight"].shape[0], "n_blocks": len(blocks),
              "norm": _norm(sd, "model.1", "model.2"),
              # with dropout (no weights of its own) a block's second conv sits at 6, not 5
              "dropout": 0.5 if any(".conv_block.6.weight" in k and v.dim() == 4
                                    for k, v in sd.items()) else 0.0}
    layers = {k.rsplit(".", 1)[0] for k in sd}
    return config, {name: name.replace(".conv_block.", ".body.") for name in layers}


def _unet(sd: StateDict) -> tuple[dict, dict[str, str]]:
    """(our unet's config, {reference layer: our layer}) of a UnetGenerator: level 0 is the
    outermost skip block (`model.model.`), each next one its submodule."""
    def inner(prefix: str, level: int) -> str:  # the submodule sits at 1 outermost, else at 3
        return f"{prefix}{1 if level == 0 else 3}.model."

    prefixes = ["model.model."]
    while any(k.startswith(inner(prefixes[-1], len(prefixes) - 1)) for k in sd):
        prefixes.append(inner(prefixes[-1], len(prefixes) - 1))
    n = len(prefixes)
    names = {prefixes[0] + "0": "down.0", prefixes[0] + "3": "up.0.1"}
    for i, p in enumerate(prefixes[1:], start=1):
        if i == n - 1:  # innermost: relu, down conv, relu, up conv, norm
            names.update({p + "1": f"down.{i}.1", p + "3": f"up.{i}.1", p + "4": f"up.{i}.2"})
        else:  # relu, down conv, norm, submodule, relu, up conv, norm (, dropout)
            names.update({p + "1": f"down.{i}.1", p + "2": f"down.{i}.2", p + "5": f"up.{i}.1",
                          p + "6": f"up.{i}.2"})
    conv, norm = ((prefixes[1] + "1", prefixes[1] + "2") if n > 2
                  else (prefixes[1] + "3", prefixes[1] + "4"))
    first = sd[prefixes[0] + "0.weight"]
    config = {"in_channels": first.shape[1], "ngf": first.shape[0], "num_downs": n,
              # a transposed conv's weight is (in, out, k, k)
              "out_channels": sd[prefixes[0] + "3.weight"].shape[1], "norm": _norm(sd, conv, norm)}
    return config, names


def _identify(path: Path, sd: StateDict) -> tuple[str, dict, dict[str, str]]:
    """(our net's kind, its config, {reference layer: our layer}) of the file's state dict."""
    if any(k.endswith(".filt") for k in sd):
        raise ModelError(f"{path}: a generator with anti-aliased sampling (CUT's reference: "
                         "`filt` buffers), which translate does not rebuild; train it with "
                         "`translate train recipes/cut_horse2zebra.toml` instead")
    if {"model.model.0.weight", "model.model.3.weight"} <= sd.keys() and any(
            k.startswith("model.model.1.model.") for k in sd):
        return "unet", *_unet(sd)
    first = sd.get("model.1.weight")
    if first is not None and first.dim() == 4 and first.shape[-1] == 7:
        return "resnet", *_resnet(sd)
    raise ModelError(f"{path}: not a generator of {SOURCE} (neither its ResnetGenerator's "
                     "model.1 7x7 conv nor its UnetGenerator's model.model.0 conv); pass a "
                     "latest_net_G*.pth file")


def _rename(path: Path, sd: StateDict, names: dict[str, str], net: nn.Module) -> StateDict:
    """The file's tensors under `net`'s names, with zero biases where the reference builds its
    convs without one (norm "none") and without norm statistics that one side lacks; anything
    else that differs is an error."""
    ours = net.state_dict()
    out = {}
    for key, value in sd.items():
        layer, leaf = key.rsplit(".", 1)
        mine = f"{names.get(layer, layer)}.{leaf}"
        if mine in ours or leaf not in _NORM_STATE:
            out[mine] = value
    for key, value in ours.items():
        zero_bias = key.endswith(".bias") and net.config["norm"] == "none"
        if key not in out and (zero_bias or key.endswith(".num_batches_tracked")):
            out[key] = torch.zeros_like(value)
    extra, missing = sorted(set(out) - set(ours)), sorted(set(ours) - set(out))
    wrong = [k for k in set(out) & set(ours) if out[k].shape != ours[k].shape]
    if extra or missing or wrong:
        what = "; ".join(f"{label} {', '.join(keys[:3])}" for label, keys in
                         (("unexpected", extra), ("missing", missing), ("other shape", wrong))
                         if keys)
        raise ModelError(f"{path}: does not fit the reference's {net.kind} generator it looks "
                         f"like ({what}); pass a generator saved by {SOURCE}")
    return out


def _domains(path: Path) -> tuple[str, str]:
    """latest_net_G_B.pth translates B to A; G_A and the pretrained models' G, A to B."""
    return ("b", "a") if re.search(r"(^|_)G_B$", path.stem) else ("a", "b")


def _convert(path: Path) -> tuple[nn.Module, dict[str, str], str]:
    """(the generator with the file's weights, its export metadata, a line describing it)."""
    sd, sha256 = read_state_dict(path)
    kind, config, names = _identify(path, sd)
    net = build_net(kind, **config)
    net.load_state_dict(_rename(path, sd, names, net))
    net.eval()
    src, dst = _domains(path)
    meta = {**net_metadata(net, f"G_{src}{dst}"), "method": "reference",
            "source": f"{SOURCE}: {path.name} (sha256 {sha256})", "from_domain": src,
            "to_domain": dst}
    shape = ", ".join(f"{k} {v}" for k, v in config.items())
    return net, meta, f"{kind}: {shape}; {src.upper()} -> {dst.upper()}"


def run_files(folder: Path, epoch: str) -> list[Path]:
    """The generators of a reference checkpoint folder at `epoch` ("latest" or a number): its
    two CycleGAN generators, or the one of a pretrained model (`latest_net_G.pth`)."""
    found = [folder / f"{epoch}_net_{g}.pth" for g in ("G_A", "G_B")]
    found = [p for p in found if p.is_file()] or [
        p for p in [folder / f"{epoch}_net_G.pth"] if p.is_file()]
    if not found:
        have = sorted(p.name for p in folder.glob("*_net_G*.pth"))[:6]
        raise UserError(f"{folder}: no {epoch}_net_G_A.pth, {epoch}_net_G_B.pth or "
                        f"{epoch}_net_G.pth in it (generators found: {', '.join(have) or 'none'})"
                        "; pass the reference's checkpoints/NAME folder or one .pth file, and "
                        "--epoch N for another epoch's files")
    return found


def import_reference(path: str | Path, out: str | Path, onnx: bool = False,
                     epoch: str = "latest") -> list[str]:
    """Write exported generators (as `translate export` writes; with `onnx` also .onnx) from the
    reference implementation's generator file `path` into `out` (.safetensors), or from its
    checkpoint folder (`epoch`'s generators) into the folder `out` (G_ab.safetensors,
    G_ba.safetensors); returns printable lines. Every file is read before any is written."""
    path, out = Path(path), Path(out)
    if path.is_dir():
        if out.suffix == ".safetensors":
            raise UserError(f"{out}: a checkpoint folder imports into a folder (G_ab.safetensors, "
                            "G_ba.safetensors there); pass a folder, e.g. export/")
        converted = [_convert(p) for p in run_files(path, str(epoch))]
        targets = [out / f"{meta['name']}.safetensors" for _, meta, _ in converted]
    else:
        if out.suffix != ".safetensors":
            raise UserError(f"{out}: the output is a .safetensors file; name it e.g. "
                            f"{out.with_suffix('.safetensors').name}")
        converted, targets = [_convert(path)], [out]
    lines = []
    for (net, meta, what), target in zip(converted, targets):
        target.parent.mkdir(parents=True, exist_ok=True)
        lines.append(f"wrote {target} ({write_generator(net, meta, target)}; {what})")
        if onnx:
            lines.extend(export_onnx(net, meta, target.with_suffix(".onnx")))
    return lines
