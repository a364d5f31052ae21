"""Run configuration: every recipe loads, --set overrides, and every bad setting is a one-line
ConfigError that names the key (or the file)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from pathlib import Path

import pytest
import torch

from translate import config
from translate import recipe as recipe_mod
from translate.config import RunConfig, apply_overrides
from translate.core.objectives import minimax_d
from translate.errors import ConfigError, UserError
from translate.recipe import from_dict

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.toml"))

# Minimal valid raw configs per method (defaults everywhere else).
DCGAN = {"method": "dcgan", "data": {"kind": "folder", "preprocess": "resize", "crop_size": 64}}
WGAN_GP = {"method": "wgan_gp", "data": {"kind": "folder", "preprocess": "resize",
                                         "crop_size": 64}}
TOY = {"method": "gan", "model": {"net": "mlp"}, "data": {"kind": "toy"}}


def resolve(overrides: list[str], raw: dict | None = None) -> RunConfig:
    return from_dict(apply_overrides(raw or {}, overrides))


def config_error(overrides: list[str], raw: dict | None = None) -> str:
    """The message of the ConfigError that these overrides must raise; checks it is one line."""
    with pytest.raises(ConfigError) as info:
        resolve(overrides, raw)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert message and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------
# Recipes.


def test_there_are_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads(path):
    cfg = recipe_mod.load(path)
    assert isinstance(cfg, RunConfig)
    raw = config.tomllib.loads(path.read_text(encoding="utf-8"))
    assert cfg.method == raw["method"]
    assert cfg.name == raw["name"]
    # Every value written in the recipe is the value in force.
    for section in ("model", "data", "train"):
        for key, value in raw.get(section, {}).items():
            got = getattr(getattr(cfg, section), key)
            assert got == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"


def test_recipe_names_are_unique():
    names = [recipe_mod.load(p).name for p in RECIPES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_save_then_load_json_round_trips(path, tmp_path):
    cfg = recipe_mod.load(path, ["train.steps=7", "seed=3"])
    out = tmp_path / "config.json"
    config.save(cfg, out)
    again = recipe_mod.load_json(out)
    assert again == cfg
    assert type(again.model) is type(cfg.model)
    assert isinstance(again.train.betas_g, tuple)
    assert json.loads(out.read_text(encoding="utf-8"))["train"]["steps"] == 7


def test_defaults_resolve_to_a_cyclegan_run():
    cfg = from_dict({})
    assert cfg.method == "cyclegan"
    assert cfg.out_dir == Path("runs/run")
    assert resolve(["run_dir='elsewhere/r1'"]).out_dir == Path("elsewhere/r1")


def test_the_default_run_folder_is_per_recipe_and_data_folder():
    """One recipe on two datasets, or two recipes on one, never share a folder by default, and
    no recipe lands in runs/demo (translate demo's own folder)."""
    def out_dir(recipe: str, *sets: str) -> Path:
        return recipe_mod.load(ROOT / "recipes" / recipe, list(sets)).out_dir

    assert out_dir("cyclegan_demo.toml") == Path("runs/cyclegan_demo-demo")
    assert out_dir("cyclegan_demo.toml", 'data.root="/data/horses/"') == \
        Path("runs/cyclegan_demo-horses")
    assert out_dir("cyclegan_demo.toml", 'data.root="~/zebras"') == Path("runs/cyclegan_demo-zebras")
    assert out_dir("cyclegan_apple2orange.toml", 'data.root="/data/horses"') == \
        Path("runs/apple2orange-horses")
    # The data folder's name is left out where it would repeat the recipe's, or where there
    # is no folder (the toy mixtures).
    assert out_dir("cyclegan_horse2zebra.toml") == Path("runs/horse2zebra")
    assert out_dir("toy_gan_ring.toml") == Path("runs/toy_gan_ring")
    assert out_dir("dcgan.toml", 'data.root="pics"') == Path("runs/dcgan-pics")
    assert out_dir("cyclegan_demo.toml", 'run_dir="mine"') == Path("mine")  # given: taken
    assert all(out_dir(p.name).name != "demo" for p in RECIPES)


# ----------------------------------------------------------------------------------------------
# --set overrides.


def test_overrides_of_every_type():
    cfg = resolve([
        "train.steps=7",               # int
        "train.lr_g=1e-3",             # float
        "train.lr_d=1",                # an int where a float is expected
        "data.flip=false",             # bool
        "train.betas_g=[0.0, 0.9]",    # list -> tuple
        "data.root=some/dir",          # bare string
        'name="my run"',               # quoted string
        "seed=5",                      # top-level int
        "model.objective='hinge'",
    ])
    assert cfg.train.steps == 7
    assert cfg.train.lr_g == pytest.approx(1e-3)
    assert cfg.train.lr_d == 1.0 and isinstance(cfg.train.lr_d, float)
    assert cfg.data.flip is False
    assert cfg.train.betas_g == (0.0, 0.9)
    assert cfg.data.root == "some/dir"
    assert cfg.name == "my run"
    assert cfg.seed == 5
    assert cfg.model.objective == "hinge"


def test_overrides_win_over_the_recipe_and_leave_it_alone(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[train]\nsteps = 50\nbatch_size = 2\n', encoding="utf-8")
    cfg = recipe_mod.load(recipe, ["train.steps=3"])
    assert (cfg.train.steps, cfg.train.batch_size) == (3, 2)
    raw = {"train": {"steps": 50}}
    apply_overrides(raw, ["train.steps=3", "data.flip=false"])
    assert raw == {"train": {"steps": 50}}


@pytest.mark.parametrize("item, fragment", [
    ("train.steps", "train.steps"),
    ("=3", "=3"),
    ("a.b.c=1", "a.b.c"),
])
def test_malformed_set_items_are_named(item, fragment):
    assert fragment in config_error([item])


def test_set_into_a_non_section_is_refused():
    message = config_error(['name="x"', "name.sub=1"])
    assert "name" in message and "section" in message


# ----------------------------------------------------------------------------------------------
# Keys and types.


def test_unknown_top_level_key():
    message = config_error(["epochz=3"])
    assert message.startswith("epochz")
    assert "train" in message  # lists the valid keys


@pytest.mark.parametrize("key", ["train.stepz", "data.rooot", "model.lambda_cycles"])
def test_unknown_section_key_is_named_with_its_section(key):
    message = config_error([f"{key}=1"])
    assert message.startswith(key)
    assert "unknown key" in message


@pytest.mark.parametrize("item, key", [
    ("train.steps=ten", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("train.lr_g=fast", "train.lr_g"),
    ("data.flip=1", "data.flip"),
    ("data.root=3", "data.root"),
    ("train.betas_g=[0.5]", "train.betas_g"),
    ("train.betas_g=[0.5, 'x']", "train.betas_g[1]"),
    ("name=3", "name"),
    ("seed=1.5", "seed"),
    ("data=3", "data"),
])
def test_wrong_type_names_the_key(item, key):
    assert config_error([item]).startswith(f"{key}:")


@pytest.mark.parametrize("item", [
    "train.batch_size=0", "train.batch_size=-2", "train.steps=0", "data.load_size=-1",
    "data.crop_size=0", "train.lr_g=0", "train.lr_d=-1e-4", "train.epochs=-1",
    "model.pool_size=-1", "model.lambda_cycle=-10",
])
def test_zero_or_negative_sizes(item):
    key = item.partition("=")[0]
    assert config_error([item]).startswith(f"{key}:")


@pytest.mark.parametrize("item", [
    "train.optimizer='sgd'", "data.preprocess='squash'", "data.channels_a=2",
    "model.objective='wgan'", "model.norm='group'", "train.mixed_precision='fp8'",
])
def test_invalid_choice_lists_the_choices(item):
    key = item.partition("=")[0]
    message = config_error([item])
    assert message.startswith(f"{key}:")
    assert "not one of" in message


def test_unknown_method_lists_the_methods():
    message = config_error(["method='pix2pix'"])
    assert message.startswith("method:")
    assert "cyclegan" in message and "wgan_gp" in message


def test_zero_is_fine_where_non_negative():
    cfg = resolve(["model.pool_size=0", "train.ema=0", "model.lambda_identity=0"])
    assert cfg.model.pool_size == 0


# ----------------------------------------------------------------------------------------------
# Cross-field checks.


def test_crop_larger_than_load_size():
    message = config_error(["data.crop_size=300"])
    assert message.startswith("data.crop_size:") and "data.load_size" in message
    # Without a resize step the load size plays no part.
    assert resolve(["data.crop_size=300", "data.preprocess='crop'"]).data.crop_size == 300


def test_cyclegan_crop_must_be_a_multiple_of_the_generator_stride():
    message = config_error(["data.crop_size=130"])
    assert message.startswith("data.crop_size:") and "128" in message
    unet = config_error(["model.generator='unet'", "data.crop_size=128"])
    assert "256" in unet
    assert resolve(["model.generator='unet'", "model.unet_downs=7", "data.crop_size=128"])


def test_identity_loss_needs_equal_channels():
    message = config_error(["data.channels_a=1"])
    assert message.startswith("model.lambda_identity:")
    assert resolve(["data.channels_a=1", "model.lambda_identity=0"]).data.channels_a == 1


def test_cyclegan_needs_unpaired_data():
    assert config_error(["data.kind='folder'"]).startswith("data.kind:")


def test_dcgan_crop_must_equal_image_size():
    assert resolve([], DCGAN).model.image_size == 64
    message = config_error(["data.crop_size=32"], DCGAN)
    assert message.startswith("data.crop_size:") and "model.image_size" in message
    assert resolve(["data.crop_size=32", "model.image_size=32"], DCGAN).data.crop_size == 32


def test_dcgan_needs_an_image_folder():
    assert config_error(["data.kind='unpaired'"], DCGAN).startswith("data.kind:")


def test_mlp_net_needs_toy_data():
    assert resolve([], TOY).model.net == "mlp"
    message = config_error(["model.net='mlp'"], DCGAN)
    assert message.startswith("model.net:") and "toy" in message


def test_gradient_penalty_refuses_batchnorm():
    assert resolve([], WGAN_GP).model.penalty == "gp"
    message = config_error(["model.d_norm='batch'"], WGAN_GP)
    assert message.startswith("model.d_norm:")
    # Clipping does not need per-sample gradients: BatchNorm is fine there.
    assert resolve(["model.d_norm='batch'", "model.penalty='clip'"], WGAN_GP)


def test_compile_refuses_the_double_backward_of_a_penalty():
    # torch.compile (aot_autograd) raises mid-training on a gradient penalty; say it up front.
    assert config_error(["train.compile=true"], WGAN_GP).startswith("train.compile:")
    assert resolve(["train.compile=true", "model.penalty='clip'"], WGAN_GP).train.compile
    # The default, "auto", is no refusal: it leaves such runs uncompiled (test_train.py).
    assert resolve([], WGAN_GP).train.compile == "auto"
    assert config_error(["train.compile='yes'"], WGAN_GP).startswith("train.compile:")


def test_batch_must_be_a_multiple_of_pack():
    assert config_error(["model.pack=3", "train.batch_size=4"], TOY).startswith(
        "train.batch_size:")


# ----------------------------------------------------------------------------------------------
# Files.


def test_missing_recipe_names_the_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        recipe_mod.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"name = \n", b"[train\nsteps = 3\n", b"name = '\xff\xfe'\n"])
def test_broken_recipe_names_the_file(tmp_path, content):
    path = tmp_path / "broken.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        recipe_mod.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [None, "{not json", '{"train": {"steps": -1}}'])
def test_broken_run_config_json_is_a_config_error(tmp_path, content):
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        recipe_mod.load_json(path)
    assert "\n" not in str(info.value)
    if content != '{"train": {"steps": -1}}':
        assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------
# Bugs found while writing these tests (fixed; kept as regression tests).


@pytest.mark.parametrize("item", ["method=['cyclegan']", "method={a=1}"])
def test_method_of_the_wrong_type_is_a_config_error(item):
    assert config_error([item]).startswith("method:")


@pytest.mark.parametrize("item", ["train.lr_g=nan", "train.lr_d=inf", "model.lambda_cycle=inf",
                                  "train.grad_clip=nan"])
def test_non_finite_numbers_are_refused(item):
    assert config_error([item]).startswith(item.partition("=")[0])


@pytest.mark.parametrize("value", ["1.0", "1.5"])
def test_ema_decay_must_be_below_one(value):
    assert config_error([f"train.ema={value}"]).startswith("train.ema:")


@pytest.mark.parametrize("value", ["[1.0, 0.999]", "[0.5, 1.5]", "[-0.1, 0.9]"])
def test_adam_betas_must_be_in_zero_one(value):
    assert config_error([f"train.betas_d={value}"]).startswith("train.betas_d")


@pytest.mark.parametrize("value", [-1, 2**32])
def test_seed_must_fit_the_seeding_functions(value):
    assert config_error([f"seed={value}"]).startswith("seed:")


def test_label_smoothing_target_must_not_exceed_one():
    # The loss really is unbounded below for t = 1.5, so the config must refuse it.
    assert float(minimax_d(torch.tensor([1e4]), torch.tensor([0.0]), 1.5)) < -1e3
    assert config_error(["model.real_target=1.5"]).startswith("model.real_target:")


def test_decay_start_beyond_the_run_is_refused():
    message = config_error(["train.lr_schedule='linear'", "train.steps=100",
                            "train.decay_start=100"])
    assert message.startswith("train.decay_start:")


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_run_name_must_be_a_folder_name(name):
    assert config_error([f"name={json.dumps(name)}"]).startswith("name:")


def test_save_never_leaves_a_truncated_config(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    old = resolve(["train.steps=5"])
    config.save(old, path)
    new = dataclasses.replace(old, seed=9)
    real_write_text = pathlib.Path.write_text

    def disk_full(self, data, *args, **kwargs):
        real_write_text(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    try:
        config.save(new, path)
    except OSError:
        pass
    monkeypatch.undo()
    assert recipe_mod.load_json(path) in (old, new)


def test_a_run_saved_before_the_padding_key_keeps_its_zero_padding(tmp_path):
    """New CycleGAN runs reflect-pad their generators; a run whose config.json predates the
    key was trained with zero padding and must be resumed and exported as such."""
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml")
    assert cfg.model.padding == "reflect"
    saved = config.to_dict(cfg)
    del saved["model"]["padding"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(saved), encoding="utf-8")
    old = recipe_mod.load_json(path)
    assert old.model.padding == "zero"
    assert dataclasses.replace(old.model, padding="reflect") == cfg.model


def test_intervals_longer_than_a_short_run_are_fitted_to_it():
    """--steps below the recipe's log/sample intervals: a tenth of the run between log lines,
    a quarter between sample grids, unless the user set them; epoch runs are left alone."""
    cfg = resolve(["train.steps=40", "train.log_every=50", "train.sample_every=500",
                   "train.save_every=1000"], TOY)
    fitted, note = config.fit_intervals(cfg, set())
    t = fitted.train
    assert (t.log_every, t.sample_every, t.save_every) == (4, 10, 1000)  # the end always saves
    assert note == ("note: a run of 40 steps is shorter than the recipe's intervals: "
                    "train.log_every 50 -> 4, train.sample_every 500 -> 10 (set them with "
                    "--log-every / --sample-every)")
    kept, note = config.fit_intervals(cfg, {"log_every"})
    assert (kept.train.log_every, kept.train.sample_every) == (50, 10) and "log_every" not in note
    assert config.fit_intervals(resolve(["train.steps=3"], TOY), set())[0].train.log_every == 1
    assert config.fit_intervals(fitted, set()) == (fitted, "")  # idempotent
    epochs = resolve(["train.epochs=2", "train.log_every=50"], TOY)
    assert config.fit_intervals(epochs, set()) == (epochs, "")
