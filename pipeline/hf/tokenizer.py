"""tokenizer.json + tokenizer_config.json from a sentencepiece model: what `AutoTokenizer` loads.

transformers can convert a bare `tokenizer.model` itself, but only with protobuf installed, and
the conversion of the pinned release silently drops the leading "▁" (every id list differs).
So Kiln writes the fast-tokenizer files itself, with the `tokenizers` library, from the model's
own settings (read once here, with sentencepiece's protobuf schema), and checks them before
writing: every piece of the vocabulary, a built-in multilingual sample and any texts the caller
adds must give the ids sentencepiece gives and decode to the same text, else nothing is written.

What the sentencepiece encoder does, and its tokenizers equivalent:
  normalizer   identity (Kiln's) or a precompiled charsmap   -> Precompiled(charsmap)
               remove_extra_whitespaces                      -> Strip + collapse runs of " "
               add_dummy_prefix ("▁" before the text)        -> Prepend("▁")
               escape whitespace (" " -> "▁")                -> Replace(" ", "▁")
  model        BPE: merge the adjacent pair whose result scores highest
                                                             -> BPE with merges ranked by that score
               unigram: Viterbi over piece scores            -> Unigram(pieces, scores)
               byte_fallback: unknown characters as <0xNN>   -> byte_fallback=True
  specials     control pieces (<s>, </s>) never come from text -> split_special_tokens
  chat markers control pieces (<|user|> ...: pipeline/chat.py) -> added tokens, not special: matched whole in
               the text `apply_chat_template` renders (split_special_tokens would split a special one),
               with the chat template in tokenizer_config.json
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from data_prep.tokenizer import CHAT_MARKERS, END_OF_TURN, ROLE_MARKERS
from pipeline.chat import CHAT_TEMPLATE, ROLES, ChatTokenizer, missing_markers
from pipeline.config import KilnError
from pipeline.hf.sample_text import SAMPLE_TEXTS

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"  # written for a chat tokenizer: generation stops at <|end|> too
SPACE = "\u2581"  # "▁", sentencepiece's whitespace symbol
# sentencepiece ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def parse_model(data: bytes):
    """A sentencepiece model's protobuf (its pieces, trainer and normalizer settings); KilnError if it is none."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError as err:  # protobuf is needed here, at build time only; never to load the result
        raise KilnError(f"building tokenizer.json needs protobuf ({err}); pip install protobuf") from None
    m = pb.ModelProto()
    try:
        m.ParseFromString(data)
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise KilnError(f"not a sentencepiece model ({type(err).__name__})") from None
    if not m.pieces:
        raise KilnError("not a sentencepiece model (no pieces)")
    return m


