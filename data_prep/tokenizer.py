"""SentencePiece tokenizer: trained on a deterministic sample, or an existing model reused.

Determinism: the sample is chosen by a hash of each document id (not by
position or worker), fed in partition order, with a fixed random seed and a
fixed thread count (`tokenizer_threads`, part of the config). Text was already
NFC-normalized, so sentencepiece's own normalization is off ("identity") and
whitespace is kept as is; byte fallback makes every string encodable.

Chat role markers (`ROLE_MARKERS`, named here because the tokenizer owns its pieces; how they are used is
pipeline/chat.py's) can be reserved as control pieces (`chat_markers`): sentencepiece gives them ids right
after <unk>, <s>, </s> and never produces them from text, so a conversation's structure cannot be forged by
its content. Reserving them changes every other id, so prep does it only when `chat_tokens` is set.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from data_prep.errors import KilnError

MAX_SENTENCE_CHARS = 4000
# system, user and assistant turns start with their marker; END closes every turn (generation stops there)
ROLE_MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_OF_TURN = "<|end|>"
CHAT_MARKERS = (*ROLE_MARKERS.values(), END_OF_TURN)


def train_tokenizer(sentences: Iterable[str], out: str | Path, *, vocab_size: int, model_type: str = "bpe",
                    threads: int = 2, seed: int = 1234, character_coverage: float = 0.9995,
                    chat_markers: bool = False) -> Path:
    """Train and atomically write `out` (a .model file); `chat_markers` reserves CHAT_MARKERS as control pieces."""
    import sentencepiece as spm

    out = Path(out)
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(sentences), model_writer=model, model_type=model_type,
            vocab_size=vocab_size, byte_fallback=True, character_coverage=character_coverage,
            num_threads=threads, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=4 * MAX_SENTENCE_CHARS + 16,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
            **({"control_symbols": list(CHAT_MARKERS)} if chat_markers else {}),
        )
    except RuntimeError as err:
        msg = str(err)
        m = re.search(r"value <= (\d+)", msg)
        if m:
            raise KilnError(f"vocab_size {vocab_size} is too large for this corpus; try --vocab-size {m.group(1)} or less") from None
        m = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if m:
            raise KilnError(f"vocab_size {vocab_size} is smaller than the {m.group(1)} pieces this corpus needs "
                            f"(characters, bytes, specials); try --vocab-size {m.group(1)} or more") from None
        raise KilnError(f"sentencepiece training failed: {msg.strip().splitlines()[-1]}") from None
    if not model.getvalue():
        raise KilnError("sentencepiece training got no text (every document was removed?)")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_bytes(model.getvalue())
    os.replace(tmp, out)
    return out


def _lines(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if line.strip():
                yield line[:MAX_SENTENCE_CHARS]


def check_tokenizer(path: str | Path) -> tuple[int, str]:
    """(vocab size, sha256) of a usable sentencepiece model; KilnError naming the file otherwise."""
    import sentencepiece as spm

    path = Path(path)
    try:
        data = path.read_bytes()
        sp = spm.SentencePieceProcessor(model_proto=data)
    except (OSError, RuntimeError) as err:
        raise KilnError(f"{path}: not a readable sentencepiece model ({str(err).strip().splitlines()[-1]})") from None
    if sp.eos_id() < 0:
        raise KilnError(f"{path}: the tokenizer has no EOS piece; Kiln appends EOS to every document")
    return sp.get_piece_size(), hashlib.sha256(data).hexdigest()
