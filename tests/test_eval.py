"""pipeline/evaluate.py (`kiln eval` and the post-training figures): both window layouts score every token once
and match an independent computation; bits/byte count the bytes of the decoded text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from factories import fake_corpus
from test_tracking_support import one_thread, text_corpus, train_tiny, train_tokenizer  # noqa: F401

from pipeline.cli import main
from pipeline.data.corpus import PreparedCorpus
from pipeline.evaluate import count_bytes, evaluate, evaluate_windows, sliding_windows
from pipeline.model.io import load_model_dir


@pytest.mark.parametrize("n,block,stride", [(2, 8, 4), (9, 8, 4), (50, 8, 4), (50, 8, 8), (50, 8, 3), (7, 16, 8)])
def test_sliding_windows_score_each_target_once_with_context(n, block, stride):
    scored = []
    for k, (begin, end, first) in enumerate(sliding_windows(n, block, stride)):
        assert end - begin <= block and end <= n - 1
        # after the first window, new targets keep block - stride tokens of context
        assert first == (0 if k == 0 else block - stride)
        scored += list(range(begin + 1, end + 1))[first:]
    assert scored == list(range(1, n))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    corpus = fake_corpus(tmp / "corpus", vocab_size=64, val_docs=30)
    model_dir, _ = train_tiny(corpus, tmp / "model", steps=30, block_size=32)
    return corpus, model_dir


def _independent_nll(model, tokens: torch.Tensor) -> tuple[float, int]:
    logits, _ = model(tokens[None, :-1])
    return float(F.cross_entropy(logits[0], tokens[1:], reduction="sum")), len(tokens) - 1


def test_perplexity_is_exp_mean_ce_when_one_window_holds_everything(trained):
    corpus, model_dir = trained
    model, _ = load_model_dir(model_dir)
    n = 30  # 29 targets fit in one 32-token window
    tokens = torch.from_numpy(PreparedCorpus(corpus).stream("val").read(0, n))
    with torch.no_grad():
        nll, count = _independent_nll(model, tokens)
    res = evaluate(model, corpus, "val", max_tokens=n - 1, show=False)
    assert res["tokens"] == count == n - 1
    assert res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert res["bits_per_byte"] is None  # the fake corpus has no tokenizer


def test_sliding_window_matches_a_token_by_token_reference(trained):
    """Each target t scored with context tokens[begin(t):t], begin(t) = the window that first reaches t."""
    corpus, model_dir = trained
    model, _ = load_model_dir(model_dir)
    n, block, stride = 100, 32, 16
    tokens = torch.from_numpy(PreparedCorpus(corpus).stream("val").read(0, n))
    nll = 0.0
    with torch.no_grad():
        for t in range(1, n):
            begin = 0 if t <= block else ((t - block - 1) // stride + 1) * stride
            logits, _ = model(tokens[None, begin:t])
            nll += float(F.cross_entropy(logits[0, -1:], tokens[t:t + 1]))
    res = evaluate(model, corpus, "val", max_tokens=n - 1, block_size=block, show=False)
    assert res["tokens"] == n - 1 and res["stride"] == stride
    assert res["loss"] == pytest.approx(nll / (n - 1), rel=1e-5)
    # a trained model beats the uniform distribution over the vocabulary by a wide margin
    assert res["perplexity"] < 0.5 * 64


def test_non_overlapping_windows_match_plain_cross_entropy(trained):
    """`evaluate_windows` (post-training figures): window k = tokens[kB:(k+1)B], every target scored."""
    corpus, model_dir = trained
    model, _ = load_model_dir(model_dir)
    stream = PreparedCorpus(corpus).stream("val")
    data = torch.from_numpy(stream.read(0, 3 * 32 + 1))
    with torch.no_grad():
        logits, _ = model(data[:-1].view(3, 32))
    res = evaluate_windows(model, corpus, 3)
    assert res["tokens"] == 3 * 32 and res["stride"] == 32
    assert res["loss"] == pytest.approx(float(F.cross_entropy(logits.flatten(0, 1), data[1:])), rel=1e-5)
    whole = evaluate_windows(model, corpus, None)  # the whole split, the partial last window too
    assert whole["tokens"] == len(stream) - 1 and len(stream) % 32 != 1


def test_count_bytes_is_the_utf8_size_of_the_documents(tmp_path):
    import sentencepiece as spm

    text = ["Grüße aus Köln und der Welt", "the quick brown fox jumps over the lazy dog"] * 50
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "sp"), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    docs = ["Grüße aus Köln", "lazy dog ✓", "fox"]  # ✓ is unseen: byte-fallback pieces, 3 bytes in all
    ids = [t for d in docs for t in sp.encode(d) + [sp.eos_id()]]
    assert count_bytes(np.array(ids), tmp_path / "sp.model") == sum(len(d.encode("utf-8")) for d in docs)
    # ids outside the tokenizer (a wider model vocab) stand for no text
    assert count_bytes(np.array(ids + [sp.get_piece_size() + 3]), tmp_path / "sp.model") == 32


def test_bits_per_byte_from_decoded_text(tmp_path):
    tok = train_tokenizer(tmp_path / "tok")
    corpus = text_corpus(tmp_path / "corpus", tok, n_docs=40, val_docs=3)
    model_dir, _ = train_tiny(corpus, tmp_path / "model", steps=5)
    model, _ = load_model_dir(model_dir)
    res = evaluate(model, corpus, "val", max_tokens=200, show=False)
    stream = PreparedCorpus(corpus).stream("val")
    n_bytes = count_bytes(stream.read(1, 200), corpus / "tokenizer.model")
    assert res["bytes"] == n_bytes > 200  # BPE pieces average more than one byte
    assert res["bits_per_byte"] == pytest.approx(res["loss"] * 200 / math.log(2) / n_bytes)


def test_training_val_bytes_are_the_bytes_kiln_eval_scores(tmp_path):
    """Training's val_bpb divides by TrainData.val_bytes: the bytes of the validation windows' targets, per corpus
    (each corpus' first windows), the same bytes `kiln eval` counts over those tokens."""
    from pipeline.config import DataConfig, ModelConfig
    from pipeline.data.sampler import TrainData
    from pipeline.model.gpt import GPT

    tok = train_tokenizer(tmp_path / "tok")
    a = text_corpus(tmp_path / "a", tok, n_docs=30, val_docs=3)
    b = fake_corpus(tmp_path / "b", vocab_size=400, tokenizer=tok)  # other text, the same tokenizer
    block = 16
    data = TrainData(DataConfig(paths=[str(a), str(b)], val_tokens=2 * 2 * block), block, seed=0)
    assert len(data.val) == 4  # 2 windows from each corpus, a's first
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=block, vocab_size=400))

    def scored_bytes(corpus, windows: int) -> int:
        return evaluate(model, corpus, "val", max_tokens=windows * block, block_size=block, stride=block,
                        show=False)["bytes"]

    assert data.val_bytes(1) == scored_bytes(a, 1) and data.val_bytes(2) == scored_bytes(a, 2)
    assert data.val_bytes(4) == scored_bytes(a, 2) + scored_bytes(b, 2) != 2 * scored_bytes(a, 2)
    # the inputs of those windows would be another count (the test can tell targets from inputs)
    assert count_bytes(PreparedCorpus(a).stream("val").read(0, 2 * block), tok) != scored_bytes(a, 2)
    fake_corpus(tmp_path / "no-tok", vocab_size=64)
    assert TrainData(DataConfig(paths=[str(tmp_path / "no-tok")]), block, seed=0).val_bytes(2) is None


