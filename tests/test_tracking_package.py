"""Dependency rules around tracking: the CLI and checkpointing start without mlflow (that only
pipeline/tracking/ imports it is checked on the source by tests/test_architecture.py); the git commit
has one source for checkpoints and MLflow tags."""

import json
import subprocess
import sys
from pathlib import Path

from pipeline import checkpoint
from pipeline.tracking import system_tags


def test_cli_and_checkpoint_start_without_mlflow(root):
    code = "import sys, pipeline.cli, pipeline.checkpoint; print(sorted(m for m in sys.modules if m.startswith('mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_checkpoints_and_run_tags_record_the_same_commit(root, tmp_path, monkeypatch):
    """A real checkpoint save and the MLflow system tags both record Kiln's own HEAD, also when the
    process runs elsewhere (the commit is the code's, not the working directory's)."""
    monkeypatch.delenv("KILN_GIT_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()

    class Engine:  # what save_checkpoint needs of a DeepSpeed engine
        def save(self, path):  # returns {file: sha256} of what it wrote, as Engine.save does
            Path(path, "ds").mkdir()
            return {}

    ckpt = checkpoint.save_checkpoint(Engine(), tmp_path / "ckpts", 3, {"config": {}}, keep=1)
    recorded = json.loads((ckpt / "kiln_state.json").read_text())["code_commit"]
    assert len(head) == 40 and recorded == head and system_tags()["kiln.git_commit"] == head
    monkeypatch.setenv("KILN_GIT_COMMIT", "0123abc")  # installs without .git name it explicitly
    assert system_tags()["kiln.git_commit"] == "0123abc"
