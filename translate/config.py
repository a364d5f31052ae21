"""Run configuration: frozen dataclasses, TOML recipes, `--set section.key=value` overrides.

A recipe is a TOML file with top-level keys (`name`, `method`, `seed`, `run_dir`) and the tables
`[model]` (the method's own dataclass), `[data]` and `[train]`. Unknown keys and wrong types are
errors that name the key. The resolved config is saved as `RUN/config.json`, where RUN is
`run_dir` or, by default, `runs/<name>-<data folder>` (see `RunConfig.out_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from translate import files
from translate.errors import ConfigError

PRECISIONS = ("auto", "no", "bf16", "fp16")  # train.mixed_precision's values (and the flags')
NNPACK_CHOICES = ("auto", "on", "off")  # train.nnpack's values
DEMO_RECIPES = {  # `translate demo --method NAME`: the recipe it trains (translate/demo.py)
    "cyclegan": "cyclegan_demo.toml",
    "cut": "cut_demo.toml",
    "fastcut": "fastcut_demo.toml",
}


def choice(default: Any, *choices: Any) -> Any:
    """A field whose value must be one of `choices` (checked by `validate`)."""
    return field(default=default, metadata={"choices": choices})


def positive(default: Any) -> Any:
    """A numeric field that must be > 0."""
    return field(default=default, metadata={"min": 0, "strict": True})


def non_negative(default: Any) -> Any:
    """A numeric field that must be >= 0."""
    return field(default=default, metadata={"min": 0, "strict": False})


def fraction(default: float) -> Any:
    """A number in [0, 1)."""
    return field(default=default, metadata={"min": 0, "strict": False, "below": 1})


def probability_target(default: float) -> Any:
    """A number in (0, 1], e.g. a label-smoothing target."""
    return field(default=default, metadata={"min": 0, "strict": True, "at_most": 1})


def betas(default: tuple[float, float]) -> Any:
    """Adam betas, each in [0, 1)."""
    return field(default=default, metadata={"unit_interval": True})


@dataclass(frozen=True)
class DataConfig:
    kind: str = choice("unpaired", "unpaired", "folder", "toy")  # unpaired: ROOT/trainA+trainB; folder: one image folder; toy: 2-D mixture
    root: str = ""                        # dataset root (unpaired) or image folder; "" = the demo data
    preprocess: str = choice("resize_and_crop", "resize_and_crop", "scale_width_and_crop", "crop", "resize", "none")
    load_size: int = positive(286)        # pixels: images are resized to this before cropping
    crop_size: int = positive(256)        # pixels: training crop (the nets' input size)
    flip: bool = True                     # random horizontal flip
    channels_a: int = choice(3, 1, 3)     # channels of domain A (or of the single folder)
    channels_b: int = choice(3, 1, 3)     # channels of domain B
    serial_b: bool = False                # draw B in order instead of at random (reference: serial_batches)
    toy: str = choice("ring", "ring", "grid")  # 2-D mixture for kind "toy"
    toy_epoch: int = positive(25_600)     # samples per toy "epoch" (only sets the epoch length)
    num_workers: int = non_negative(0)    # DataLoader worker processes per training process
    max_pixels: int = positive(128_000_000)  # refuse larger images (decompression bombs)
    strict: bool = False                  # fail on the first unreadable image (train --strict)
    max_items: int = non_negative(0)      # training images kept per domain, spread evenly (0 = all)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = positive(1000)           # total generator steps (ignored when epochs > 0)
    epochs: int = non_negative(0)         # constant-LR epochs; > 0 overrides steps (CycleGAN style)
    epochs_decay: int = non_negative(0)   # epochs of linear LR decay to zero after `epochs`
    batch_size: int = positive(1)         # images per process per step
    grad_accum: int = positive(1)         # micro-batches accumulated per optimizer step
    optimizer: str = choice("adam", "adam", "rmsprop")
    lr_g: float = positive(2e-4)          # generator learning rate
    lr_d: float = positive(2e-4)          # discriminator learning rate (TTUR: may differ from lr_g)
    betas_g: tuple[float, float] = betas((0.5, 0.999))  # Adam betas of the generator phase
    betas_d: tuple[float, float] = betas((0.5, 0.999))  # Adam betas of the discriminator phase
    lr_schedule: str = choice("constant", "constant", "linear")  # linear: decay to 0 from decay_start
    decay_start: int = non_negative(0)    # step where linear decay starts (0 = half of the steps)
    ema: float = fraction(0.0)            # EMA decay of generator weights per step (0 = off), e.g. 0.999
    grad_clip: float = non_negative(0.0)  # max gradient norm per phase (0 = off)
    mixed_precision: str = choice("auto", *PRECISIONS)  # autocast dtype; auto: bf16 where the hardware has it natively, else fp32
    channels_last: bool = False           # NHWC memory format for conv nets
    nnpack: str = choice("auto", *NNPACK_CHOICES)  # fp32 on a CPU: large convolutions on NNPACK (translate/nets/nnpack.py); auto: on CPUs without AMX
    sync_batchnorm: bool = False          # BatchNorm statistics over all processes (GPU only; DCGAN's BatchNorm nets)
    compile: bool | str = choice("auto", True, False, "auto")  # torch.compile the nets (a warm-up of minutes); auto: on where measured to pay (CycleGAN, bf16 on a CPU, >= 5,000 steps: translate.core.machine.compile_choice)
    log_every: int = positive(50)         # steps between log lines (loss values fetched only then)
    sample_every: int = positive(500)     # steps between sample grids
    save_every: int = positive(1000)      # steps between checkpoints
    keep_checkpoints: int = positive(3)   # newest checkpoints kept
    n_samples: int = positive(8)          # images (or rows) in a sample grid
    on_nan: str = choice("stop", "stop", "rollback")  # rollback: reload last checkpoint, halve LRs
    log_with: str = "none"                # trackers, comma-separated: tensorboard, wandb, mlflow (files under RUN/tracking)
    eval_every: int = non_negative(0)     # steps between scores during training (0 = off; translate.eval.periodic)
    eval_data: str = ""                   # held-out images for KID ("" = none; CycleGAN: ROOT/testB)
    eval_features: str = "small"          # KID features: "small" (random net, relative only) or Inception weights path
    keep_best: str = ""                   # score whose best checkpoint is kept in checkpoints/best, e.g. "eval/psnr" ("" = off)
    health: bool = True                   # health checks: health/* values and warnings (translate/eval/health.py)
    health_every: int = non_negative(0)   # steps between health checks (0 = sample_every, rounded up to a log step)
    health_patience: int = positive(3)    # checks in a row a condition must hold before its warning


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"                     # run name; the run folder defaults to runs/<name>-<data folder>
    method: str = "cyclegan"              # cyclegan | dcgan | wgan_gp | gan_toy ... (translate.methods)
    seed: int = 0                         # makes a CPU run repeatable
    run_dir: str = ""                     # "" = runs/<name>-<data folder> (runs/<name> for toy data)
    model: Any = None                     # the method's own config dataclass
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    @property
    def out_dir(self) -> Path:
        """The run folder. By default named after the recipe and the data folder, so that one
        recipe on two datasets, or two recipes on one, never share a folder; the data folder's
        name is left out when it is the recipe's own name (horse2zebra on datasets/horse2zebra)
        and for data without a folder (toy mixtures)."""
        if self.run_dir:
            return Path(self.run_dir)
        root = self.data.root if self.data.kind != "toy" else ""
        folder = Path(os.path.abspath(os.path.expanduser(root))).name if root else ""
        return Path("runs") / (self.name if folder in ("", self.name) else
                               f"{self.name}-{folder}")


# ----------------------------------------------------------------------------------------------
# Building and checking dataclasses from plain dicts.


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: a list of any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list, got {value!r}")
            return tuple(_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_check_type(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} has the wrong type")
    raise TypeError(f"unsupported config type {tp} for {key}")


def _check_field(key: str, value: Any, f: dataclasses.Field) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
    if "min" in f.metadata:
        low, strict = f.metadata["min"], f.metadata["strict"]
        if value < low or (strict and value == low):
            raise ConfigError(f"{key}: must be {'>' if strict else '>='} {low}, got {value!r}")
    if "below" in f.metadata and value >= f.metadata["below"]:
        raise ConfigError(f"{key}: must be < {f.metadata['below']}, got {value!r}")
    if "at_most" in f.metadata and value > f.metadata["at_most"]:
        raise ConfigError(f"{key}: must be <= {f.metadata['at_most']}, got {value!r}")
    if "unit_interval" in f.metadata and not all(0 <= v < 1 for v in value):
        raise ConfigError(f"{key}: each value must be in [0, 1), got {list(value)}")


def build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass `cls` from `values`, naming `prefix.key` in every error."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix}: expected a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}.{unknown[0]}: unknown key (valid: {', '.join(sorted(fields))})"
        )
    checked = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        checked[name] = _check_type(key, value, hints[name])
        _check_field(key, checked[name], fields[name])
    return cls(**checked)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------------------------
# Recipes, overrides, cross-field checks.


def _parse_value(text: str) -> Any:
    """A --set value is read as TOML (numbers, booleans, lists, quoted strings), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=100")
        parts = key.strip().split(".")
        if len(parts) == 1:
            raw[parts[0]] = _parse_value(text)
        elif len(parts) == 2:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                raise ConfigError(f"--set {key}: {parts[0]} is not a section")
            section[parts[1]] = _parse_value(text)
        else:
            raise ConfigError(f"--set {key}: use section.key, e.g. train.steps")
    return raw


