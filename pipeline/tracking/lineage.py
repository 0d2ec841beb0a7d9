"""`kiln lineage`: model -> parent model(s) -> the run that made each (and the runs it resumed) -> its datasets
-> the prep run.

Walks the `kiln.*` tags that StageRun.log_model and log_dataset leave behind; a
parent already visited is reported as a cycle instead of followed.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.tracking.tracker import Tracker


def lineage(tracker: Tracker, uri: str) -> dict:
    """model -> parent model(s) -> training run -> dataset digest -> prep run, as a nested dict."""
    ref = tracker.resolve(uri)
    root = _model_node(tracker, ref.model_id, seen=set())
    root.update({"uri": uri, "registered_name": ref.name, "version": ref.version, "alias": ref.alias})
    return root


def _model_node(tracker: Tracker, model_id: str, seen: set[str]) -> dict:
    c = tracker.client
    lm = tracker.strict(model_id, c.get_logged_model, model_id)
    tags = {k: v for k, v in lm.tags.items() if k.startswith("kiln.")}
    node: dict[str, Any] = {"model_id": model_id, "name": lm.name, "stage": tags.get("kiln.stage"),
                            "tags": tags, "metrics": {m.key: m.value for m in (lm.metrics or [])},
                            "run": None, "datasets": [], "parents": []}
    seen.add(model_id)
    if lm.source_run_id:
        run = tracker.strict(lm.source_run_id, c.get_run, lm.source_run_id)
        node["run"] = {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                       "stage": run.data.tags.get("kiln.stage"), "git_commit": run.data.tags.get("kiln.git_commit"),
                       "continues": _segments(tracker, run)}
        for d in run.inputs.dataset_inputs:
            dtags = {t.key: t.value for t in d.tags}
            node["datasets"].append(_dataset_node(tracker, dtags.get("kiln.data_digest", d.dataset.digest),
                                                  d.dataset.name, d.dataset.source, dtags))
    if not node["datasets"] and tags.get("kiln.data_digest"):
        node["datasets"].append(_dataset_node(tracker, tags["kiln.data_digest"], None, None, {}))
    for parent in filter(None, tags.get("kiln.parent_model", "").split(",")):
        if parent in seen:
            node["parents"].append({"model_id": parent, "cycle": True})
        else:
            node["parents"].append(_model_node(tracker, parent, seen))
    return node


def _segments(tracker: Tracker, run) -> list[dict]:
    """The earlier runs a resumed run continued (`kiln.continues_run`), newest first."""
    out: list[dict] = []
    rid = run.data.tags.get("kiln.continues_run")
    while rid and rid not in {s["run_id"] for s in out}:
        prev = tracker.strict(rid, tracker.client.get_run, rid)
        out.append({"run_id": rid, "name": prev.info.run_name, "status": prev.info.status,
                    "git_commit": prev.data.tags.get("kiln.git_commit"), "last_step": _last_step(tracker, prev)})
        rid = prev.data.tags.get("kiln.continues_run")
    return out


def _last_step(tracker: Tracker, run) -> int | None:
    """The last step a run logged its loss at (how far that segment trained)."""
    if "loss" not in (run.data.metrics or {}):
        return None
    return max((m.step for m in tracker.client.get_metric_history(run.info.run_id, "loss")), default=None)


def _dataset_node(tracker: Tracker, digest: str, name: str | None, source: str | None, tags: dict) -> dict:
    exps = [e.experiment_id for e in tracker.client.search_experiments()]
    runs = tracker.client.search_runs(exps, f"tags.`kiln.output_data_digest` = '{digest}'", max_results=5)
    prep = [{"run_id": r.info.run_id, "name": r.info.run_name, "status": r.info.status,
             "git_commit": r.data.tags.get("kiln.git_commit")} for r in runs]
    try:
        source = json.loads(source).get("uri", source) if source else None
    except (json.JSONDecodeError, AttributeError):
        pass
    return {"digest": digest, "name": name, "source": source, "split": tags.get("kiln.split"),
            "context": tags.get("mlflow.data.context"), "prep_runs": prep}
