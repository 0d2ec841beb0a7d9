"""MLflow for every stage: runs, dataset inputs, logged models, registry, lineage, replay.

The only module that imports mlflow. Stages call a small interface and keep
running when tracking is off, on ranks other than 0, or when the server goes
away mid-run (one warning, then silence; `kiln track sync RUN_DIR` replays the
metrics the stage kept writing to RUN_DIR/metrics.jsonl):

    tracker = Tracker(cfg.tracking, uri=args.tracking_uri)
    with tracker.stage_run("train", params=cfg, run_dir=out) as run:
        run.log_dataset(prep_dir, "train")
        run.log_metrics({"loss": 2.3}, step=10)
        run.log_model(out / "model", stage="pretrain", register_as="kiln-125m", alias="champion")

Models are MLflow 3 LoggedModels (create -> upload MODEL dir -> finalize), tagged
`kiln.*` so that `lineage()` can walk model -> parents -> run -> dataset -> prep run.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput, Metric, Param, RunTag

from pipeline.config import KilnError, TrackingConfig, flatten
from pipeline.console import log

DEFAULT_URI = "sqlite:///mlflow.db"
PARENT_ENV = "KILN_PARENT_RUN_ID"
RUN_RECORD = "mlflow_run.json"  # in a stage's RUN_DIR: which run `kiln track sync` writes to
METRICS_FILE = "metrics.jsonl"
PARAM_MAX = 500  # MLflow servers accept 6000; older ones 500, and long values are unreadable anyway
# Fail fast instead of MLflow's default 120 s x 7 retries: tracking must never stall training.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def resolve_uri(cfg: TrackingConfig | None = None, uri: str | None = None) -> str:
    """--tracking-uri, then tracking.uri, then $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db in cwd."""
    return uri or (cfg.uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def git_commit() -> str:
    if os.environ.get("KILN_GIT_COMMIT"):
        return os.environ["KILN_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def system_tags() -> dict[str, str]:
    return {"kiln.git_commit": git_commit(), "kiln.host": socket.gethostname(),
            "kiln.world_size": os.environ.get("WORLD_SIZE", "1")}


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///rel.db is relative to the cwd; a record read from elsewhere needs the absolute path."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


@dataclass
class ModelRef:
    """What a models:/ URI points at."""

    uri: str
    model_id: str
    name: str | None = None
    version: str | None = None
    alias: str | None = None
    download_uri: str | None = None


class Tracker:
    """Connection to one tracking server/database; a no-op when disabled or not rank 0."""

    def __init__(self, cfg: TrackingConfig | None = None, uri: str | None = None, enabled: bool | None = None):
        self.cfg = cfg or TrackingConfig()
        self.uri = _absolute_sqlite(resolve_uri(self.cfg, uri))
        if enabled is None:
            enabled = self.cfg.enabled and os.environ.get("RANK", "0") == "0"
        self.enabled = enabled
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None
        self._parent: str | None = None
        if enabled:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            name = self.cfg.experiment
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(name)
                except mlflow.exceptions.MlflowException:  # created by a concurrent process
                    self._experiment_id = self.client.get_experiment_by_name(name).experiment_id
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _strict(self, what: str, fn, *args, **kwargs):
        """Registry operations the user asked for: failures become one-line KilnErrors."""
        try:
            return fn(*args, **kwargs)
        except mlflow.exceptions.MlflowException as err:
            raise KilnError(f"{what}: {err.message.splitlines()[0]} (tracking URI {self.uri})") from None
        except OSError as err:
            raise KilnError(f"{what}: {_one_line(err)} (tracking URI {self.uri})") from None

    # ------------------------------------------------------------------ runs

    @contextmanager
    def pipeline_run(self, name: str, params: Any = None, tags: dict | None = None) -> Iterator[StageRun]:
        """The parent run of one pipeline invocation; stage runs (also in subprocesses, via
        $KILN_PARENT_RUN_ID) nest under it."""
        with self.stage_run(name, params=params, tags={"kiln.pipeline": name, **(tags or {})}) as run:
            previous = os.environ.get(PARENT_ENV)
            self._parent = run.run_id
            if run.run_id:
                os.environ[PARENT_ENV] = run.run_id
            try:
                yield run
            finally:
                self._parent = None
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

    # ------------------------------------------------------------------ registry

    def resolve(self, uri: str) -> ModelRef:
        """models:/NAME@ALIAS, models:/NAME/VERSION or models:/<logged model id> -> ModelRef."""
        if not uri.startswith("models:/"):
            raise KilnError(f"{uri}: not a models:/ URI (models:/NAME@ALIAS or models:/NAME/VERSION)")
        body = uri[len("models:/"):].strip("/")
        c = self.client
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = self._strict(uri, c.get_model_version_by_alias, name, alias)
        elif "/" in body:
            name, version = body.rsplit("/", 1)
            alias = None
            mv = self._strict(uri, c.get_model_version, name, version)
        else:
            lm = self._strict(uri, c.get_logged_model, body)
            return ModelRef(uri, lm.model_id, download_uri=lm.artifact_location)
        model_id = mv.tags.get("kiln.model_id") or getattr(mv, "model_id", None)
        if not model_id:
            raise KilnError(f"{uri}: version {mv.version} was not registered by Kiln (no kiln.model_id tag)")
        download = self._strict(uri, c.get_model_version_download_uri, mv.name, mv.version)
        return ModelRef(uri, model_id, mv.name, str(mv.version), alias, download)

    def find_model_by_weights(self, weights_sha256: str) -> str | None:
        """The logged model whose model.safetensors has this digest (how a MODEL dir finds its record)."""
        exps = [e.experiment_id for e in self.client.search_experiments()]
        if not exps:
            return None
        found = list(self.client.search_logged_models(
            exps, filter_string=f"tags.`kiln.weights_sha256` = '{weights_sha256}'", max_results=10))
        pick = [m for m in found if str(m.status).endswith("READY")] or found
        return pick[0].model_id if pick else None

    def model_id_for(self, model: str | Path) -> str | None:
        """A logged model id, models:/ URI or MODEL dir -> logged model id (None if unknown)."""
        text = str(model)
        if text.startswith("models:/"):
            return self.resolve(text).model_id
        if text.startswith("m-") and not Path(text).exists():
            return text
        return self.find_model_by_weights(weights_sha256(Path(text)))

    def register(self, model_dir: str | Path, name: str, alias: str | None = None,
                 stage: str | None = None, parent: str | None = None) -> dict:
        """`kiln register`: reuse the logged model with the same weights, else log one; add a version."""
        from pipeline.model.io import read_config

        if not self.enabled:
            raise KilnError("tracking.enabled is false (or RANK is not 0); registering needs MLflow")
        model_dir = Path(model_dir)
        config = read_config(model_dir)
        existing = self._strict(str(model_dir), self.find_model_by_weights, weights_sha256(model_dir))
        if existing:
            version = self._strict(name, self._add_version, existing, name, alias)
            return {"model_id": existing, "name": name, "version": version, "uri": f"models:/{name}/{version}"}
        stage = stage or config.get("kiln_stage") or ("quantized" if config.get("quantization") else "pretrain")
        with self.stage_run("register", tags={"kiln.model_dir": str(model_dir.resolve())}) as run:
            if run.broken or not run.run_id:
                raise KilnError(f"{model_dir}: could not reach the tracking server at {self.uri}")
            info = run.log_model(model_dir, stage=stage, parent=parent or config.get("parent_model"),
                                 register_as=name, alias=alias)
        if info is None:
            raise KilnError(f"{model_dir}: registering failed; see the warning above")
        return info

    def _add_version(self, model_id: str, name: str, alias: str | None, run_id: str | None = None) -> str:
        c = self.client
        lm = c.get_logged_model(model_id)
        try:
            c.create_registered_model(name, tags={"kiln": "true"})
        except mlflow.exceptions.MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        # Source is the artifact location (not models:/<id>): the sqlite registry resolves
        # models:/ through mlflow's global tracking URI, which a Tracker never sets.
        mv = c.create_model_version(name, source=lm.artifact_location, run_id=run_id or lm.source_run_id,
                                    tags={"kiln.model_id": model_id, "kiln.stage": lm.tags.get("kiln.stage", "")},
                                    await_creation_for=0, model_id=model_id)
        if alias:
            c.set_registered_model_alias(name, alias, mv.version)
        return str(mv.version)

    def fetch(self, uri: str, out: str | Path) -> dict:
        """Download a registered MODEL dir (streamed), verify SHA256SUMS, then move it into place."""
        from pipeline.model.io import verify_sums

        ref = self.resolve(uri)
        out = Path(out)
        marker = out / ".kiln-fetched.json"
        if marker.exists() and json.loads(marker.read_text()).get("model_id") == ref.model_id:
            verify_sums(out)
            return {**asdict(ref), "out": str(out), "cached": True}
        if out.exists() and any(out.iterdir()):
            raise KilnError(f"{out}: exists and is not empty; choose another --out")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
        try:
            got = Path(self._strict(uri, mlflow.artifacts.download_artifacts, artifact_uri=ref.download_uri,
                                    dst_path=str(tmp), tracking_uri=self.uri))
            verify_sums(got)
            (got / marker.name).write_text(json.dumps(asdict(ref)) + "\n")
            if out.exists():
                out.rmdir()
            os.replace(got, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {**asdict(ref), "out": str(out), "cached": False}

    def materialize(self, model: str | Path) -> Path:
        """A MODEL dir on disk: the path itself, or a models:/ URI fetched (once) into the cache
        $KILN_CACHE_DIR/models/<model id> (default ~/.cache/kiln)."""
        text = str(model)
        if not text.startswith("models:/"):
            return Path(model)
        ref = self.resolve(text)
        cache = Path(os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln") / "models" / ref.model_id
        self.fetch(text, cache)
        return cache

    def attach_eval(self, model: str | Path, metrics: dict[str, float], split: str,
                    data_dir: str | Path | None = None) -> dict | None:
        """Log eval numbers in an `eval` run, on the logged model, and as tags of its registry version."""
        if not self.enabled:
            return None
        with self.stage_run("eval", params={"model": str(model), "split": split}) as run:
            if not run.run_id:
                return None
            model_id = run.safe(self.model_id_for, model)
            if data_dir is not None:
                run.log_dataset(data_dir, split, context="evaluation")
            run.log_metrics(metrics, step=0, model_id=model_id)
            if model_id:
                run.safe(self.client.log_inputs, run.run_id, models=[LoggedModelInput(model_id)])
            if str(model).startswith("models:/") and model_id:
                ref = run.safe(self.resolve, str(model))
                if ref and ref.version:
                    for key, value in metrics.items():
                        run.safe(self.client.set_model_version_tag, ref.name, ref.version,
                                 f"kiln.eval.{split}.{key}", str(value))
            return {"run_id": run.run_id, "model_id": model_id}

    # ------------------------------------------------------------------ lineage

    def lineage(self, uri: str) -> dict:
        """model -> parent model(s) -> training run -> dataset digest -> prep run, as a nested dict."""
        ref = self.resolve(uri)
        root = self._model_node(ref.model_id, seen=set())
        root.update({"uri": uri, "registered_name": ref.name, "version": ref.version, "alias": ref.alias})
        return root

    def _model_node(self, model_id: str, seen: set[str]) -> dict:
        c = self.client
        lm = self._strict(model_id, c.get_logged_model, model_id)
        tags = {k: v for k, v in lm.tags.items() if k.startswith("kiln.")}
        node: dict[str, Any] = {"model_id": model_id, "name": lm.name, "stage": tags.get("kiln.stage"),
                                "tags": tags, "metrics": {m.key: m.value for m in (lm.metrics or [])},
                                "run": None, "datasets": [], "parents": []}
        seen.add(model_id)
        if lm.source_run_id:
            run = self._strict(lm.source_run_id, c.get_run, lm.source_run_id)
            node["run"] = {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                           "stage": run.data.tags.get("kiln.stage"), "git_commit": run.data.tags.get("kiln.git_commit")}
            for d in run.inputs.dataset_inputs:
                dtags = {t.key: t.value for t in d.tags}
                node["datasets"].append(self._dataset_node(dtags.get("kiln.data_digest", d.dataset.digest),
                                                           d.dataset.name, d.dataset.source, dtags))
        if not node["datasets"] and tags.get("kiln.data_digest"):
            node["datasets"].append(self._dataset_node(tags["kiln.data_digest"], None, None, {}))
        for parent in filter(None, tags.get("kiln.parent_model", "").split(",")):
            if parent in seen:
                node["parents"].append({"model_id": parent, "cycle": True})
            else:
                node["parents"].append(self._model_node(parent, seen))
        return node

    def _dataset_node(self, digest: str, name: str | None, source: str | None, tags: dict) -> dict:
        exps = [e.experiment_id for e in self.client.search_experiments()]
        runs = self.client.search_runs(exps, f"tags.`kiln.output_data_digest` = '{digest}'", max_results=5)
        prep = [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
                 "git_commit": r.data.tags.get("kiln.git_commit")} for r in runs]
        try:
            source = json.loads(source).get("uri", source) if source else None
        except (json.JSONDecodeError, AttributeError):
            pass
        return {"digest": digest, "name": name, "source": source, "split": tags.get("kiln.split"),
                "context": tags.get("mlflow.data.context"), "prep_runs": prep}

    # ------------------------------------------------------------------ replay

    def sync(self, run_dir: str | Path) -> dict:
        """Replay RUN_DIR/metrics.jsonl into the run recorded in RUN_DIR (idempotent: steps
        already present for a key are skipped); create and record a run if none was."""
        run_dir = Path(run_dir)
        metrics_path = run_dir / METRICS_FILE
        if not metrics_path.exists():
            raise KilnError(f"{metrics_path}: not found; nothing to replay")
        record_path = run_dir / RUN_RECORD
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        c = self.client
        run_id = record.get("run_id")
        if not run_id:
            run = self._strict(str(run_dir), c.create_run, self.experiment_id(),
                               run_name=record.get("stage", "replayed"),
                               tags={"kiln.stage": record.get("stage", "replayed"), "kiln.replayed": "true",
                                     **system_tags()})
            run_id = run.info.run_id
            record.update(run_id=run_id, tracking_uri=self.uri)
            record_path.write_text(json.dumps(record, indent=2) + "\n")
        rows, bad = [], 0
        for n, line in enumerate(metrics_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((int(row["step"]), row))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad += 1
                log.warning("%s:%d: not a metrics record with a step; skipped", metrics_path, n)
        keys = {k for _, row in rows for k, v in row.items() if k != "step" and _is_number(v)}
        have = {k: {m.step for m in self._strict(run_id, c.get_metric_history, run_id, k)} for k in sorted(keys)}
        now = int(time.time() * 1000)
        todo = [Metric(k, float(v), now, step) for step, row in rows for k, v in row.items()
                if k in keys and _is_number(v) and step not in have[k]]
        for i in range(0, len(todo), 1000):
            self._strict(run_id, c.log_batch, run_id, metrics=todo[i:i + 1000])
        if record.get("status") in ("FINISHED", "FAILED"):
            if self._strict(run_id, c.get_run, run_id).info.status == "RUNNING":
                self._strict(run_id, c.set_terminated, run_id, record["status"])
        return {"run_id": run_id, "replayed": len(todo), "skipped_present": sum(len(s) for s in have.values()),
                "bad_lines": bad, "tracking_uri": self.uri}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _file_sha(model_dir: Path, name: str) -> str | None:
    """A file's digest as listed in the MODEL dir's SHA256SUMS (no re-hash of big files)."""
    sums = model_dir / "SHA256SUMS"
    if sums.exists():
        for line in sums.read_text().splitlines():
            digest, _, fname = line.partition("  ")
            if fname.strip() == name:
                return digest
    return None


def weights_sha256(model_dir: Path) -> str:
    """Digest of model.safetensors: the identity of a MODEL dir across copies and fetches."""
    from pipeline.model.io import WEIGHTS, sha256_file

    listed = _file_sha(model_dir, WEIGHTS)
    if listed:
        return listed
    if not (model_dir / WEIGHTS).exists():
        raise KilnError(f"{model_dir / WEIGHTS}: not found; is {model_dir} a MODEL directory?")
    return sha256_file(model_dir / WEIGHTS)


class StageRun:
    """One stage's run. Every call is safe: after the first failure it warns once and goes quiet."""

    def __init__(self, tracker: Tracker, stage: str, run_dir: str | Path | None = None):
        self.tracker, self.stage = tracker, stage
        self.run_dir = Path(run_dir) if run_dir else None
        self.run_id: str | None = None
        self.broken = False
        self.data_digests: list[str] = []

    @property
    def active(self) -> bool:
        return self.tracker.enabled and self.run_id is not None and not self.broken

    def safe(self, fn, *args, **kwargs):
        """Call into MLflow; on failure warn once, stop talking to the server, return None."""
        if self.broken or not self.tracker.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any tracking failure must not stop the stage
            self.broken = True
            where = f" `kiln track sync {self.run_dir}` replays the metrics later." if self.run_dir else ""
            log.warning("MLflow at %s failed (%s); %s stage continues without tracking.%s",
                        self.tracker.uri, _one_line(err), self.stage, where)
            return None

    def _record(self, **fields) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / RUN_RECORD
        record = json.loads(path.read_text()) if path.exists() else {}
        record.update(stage=self.stage, tracking_uri=self.tracker.uri, **fields)
        path.write_text(json.dumps(record, indent=2) + "\n")

    def start(self, params: Any, tags: dict) -> None:
        t = self.tracker
        parent = t._parent or os.environ.get(PARENT_ENV)
        all_tags = {"kiln.stage": self.stage, **system_tags(), **{k: str(v) for k, v in tags.items()}}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.safe(lambda: t.client.create_run(t.experiment_id(), run_name=self.stage, tags=all_tags))
        self.run_id = run.info.run_id if run else None
        self._record(run_id=self.run_id, status="RUNNING")
        if params is not None:
            self.log_params(params)

    def end(self, status: str) -> None:
        if self.active:
            self.safe(self.tracker.client.set_terminated, self.run_id, status)
        if self.run_dir is not None and self.tracker.enabled:
            self._record(status=status)

    def log_params(self, params: Any) -> None:
        if not self.active:
            return
        flat = flatten(params) if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()) \
            else params
        items = [Param(k, str(v)[:PARAM_MAX]) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.safe(self.tracker.client.log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict) -> None:
        if self.active:
            self.safe(self.tracker.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict, step: int, model_id: str | None = None) -> None:
        """Numeric values only (a metrics.jsonl row can be passed as is; "step" is skipped)."""
        if not self.active:
            return
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step), model_id=model_id) for k, v in metrics.items()
                 if k != "step" and _is_number(v)]
        if items:
            self.safe(self.tracker.client.log_batch, self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A file or directory (uploads stream from disk)."""
        if not self.active:
            return
        path = Path(path)
        fn = self.tracker.client.log_artifacts if path.is_dir() else self.tracker.client.log_artifact
        self.safe(fn, self.run_id, str(path), artifact_path)

    def log_dataset(self, prep_dir: str | Path, split: str = "train", context: str = "training") -> None:
        """A prepared corpus as a run input: name, digest = manifest digest, source = its path."""
        from pipeline.data.corpus import PreparedCorpus

        corpus = PreparedCorpus(prep_dir, verify=False)
        prep_dir = Path(prep_dir).resolve()
        self.data_digests.append(corpus.digest)
        if not self.active:
            return
        profile = {"split": split, "tokens": corpus.manifest.get("tokens", {}).get(split),
                   "shards": len(corpus.shards(split))}
        ds = Dataset(name=prep_dir.name, digest=corpus.digest[:32], source_type="local",
                     source=json.dumps({"uri": str(prep_dir)}), profile=json.dumps(profile))
        tags = [InputTag("mlflow.data.context", context), InputTag("kiln.data_digest", corpus.digest),
                InputTag("kiln.split", split)]
        self.safe(self.tracker.client.log_inputs, self.run_id, datasets=[DatasetInput(ds, tags)])
        self.set_tags({"kiln.data_digest": ",".join(dict.fromkeys(self.data_digests))})

    def log_corpus_output(self, prep_dir: str | Path) -> None:
        """For `kiln prep`: mark this run as the producer of the corpus (lineage finds it by digest)."""
        from pipeline.data.corpus import PreparedCorpus

        corpus = PreparedCorpus(prep_dir, verify=False)
        m = corpus.manifest
        self.set_tags({"kiln.output_data_digest": corpus.digest, "kiln.output_dir": str(Path(prep_dir).resolve())})
        counts = {f"tokens_{k}": v for k, v in m.get("tokens", {}).items()}
        for key in ("records_in", "documents_kept"):
            counts[key] = m.get("counts", {}).get(key)
        for kind in ("removed", "quarantined"):
            counts.update({f"{kind}.{k}": v for k, v in m.get("counts", {}).get(kind, {}).items()})
        self.log_metrics(counts, step=0)
        self.log_artifact(Path(prep_dir) / "manifest.json")

    def use_model(self, model: str | Path) -> str | None:
        """Link a model this stage consumes (id, models:/ URI or MODEL dir) as a run input."""
        if not self.active:
            return None
        model_id = self.safe(self.tracker.model_id_for, model)
        if model_id:
            self.safe(self.tracker.client.log_inputs, self.run_id, models=[LoggedModelInput(model_id)])
        return model_id

    def log_model(self, model_dir: str | Path, stage: str, parent: str | Path | list | None = None,
                  register_as: str | None = None, alias: str | None = None,
                  data_digest: str | None = None, tags: dict | None = None) -> dict | None:
        """Log a MODEL dir as a LoggedModel (create -> upload -> finalize), optionally register it.

        parent: the model(s) this one was made from (ids, models:/ URIs or MODEL dirs); they are
        also linked as inputs of this run. Returns {model_id, name, version, uri} or None.
        """
        if not self.active:
            return None
        from pipeline.model.io import read_config

        model_dir = Path(model_dir)
        config = read_config(model_dir)
        parents = [p for p in (parent if isinstance(parent, list) else [parent]) if p]
        parent_ids = [pid for pid in (self.use_model(p) for p in parents) if pid]
        if data_digest is None:
            data_digest = ",".join(dict.fromkeys(self.data_digests)) or config.get("data_digest")
        if data_digest is None and parent_ids:
            lm = self.safe(self.tracker.client.get_logged_model, parent_ids[0])
            data_digest = lm.tags.get("kiln.data_digest") if lm else None
        all_tags = {"kiln.stage": stage, "kiln.parent_model": ",".join(parent_ids),
                    "kiln.data_digest": data_digest or "unknown",
                    "kiln.tokenizer_sha256": _file_sha(model_dir, "tokenizer.model") or "none",
                    "kiln.git_commit": git_commit(), "kiln.weights_sha256": weights_sha256(model_dir),
                    "kiln.source_dir": str(model_dir.resolve()), **(tags or {})}
        unknown = [str(p) for p in parents if Path(str(p)).is_dir()] if len(parent_ids) < len(parents) else []
        if unknown:  # a parent MODEL dir never logged: keep at least its weights digest
            all_tags["kiln.parent_weights_sha256"] = ",".join(weights_sha256(Path(p)) for p in unknown)
        params = {k: str(v)[:PARAM_MAX] for k, v in flatten(config.get("model", {})).items()}
        t = self.tracker
        lm = self.safe(t.client.create_logged_model, t.experiment_id(), name=register_as or f"kiln-{stage}",
                       source_run_id=self.run_id, tags=all_tags, params=params, model_type="kiln-gpt")
        if lm is None:
            return None
        if self.safe(t.client.log_model_artifacts, lm.model_id, str(model_dir)) is None and self.broken:
            return None
        self.safe(t.client.finalize_logged_model, lm.model_id, "READY")
        info = {"model_id": lm.model_id, "name": None, "version": None, "uri": f"models:/{lm.model_id}"}
        if register_as and not self.broken:
            version = self.safe(t._add_version, lm.model_id, register_as, alias, self.run_id)
            if version:
                info.update(name=register_as, version=version, uri=f"models:/{register_as}/{version}")
        return None if self.broken else info
