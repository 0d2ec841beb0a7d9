"""Tracking against a real `mlflow server` on 127.0.0.1: runs, datasets, LoggedModels, registry,
fetch (bit-exact), eval attached to the version, lineage back to the prep run, outage + sync."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_tracking_support import MlflowServer, one_thread, text_corpus, train_tiny, train_tokenizer  # noqa: F401

from pipeline.cli import main
from pipeline.config import KilnError, TrackingConfig
from pipeline.model.io import load_model_dir, save_model_dir, write_sums
from pipeline.tracking import RUN_RECORD, Tracker

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield srv
    srv.stop()


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def pipeline(server, tmp_path_factory):
    """prep -> train -> "quantize" under one pipeline run, the way the stages call the tracker."""
    tmp = tmp_path_factory.mktemp("pipe")
    tracker = Tracker(TrackingConfig(experiment="e2e"), uri=server.uri)
    with tracker.pipeline_run("demo", params={"what": "e2e"}) as parent:
        with tracker.stage_run("prep", params={"vocab_size": 400}) as prep:
            corpus = text_corpus(tmp / "corpus", train_tokenizer(tmp / "tok"), n_docs=60, val_docs=4)
            prep.log_corpus_output(corpus)
        with tracker.stage_run("train", params={"train": {"steps": 30}}, run_dir=tmp / "run") as first:
            first.log_metrics({"loss": 6.0}, step=15)  # a first segment: stopped after its checkpoint at step 15
            (tmp / "run" / "checkpoints" / "step_0000015").mkdir(parents=True)
        with tracker.stage_run("train", params={"model": {"n_layer": 2}, "train": {"steps": 30}},
                               run_dir=tmp / "run") as train:  # the rerun resumes it
            train.log_dataset(corpus, "train")
            model_dir, losses = train_tiny(corpus, tmp / "run" / "model", steps=30,
                                           metrics_cb=lambda s, loss: train.log_metrics({"loss": loss}, step=s))
            pretrain = train.log_model(model_dir, stage="pretrain", register_as="kiln-tiny", alias="champion")
        with tracker.stage_run("quantize") as post:
            model, config = load_model_dir(model_dir)
            state = {k: v.half().float() for k, v in model.state_dict().items() if k != "head.lm_head.weight"}
            small = save_model_dir(state, model.cfg, tmp / "small", tokenizer=model_dir / "tokenizer.model")
            quant = post.log_model(small, stage="quantized", parent=model_dir, register_as="kiln-tiny", alias="int8")
    return {"tracker": tracker, "tmp": tmp, "corpus": corpus, "model_dir": model_dir, "pretrain": pretrain,
            "quant": quant, "parent_run": parent.run_id, "run_ids": (prep.run_id, train.run_id, post.run_id),
            "first_segment": first.run_id}


def test_stage_runs_nest_and_record_params_metrics_datasets(pipeline):
    c = pipeline["tracker"].client
    prep_id, train_id, post_id = pipeline["run_ids"]
    for rid in (prep_id, train_id, post_id):
        run = c.get_run(rid)
        assert run.data.tags["mlflow.parentRunId"] == pipeline["parent_run"]
        assert run.info.status == "FINISHED"
        assert run.data.tags["kiln.git_commit"] and run.data.tags["kiln.host"]
    train = c.get_run(train_id)
    assert train.data.params["model.n_layer"] == "2" and train.data.params["train.steps"] == "30"
    assert [m.step for m in c.get_metric_history(train_id, "loss")] == list(range(30))
    (ds,) = train.inputs.dataset_inputs
    digest = json.loads((pipeline["corpus"] / "manifest.json").read_text())["digest"]
    tags = {t.key: t.value for t in ds.tags}
    assert tags["kiln.data_digest"] == digest and ds.dataset.digest == digest[:32]
    assert json.loads(ds.dataset.source)["uri"] == str(pipeline["corpus"].resolve())
    assert c.get_run(prep_id).data.tags["kiln.output_data_digest"] == digest
    assert "manifest.json" in [a.path for a in c.list_artifacts(prep_id)]
    assert json.loads((pipeline["tmp"] / "run" / RUN_RECORD).read_text())["run_id"] == train_id


def test_logged_models_carry_lineage_tags_and_aliases(pipeline):
    c = pipeline["tracker"].client
    pre, quant = pipeline["pretrain"], pipeline["quant"]
    assert (pre["name"], pre["version"], quant["version"]) == ("kiln-tiny", "1", "2")
    lm = c.get_logged_model(quant["model_id"])
    assert str(lm.status).endswith("READY")
    assert lm.tags["kiln.stage"] == "quantized" and lm.tags["kiln.parent_model"] == pre["model_id"]
    digest = json.loads((pipeline["corpus"] / "manifest.json").read_text())["digest"]
    assert lm.tags["kiln.data_digest"] == digest  # inherited from the parent
    assert len(lm.tags["kiln.tokenizer_sha256"]) == 64 and lm.tags["kiln.git_commit"]
    assert c.get_model_version_by_alias("kiln-tiny", "champion").version == "1"
    post_run = c.get_run(pipeline["run_ids"][2])
    assert [m.model_id for m in post_run.inputs.model_inputs] == [pre["model_id"]]


def test_fetch_eval_lineage_end_to_end(pipeline, server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    uri = ["--tracking-uri", server.uri, "--set", "tracking.experiment=e2e"]
    out = tmp_path / "fresh" / "champion"
    assert main(["fetch", "models:/kiln-tiny@champion", "--out", str(out), "--json", *uri]) == 0
    fetched = _last_json(capsys)
    assert fetched["model_id"] == pipeline["pretrain"]["model_id"] and not fetched["cached"]
    trained = load_file(str(pipeline["model_dir"] / "model.safetensors"))
    got = load_file(str(out / "model.safetensors"))
    assert trained.keys() == got.keys() and all(trained[k].equal(got[k]) for k in trained)  # bit for bit
    assert main(["fetch", "models:/kiln-tiny/1", "--out", str(out), "--json", *uri]) == 0
    assert _last_json(capsys)["cached"]

    assert main(["eval", "models:/kiln-tiny@champion", "--data", str(pipeline["corpus"]), "--max-tokens", "200",
                 "--json", *uri]) == 0
    ev = _last_json(capsys)
    assert ev["tokens"] == 200 and ev["bits_per_byte"] > 0
    c = pipeline["tracker"].client
    mv = c.get_model_version("kiln-tiny", "1")
    assert float(mv.tags["kiln.eval.val.perplexity"]) == pytest.approx(ev["perplexity"])
    lm = c.get_logged_model(pipeline["pretrain"]["model_id"])
    assert {m.key: m.value for m in lm.metrics}["perplexity"] == pytest.approx(ev["perplexity"])

    assert main(["lineage", "models:/kiln-tiny@int8", "--json", *uri]) == 0
    printed = capsys.readouterr()
    tree = json.loads(printed.out.strip().splitlines()[-1])
    assert "lineage of models:/kiln-tiny@int8" in printed.err and "prep run prep" in printed.err
    assert tree["stage"] == "quantized" and tree["version"] == "2" and tree["alias"] == "int8"
    (parent,) = tree["parents"]
    assert parent["model_id"] == pipeline["pretrain"]["model_id"] and parent["stage"] == "pretrain"
    assert parent["run"]["name"] == "train" and parent["run"]["run_id"] == pipeline["run_ids"][1]
    [segment] = parent["run"]["continues"]  # the resumed run links the run it continued
    assert (segment["run_id"], segment["last_step"]) == (pipeline["first_segment"], 15)
    assert f"resumes run train {pipeline['first_segment']} (FINISHED, to step 15)" in " ".join(printed.err.split())
    (ds,) = parent["datasets"]
    assert ds["digest"] == json.loads((pipeline["corpus"] / "manifest.json").read_text())["digest"]
    assert [p["run_id"] for p in ds["prep_runs"]] == [pipeline["run_ids"][0]]


def test_compare_puts_speeds_side_by_side_only_when_measured_alike(pipeline, server, monkeypatch, capsys):
    """Each eval records the device, CPU threads and batch size of its tokens/s (run params and version tags);
    `kiln eval --compare` gives a speed ratio only when the aliases' agree, else one line saying what differs."""
    import torch

    uri = ["--tracking-uri", server.uri]
    old = torch.get_num_threads()
    try:
        for alias, threads in (("champion", "1"), ("int8", "1"), ("int8", "2")):
            monkeypatch.setenv("OMP_NUM_THREADS", threads)  # the user's choice wins over the affinity mask
            assert main(["eval", f"models:/kiln-tiny@{alias}", "--data", str(pipeline["corpus"]), "--max-tokens",
                         "64", "--json", *uri]) == 0
            ev = _last_json(capsys)
            assert (ev["device"], ev["threads"], ev["batch_size"]) == ("cpu", int(threads), 8)
            if threads == "1":
                assert main(["eval", "--compare", "models:/kiln-tiny", "--json", *uri]) == 0
                printed = capsys.readouterr()
                out = json.loads(printed.out.strip().splitlines()[-1])
                assert out["speed_notes"] == [] or alias == "champion", out["speed_notes"]
        run = pipeline["tracker"].client.get_run(ev["tracking"]["run_id"])
        assert run.data.params["threads"] == "2" and run.data.params["device"] == "cpu"
        assert "val.tokens_per_s / champion's" in " ".join(printed.err.split())  # alike: the ratio row
        assert main(["eval", "--compare", "models:/kiln-tiny", "--json", *uri]) == 0
        printed = capsys.readouterr()
        notes = json.loads(printed.out.strip().splitlines()[-1])["speed_notes"]
        assert notes == ["val.tokens_per_s: not compared, measured with different threads "
                         "(champion: threads 1; int8: threads 2)"]
        assert notes[0] in " ".join(printed.err.split()) and "/ champion's" not in printed.err
    finally:
        torch.set_num_threads(old)


