"""Factories for tests: commands, ports, small corpora (data_prep/synthetic.py) and model families."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from data_prep.synthetic import EOS, fake_corpus, phrase_docs  # noqa: F401 - the tests' factories too

ROOT = Path(__file__).resolve().parent.parent
TINY_TRAIN = ROOT / "configs/train/tiny-cpu.yaml"
TRAIN_ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    """A TCP port the OS says is free on 127.0.0.1 now (tests never hard-code one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(ranks: int = 1) -> list[str]:
    """This Python, under torchrun with `ranks` local processes when ranks > 1 (`--standalone`: a rendezvous
    on a port the OS picks, so concurrent test runs never collide on 29500)."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)] if ranks > 1 else []
    return [sys.executable, *torchrun]


def kiln_train_cmd(out: Path, *sets: str, ranks: int = 1, config: Path = TINY_TRAIN) -> list[str]:
    """`kiln train --json` of the tiny CPU config into `out`, with `--set` overrides."""
    return [*launcher(ranks), "-m", "pipeline.cli", "train", "--config", str(config), "--out", str(out), "--json",
            *[a for s in sets for a in ("--set", s)]]


def small_tokenizer(path: Path, vocab_size: int) -> Path:
    """A sentencepiece BPE of exactly `vocab_size` pieces (Kiln's ids: unk 0, bos 1, eos 2 = EOS), trained on
    lowercased Python docs with no byte fallback, so it can be as small as a fake corpus' vocab (100): real
    text for the ids of `fake_corpus(..., tokenizer=path)`, e.g. for bits per byte."""
    import io

    import sentencepiece as spm

    from data_prep.demo_corpus import pydoc_topics

    keep = set("abcdefghijklmnopqrstuvwxyz .,")
    lines = ["".join(c for c in line.lower() if c in keep) for _, text in list(pydoc_topics())[:40]
             for line in text.splitlines()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([ln for ln in lines if ln.strip()]), model_writer=model,
                                   model_type="bpe", vocab_size=vocab_size, byte_fallback=False,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=EOS, pad_id=-1, minloglevel=2,
                                   num_threads=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def tiny_model_family(root: Path, vocab_size: int = 1000) -> dict[str, Path]:
    """A random llama-style MODEL dir with a real sentencepiece tokenizer (Kiln's settings, trained on
    Python's docs), its int8 and GPTQ-4 quantizations, and the corpus they were calibrated on."""
    import itertools

    import torch

    from data_prep.demo_corpus import _all_docs
    from data_prep.tokenizer import train_tokenizer
    from pipeline.config import ModelConfig, QuantizeConfig
    from pipeline.model.gpt import GPT
    from pipeline.model.io import save_model_dir
    from pipeline.post.quantize import quantize

    root.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer([t for _, t in itertools.islice(_all_docs(), 300)], root / "tokenizer.model",
                          vocab_size=vocab_size)
    data = fake_corpus(root / "data", vocab_size=vocab_size, tokenizer=tok)
    torch.manual_seed(0)
    cfg = ModelConfig(style="llama", n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=vocab_size)
    save_model_dir(GPT(cfg), cfg, root / "plain", tokenizer=tok, meta={"kiln": {"stage": "pretrain"}})
    quantize(root / "plain", QuantizeConfig(method="int8-weight", eval_windows=0), root / "int8")
    quantize(root / "plain", QuantizeConfig(method="gptq", bits=4, calib=str(data), calib_samples=8, group_size=32,
                                            eval_windows=0), root / "gptq4")
    return {"plain": root / "plain", "int8": root / "int8", "gptq4": root / "gptq4", "data": data, "tokenizer": tok}


def dedup_texts(work: Path, texts: list[str], **minhash) -> list[tuple[str, int, float | None] | None]:
    """Exact and near-dup removal of `texts` through the prep path (one partition: KeyChunks ->
    dedup_bucket per bucket -> removals): per text, None or (reason, index of the kept twin, Jaccard)."""
    from data_prep import buckets
    from data_prep.config import PrepConfig
    from data_prep.document import Document

    cfg = PrepConfig(minhash=minhash, boilerplate={"enabled": False})
    keys = buckets.KeyChunks(Path(work) / "clean" / "00000", 0, cfg, lambda doc_id: 0)
    keys.dir.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        keys.add(Document(f"d{i}", text))
    keys.close()
    results = [buckets.dedup_bucket(b, [0], str(work), cfg) for b in range(cfg.dedup_buckets)]
    removed, _ = buckets.removals(results)
    return [removed.get(i) for i in range(len(texts))]


MANPAGE_OPTIONS = ("-a, --all", "-l", "-r, --recursive", "-n NUM, --lines=NUM", "--color[=WHEN]", "-h, --help")


def manpage_texts(n_docs: int, seed: int = 0) -> list[str]:
    """Man-page-like documents: prose hard-wrapped at 70 columns (indented 7, so most lines end mid-sentence
    without punctuation), section headings, option entries, a shell example and a `{` in running prose."""
    import random
    import textwrap

    from faker import Faker

    fake, rng = Faker("en_US"), random.Random(seed)
    fake.seed_instance(seed)
    links = ("the", "of", "and", "to", "with", "that")

    def paragraph(n: int) -> str:
        out = []
        for _ in range(n):
            ws = fake.words(rng.randint(9, 18))
            for i in range(1, len(ws), 3):
                ws.insert(i, rng.choice(links))
            out.append(" ".join(ws).capitalize() + ".")
        return " ".join(out)

    def wrap(text: str, indent: int = 7) -> str:
        return textwrap.fill(text, 70, initial_indent=" " * indent, subsequent_indent=" " * indent)

    docs = []
    for k in range(n_docs):
        name = f"tool{k}"
        parts = [f"{name.upper()}(1)                User Commands                {name.upper()}(1)", "NAME",
                 wrap(f"{name} - {fake.sentence(5).rstrip('.').lower()}"), "DESCRIPTION", wrap(paragraph(6)),
                 wrap(paragraph(5) + " Patterns such as {a,b} and ${HOME} are expanded by the shell first.")]
        for opt in rng.sample(MANPAGE_OPTIONS, 3):
            parts += [" " * 7 + opt, wrap(paragraph(2), 14)]
        parts += ["EXAMPLES", " " * 7 + f"for f in {{a,b,c}}; do {name} -l \"$f\"; done", wrap(paragraph(3)),
                  "SEE ALSO", " " * 7 + "ls(1), find(1)"]
        docs.append("\n\n".join(parts) + "\n")
    return docs
