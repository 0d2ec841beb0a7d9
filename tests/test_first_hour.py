"""Issue 31, the first hour on your own data: the errors a new user meets are one line each, and the noise
other libraries print is gone (only theirs). Through the real CLI wherever the CLI is what the user sees."""

from __future__ import annotations

import pytest

from pipeline.cli import main

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/train/tiny-cpu.yaml"


@pytest.mark.parametrize("command", [
    ["train", "--config", str(TINY), "--set", "data.paths=[{raw}]", "--out", "{tmp}/run"],
    ["eval", "{tmp}/no-model", "--data", "{raw}", "--set", "tracking.enabled=false"],
    ["quantize", "{tmp}/no-model", "--method", "gptq", "--calib", "{raw}", "--out", "{tmp}/q",
     "--set", "tracking.enabled=false"],
])
def test_a_raw_corpus_file_where_a_prep_output_belongs_is_one_line(tmp_path, capsys, command):
    raw = tmp_path / "manpages.jsonl"
    raw.write_text('{"text": "a document"}\n')
    assert main([a.format(raw=raw, tmp=tmp_path) for a in command]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"kiln {command[0]}: error: {raw}: a file, not a `kiln prep` output directory; prepare it first " \
                  f"(kiln prep {raw} --out DIR) and pass DIR", err


def test_a_mistyped_yaml_key_gets_did_you_mean(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text(f"extends: {TINY}\ntrain:\n  stpes: 3\n")
    assert main(["train", "--config", str(typo)]) == 2
    assert capsys.readouterr().err.strip() == f"kiln train: error: {typo}: train.stpes: unknown key (did you mean 'steps'?)"
    typo.write_text(f"extends: {TINY}\ntrian: {{steps: 3}}\n")
    assert main(["train", "--config", str(typo)]) == 2
    assert "trian: unknown key (did you mean 'train'?)" in capsys.readouterr().err


def test_under_torchrun_the_error_line_is_torchruns_root_cause(tmp_path, monkeypatch, capsys):
    """`torchrun ... kiln train` with a TP size that does not divide the heads: torchrun's closing "Root Cause"
    block reads the worker's error file, so it shows Kiln's line, not "To enable traceback see ..."."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    assert main(["train", "--config", str(TINY), "--set", "parallel.tp=3", "--out", str(tmp_path / "run")]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("kiln train: error: --set parallel.tp=3: parallel.tp: 3 does not divide model.n_head")
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file=str(error_file))
    assert failure.message["extraInfo"]["py_callstack"] == line  # what torchrun prints as the root cause


def test_torchaos_missing_kernel_warning_is_dropped_and_nothing_else():
    """torchao logs "Failed to load <path>.so: ..." at import where its optional CUDA kernels cannot load; the CLI's
    logging drops exactly that message from its logger (tested on records of torchao's own format)."""
    import logging

    from pipeline.console import setup_logging

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__()
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    setup_logging()
    torchao, keep = logging.getLogger("torchao"), Keep()
    torchao.addHandler(keep)
    try:
        torchao.warning("Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library")
        torchao.warning("Failed to load the config file")
        torchao.warning("another torchao warning")
    finally:
        torchao.removeHandler(keep)
    assert keep.lines == ["Failed to load the config file", "another torchao warning"]


def test_lm_evals_git_lookup_is_quiet_outside_a_repository(tmp_path, monkeypatch, capfd):
    pytest.importorskip("lm_eval")
    import lm_eval.evaluator as evaluator

    from pipeline.harness.run import quiet_git

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    with quiet_git():
        assert evaluator.get_git_commit_hash() is None
    assert "not a git repository" not in capfd.readouterr().err
    evaluator.get_git_commit_hash()  # lm-eval's own, restored: git's complaint is what the context hides
    assert "not a git repository" in capfd.readouterr().err
