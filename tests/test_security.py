"""Attacks by someone who can write what Kiln reads (registry tags and artifacts, corpus manifests,
checksum files, fetched directories, compressed inputs, configs, launch options) or reach what it
starts (local Ray, the torch rendezvous). Each test runs the attack through the `kiln` CLI and proves
the refusal; docs/security.md lists them. `pytest -m security` selects them."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import psutil
import pytest
import zstandard
from factories import TRAIN_ENV, fake_corpus, free_port, kiln_train_cmd

from pipeline.cli import main
from pipeline.config import ModelConfig
from pipeline.model.gpt import GPT
from pipeline.model.io import save_model_dir, write_sums

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.security
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- the victim's\n"


def kiln(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=env or TRAIN_ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_error(stderr: str) -> str:
    """The single `kiln ...: error:` line of a refused command (and no traceback)."""
    lines = [ln for ln in stderr.splitlines() if ": error:" in ln]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_dir(path: Path, seed: int = 0) -> Path:
    """A small MODEL dir (stand-in tokenizer) with consistent SHA256SUMS."""
    import torch

    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok = path.parent / f"{path.name}.sp.model"
    tok.write_bytes(b"stand-in tokenizer")
    return save_model_dir(GPT(cfg), cfg, path, tokenizer=tok)


def files_containing(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def publish(registry, directory: Path, name: str, alias: str = "champion") -> dict:
    with registry.tracker.stage_run("train") as run:
        return run.log_model(directory, stage="pretrain", register_as=name, alias=alias)


# --------------------------------------------------------------------------- 1. registry tags


@pytest.mark.parametrize("target", ["absolute", "relative"])
@pytest.mark.parametrize("command", ["generate", "eval", "fetch"])
def test_1_a_registry_tag_cannot_choose_where_files_are_written(registry, tmp_path, monkeypatch, capsys, command,
                                                                target):
    home = tmp_path / "home"
    victim, cache = home / ".ssh", home / ".cache" / "kiln"
    payload = model_dir(tmp_path / "payload")
    (payload / "authorized_keys").write_text("ssh-ed25519 AAAAC3Nza attacker@evil\n")
    write_sums(payload)
    name = f"evil-{command}-{target}"
    info = publish(registry, payload, name)
    tag = str(victim) if target == "absolute" else os.path.relpath(victim, cache / "models")
    registry.tracker.client.set_model_version_tag(name, info["version"], "kiln.model_id", tag)
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    uri = f"models:/{name}@champion"
    args = {"generate": ["generate", uri, "--prompt", "hi", "--max-new-tokens", "1"],
            "eval": ["eval", uri, "--data", str(fake_corpus(tmp_path / "corpus", vocab_size=64))],
            "fetch": ["fetch", uri, "--out", str(tmp_path / "fetched")]}[command]
    code = main([*args, "--tracking-uri", registry.uri])
    assert not victim.exists(), sorted(p.name for p in victim.iterdir())
    assert code == 1 and not (tmp_path / "fetched").exists()
    line = one_error(capsys.readouterr().err)
    assert "kiln.model_id" in line and "not a plain model id" in line, line


# --------------------------------------------------------------------------- 2. corpus manifests


def evil_corpus(tmp_path: Path, tokenizer_path: str) -> Path:
    """A corpus whose manifest points tokenizer.path at the victim's secret, with the secret's real sha256
    (the attacker may know it; only confinement can stop this)."""
    secret = tmp_path / "victim_secret"
    secret.write_bytes(SECRET)
    (tmp_path / "sp.model").write_bytes(b"stand-in tokenizer")
    corpus = fake_corpus(tmp_path / "corpus", vocab_size=128, tokenizer=tmp_path / "sp.model")
    manifest = json.loads((corpus / "manifest.json").read_text())
    manifest["tokenizer"].update(path=tokenizer_path, sha256=sha256(secret))
    (corpus / "manifest.json").write_text(json.dumps(manifest))
    return corpus


@pytest.mark.slow
def test_2_a_manifest_cannot_pull_a_file_into_the_trained_model(tmp_path):
    corpus = evil_corpus(tmp_path, "../victim_secret")
    out = tmp_path / "run"
    res = subprocess.run(kiln_train_cmd(out, f"data.paths=[{corpus}]", "train.steps=2", "tracking.enabled=false"),
                         env=TRAIN_ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert not out.exists() or files_containing(out, SECRET[:20]) == []
    assert res.returncode == 1, res.stderr[-3000:]
    line = one_error(res.stderr)
    assert "manifest.json: tokenizer.path '../victim_secret'" in line and "'..'" in line, line


def test_2_a_manifest_cannot_pull_a_file_into_an_export(tmp_path, capsys):
    """`kiln export CKPT` finds the tokenizer through the run's data.paths manifest."""
    corpus = evil_corpus(tmp_path, str(tmp_path / "victim_secret"))  # absolute, this time
    ckpt = model_dir(tmp_path / "run" / "checkpoints" / "step_0000002")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "kiln_state.json").write_text(json.dumps({"step": 2, "config": {"model": config["model"],
                                                                           "data": {"paths": [str(corpus)]}}}))
    (ckpt / "tokenizer.model").unlink()
    write_sums(ckpt)
    code = main(["export", str(ckpt), "--format", "safetensors", "--out", str(tmp_path / "exported")])
    assert not (tmp_path / "exported").exists() or files_containing(tmp_path / "exported", SECRET[:20]) == []
    assert code == 1
    line = one_error(capsys.readouterr().err)
    assert f"tokenizer.path '{tmp_path / 'victim_secret'}' is an absolute path" in line, line


