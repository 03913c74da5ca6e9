"""``mlflow``: an MLflow run (``pip install 'metamorph-train[mlflow]'``).

Metrics are keyed ``NAMESPACE/KEY`` at their step; the resolved recipe becomes the run's
params (dotted keys, ``train.lr``) and its ``recipe.yaml`` artifact, the run information a
``run_info.json`` artifact and ``git_commit`` tag; validation text and images become artifacts
under ``eval/step-N/``.

Tracking store: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a local SQLite file,
``output_dir/mlflow.db``; a SQLite store's new experiment keeps its artifacts in
``mlflow-artifacts`` next to the database file (MLflow 3 refuses
its old ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``; a ``file:`` URI works
with that set). Resume: the run id is kept in ``output_dir/mlflow_run.json`` and the same run
continues (params already logged keep their first value; the new recipe replaces the
artifact). MLflow keeps every value logged, so steps redone after a kill appear twice in a
metric's history.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from metamorph_train.loggers import Logger, flatten, require

RUN_FILE = "mlflow_run.json"
_MAX_PARAM = 6000  # MLflow's longest param value


class MLflowLogger(Logger):
    """An MLflow run through ``mlflow.tracking.MlflowClient`` (no global active run)."""

    name = "mlflow"

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "metamorph",
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        artifact_location: str | None = None,
    ) -> None:
        """``artifact_location``: where a new experiment keeps its artifacts (default: next
        to a local store, ``output_dir/mlflow-artifacts`` or the SQLite file's folder's
        ``mlflow-artifacts``; a tracking server's own default otherwise)."""
        require("mlflow", self.name, "mlflow")
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.artifact_location = artifact_location
        self.run_name, self.tags = run_name, dict(tags or {})
        self.client: Any = None
        self.run_id: str | None = None

    def start(self, run_dir: Path, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir)
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        artifacts = self.artifact_location
        if artifacts is None and uri.startswith("sqlite:///"):
            # else MLflow puts them in ./mlruns of whatever the working directory is
            db = Path(uri.removeprefix("sqlite:///"))
            artifacts = (db.parent / "mlflow-artifacts").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        stored = run_dir / RUN_FILE
        previous = json.loads(stored.read_text()) if stored.is_file() else {}
        self.run_id = previous.get("run_id") if previous.get("tracking_uri") == uri else None
        if self.run_id is not None and not self._resumable(self.run_id):
            self.run_id = None
        if self.run_id is None:
            found = self.client.get_experiment_by_name(self.experiment)
            experiment = (
                found.experiment_id
                if found is not None
                else self.client.create_experiment(self.experiment, artifact_location=artifacts)
            )
            tags = {"output_dir": str(run_dir.resolve()), **self.tags}
            run = self.client.create_run(
                experiment, run_name=self.run_name or run_dir.name, tags=tags
            )
            self.run_id = run.info.run_id
            stored.write_text(json.dumps({"tracking_uri": uri, "run_id": self.run_id}) + "\n")
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self._log_start(config, meta)

    def _resumable(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # noqa: BLE001 - a run deleted or from another store: start anew
            return False

    def _log_start(self, config: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        params = [
            Param(_key(k), _value(v)) for k, v in flatten(config).items() if _key(k) not in have
        ]
        for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_text(
            self.run_id, yaml.safe_dump(dict(config), sort_keys=False), "recipe.yaml"
        )
        self.client.log_dict(self.run_id, dict(meta), "run_info.json")
        if meta.get("git_commit"):
            self.client.set_tag(self.run_id, "git_commit", meta["git_commit"])
        self.client.set_tag(self.run_id, "start_step", str(meta.get("start_step", 0)))

    def log_metrics(
        self, step: int, metrics: Mapping[str, float], namespace: str = "train"
    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(_key(f"{namespace}/{k}"), float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i : i + 1000])

    def log_text(self, step: int, name: str, text: str) -> None:
        self.client.log_text(self.run_id, text, f"eval/step-{step}/{_file(name)}.md")

    def log_images(self, step: int, name: str, images: Sequence[Any]) -> None:
        for i, image in enumerate(images):
            suffix = "" if len(images) == 1 else f"-{i}"
            self.client.log_image(
                self.run_id, image, artifact_file=f"eval/step-{step}/{_file(name)}{suffix}.png"
            )

    def finish(self, success: bool = True) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, "FINISHED" if success else "FAILED")
            self.client = None


def _key(name: str) -> str:
    """A metric or param name MLflow accepts (letters, digits, ``_-. /``)."""
    return re.sub(r"[^\w\-. /]", "_", name)


def _file(name: str) -> str:
    return re.sub(r"[^\w\-.]", "_", name)


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:_MAX_PARAM]
