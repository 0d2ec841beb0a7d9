"""Dependency rules around tracking: only pipeline/tracking/ imports mlflow, and the CLI and
checkpointing start without it; the git commit has one source for checkpoints and MLflow tags."""

import re
import subprocess
import sys

from pipeline import checkpoint
from pipeline.tracking import system_tags

IMPORTS_MLFLOW = re.compile(r"^\s*(import mlflow|from mlflow[\s.])", re.M)


def test_only_the_tracking_package_imports_mlflow(root):
    importers = sorted(str(p.relative_to(root)) for d in ("pipeline", "data_prep", "bench")
                       for p in (root / d).rglob("*.py") if IMPORTS_MLFLOW.search(p.read_text()))
    assert importers, "the pattern no longer finds the tracking package's own imports"
    assert [p for p in importers if not p.startswith("pipeline/tracking/")] == []


def test_cli_and_checkpoint_start_without_mlflow(root):
    code = "import sys, pipeline.cli, pipeline.checkpoint; print(sorted(m for m in sys.modules if m.startswith('mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_checkpoints_and_run_tags_record_the_same_commit(monkeypatch):
    monkeypatch.setenv("KILN_GIT_COMMIT", "0123abc")
    assert checkpoint.git_commit() == "0123abc"
    assert system_tags()["kiln.git_commit"] == "0123abc"
