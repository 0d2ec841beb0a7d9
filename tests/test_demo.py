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
                         capture_output=True, text=True, env=env, timeout=int(os.environ.get("KILN_DEMO_TIMEOUT", "900")), cwd=tmp_path)
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
    sft = json.loads((out / "fetched" / "sft" / "config.json").read_text())["kiln"]  # `kiln sft` -> @sft -> fetch
    assert sft["stage"] == "sft" and isinstance(summary["chat"]["reply"], str)
    assert "made from" in res.stderr and "dataset prep digest" in res.stderr  # the lineage tree reached the corpus
    scored = {row["model"]: row.get("kiln_stdlib_mc.acc") for row in summary["eval"]}  # the quick demo: int8 only
    assert 0 <= scored.pop("int8") <= 1 and set(scored.values()) == {None}, scored
    assert "kiln eval --compare models:/kiln-demo" in res.stderr
    assert json.loads((out / "fetched-hf/int8/config.json").read_text())["quantization_config"]["quant_method"] == "torchao"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "demo"]  # everything under --out: no ./mlruns
    assert sorted(p.name for p in (out / "mlruns").iterdir())  # the registry's files are there
    mlflow_ui_shows_the_lineage(out, summary["mlflow_ui_page"])


def mlflow_ui_shows_the_lineage(out: Path, start_page: str) -> None:
    """A real browser on `mlflow server` over the demo's store: what the pages show."""
    from mlflow import MlflowClient

    from tests.browser import page_text
    from tests.test_tracking_support import MlflowServer

    server = MlflowServer(out).start()
    try:
        c = MlflowClient(server.uri)
        exp = c.get_experiment_by_name("kiln-demo").experiment_id
        runs = {}
        for r in c.search_runs([exp]):
            runs.setdefault((r.info.run_name, r.data.tags.get("kiln.eval", "")), r)
        int8 = c.get_model_version_by_alias("kiln-demo", "int8")
        ml = "?workflowType=machine_learning"

        text = page_text(server.uri + start_page)  # the link the demo prints: the model-training view
        assert "Runs" in text and "matching runs" in text and "Token Usage" not in text

        text = page_text(f"{server.uri}/#/experiments/{exp}/models/{int8.tags['kiln.model_id']}{ml}")
        assert "Not registered" not in text  # the version is linked to its logged model
        assert f"Model versions\nkiln-demo\nv{int8.version}" in text

        gptq = next(r for (name, _), r in runs.items() if name == "quantize" and r.data.params["method"] == "gptq")
        text = page_text(f"{server.uri}/#/experiments/{exp}/runs/{gptq.info.run_id}{ml}")
        assert "Logged models (3)" in text and "kiln-demo-hf" in text  # input, Kiln and transformers outputs
        assert "perplexity" in text and "size_mb" in text and "calibration" in text  # before/after, its dataset

        distill = runs[("distill", "")]
        text = page_text(f"{server.uri}/#/experiments/{exp}/runs/{distill.info.run_id}{ml}")
        assert {"loss", "kl", "ce", "lr", "val_loss"} <= set(text.splitlines())  # its curves and before/after

        lm_eval = runs[("eval", "lm-eval")]
        text = page_text(f"{server.uri}/#/experiments/{exp}/runs/{lm_eval.info.run_id}{ml}")
        assert "kiln_stdlib_mc.acc" in text and "evaluation" in text and "kiln_stdlib_mc (" in text  # its dataset
    finally:
        server.stop()
