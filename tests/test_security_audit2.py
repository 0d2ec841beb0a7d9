"""The second audit's attacks (issue 30): a stranger with write access to a shared registry, a corpus, a
MODEL dir or a shared folder, through the real `kiln` commands. Each test reproduces one attack and
proves the refusal; docs/security.md lists them. `pytest -m security` selects them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_security import SECRET, model_dir, one_error, publish

pytestmark = pytest.mark.security


# --------------------------------------------------------------------------- 3. the --out lock


@pytest.mark.parametrize("planted", ["lock", "out"])
def test_a3_a_planted_symlink_at_the_out_lock_is_not_followed(tmp_path, capsys, planted):
    """A shared parent: the lock file (or --out itself) is a symlink to another user's file."""
    from pipeline.cli import main

    victim = tmp_path / "victims_file"
    victim.write_bytes(SECRET)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / (".out.kiln-lock" if planted == "lock" else "out")).symlink_to(victim)
    code = main(["quantize", str(model_dir(tmp_path / "m")), "--method", "rtn", "--group-size", "0",
                 "--out", str(shared / "out"), "--set", "tracking.enabled=false"])
    assert victim.read_bytes() == SECRET
    assert code == 1
    assert "is a symlink; refusing to follow it" in one_error(capsys.readouterr().err)


# --------------------------------------------------------------------------- 4. words reaching the nodes

PDSH = r'''#!/usr/bin/env python3
"""Stand-in pdsh: `pdsh -S -f N -w h1,h2 WORDS...` joins WORDS with spaces and runs them in a host's shell,
with %n the host's rank, as pdsh's ssh module and sshd (`$SHELL -c`) do (the first host only: they all
get the same line). Its argv (what `ps` shows on the nodes) is appended to pdsh-argv.jsonl beside it."""
import json, os, subprocess, sys
with open(os.path.join(os.path.dirname(__file__), "pdsh-argv.jsonl"), "a") as log:
    log.write(json.dumps(sys.argv) + "\n")
args = sys.argv[1:]
while args[0] in ("-S", "-f", "-w"):
    hosts = args[1].split(",") if args[0] == "-w" else locals().get("hosts")
    args = args[2 if args[0] != "-S" else 1:]
line = " ".join(args)
sys.exit(subprocess.call(["sh", "-c", line.replace("%n", "0")]))
'''
NODE_PRINTS = ("import hashlib, json, os, sys; print('ARGV', json.dumps(sys.argv[1:])); "
               "print('DIGEST', hashlib.sha256(os.environ.get('MLFLOW_TRACKING_PASSWORD', '').encode()).hexdigest())")


