"""Experiment trackers (train.log_with / --log-with): TensorBoard files and MLflow's store read
back with their own readers, wandb's offline runs, resume into the same run, and the one-line
errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, run_cli, tiny_cli
from PIL import Image

from translate import config
from translate import recipe as recipe_mod
from translate.core import tracking
from translate.errors import ConfigError

TOY = ["train", "recipes/toy_gan_ring.toml", *tiny_cli("toy"), "--log-every", "2", "--sample-every", "2", "--save-every", "2",
       "--eval-every", "4", "--no-progress"]


def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tracking" / tracking.PROJECT),
                           size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _scalars(acc) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _as_logged(records: list[dict], dtype=np.float32) -> dict[str, dict[int, float]]:
    """log.jsonl as tag -> step -> value as a tracker stores it (TensorBoard: float32; MLflow:
    float64), "inf"/"nan" strings back to floats."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for k, v in r.items():
            if k not in ("step", "warnings"):  # warnings: text lines, for the log and terminal
                out.setdefault(k, {})[r["step"]] = float(dtype(float(v)))
    return out


def _same(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]]) -> None:
    assert a.keys() == b.keys()
    for tag, values in a.items():
        assert values.keys() == b[tag].keys(), tag
        for step, x in values.items():
            y = b[tag][step]
            assert x == y or (math.isnan(x) and math.isnan(y)), (tag, step, x, y)


@pytest.mark.slow
def test_tensorboard_gets_the_scalars_of_log_jsonl_and_the_samples_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")  # a dev dependency; skipped only outside `.[dev]`
    run = tmp_path / "run"
    run_cli(*TOY, "--steps", "4", "--run-dir", str(run), "--log-with", "tensorboard")
    records = _log(run)
    assert [r["step"] for r in records] == [2, 4] and "eval/hq" in records[1]
    events = _events(run)
    _same(_scalars(events), _as_logged(records))
    images = events.Images("samples")
    png = Image.open(run / "samples" / "step_0000004.png")
    assert [(i.step, i.width, i.height) for i in images] == [(2, *png.size), (4, *png.size)]

    # Resumed from step 2 to 6: the same tracker folder, the events after step 2 of the first
    # run replaced (TensorBoard's purge_step), as log.jsonl is rewound.
    run_cli(*TOY, "--steps", "6", "--run-dir", str(run), "--log-with", "tensorboard",
            "--resume", str(run / "checkpoints" / "step_0000002"))
    assert [p.name for p in (run / "tracking").iterdir()] == [tracking.PROJECT]
    records = _log(run)
    assert [r["step"] for r in records] == [2, 4, 6]
    _same(_scalars(_events(run)), _as_logged(records))
    assert [i.step for i in _events(run).Images("samples")] == [2, 4, 6]


def test_log_with_is_repeatable_and_comma_separated(tmp_path):
    proc = run_cli("train", "recipes/toy_gan_ring.toml", "--log-with", "tensorboard,wandb",
                   "--log-with", "MLflow", "--dry-run")
    assert json.loads(proc.stdout)["train"]["log_with"] == "tensorboard,wandb,MLflow"
    assert tracking.parse("tensorboard,wandb,MLflow") == ["tensorboard", "wandb", "mlflow"]
    assert tracking.parse(" tensorboard , tensorboard") == ["tensorboard"]
    assert tracking.parse("none") == tracking.parse("") == []


