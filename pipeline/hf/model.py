"""Any MODEL dir as a directory `transformers.AutoModelForCausalLM.from_pretrained` loads.

    plain (trained, distilled, pruned)  -> the family's transformers class (pipeline/families/), streamed
                                           tensor by tensor into (sharded) safetensors (save_hf)
    format torchao-int8 (int8-weight/-dynamic) -> the same model quantized by transformers' torchao
                                           integration, Kiln's int8 codes copied in bit for bit
    format packed (gptq, rtn)           -> the standard packed GPTQ layout (qweight/qzeros/scales/g_idx,
                                           quantization_config quant_method gptq)
(each format's writer is named in the quantization registry, pipeline/quant_methods.py; hf/quantized.py)

Every form carries tokenizer.json + tokenizer_config.json checked against the model's sentencepiece
tokenizer (on the built-in sample and, when the model's corpus is on disk, on its documents),
kiln_export.json (Kiln's config and lineage) and SHA256SUMS (what `kiln fetch --format hf` verifies).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from pipeline.config import KilnError, ModelConfig
from pipeline.console import log
from pipeline.hf.tokenizer import write_hf_tokenizer
from pipeline.model.io import TOKENIZER, WEIGHTS, read_config, verify_sums, write_sums
from pipeline.model.weights import INDEX, Weights, open_model_weights, shard_name, write_index

HF_DIR = "hf"  # where a logged model keeps its transformers form, next to the Kiln MODEL dir
EXPORT_META = "kiln_export.json"
CORPUS_SAMPLE = 200  # documents of the model's corpus the tokenizer is checked on, when it is on disk
MAX_SHARD_BYTES = 5 * 2**30  # per safetensors file of a transformers export (transformers' own default is 5 GB)


def corpus_texts(meta: dict, n: int = CORPUS_SAMPLE) -> list[str]:
    """Up to `n` validation (else training) documents of the corpus named in the lineage, as text. The
    lineage is the MODEL dir's (someone else's): a corpus there is read only through PreparedCorpus
    (manifest, tokenizer and shards confined to it and checked against the manifest); one that is
    missing or refused is skipped, since this sample only adds to the built-in one."""
    import sentencepiece as spm

    from data_prep.confine import read_confined
    from pipeline.data.corpus import TOKENIZER_MAX, PreparedCorpus

    paths = ((meta.get("kiln") or {}).get("train_config") or {}).get("data", {}).get("paths") or []
    for data_dir in [Path(p) for p in paths if isinstance(p, str)]:
        try:
            corpus = PreparedCorpus(data_dir)
            tok = corpus.manifest["tokenizer"]["path"]
            corpus.tokenizer_path  # noqa: B018 - confined and hash-checked
            proto = read_confined(data_dir, tok, f"{data_dir / 'manifest.json'}: tokenizer.path", TOKENIZER_MAX)
            shards = sorted(corpus.manifest.get("shards", []), key=lambda s: s["split"] != "val")
        except (KilnError, OSError, KeyError, TypeError, ValueError) as err:
            log.warning("%s: not used to check the tokenizer (%s)", data_dir, str(err).splitlines()[0][:300])
            continue
        if not shards:
            continue
        sp = spm.SentencePieceProcessor(model_proto=proto)
        texts = []
        for shard in shards:
            ds = corpus.dataset(shard)
            for i in range(min(len(ds), n - len(texts))):
                texts.append(sp.decode([t for t in ds[i].tolist() if t != sp.eos_id()]))
            if len(texts) >= n:
                break
        return texts
    return []


def finish(out: Path, cfg: ModelConfig, tokenizer: Path | None, meta: dict) -> dict:
    """Tokenizer files (strictly checked), Kiln's metadata and checksums next to saved weights."""
    checked = None
    if tokenizer:
        shutil.copyfile(tokenizer, out / TOKENIZER)
        checked = write_hf_tokenizer(out / TOKENIZER, out, cfg.block_size, corpus_texts(meta))["checked_texts"]
    (out / EXPORT_META).write_text(json.dumps({"model": cfg.model_dump(mode="json"), **meta}, indent=2,
                                              default=str) + "\n")
    write_sums(out)
    return {"tokenizer_checked_texts": checked}


def save_hf(weights: Weights | dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path, tokenizer: Path | None,
            meta: dict, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Plain weights -> a transformers model dir, streamed: tensor by tensor (peak memory about the largest
    one), in the dtype they are stored in, into `model.safetensors` or, past `max_shard_bytes`, shards
    `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json` (the layout transformers writes);
    no transformers model is built to write it."""
    from pipeline.hf.mapping import HFWeights, hf_form, transformers_config
    from pipeline.model.weights import DictWeights, write_tensors

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf = HFWeights(weights if isinstance(weights, Weights) else DictWeights(weights), cfg)
    size = {n: math.prod(hf.shape(n)) * hf.dtype(n).itemsize for n in hf.names()}
    shards: list[list[str]] = [[]]
    for name in hf.names():
        if shards[-1] and sum(size[n] for n in shards[-1]) + size[name] > max_shard_bytes:
            shards.append([])
        shards[-1].append(name)
    files = [WEIGHTS if len(shards) == 1 else shard_name(i, len(shards)) for i in range(len(shards))]
    for file, names in zip(files, shards, strict=True):
        write_tensors(out / file, ((n, hf.get(n)) for n in names), [(n, hf.dtype(n), hf.shape(n)) for n in names],
                      {"format": "pt"})
    if len(shards) > 1:
        write_index(out / INDEX, dict(zip(files, shards, strict=True)), sum(size.values()))
    config = transformers_config(cfg)
    config.architectures = [hf_form(cfg).model_class]
    config.dtype = str(hf.dtype(hf.names()[0])).removeprefix("torch.")
    config.to_json_file(str(out / "config.json"))
    return {"shards": len(shards), "bytes": sum(size.values())} | finish(out, cfg, tokenizer, meta)


def export_model_dir(model_dir: str | Path, out: str | Path) -> dict:
    """A MODEL dir of any kind (plain or quantized) -> its transformers form in `out`."""
    from pipeline.quant_methods import format_of

    model_dir, out = Path(model_dir), Path(out)
    verify_sums(model_dir)
    config = read_config(model_dir)
    cfg = ModelConfig.model_validate(config["model"])
    tok = model_dir / TOKENIZER if (model_dir / TOKENIZER).is_file() else None
    meta = {k: v for k, v in config.items() if k not in ("model", "format_version")}
    method = (config.get("quantization") or {}).get("method")
    if method is None:
        info = save_hf(open_model_weights(model_dir), cfg, out, tok, meta)
    else:
        info = format_of(config, model_dir / "config.json").to_hf(model_dir, config, out) | finish(out, cfg, tok, meta)
    return {"out": str(out), "format": "hf", "style": cfg.style, "quantization": method, **info}