def test_kiln_eval_cli_json_without_tracking(trained, tmp_path, monkeypatch, capsys):
    corpus, model_dir = trained
    monkeypatch.chdir(tmp_path)
    rc = main(["eval", str(model_dir), "--data", str(corpus), "--max-tokens", "64", "--json",
               "--set", "tracking.enabled=false"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["tokens"] == 64 and out["perplexity"] > 1 and out["tokens_per_s"] > 0
    assert "tracking" not in out
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_kiln_eval_rejects_keys_its_schema_lacks(trained, capsys):
    corpus, model_dir = trained
    assert main(["eval", str(model_dir), "--data", str(corpus), "--set", "train.lr=1"]) == 2
    assert "--set train.lr=1: train: unknown key" in capsys.readouterr().err
    assert main(["eval", str(model_dir), "--data", str(corpus), "--set", "max_tokns=8"]) == 2
    assert capsys.readouterr().err.strip() == \
        "kiln eval: error: --set max_tokns=8: max_tokns: unknown key (did you mean 'max_tokens'?)"


def test_kiln_eval_of_a_raw_file_instead_of_a_prep_output_is_one_line(trained, tmp_path, capsys):
    _, model_dir = trained
    raw = tmp_path / "manpages.jsonl"
    raw.write_text('{"text": "a document"}\n')
    assert main(["eval", str(model_dir), "--data", str(raw), "--set", "tracking.enabled=false"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"kiln eval: error: {raw}: a file, not a `kiln prep` output directory; prepare it first " \
                  f"(kiln prep {raw} --out DIR) and pass DIR", err