def _merges(pieces, scores: dict[str, float], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split a + b of a mergeable piece into two pieces of the vocabulary, ranked by the
    merged piece's score (sentencepiece merges the best-scoring pair first), then by id."""
    merges = []
    for p in pieces:
        if p.type != NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in scores and right in scores:
                merges.append((-p.score, vocab[p.piece], vocab[left], vocab[right], left, right))
    merges.sort()
    return [(m[4], m[5]) for m in merges]


def build(model_file: str | Path):
    """A `tokenizers.Tokenizer` that encodes and decodes as the sentencepiece model does."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE, Unigram

    model_file = Path(model_file)
    try:
        m = parse_model(model_file.read_bytes())
    except KilnError as err:
        raise KilnError(f"{model_file}: {err}") from None
    ts, ns = m.trainer_spec, m.normalizer_spec
    if ts.treat_whitespace_as_suffix:
        raise KilnError(f"{model_file}: treat_whitespace_as_suffix models are not supported for tokenizer.json")
    if any(p.type == USER_DEFINED for p in m.pieces):
        raise KilnError(f"{model_file}: user-defined pieces are not supported for tokenizer.json")
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    unk = next((p.piece for p in m.pieces if p.type == UNKNOWN), None)
    if ts.model_type == 2:  # BPE
        scores = {p.piece: p.score for p in m.pieces if p.type in (NORMAL, BYTE, UNKNOWN)}
        model = BPE(vocab, _merges(m.pieces, scores, vocab), unk_token=unk, fuse_unk=True,
                    byte_fallback=ts.byte_fallback)
    elif ts.model_type == 1:  # unigram
        # Viterbi would match a control or unknown piece ("<s>") written in the text, which sentencepiece
        # never does: such pieces get a score far below any real piece, so no path takes them while the
        # text's characters are in the vocabulary (when they are not, the check refuses the result).
        # Not -inf-like: tokenizers derives its unknown-character score from the lowest score.
        floor = min(p.score for p in m.pieces if p.type == NORMAL) - 100.0
        model = Unigram([(p.piece, p.score if p.type in (NORMAL, BYTE) else floor) for p in m.pieces],
                        unk_id=vocab.get(unk), byte_fallback=ts.byte_fallback)
    else:
        raise KilnError(f"{model_file}: sentencepiece model_type {ts.model_type} (word/char) has no tokenizer.json form")
    tok = Tokenizer(model)
    steps = []
    if ns.precompiled_charsmap:
        steps.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(_regex(" {2,}"), " ")]
    if ns.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPACE))
    if ns.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    strip = [decoders.Strip(content=" ", left=1, right=0)] if ns.add_dummy_prefix else []
    unk_text = [decoders.Replace(unk, ts.unk_surface)] if unk else []  # sentencepiece shows <unk> as " ⁇ "
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), *unk_text, decoders.ByteFallback(),
                                     decoders.Fuse(), *strip])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in m.pieces if p.type in (CONTROL, UNKNOWN) and p.piece not in CHAT_MARKERS])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in m.pieces if p.type == CONTROL and p.piece in CHAT_MARKERS])
    tok.encode_special_tokens = True  # "</s>" in a text is text, as in sentencepiece
    return tok


def _regex(pattern: str):
    from tokenizers import Regex

    return Regex(pattern)


def tokenizer_config(model_file: str | Path, model_max_length: int) -> dict:
    """tokenizer_config.json: the special tokens by name, no BOS/EOS added (Kiln trains without a
    BOS and appends EOS per document itself), specials in text stay text; the chat template when the
    model holds every chat marker."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def piece(i: int) -> str | None:
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    chat = {} if missing_markers(sp) else {"chat_template": CHAT_TEMPLATE}
    return {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(model_max_length),
            "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
            "pad_token": piece(sp.pad_id()), "add_bos_token": False, "add_eos_token": False,
            "split_special_tokens": True, "clean_up_tokenization_spaces": False,
            "padding_side": "right", "model_input_names": ["input_ids", "attention_mask"], **chat}


def mismatches(tok, model_file: str | Path, texts: Iterable[str], limit: int = 3) -> tuple[int, list[str]]:
    """(texts compared, up to `limit` descriptions of texts whose ids or decoded text differ)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    texts = list(texts)
    bad = []
    for text, ids, hf in zip(texts, sp.encode(texts), tok.encode_batch_fast(texts, add_special_tokens=False),
                             strict=True):
        if hf.ids != ids:
            at = next((i for i, (a, b) in enumerate(zip(ids, hf.ids, strict=False)) if a != b), min(len(ids), len(hf.ids)))
            bad.append(f"{text[:40]!r}: ids differ at token {at} (sentencepiece {ids[at:at + 3]}, "
                       f"tokenizer.json {hf.ids[at:at + 3]})")
        elif tok.decode(ids, skip_special_tokens=False) != sp.decode(ids):
            bad.append(f"{text[:40]!r}: decodes differently")
        if len(bad) >= limit:
            break
    return len(texts), bad


def chat_mismatches(tok, model_file: str | Path, limit: int = 3) -> list[str]:
    """For a tokenizer with the chat markers: conversations of the built-in sample whose rendered text (what the
    chat template gives: markers and contents, nothing between) tokenizer.json encodes to other ids than
    Kiln's renderer. Empty for a tokenizer without the markers."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if missing_markers(sp):
        return []
    chat, bad = ChatTokenizer(sp), []
    texts = ["", " ", *(t for t in SAMPLE_TEXTS if not any(m in t for m in CHAT_MARKERS))]
    for i in range(0, len(texts) - 2, 3):
        conv = [{"role": role, "content": text} for role, text in zip(ROLES, texts[i:i + 3], strict=True)]
        text = "".join(ROLE_MARKERS[m["role"]] + m["content"] + END_OF_TURN for m in conv)
        if tok.encode(text, add_special_tokens=False).ids != chat.render(conv).ids:
            bad.append(f"the chat conversation of {texts[i + 1][:40]!r} gives other ids than Kiln's renderer")
        if len(bad) >= limit:
            break
    return bad


def check_texts(model_file: str | Path) -> list[str]:
    """What every export checks: each piece of the vocabulary as text, and the built-in sample."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    pieces = [sp.id_to_piece(i).replace(SPACE, " ") for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i))]
    return [*pieces, *SAMPLE_TEXTS]


def write_hf_tokenizer(model_file: str | Path, out: str | Path, model_max_length: int,
                       extra_texts: Iterable[str] = (), strict: bool = True) -> dict | None:
    """Write tokenizer.json + tokenizer_config.json into `out` after checking them against
    sentencepiece; a disagreement writes nothing and raises KilnError (strict: an HF export)
    or warns and returns None (a MODEL dir, which Kiln itself reads through tokenizer.model)."""
    try:
        return _write(Path(model_file), Path(out), model_max_length, extra_texts)
    except KilnError as err:
        if strict:
            raise
        from pipeline.console import log

        log.warning("%s; the MODEL dir gets no tokenizer.json (kiln export --format hf will refuse too)", err)
        return None


def _write(model_file: Path, out: Path, model_max_length: int, extra_texts: Iterable[str]) -> dict:
    tok = build(model_file)
    n, bad = mismatches(tok, model_file, [*check_texts(model_file), *extra_texts])
    bad += chat_mismatches(tok, model_file)
    if bad:
        raise KilnError(f"{model_file}: the tokenizer.json built from it disagrees with sentencepiece on "
                        f"{len(bad)}+ of {n} texts, not written; first: {bad[0]}")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / TOKENIZER_JSON))
    (out / TOKENIZER_CONFIG).write_text(json.dumps(tokenizer_config(model_file, model_max_length), indent=2) + "\n")
    files = [TOKENIZER_JSON, TOKENIZER_CONFIG]
    if gen := generation_config(model_file):
        (out / GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        files.append(GENERATION_CONFIG)
    return {"checked_texts": n, "files": files}


def generation_config(model_file: str | Path) -> dict | None:
    """generation_config.json for a tokenizer with the chat markers: `generate` stops at the end of a turn
    or at the document EOS (pipeline/chat.py's stop ids); None for a tokenizer without them."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    if missing_markers(sp):
        return None
    return {"eos_token_id": ChatTokenizer(sp).stop_ids, "bos_token_id": sp.bos_id() if sp.bos_id() >= 0 else None}
