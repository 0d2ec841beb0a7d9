"""The MODEL directory every later stage reads: model.safetensors (or, from a multi-rank run, shards
model-0000N-of-0000M.safetensors named by model.safetensors.index.json) + config.json + tokenizer.model
(+ tokenizer.json / tokenizer_config.json, its transformers form, checked against it).

Weights cross machines and people, so they are only ever stored as safetensors
(never pickles). `SHA256SUMS` lets `kiln fetch` and loaders detect corruption.
A config.json `"quantization"` entry marks a quantized model; it names its format, whose loader
the quantization registry (pipeline/quant_methods.py) holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from data_prep.confine import escapes, open_confined, read_confined
from pipeline.config import KilnError, ModelConfig, first_line
from pipeline.model.gpt import GPT
from pipeline.model.weights import (
    INDEX,
    SHARDS_DIR,
    WEIGHTS,
    DictWeights,
    Weights,
    open_model_weights,
    read_index,
    save_weights,
    weights_file,
)
from pipeline.quant_methods import load_quantized

CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
SUMS = "SHA256SUMS"
FETCH_MARKER = ".kiln-fetched.json"  # written by `kiln fetch` next to what it verified (pipeline/tracking/registry.py)
# The only files a verified directory may hold without a SHA256SUMS line; no loader reads them. mlflow_run.json
# is the run record a stage whose --out is a MODEL dir (quantize, prune) writes there (pipeline/tracking/common.py).
UNLISTED_OK = {SUMS, FETCH_MARKER, "mlflow_run.json"}
FORMAT_VERSION = 1
SHARD_SUMS = "kiln_sha256"  # in a weight index's metadata: {shard file: sha256}, as each rank hashed it writing
# Loads a quantized MODEL dir by the format its config.json names; a layer above this one, imported when needed.
_SUMS_LINE = re.compile(r"([0-9a-f]{64}) [ *](.+)")  # sha256sum's text and binary forms


SMALL_FILE_MAX = 16 << 20  # bytes of a SHA256SUMS, config.json or checkpoint state read whole


def sha256_file(path: str | Path, f=None) -> str:
    """The digest of `path`, or of the open file `f` (open_confined) when given."""
    h = hashlib.sha256()
    with f or open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_sums(directory: Path, known: dict[str, str] | None = None) -> None:
    """SHA256SUMS over every file under `directory`; digests in `known` (computed while the files were
    written) are taken as they are, the rest are hashed here."""
    known = known or {}
    files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file() and p.name != SUMS)
    missing = sorted(set(known) - set(files))
    if missing:
        raise KilnError(f"{directory}: {missing[0]} was hashed when written but is not there")
    lines = [f"{known.get(name) or sha256_file(directory / name)}  {name}" for name in files]
    (directory / SUMS).write_text("\n".join(lines) + "\n")


def read_sums(directory: str | Path) -> dict[str, str]:
    """{relative path: sha256} from SHA256SUMS. A checksum file is as untrusted as the files: every entry
    must stay inside `directory` as a regular file (no absolute path, `..` or symlink out), and no file may
    be there that it does not list (UNLISTED_OK aside)."""
    directory = Path(directory)
    sums = directory / SUMS
    try:
        text = read_confined(directory, SUMS, f"{directory}:", SMALL_FILE_MAX).decode(errors="replace")
    except FileNotFoundError:
        raise KilnError(f"{sums}: missing; cannot verify this directory") from None
    listed = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if not (m := _SUMS_LINE.fullmatch(line)):
            raise KilnError(f"{sums}:{n}: not a `<sha256>  <file>` line")
        digest, name = m.groups()
        if why := escapes(directory, name):
            raise KilnError(f"{sums}:{n}: {name!r} {why}; refusing this directory")
        listed[name] = digest
    present = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                     if not p.is_dir() or p.is_symlink())
    for name in present:
        if name not in listed and name not in UNLISTED_OK:
            raise KilnError(f"{directory / name}: not listed in {sums}; refusing a directory with unverified files")
    return listed


def check_sums(directory: str | Path, entries: dict[str, str]) -> None:
    """Raise KilnError naming the first listed file that is missing, not a plain file or whose bytes differ."""
    directory = Path(directory)
    for name, digest in entries.items():
        path = directory / name
        try:
            f = open_confined(directory, name, f"{directory / SUMS}: entry")
        except FileNotFoundError:
            raise KilnError(f"{path}: listed in {SUMS} but missing") from None
        if sha256_file(path, f) != digest:
            raise KilnError(f"{path}: checksum mismatch (corrupt or modified)")


def verify_sums(directory: str | Path) -> None:
    """Check every file SHA256SUMS lists (checkpoint.verify checks a part, split over the ranks), and that
    the shard digests a Kiln weight index records agree with it (the index's digest then names every weight)."""
    listed = read_sums(directory)
    if INDEX in listed:
        recorded = read_index(Path(directory))[1].get(SHARD_SUMS) or {}
        if not isinstance(recorded, dict):
            raise KilnError(f"{Path(directory) / INDEX}: {SHARD_SUMS} is not a {{shard file: sha256}} object")
        for name, digest in recorded.items():
            if listed.get(name) != digest:
                raise KilnError(f"{Path(directory) / INDEX}: {SHARD_SUMS} of {name} disagrees with {SUMS}")
    check_sums(directory, listed)


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
    state: dict[str, torch.Tensor] | torch.nn.Module | Weights,
    cfg: ModelConfig,
    out: str | Path,
    tokenizer: str | Path | None = None,
    meta: dict | None = None,
    as_float32: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a MODEL dir atomically (temp dir + rename): a reader never sees half of one.

    `state` may be lazy (`Weights`, e.g. a sharded checkpoint): the weights then stream through tensor by
    tensor, stored as they are given, or as `dtype` (float32 with `as_float32`). The end of a multi-rank
    run writes its MODEL dir with every rank at once instead (model/parallel_save.py)."""
    out = Path(out)
    if isinstance(state, torch.nn.Module):
        state = unique_state_dict(state)
    if isinstance(state, dict):
        state = DictWeights(state)
    tmp = new_temp_dir(out)
    try:
        known = {WEIGHTS: save_weights(state, tmp / WEIGHTS, {"format": "pt", "kiln_format": str(FORMAT_VERSION)},
                                       dtype=torch.float32 if as_float32 else dtype)}
        finish_model_dir(tmp, out, cfg, tokenizer, meta, known)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def new_temp_dir(out: Path) -> Path:
    """An empty directory next to `out`, where its next version is written before `finish_model_dir`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def finish_model_dir(tmp: Path, out: Path, cfg: ModelConfig, tokenizer: str | Path | None, meta: dict | None,
                     known: dict[str, str]) -> None:
    """config.json, the tokenizer files and SHA256SUMS next to the weights in `tmp` (`known`: their digests,
    computed while they were written), then `tmp` renamed to `out`, replacing any old one."""
    config = {"format_version": FORMAT_VERSION, "model": cfg.model_dump(mode="json"), **(meta or {})}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if tokenizer:
        shutil.copyfile(tokenizer, tmp / TOKENIZER)
        from pipeline.hf.tokenizer import write_hf_tokenizer  # tokenizer.json: what AutoTokenizer loads

        write_hf_tokenizer(tmp / TOKENIZER, tmp, cfg.block_size, strict=False)
    write_sums(tmp, known)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def read_config(path: str | Path) -> dict:
    path = Path(path) / CONFIG
    try:
        return json.loads(read_confined(path.parent, CONFIG, f"{path.parent}:", SMALL_FILE_MAX))
    except FileNotFoundError:
        raise KilnError(f"{path}: not found; is {path.parent} a MODEL directory?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KilnError(f"{path}: not valid JSON ({type(err).__name__})") from None


DIMS_SLACK = 64 << 20  # parameters a config may describe beyond what its files could hold (tiny models)


def check_dims(path: Path, model: dict) -> None:
    """config.json's `model` (someone else's) bounded by the files beside it, before anything is allocated:
    the fewest parameters and buffer values those dimensions imply may not exceed 4 per byte of the
    directory's files (a 4-bit format stores 2 per byte) plus DIMS_SLACK."""
    def dim(key: str, default: int = 0) -> int:
        value = model.get(key) or default
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    d, layers, vocab, block = dim("n_embd"), dim("n_layer"), dim("vocab_size"), dim("block_size")
    ffn = dim("ffn_hidden", 2 * d)  # no config makes the MLP narrower than 2d unless it says so
    fewest = layers * (2 * d * d + 2 * d * ffn) + vocab * d + block * max(d // max(dim("n_head", 1), 1), 1)
    held = sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    shards = path / SHARDS_DIR  # a sharded checkpoint's weights
    if shards.is_dir() and not shards.is_symlink():
        held += sum(f.lstat().st_size for f in shards.rglob("*") if f.is_file() and not f.is_symlink())
    if fewest > 4 * held + DIMS_SLACK:
        raise KilnError(f"{path / CONFIG}: model dimensions (n_layer, n_embd, vocab_size, block_size, ffn_hidden) "
                        f"describe at least {fewest:,} parameters, more than the limit of 4 per byte of the "
                        f"{held:,} bytes of files there; refusing to build it")


def load_model_dir(path: str | Path, verify: bool = True, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Build the model a MODEL dir describes and load its weights; returns (model, config dict)."""
    path = Path(path)
    if verify:
        verify_sums(path)
    config = read_config(path)
    check_dims(path, config.get("model") if isinstance(config.get("model"), dict) else {})
    if config.get("quantization"):  # e.g. {"format": "packed", "method": "gptq", "bits": 4, ...}
        model = load_quantized(path, config, device)
        return model.eval(), config
    cfg = ModelConfig.model_validate(config["model"])
    model = GPT(cfg)
    load_checked(model, open_model_weights(path).to_dict(), path / weights_file(path))
    return model.to(device).eval(), config


def load_checked(model: GPT, state: dict[str, torch.Tensor], where: str | Path, replaced=()) -> None:
    """Load `state` into `model`, refusing (one line naming `where`) a tensor the model lacks or a weight
    it does not get: the tied head may be absent (it is the embedding), and so may the weights of the
    `replaced` layers, which the caller has set itself (a quantized format's dequantized Linears)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = {f"{layer}.weight" for layer in replaced} | ({"head.lm_head.weight"} if model.cfg.tie_embeddings else set())
    if set(missing) - allowed or unexpected:
        raise KilnError(f"{where}: weights do not match config (missing {sorted(set(missing) - allowed)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]})")
