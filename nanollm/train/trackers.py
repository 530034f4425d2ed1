"""Experiment trackers through Accelerate's tracker classes: Weights & Biases, trackio, MLflow or Aim beside the run's
own metrics.jsonl and TensorBoard events, the tracker's run id kept in the manifest so a resumed run logs into the same run."""
from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from .recipe import Recipe

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow", "aim")  # tensorboard: the run's own event files, nothing more
MODULES = {"wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow", "aim": "aim"}


class Tracker:
    """One run in an external tracker (main process only); `entry` is what the manifest keeps of it."""

    def __init__(self, recipe: Recipe, run_dir: Path, previous: dict[str, Any] | None) -> None:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        name = recipe.tracker
        if importlib.util.find_spec(MODULES[name]) is None:
            raise RecipeError(f"tracker {name} is not installed: pip install {name}, or choose another --tracker")
        project, group, label = recipe.tracker_project or "nanollm", recipe.tracker_group, run_dir.name
        resumed = previous if previous and previous.get("name") == name else None
        run_id = resumed["run_id"] if resumed else None
        kind = LOGGER_TYPE_TO_CLASS[name]
        if name == "wandb":
            run_id = run_id or uuid.uuid4().hex[:16]
            self.tracker = kind(project, id=run_id, resume="allow", name=label, group=group, dir=str(run_dir))
        elif name == "trackio":
            run_id = label  # trackio resumes a run by its name within the project
            self.tracker = kind(project, name=label, group=group, resume="allow")
        elif name == "mlflow":
            self.tracker = kind(experiment_name=project, run_id=run_id, run_name=label, tags={"group": group} if group else None)
        else:  # aim
            self.tracker = kind(label, logging_dir=str(run_dir.parent), run_hash=run_id, experiment=group or project)
        self.tracker.start()
        if name == "mlflow":
            run_id = self.tracker.active_run.info.run_id
        elif name == "aim":
            run_id = self.tracker.writer.hash
        if not resumed:
            self.tracker.store_init_configuration({k: v for k, v in recipe.to_json().items() if v is not None})
        self.entry = {"name": name, "run_id": run_id, "project": project, "group": group}

    def log(self, values: dict[str, float], step: int) -> None:
        self.tracker.log(values, step=step)

    def finish(self) -> None:
        self.tracker.finish()


def open_tracker(recipe: Recipe, run_dir: Path, previous: dict[str, Any] | None) -> Tracker | None:
    """The run's external tracker, or None for TensorBoard alone."""
    return None if recipe.tracker == "tensorboard" else Tracker(recipe, run_dir, previous)
