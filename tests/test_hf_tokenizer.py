"""tokenizer.json + tokenizer_config.json: transformers' AutoTokenizer gives sentencepiece's ids.

The tokenizers are trained here with Kiln's own settings on text that ships with Python and the
multilingual lorem-ipsum word lists Faker ships (CJK included), then compared on documents
generated with other seeds."""

import itertools
import json

import pytest

from data_prep.demo_corpus import _all_docs
from data_prep.tokenizer import train_tokenizer
from pipeline.config import KilnError
from pipeline.hf import tokenizer as hft

LOCALES = ["en_US", "de_DE", "fr_FR", "es_ES", "ru_RU", "el_GR", "ar_AA", "zh_CN", "ja_JP"]


def faker_docs(seed: int, per_locale: int) -> list[str]:
    from faker import Faker

    docs = []
    for loc in LOCALES:
        fake = Faker(loc)
        fake.seed_instance(seed)
        docs += [fake.paragraph(nb_sentences=4) for _ in range(per_locale)]
    return docs


def python_docs(start: int, n: int) -> list[str]:
    return [text for _, text in itertools.islice(_all_docs(), start, start + n)]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def spm_model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tok-{request.param}") / "tokenizer.model"
    train_tokenizer(faker_docs(0, 100) + python_docs(0, 150), path, vocab_size=1500, model_type=request.param)
    return path


def sample_docs() -> list[str]:
    """Documents the tokenizer was not trained on: 9 languages x 25 (CJK included) + 40 of Python's docs +
    texts with specials and odd whitespace."""
    return faker_docs(7, 25) + python_docs(600, 40) + [
        "a </s> inside, <s> at the start, <unk> too", "\t\ttabs\n\nand blank lines  ", " leading space", ""]


def test_autotokenizer_ids_equal_sentencepiece_on_multilingual_docs(spm_model, tmp_path):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    info = hft.write_hf_tokenizer(spm_model, tmp_path, model_max_length=256)
    assert info["checked_texts"] > 1000  # every piece of the vocabulary + the built-in sample
    tok = AutoTokenizer.from_pretrained(str(tmp_path))  # the pinned transformers, no protobuf needed
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    docs = sample_docs()
    assert len(docs) >= 200 and sum(any("\u4e00" <= c <= "\u9fff" for c in d) for d in docs) >= 25
    ours = [tok(d)["input_ids"] for d in docs]
    theirs = sp.encode(docs)
    equal = sum(a == b for a, b in zip(ours, theirs, strict=True))
    print(f"AutoTokenizer == sentencepiece on {equal}/{len(docs)} documents ({spm_model.parent.name})")
    assert equal == len(docs)
    assert [tok.decode(ids) for ids in theirs] == [sp.decode(ids) for ids in theirs]
    assert tok.model_max_length == 256
    assert (tok.bos_token, tok.eos_token, tok.eos_token_id) == ("<s>", "</s>", sp.eos_id())


def test_refuses_a_tokenizer_that_disagrees(spm_model, tmp_path, monkeypatch):
    """A conversion that drops the leading "▁" (the bug of transformers' own converter) is caught."""
    from tokenizers import normalizers

    real = hft.build

    def broken(model_file):
        tok = real(model_file)
        tok.normalizer = normalizers.Replace(" ", hft.SPACE)
        return tok

    monkeypatch.setattr(hft, "build", broken)
    with pytest.raises(KilnError, match="disagrees with sentencepiece"):
        hft.write_hf_tokenizer(spm_model, tmp_path, 256)
    assert not (tmp_path / hft.TOKENIZER_JSON).exists()


def test_every_model_dir_carries_tokenizer_json(spm_model, tmp_path):
    from pipeline.config import ModelConfig
    from pipeline.model.gpt import GPT
    from pipeline.model.io import save_model_dir, verify_sums

    cfg = ModelConfig(style="llama", n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=2000)
    out = save_model_dir(GPT(cfg), cfg, tmp_path / "model", tokenizer=spm_model)
    verify_sums(out)
    assert json.loads((out / hft.TOKENIZER_CONFIG).read_text())["model_max_length"] == 64
    assert (out / hft.TOKENIZER_JSON).stat().st_size > 1000


def test_unreadable_tokenizer_skips_the_json_but_keeps_the_model_dir(tmp_path, caplog):
    from pipeline.config import ModelConfig
    from pipeline.model.gpt import GPT
    from pipeline.model.io import save_model_dir

    bad = tmp_path / "bad.model"
    bad.write_bytes(b"stand-in tokenizer")
    cfg = ModelConfig(style="llama", n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=64)
    out = save_model_dir(GPT(cfg), cfg, tmp_path / "model", tokenizer=bad)
    assert (out / "tokenizer.model").exists() and not (out / hft.TOKENIZER_JSON).exists()
    assert "not a sentencepiece model" in caplog.text
    with pytest.raises(KilnError, match="not a sentencepiece model"):
        hft.write_hf_tokenizer(bad, tmp_path / "hf", 64)