def test_register_cli_reuses_the_logged_model_of_the_same_weights(pipeline, server, capsys):
    uri = ["--tracking-uri", server.uri, "--set", "tracking.experiment=e2e"]
    assert main(["register", str(pipeline["model_dir"]), "--name", "kiln-other", "--alias", "best", "--json", *uri]) == 0
    res = _last_json(capsys)
    assert res["model_id"] == pipeline["pretrain"]["model_id"] and res["uri"] == "models:/kiln-other/1"
    assert pipeline["tracker"].client.get_model_version_by_alias("kiln-other", "best").version == "1"


@pytest.mark.fault
def test_fetch_refuses_a_tampered_artifact(pipeline, server, tmp_path, capsys):
    mid = pipeline["quant"]["model_id"]
    (weights,) = server.root.glob(f"artifacts/**/{mid}/artifacts/model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["fetch", "models:/kiln-tiny@int8", "--out", str(tmp_path / "bad"), "--tracking-uri", server.uri]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum mismatch" in err[0]
    assert not (tmp_path / "bad").exists()  # nothing half-fetched left in place


def test_unknown_alias_is_one_line(server, capsys, tmp_path):
    assert main(["fetch", "models:/kiln-tiny@nope", "--out", str(tmp_path / "x"), "--tracking-uri", server.uri]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "models:/kiln-tiny@nope" in err[0]


@pytest.mark.fault
def test_server_killed_mid_run_then_sync_replays(server, tmp_path, monkeypatch):
    """A real `kiln train` whose tracking server is killed once its run exists; the server is restarted
    (same port, same database) for `kiln track sync`."""
    import subprocess

    from factories import ROOT, TRAIN_ENV, fake_corpus, kiln_train_cmd

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # sync must find the server from the run's record
    srv = server
    run_dir = tmp_path / "run"
    env = {k: v for k, v in TRAIN_ENV.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = kiln_train_cmd(run_dir, f"data.paths=[{fake_corpus(tmp_path / 'corpus', vocab_size=128)}]",
                         "train.steps=12", "train.log_every=1", "checkpoint.every=100", "tracking.enabled=true",
                         ) + ["--tracking-uri", srv.uri]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        record_path = run_dir / RUN_RECORD
        while not (record_path.exists() and json.loads(record_path.read_text() or "{}").get("run_id")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]  # the stage created its run on the server
            time.sleep(0.05)
        srv.stop()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        assert err.count("MLflow at") == 1 and "kiln track sync" in err, err[-3000:]  # one warning, then silence
        record = json.loads(record_path.read_text())
        assert record["status"] == "FINISHED"

        srv.start()  # same port, same database
        for _ in range(2):  # idempotent
            assert main(["track", "sync", str(run_dir), "--json"]) == 0
        c = Tracker(uri=srv.uri).client
        assert [m.step for m in c.get_metric_history(record["run_id"], "loss")] == list(range(1, 13))
        assert c.get_run(record["run_id"]).info.status == "FINISHED"
    finally:
        if proc.poll() is None:
            proc.kill()
        if srv.proc is None or srv.proc.poll() is not None:
            srv.start()


@pytest.mark.fault
def test_sync_creates_a_run_when_the_server_was_down_from_the_start(tmp_path, monkeypatch, caplog, capsys):
    from test_tracking_support import free_port

    run_dir = tmp_path / "run"
    with Tracker(uri=f"http://127.0.0.1:{free_port()}").stage_run("train", run_dir=run_dir) as run:
        run.log_metrics({"loss": 1.0}, step=0)
    assert run.run_id is None
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": 0.5}\nnot json\n')
    db = f"sqlite:///{tmp_path / 'later.db'}"
    monkeypatch.chdir(tmp_path)
    assert main(["track", "sync", str(run_dir), "--tracking-uri", db, "--json"]) == 0
    res = _last_json(capsys)
    assert res["replayed"] == 2 and res["bad_lines"] == 1
    assert json.loads((run_dir / RUN_RECORD).read_text())["run_id"] == res["run_id"]
    hist = Tracker(uri=db).client.get_metric_history(res["run_id"], "loss")
    assert sorted((m.step, m.value) for m in hist) == [(0, 1.0), (1, 0.5)]


def test_disabled_tracking_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for tracker in (Tracker(TrackingConfig(enabled=False)), _rank1_tracker(monkeypatch)):
        assert not tracker.enabled
        with tracker.pipeline_run("p"), tracker.stage_run("train", params={"a": 1}, run_dir=tmp_path / "r") as run:
            run.log_metrics({"loss": 1.0}, step=0)
            run.log_artifact(tmp_path)
            assert run.log_model(tmp_path, stage="pretrain", register_as="x") is None
            assert run.run_id is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no mlflow.db, no mlruns, no run record


def _rank1_tracker(monkeypatch) -> Tracker:
    monkeypatch.setenv("RANK", "1")
    t = Tracker()
    monkeypatch.delenv("RANK")
    return t


def test_sqlite_store_registers_and_fetches_without_a_server(tmp_path, monkeypatch):
    """The default URI (sqlite:///mlflow.db in the cwd) supports the whole registry path too."""
    from factories import fake_corpus

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    corpus = fake_corpus(tmp_path / "c", vocab_size=64)
    model_dir, _ = train_tiny(corpus, tmp_path / "m", steps=2)
    tracker = Tracker()
    assert tracker.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with tracker.stage_run("train") as run:
        run.log_dataset(corpus, "train")
        info = run.log_model(model_dir, stage="pretrain", register_as="local", alias="champion")
    assert info["uri"] == "models:/local/1"
    fetched = tracker.fetch("models:/local@champion", tmp_path / "f")
    assert Path(fetched["out"], "model.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    with pytest.raises(KilnError, match="models:/local@nope"):
        tracker.resolve("models:/local@nope")
    shutil.rmtree(tmp_path / "f")
    # `kiln register` of a MODEL dir never logged before takes stage and parent from its "kiln" lineage block
    # (the parent found by its weights digest, the path never opened)
    student, _ = train_tiny(corpus, tmp_path / "s", steps=3)
    config = json.loads((student / "config.json").read_text())
    weights = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()  # as post/common.py writes
    config["kiln"] = {"stage": "distilled", "parent_model": str(model_dir), "parent_sha256": weights}
    (student / "config.json").write_text(json.dumps(config))
    write_sums(student)
    tags = tracker.client.get_logged_model(tracker.register(student, "student")["model_id"]).tags
    assert tags["kiln.stage"] == "distilled" and tags["kiln.parent_model"] == info["model_id"]
