"""Give an existing model the chat markers: its tokenizer gets the pieces, its embedding the rows.

A model whose tokenizer was trained without prep's `chat_tokens` has no id for <|user|> and the rest. The
markers are appended to the sentencepiece model as control pieces after every existing piece, so every id a
text had stays the id it has (segmentation never uses control pieces), and the embedding (and an untied
head) grows by as many rows. A new row starts as the mean of the existing rows: a marker then looks like an
average token instead of noise far from the rest, and the head gives it an average logit. Old tokens' logits
are unchanged, since a row no old input reads and no old output is compared with changes nothing about them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from data_prep.errors import KilnError
from data_prep.tokenizer import CHAT_MARKERS
from pipeline.hf.tokenizer import CONTROL, parse_model


def add_chat_markers(model_proto: bytes) -> tuple[bytes, int]:
    """(the sentencepiece model with the missing chat markers appended as control pieces, how many were added)."""
    m = parse_model(model_proto)
    have = {p.piece: p.type for p in m.pieces}
    wrong = [piece for piece in CHAT_MARKERS if piece in have and have[piece] != CONTROL]
    if wrong:
        raise KilnError(f"the tokenizer has {' '.join(wrong)} as an ordinary piece (text can produce it), "
                        "not as a control piece; it cannot be used as a chat marker")
    added = [piece for piece in CHAT_MARKERS if piece not in have]
    for piece in added:
        new = m.pieces.add()
        new.piece, new.score, new.type = piece, 0.0, CONTROL
    m.trainer_spec.vocab_size = len(m.pieces)
    return m.SerializeToString(), len(added)


def _grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    mean = weight.detach().mean(dim=0, keepdim=True)
    return torch.cat([weight.detach(), mean.expand(rows, -1)], dim=0)


def grow_vocab(model: torch.nn.Module, new_size: int) -> torch.nn.Module:
    """`model` (a pipeline.model GPT) with its embedding and untied head grown to `new_size` rows, new rows
    the mean of the old ones; `model.cfg.vocab_size` follows. A tied head keeps sharing the embedding."""
    wte, head = model.embed.wte, model.head.lm_head
    old = wte.weight.shape[0]
    if new_size < old:
        raise KilnError(f"cannot shrink the vocabulary from {old} to {new_size}")
    tied = head.weight is wte.weight
    with torch.no_grad():
        wte.weight = torch.nn.Parameter(_grown(wte.weight, new_size - old))
        wte.num_embeddings = new_size
        if tied:
            head.weight = wte.weight
        else:
            head.weight = torch.nn.Parameter(_grown(head.weight, new_size - old))
        head.out_features = new_size
    model.cfg = model.cfg.model_copy(update={"vocab_size": new_size})
    return model


def give_chat_markers(model: torch.nn.Module, model_proto: bytes) -> bytes:
    """Add the missing chat markers to a model and its sentencepiece model (returned); a no-op for a model
    that has them. The markers' rows of the embedding (and untied head) are the mean of the rows of the
    tokenizer's own pieces, also where a padded vocabulary already had rows at their ids."""
    before = len(parse_model(model_proto).pieces)
    proto, added = add_chat_markers(model_proto)
    if not added:
        return proto
    after = before + added
    grow_vocab(model, max(model.cfg.vocab_size, after))
    with torch.no_grad():
        for weight in {id(w): w for w in (model.embed.wte.weight, model.head.lm_head.weight)}.values():
            weight[before:after] = weight[:before].mean(dim=0)
    return proto


def chat_model(model_dir: str | Path) -> tuple[torch.nn.Module, dict, bytes]:
    """A MODEL dir's model, config and tokenizer, ready to chat: the markers added (and the embedding grown)
    when its tokenizer lacks them. Save both with `save_model_dir(model, model.cfg, OUT, tokenizer=FILE)`."""
    from data_prep.confine import read_confined
    from pipeline.data.corpus import TOKENIZER_MAX
    from pipeline.model.io import TOKENIZER, load_model_dir

    model_dir = Path(model_dir)
    model, config = load_model_dir(model_dir)
    if config.get("quantization"):
        raise KilnError(f"{model_dir}: a quantized model cannot be given chat markers; start from its plain parent")
    try:
        proto = read_confined(model_dir, TOKENIZER, f"{model_dir}:", TOKENIZER_MAX)
    except FileNotFoundError:
        raise KilnError(f"{model_dir / TOKENIZER}: not found; a chat model needs its tokenizer") from None
    return model, config, give_chat_markers(model, proto)
