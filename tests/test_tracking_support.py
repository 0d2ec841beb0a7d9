"""Helpers for the tracking / eval / generate tests (a real mlflow server, a tiny trained GPT,
a tiny sentencepiece model and a real-text corpus), and the tests that the helpers work."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from factories import free_port

from data_prep.indexed import IndexedWriter
from pipeline.config import ModelConfig
from pipeline.data.corpus import PreparedCorpus, Windows
from pipeline.model.gpt import GPT
from pipeline.model.io import save_model_dir

MLFLOW = str(Path(sys.executable).parent / "mlflow")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on 2 shared cores: intra-op threads only spin against each other (30x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- mlflow server



class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend and a local artifact root."""

    def __init__(self, root: Path, port: int | None = None):
        self.root, self.port = Path(root), port or free_port()
        self.root.mkdir(parents=True, exist_ok=True)
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> MlflowServer:
        cmd = [MLFLOW, "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false"}
        self.log = open(self.root / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not become healthy")

    def stop(self) -> None:
        """Kill the server's whole process group (uvicorn workers included) that we started."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()


# --------------------------------------------------------------------------- data and models


def demo_texts(n_docs: int = 150) -> list[str]:
    from data_prep.demo_corpus import pydoc_topics

    return [text for _, text in list(pydoc_topics())[:n_docs]]


def train_tokenizer(out_dir: Path, vocab_size: int = 400) -> Path:
    import sentencepiece as spm

    out_dir.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for doc in demo_texts() for t in doc.splitlines() if t.strip()),
        model_prefix=str(out_dir / "sp"), vocab_size=vocab_size, model_type="bpe", character_coverage=0.995,
        byte_fallback=True, pad_id=0, unk_id=1, eos_id=2, bos_id=3, minloglevel=2, num_threads=1)
    return out_dir / "sp.model"


def text_corpus(directory: Path, tokenizer: Path, n_docs: int = 150, val_docs: int = 10) -> Path:
    """A prepared corpus of real text (Python's docs) in the `kiln prep` manifest format."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    texts = demo_texts(n_docs)
    directory = Path(directory)
    (directory / "shards").mkdir(parents=True, exist_ok=True)
    entries = []
    for split, docs in (("train", texts[val_docs:]), ("val", texts[:val_docs])):
        rel = f"shards/{split}_00000"
        with IndexedWriter(directory / rel, np.uint16) as w:
            for ids in sp.encode(docs):
                w.add(np.array([*ids, sp.eos_id()]))
        entries.append({"path": rel + ".bin", "sha256": w.result["sha256"], "documents": w.result["documents"],
                        "tokens": w.result["tokens"], "split": split})
    data = tokenizer.read_bytes()
    (directory / "tokenizer.model").write_bytes(data)
    manifest = {"version": 1, "inputs": [], "config": {"text": True}, "counts": {},
                "tokens": {e["split"]: e["tokens"] for e in entries},
                "tokenizer": {"path": "tokenizer.model", "sha256": hashlib.sha256(data).hexdigest(),
                              "vocab_size": sp.get_piece_size()},
                "shards": entries, "digest": hashlib.sha256("".join(e["sha256"] for e in entries).encode()).hexdigest()}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return directory


def tiny_config(vocab_size: int, style: str = "llama", block_size: int = 32) -> ModelConfig:
    return ModelConfig(style=style, n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size)


def train_tiny(corpus_dir: Path, out: Path, steps: int = 40, style: str = "llama", block_size: int = 32,
               seed: int = 0, metrics_cb=None) -> tuple[Path, list[float]]:
    """A plain torch loop on the train split; saves a MODEL dir; returns (dir, losses)."""
    corpus = PreparedCorpus(corpus_dir)
    torch.manual_seed(seed)
    cfg = tiny_config(corpus.vocab_size, style, block_size)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    windows = Windows(corpus.stream("train"), block_size)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        batch = torch.from_numpy(np.stack([windows[int(i)] for i in rng.integers(0, len(windows), 8)]))
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if metrics_cb:
            metrics_cb(step, loss.item())
    tok = corpus.tokenizer_path if corpus.tokenizer_path.is_file() else None
    save_model_dir(model, cfg, out, tokenizer=tok, meta={"kiln": {"stage": "pretrain", "data_digest": corpus.digest}})
    return out, losses


# --------------------------------------------------------------------------- tests of the helpers


def test_tiny_training_learns_the_fake_corpus(tmp_path):
    from factories import fake_corpus

    corpus = fake_corpus(tmp_path / "c", vocab_size=64)
    _, losses = train_tiny(corpus, tmp_path / "m", steps=40)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0


def test_text_corpus_round_trips_through_the_tokenizer(tmp_path):
    import sentencepiece as spm

    tok = train_tokenizer(tmp_path / "tok")
    corpus = PreparedCorpus(text_corpus(tmp_path / "c", tok, n_docs=20, val_docs=2))
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    ids = corpus.stream("val").read(0, corpus.shards("val")[0]["tokens"]).tolist()
    first_doc = ids[: ids.index(sp.eos_id())]
    # sentencepiece's normalizer folds newlines and runs of spaces: compare modulo whitespace
    assert sp.decode(first_doc).split() == demo_texts(1)[0].split()
