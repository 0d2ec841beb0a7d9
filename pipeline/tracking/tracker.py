"""Tracker: the connection to one tracking server/database, and the runs opened on it.

Registry, lineage and replay are plain functions over a Tracker (registry.py,
lineage.py, sync.py); the methods at the bottom make them reachable from the one
object that stages and the CLI hold.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from pipeline.config import KilnError, TrackingConfig
from pipeline.credentials import redact
from pipeline.tracking import evals, forms, lineage, registry, store, sync
from pipeline.tracking.common import HTTP_DEFAULTS, PARENT_ENV, absolute_sqlite, one_line, resolve_uri
from pipeline.tracking.registry import ModelRef
from pipeline.tracking.runs import StageRun


class Tracker:
    """Connection to one tracking server/database; a no-op when disabled or not rank 0."""

    def __init__(self, cfg: TrackingConfig | None = None, uri: str | None = None, enabled: bool | None = None,
                 must_exist: bool = False):
        self.cfg = cfg or TrackingConfig()
        self.connect_uri = absolute_sqlite(resolve_uri(self.cfg, uri))  # may hold user:password: never shown
        self.uri = redact(self.connect_uri)  # what errors, warnings, --json and run records say
        self.must_exist = must_exist  # read-only commands: never create a store, say where they looked
        if enabled is None:
            enabled = self.cfg.enabled and os.environ.get("RANK", "0") == "0"
        self.enabled = enabled
        self.parent_run_id: str | None = None  # set inside pipeline_run()
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        if enabled:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            if self.must_exist:
                store.require_existing(self.uri)
            self._client = MlflowClient(tracking_uri=self.connect_uri, registry_uri=self.connect_uri)
        return self._client

    def experiment_id(self) -> str:
        """The configured experiment, created (artifacts next to a sqlite store, opening in the UI's
        model-training view) when missing."""
        if self._experiment_id is None:
            name = self.cfg.experiment
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        name, artifact_location=store.artifact_root(self.uri), tags=store.EXPERIMENT_TAGS)
                except MlflowException:  # created by a concurrent process
                    self._experiment_id = self.client.get_experiment_by_name(name).experiment_id
            else:
                self._experiment_id = exp.experiment_id
                for key, value in store.EXPERIMENT_TAGS.items():
                    if key not in exp.tags:
                        self.client.set_experiment_tag(self._experiment_id, key, value)
        return self._experiment_id

    def strict(self, what: str, fn, *args, **kwargs):
        """Registry operations the user asked for: failures become one-line KilnErrors."""
        try:
            return fn(*args, **kwargs)
        except MlflowException as err:  # MLflow quotes the URL it called, credentials included
            raise KilnError(redact(f"{what}: {err.message.splitlines()[0]} (tracking URI {self.uri})")) from None
        except OSError as err:
            raise KilnError(redact(f"{what}: {one_line(err)} (tracking URI {self.uri})")) from None

    # ------------------------------------------------------------------ runs

    @contextmanager
    def pipeline_run(self, name: str, params: Any = None, tags: dict | None = None) -> Iterator[StageRun]:
        """The parent run of one pipeline invocation; stage runs (also in subprocesses, via
        $KILN_PARENT_RUN_ID) nest under it."""
        with self.stage_run(name, params=params, tags={"kiln.pipeline": name, **(tags or {})}) as run:
            previous = os.environ.get(PARENT_ENV)
            self.parent_run_id = run.run_id
            if run.run_id:
                os.environ[PARENT_ENV] = run.run_id
            try:
                yield run
            finally:
                self.parent_run_id = None
                if previous is None:
                    os.environ.pop(PARENT_ENV, None)
                else:
                    os.environ[PARENT_ENV] = previous

    @contextmanager
    def stage_run(self, stage: str, params: Any = None, tags: dict | None = None,
                  run_dir: str | Path | None = None) -> Iterator[StageRun]:
        """A run for one stage, nested under the pipeline run when there is one. With `run_dir`,
        the run id is recorded there so `kiln track sync RUN_DIR` can replay metrics later."""
        run = StageRun(self, stage, run_dir)
        if self.enabled:
            run.start(params, tags or {})
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            run.end(status)

    # ------------------------------------------------------------------ registry, lineage, replay

    def resolve(self, uri: str) -> ModelRef:
        return registry.resolve(self, uri)

    def find_model_by_weights(self, weights_sha256: str) -> str | None:
        return registry.find_model_by_weights(self, weights_sha256)

    def model_id_for(self, model: str | Path) -> str | None:
        return registry.model_id_for(self, model)

    def register(self, model_dir: str | Path, name: str, alias: str | None = None,
                 stage: str | None = None, parent: str | None = None) -> dict:
        return registry.register(self, model_dir, name, alias, stage, parent)

    def fetch(self, uri: str, out: str | Path, fmt: str = "kiln") -> dict:
        """The registered MODEL dir (fmt="kiln") or its transformers form (fmt="hf"), verified, at `out`."""
        if fmt == "hf":
            return forms.fetch_hf(self, uri, out)
        return registry.fetch(self, uri, out)

    def materialize(self, model: str | Path) -> Path:
        return registry.materialize(self, model)

    def attach_eval(self, model: str | Path, metrics: dict[str, float], split: str,
                    data_dir: str | Path | None = None, setup: dict | None = None) -> dict | None:
        return registry.attach_eval(self, model, metrics, split, data_dir, setup)

    def attach_harness(self, model: str, local_dir: str, result: dict, params: dict) -> dict | None:
        return evals.attach_harness(self, model, local_dir, result, params)

    def eval_table(self, uri: str) -> list[dict]:
        return evals.eval_table(self, uri)

    def lineage(self, uri: str) -> dict:
        return lineage.lineage(self, uri)

    def sync(self, run_dir: str | Path) -> dict:
        return sync.sync(self, run_dir)
