"""Reading recipes and run configs: TOML or config.json -> a checked, frozen RunConfig.

Above the methods on purpose: the method named in a recipe decides its `[model]` dataclass and
its own cross-field rules, so reading a config needs the method table; translate/config.py
(the dataclasses, overrides and comparisons) stays below the core and knows no method.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from translate.config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    _check_type,
    apply_overrides,
    build,
)
from translate.core import checkpoint
from translate.core.best import DIRECTIONS
from translate.core.tracking import parse as parse_trackers
from translate.errors import ConfigError, UserError
from translate.methods import METHODS


def from_dict(raw: dict[str, Any]) -> RunConfig:
    top_keys = {"name", "method", "seed", "run_dir", "model", "data", "train"}
    unknown = sorted(set(raw) - top_keys)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (valid: {', '.join(sorted(top_keys))})")
    method = _check_type("method", raw.get("method", "cyclegan"), str)
    if method not in METHODS:
        raise ConfigError(f"method: {method!r} is not one of {', '.join(sorted(METHODS))}")
    cfg = RunConfig(
        name=_check_type("name", raw.get("name", "run"), str),
        method=method,
        seed=_check_type("seed", raw.get("seed", 0), int),
        run_dir=_check_type("run_dir", raw.get("run_dir", ""), str),
        model=build(METHODS[method].config, raw.get("model", {}), "model"),
        data=build(DataConfig, raw.get("data", {}), "data"),
        train=build(TrainConfig, raw.get("train", {}), "train"),
    )
    cfg = METHODS[method].resolve(cfg)  # e.g. cgan's class names, read from data.root once
    check(cfg)
    return cfg


def check(cfg: RunConfig) -> None:
    """Cross-field rules, so impossible runs fail before any work starts."""
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed: must be in [0, 2**32), got {cfg.seed}")
    if cfg.name in ("", ".", "..") or "/" in cfg.name or "\\" in cfg.name:
        raise ConfigError(f"name: {cfg.name!r} must be a plain folder name (it names runs/<name>)")
    t = cfg.train
    if t.lr_schedule == "linear" and t.epochs == 0 and t.decay_start >= t.steps:
        raise ConfigError(f"train.decay_start: {t.decay_start} >= train.steps {t.steps}, so the "
                          "linear schedule would never decay; lower it (0 = half of the steps)")
    if t.lr_schedule == "constant" and t.epochs_decay > 0:
        raise ConfigError("train.epochs_decay: needs train.lr_schedule = 'linear' (with a "
                          "constant schedule the decay epochs would run at full LR)")
    if t.keep_best:
        _check_keep_best(t)
    d = cfg.data
    if d.kind == "toy" and d.max_items > 0:
        raise ConfigError("data.max_items: the toy data has no image files to subset; set it to 0 "
                          "(data.toy_epoch sets a toy epoch's length)")
    if d.preprocess in ("resize_and_crop", "scale_width_and_crop") and d.crop_size > d.load_size:
        raise ConfigError(
            f"data.crop_size: {d.crop_size} is larger than data.load_size {d.load_size}; "
            "lower crop_size or raise load_size"
        )
    parse_trackers(t.log_with)  # names only: whether each is installed is checked when training
    METHODS[cfg.method].check(cfg)


def _check_keep_best(t: TrainConfig) -> None:
    if t.keep_best not in DIRECTIONS:
        raise ConfigError(f"train.keep_best: {t.keep_best!r} is not a score whose better "
                          f"direction is known; use one of {', '.join(DIRECTIONS)} (or \"\")")
    if t.eval_every == 0:
        raise ConfigError(f"train.keep_best: {t.keep_best} needs periodic scores; set "
                          "train.eval_every (e.g. --eval-every 100)")


def load(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML recipe (or start from defaults when `path` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: recipe not found; list the recipes with `ls recipes/`")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: not valid TOML ({e}); fix the recipe's syntax") from None
    return from_dict(apply_overrides(raw, overrides or []))



def refuse_ignored_steps(cfg: RunConfig, steps_given: bool) -> None:
    """ConfigError where the command line sets train.steps (`steps_given`) on a run counted in
    epochs (epochs > 0 override steps), which would ignore it without a word. For the run as it
    will train: a resume's config.json, not the recipe."""
    t = cfg.train
    if t.epochs > 0 and steps_given:
        raise ConfigError(f"train.steps: ignored, as this run counts its length in epochs "
                          f"(train.epochs = {t.epochs}, train.epochs_decay = {t.epochs_decay}); "
                          "use --steps N, which sets both to 0, or also --set train.epochs=0 "
                          "--set train.epochs_decay=0")


def load_json(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """The resolved config of an existing run (RUN/config.json), with `overrides` applied."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the run's config ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a run config (expected a JSON object)")
    return from_dict(apply_overrides(with_legacy_keys(raw), overrides or []))


def with_legacy_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """A run saved before a model key existed was trained with that key's old behaviour, which
    the key's default may no longer be: fill in the values of the method config's `LEGACY`
    and `NEW_KEYS` (see translate.core.checkpoint.fingerprint)."""
    model, method = raw.get("model"), raw.get("method", "cyclegan")
    config = METHODS[method].config if method in METHODS else None
    legacy = {**getattr(config, "NEW_KEYS", {}), **getattr(config, "LEGACY", {})}
    if not isinstance(model, dict) or not legacy:
        return raw
    return {**raw, "model": {**legacy, **model}}


def source_of(target: Path, resume: str) -> Path | None:
    """The run folder a resume reads its config.json from."""
    if resume in checkpoint.AUTO:
        return target
    path = Path(resume)
    return checkpoint.run_of(path) if (path / "state.json").is_file() else path


def resume_config(recipe_cfg: RunConfig, resume: str, overrides: list[str]) -> RunConfig:
    """The config a resume from the command line trains with: the run's config.json with only
    the options given on this command line applied. The recipe's own values do not count (the
    run may have been started with other flags); the recipe must be the run's (name, method).
    Without a config.json to resume from, `recipe_cfg` (train then says why it cannot resume,
    or starts a new run for auto-or-new)."""
    source = source_of(recipe_cfg.out_dir, resume)
    if source is None or not (source / "config.json").is_file():
        return recipe_cfg
    cfg = load_json(source / "config.json", overrides)
    if (cfg.name, cfg.method) != (recipe_cfg.name, recipe_cfg.method):
        raise UserError(f"{source}: made by recipe '{cfg.name}' ({cfg.method}), not by this one "
                        f"('{recipe_cfg.name}', {recipe_cfg.method}); resume it with its own "
                        "recipe, or start a new run (another --run-dir, or --overwrite without "
                        "--resume)")
    if resume not in checkpoint.AUTO and not any(o.startswith("run_dir=") for o in overrides):
        cfg = replace(cfg, run_dir=str(source))  # continue the run the checkpoint belongs to
    return cfg