def test_unknown_tracker_is_one_line_exit_2(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(*TOY, "--steps", "2", "--run-dir", str(run), "--log-with", "tensorbord",
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        ("error: train.log_with: unknown tracker 'tensorbord'; choose from tensorboard, wandb, "
         "mlflow (comma-separated) or none")]
    assert not run.exists()
    with pytest.raises(ConfigError, match="train.log_with"):
        recipe_mod.load(ROOT / "recipes" / "toy_gan_ring.toml", ['train.log_with="tb"'])


@pytest.mark.parametrize("name", list(tracking.TRACKERS))
def test_missing_tracker_package_names_the_extra(tmp_path, name):
    # A package of that name first on the path whose import fails, as when it is not installed.
    _failing_package(tmp_path / "site", name)
    run = tmp_path / "run"
    proc = run_cli(*TOY, "--steps", "2", "--run-dir", str(run), "--log-with", name,
                   env={"PYTHONPATH": str(tmp_path / "site")}, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'translate[{name}]'" in lines[0], proc.stderr
    assert not run.exists()


def _failing_package(site: Path, name: str) -> None:
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")


def test_wandb_runs_offline_in_the_run_folder_and_resumes_its_run(tmp_path, monkeypatch):
    cfg = recipe_mod.load(ROOT / "recipes" / "toy_gan_ring.toml", [f'run_dir="{tmp_path}"'])
    monkeypatch.delenv("WANDB_MODE", raising=False)
    first = tracking.TRACKERS["wandb"].init_kwargs(tmp_path, cfg, 0)
    assert first["mode"] == "offline" and first["dir"] == str(tmp_path)
    assert first["resume"] == "allow" and first["name"] == cfg.name
    monkeypatch.setenv("WANDB_MODE", "online")  # the user's explicit choice is left alone
    again = tracking.TRACKERS["wandb"].init_kwargs(tmp_path, cfg, 5)
    assert "mode" not in again and again["id"] == first["id"]  # same run after a resume
    assert (tmp_path / "wandb_id").read_text().strip() == first["id"]


def test_tensorboard_resume_purges_later_events():
    cfg = config.RunConfig()
    assert tracking.TRACKERS["tensorboard"].init_kwargs(Path("."), cfg, 0) == {}
    assert tracking.TRACKERS["tensorboard"].init_kwargs(Path("."), cfg, 40) == {"purge_step": 41}


def test_flat_config_has_only_plain_values():
    cfg = recipe_mod.load(ROOT / "recipes" / "cyclegan_demo.toml")
    flat = tracking.flat_config(cfg)
    assert flat["train.lr_g"] == cfg.train.lr_g and flat["method"] == "cyclegan"
    assert flat["train.betas_g"] == str(cfg.train.betas_g)
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())
    assert flat["train.log_with"] == "none"  # no tracker unless asked (test_periodic_eval's
    # plain toy run checks that no tracking folder appears)


FAKE_WANDB = '''
"""A stand-in for wandb that records what Accelerate's WandBTracker asks of it."""
import json, os

_calls = []


def _record(*item):
    _calls.append(item)
    with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
        f.write(json.dumps(item) + "\\n")


class _Config:
    def update(self, values, allow_val_change=False):
        _record("config", sorted(values))


config = _Config()


class Image:
    def __init__(self, array):
        self.shape = list(getattr(array, "shape", []))


class _Run:
    def log(self, values, step=None):
        _record("log", step, {k: (v if isinstance(v, (int, float)) else [i.shape for i in v])
                              for k, v in values.items()})

    def finish(self):
        _record("finish")


def init(project=None, **kwargs):
    _record("init", project, kwargs)
    return _Run()
'''


@pytest.mark.slow
def test_wandb_through_accelerate_gets_scalars_images_offline_and_one_run_id(tmp_path):
    """wandb itself is not a dependency: a recording stand-in (with package metadata, so that
    Accelerate takes it as installed) checks what the run hands to it."""
    site = tmp_path / "site"
    (site / "wandb").mkdir(parents=True)
    (site / "wandb" / "__init__.py").write_text(FAKE_WANDB)
    (site / "wandb-0.0.0.dist-info").mkdir()
    (site / "wandb-0.0.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: wandb\nVersion: 0.0.0\n")
    calls, run = tmp_path / "calls.jsonl", tmp_path / "run"
    env = {"PYTHONPATH": str(site), "FAKE_WANDB_LOG": str(calls)}
    run_cli(*TOY, "--steps", "4", "--run-dir", str(run), "--log-with", "wandb", env=env)
    run_cli(*TOY, "--steps", "6", "--run-dir", str(run), "--log-with", "wandb", "--resume",
            "auto", env=env)
    recorded = [json.loads(line) for line in calls.read_text().splitlines()]
    inits = [c for c in recorded if c[0] == "init"]
    assert len(inits) == 2 and inits[0][1] == tracking.PROJECT
    for _, _, kw in inits:
        assert kw["mode"] == "offline" and kw["dir"] == str(run / "tracking")
        assert kw["resume"] == "allow" and kw["id"] == inits[0][2]["id"]
    assert [c[1] for c in recorded if c[0] == "config"] == [sorted(tracking.flat_config(
        recipe_mod.load_json(run / "config.json")))]  # stored on the fresh start only
    logged = {c[1]: c[2] for c in recorded if c[0] == "log" and "G/loss" in c[2]}
    assert sorted(logged) == [2, 4, 6]
    for r in _log(run):
        assert logged[r["step"]] == {k: float(v) for k, v in r.items()
                                     if k not in ("step", "warnings")}
    png = Image.open(run / "samples" / "step_0000006.png")
    images = [(c[1], c[2]["samples"]) for c in recorded if c[0] == "log" and "samples" in c[2]]
    assert images == [(s, [[png.size[1], png.size[0], 3]]) for s in (2, 4, 6)]
    assert sum(c[0] == "finish" for c in recorded) == 2


# ---------------------------------------------------------------------------- wandb and MLflow
# Both are dev dependencies: the runs below use the real packages, offline, in a working
# directory of their own that must stay empty (everything goes under RUN/tracking).

TOY_ANYWHERE = [TOY[0], str(ROOT / TOY[1]), *TOY[2:]]  # the recipe by its full path


def _run_then_resume(tmp_path: Path, tracker: str, env: dict | None = None,
                     env_resumed: dict | None = None) -> Path:
    """A toy run of 4 steps logged to `tracker`, then resumed to 6 steps; returns RUN."""
    run, cwd = tmp_path / "run", tmp_path / "cwd"
    cwd.mkdir()
    run_cli(*TOY_ANYWHERE, "--steps", "4", "--run-dir", str(run), "--log-with", tracker,
            cwd=cwd, env=env)
    run_cli(*TOY_ANYWHERE, "--steps", "6", "--run-dir", str(run), "--log-with", tracker,
            "--resume", "auto", cwd=cwd, env=env_resumed)
    assert list(cwd.iterdir()) == []
    assert [r["step"] for r in _log(run)] == [2, 4, 6]
    return run


def _mlflow_run(uri: str, folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.PROJECT)
    (only,) = client.search_runs([experiment.experiment_id])  # one run across the resume
    assert only.info.run_id == (folder / "mlflow_run_id").read_text().strip()
    return client, only


@pytest.mark.slow
def test_mlflow_gets_the_scalars_of_log_jsonl_and_the_samples_across_a_resume(tmp_path):
    """MLflow 3 refuses a file store: the run's own store is an SQLite file (it once stopped
    with an internal error), its artifacts beside it (they once went to ./mlruns)."""
    run = _run_then_resume(tmp_path, "mlflow")
    folder = run / "tracking"
    assert sorted(p.name for p in folder.iterdir()) == [
        "mlartifacts", "mlflow.db", "mlflow_run_id"]
    client, only = _mlflow_run(f"sqlite:///{folder / 'mlflow.db'}", folder)
    history = {k: {m.step: m.value for m in client.get_metric_history(only.info.run_id, k)}
               for k in only.data.metrics}
    largest = np.finfo(np.float64).max  # MLflow stores +-inf (eval/rkl here) as +-this
    _same(history, {k: {step: float(np.clip(v, -largest, largest)) for step, v in by.items()}
                    for k, by in _as_logged(_log(run), np.float64).items()})
    assert set(only.data.params) == set(tracking.flat_config(
        recipe_mod.load_json(run / "config.json")))  # stored on the fresh start
    grids = sorted((folder / "mlartifacts").glob("*/artifacts/images/samples+step+*.png"))
    assert sorted(int(p.name.split("+")[2]) for p in grids) == [2, 4, 6]
    png = Image.open(run / "samples" / "step_0000006.png")
    assert all(Image.open(p).size == png.size for p in grids)


@pytest.mark.slow
def test_mlflow_without_sqlalchemy_writes_a_file_store_that_its_resume_keeps(tmp_path,
                                                                           monkeypatch):
    """mlflow-skinny has no SQLAlchemy: a file store then (MLflow 3 asks for an opt-in, given),
    and a run begun in one stays there when resumed where SQLAlchemy is installed."""
    _failing_package(tmp_path / "site", "sqlalchemy")
    run = _run_then_resume(tmp_path, "mlflow", env={"PYTHONPATH": str(tmp_path / "site")})
    folder = run / "tracking"
    assert sorted(p.name for p in folder.iterdir()) == ["mlartifacts", "mlflow_run_id", "mlruns"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client, only = _mlflow_run((folder / "mlruns").as_uri(), folder)
    losses = client.get_metric_history(only.info.run_id, "G/loss")
    assert [m.step for m in losses] == [2, 4, 6]


@pytest.mark.slow
def test_wandb_itself_runs_offline_in_the_run_folder_across_a_resume(tmp_path, monkeypatch):
    """The real wandb, offline (what it is handed is checked by the stand-in test above): one
    run id over both starts, a sample grid at every sample step."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = _run_then_resume(tmp_path, "wandb")
    folder = run / "tracking"
    run_id = (folder / "wandb_id").read_text().strip()
    starts = sorted((folder / "wandb").glob("offline-run-*"))
    assert len(starts) == 2 and all(p.name.endswith(f"-{run_id}") for p in starts)
    assert all((p / f"run-{run_id}.wandb").stat().st_size > 0 for p in starts)
    grids = [p for start in starts for p in (start / "files" / "media" / "images").iterdir()]
    assert sorted(int(p.name.split("_")[1]) for p in grids) == [2, 4, 6]
