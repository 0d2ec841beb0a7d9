"""`kiln eval --tasks`: lm-evaluation-harness on Kiln models, offline, results on the model version."""

import json
import sys

import pytest

from pipeline.harness.run import run_tasks
from tests.factories import ROOT

TASKS = ["kiln_pydoc", "kiln_stdlib_mc"]


@pytest.fixture
def family(tiny_family):
    return tiny_family


@pytest.mark.slow
def test_kiln_lm_scores_as_lm_evals_own_hf_model(family, tmp_path):
    """KilnLM on a MODEL dir and lm-eval's HFLM on its transformers export give the same numbers."""
    from pipeline.export import export

    export(family["plain"], tmp_path / "hf", "hf")
    ours = run_tasks(family["plain"], TASKS, limit=2, batch_size=8)
    theirs = run_tasks(tmp_path / "hf", TASKS, limit=2, batch_size=8)
    for task in TASKS:
        assert ours["datasets"][task]["digest"] == theirs["datasets"][task]["digest"]  # the same documents
    mc, ref = ours["results"]["kiln_stdlib_mc"], theirs["results"]["kiln_stdlib_mc"]
    assert (mc["acc"], mc["acc_norm"]) == (ref["acc"], ref["acc_norm"])
    bpb, ref_bpb = ours["results"]["kiln_pydoc"]["bits_per_byte"], theirs["results"]["kiln_pydoc"]["bits_per_byte"]
    print(f"kiln_pydoc bits/byte: KilnLM {bpb:.6f}, lm-eval HFLM {ref_bpb:.6f}")
    assert abs(bpb - ref_bpb) < 1e-4 * ref_bpb


def test_local_tasks_are_built_from_pythons_own_text():
    sys.path.insert(0, str(ROOT / "pipeline/harness/tasks"))
    try:
        import kiln_tasks
    finally:
        sys.path.pop(0)
    mc = kiln_tasks.stdlib_summaries()["test"]
    assert len(mc) >= 100
    row = next(r for r in mc if r["signature"] == "abs(x, /)")
    assert row["choices"][row["label"]] == "Return the absolute value of the argument."
    assert len(set(row["choices"])) == 4
    assert len(kiln_tasks.pydoc_topics()["test"]) > 50


@pytest.mark.slow
def test_kiln_eval_tasks_attaches_results_to_the_version_and_compare_prints_them(family, tmp_path, monkeypatch,
                                                                                 capsys):
    """The CLI on a registered int8 model, served as Kiln serves it; then --compare across aliases."""
    from pipeline.cli import main
    from pipeline.config import TrackingConfig
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(TrackingConfig(experiment="harness"), uri=uri)
    for alias in ("plain", "int8"):
        tracker.register(family[alias], "tiny", alias=alias)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["eval", "models:/tiny@int8", "--tasks", "kiln_stdlib_mc", "--limit", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    acc = out["lm_eval"]["results"]["kiln_stdlib_mc"]["acc"]
    assert 0 <= acc <= 1
    c = tracker.client
    mv = c.get_model_version_by_alias("tiny", "int8")
    assert float(mv.tags["kiln.eval.kiln_stdlib_mc.acc"]) == acc
    run = c.get_run(out["lm_eval"]["tracking"]["run_id"])
    assert run.data.metrics["kiln_stdlib_mc.acc"] == acc
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == "kiln_stdlib_mc" and json.loads(ds.dataset.profile)["docs"] == 8
    assert {m.model_id for m in run.inputs.model_inputs} == {mv.tags["kiln.model_id"]}
    assert main(["eval", "--compare", "models:/tiny", "--json"]) == 0
    printed = capsys.readouterr()
    rows = json.loads(printed.out.strip().splitlines()[-1])["rows"]
    assert [(r["alias"], r.get("kiln_stdlib_mc.acc")) for r in rows] == [("plain", None), ("int8", acc)]
    assert "kiln_stdlib_mc.acc" in printed.err + printed.out  # the printed table


def test_unknown_task_is_one_line_usage_error(tmp_path, monkeypatch):
    """Looked up in Kiln's tasks, then lm-eval's whole catalogue (here a stand-in: indexing it takes ~30 s)."""
    import lm_eval.tasks

    from pipeline.config import ConfigError

    class Catalogue:
        def __init__(self, include_path=None, include_defaults=True):
            self.all_tasks = ["kiln_pydoc", "kiln_stdlib_mc"] + (["hellaswag"] if include_defaults else [])

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Catalogue)
    with pytest.raises(ConfigError, match="unknown task.*kiln_no_such_task"):
        run_tasks(tmp_path, ["hellaswag", "kiln_no_such_task"], limit=1)
