"""MLflow tracking: the only module that imports mlflow.

One experiment per sweep, one parent run per sweep (reused when the sweep resumes), one nested
child run per Optuna trial. The explicit MlflowClient (rather than mlflow's fluent, process-global
active run) keeps parent and child runs straight when trials fail or resume.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping

from lora_sweep import record

log = logging.getLogger(__name__)

PARENT_ATTR = record.PARENT_ATTR  # the study attribute holding the sweep's MLflow parent run id
# MLflow run statuses for our trial outcomes.
STATUS = {"complete": "FINISHED", "failed": "FAILED", "pruned": "KILLED", "killed": "KILLED"}


class Tracker:
    def __init__(self, uri: str, experiment_name: str, artifact_dir: Path | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # schema migrations and store chatter
            logging.getLogger(name).setLevel(logging.WARNING)
        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self._mlflow = mlflow
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            location = artifact_dir.resolve().as_uri() if artifact_dir is not None and _is_local(uri) else None
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=location)
        else:
            self.experiment_id = experiment.experiment_id
        self.experiment_name = experiment_name

    # -- parent run -------------------------------------------------------------------------
    def parent_run(self, study, name: str, tags: Mapping[str, str], reopen: bool = True) -> str:
        """The sweep's parent run: created once, stored on the study, reopened on resume. All
        workers share it; the caller holds the study's lock, so two workers never create two."""
        run_id = record.parent_run_id(study)
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
                if reopen and run.info.status != "RUNNING":
                    self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception:  # deleted by hand, or another tracking store: start a new one
                log.warning("MLflow parent run %s not found in %s; starting a new one", run_id, self.uri)
        run = self.client.create_run(self.experiment_id, run_name=name, tags=dict(tags))
        record.set_parent_run_id(study, run.info.run_id)
        return run.info.run_id

    def finish_parent(self, run_id: str, status: str = "FINISHED", description: str | None = None) -> None:
        if description is not None:
            self.describe(run_id, description)
        self.client.set_terminated(run_id, status=status)

    def describe(self, run_id: str, markdown: str) -> None:
        """The run's description (markdown in the UI's Overview tab)."""
        self.client.set_tag(run_id, "mlflow.note.content", fit_description(markdown))

    # -- child runs -------------------------------------------------------------------------
    def start_trial(self, parent_id: str, name: str, params: Mapping[str, Any],
                    tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param, RunTag

        # Tag values must be strings for a tracking server (the REST store rejects ints).
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": parent_id, **{k: str(v) for k, v in tags.items()}})
        self.client.log_batch(run.info.run_id,
                              params=[Param(k, _param(v)) for k, v in params.items()],
                              tags=[RunTag(k, str(v)) for k, v in tags.items()])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, local_dir: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def finish_trial(self, run_id: str, outcome: str) -> None:
        self.client.set_terminated(run_id, status=STATUS[outcome])

    def close_orphans(self, parent_id: str, trial_states: Mapping[str, str]) -> list[str]:
        """Child runs left RUNNING by a worker that died (SIGKILL, power loss): once Optuna no
        longer counts their trial as running, mark them KILLED with the reason. Returns run ids.
        trial_states: "N" (search trial N) or "confirm:N" (confirmation run N) -> state name."""
        closed = []
        for run in self.client.search_runs([self.experiment_id], max_results=10_000,
                                           filter_string=f"tags.mlflow.parentRunId = '{parent_id}' "
                                                         f"and attributes.status = 'RUNNING'"):
            number = run.data.tags.get("optuna_trial_number")
            stage = run.data.tags.get("stage")
            state = trial_states.get(f"{stage}:{number}" if stage else str(number)) if number is not None else None
            if state == "RUNNING":
                continue  # another worker is training it right now
            self.set_tags(run.info.run_id, {"status": "failed", "error": f"worker died mid-trial (Optuna trial "
                                            f"{number} is {state or 'unknown'}); closed on a later start"})
            self.client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
        return closed

    # -- the sweep at a glance (parent run) --------------------------------------------------
    def log_series(self, run_id: str, series: Mapping[str, Mapping[int, float]]) -> None:
        """Metric series over the trial number (MLflow step); a step already in a metric's history
        is not logged again, so a resumed sweep or a rebuilt report adds only the new trials."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for key, points in series.items():
            logged = {m.step for m in self.client.get_metric_history(run_id, key)}
            batch += [Metric(key, float(v), now, int(step)) for step, v in sorted(points.items())
                      if step not in logged and v is not None and math.isfinite(float(v))]
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def log_table(self, run_id: str, frame, artifact_file: str) -> None:
        """A table artifact, as MlflowClient.log_table writes it (JSON, orient=split) and tagged the
        same way, but replaced rather than appended to: each call holds every row exactly once."""
        import json
        import posixpath
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / posixpath.basename(artifact_file)
            frame.to_json(local, orient="split", index=False, date_format="iso")
            self.client.log_artifact(run_id, str(local), posixpath.dirname(artifact_file) or None)
        tag = "mlflow.loggedArtifacts"
        logged = json.loads(self.client.get_run(run_id).data.tags.get(tag, "[]"))
        if {"path": artifact_file, "type": "table"} not in logged:
            self.client.set_tag(run_id, tag, json.dumps([*logged, {"path": artifact_file, "type": "table"}]))

    def log_image(self, run_id: str, path: Path, key: str, step: int) -> None:
        """A PNG as an MLflow image (the run's chart view shows it) under key at step; skipped when
        that key already has an image at that step."""
        from PIL import Image

        prefix = f"images/{key.replace('/', '~')}+step+{step}+"  # how MLflow 3 names a logged image
        if any(f.path.startswith(prefix) for f in self.client.list_artifacts(run_id, "images")):
            return
        with Image.open(path) as image:
            self.client.log_image(run_id, image.convert("RGB"), key=key, step=step)

    def experiment_url(self, base: str, run_id: str | None = None) -> str:
        return ui_url(base, self.experiment_id, run_id)

    # -- reading back -----------------------------------------------------------------------
    def download_artifacts(self, run_id: str, path: str, dst: Path) -> Path | None:
        """A run's artifact folder, downloaded under dst; None when the run has no such artifact."""
        try:
            if not self.client.list_artifacts(run_id, path):
                return None
            return Path(self.client.download_artifacts(run_id, path, str(dst)))
        except Exception as e:  # the run was deleted, or its artifacts are out of reach
            log.warning("Cannot read artifact %s of MLflow run %s: %s", path, run_id, e)
            return None

    @property
    def has_registry(self) -> bool:
        """A model registry exists where the store is a database or a server (file stores have none here)."""
        return self.uri.startswith(("sqlite:", "postgresql", "mysql", "mssql", "http:", "https:", "databricks"))

    def register_folder(self, run_id: str, local_dir: Path, artifact_path: str, name: str,
                        description: str = "", tags: Mapping[str, Any] | None = None) -> str:
        """Log local_dir as the run's artifact and register it as a new version of model `name`
        (MLflow 3's register_model wants an MLmodel file; a version made from the artifact URI does not).
        Returns the version number."""
        from mlflow.exceptions import MlflowException

        self.client.log_artifacts(run_id, str(local_dir), artifact_path)
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code) and "already exists" not in str(e):
                raise
        source = f"{self.client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
        version = self.client.create_model_version(name, source=source, run_id=run_id, description=description,
                                                   tags={k: str(v) for k, v in (tags or {}).items()})
        return str(version.version)

    def child_runs(self, parent_id: str):
        return self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                       max_results=10_000)


