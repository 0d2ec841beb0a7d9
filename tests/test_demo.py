"""The `make demo` path end to end, with a smaller corpus and fewer steps (`kiln demo --quick`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "KILN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the demo uses its own sqlite store under --out
    res = subprocess.run([str(BIN / "kiln"), "demo", "--quick", "--out", str(tmp_path / "demo"), "--json"],
                         capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    out = Path(summary["out"])
    assert summary["val_loss"] < summary["ln_vocab"] - 1.0  # learned something real in 40 steps
    assert {row["model"] for row in summary["eval"]} == {"champion", "int8", "gptq4", "student"}
    by_name = {row["model"]: row for row in summary["eval"]}
    assert by_name["int8"]["size_mb"] < by_name["champion"]["size_mb"]
    assert by_name["gptq4"]["size_mb"] < by_name["int8"]["size_mb"]
    assert abs(by_name["int8"]["perplexity"] / by_name["champion"]["perplexity"] - 1) < 0.05
    assert all(text.strip() for text in summary["samples"])
    assert Path(summary["curves_png"]).stat().st_size > 1000
    for alias in ("champion", "int8", "gptq4", "student"):
        assert (out / "fetched" / alias / "SHA256SUMS").exists()
    assert (out / "export-hf" / "config.json").exists()
    assert "made from" in res.stderr and "dataset prep digest" in res.stderr  # the lineage tree reached the corpus
    assert not (tmp_path / "mlflow.db").exists()  # everything stayed under --out
