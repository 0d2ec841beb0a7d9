"""StageRun: what one stage logs into its run. Every call is safe to make with tracking off,
on ranks other than 0, or after the server went away (one warning, then silence)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModelInput,
    LoggedModelOutput,
    Metric,
    Param,
    RunTag,
)

from pipeline.config import flatten
from pipeline.console import log
from pipeline.credentials import redact
from pipeline.provenance import git_commit
from pipeline.tracking.common import PARAM_MAX, PARENT_ENV, RUN_RECORD, is_number, one_line, system_tags
from pipeline.tracking.registry import add_version, file_sha, weights_sha256

if TYPE_CHECKING:
    from pipeline.tracking.tracker import Tracker


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
                        self.tracker.uri, redact(one_line(err)), self.stage, where)
            return None

    def _record(self, **fields) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / RUN_RECORD
        record = json.loads(path.read_text()) if path.exists() else {}
        record.update(stage=self.stage, tracking_uri=self.tracker.uri, **fields)
        path.write_text(json.dumps(record, indent=2) + "\n")

    def continued_run(self) -> str | None:
        """The run this one resumes: the last run of this stage recorded in a run dir that holds checkpoints
        (a rerun of `kiln train` into its --out continues from them), on the same tracking server."""
        path = self.run_dir / RUN_RECORD if self.run_dir else None
        if path is None or not path.is_file() or not (self.run_dir / "checkpoints").is_dir():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        same = record.get("stage") == self.stage and record.get("tracking_uri") == self.tracker.uri
        return record.get("run_id") if same else None

    def start(self, params: Any, tags: dict) -> None:
        t = self.tracker
        parent = t.parent_run_id or os.environ.get(PARENT_ENV)
        all_tags = {"kiln.stage": self.stage, **system_tags(), **{k: str(v) for k, v in tags.items()}}
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        continued = self.continued_run()
        if continued:
            all_tags["kiln.continues_run"] = continued
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
                 if k != "step" and is_number(v)]
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
        self.log_input_dataset(prep_dir.name, corpus.digest, {"uri": str(prep_dir)}, profile, context,
                               {"kiln.data_digest": corpus.digest, "kiln.split": split})
        self.set_tags({"kiln.data_digest": ",".join(dict.fromkeys(self.data_digests))})

    def log_input_dataset(self, name: str, digest: str, source: dict, profile: dict, context: str,
                          tags: dict | None = None, source_type: str = "local") -> None:
        """One dataset input of this run (MLflow shows the first 32 characters of the digest)."""
        if not self.active:
            return
        ds = Dataset(name=name, digest=digest[:32], source_type=source_type, source=json.dumps(source),
                     profile=json.dumps(profile))
        input_tags = [InputTag("mlflow.data.context", context), *(InputTag(k, str(v)) for k, v in (tags or {}).items())]
        self.safe(self.tracker.client.log_inputs, self.run_id, datasets=[DatasetInput(ds, input_tags)])

    def log_sft_data(self, digest: str, paths: list[str], counts: dict) -> None:
        """Supervised fine-tuning's conversations as a run input: digest = `kiln sft`'s data digest (every input
        file's sha256 and the loss mask), source = the paths given."""
        self.data_digests.append(digest)
        if not self.active:
            return
        self.log_input_dataset("sft-data", digest, {"uris": [str(p) for p in paths]}, counts,
                               "supervised fine-tuning", {"kiln.data_digest": digest})
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
            data_digest = ",".join(dict.fromkeys(self.data_digests)) or config.get("kiln", {}).get("data_digest")
        if data_digest is None and parent_ids:
            lm = self.safe(self.tracker.client.get_logged_model, parent_ids[0])
            data_digest = lm.tags.get("kiln.data_digest") if lm else None
        all_tags = {"kiln.stage": stage, "kiln.parent_model": ",".join(parent_ids),
                    "kiln.data_digest": data_digest or "unknown",
                    "kiln.tokenizer_sha256": file_sha(model_dir, "tokenizer.model") or "none",
                    "kiln.git_commit": git_commit() or "unknown", "kiln.weights_sha256": weights_sha256(model_dir),
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
        self.log_output_model(lm.model_id)
        info = {"model_id": lm.model_id, "name": None, "version": None, "uri": f"models:/{lm.model_id}"}
        if register_as and not self.broken:
            version = self.safe(add_version, t, lm.model_id, register_as, alias, self.run_id)
            if version:
                info.update(name=register_as, version=version, uri=f"models:/{register_as}/{version}")
                from pipeline.tracking.forms import log_hf_form

                info["hf"] = log_hf_form(self, model_dir, info, all_tags, alias)
        return None if self.broken else info

    def log_output_model(self, model_id: str) -> None:
        """The run page lists the models it produced (MLflow 3 run outputs)."""
        if self.active:
            self.safe(self.tracker.client.log_outputs, self.run_id, [LoggedModelOutput(model_id, 0)])