# MLflow rejects tag values longer than this (mlflow.utils.validation.MAX_TAG_VAL_LENGTH).
MAX_DESCRIPTION = 8000


def fit_description(markdown: str, limit: int = MAX_DESCRIPTION) -> str:
    """Whole sections until the limit (a table cut mid-row would not render), then a pointer."""
    if len(markdown) <= limit:
        return markdown
    note = "\n\n_Truncated to fit MLflow's description limit: the full report is this run's artifact report/report.md._\n"
    sections = markdown.split("\n## ")
    kept = sections[0][: limit - len(note)]
    for part in sections[1:]:
        if len(kept) + len(part) + 4 + len(note) > limit:
            break
        kept += "\n## " + part
    return kept + note


def _is_local(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def _param(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


# MLflow 3's UI opens an experiment in its GenAI view (traces) unless the URL (or the browser's stored
# choice) says otherwise: every URL we print asks for the model-training view.
WORKFLOW_QUERY = "workflowType=machine_learning"
DEFAULT_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def ui_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment's runs, or of one run, in the model-training view."""
    page = f"#/experiments/{experiment_id}/runs" + (f"/{run_id}" if run_id else "")
    return f"{base.rstrip('/')}/{page}?{WORKFLOW_QUERY}"


def ui_base(uri: str) -> str | None:
    """The UI of a tracking server (its URI is the UI), else None (a local store needs `mlflow ui`)."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None