def stand_in_nodes(tmp_path: Path, monkeypatch=None) -> dict:
    """PATH with a stand-in ssh (DeepSpeed's reachability check) and pdsh; a hostfile of two nodes. Returns
    the environment to run `kiln` in (and sets it with `monkeypatch`)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "ssh").write_text("#!/bin/sh\nexit 0\n")
    (stubs / "pdsh").write_text(PDSH)
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    (tmp_path / "hosts").write_text("nodea slots=1\nnodeb slots=1\n")
    if monkeypatch:
        monkeypatch.setenv("PATH", f"{stubs}:{os.environ['PATH']}")
    return {"PATH": f"{stubs}:{os.environ['PATH']}"}


def launch_words(tmp_path: Path, addr: str) -> list[str]:  # nothing listens: the stand-in nodes run no rendezvous
    return ["launch", "deepspeed", "--hostfile", str(tmp_path / "hosts"), "--master-addr", addr,
            "--master-port", "29999"]


SHELL_WORDS = ["--set", "data.note=$(touch {m})", "`touch {m}`", "a b $(touch {m}) 'q'", "x;y"]


@pytest.fixture(scope="module")
def two_node_launch(tmp_path_factory) -> dict:
    """One real `kiln launch deepspeed` (DeepSpeed's own runner) over the two stand-in nodes, from a shell with
    MLFLOW_TRACKING_PASSWORD set, of a command whose words hold shell syntax; each rank prints its words
    and a digest of the password it got. Shared by the tests of what reaches the nodes (one launch), its
    output caught at the file descriptors (the runner and the ranks are subprocesses)."""
    import contextlib
    import io
    import tempfile

    from pipeline.cli import main

    tmp = tmp_path_factory.mktemp("nodes")
    password = f"pa ss-{SECRET.decode()}$(touch {tmp}/pwned)'"
    words = [w.format(m=tmp / "pwned") for w in SHELL_WORDS]
    said = io.StringIO()  # what kiln itself prints
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryFile("w+") as fds:
        stand_in_nodes(tmp, mp)
        mp.setenv("MLFLOW_TRACKING_PASSWORD", password)
        mp.chdir(tmp)
        saved = os.dup(1), os.dup(2)
        os.dup2(fds.fileno(), 1)
        os.dup2(fds.fileno(), 2)
        try:
            with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
                code = main([*launch_words(tmp, "nodea"), "--", sys.executable, "-c", NODE_PRINTS, *words])
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        fds.seek(0)
        output = fds.read() + said.getvalue()
    lines = output.splitlines()
    return {"tmp": tmp, "code": code, "output": output, "words": words, "password": password,
            "argv": [json.loads(x.split("ARGV ", 1)[1]) for x in lines if "ARGV " in x],
            "digests": [x.split("DIGEST ", 1)[1] for x in lines if "DIGEST " in x],
            "pdsh_argv": (tmp / "stubs" / "pdsh-argv.jsonl").read_text()}


def test_a4_shell_words_in_a_deepspeed_launch_do_not_run_on_the_nodes(two_node_launch, tmp_path, capfd, monkeypatch):
    """Through DeepSpeed's real runner and a stand-in pdsh/ssh; then the master address and the working
    directory, which DeepSpeed sends unquoted, are refused."""
    from pipeline.cli import main

    run = two_node_launch
    assert not (run["tmp"] / "pwned").exists()
    assert run["code"] == 0 and run["argv"] == [run["words"]], run["output"][-3000:]

    stand_in_nodes(tmp_path, monkeypatch)
    marker = tmp_path / "pwned"
    for option, addr, cwd in (("--master-addr", f"$(touch {marker})", tmp_path),
                              ("the working directory", "nodea", tmp_path / "w$(touch pwned)")):
        cwd.mkdir(exist_ok=True)
        monkeypatch.chdir(cwd)
        assert main([*launch_words(tmp_path, addr), "--dry-run", "--", "echo"]) == 2
        line = one_error(capfd.readouterr().err)
        assert option in line and "shell would interpret" in line, line


def test_c3_credentials_reach_the_nodes_without_a_command_line(two_node_launch):
    """`kiln launch deepspeed` over two hosts from a shell with MLFLOW_TRACKING_PASSWORD set: DeepSpeed's pdsh
    runner wrote `export MLFLOW_TRACKING_PASSWORD=...;` into pdsh's argv (shown by `ps` on every node, printed
    in DeepSpeed's log). Through DeepSpeed's real runner and the stand-in pdsh, which records its argv: the
    value is in no argv and no output, each rank gets it exactly (shell syntax and all), and the private
    file that carried it is gone when the job ends."""
    run = two_node_launch
    assert run["code"] == 0, run["output"][-3000:]
    assert run["digests"] == [hashlib.sha256(run["password"].encode()).hexdigest()]
    assert "deepspeed.launcher.launch" in run["pdsh_argv"] and SECRET.decode() not in run["pdsh_argv"]
    assert SECRET.decode() not in run["output"]
    assert not (run["tmp"] / "pwned").exists() and not list(run["tmp"].glob(".kiln-node-env*"))


def test_c3_the_credentials_file_goes_when_the_launcher_is_killed(tmp_path):
    """The launching `kiln` SIGKILLed while its two-node job runs (so its own `finally` never runs): the
    private file that carries the credentials to the ranks is removed anyway, by the watchdog waiting on the
    launcher's exit; the ranks had read it."""
    import time

    env = {**os.environ, **stand_in_nodes(tmp_path), "MLFLOW_TRACKING_PASSWORD": SECRET.decode(),
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    started = tmp_path / "rank-started"
    rank = f"import os, pathlib, time; pathlib.Path({str(started)!r}).write_text(os.environ['MLFLOW_TRACKING_PASSWORD']); time.sleep(120)"
    argv = [sys.executable, "-m", "pipeline.cli", *launch_words(tmp_path, "nodea"), "--", sys.executable, "-c", rank]
    kiln = subprocess.Popen(argv, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    env_file = tmp_path / ".kiln-node-env"
    try:
        for _ in range(1200):  # the rank runs: it read the file (a loaded box may take a while)
            if started.exists() or kiln.poll() is not None:
                break
            time.sleep(0.1)
        assert started.exists() and started.read_text() == SECRET.decode() and env_file.exists()
        kiln.send_signal(signal.SIGKILL)  # the launcher alone: the job's other processes live on
        kiln.wait()
        for _ in range(600):
            if not env_file.exists():
                break
            time.sleep(0.1)
        assert not list(tmp_path.glob(".kiln-node-env*"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(kiln.pid, signal.SIGKILL)  # the stand-in nodes' rank, still sleeping


# --------------------------------------------------------------------------- 2. a version's source


class Recorder(BaseHTTPRequestHandler):
    """A stranger's server: remembers every request's Authorization header."""

    seen: list = []

    def do_GET(self):  # noqa: N802 - http.server's name
        Recorder.seen.append(self.headers.get("Authorization"))
        self.send_error(404)

    def log_message(self, *args):
        pass


def test_a2_a_version_source_cannot_send_credentials_to_a_strangers_url(registry, tmp_path, capsys, monkeypatch):
    from pipeline.cli import main

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = registry.tracker.client
        real = publish(registry, model_dir(tmp_path / "m"), "sourced")
        evil = f"http://127.0.0.1:{server.server_address[1]}/api/2.0/mlflow-artifacts/artifacts/m"  # an MLflow server's form
        mv = client.create_model_version("sourced", source=evil, tags={"kiln.model_id": real["model_id"]})
        client.set_registered_model_alias("sourced", "champion", mv.version)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "victim")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "S3cret")
        code = main(["fetch", "models:/sourced@champion", "--out", str(tmp_path / "f"), "--tracking-uri", registry.uri])
    finally:
        server.shutdown()
    assert Recorder.seen == []
    assert code == 1
    line = one_error(capsys.readouterr().err)
    assert "not where this registry keeps its own" in line and "127.0.0.1" not in line, line


# --------------------------------------------------------------------------- 6. files a directory names


def corpus_with(tmp_path: Path, partner: str) -> Path:
    """A prepared corpus whose first train shard's .idx (the manifest names the .bin) is a FIFO, or a
    symlink to a copy outside the corpus (sizes and fingerprint still match the manifest)."""
    from factories import fake_corpus

    corpus = fake_corpus(tmp_path / f"corpus-{partner}", vocab_size=64)
    idx = corpus / "shards" / "train_00000.idx"
    if partner == "fifo":
        idx.unlink()
        os.mkfifo(idx)
    else:
        outside = tmp_path / "outside.idx"
        outside.write_bytes(idx.read_bytes())
        idx.unlink()
        idx.symlink_to(outside)
    return corpus


@contextmanager
def no_hang(seconds: int = 60):
    """An unfixed Kiln blocks forever opening a FIFO: fail instead (SIGALRM interrupts the open)."""
    def ring(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize(("partner", "command"), [("symlink", "verify"), ("fifo", "verify"), ("fifo", "train")])
def test_a6_a_shards_partner_file_is_confined_and_regular(tmp_path, capsys, partner, command):
    """`kiln verify` hashes in worker threads (an alarm cannot free a thread blocked on a FIFO): a subprocess."""
    from factories import TINY_TRAIN, TRAIN_ENV

    from pipeline.cli import main

    corpus = corpus_with(tmp_path, partner)
    if command == "verify":
        res = subprocess.run([sys.executable, "-m", "pipeline.cli", "verify", str(corpus)], env=TRAIN_ENV,
                             capture_output=True, text=True, timeout=120)
        code, err = res.returncode, res.stderr
    else:
        with no_hang():
            code = main(["train", "--config", str(TINY_TRAIN), "--out", str(tmp_path / "run"), "--set",
                         f"data.paths=[{corpus}]", "--set", "tracking.enabled=false"])
        err = capsys.readouterr().err
    line = one_error(err)
    assert code == 1 and "'shards/train_00000.idx'" in line, line
    assert ("symlink" if partner == "symlink" else "not a regular file") in line, line


def test_a6_lineage_in_a_model_dirs_config_is_not_followed_by_register(registry, tmp_path, capsys, caplog):
    """config.json names a parent MODEL dir whose weights are a link to the victim's key (an unfixed Kiln
    published its sha256 as a tag) and a training corpus with a FIFO shard (an unfixed Kiln hung)."""
    from pipeline.cli import main
    from pipeline.model.io import write_sums

    parent = tmp_path / "parent"
    parent.mkdir()
    (tmp_path / "id_ed25519").write_bytes(SECRET)
    (parent / "model.safetensors").symlink_to(tmp_path / "id_ed25519")
    evil = model_dir(tmp_path / "m", seed=11)  # weights no other test registers
    config = json.loads((evil / "config.json").read_text())
    config["kiln"] = {"stage": "distilled", "parent_model": str(parent),
                      "train_config": {"data": {"paths": [str(corpus_with(tmp_path, "fifo"))]}}}
    (evil / "config.json").write_text(json.dumps(config))
    write_sums(evil)
    with no_hang():
        code = main(["register", str(evil), "--name", "lineage", "--tracking-uri", registry.uri])
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]
    (lm,) = registry.tracker.client.search_logged_models([registry.tracker.experiment_id()],
                                                         filter_string="name = 'lineage'")
    assert hashlib.sha256(SECRET).hexdigest() not in json.dumps(lm.tags)
    assert "train_00000.idx' is not a regular file" in err + caplog.text


# --------------------------------------------------------------------------- 1. lm-eval task directories

EVIL_TASK = """task: kiln_pydoc
custom_dataset: !function evil.docs
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: bits_per_byte
"""
EVIL_PY = """import pathlib
pathlib.Path({marker!r}).touch()  # what a stranger's Python would do as the victim


def docs(**_):
    from datasets import Dataset, DatasetDict

    return DatasetDict({{"test": Dataset.from_list([{{"text": "hello"}}])}})
"""


def model_with_tokenizer(path: Path) -> Path:
    """A small MODEL dir with a real (tiny) sentencepiece tokenizer, as lm-eval tasks need."""
    from data_prep.tokenizer import train_tokenizer
    from pipeline.config import ModelConfig
    from pipeline.model.gpt import GPT
    from pipeline.model.io import save_model_dir

    words = "river stone bridge market harbour lantern garden window winter summer baker kettle".split()
    tok = train_tokenizer((" ".join(words[(i * j) % 12] for j in range(20)) for i in range(200)),
                          path.parent / "sp.model", vocab_size=300)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=320)
    return save_model_dir(GPT(cfg), cfg, path, tokenizer=tok)


def test_a1_a_task_directory_cannot_replace_a_built_in_task_with_its_python(tmp_path, capsys):
    from pipeline.cli import main

    marker = tmp_path / "pwned"
    shared = tmp_path / "shared_tasks"
    shared.mkdir()
    (shared / "pydoc.yaml").write_text(EVIL_TASK)
    (shared / "evil.py").write_text(EVIL_PY.format(marker=str(marker)))
    model = model_with_tokenizer(tmp_path / "m")
    base = ["eval", str(model), "--tasks", "kiln_pydoc", "--limit", "1", "--set", "tracking.enabled=false"]
    code = main([*base, "--include-path", str(shared)])
    assert not marker.exists()
    line = one_error(capsys.readouterr().err)
    assert code == 2 and "pydoc.yaml: uses a YAML tag (such as !function" in line, line

    code = main([*base, "--trusted-include-path", str(shared)])  # trusted for its Python, still no take-over
    assert not marker.exists()
    line = one_error(capsys.readouterr().err)
    assert code == 2 and "defines task 'kiln_pydoc', which Kiln's tasks defines too" in line, line


# --------------------------------------------------------------------------- 5. links between forms


def test_a5_a_logged_model_tag_cannot_swap_the_transformers_form_behind_an_alias(registry, tmp_path, capsys):
    """A stranger with rights on the experiment (not the registry) logs their own "transformers form", with
    consistent checksums and tags naming the victim's model, and points the victim's logged model at it."""
    from pipeline.cli import main
    from pipeline.model.io import write_sums
    from pipeline.tracking.registry import weights_sha256

    client = registry.tracker.client
    real = publish(registry, model_dir(tmp_path / "real"), "swapped")
    evil_dir = model_dir(tmp_path / "evil", seed=7)
    (evil_dir / "payload.txt").write_text("the attacker's files\n")
    write_sums(evil_dir)
    evil = client.create_logged_model(registry.tracker.experiment_id(), name="swapped-hf", model_type="transformers",
                                      tags={"kiln.form": "hf", "kiln.kiln_model_id": real["model_id"],
                                            "kiln.weights_sha256": weights_sha256(evil_dir)})
    client.log_model_artifacts(evil.model_id, str(evil_dir))
    client.finalize_logged_model(evil.model_id, "READY")
    client.set_logged_model_tags(real["model_id"], {"kiln.hf_model_id": evil.model_id})
    out = tmp_path / "fetched"
    code = main(["fetch", "models:/swapped@champion", "--format", "hf", "--out", str(out),
                 "--tracking-uri", registry.uri])
    assert not (out / "payload.txt").exists()
    assert code == 1
    assert "is not the one the registry records for version" in one_error(capsys.readouterr().err)


# --------------------------------------------------------------------------- the classes behind them


def test_c1_a_checkpoints_files_are_opened_confined(tmp_path, capsys):
    """A checkpoint's kiln_state.json as a FIFO (an unfixed `kiln export` hung reading it before verifying)."""
    from pipeline.cli import main
    from pipeline.model.io import write_sums

    ckpt = model_dir(tmp_path / "run" / "checkpoints" / "step_0000002")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "kiln_state.json").write_text(json.dumps({"step": 2, "config": {"model": config["model"]}}))
    write_sums(ckpt)
    (ckpt / "kiln_state.json").unlink()
    os.mkfifo(ckpt / "kiln_state.json")
    with no_hang():
        code = main(["export", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "x")])
    line = one_error(capsys.readouterr().err)
    assert code == 1 and "'kiln_state.json' is not a regular file" in line, line


