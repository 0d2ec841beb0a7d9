"""Each prep step on its own, no Ray: plain Python over documents."""

from __future__ import annotations

import random

import numpy as np
import pytest
from factories import dedup_texts, manpage_texts

from data_prep.config import PrepConfig
from data_prep.document import Document
from data_prep.steps import (
    C4,
    EvalIndex,
    FineWeb,
    GopherQuality,
    GopherRepetition,
    LangId,
    LengthPolicy,
    Normalize,
    build_steps,
)
from data_prep.steps.exact_dedup import group_min
from data_prep.steps.gopher_repetition import dup_ngram_fraction
from data_prep.steps.minhash_dedup import MinHasher
from data_prep.steps.text import logical_lines, ngram_hashes, token_hashes, words

PROSE = (
    "The committee met on Tuesday to review the budget for the coming year and to hear reports from each of "
    "the working groups. After a long discussion the members agreed that the library should receive more "
    "money for new books, while the sports hall will have to wait until the roof has been repaired. The "
    "chair thanked the volunteers who had prepared the figures and asked that the final plan be published "
    "before the end of the month so that residents can comment on it."
)


def run(step, *texts, **meta):
    return list(step(Document(f"d{i}", t, meta=dict(meta)) for i, t in enumerate(texts)))


def reason(step, text, **meta):
    return run(step, text, **meta)[0].removed


def test_normalize():
    [doc] = run(Normalize(), "Cafe\u0301\u00a0 ok\x07\r\nline  two   \n\n\n\n    indented  code\u200b\n")
    assert doc.text == "Café ok\nline two\n\n    indented code"
    assert run(Normalize(), "\x00\x01 \x02")[0].removed == "normalize:empty"


def test_length_policy_split_and_drop():
    text = "\n\n".join(f"Paragraph {i} " + "word " * 30 for i in range(10))
    parts = run(LengthPolicy(max_chars=500, policy="split"), text)
    assert len(parts) > 1 and all(len(p.text) <= 500 for p in parts)
    assert [p.id for p in parts[:2]] == ["d0#0", "d0#1"] and all(p.text.startswith("Paragraph") for p in parts)
    assert " ".join(p.text for p in parts).split() == text.split()
    assert reason(LengthPolicy(max_chars=500, policy="drop"), text) == "too_long"
    assert reason(LengthPolicy(max_chars=5000), text) is None


def test_langid_records_language_and_filters():
    samples = {
        "en": "The children walked to school together through the quiet streets of the old town.",
        "de": "Die Kinder gingen gemeinsam durch die ruhigen Straßen der Altstadt zur Schule.",
        "es": "Los niños caminaron juntos a la escuela por las calles tranquilas del casco antiguo.",
        "it": "I bambini andarono insieme a scuola per le strade tranquille del centro storico.",
        "pl": "Dzieci szły razem do szkoły przez spokojne ulice starego miasta.",
        "ru": "Дети вместе шли в школу по тихим улицам старого города.",
        "zh": "孩子们一起穿过老城安静的街道去上学。",
    }
    step = LangId(list(samples))
    docs = run(step, *samples.values())
    assert [d.meta["lang"] for d in docs] == list(samples) and all(d.removed is None for d in docs)
    only = LangId(["en", "de"])
    out = run(only, samples["en"], samples["ru"], samples["zh"])
    assert [d.removed for d in out] == [None, "lang", "lang"] and "most likely ru" in out[1].detail
    with pytest.raises(ValueError, match="unknown language"):
        LangId(["xx"])