# What an interval longer than a run given by --steps becomes: a share of the run, so a short
# run still has a curve to plot (log) and a few grids to look at (samples). Checkpoints and
# scores need nothing: the last step always saves one and scores.
FIT_INTERVALS = {"log_every": 10, "sample_every": 4}  # key -> how many per run


def fit_intervals(cfg: RunConfig, keep: set[str]) -> tuple[RunConfig, str]:
    """The config with train.log_every / sample_every that exceed train.steps (and are not in
    `keep`, the keys the user set) lowered to steps // FIT_INTERVALS[key], and a note saying
    so ("" when nothing changed). For runs counted in steps (epochs = 0)."""
    t = cfg.train
    if t.epochs > 0:
        return cfg, ""
    fitted = {key: max(1, t.steps // per_run) for key, per_run in FIT_INTERVALS.items()
              if key not in keep and getattr(t, key) > t.steps}
    if not fitted:
        return cfg, ""
    note = ", ".join(f"train.{k} {getattr(t, k)} -> {v}" for k, v in fitted.items())
    message = (f"note: a run of {t.steps} steps is shorter than the recipe's intervals: {note} "
               "(set them with --log-every / --sample-every)")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, **fitted)), message


def save(cfg: RunConfig, path: Path) -> None:
    files.write_text(path, json.dumps(to_dict(cfg), indent=2) + "\n")  # never a truncated one


# Keys holding paths: the same folder spelt another way (relative, absolute, a trailing slash)
# is no difference.
_PATH_KEYS = ("data.root", "train.eval_data")


def flat(cfg: RunConfig) -> dict[str, Any]:
    """{"train.lr_g": 0.0002, "name": "demo", ...}: every setting under its dotted key."""
    out = {}
    for key, value in to_dict(cfg).items():
        for sub, v in (value.items() if isinstance(value, dict) else [(None, value)]):
            out[f"{key}.{sub}" if sub else key] = v
    return out


def differences(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every setting that differs, in the configs' order."""
    a, b = flat(old), flat(new)
    out = []
    for key in dict.fromkeys([*a, *b]):
        va, vb = a.get(key), b.get(key)
        if key in _PATH_KEYS and va and vb and os.path.abspath(va) == os.path.abspath(vb):
            continue
        if va != vb:
            out.append((key, va, vb))
    return out
