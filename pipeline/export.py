"""`kiln export`: a checkpoint (any layout) or MODEL dir -> a MODEL dir or a Hugging Face transformers dir.

Checkpoints carry every rank's slices of the plain weights with their slicing
recorded (checkpoint.py), so export never needs the layout they were trained with:
it reassembles one tensor at a time and streams it out (peak memory: the largest
tensor), the Hugging Face format too (its mapping onto transformers' names is the family's spec,
pipeline/families/, applied by pipeline/hf/mapping.py; its directory is pipeline/hf/model.py).
"""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.checkpoint import (
    LATEST,
    STATE,
    load_weights,
    newest_complete,
    pretrain_meta,
    read_state,
    verify,
    weights_only,
)
from pipeline.config import KilnError, ModelConfig
from pipeline.data.corpus import PreparedCorpus
from pipeline.model.io import CONFIG, TOKENIZER, read_config, save_model_dir, verify_sums
from pipeline.model.weights import Weights


def resolve_source(src: str | Path) -> Path:
    """A MODEL dir, a checkpoint dir, a `checkpoints/latest` pointer, a checkpoints/ dir or a run dir.
    For a run dir: the newest checkpoint whose weights verify, as a resume would choose."""
    return _resolve(src)[0]


def resolve_verified(src: str | Path, only=weights_only, collective: bool = False) -> Path:
    """`resolve_source`, with the chosen directory's files (`only`) checked against SHA256SUMS exactly once
    (`collective`: every rank calls it and hashes a share)."""
    path, verified = _resolve(src, only, collective)
    if not verified:
        verify(path, only, collective)
    return path


def _resolve(src: str | Path, only=weights_only, collective: bool = False) -> tuple[Path, bool]:
    """(the directory, whether its weights were just verified choosing it)."""
    src = Path(src)
    if src.is_file() and src.name == LATEST:
        return src.parent / src.read_text().strip(), False
    if src.is_dir() and not (src / CONFIG).exists() and not (src / STATE).exists():
        for root in (src, src / "checkpoints"):
            found = newest_complete(root, only, collective)
            if found is not None:
                return found, True
    if not src.exists():
        raise KilnError(f"{src}: no such checkpoint or MODEL directory")
    return src, False


def load_source(src: str | Path, verified: bool = False) -> tuple[Weights, ModelConfig, Path | None, dict]:
    """(plain weights, read lazily; model config; tokenizer path or None; metadata) of a checkpoint or MODEL
    dir. Checks what it will read against SHA256SUMS: a checkpoint's weights and state, a MODEL dir whole."""
    path, just_verified = _resolve(src)
    verified = verified or just_verified
    if (path / STATE).exists():
        state = read_state(path)
        run = state["config"]
        cfg = ModelConfig.model_validate(run["model"])
        tok = None
        for data_dir in run.get("data", {}).get("paths", []):
            if (Path(data_dir) / "manifest.json").exists():  # confined to the corpus and hash-checked there
                cand = PreparedCorpus(data_dir, verify=False).tokenizer_path
                tok = cand if cand.exists() else None
                break
        return load_weights(path, verified), cfg, tok, pretrain_meta(state, tok, exported_from=str(path))
    if not verified:
        verify_sums(path)
    config = read_config(path)
    if config.get("quantization"):
        raise KilnError(f"{path / CONFIG}: a quantized model cannot be exported to this format")
    cfg = ModelConfig.model_validate(config["model"])
    tok = path / TOKENIZER if (path / TOKENIZER).exists() else None
    meta = {k: v for k, v in config.items() if k not in ("model", "format_version")}
    return load_weights(path, verified=True), cfg, tok, meta


def export(src: str | Path, out: str | Path, fmt: str = "safetensors") -> dict:
    source, verified = _resolve(src)  # for a run dir this already checksums the chosen checkpoint's weights
    if fmt == "hf" and (source / CONFIG).is_file() and read_config(source).get("quantization"):
        from pipeline.hf.model import export_model_dir  # int8 (torchao) / GPTQ layouts transformers reads

        return {"source": str(source), **export_model_dir(source, out)}
    state, cfg, tok, meta = load_source(source, verified)
    out = Path(out)
    if fmt == "safetensors":
        save_model_dir(state, cfg, out, tokenizer=tok, meta=meta, as_float32=True)
    elif fmt == "hf":
        from pipeline.hf.model import save_hf  # weights + tokenizer.json checked against sentencepiece

        save_hf(state, cfg, out, tok, meta)  # streamed: one tensor at a time
    else:
        raise KilnError(f"--format {fmt}: expected safetensors or hf")
    return {"source": str(source), "out": str(out), "format": fmt, "style": cfg.style,
            "params": sum(math.prod(state.shape(n)) for n in state.names())}