def test_gopher_quality_rules():
    g = GopherQuality()
    assert reason(g, PROSE) is None
    assert reason(g, "Far too short.") == "gopher_quality:word_count"
    assert reason(g, " ".join(["extraordinarily"] * 10 + ["incomprehensibilities"] * 50)) == "gopher_quality:mean_word_length"
    assert reason(g, PROSE + " #tag" * 12) == "gopher_quality:symbol_ratio"
    assert reason(g, "\n".join("- " + s for s in PROSE.split(". "))) == "gopher_quality:bullet_lines"
    assert reason(g, "\n".join(s + "..." for s in PROSE.split(". "))) == "gopher_quality:ellipsis_lines"
    assert reason(g, PROSE + " 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24") == "gopher_quality:alpha_words"
    no_stop = " ".join(w for w in PROSE.split() if w.lower().strip(".,") not in {"the", "be", "to", "of", "and", "that", "have", "with"})
    assert reason(g, no_stop) == "gopher_quality:stop_words"
    assert reason(g, no_stop, lang="de") is None  # English stop words only judge English
    assert reason(GopherQuality(disabled=["stop_words"]), no_stop) is None
    assert reason(GopherQuality(min_words=1), "孩子们一起穿过老城安静的街道去上学。", lang="zh") is None


def test_gopher_repetition_rules():
    g = GopherRepetition()
    assert reason(g, PROSE) is None
    assert reason(g, "\n\n".join([PROSE, "One.", "Two.", "Three.", PROSE])) == "gopher_repetition:dup_para_chars"
    lines = "\n".join(["Buy now and save money today."] * 4 + ["Other words entirely on this line."] * 2)
    assert reason(g, lines) == "gopher_repetition:dup_line_fraction"
    assert reason(g, PROSE + " click here " * 40).startswith("gopher_repetition:")
    assert reason(g, PROSE + " " + PROSE[:200]) == "gopher_repetition:dup_ngram"
    assert reason(GopherRepetition(disabled=["dup_ngram", "top_ngram"]), PROSE + " " + PROSE[:200]) is None


def _naive_dup_fraction(ws: list[str], n: int) -> float:
    seen, covered = set(), set()
    for i in range(len(ws) - n + 1):
        gram = tuple(ws[i : i + n])
        if gram in seen:
            covered.update(range(i, i + n))
        seen.add(gram)
    return sum(len(ws[i]) for i in covered) / sum(map(len, ws))


def test_vectorized_ngram_fraction_matches_naive():
    rng = random.Random(0)
    for _ in range(20):
        ws = [rng.choice(["a", "bb", "ccc", "dddd", "ee"]) for _ in range(rng.randint(1, 80))]
        h = token_hashes(ws)
        lengths = np.array([len(w) for w in ws])
        for n in (2, 5, 7):
            assert dup_ngram_fraction(h, lengths, n, int(lengths.sum())) == pytest.approx(_naive_dup_fraction(ws, n))
    assert len(ngram_hashes(token_hashes(["a", "b"]), 5)) == 0


def test_c4_rules():
    c = C4()
    text = PROSE + "\nPlease enable JavaScript to view this page.\nThis site uses cookies to improve things.\nMenu Home About\nSee [1] also[edit]."
    [doc] = run(c, text)
    assert doc.removed is None and doc.text == PROSE  # line rules edit the text
    assert reason(c, PROSE + " Lorem ipsum dolor sit amet.") == "c4:lorem_ipsum"
    assert reason(c, PROSE + " Use {x} here.") == "c4:curly_bracket"
    assert reason(c, "One sentence with enough words only.") == "c4:min_sentences"
    assert reason(C4(bad_words=["budget"]), PROSE) == "c4:bad_words"
    assert reason(C4(disabled=["curly_bracket"]), PROSE + " Use {x} here.") is None
    with pytest.raises(ValueError, match="unknown rule"):
        C4(disabled=["no_such_rule"])
    # terminal_punct is off unless enabled; then a line without an end mark goes, and is counted
    menu = PROSE + "\nRead more about the committee and its working groups here"
    assert run(c, menu)[0].text == menu
    strict = C4().enable(["c4:terminal_punct"])
    assert run(strict, menu)[0].text == PROSE
    assert (strict.cut_lines, strict.cut_chars) == ({"c4:terminal_punct": 1}, {"c4:terminal_punct": 58})
    # a page that is mostly code goes; prose quoting a brace stays (max_curly_share 0: C4's "any {")
    code = PROSE + "\n" + "\n".join(f"if (x{i}) {{ y{i}(); }}" for i in range(30))
    assert reason(c, code) == "c4:curly_bracket"
    quoting = "\n".join([PROSE] * 3 + ["Braces such as {a,b} are expanded by the shell before the command runs."])
    assert reason(c, quoting) is None and reason(C4(max_curly_share=0), quoting) == "c4:curly_bracket"


