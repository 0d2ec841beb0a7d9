"""`kiln generate`: text from a MODEL (greedy, temperature, top-k, top-p), streamed to stdout."""

from __future__ import annotations

import sys

from pipeline.commands import common
from pipeline.config import ConfigError, GenerateConfig

NAME = "generate"
HELP = "Generate text from a MODEL (greedy, temperature, top-k, top-p)."
EXAMPLE = "kiln generate models:/kiln-125m@champion --prompt 'The tokenizer' --max-new-tokens 64 --top-p 0.9 --seed 0"


def add_arguments(p) -> None:
    common.add_common_options(p)
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--prompt", help="required, here or as prompt: in --config")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true", default=None,
                   help="the prompt is a user turn, the reply stops at the end of turn (a `kiln sft` model)")


def run(args) -> dict:
    from pipeline.console import kv_table
    from pipeline.generate import generate

    cfg = common.load(args, "generate", common.flags(args, GenerateConfig))
    if cfg.prompt is None:
        raise ConfigError("no prompt: give --prompt TEXT (or prompt: in --config)")
    local = common.tracker(args, must_exist=str(args.model).startswith("models:/"), cfg=cfg).materialize(args.model)

    def emit(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    emit(f"[user] {cfg.prompt}\n[assistant] " if cfg.chat else cfg.prompt)
    result = generate(local, cfg.prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                      cfg.repetition_penalty, cfg.seed, on_text=emit, chat=cfg.chat)
    emit("\n")
    kv_table("kiln generate", {k: result[k] for k in ("new_tokens", "stopped_at_eos", "tokens_per_s", "seed")})
    result["model"] = args.model
    return result
