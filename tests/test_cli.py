"""The installed `kiln` console script: help, exit codes, --json, one-line errors."""

import json
import shutil
import subprocess
import sys

import pytest

from pipeline.cli import build_parser, main

COMMANDS = ["prep", "train", "verify", "export", "quantize", "distill", "prune", "eval", "generate", "register",
            "fetch", "lineage", "plot", "track", "plan", "launch", "demo"]
NO_CONFIG = {"verify", "export", "plot", "plan", "launch", "demo"}  # they have flags only


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
    assert "example:" in out and "--json" in out
    assert ("--set" in out and "--config" in out) == (cmd not in NO_CONFIG)


@pytest.mark.parametrize("cmd", sorted(NO_CONFIG))
def test_a_command_without_a_config_refuses_config_and_set(cmd, capsys):
    """--config/--set are refused where nothing reads them, not silently ignored."""
    argv = {"launch": ["launch", "torchrun"], "verify": ["verify", "d"], "export": ["export", "s", "--out", "o"],
            "plot": ["plot", "r"], "plan": ["plan", "--gpus", "8"], "demo": ["demo"]}[cmd]
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--set", "x=1"])
    assert exit_.value.code == 2 and "unrecognized arguments: --set" in capsys.readouterr().err


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


def test_only_a_process_of_its_own_freezes_its_objects_at_the_end(monkeypatch, capsys):
    """`kiln ...` ends its process: gc.freeze() spares teardown a full collection. Called in-process (tests,
    benchmarks) main() leaves the caller's garbage collector alone."""
    import pipeline.cli

    frozen = []
    monkeypatch.setattr(pipeline.cli.gc, "freeze", lambda: frozen.append(1))
    argv = ["train", "--set", "parallel.zero_stage=4"]
    assert main(argv) == 2 and frozen == []
    monkeypatch.setattr(sys, "argv", ["kiln", *argv])
    assert main() == 2 and frozen == [1]  # after the command, errors included


def test_plan_json_is_last_stdout_line():
    res = run_kiln("plan", "--gpus", "64", "--hours", "720", "--gpu", "h100", "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["model_config"] == "13b"
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


# --------------------------------------------------------------------------- eval / generate read a config


@pytest.fixture
def no_registry(monkeypatch):
    """kiln eval/generate without MLflow: the tracker they would build, recorded; a local MODEL path as is."""
    from pipeline.commands import common

    built = []

    class Local:
        def materialize(self, model):
            return model

    def tracker(args, must_exist=False, cfg=None):
        built.append(cfg)
        return Local()

    monkeypatch.setattr(common, "tracker", tracker)
    return built


def test_generate_reads_its_config_and_flags_win(tmp_path, monkeypatch, no_registry, capsys):
    seen = {}

    def generate(local, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, on_text, chat):
        seen.update(prompt=prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, chat=chat)
        return {"new_tokens": 0, "stopped_at_eos": True, "tokens_per_s": 0.0, "seed": seed}

    monkeypatch.setattr("pipeline.generate.generate", generate)
    cfg = tmp_path / "sampling.yaml"
    cfg.write_text("prompt: From the file\ntemperature: 0\ntop_k: 5\nseed: 7\ntracking: {experiment: gen}\n")
    assert main(["generate", "m", "--config", str(cfg), "--seed", "3", "--set", "top_p=0.5"]) == 0
    assert seen == {"prompt": "From the file", "max_new_tokens": 64, "temperature": 0.0, "top_k": 5, "top_p": 0.5,
                    "repetition_penalty": 1.0, "seed": 3, "chat": False}  # file, flag over file, --set, schema default
    assert no_registry[-1].tracking.experiment == "gen"
    assert main(["generate", "m", "--config", str(cfg), "--prompt", "From the flag"]) == 0
    assert seen["prompt"] == "From the flag" and seen["seed"] == 7
    assert main(["generate", "m", "--config", str(cfg), "--chat"]) == 0 and seen["chat"] is True


@pytest.mark.parametrize("argv, line", [
    (["--max-new-tokens", "4"], "kiln generate: error: no prompt: give --prompt TEXT (or prompt: in --config)"),
    (["--prompt", "hi", "--top-p", "1.5"], "kiln generate: error: --top-p: top_p: 1.5: Input should be less than or equal to 1"),
    (["--prompt", "hi", "--set", "temperature=-1"],
     "kiln generate: error: --set temperature=-1: temperature: -1: Input should be greater than or equal to 0"),
    (["--prompt", "hi", "--set", "train.lr=1"], "kiln generate: error: --set train.lr=1: train: unknown key"),
])
def test_generate_config_errors_name_the_flag_or_key(argv, line, no_registry, capsys):
    assert main(["generate", "m", *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert no_registry == []  # refused before any tracker or model is touched


def test_eval_reads_its_config_and_flags_win(tmp_path, monkeypatch, no_registry, capsys):
    seen = []

    def evaluate_model(model, data, split, max_tokens, tracker):
        seen.append((model, data, split, max_tokens))
        return {"tokens": 1, "perplexity": 2.0, "bits_per_token": 1.0, "bits_per_byte": 0.5, "tokens_per_s": 1.0,
                "device": "cpu", "threads": 1, "batch_size": 8}

    monkeypatch.setattr("pipeline.evaluate.evaluate_model", evaluate_model)
    cfg = tmp_path / "suite.yaml"
    cfg.write_text(f"data: {tmp_path / 'corpus'}\nsplit: train\nmax_tokens: 10\ntracking: {{experiment: evals}}\n")
    assert main(["eval", "m", "--config", str(cfg)]) == 0
    assert main(["eval", "m", "--config", str(cfg), "--max-tokens", "20", "--split", "val"]) == 0
    assert seen == [("m", str(tmp_path / "corpus"), "train", 10), ("m", str(tmp_path / "corpus"), "val", 20)]
    assert no_registry[-1].tracking.experiment == "evals"
    capsys.readouterr()
    assert main(["eval", "m", "--config", str(cfg), "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip() == \
        "kiln eval: error: --max-tokens: max_tokens: 0: Input should be greater than or equal to 1"
    assert main(["eval", "--compare", "models:/x", "--config", str(cfg)]) == 2  # data from the file: not a compare
    assert "--compare models:/NAME takes no MODEL, data or tasks" in capsys.readouterr().err
    assert len(seen) == 2
