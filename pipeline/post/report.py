"""The comparison table: every compressed model against its teacher on the same val windows."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.console import print_table
from pipeline.evaluate import evaluate_windows
from pipeline.model.io import TOKENIZER, load_model_dir
from pipeline.post.common import nonzero_params, size_on_disk

COLUMNS = ["model", "stage", "method", "params", "nonzero", "perplexity", "bits_per_byte", "size_mb", "tokens_per_s"]


def compare(models: dict[str, str | Path], data_dir: str | Path, max_windows: int | None = 64,
            threads: int | None = None, title: str = "post-training vs teacher") -> list[dict]:
    """Load each MODEL dir, score it on `data_dir`'s val split on CPU, print and return one row per model.

    Non-overlapping windows (`evaluate_windows`): every model sees the same windows, and tokens/s is
    the plain forward rate; perplexity reads a little above `kiln eval`'s sliding window.
    bits/byte needs a sentencepiece tokenizer (the model's, else the corpus's); without one it is None."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    rows = []
    try:
        for name, path in models.items():
            model, config = load_model_dir(path)
            tok = Path(path) / TOKENIZER
            if not tok.exists():
                tok = Path(data_dir) / TOKENIZER
            result = evaluate_windows(model, data_dir, max_windows, tokenizer=tok if tok.exists() else None)
            kiln = config.get("kiln", {})
            rows.append({
                "model": name, "stage": kiln.get("stage", "trained"), "method": kiln.get("method"),
                "params": model.num_params(), "nonzero": nonzero_params(model),
                "loss": result["loss"], "perplexity": result["perplexity"], "bits_per_byte": result["bits_per_byte"],
                "size_mb": size_on_disk(path) / 1e6, "tokens_per_s": result["tokens_per_s"], "path": str(path),
            })
    finally:
        torch.set_num_threads(old_threads)
    print_table(title, rows, COLUMNS)
    return rows
