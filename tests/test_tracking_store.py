"""Where a store keeps its artifacts, and read-only commands that never create one."""

import pytest

from pipeline.config import KilnError
from pipeline.tracking import store


def test_sqlite_artifacts_live_next_to_the_database(tmp_path):
    assert store.artifact_root(f"sqlite:///{tmp_path}/x/mlflow.db") == (tmp_path / "x" / "mlruns").as_uri()
    assert store.artifact_root("http://127.0.0.1:5000") is None


def test_require_existing_names_the_store_and_the_way_out(tmp_path):
    with pytest.raises(KilnError, match=f"no MLflow store at {tmp_path}/none.db.*--tracking-uri"):
        store.require_existing(f"sqlite:///{tmp_path}/none.db")
    store.require_existing("http://127.0.0.1:1")  # a server: nothing to check locally
    (tmp_path / "some.db").touch()
    store.require_existing(f"sqlite:///{tmp_path}/some.db")


@pytest.mark.parametrize("argv", [["lineage", "models:/kiln-demo@gptq4"],
                                  ["fetch", "models:/kiln-demo@gptq4", "--out", "fetched"],
                                  ["eval", "--compare", "models:/kiln-demo"]])
def test_read_only_commands_create_no_store(tmp_path, monkeypatch, capsys, argv):
    from pipeline.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"no MLflow store at {tmp_path / 'mlflow.db'}" in err and "--tracking-uri" in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no mlflow.db, no mlruns, no fetched/
