"""The installed `kiln` console script: help, exit codes, --json, one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import build_parser, main

COMMANDS = ["prep", "train", "verify", "export", "quantize", "distill", "prune", "eval", "generate", "register",
            "fetch", "lineage", "plot", "track", "plan", "launch", "demo"]


def run_kiln(*args, cwd=None):
    exe = shutil.which("kiln") or str(__import__("pathlib").Path(sys.executable).parent / "kiln")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_installed_kiln_help():
    res = run_kiln("--help")
    assert res.returncode == 0
    for cmd in COMMANDS:
        assert cmd in res.stdout


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_subcommand_has_help_with_example(cmd, capsys):
    argv = [cmd, "torchrun", "--help"] if cmd == "launch" else [cmd, "--help"]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and "--json" in out and "--set" in out and "--config" in out


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "slurm", "ray"])
def test_every_launcher_has_help_with_example(launcher, capsys):
    with pytest.raises(SystemExit):
        main(["launch", launcher, "--help"])
    out = capsys.readouterr().out
    assert "example:" in out and "--dry-run" in out
    if launcher == "ray":
        assert "no authentication" in out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["prep"])
    assert exit_.value.code == 2


def test_config_error_exits_2_with_one_line(capsys):
    assert main(["train", "--set", "parallel.zero_stage=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kiln train: error: --set parallel.zero_stage=4: parallel.zero_stage: 4 is not one of 0,1,2,3"]


def test_plan_json_is_last_stdout_line():
    res = run_kiln("plan", "--gpus", "64", "--hours", "720", "--gpu", "h100", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["model_config"] == "6.7b"
    assert summary["optimal_tokens"] == pytest.approx(20 * summary["optimal_params"])
    assert "Chinchilla" in res.stderr  # the human table goes to stderr


def test_unknown_gpu_is_a_config_error(capsys):
    assert main(["plan", "--gpus", "8", "--hours", "1", "--gpu", "tpu9"]) == 2
    assert "unknown GPU" in capsys.readouterr().err


def test_parser_covers_design_contract():
    parser = build_parser()
    args = parser.parse_args(["generate", "m", "--prompt", "hi", "--top-k", "5", "--top-p", "0.9", "--seed", "3"])
    assert (args.top_k, args.top_p, args.seed) == (5, 0.9, 3)
    args = parser.parse_args(["prep", "a.jsonl", "b.jsonl", "--out", "o", "--langs", "en,de", "--no-dedup"])
    assert args.inputs == ["a.jsonl", "b.jsonl"] and args.no_dedup
