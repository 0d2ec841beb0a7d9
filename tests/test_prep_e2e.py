"""End-to-end `kiln prep` on a real local Ray: a multilingual corpus with planted duplicates,
filtered documents, every kind of bad record, personal data, a footer repeated across documents
and a document quoting an evaluation set; exact counts, determinism, kill -9 + resume."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from data_prep.indexed import IndexedDataset
from pipeline.config import KilnError, PrepConfig

pytestmark = pytest.mark.slow
LANGS = ["en", "de", "es", "it", "pl", "ru", "zh"]

SENTENCES = {
    "en": [
        "The old harbour town grew quickly after the railway arrived in the late nineteenth century.",
        "Fishermen still mend their nets on the stone quay every morning before the tide turns.",
        "Most visitors come in summer, when the narrow streets fill with music and the smell of grilled fish.",
        "In winter the wind from the north makes it hard to walk along the cliffs without a heavy coat.",
        "Our library has decided to extend its opening hours so that students can study in the evenings.",
        "The new reading room on the second floor offers quiet desks, good lamps and free wireless access.",
        "Volunteers will help older readers who want to learn how to borrow electronic books from home.",
        "The council expects that the changes will cost less than the repairs to the roof last year.",
        "Baking bread at home requires patience, because the dough needs several hours to rise properly.",
        "A simple loaf needs only flour, water, salt and a little yeast that has been kept warm.",
        "Many beginners knead the dough for too short a time and then wonder why the crumb is dense.",
        "If you leave the loaf to cool on a rack, the crust stays crisp and the inside sets evenly.",
    ],
    "de": [
        "Die kleine Stadt am Fluss ist bekannt für ihre alte Brücke und den lebhaften Wochenmarkt.",
        "Jeden Samstag verkaufen Bauern aus der Umgebung frisches Gemüse, Käse und selbst gebackenes Brot.",
        "Im Sommer sitzen die Leute bis spät in der Nacht in den Gärten der Gasthäuser am Ufer.",
        "Wer die Geschichte der Stadt kennenlernen möchte, sollte unbedingt das kleine Heimatmuseum besuchen.",
        "Unsere Schule hat in diesem Jahr einen neuen Garten angelegt, in dem die Kinder Kräuter pflanzen.",
        "Die Schüler lernen dabei, wie viel Arbeit nötig ist, bevor man im Herbst etwas ernten kann.",
        "Einige Eltern haben Werkzeuge gespendet und helfen an den Wochenenden beim Gießen der Beete.",
        "Die Lehrerin hofft, dass der Garten auch im nächsten Frühling wieder viele Freiwillige findet.",
        "Wenn man im Winter durch die Berge wandert, muss man das Wetter sehr genau beobachten.",
        "Schon nach wenigen Stunden kann dichter Nebel aufziehen und den Weg zurück ins Tal verdecken.",
        "Erfahrene Wanderer nehmen deshalb immer eine Karte, warme Kleidung und genug zu trinken mit.",
        "Außerdem sagen sie vor dem Aufbruch jemandem Bescheid, welche Route sie gehen wollen.",
    ],
    "es": [
        "El pequeño pueblo de la costa vive sobre todo de la pesca y del turismo durante el verano.",
        "Cada mañana los pescadores salen al mar antes del amanecer y vuelven cuando el sol ya calienta.",
        "En la plaza mayor hay un mercado donde se venden frutas, verduras y pescado muy fresco.",
        "Por la noche las familias pasean por el paseo marítimo y los niños juegan junto a la playa.",
        "Nuestra biblioteca municipal ha organizado un ciclo de lecturas para jóvenes durante el otoño.",
        "Cada semana un escritor diferente presentará su libro y responderá a las preguntas del público.",
        "Los organizadores esperan que muchos estudiantes participen y descubran el placer de leer.",
        "La entrada es gratuita, pero es necesario reservar una plaza porque la sala es pequeña.",
        "Preparar una buena paella requiere arroz de calidad, un caldo sabroso y mucha paciencia.",
        "Primero se sofríen las verduras en aceite de oliva y después se añade el arroz con cuidado.",
        "Es importante no remover el arroz mientras se cuece, para que se forme una capa dorada.",
        "Al final se deja reposar unos minutos antes de servirla a la mesa con unas rodajas de limón.",
    ],
    "it": [
        "Il piccolo paese sulle colline è famoso per il suo vino rosso e per le antiche cantine.",
        "Ogni autunno arrivano molti visitatori per partecipare alla vendemmia e assaggiare i prodotti locali.",
        "Le strade del centro storico sono strette e portano tutte alla piazza davanti alla chiesa.",
        "La sera gli abitanti si incontrano nei bar per bere un caffè e parlare delle novità del giorno.",
        "La nostra scuola ha organizzato un corso di fotografia per gli studenti degli ultimi anni.",
        "Durante le lezioni i ragazzi imparano a usare la luce naturale e a scegliere l'inquadratura giusta.",
        "Alla fine dell'anno le fotografie migliori saranno esposte nella biblioteca della città.",
        "Gli insegnanti sperano che questa esperienza aiuti i giovani a guardare il mondo con occhi diversi.",
        "Per preparare una buona pasta fatta in casa servono farina, uova e un po' di pazienza.",
        "Bisogna lavorare l'impasto a lungo finché diventa liscio ed elastico sotto le mani.",
        "Poi si lascia riposare la pasta coperta da un panno per almeno mezz'ora prima di stenderla.",
        "Con il mattarello si ottiene una sfoglia sottile che si può tagliare in strisce di varie larghezze.",
    ],
    "pl": [
        "Małe miasteczko nad jeziorem słynie z pięknych lasów i spokojnych ścieżek rowerowych.",
        "Latem przyjeżdża tu wielu turystów, którzy chcą odpocząć od hałasu dużych miast.",
        "Na rynku można kupić świeże ryby, miód od lokalnych pszczelarzy i domowe przetwory.",
        "Wieczorem mieszkańcy spotykają się na brzegu jeziora, aby podziwiać zachód słońca.",
        "Nasza biblioteka miejska przygotowała nowy program zajęć dla dzieci w wieku szkolnym.",
        "Podczas spotkań dzieci czytają książki, rozmawiają o bohaterach i rysują własne ilustracje.",
        "Bibliotekarze mają nadzieję, że dzięki temu więcej młodych ludzi polubi czytanie.",
        "Zajęcia odbywają się w każdą środę po południu i są całkowicie bezpłatne dla uczestników.",
        "Pieczenie chleba w domu wymaga cierpliwości, ponieważ ciasto musi długo rosnąć.",
        "Do prostego bochenka potrzebna jest mąka, woda, sól i odrobina drożdży lub zakwasu.",
        "Wielu początkujących piekarzy wyrabia ciasto zbyt krótko i dziwi się, że chleb jest twardy.",
        "Gotowy bochenek najlepiej wystudzić na kratce, aby skórka pozostała chrupiąca.",
    ],
    "ru": [
        "Небольшой город на берегу реки известен своими старыми деревянными домами и тихими улицами.",
        "Летом сюда приезжает много туристов, которые хотят отдохнуть от шума большого города.",
        "На центральной площади по субботам работает рынок, где продают овощи, мёд и свежий хлеб.",
        "Вечером жители гуляют по набережной и смотрят, как солнце медленно опускается за лес.",
        "Наша городская библиотека открыла новый читальный зал для студентов и школьников.",
        "В зале есть удобные столы, хорошее освещение и бесплатный доступ к интернету.",
        "Библиотекари надеются, что молодые люди будут чаще приходить сюда заниматься после уроков.",
        "Кроме того, по выходным здесь проходят встречи с известными писателями и поэтами.",
        "Чтобы испечь хороший хлеб дома, нужно много терпения, потому что тесто долго поднимается.",
        "Для простой буханки нужны только мука, вода, соль и немного дрожжей или закваски.",
        "Многие начинающие пекари слишком мало месят тесто и потом удивляются плотному мякишу.",
        "Готовый хлеб лучше остудить на решётке, чтобы корочка осталась хрустящей.",
    ],
    "zh": [
        "这个小镇位于河边，以古老的石桥和热闹的周末集市而闻名。",
        "每个星期六，附近的农民都会来这里出售新鲜的蔬菜、水果和自家做的点心。",
        "夏天的晚上，人们喜欢坐在河边的茶馆里聊天，一直到很晚才回家。",
        "如果想了解小镇的历史，一定要去参观那座小小的地方博物馆。",
        "我们的学校今年开辟了一个新的菜园，孩子们在里面种植各种蔬菜和花草。",
        "学生们在劳动中学会了耐心，也明白了收获之前需要付出很多努力。",
        "一些家长捐赠了工具，并且在周末帮助老师一起给菜地浇水。",
        "老师希望明年春天还会有更多的志愿者愿意参加这个活动。",
        "在家里做面包需要耐心，因为面团要经过几个小时才能充分发酵。",
        "做一个简单的面包只需要面粉、水、盐和少量的酵母就可以了。",
        "很多初学者揉面的时间太短，结果烤出来的面包又硬又密。",
        "面包烤好以后最好放在架子上冷却，这样外皮才能保持酥脆。",
    ],
}

LONG = (
    "The lighthouse on the northern point was built in 1871 by a company of engineers from the capital, "
    "who had to carry every stone across the bay on flat boats during the calm weeks of late spring. "
    "For more than a century a keeper and his family lived in the small house beside the tower, "
    "cleaning the great lens each morning and winding the clockwork that turned the light at night.\n\n"
    "Records kept by the last keeper describe storms that lasted for days, ships that ran aground on "
    "the reef in fog, and a winter when the supply boat could not land for almost six weeks. "
    "The family survived on dried fish, potatoes from their garden and the goats that grazed on the "
    "rough grass between the rocks, while the light kept burning without a single missed night.\n\n"
    "Today the light is automatic and the keeper's house has become a museum that opens in summer. "
    "Visitors can climb the spiral stairs to the lantern room, read the old logbooks behind glass, and "
    "look out over the water where the wrecks still lie, marked on the charts as a warning to sailors."
)
NEAR = LONG.replace("six weeks", "seven weeks").replace("dried fish", "salted fish")
FINNISH = (
    "Pieni kaupunki järven rannalla on tunnettu kauniista metsistään ja rauhallisista pyöräteistään. "
    "Kesällä tänne saapuu paljon matkailijoita, jotka haluavat levätä suurten kaupunkien melusta.\n\n"
    "Torilta voi ostaa tuoretta kalaa, hunajaa paikallisilta mehiläistarhaajilta ja kotitekoisia säilykkeitä. "
    "Illalla asukkaat kokoontuvat järven rannalle ihailemaan auringonlaskua."
)


FOOTER = "Copyright 2024 Harbour Media Group, all rights reserved."
CONTACT = (
    "The ferry timetable changes twice a year, in April and in October, when the winter service begins. "
    "Tickets can be bought on board or at the small office next to the pier, which opens an hour before the "
    "first crossing.\n\nQuestions about group bookings go to bookings@harbour-ferries.com or to the office on "
    "+44 20 7946 0958, and lost property is kept for three months at the same desk."
)
EVAL_PASSAGE = "the keeper wound the clockwork every evening so that the great lens turned through the night"
QUOTING = (
    "Our history club visited the old lighthouse last weekend and read the guide to each other on the way up. "
    "One page said that the keeper wound the clockwork every evening so that the great lens turned through the "
    "night, and that the family rarely left the point in winter. Afterwards we had tea in the museum cafe."
)


def evals_dir(corpus: Path) -> Path:
    """Where build_corpus puts the evaluation set (beside the corpus: inside, it would be read as input)."""
    return corpus.with_name(corpus.name + "-evals")


def doc_text(lang: str, k: int) -> str:
    s = SENTENCES[lang][4 * k : 4 * k + 4]
    sep = "" if lang == "zh" else " "
    return sep.join(s[:2]) + "\n\n" + sep.join(s[2:])


def build_corpus(root: Path) -> dict:
    """Write the corpus; return what a correct prep must report."""
    root.mkdir(parents=True, exist_ok=True)
    en = SENTENCES["en"]
    good = [(f"{lang}-{k}", doc_text(lang, k) + (f"\n\n{FOOTER}" if lang == "es" else ""))
            for lang in ("en", "de", "es", "ru", "zh") for k in range(3)]
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) for i, t in good]
    lines.append(json.dumps({"id": "long", "text": LONG}))
    lines.append(json.dumps({"id": "contact", "text": CONTACT}))
    lines.append(json.dumps({"id": "quoting", "text": QUOTING}))
    filtered = {
        "short": "Too short to keep.",
        "repeated": "This line is repeated many times in this document.\n" * 6,
        "lorem": " ".join(en[0:4]) + " Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "curly": " ".join(en[4:8]) + " The settings file uses {braces} around each section name.",
        "dupline": "\n".join(en) + "\n" + en[9],
        "huge": " ".join(s for lang in LANGS for s in SENTENCES[lang]) * 2,
    }
    lines += [json.dumps({"id": i, "text": t}) for i, t in filtered.items()]
    bad = [
        '{"id": "broken", "text": "no closing brace"',
        json.dumps({"id": "nofield", "body": "text is elsewhere"}),
        json.dumps({"id": "null", "text": None}),
        json.dumps({"id": "number", "text": 42}),
        json.dumps({"id": "blank", "text": " \n\t "}),
        '{"id": "surrogate", "text": "broken \\ud800 pair and more words"}',
        json.dumps(["not", "an", "object"]),
    ]
    data = ("\n".join(lines[:5] + bad[:3] + lines[5:] + bad[3:]) + "\n\n").encode()
    data += b'{"id": "latin1", "text": "caf\xe9 au lait"}\n'
    (root / "a_main.jsonl").write_bytes(data)

    dups = [json.dumps({"id": "copy-of-en-0", "text": doc_text("en", 0)}),
            json.dumps({"id": "spaced-de-0", "text": doc_text("de", 0).replace(" ", "  ", 3).replace("\n\n", "  \r\n\r\n")})]
    member2 = gzip.compress(b'{"id": "lost", "text": "never seen"}\n' * 50)
    (root / "b_dups.jsonl.gz").write_bytes(gzip.compress(("\n".join(dups) + "\n").encode()) + member2[:12])

    zc = zstandard.ZstdCompressor()
    more = [json.dumps({"id": "near-long", "text": NEAR}), json.dumps({"id": "finnish", "text": FINNISH}, ensure_ascii=False)]
    frame2 = zc.compress(b'{"id": "lost", "text": "never seen"}\n' * 50)
    (root / "c_more.jsonl.zst").write_bytes(zc.compress(("\n".join(more) + "\n").encode()) + frame2[:8])

    import pyarrow as pa
    import pyarrow.parquet as pq

    it = [doc_text("it", k) for k in range(3)] + [None]
    pq.write_table(pa.table({"text": it}), root / "d_table.parquet", row_group_size=2)

    from datasets import Dataset

    Dataset.from_dict({"id": [f"pl-{k}" for k in range(3)], "text": [doc_text("pl", k) for k in range(3)]}).save_to_disk(
        str(root / "e_hf"))
    evals = evals_dir(root)
    evals.mkdir(exist_ok=True)
    (evals / "bench.jsonl").write_text(json.dumps({"question": f"Why did {EVAL_PASSAGE}?", "choices": ["a", "b"]}) + "\n")
    return {
        "records_in": len(lines) + len(bad) + 1 + len(dups) + 1 + len(more) + 1 + len(it) + 3,
        "quarantined": {"malformed_json": 1, "missing_text_field": 1, "null_text": 2, "non_string_text": 1,
                        "empty_text": 1, "lone_surrogate": 1, "not_an_object": 1, "undecodable": 1, "truncated_stream": 2},
        "removed": {"exact_dup": 2, "near_dup": 1, "lang": 1, "too_long": 1, "gopher_quality:word_count": 1,
                    "gopher_repetition:dup_line_fraction": 1, "c4:lorem_ipsum": 1, "c4:curly_bracket": 1,
                    "fineweb:char_dup_ratio": 1, f"decontaminate:{evals.name}/bench.jsonl": 1},
        "edits": {"pii:email": 1, "pii:phone": 1, "boilerplate:lines": 3, "boilerplate:documents": 3,
                  "boilerplate:bytes": 3 * len(FOOTER.encode())},
        "languages": {"en": 5, "de": 3, "es": 3, "it": 3, "pl": 3, "ru": 3, "zh": 3},
        "kept": 23,
    }


def config(corpus: Path | None = None, **kw) -> PrepConfig:
    """The test config; with `corpus`, decontaminated against its evaluation set."""
    base = dict(langs=LANGS, vocab_size=600, val_fraction=0.2, shard_docs=8, workers=1,
                filter_params={"gopher_quality": {"min_words": 30}}, max_doc_chars=4000, long_doc_policy="drop",
                boilerplate={"max_docs": 2}, decontaminate={"paths": [str(evals_dir(corpus))] if corpus else []})
    base.update(kw)
    return PrepConfig(**base)


def cli_args(corpus: Path, out: Path, workers: int = 1) -> list[str]:
    """The `kiln prep` arguments that mean `config(corpus, workers=workers)`."""
    return ["prep", str(corpus), "--out", str(out), "--workers", str(workers), "--langs", ",".join(LANGS),
            "--vocab-size", "600", "--val-fraction", "0.2", "--set", "shard_docs=8",
            "--set", "filter_params.gopher_quality.min_words=30", "--set", "max_doc_chars=4000",
            "--set", "long_doc_policy=drop", "--set", "boilerplate.max_docs=2", "--decontaminate", str(evals_dir(corpus))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_local, corpus, tmp_path_factory):
    from data_prep.runner import prep

    out = tmp_path_factory.mktemp("ref")
    summary = prep([str(corpus[0])], out, config(corpus[0], workers=1))
    return out, summary


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """The oracle: Jaccard of the sets of word 5-grams, as plain Python tuples."""
    sa, sb = ({tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)} for ws in (a.lower().split(), b.lower().split()))
    return len(sa & sb) / len(sa | sb)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.fault
def test_counts_reports_and_shards(reference, corpus):
    out, summary = reference
    _, want = corpus
    manifest = json.loads((out / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["records_in"] == want["records_in"]
    assert c["quarantined"] == want["quarantined"]
    assert c["removed"] == want["removed"]
    assert c["languages"] == want["languages"]
    assert c["edits"] == want["edits"]
    assert c["boilerplate_keys"] == 1  # the footer; nothing else is in more than 2 documents
    assert c["documents_kept"] == want["kept"]
    assert c["documents_in"] == c["documents_kept"] + sum(c["removed"].values())
    assert c["records_in"] == c["documents_read"] + sum(c["quarantined"].values())
    assert summary["digest"] == manifest["digest"]

    removed = {r["id"]: r for r in read_jsonl(out / "report" / "removed.jsonl")}
    assert removed["copy-of-en-0"] == {"id": "copy-of-en-0", "reason": "exact_dup", "detail": "en-0"}
    assert removed["spaced-de-0"]["detail"] == "de-0"
    assert {k: removed["near-long"][k] for k in ("reason", "detail")} == {"reason": "near_dup", "detail": "long"}
    assert removed["near-long"]["jaccard"] == round(shingle_jaccard(NEAR, LONG), 4) >= 0.8
    assert removed["quoting"]["reason"] == f"decontaminate:{evals_dir(corpus[0]).name}/bench.jsonl"
    assert repr(" ".join(EVAL_PASSAGE.split()[:13])) in removed["quoting"]["detail"]  # the first shared 13-gram
    [source] = manifest["decontamination"]["sources"]
    assert source["documents_removed"] == 1 and source["texts"] == 3 and source["too_short"] == 2
    assert removed["finnish"]["reason"] == "lang" and removed["huge"]["reason"] == "too_long"
    assert len(removed) == sum(want["removed"].values())
    quarantine = read_jsonl(out / "report" / "quarantine.jsonl")
    assert len(quarantine) == sum(want["quarantined"].values())
    by_reason = {q["reason"]: q for q in quarantine}
    assert by_reason["malformed_json"]["source"] == "a_main.jsonl:6"
    assert by_reason["malformed_json"]["raw"].startswith('{"id": "broken"')
    assert by_reason["undecodable"]["raw"].startswith('{"id": "latin1"')
    assert {q["source"].split(":")[0] for q in quarantine if q["reason"] == "truncated_stream"} == {"b_dups.jsonl.gz", "c_more.jsonl.zst"}
    assert any(q["source"] == "d_table.parquet:4" for q in quarantine)

    # inputs: relative paths, digests, per-file record counts
    inputs = {Path(i["path"]).name: i for i in manifest["inputs"]}
    assert not any(Path(i["path"]).is_absolute() for i in manifest["inputs"])
    assert inputs["d_table.parquet"]["records"] == 4 and inputs["b_dups.jsonl.gz"]["records"] == 3
    assert (out / manifest["inputs"][0]["path"]).resolve() == (corpus[0] / "a_main.jsonl").resolve()

    # shards: Megatron files, uint16, EOS after every document, totals match the manifest
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / manifest["tokenizer"]["path"]))
    assert manifest["tokenizer"]["vocab_size"] == sp.get_piece_size() == 600
    texts, total = [], {"train": 0, "val": 0}
    for sh in manifest["shards"]:
        ds = IndexedDataset(out / sh["path"])
        assert ds.dtype == np.uint16 and len(ds) == sh["documents"] and ds.num_tokens == sh["tokens"]
        total[sh["split"]] += sh["tokens"]
        for i in range(len(ds)):
            assert ds[i][-1] == sp.eos_id()
            texts.append(sp.decode(ds[i][:-1].tolist()))
    assert total == manifest["tokens"] and total["val"] > 0
    assert doc_text("zh", 1) in texts and doc_text("ru", 2) in texts and LONG in texts
    assert doc_text("de", 0) in texts
    assert doc_text("es", 1) in texts and not any(FOOTER in t for t in texts)  # boilerplate stripped
    [contact] = [t for t in texts if "ferry timetable" in t]
    assert "<EMAIL>" in contact and "<PHONE>" in contact and "@" not in contact and "7946" not in contact
    assert not list(out.glob("shards/*.tmp"))


def test_same_digest_with_4_workers_and_on_rerun(reference, corpus, tmp_path):
    from data_prep.runner import prep

    out, summary = reference
    four = prep([str(corpus[0])], tmp_path / "w4", config(corpus[0], workers=4))
    assert four["digest"] == summary["digest"]
    assert four["counts"] == summary["counts"]
    assert (tmp_path / "w4" / "report" / "removed.jsonl").read_bytes() == (out / "report" / "removed.jsonl").read_bytes()
    again = prep([str(corpus[0])], out, config(corpus[0], workers=2))
    assert again["digest"] == summary["digest"]


def test_given_tokenizer_and_errors(reference, corpus, tmp_path):
    from data_prep.runner import prep

    out, summary = reference
    reuse = prep([str(corpus[0])], tmp_path / "tok", config(corpus[0], tokenizer=str(out / "tokenizer.model")))
    assert reuse["digest"] == summary["digest"]
    nodedup = prep([str(corpus[0])], tmp_path / "nodedup", config(corpus[0], tokenizer=str(out / "tokenizer.model"), dedup=False))
    assert nodedup["counts"]["documents_kept"] == corpus[1]["kept"] + 3
    assert not {"exact_dup", "near_dup"} & set(nodedup["counts"]["removed"])
    with pytest.raises(KilnError, match="try --vocab-size"):
        prep([str(corpus[0])], tmp_path / "big", config(vocab_size=50000))
    with pytest.raises(KilnError, match="text field 'body2'"):
        prep([str(corpus[0] / "a_main.jsonl")], tmp_path / "field", config(text_field="body2"))


@pytest.mark.fault
def test_kill_9_then_rerun_gives_the_same_digest(reference, corpus, tmp_path, root):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pipeline.cli", *cli_args(corpus[0], out), "--json"]
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "work" / "clean" / "00001" / "stats.json").exists():
        assert proc.poll() is None, "prep exited before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "too late: the run had finished"
    done = {p.name: p.stat().st_mtime_ns for p in (out / "work" / "clean").iterdir() if (p / "stats.json").exists()}
    assert done
    for idx in out.glob("shards/*.idx"):  # anything under a final name is a complete shard
        IndexedDataset(idx.with_suffix(""))

    res = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["counts"] == reference[1]["counts"]
    for name, mtime in done.items():  # finished partitions were reused, not redone
        assert (out / "work" / "clean" / name).stat().st_mtime_ns == mtime
    assert summary["digest"] == reference[1]["digest"]
