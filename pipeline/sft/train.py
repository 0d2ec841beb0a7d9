"""`kiln sft`: supervised fine-tuning of a MODEL on conversations, through the post-training loop.

    BASE MODEL dir ──chat markers──> model + chat tokenizer           (pipeline/sft/vocab.py, pipeline/chat.py)
    SFT files ──read, check, split──> train / val conversations      (pipeline/sft/data.py; bad ones quarantined)
              ──render, mask, pack──> rows of block_size ids         (pipeline/sft/packing.py)
    rows ──pipeline/post/loop.py──> OUT/model (+ checkpoints, metrics.jsonl, quarantine.jsonl, sft_data.json)

A base whose tokenizer lacks the chat markers gets them (its embedding grows by their rows); the MODEL dir
written carries that tokenizer, so its transformers form has the chat template (pipeline/hf/tokenizer.py) and
renders exactly the ids trained on. The loss is the mean over learned tokens (the assistant's turns with
`data.loss_on: completion_only`) of packed rows whose conversations never see each other (GPT's `segments`).
The batch of step k is rows of one epoch's permutation, drawn from (seed, k) alone, so a resume or another
process count sees the same rows. `lora.rank` > 0 trains LoRA adapters instead of every weight
(pipeline/sft/lora.py) and merges them into the MODEL dir written.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from data_prep.errors import KilnError
from pipeline.chat import ChatTokenizer
from pipeline.config import SftConfig
from pipeline.console import is_main_process, log
from pipeline.model.io import TOKENIZER, save_model_dir, sha256_file
from pipeline.model.weights import weights_file
from pipeline.post import loop
from pipeline.post.common import lineage, model_path
from pipeline.sft.data import Example, SftData, prepare
from pipeline.sft.lora import merged, trainable, with_lora
from pipeline.sft.packing import IGNORE, Row, pack, targets, tensors
from pipeline.sft.vocab import chat_model

PAD = 0  # the id padding positions hold (never attended across, never learned)


class SftTask:
    """pipeline/post/loop.py's task: packed rows, epoch by epoch, each epoch a permutation seeded by (seed, epoch)."""

    def __init__(self, rows: list[Row], micro: int, accum: int, seed: int, identity: dict):
        self.rows, self.micro, self.accum, self.seed, self.identity = rows, micro, accum, seed, identity
        self._orders: dict[int, np.ndarray] = {}

    def _row(self, i: int) -> Row:
        epoch, at = divmod(i, len(self.rows))
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))}
        return self.rows[int(self._orders[epoch][at])]

    def micro_batches(self, step: int, rank: int, world: int) -> list[dict]:
        per_rank = self.micro * self.accum
        first = (step * world + rank) * per_rank
        mine = [self._row(i) for i in range(first, first + per_rank)]
        return [tensors(mine[k:k + self.micro]) for k in range(0, per_rank, self.micro)]

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        return model(batch["ids"], batch["targets"], segments=batch["segments"])[1], {}

    def tokens(self, batch: dict) -> int:
        return int((batch["targets"] != IGNORE).sum())


def rows_of(examples: list[Example], loss_on: str, block_size: int) -> list[Row]:
    return pack([(e.ids, targets(e.ids, e.assistant, loss_on)) for e in examples], block_size, PAD)


@torch.no_grad()
def packed_loss(model: torch.nn.Module, rows: list[Row], batch: int = 8) -> float | None:
    """Mean loss per learned token over `rows` (None without any)."""
    if not rows:
        return None
    device = next(model.parameters()).device
    was, total, count = model.training, 0.0, 0
    model.eval()
    for k in range(0, len(rows), batch):
        b = {key: v.to(device) for key, v in tensors(rows[k:k + batch]).items()}
        n = int((b["targets"] != IGNORE).sum())
        if n:
            total += model(b["ids"], b["targets"], segments=b["segments"])[1].item() * n
            count += n
    model.train(was)
    return total / count if count else None


def data_digest(data: SftData, loss_on: str) -> str:
    """sha256 of what the run learns from: every input file's hash, in order, and the loss mask."""
    files = [[i["rel"], i["sha256"]] for i in data.inputs]
    return hashlib.sha256(json.dumps({"files": files, "loss_on": loss_on}).encode()).hexdigest()


