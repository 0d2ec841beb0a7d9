"""lm-eval results on the model they measured, and the table across a registered model's aliases.

One `eval` run per `kiln eval --tasks`: metrics `<task>.<metric>` (linked to the logged model),
each task's documents as a dataset input (digest over the documents scored), and on the
registry version the tags `kiln.eval.<task>.<metric>`, the same place `kiln eval --data`
puts `kiln.eval.<split>.<metric>`. `kiln eval --compare models:/NAME` reads those tags back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlflow.entities import LoggedModelInput

from pipeline.config import ConfigError

if TYPE_CHECKING:
    from pipeline.tracking.tracker import Tracker

EVAL_TAG = "kiln.eval."


def attach_harness(tracker: Tracker, model: str, local_dir: str, result: dict, params: dict) -> dict | None:
    """Log `run_tasks`' result for `model` (a models:/ URI or a MODEL dir)."""
    from pipeline.tracking.registry import model_id_for, resolve

    if not tracker.enabled:
        return None
    with tracker.stage_run("eval", params={"model": model, **params}, tags={"kiln.eval": "lm-eval"}) as run:
        if not run.run_id:
            return None
        model_id = run.safe(model_id_for, tracker, model if model.startswith("models:/") else local_dir)
        for task, ds in result["datasets"].items():
            run.log_input_dataset(ds["name"], ds["digest"], {"task": task, "dataset_path": ds["source"]},
                                  {"docs": ds["docs"], "output_type": ds["output_type"]}, "evaluation",
                                  {"kiln.eval_task": task}, source_type="lm_eval")
        metrics = {f"{task}.{k}": v for task, row in result["results"].items() for k, v in row.items()}
        # how many documents each number rests on (--limit differs between runs): compared side by side
        metrics.update({f"{task}.docs": ds["docs"] for task, ds in result["datasets"].items()})
        run.log_metrics(metrics, step=0, model_id=model_id)
        if model_id:
            run.safe(tracker.client.log_inputs, run.run_id, models=[LoggedModelInput(model_id)])
        if model.startswith("models:/") and model_id:
            ref = run.safe(resolve, tracker, model)
            if ref and ref.version:
                for key, value in metrics.items():
                    run.safe(tracker.client.set_model_version_tag, ref.name, ref.version, EVAL_TAG + key, str(value))
        return {"run_id": run.run_id, "model_id": model_id}


def eval_table(tracker: Tracker, uri: str) -> list[dict]:
    """One row per alias of registered model NAME (models:/NAME): its version, stage and every
    `kiln.eval.*` value recorded on that version (standard errors left out)."""
    if not uri.startswith("models:/") or "@" in uri or "/" in uri[len("models:/"):].strip("/"):
        raise ConfigError(f"--compare {uri}: expected models:/NAME (a registered model, all its aliases)")
    name = uri[len("models:/"):].strip("/")
    c = tracker.client
    rm = tracker.strict(uri, c.get_registered_model, name)
    rows = []
    for alias, version in sorted(rm.aliases.items(), key=lambda a: (int(a[1]), a[0])):
        mv = tracker.strict(uri, c.get_model_version, name, version)
        row = {"alias": alias, "version": str(version), "stage": mv.tags.get("kiln.stage")}
        for key, value in sorted(mv.tags.items()):
            if key.startswith(EVAL_TAG) and "_stderr" not in key:
                try:
                    row[key[len(EVAL_TAG):]] = float(value)
                except ValueError:
                    if key.endswith(".device"):  # the one text value: where a tokens/s was measured
                        row[key[len(EVAL_TAG):]] = value
        rows.append(row)
    return rows