def test_hard_wrapped_paragraphs_are_judged_as_one_line():
    [page] = manpage_texts(1)
    groups = logical_lines(page.split("\n"))
    assert max(len(g) for g in groups) >= 4  # paragraphs were rejoined
    assert all(g[-1].rstrip().endswith(".") for g in groups if len(g) > 1)  # ...up to the end of their sentence
    assert ["       -l"] in groups or ["       -a, --all"] in groups or ["       -h, --help"] in groups
    # web text, a paragraph a line, is left as it is; so are short lines of similar length
    web = [PROSE, "Please enable JavaScript to view this page", "This site uses cookies to improve things", PROSE]
    assert logical_lines(web) == [[ln] for ln in web]
    strict = C4().enable(["terminal_punct"])
    [doc] = run(strict, page)
    assert doc.removed is None and len(doc.text) > 0.85 * len(page), strict.cut_chars


def test_fineweb_rules():
    f = FineWeb()
    assert reason(f, PROSE) is None
    assert reason(f, "\n".join(["a heading without punctuation at all"] * 1 + [f"item number {i} in a list" for i in range(9)])) == "fineweb:line_punct_ratio"
    assert reason(f, "\n".join(["Short line."] * 3 + [PROSE])) == "fineweb:short_line_ratio"
    assert reason(f, PROSE + "\nA repeated closing line is here.\nA repeated closing line is here.") == "fineweb:char_dup_ratio"
    assert reason(FineWeb(short_line_ratio=1.0), "\n".join(f"Item {i}." for i in range(30))) == "fineweb:list_ratio"
    assert reason(f, manpage_texts(1, seed=3)[0]) is None  # wrapped lines end mid-sentence: judged rejoined


def test_exact_dedup_keeps_first_and_names_it(tmp_path):
    assert dedup_texts(tmp_path, ["same text", "other", "same text"]) == [None, None, ("exact_dup", 0, None)]
    dup, kept = group_min(np.array([9, 3, 9, 9, 3], np.uint64), np.array([50, 7, 40, 60, 2], np.int64))
    assert sorted(zip(dup.tolist(), kept.tolist(), strict=True)) == [(7, 2), (50, 40), (60, 40)]


def test_minhash_catches_few_word_edits_only(tmp_path):
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(5000)]
    base = [rng.choice(vocab) for _ in range(250)]
    edited = list(base)
    for i in (40, 120, 200):
        edited[i] = "changed"
    other = [rng.choice(vocab) for _ in range(250)]
    out = dedup_texts(tmp_path, [" ".join(base), " ".join(other), " ".join(edited)])
    assert out[:2] == [None, None] and out[2][:2] == ("near_dup", 0)
    a, b = MinHasher(seed=1), MinHasher(seed=1)
    assert np.array_equal(a.signature(a.shingles(" ".join(base))), b.signature(b.shingles(" ".join(base))))
    assert a.signature(a.shingles("")).shape == (20 * 4,)


def test_words_split_cjk_into_characters():
    assert words("Hello, world! 你好世界") == ["Hello,", "world!", "你", "好", "世", "界"]


def test_build_steps_runs_the_listed_filters_in_registry_order():
    names = [s.name for s in build_steps(PrepConfig())]
    assert names == ["normalize", "length", "lang", "gopher_repetition", "gopher_quality", "c4", "fineweb", "pii"]
    assert [s.name for s in build_steps(PrepConfig(filters=["fineweb", "c4"]))] == ["normalize", "length", "c4", "fineweb"]
    index = EvalIndex.build([])[0]
    assert [s.name for s in build_steps(PrepConfig(), index)][-3:] == ["fineweb", "decontaminate", "pii"]
    with pytest.raises(ValueError, match="langs: unknown language code"):
        build_steps(PrepConfig(langs=["xx"]))
    with pytest.raises(ValueError, match="filter_params.gopher_repetition: "):
        build_steps(PrepConfig(filter_params={"gopher_repetition": {"top_ngram": [1, 2]}}))
