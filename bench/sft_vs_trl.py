"""Supervised fine-tuning, Kiln against TRL: `kiln sft`'s code path and TRL's own SFTTrainer on the same base, the
same conversations, the same steps, learning rate and schedule, rows per step and row length, in one run, on CPU.

- Base: a llama-style GPT (4 layers, 4 heads, 128 wide, context 128; `--layers` ...) with a sentencepiece tokenizer
  that holds the chat markers (trained here on the demo corpus' texts, vocab 2048), initialized at random and
  saved as a Kiln MODEL dir; its transformers form (`kiln export --format hf`: Llama, with the chat template)
  is TRL's base. Both start from the same weights.
- Data: a deterministic instruction task built here (swap two words: "swap: A B" -> "B A", over 60 words), the
  training pairs as {"prompt", "completion"} records, 200 pairs held out.
- Kiln: pipeline/sft/train.py `sft` (what `kiln sft` runs): conversations packed in order into rows of the
  context, document-masked, loss on the completion and its end of turn; AdamW, warmup then cosine to min_lr.
- TRL: SFTTrainer with the conversational prompt-completion records (it applies the chat template itself),
  packing=True (best-fit decreasing into rows of max_length = the context, padding-free with position ids),
  completion-only loss, the same AdamW betas, weight decay, clipping, warmup and cosine-to-min_lr schedule
  (`cosine_with_min_lr`), per-device batch = Kiln's rows per step, fp32 on CPU.
- One evaluator, on both results' transformers forms: the mean loss per completion token (the assistant's
  content and its end of turn) of the held-out pairs, each rendered alone by the tokenizer's chat template;
  and greedy exact match on them (generation stops at the end of turn).
- Clock: each one's training loop (Kiln: the loop's elapsed seconds, from its first step; TRL: the trainer's
  `train_runtime`), both on the same threads; data preparation and start-up reported beside it.

Bars (issue 28): Kiln's held-out loss within 2% of TRL's, its training wall time <= 1.0x TRL's.
Appends one JSON line to RESULTS/sft_vs_trl.jsonl. Needs TRL (`pip install trl`; not a Kiln dependency).

    PYTHONPATH=. OMP_NUM_THREADS=2 python bench/sft_vs_trl.py --steps 300
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from bench.__main__ import append_result, machine  # noqa: E402

WORDS = ("list string value file module class object function error number line name type method data key time "
         "code test path text dict call format source table index frame event thread socket buffer queue stack "
         "token parser reader writer handle result state field record entry block chunk array vector matrix "
         "graph node edge tree root leaf branch image sound color shape").split()


def task_records(held_out: int = 200) -> tuple[list[dict], list[dict]]:
    pairs = [(a, b) for a in WORDS for b in WORDS if a != b]
    random.Random(0).shuffle(pairs)
    recs = [{"prompt": f"swap: {a} {b}", "completion": f"{b} {a}"} for a, b in pairs]
    return recs[:-held_out], recs[-held_out:]


def build_base(work: Path, args) -> tuple[Path, Path]:
    """A random Kiln MODEL dir whose tokenizer holds the chat markers, and its transformers form."""
    from data_prep.demo_corpus import _all_docs
    from data_prep.tokenizer import train_tokenizer
    from pipeline.config import ModelConfig
    from pipeline.export import export
    from pipeline.model.gpt import GPT
    from pipeline.model.io import save_model_dir

    tok = train_tokenizer([t for _, t in itertools.islice(_all_docs(), 400)], work / "tokenizer.model",
                          vocab_size=args.vocab, chat_markers=True)
    torch.manual_seed(0)
    cfg = ModelConfig(style="llama", n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                      block_size=args.context, vocab_size=args.vocab, dropout=0.0)
    base = save_model_dir(GPT(cfg), cfg, work / "base", tokenizer=tok, meta={"kiln": {"stage": "pretrain"}})
    export(base, work / "base-hf", "hf")
    return base, work / "base-hf"


def run_kiln(base: Path, data: Path, work: Path, args) -> dict:
    from pipeline.config import load_config
    from pipeline.export import export
    from pipeline.sft.train import sft

    cfg = load_config("sft", None, [f"data.paths=[{data}]", "data.val_fraction=0.0", f"train.steps={args.steps}",
                                    f"train.lr={args.lr}", f"train.min_lr={args.lr / 10}", "train.warmup_steps=10",
                                    f"train.micro_batch_size={args.rows}", "train.precision=fp32",
                                    "train.weight_decay=0.0", "train.grad_clip=1.0", "train.beta1=0.9",
                                    "train.beta2=0.95", f"train.log_every={args.steps}", f"train.seed={args.seed}",
                                    f"checkpoint.every={args.steps}", "checkpoint.keep=1", "tracking.enabled=false"])
    t0 = time.perf_counter()
    summary = sft(base, cfg, work / "kiln")
    total = time.perf_counter() - t0
    metrics = json.loads((work / "kiln" / "metrics.jsonl").read_text().splitlines()[-1])
    export(work / "kiln" / "model", work / "kiln-hf", "hf")
    return {"train_s": metrics["elapsed_s"], "total_s": round(total, 2), "final_train_loss": summary["loss"],
            "rows_per_step": args.rows, "tokens_learned": summary["tokens_learned"], "hf": str(work / "kiln-hf")}


def run_trl(base_hf: Path, train: list[dict], work: Path, args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base_hf)
    model = AutoModelForCausalLM.from_pretrained(base_hf, attn_implementation="sdpa", dtype=torch.float32)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                             "completion": [{"role": "assistant", "content": r["completion"]}]} for r in train])
    conf = SFTConfig(output_dir=str(work / "trl"), max_steps=args.steps, learning_rate=args.lr,
                     lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": args.lr / 10},
                     warmup_steps=10, per_device_train_batch_size=args.rows, gradient_accumulation_steps=1,
                     max_length=args.context, packing=True, completion_only_loss=True, weight_decay=0.0,
                     max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.95, seed=args.seed, data_seed=args.seed,
                     logging_steps=args.steps, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=conf, train_dataset=ds, processing_class=tok)
    out = trainer.train()
    total = time.perf_counter() - t0
    trainer.save_model(str(work / "trl-hf"))
    tok.save_pretrained(str(work / "trl-hf"))
    return {"train_s": round(out.metrics["train_runtime"], 2), "total_s": round(total, 2),
            "final_train_loss": out.training_loss, "rows_per_step": args.rows, "hf": str(work / "trl-hf")}


@torch.no_grad()
def evaluate(hf_dir: str, held: list[dict]) -> dict:
    """Mean loss per completion token (content + end of turn) of each held-out pair rendered alone, and greedy
    exact match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    end = tok.convert_tokens_to_ids("<|end|>")

    def ids(messages, gen):
        out = tok.apply_chat_template(messages, add_generation_prompt=gen)
        return list(out if isinstance(out, list) else out["input_ids"])  # (a BatchEncoding in transformers 5)

    total, count, hits = 0.0, 0, 0
    for r in held:
        user = [{"role": "user", "content": r["prompt"]}]
        prompt, full = ids(user, True), ids(user + [{"role": "assistant", "content": r["completion"]}], False)
        x = torch.tensor([full])
        logits = model(x).logits[0, len(prompt) - 1:-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, len(prompt):], reduction="sum"))
        count += len(full) - len(prompt)
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=end,
                             pad_token_id=end)[0, len(prompt):].tolist()
        hits += tok.decode([t for t in gen if t != end], skip_special_tokens=True).strip() == r["completion"]
    return {"heldout_loss": total / count, "exact_match": hits / len(held), "pairs": len(held)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rows", type=int, default=8, help="rows (packed) per step")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / "runs/bench-sft")
    ap.add_argument("--results", type=Path, default=ROOT / "bench/results")
    args = ap.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("trl") is None:  # the anchor is not a Kiln dependency
        print("sft_vs_trl: needs TRL (pip install trl); skipped", file=sys.stderr)
        return 0
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args.work.mkdir(parents=True, exist_ok=True)
    import shutil

    for sub in ("kiln", "kiln-hf", "trl", "trl-hf"):
        shutil.rmtree(args.work / sub, ignore_errors=True)
    train, held = task_records()
    data = args.work / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in train))
    base, base_hf = build_base(args.work, args)
    kiln = run_kiln(base, data, args.work, args)
    trl = run_trl(base_hf, train, args.work, args)
    kiln.update(evaluate(kiln["hf"], held))
    trl.update(evaluate(trl["hf"], held))
    base_eval = evaluate(str(base_hf), held)
    import trl as trl_pkg

    record = {"bench": "sft_vs_trl.heldout_loss", "value": round(kiln["heldout_loss"], 4), "unit": "nats/token",
              "reference": round(trl["heldout_loss"], 4), "ratio": round(kiln["heldout_loss"] / trl["heldout_loss"], 4),
              "bar": "ratio <= 1.02", "train_time_ratio": round(kiln["train_s"] / trl["train_s"], 4),
              "time_bar": "train_time_ratio <= 1.0", "kiln": kiln, "trl": trl, "base": base_eval,
              "steps": args.steps, "lr": args.lr, "rows_per_step": args.rows, "context": args.context,
              "model": {"layers": args.layers, "heads": args.heads, "width": args.width, "vocab": args.vocab},
              "train_pairs": len(train), "trl_version": trl_pkg.__version__, "threads": torch.get_num_threads(),
              "machine": machine(), "load_average_1min": round(os.getloadavg()[0], 2),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    append_result(args.results, "sft_vs_trl", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
