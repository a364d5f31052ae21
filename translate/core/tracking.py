"""Experiment trackers through Accelerate's own tracking (train.log_with): TensorBoard, Weights &
Biases, MLflow. They get the scalars of log.jsonl at the same steps and the sample grids, from the
main process only, and keep their files under RUN/tracking. Nothing leaves the machine unless the
user asks: wandb runs offline unless WANDB_MODE says otherwise, and MLflow writes a store of the
run's own (see _mlflow_store) unless MLFLOW_TRACKING_URI points elsewhere. A resumed run logs
into the same tracker run.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from translate import files
from translate.config import RunConfig, flat
from translate.errors import ConfigError, UserError

if TYPE_CHECKING:
    from accelerate import Accelerator

PROJECT = "translate"  # TensorBoard's subfolder, the wandb project, the MLflow experiment
FOLDER = "tracking"  # under the run folder
MLFLOW_DB, MLFLOW_FILES = "mlflow.db", "mlruns"  # MLflow's stores in FOLDER (see _mlflow_store)
MLFLOW_ARTIFACTS = "mlartifacts"  # in FOLDER
SQLITE_NEEDS = ("sqlalchemy", "alembic")  # what MLflow's SQLite store imports (mlflow has them)


def parse(spec: str) -> list[str]:
    """"tensorboard,wandb" -> ["tensorboard", "wandb"]; "" or "none" -> []."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"train.log_with: unknown tracker {name!r}; choose from "
                              f"{', '.join(TRACKERS)} (comma-separated) or none")
    return list(dict.fromkeys(names))


def accelerator_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """log_with and project_dir for Accelerator(...), after checking each tracker imports
    (Accelerate itself silently drops a tracker whose package is missing)."""
    names = parse(cfg.train.log_with)
    if not names:
        return {}
    for name in names:
        if not _imports(name):
            raise UserError(f"train.log_with: {name} is not installed; pip install "
                            f"'translate[{name}]' (or drop it from --log-with)")
    return {"log_with": names, "project_dir": str(cfg.out_dir / FOLDER)}


def flat_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """{"train.lr_g": 0.0002, ...}: the hyperparameter types every tracker accepts."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k, v in flat(cfg).items()}


def _imports(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _saved_id(path: Path, make: Callable[[], str]) -> str:
    """The id stored at `path`, else a new one written there (so a resume finds it)."""
    if path.is_file():
        return path.read_text().strip()
    value = make()
    files.write_text(path, value + "\n")
    return value


# ---------------------------------------------------------------------------- per tracker


def _tensorboard_kwargs(folder: Path, cfg: RunConfig, step: int) -> dict[str, Any]:
    # A resume from step S hides events logged after S by the run that was cut short, as the
    # rewind of log.jsonl does.
    return {"purge_step": step + 1} if step > 0 else {}


def _wandb_kwargs(folder: Path, cfg: RunConfig, step: int) -> dict[str, Any]:
    run_id = _saved_id(folder / "wandb_id", lambda: uuid.uuid4().hex[:12])
    kwargs = {"dir": str(folder), "id": run_id, "resume": "allow", "name": cfg.name}
    if "WANDB_MODE" not in os.environ:  # the user's choice wins; by default nothing is sent
        kwargs["mode"] = "offline"
    return kwargs


def _mlflow_kwargs(folder: Path, cfg: RunConfig, step: int) -> dict[str, Any]:
    import mlflow

    id_file = folder / "mlflow_run_id"
    kwargs = {"run_name": cfg.name,
              "run_id": id_file.read_text().strip() if id_file.is_file() else None}
    if "MLFLOW_TRACKING_URI" not in os.environ:  # the user's server, or the run's own store
        mlflow.set_tracking_uri(_mlflow_store(folder))
        # The experiment's artifacts (sample grids); by default MLflow puts them in ./mlruns.
        kwargs["logging_dir"] = (folder / MLFLOW_ARTIFACTS).resolve().as_uri()
    return kwargs


def _mlflow_store(folder: Path) -> str:
    """The run's own MLflow store: an SQLite file (MLFLOW_DB), what MLflow 3 asks for; with
    mlflow-skinny, which lacks SQLAlchemy, or for a run that began in one, a file store
    (MLFLOW_FILES), which MLflow 3 refuses unless MLFLOW_ALLOW_FILE_STORE opts in."""
    files_store = folder / MLFLOW_FILES
    if not files_store.exists() and all(_imports(m) for m in SQLITE_NEEDS):
        return f"sqlite:///{(folder / MLFLOW_DB).resolve()}"
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return files_store.resolve().as_uri()


def _after_mlflow_start(folder: Path, tracker: Any) -> None:
    _saved_id(folder / "mlflow_run_id", lambda: tracker.tracker.info.run_id)


def _tensorboard_image(tracker: Any, step: int, image: np.ndarray) -> None:
    tracker.writer.add_image("samples", image, global_step=step, dataformats="HWC")
    tracker.writer.flush()


def _wandb_image(tracker: Any, step: int, image: np.ndarray) -> None:
    tracker.log_images({"samples": [image[..., 0] if image.shape[-1] == 1 else image]},
                       step=step)


def _mlflow_image(tracker: Any, step: int, image: np.ndarray) -> None:
    import mlflow

    mlflow.log_image(image, key="samples", step=step)


@dataclass(frozen=True)
class TrackerSpec:
    init_kwargs: Callable[[Path, RunConfig, int], dict[str, Any]]  # Accelerate's init_kwargs
    log_image: Callable[[Any, int, np.ndarray], None]  # (accelerate tracker, step, HxWxC uint8)
    after_start: Callable[[Path, Any], None] | None = None


TRACKERS: dict[str, TrackerSpec] = {
    "tensorboard": TrackerSpec(_tensorboard_kwargs, _tensorboard_image),
    "wandb": TrackerSpec(_wandb_kwargs, _wandb_image),
    "mlflow": TrackerSpec(_mlflow_kwargs, _mlflow_image, _after_mlflow_start),
}


# ---------------------------------------------------------------------------- the run's trackers


@dataclass(frozen=True)
class Trackers:
    """The trackers of one run. Accelerate logs from the main process only; RunLog calls these
    only there too (it is disabled elsewhere)."""

    accelerator: Accelerator
    names: tuple[str, ...]

    def log(self, step: int, values: dict[str, float]) -> None:
        self.accelerator.log(values, step=step)

    def image(self, step: int, image: np.ndarray) -> None:
        if image.ndim == 2:
            image = image[..., None]
        for name in self.names:
            TRACKERS[name].log_image(self.accelerator.get_tracker(name), step, image)

    def close(self) -> None:
        """Finish every tracker (also when training fails), so end_training has none left."""
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()


def start(accelerator: Accelerator, cfg: RunConfig, step: int) -> Trackers | None:
    """Start the trackers of `cfg` for a run at `step` (0, or the step resumed from). The
    hyperparameters are stored on a fresh start only: MLflow refuses to change a logged one."""
    names = parse(cfg.train.log_with)
    if not names:
        return None
    folder = cfg.out_dir / FOLDER
    kwargs: dict[str, dict[str, Any]] = {}
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        kwargs = {n: TRACKERS[n].init_kwargs(folder, cfg, step) for n in names}
    accelerator.init_trackers(PROJECT, config=flat_config(cfg) if step == 0 else None,
                              init_kwargs=kwargs)
    if accelerator.is_main_process:
        for name in names:
            if TRACKERS[name].after_start is not None:
                TRACKERS[name].after_start(folder, accelerator.get_tracker(name))
    return Trackers(accelerator, tuple(names))