BOUNDED = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
           "sys.argv = ['kiln', *sys.argv[1:]]; runpy.run_module('pipeline.cli', run_name='__main__')")


def test_c2_model_dimensions_in_a_config_are_bounded_before_allocating(tmp_path):
    """A 40 KB MODEL dir whose config.json describes a 16-billion-parameter embedding (an unfixed Kiln tried
    to allocate it; under a 3 GiB limit here, it died of that)."""
    from factories import TRAIN_ENV

    from pipeline.model.io import write_sums

    evil = model_dir(tmp_path / "m")
    config = json.loads((evil / "config.json").read_text())
    config["model"]["vocab_size"] = 1 << 30
    (evil / "config.json").write_text(json.dumps(config))
    write_sums(evil)
    res = subprocess.run([sys.executable, "-c", BOUNDED, "generate", str(evil), "--prompt", "hi",
                          "--set", "tracking.enabled=false"], env=TRAIN_ENV, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "config.json: model dimensions" in one_error(res.stderr) and "4 per byte" in one_error(res.stderr)


def test_c2_token_ids_are_bounded_by_the_vocabulary(tmp_path, capsys):
    """A manifest that states a smaller vocabulary than its shards use (an unfixed `kiln train` indexed
    past the embedding and died with an IndexError)."""
    from factories import TINY_TRAIN, fake_corpus

    from pipeline.cli import main

    corpus = fake_corpus(tmp_path / "corpus", vocab_size=128)
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["tokenizer"]["vocab_size"] = 16
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    code = main(["train", "--config", str(TINY_TRAIN), "--out", str(tmp_path / "run"), "--set",
                 f"data.paths=[{corpus}]", "--set", "train.steps=2", "--set", "tracking.enabled=false"])
    line = one_error(capsys.readouterr().err)
    assert code == 1 and "hold an id outside the vocabulary of 16" in line, line


PARQUET_BOMB = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
rows = [{"id": "ok", "text": "a fine record"}] + [{"id": f"z{i}", "text": "z" * (1 << 20)} for i in range(270)]
pq.write_table(pa.Table.from_pylist(rows[:1]), sys.argv[1] + "/a.parquet")
pq.write_table(pa.Table.from_pylist(rows[1:]), sys.argv[1] + "/b.parquet", compression="zstd",
               use_dictionary=False)  # 270 MiB of pages from a few KB
from test_security import parquet_dictionary_bomb
parquet_dictionary_bomb(sys.argv[1] + "/c.parquet")  # 300 MiB from 2 KB, by a metadata of 0.5 MiB
"""


def test_c2_a_parquet_row_group_is_bounded_before_it_is_decoded(tmp_path):
    """A Parquet file whose one row group decodes to 270 MiB from a few KB of zstd pages (an unfixed
    reader decoded it whole): quarantined as a decompression bomb, by its metadata, in bounded memory.
    And one whose metadata is honest (0.5 MiB) but whose dictionary page holds one 512 KiB value that
    600 rows point to (an unfixed reader decoded 8192 rows at a time, here 300 MiB): counted from the
    indices, refused before a row is decoded."""
    from factories import TRAIN_ENV
    from test_security import READ_BOUNDED

    env = {**TRAIN_ENV, "PYTHONPATH": f"{TRAIN_ENV['PYTHONPATH']}:{Path(__file__).parent}"}
    subprocess.run([sys.executable, "-c", PARQUET_BOMB, str(tmp_path)], env=env, check=True, timeout=300)
    assert (tmp_path / "b.parquet").stat().st_size < 200_000 and (tmp_path / "c.parquet").stat().st_size < 10_000
    res = subprocess.run([sys.executable, "-c", READ_BOUNDED, *(str(tmp_path / f"{n}.parquet") for n in "abc")],
                         env=TRAIN_ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["seen"] == ["ok", "decompression_bomb", "decompression_bomb"] and out["peak_mb"] < 150, out


def test_c2_a_registered_file_is_size_checked_before_it_is_downloaded(registry, tmp_path, capsys):
    """Someone with write access to the artifact store swaps a logged model's SHA256SUMS for a 17 MiB file;
    `kiln fetch` over an existing fetch dir downloads the registered SHA256SUMS to compare: not this one."""
    from test_security import plant

    from pipeline.cli import main

    info = publish(registry, model_dir(tmp_path / "real", seed=12), "oversized")
    sums = next(registry.root.glob(f"artifacts/**/{info['model_id']}/artifacts/SHA256SUMS"))
    with open(sums, "r+b") as f:
        f.truncate(17 << 20)
    out = plant(tmp_path / "out", info["model_id"], seed=12)
    assert main(["fetch", "models:/oversized@champion", "--out", str(out), "--tracking-uri", registry.uri]) == 1
    line = one_error(capsys.readouterr().err)
    assert "SHA256SUMS is 17,825,792 bytes, more than the 16,777,216-byte limit" in line, line
