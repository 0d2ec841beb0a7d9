"""The MODEL directory every later stage reads: model.safetensors + config.json + tokenizer.model
(+ tokenizer.json / tokenizer_config.json, its transformers form, checked against it).

Weights cross machines and people, so they are only ever stored as safetensors
(never pickles). `SHA256SUMS` lets `kiln fetch` and loaders detect corruption.
A config.json `"quantization"` entry marks a quantized model; its loader lives
with the quantizer (pipeline/post/) and is looked up here by name.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.config import KilnError, ModelConfig, first_line
from pipeline.model.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
SUMS = "SHA256SUMS"
FORMAT_VERSION = 1


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sums(directory: Path) -> None:
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != SUMS)
    lines = [f"{sha256_file(p)}  {p.relative_to(directory).as_posix()}" for p in files]
    (directory / SUMS).write_text("\n".join(lines) + "\n")


def verify_sums(directory: str | Path) -> None:
    """Raise KilnError naming the first file whose checksum does not match."""
    directory = Path(directory)
    sums = directory / SUMS
    if not sums.exists():
        raise KilnError(f"{sums}: missing; cannot verify this model directory")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = directory / name
        if not path.exists():
            raise KilnError(f"{path}: listed in {SUMS} but missing")
        if sha256_file(path) != digest:
            raise KilnError(f"{path}: checksum mismatch (corrupt or modified)")


def load_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read weights from a safetensors file, and only that: anything else (a pickle renamed to
    .safetensors, a truncated file) is refused with one line and never executed."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as err:
        raise KilnError(f"{path}: not a readable safetensors file ({first_line(err)}); refusing to load it") from None


@contextmanager
def weights_only_loads(where: str | Path, allowed: list[type]):
    """Force every torch.load inside (a library's too, even one passing weights_only=False) to be
    weights-only, admitting just the `allowed` plain-data classes. A file that holds anything else
    (a pickle payload) is refused with one line naming `where`, and never executed."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")  # torch refuses both set
    before = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as err:
        raise KilnError(f"{where}: holds pickled objects other than tensors and plain state "
                        f"({first_line(err)}); refusing to load it") from None
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without aliases (a tied head shares the embedding), contiguous, on CPU."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def save_model_dir(
    state: dict[str, torch.Tensor] | torch.nn.Module,
    cfg: ModelConfig,
    out: str | Path,
    tokenizer: str | Path | None = None,
    meta: dict | None = None,
) -> Path:
    """Write a MODEL dir atomically (temp dir + rename): a reader never sees half of one."""
    out = Path(out)
    if isinstance(state, torch.nn.Module):
        state = unique_state_dict(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "kiln_format": str(FORMAT_VERSION)})
        config = {"format_version": FORMAT_VERSION, "model": cfg.model_dump(mode="json"), **(meta or {})}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer:
            shutil.copyfile(tokenizer, tmp / TOKENIZER)
            from pipeline.hf.tokenizer import write_hf_tokenizer  # tokenizer.json: what AutoTokenizer loads

            write_hf_tokenizer(tmp / TOKENIZER, tmp, cfg.block_size, strict=False)
        write_sums(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_config(path: str | Path) -> dict:
    path = Path(path) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise KilnError(f"{path}: not found; is {path.parent} a MODEL directory?") from None
    except json.JSONDecodeError as err:
        raise KilnError(f"{path}: not valid JSON ({err})") from None


def load_model_dir(path: str | Path, verify: bool = True, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Build the model a MODEL dir describes and load its weights; returns (model, config dict)."""
    path = Path(path)
    if verify:
        verify_sums(path)
    config = read_config(path)
    quant = config.get("quantization")
    if quant:  # e.g. {"loader": "pipeline.post.formats:load_quantized", ...}
        module, _, func = quant["loader"].partition(":")
        if not module.startswith("pipeline."):
            raise KilnError(f"{path / CONFIG}: quantization.loader {quant['loader']!r} is not a Kiln loader")
        model = getattr(importlib.import_module(module), func)(path, config, device)
        return model.eval(), config
    cfg = ModelConfig.model_validate(config["model"])
    model = GPT(cfg)
    state = load_safetensors(path / WEIGHTS, device=device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"head.lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) - tied or unexpected:
        raise KilnError(f"{path / WEIGHTS}: weights do not match config (missing {sorted(set(missing) - tied)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
    return model.to(device).eval(), config