def write_report(out: Path, data: SftData, digest: str) -> None:
    """OUT/quarantine.jsonl (every record left out, with its reason and source) and OUT/sft_data.json."""
    with (out / "quarantine.jsonl").open("w") as f:
        for rec in data.left_out:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    (out / "sft_data.json").write_text(json.dumps({"sha256": digest, "inputs": data.inputs,
                                                   "counts": dict(data.counts)}, indent=1))


def sft(base_ref: str | Path, cfg: SftConfig, out: str | Path) -> dict:
    """Fine-tune the MODEL dir `base_ref` on `cfg.data`, checkpointing to OUT/checkpoints (resumed when
    present); write OUT/model; return the summary."""
    import sentencepiece as spm

    base, out, t = model_path(base_ref), Path(out), cfg.train
    if not cfg.data.paths:
        raise KilnError("no SFT data: give --data FILE... (or data.paths in --config)")
    model, _, proto = chat_model(base)
    chat = ChatTokenizer(spm.SentencePieceProcessor(model_proto=proto), f"{base / TOKENIZER}")
    data = prepare(cfg.data, chat, model.cfg.block_size)
    digest = data_digest(data, cfg.data.loss_on)
    out.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # every rank reads the same data; one writes what it found
        write_report(out, data, digest)
    if data.counts["left_out"] and is_main_process():
        log.warning("%d of %d records left out (reasons and sources in %s)", data.counts["left_out"],
                    data.counts["records"], out / "quarantine.jsonl")
    if not data.train:
        raise KilnError(f"{', '.join(cfg.data.paths)}: no conversation left to train on "
                        f"({data.counts['records']} records, {data.counts['left_out']} left out: {out / 'quarantine.jsonl'})")
    block = model.cfg.block_size
    train_rows, val_rows = rows_of(data.train, cfg.data.loss_on, block), rows_of(data.val, cfg.data.loss_on, block)
    identity = {"base_sha256": sha256_file(base / weights_file(base)), "data_sha256": digest,
                "vocab_size": model.cfg.vocab_size, "train": t.model_dump(mode="json"),
                "lora": cfg.lora.model_dump(mode="json"),
                **({"zero_stage": cfg.parallel.zero_stage} if cfg.parallel.zero_stage else {})}  # (older runs: none)
    torch.manual_seed(t.seed)
    before = packed_loss(model, val_rows)
    trained = with_lora(model, cfg.lora) if cfg.lora.rank else model
    params = trainable(trained)
    task = SftTask(train_rows, t.micro_batch_size, t.grad_accum or 1, t.seed, identity)
    result = loop.run(trained, task, t, zero_stage=cfg.parallel.zero_stage, checkpoints=out / "checkpoints",
                      every=cfg.checkpoint.every, keep=cfg.checkpoint.keep, metrics=out / "metrics.jsonl", name="sft")
    model = merged(trained) if cfg.lora.rank else model
    summary = {"out": str(out), "model": str(out / "model"), "base": str(base), "steps": t.steps,
               "resumed_from": result.start, "processes": result.world, "conversations_train": len(data.train),
               "conversations_val": len(data.val), "rows_train": len(train_rows), "left_out": data.counts["left_out"],
               "truncated": data.counts["truncated"], "tokens_learned": result.tokens, "data_sha256": digest,
               "base_val_loss": before, "val_loss": packed_loss(model, val_rows),
               "loss": result.last.get("loss"), "trainable_params": params, "lora_rank": cfg.lora.rank}
    if result.is_main:
        meta = lineage(base, "sft", f"sft-{cfg.data.loss_on}" + (f"-lora{cfg.lora.rank}" if cfg.lora.rank else ""),
                       data_sha256=digest, steps=t.steps, seed=t.seed, lr=t.lr, conversations=len(data.train), data=[str(p) for p in cfg.data.paths])
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            tok = Path(tmp) / TOKENIZER
            tok.write_bytes(proto)
            save_model_dir(model.cpu(), model.cfg, out / "model", tok, meta)
    return summary