# --------------------------------------------------------------------------- 3. decompression bombs

WORDS = "river stone bridge market harbour lantern garden window winter summer baker kettle".split()
PREP_LIGHT = ["--vocab-size", "300", "--no-dedup", "--set", "filters=[]", "--set", "boilerplate.enabled=false",
              "--set", "tracking.enabled=false"]


def raw_corpus(directory: Path, n: int = 30) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "a_good.jsonl").write_text("".join(
        json.dumps({"id": f"d{i}", "text": " ".join(WORDS[(i * 7 + j * j) % 12] for j in range(80))}) + "\n"
        for i in range(n)))
    return directory


def prep_cmd(raw: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "prep", str(raw), "--out", str(out), "--workers", "1",
            *PREP_LIGHT, *extra]


def prep_env() -> dict:
    env = {**TRAIN_ENV}
    env.pop("RAY_ADDRESS", None)  # a private local Ray
    return env

CHUNK = 64 << 20


def zst_bomb(path: Path, total: int, first: bytes = b"") -> Path:
    """`first` (e.g. a good record), then `total` bytes of zeros without a newline: zstd frames of 64 MiB."""
    c = zstandard.ZstdCompressor(level=3)
    path.write_bytes((c.compress(first) if first else b"") + c.compress(bytes(CHUNK)) * (total // CHUNK))
    return path


def gz_bomb(path: Path, total: int, first: bytes = b"") -> Path:
    """The same as gzip members."""
    def member(data: bytes) -> bytes:
        z = zlib.compressobj(9, zlib.DEFLATED, 31)
        return z.compress(data) + z.flush()

    path.write_bytes((member(first) if first else b"") + member(bytes(CHUNK)) * (total // CHUNK))
    return path


def parquet_dictionary_bomb(path: Path | str, rows: int = 600, value: int = 512 << 10) -> Path:
    """A Parquet file of `rows` rows whose text is one `value`-byte string in the dictionary page (2 KB on disk,
    an honest 0.5 MiB in the metadata, 300 MiB decoded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = pa.DictionaryArray.from_arrays(pa.array([0] * rows, pa.int32()), pa.array(["z" * value]))
    ids = pa.array([f"dict{i}" for i in range(rows)])
    pq.write_table(pa.table({"id": ids, "text": text}), path, compression="zstd")
    return Path(path)


READ_BOUNDED = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # the shared test box must survive an unfixed reader
from data_prep import partitions, readers
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
_, parts = partitions.plan([readers.Path(p) for p in sys.argv[1:]], 1000)
seen = [getattr(r, "reason", None) or r.id for p in parts for r in readers.read_partition(p)]
print(json.dumps({"seen": seen, "peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
"""


@pytest.mark.fault  # bad input too: docs/reliability.md lists it
def test_3_decompression_bombs_and_huge_records_are_quarantined_in_bounded_memory(tmp_path):
    good = json.dumps({"id": "ok", "text": "a fine record"}).encode() + b"\n"
    zst = zst_bomb(tmp_path / "a.jsonl.zst", 4 << 30, first=good)  # 4 GiB of zeros from ~130 KB
    gz = gz_bomb(tmp_path / "b.jsonl.gz", 512 << 20, first=good)  # 512 MiB from ~0.5 MB
    plain = tmp_path / "c.jsonl"
    with open(plain, "wb") as f:  # one 160 MiB record between two good ones
        f.write(good)
        f.write(b'{"id": "huge", "text": "' + b"x" * (160 << 20) + b'"}\n')
        f.write(good)
    assert zst.stat().st_size < 200_000 and gz.stat().st_size < 1_000_000
    res = subprocess.run([sys.executable, "-c", READ_BOUNDED, str(zst), str(gz), str(plain)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["seen"] == ["ok", "decompression_bomb", "ok", "decompression_bomb", "ok", "record_too_large", "ok"]
    assert out["peak_mb"] < 600, out  # a record's worth (128 MiB cap), not a file's (GiBs)


@pytest.mark.slow
@pytest.mark.fault  # bad input too: docs/reliability.md lists it
def test_3_kiln_prep_quarantines_a_bomb_and_keeps_the_rest(tmp_path):
    """A zstd bomb, and a Parquet file whose dictionary page stands for 300 MiB (issue 30; an unfixed reader
    decoded it): each is one quarantined record, the rest of the corpus is prepared."""
    raw = raw_corpus(tmp_path / "raw")
    zst_bomb(raw / "b_bomb.jsonl.zst", 320 << 20)
    parquet_dictionary_bomb(raw / "c_dictionary.parquet")
    out = tmp_path / "out"
    res = subprocess.run(prep_cmd(raw, out), cwd=ROOT, env=prep_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    quarantine = [json.loads(x) for x in (out / "report" / "quarantine.jsonl").read_text().splitlines()]
    assert sorted((q["source"], q["reason"]) for q in quarantine) == [("b_bomb.jsonl.zst:1", "decompression_bomb"),
                                                                      ("c_dictionary.parquet:1", "decompression_bomb")]
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["quarantined"] == {"decompression_bomb": 2} and counts["documents_kept"] == 30


# --------------------------------------------------------------------------- 4. SHA256SUMS entries


def test_4_a_checksum_entry_naming_dev_zero_is_refused_not_hashed_forever(tmp_path):
    src = model_dir(tmp_path / "m")
    with open(src / "SHA256SUMS", "a") as f:
        f.write(f"{'0' * 64}  /dev/zero\n")
    res = kiln("export", str(src), "--format", "safetensors", "--out", str(tmp_path / "x"), timeout=120)
    assert res.returncode == 1
    assert "'/dev/zero' is an absolute path" in one_error(res.stderr)


def test_4_checksum_entries_are_confined_and_complete(tmp_path, capsys):
    """`..` entries, symlinks out and unlisted files are refused, with the same answer whether an
    outside file exists or not (no file-existence oracle)."""
    (tmp_path / "exists").write_bytes(b"x")
    answers = []
    for name in ("../exists", "../missing"):
        src = model_dir(tmp_path / f"m{len(answers)}")
        with open(src / "SHA256SUMS", "a") as f:
            f.write(f"{'0' * 64}  {name}\n")
        assert main(["export", str(src), "--format", "safetensors", "--out", str(tmp_path / "x")]) == 1
        answers.append(one_error(capsys.readouterr().err).replace(str(src), "M").replace(name, "NAME"))
    assert answers[0] == answers[1] and "'..'" in answers[0], answers

    linked = model_dir(tmp_path / "linked")
    (linked / "extra.bin").symlink_to(tmp_path / "exists")
    write_sums(linked)  # the attacker lists the link with the right digest
    assert main(["export", str(linked), "--format", "safetensors", "--out", str(tmp_path / "x")]) == 1
    assert "'extra.bin' leaves" in one_error(capsys.readouterr().err)

    unlisted = model_dir(tmp_path / "unlisted")  # a swapped tokenizer, its line dropped from the sums
    (unlisted / "tokenizer.model").write_bytes(b"another tokenizer")
    sums = unlisted / "SHA256SUMS"
    sums.write_text("".join(ln + "\n" for ln in sums.read_text().splitlines() if "tokenizer.model" not in ln))
    assert main(["export", str(unlisted), "--format", "safetensors", "--out", str(tmp_path / "x")]) == 1
    assert "tokenizer.model: not listed in" in one_error(capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_4_fetch_refuses_files_the_checksums_do_not_list(registry, tmp_path, capsys):
    info = publish(registry, model_dir(tmp_path / "m"), "unlisted")
    artifacts = next(registry.root.glob(f"artifacts/**/{info['model_id']}/artifacts"))
    (artifacts / "sitecustomize.py").write_text("import os; os.system('touch pwned')\n")
    out = tmp_path / "fetched"
    assert main(["fetch", "models:/unlisted@champion", "--out", str(out), "--tracking-uri", registry.uri]) == 1
    assert "sitecustomize.py: not listed in" in one_error(capsys.readouterr().err)
    assert not out.exists()


# --------------------------------------------------------------------------- 5. credentials


def test_5_credentials_in_the_tracking_uri_never_appear(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"http://alice:S3cret@127.0.0.1:{free_port()}"  # nobody listens: every call fails and is reported
    assert main(["fetch", "models:/m@champion", "--out", str(tmp_path / "f"), "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "S3cret" not in err and "127.0.0.1" in one_error(err)

    out = tmp_path / "q"
    assert main(["quantize", str(model_dir(tmp_path / "m")), "--method", "rtn", "--group-size", "0",
                 "--out", str(out), "--tracking-uri", uri, "--json"]) == 0
    captured = capsys.readouterr()
    assert "MLflow at" in captured.err and "S3cret" not in captured.err + captured.out
    assert (out / "mlflow_run.json").exists() and files_containing(tmp_path, b"S3cret") == []

    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert main(["track", "sync", str(out), "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert "S3cret" not in err and "127.0.0.1" in one_error(err)

    # a config is stored with the run (params, checkpoints, manifests): credentials are refused there
    assert main(["quantize", str(tmp_path / "m"), "--out", str(tmp_path / "q2"), "--set", f"tracking.uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert "S3cret" not in err and "MLFLOW_TRACKING_PASSWORD" in one_error(err)


# --------------------------------------------------------------------------- 6. register re-hashes


def test_6_register_rehashes_instead_of_trusting_stale_checksums(registry, tmp_path, capsys):
    directory = model_dir(tmp_path / "m")
    assert main(["register", str(directory), "--name", "stale", "--tracking-uri", registry.uri]) == 0
    other = model_dir(tmp_path / "other", seed=1)
    (directory / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())  # sums now stale
    code = main(["register", str(directory), "--name", "stale", "--alias", "champion", "--tracking-uri", registry.uri])
    assert code == 1
    assert "model.safetensors: checksum mismatch" in one_error(capsys.readouterr().err)
    assert "champion" not in registry.tracker.client.get_registered_model("stale").aliases


# --------------------------------------------------------------------------- 7. planted fetch dirs


def plant(directory: Path, model_id: str, seed: int) -> Path:
    """Foreign weights with consistent checksums and a fetch marker naming the real model."""
    model_dir(directory, seed=seed)
    (directory / ".kiln-fetched.json").write_text(json.dumps({"model_id": model_id}) + "\n")
    return directory


def test_7_a_planted_fetch_directory_is_not_believed(registry, tmp_path, capsys, monkeypatch):
    info = publish(registry, model_dir(tmp_path / "real"), "planted")
    out = plant(tmp_path / "out", info["model_id"], seed=3)
    assert main(["fetch", "models:/planted@champion", "--out", str(out), "--tracking-uri", registry.uri]) == 1
    assert "differ from the registered" in one_error(capsys.readouterr().err)

    cache = tmp_path / "cache"
    plant(cache / "models" / info["model_id"], info["model_id"], seed=4)
    monkeypatch.setenv("KILN_CACHE_DIR", str(cache))
    code = main(["generate", "models:/planted@champion", "--prompt", "hi", "--tracking-uri", registry.uri])
    assert code == 1 and "differ from the registered" in one_error(capsys.readouterr().err)


# --------------------------------------------------------------------------- 8. launch scripts

SLURM_STUBS = {"scontrol": "echo node0", "srun": "exit 0", "sbatch": "echo 1"}


def run_sbatch_script(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a rendered SLURM script as a node would, with scontrol/srun stubbed out."""
    stubs = tmp_path / "stubs"
    stubs.mkdir(exist_ok=True)
    for name, body in SLURM_STUBS.items():
        (stubs / name).write_text(f"#!/bin/sh\n{body}\n")
        (stubs / name).chmod(0o755)
    (tmp_path / "job.sbatch").write_text(text)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "node0", "SLURM_NNODES": "1",
           "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path)}
    return subprocess.run(["bash", str(tmp_path / "job.sbatch")], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("option", ["--job-name", "--partition", "--account"])
def test_8_a_newline_in_a_slurm_option_is_refused(tmp_path, capsys, option):
    marker = tmp_path / "pwned"
    code = main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "1", option, f"x\ntouch {marker}",
                 "--dry-run", "--", "echo", "hi"])
    out, err = capsys.readouterr()
    if code == 0:  # what an unfixed Kiln would have submitted: run it
        run_sbatch_script(out, tmp_path)
    assert code == 2 and option in one_error(err) and "control character" in one_error(err), err
    assert not marker.exists()


def test_8_slurm_values_are_rendered_literally(tmp_path, capsys):
    """re.sub replacement escapes (`\\n`, `\\t`, `\\1`) in values are text, never script lines or crashes."""
    marker = tmp_path / "pwned"
    partition = f"gpu\\ntouch\\t{marker}"
    assert main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "1", "--partition", partition,
                 "--dry-run", "--", "echo", "$(touch", str(marker) + ")"]) == 0
    text = capsys.readouterr().out
    assert f"#SBATCH --partition={partition}\n" in text
    res = run_sbatch_script(text, tmp_path)
    assert res.returncode == 0, res.stderr
    assert not marker.exists()
    assert main(["launch", "slurm", "--nodes", "1", "--gpus-per-node", "1", "--time", "\\1", "--dry-run",
                 "--", "echo"]) == 2
    assert "--time " + repr("\\1") + ": not a SLURM time" in one_error(capsys.readouterr().err)


def test_8_deepspeed_env_values_cannot_run_commands_on_the_nodes(tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n")
    code = main(["launch", "deepspeed", "--hostfile", str(hostfile), "--env", f"KILN_X=$(touch {marker})",
                 "--dry-run", "--", "echo", "hi"])
    assert code == 2 and "--env KILN_X" in one_error(capsys.readouterr().err)


def test_8_what_kiln_writes_to_deepspeed_env_reaches_the_nodes_unchanged(tmp_path):
    """Through DeepSpeed's own pdsh export rendering, then a shell, as on every node."""
    from deepspeed.launcher.multinode_runner import PDSHRunner

    from pipeline.launcher.deepspeed_job import write_deepspeed_env

    values = {"NCCL_SOCKET_IFNAME": "^lo,docker", "KILN_X": "a=b:c,d/e@f%g+h.-_"}
    write_deepspeed_env(values, tmp_path / ".deepspeed_env")
    runner = types.SimpleNamespace(exports={})
    for line in (tmp_path / ".deepspeed_env").read_text().splitlines():  # as deepspeed.launcher.runner reads it
        key, val = line.split("=", maxsplit=1)
        PDSHRunner.add_export(runner, key, val)
    exports = "".join(f"export {k}={v}; " for k, v in runner.exports.items())
    shown = subprocess.run(["bash", "-c", exports + 'printf "%s|%s" "$NCCL_SOCKET_IFNAME" "$KILN_X"'],
                           capture_output=True, text=True, check=True).stdout
    assert shown == "|".join(values.values())


# --------------------------------------------------------------------------- 9. network exposure


def listening(proc: subprocess.Popen) -> set[str]:
    """Every TCP address the process tree listens on, sampled (twice a second) until it exits."""
    seen: set[str] = set()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = {root.pid, *(p.pid for p in root.children(recursive=True))}
            seen |= {c.laddr.ip for c in psutil.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.pid in tree}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
        time.sleep(0.5)
    return seen


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


@pytest.mark.slow
def test_9_the_local_ray_of_kiln_prep_listens_on_loopback_only(tmp_path):
    proc = subprocess.Popen(prep_cmd(raw_corpus(tmp_path / "raw"), tmp_path / "out"), cwd=ROOT, env=prep_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = listening(proc)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert seen and seen <= LOOPBACK, seen  # Ray's GCS, raylet, agents and metrics port


@pytest.mark.slow
def test_9_a_one_process_kiln_train_opens_no_port_beyond_loopback(tmp_path):
    corpus = fake_corpus(tmp_path / "corpus", vocab_size=128)
    proc = subprocess.Popen(kiln_train_cmd(tmp_path / "run", f"data.paths=[{corpus}]", "train.steps=3",
                                           "tracking.enabled=false"),
                            cwd=ROOT, env=TRAIN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = listening(proc)
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    assert seen <= LOOPBACK, seen  # no TCPStore on all interfaces


# --------------------------------------------------------------------------- 10. smaller ones


def alias_bomb(levels: int, fan: int = 9) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * fan)}]")
    return "\n".join(lines) + f"\nmodel: {{n_layer: *a{levels - 1}}}\n"


def test_10_a_yaml_alias_bomb_is_refused_in_one_short_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(7))  # 9^6 = 531441 values from 300 bytes
    assert bomb.stat().st_size < 400
    res = kiln("train", "--config", str(bomb), timeout=120)
    assert res.returncode == 2 and len(res.stderr) < 600, res.stderr[:600]
    assert "expands to more than" in one_error(res.stderr)
    big = tmp_path / "big.yaml"
    big.write_text("model:\n  n_layer: 2\n" + "# padding\n" * 200_000)
    res = kiln("train", "--config", str(big), timeout=120)
    assert res.returncode == 2 and "larger than" in one_error(res.stderr)


def test_10_no_shell_strings_in_kiln_or_its_benchmarks():
    """os.system / os.popen / shell=True would hand a path or a value to a shell."""
    files = sorted([*ROOT.glob("pipeline/**/*.py"), *ROOT.glob("data_prep/**/*.py"), *ROOT.glob("bench/*.py"),
                    *ROOT.glob("launch/*.py")])
    assert len(files) > 20
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                name = f"{getattr(f.value, 'id', '?')}.{f.attr}" if isinstance(f, ast.Attribute) else ""
                shell = any(k.arg == "shell" and getattr(k.value, "value", False) is not False for k in node.keywords)
                if name in ("os.system", "os.popen") or shell:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


@pytest.mark.slow
def test_10_a_second_prep_into_the_same_out_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "out"
    cmd = prep_cmd(raw_corpus(tmp_path / "raw"), out, "--json")
    first = subprocess.Popen(cmd, cwd=ROOT, env=prep_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "work" / "fingerprint").exists():  # the first run owns --out and has started working
            assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.05)
        second = subprocess.run(cmd, cwd=ROOT, env=prep_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stderr[-3000:]
        line = one_error(second.stderr)
        assert f"{out}: in use by another kiln run (pid {first.pid}" in line, line
        stdout, stderr = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["digest"] == json.loads((out / "manifest.json").read_text())["digest"]


@pytest.mark.parametrize("command", ["train", "quantize", "distill", "prune"])
def test_10_an_out_in_use_is_refused_by_every_writing_stage(tmp_path, capsys, command):
    from pipeline.outlock import locked

    src = model_dir(tmp_path / "m")
    out = tmp_path / "out"
    args = {"train": ["train", "--config", str(ROOT / "configs/train/tiny-cpu.yaml"), "--out", str(out)],
            "quantize": ["quantize", str(src), "--out", str(out)],
            "distill": ["distill", "--teacher", str(src), "--student-config", str(ROOT / "configs/model/tiny.yaml"),
                        "--data", str(tmp_path), "--out", str(out)],
            "prune": ["prune", str(src), "--sparsity", "0.5", "--out", str(out)]}[command]
    with locked(out, "a test"):
        assert main([*args, "--set", "tracking.enabled=false"]) == 1
    assert f"{out}: in use by another kiln run (pid {os.getpid()}" in one_error(capsys.readouterr().err)
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------- beyond the audit


def test_a_model_config_cannot_name_a_function_to_call(tmp_path, capsys):
    """config.json names a quantized model's format; only the registry's names, and the loader paths old Kiln
    wrote, pick code (tests/test_quant_registry.py loads such old dirs)."""
    evil = model_dir(tmp_path / "m")
    config = json.loads((evil / "config.json").read_text())
    config["quantization"] = {"loader": "pipeline.launcher.common:run", "method": "rtn"}  # run(path, config, ...)
    (evil / "config.json").write_text(json.dumps(config))
    write_sums(evil)
    assert main(["generate", str(evil), "--prompt", "hi", "--set", "tracking.enabled=false"]) == 1
    assert "quantization.loader 'pipeline.launcher.common:run' is not one Kiln wrote" in one_error(capsys.readouterr().err)
    config["quantization"] = {"format": "pipeline.launcher.common:run", "method": "rtn"}
    (evil / "config.json").write_text(json.dumps(config))
    write_sums(evil)
    assert main(["generate", str(evil), "--prompt", "hi", "--set", "tracking.enabled=false"]) == 1
    assert "quantization.format 'pipeline.launcher.common:run' is not a Kiln format" in one_error(capsys.readouterr().err)
