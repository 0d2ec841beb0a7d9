"""Untrusted files: a MODEL dir or checkpoint whose weights are a pickle (with consistent SHA256SUMS, as an
attacker would leave them) is refused by every loader, and the pickle never runs; no Kiln code unpickles."""

from __future__ import annotations

import ast
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config import KilnError, ModelConfig
from pipeline.model.gpt import GPT
from pipeline.model.io import save_model_dir, write_sums
from tests.factories import TRAIN_ENV

ROOT = Path(__file__).resolve().parent.parent
ENV = TRAIN_ENV
pytestmark = pytest.mark.fault


class Payload:
    """Unpickling this creates `marker` (open(path, "w")): proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_model_dir(tmp_path: Path, marker: Path) -> Path:
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    (tmp_path / "sp.model").write_bytes(b"stand-in tokenizer")  # loaders reach the weights first
    model_dir = save_model_dir(GPT(cfg), cfg, tmp_path / "evil", tokenizer=tmp_path / "sp.model")
    (model_dir / "model.safetensors").write_bytes(pickle.dumps({"weights": Payload(marker)}))
    write_sums(model_dir)  # the attacker also rewrites the checksums
    return model_dir


def test_the_payload_is_live(tmp_path):
    """Guard against a test that cannot fail: unpickling the file really does create the marker."""
    marker = tmp_path / "pwned"
    model_dir = evil_model_dir(tmp_path, marker)
    pickle.loads((model_dir / "model.safetensors").read_bytes())["weights"].close()
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loaders_refuse_a_pickle_posing_as_safetensors(tmp_path):
    from pipeline.checkpoint import load_weights
    from pipeline.export import load_source
    from pipeline.model.io import load_model_dir

    marker = tmp_path / "pwned"
    model_dir = evil_model_dir(tmp_path, marker)
    for load in (load_model_dir, load_weights, load_source):
        with pytest.raises(KilnError, match="not a readable safetensors file") as err:
            load(model_dir)
        assert "\n" not in str(err.value) and "model.safetensors" in str(err.value)
    (tmp_path / "copy.pt").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(pickle.UnpicklingError):  # what weights_only=True does with it
        torch.load(tmp_path / "copy.pt", weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("command", [["generate", "{model}", "--prompt", "hi", "--max-new-tokens", "2"],
                                     ["export", "{model}", "--format", "safetensors", "--out", "{tmp}/exported"]])
def test_cli_refuses_it_in_one_line(tmp_path, command):
    marker = tmp_path / "pwned"
    model_dir = evil_model_dir(tmp_path, marker)
    args = [a.format(model=model_dir, tmp=tmp_path) for a in command]
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=ENV, cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    (line,) = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert "not a readable safetensors file" in line and "Traceback" not in res.stderr
    assert not marker.exists() and not (tmp_path / "exported").exists()


@pytest.mark.slow
def test_a_fetched_pickle_model_is_refused(tmp_path, monkeypatch):
    """Through the registry: registered, fetched (checksums match, as the attacker rewrote them), then loaded."""
    from pipeline.tracking import Tracker

    marker = tmp_path / "pwned"
    model_dir = evil_model_dir(tmp_path, marker)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri=uri, enabled=True)
    with tracker.stage_run("train") as run:
        info = run.log_model(model_dir, stage="pretrain", register_as="evil")
    res = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", info["uri"], "--prompt", "hi",
                          "--tracking-uri", tracker.uri],
                         env={**ENV, "KILN_CACHE_DIR": str(tmp_path / "cache")}, cwd=tmp_path, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 1, res.stderr[-2000:]
    (line,) = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert "not a readable safetensors file" in line
    assert not marker.exists()


def _calls(tree: ast.AST, dotted: str):
    mod, _, name = dotted.rpartition(".")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == name and isinstance(f.value, ast.Name) and f.value.id == mod:
                yield node


def test_no_kiln_code_unpickles():
    """Every torch.load passes weights_only=True; pickle/dill/joblib loads and numpy allow_pickle are absent."""
    files = sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("data_prep/**/*.py")])
    assert len(files) > 20
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for call in _calls(tree, "torch.load"):
            kw = {k.arg: k.value for k in call.keywords}
            if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                problems.append(f"{path.relative_to(ROOT)}:{call.lineno}: torch.load without weights_only=True")
        for bad in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "torch.jit.load"):
            problems += [f"{path.relative_to(ROOT)}:{c.lineno}: {bad}" for c in _calls(tree, bad)]
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is False):
                problems.append(f"{path.relative_to(ROOT)}:{node.value.lineno}: allow_pickle")
    assert problems == []
    # the checker itself finds what it looks for
    probe = ast.parse("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\ntorch.load(p, weights_only=True)")
    flagged = [c for c in _calls(probe, "torch.load")
               if not any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in c.keywords)]
    assert len(flagged) == 2


def test_checkpoint_weights_are_read_from_safetensors_only(tmp_path):
    """`train.init_from` / `kiln export` of a checkpoint read model.safetensors; DeepSpeed's ds/ pickles are not touched."""
    from pipeline.checkpoint import load_weights

    marker = tmp_path / "pwned"
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    ckpt = tmp_path / "step_0000002"
    save_model_dir(GPT(cfg), cfg, ckpt)
    (ckpt / "kiln_state.json").write_text(json.dumps({"step": 2, "config": {"model": cfg.model_dump(mode="json")}}))
    (ckpt / "ds").mkdir()
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(Payload(marker)))
    write_sums(ckpt)
    state = load_weights(ckpt)
    assert "embed.wte.weight" in state and not marker.exists()


@pytest.mark.slow
def test_a_pickle_planted_in_deepspeed_state_is_refused_on_resume(tmp_path):
    """DeepSpeed itself calls torch.load(weights_only=False) on ds/*.pt; Kiln forces weights-only there."""
    from tests.factories import fake_corpus, kiln_train_cmd

    (tmp_path / "sp.model").write_bytes(b"stand-in tokenizer")
    corpus = fake_corpus(tmp_path / "corpus", vocab_size=128, tokenizer=tmp_path / "sp.model")
    marker = tmp_path / "pwned"

    def train(steps: int) -> subprocess.CompletedProcess:
        cmd = kiln_train_cmd(tmp_path / "run", f"data.paths=[{corpus}]", f"train.steps={steps}", "checkpoint.every=2",
                             "tracking.enabled=false")
        return subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)

    assert train(2).returncode == 0
    ckpt = tmp_path / "run" / "checkpoints" / "step_0000002"
    (state_file,) = (ckpt / "ds").glob("*model_states.pt")
    torch.save({"module": Payload(marker)}, state_file)
    write_sums(ckpt)  # checksums match: only the loader can stop it
    res = train(4)
    assert res.returncode == 1, res.stderr[-3000:]
    (line,) = [ln for ln in res.stderr.splitlines() if "error:" in ln]
    assert f"{ckpt}/ds: holds pickled objects other than tensors" in line and "Traceback" not in res.stderr
    assert not marker.exists()
