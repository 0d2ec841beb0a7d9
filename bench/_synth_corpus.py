"""A synthetic web-like corpus for the prep benchmarks, generated offline and deterministically.

English words and their frequencies come from the Python Language Reference that ships with
Python (`pydoc_data.topics`, ~3,100 distinct words, Zipf-like); German, Spanish, Italian, Polish,
Russian and Chinese from the common-word lists below (Zipf weights). A document is paragraphs of
sentences, one paragraph per line as in extracted web text, with a log-normal length.

`write_corpus` plants what a real crawl holds: exact and near copies (Jaccard 0.6-0.98), sites
whose pages share a navigation line and a footer, personal data, quotes of an evaluation set, and
malformed records. `edit` makes a near copy at a chosen word-5-gram Jaccard.

    python bench/_synth_corpus.py --docs 1000000 --out /tmp/synth   # jsonl files + evals/ + truth.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np

WORDS = {
    "de": "regierung entwicklung unternehmen gesellschaft geschichte wirtschaft bevölkerung verwaltung möglichkeit veranstaltung bürgermeister landschaft wissenschaft erfahrung bedeutung zusammenarbeit schülerinnen ausstellung verbindung nachbarschaft entscheidung vorschlag gemeinde sicherheit forschung kirche zeitung bahnhof sommer winter freunde familie arbeiten gestern morgen wichtig schwierig verschiedene zahlreiche ehemaligen bekannten deutschen europäischen öffentlichen politischen besonders allerdings der die und in den von zu das mit sich des auf für ist im dem nicht ein eine als auch es an werden aus er hat "
          "dass sie nach wird bei einer um am sind noch wie einem über einen so zum war haben nur oder aber vor zur bis "
          "mehr durch man sein wurde sei prozent hatte kann gegen vom können schon wenn habe seine mark ihre dann unter "
          "wir soll ich eines jahr zwei jahren diese dieser wieder keine seiner worden will zwischen immer millionen was "
          "sagte gibt alle seit muss doch jetzt drei neue damit bereits da ab ihr ihren stadt",
    "es": "gobierno desarrollo empresa sociedad historia economía población administración posibilidad acontecimiento alcalde paisaje ciencia experiencia importancia colaboración estudiantes exposición conexión vecindario decisión propuesta municipio seguridad investigación iglesia periódico estación verano invierno amigos familia trabajar ayer mañana importante difícil diferentes numerosos antiguos conocidos españoles europeos públicos políticos especialmente de la que el en y a los se del las un por con no una su para es al lo como más o pero sus le ha me si sin "
          "sobre este ya entre cuando todo esta ser son dos también fue había era muy años hasta desde está mi porque "
          "qué sólo han yo hay vez puede todos así nos ni parte tiene él uno donde bien tiempo mismo ese ahora cada e "
          "vida otro después te otros aunque esa eso hace otra gobierno tan durante siempre día tanto ella tres sí dijo "
          "sido gran país según menos mundo año antes estado",
    "it": "governo sviluppo azienda società storia economia popolazione amministrazione possibilità avvenimento sindaco paesaggio scienza esperienza importanza collaborazione studenti esposizione collegamento quartiere decisione proposta comune sicurezza ricerca chiesa giornale stazione estate inverno amici famiglia lavorare ieri domani importante difficile diversi numerosi antichi conosciuti italiani europei pubblici politici soprattutto di e il la che in a per un è non del con i una le si da al sono della come ma lo anche ha più dei nel se gli "
          "alla o questo ci ne delle mi nella su cui ed era essere suo tutto sua quando dal tra stato hanno fatto ancora "
          "dopo solo fra anni due molto prima così mio sia tutti ogni casa parte lavoro città tempo vita giorno paese "
          "grande nuovo poi già proprio senza sempre quello questa loro fare",
    "pl": "rząd rozwój przedsiębiorstwo społeczeństwo historia gospodarka ludność administracja możliwość wydarzenie burmistrz krajobraz nauka doświadczenie znaczenie współpraca uczniowie wystawa połączenie sąsiedztwo decyzja propozycja gmina bezpieczeństwo badania kościół gazeta dworzec lato zima przyjaciele rodzina pracować wczoraj jutro ważny trudny różne liczne dawnych znanych polskich europejskich publicznych politycznych szczególnie w i na z do się nie że to jest o jak ale po co tak za od jego przez a czy jej już są dla tylko może jeszcze "
          "być ich ten był roku także przy pod gdy bardzo mnie będzie nawet która które który jednak oraz można było "
          "tym też nas żeby kiedy tego one ze lat pan dwa miasto czas życie dzień praca dom ludzie kraju szkoły mówi "
          "wszystko bez więc zawsze wiele nowy",
    "ru": "правительство развитие предприятие общество история экономика население администрация возможность событие мэр пейзаж наука опыт значение сотрудничество студенты выставка соединение соседи решение предложение община безопасность исследование церковь газета вокзал лето зима друзья семья работать вчера завтра важный трудный различные многочисленные бывших известных русских европейских общественных политических особенно и в не на я быть он с что а по это она этот к но они мы как из у который то за свой что весь год от так о "
          "для ты же все тот мочь вы человек такой его сказать только или ещё бы себя один как уже до время если сам "
          "когда другой вот говорить наш мой знать стать при чтобы дело жизнь кто первый очень два день её новый рука "
          "даже во со раз где там под можно ну какой после их работа без самый потом надо хотеть ли слово идти город",
    "zh": "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么"
          "心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分"
          "将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重"
          "被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住",
}
SHARES = {"en": 0.55, "de": 0.1, "es": 0.1, "it": 0.07, "pl": 0.06, "ru": 0.06, "zh": 0.06}
TLDS = ["com", "org", "net", "de", "io"]


class Language:
    """Words with Zipf weights; sentences from them."""

    def __init__(self, code: str):
        self.code = code
        if code == "en":
            from pydoc_data.topics import topics

            counts = Counter(w for t in topics.values() for w in re.findall(r"[a-z]{2,12}", t.lower()))
            self.words = np.array([w for w, _ in counts.most_common()])
            weights = np.array([c for _, c in counts.most_common()], float)
        else:
            self.words = np.array(list(WORDS[code]) if code == "zh" else WORDS[code].split())
            rng = np.random.default_rng(len(self.words))  # content words first in the lists: shuffle the ranks
            weights = 1.0 / rng.permutation(np.arange(1, len(self.words) + 1)) ** 0.7
        self.cdf = np.cumsum(weights / weights.sum())
        self.sep, self.end = ("", "。") if code == "zh" else (" ", ".")

    def sentence(self, rng: np.random.Generator) -> str:
        n = int(rng.integers(8, 26)) * (2 if self.code == "zh" else 1)
        w = self.words[np.minimum(np.searchsorted(self.cdf, rng.random(n)), len(self.words) - 1)]
        s = self.sep.join(w)
        return (s[0].upper() + s[1:] if self.code != "zh" else s) + self.end

    def document(self, rng: np.random.Generator, words: int) -> str:
        paras, total = [], 0
        while total < words:
            k = int(rng.integers(1, 6))
            para = " ".join(self.sentence(rng) for _ in range(k))
            paras.append(para)
            total += len(para) // 2 if self.code == "zh" else para.count(" ") + 1
        return "\n".join(paras)


def doc_words(rng: np.random.Generator) -> int:
    """Log-normal: median 250 words, a long tail (clipped to 20..6000)."""
    return int(np.clip(rng.lognormal(np.log(250), 0.9), 20, 6000))


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    """Jaccard of the sets of word n-grams (lowercased, split on whitespace): the benchmarks' truth."""
    sa, sb = ({tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)} for ws in (a.lower().split(), b.lower().split()))
    return len(sa & sb) / max(1, len(sa | sb))


def edit(text: str, target: float, rng: np.random.Generator, vocab: np.ndarray, exact: bool = True) -> tuple[str, float]:
    """A near copy of `text` at word-5-gram Jaccard close to `target`: word substitutions, deletions and
    insertions at random places (lines kept), the count found by bisection (or, not `exact`, estimated:
    each edit changes about 5 shingles). Returns (copy, Jaccard; None when not `exact`)."""
    lines = [ln.split(" ") for ln in text.split("\n")]
    where = [(i, j) for i, ln in enumerate(lines) for j in range(len(ln))]

    def apply(k: int, seed: int) -> str:
        r = np.random.default_rng(seed)
        out = [list(ln) for ln in lines]
        for idx in sorted(r.choice(len(where), min(k, len(where)), replace=False), reverse=True):
            i, j = where[idx]
            op = r.random()
            if op < 0.6:
                out[i][j] = str(vocab[r.integers(len(vocab))]) + ("." if out[i][j].endswith(".") else "")
            elif op < 0.8 and len(out[i]) > 1:
                del out[i][j]
            else:
                out[i].insert(j, str(vocab[r.integers(len(vocab))]))
        return "\n".join(" ".join(ln) for ln in out)

    seed, lo, hi = int(rng.integers(2**31)), 1, max(2, len(where))
    if not exact:
        return apply(max(1, round(len(where) * (1 - target) / (5 * (1 + target)))), seed), None
    while lo < hi:  # the fewest edits that bring the Jaccard to the target or below
        mid = (lo + hi) // 2
        if shingle_jaccard(text, apply(mid, seed)) > target:
            lo = mid + 1
        else:
            hi = mid
    copy = apply(lo, seed)
    return copy, shingle_jaccard(text, copy)


def site_lines(rng: np.random.Generator, n_sites: int, vocab: np.ndarray) -> list[tuple[str, str]]:
    """(navigation line, footer) per site, the site named by two words."""
    out = []
    for s in range(n_sites):
        name = " ".join(str(w).title() for w in vocab[rng.integers(50, 2000, 2)])
        nav = " | ".join(["Home", "News", "About us", f"{name} shop", "Contact"])
        footer = f"Copyright {2010 + s % 15} {name} Media Ltd. All rights reserved."
        out.append((nav, footer))
    return out


def pii_sentence(rng: np.random.Generator) -> str:
    k = int(rng.integers(3))
    if k == 0:
        return f"Write to editor{rng.integers(1000)}@news{rng.integers(50)}.{TLDS[rng.integers(len(TLDS))]} for corrections."
    if k == 1:
        return f"Call the desk on +44 20 {rng.integers(7000, 7999)} {rng.integers(1000, 9999)} during office hours."
    return f"The mirror at {rng.integers(11, 200)}.{rng.integers(1, 255)}.{rng.integers(1, 255)}.{rng.integers(1, 255)} is updated daily."


def write_corpus(out: Path, docs: int, seed: int = 0, files: int = 8, eval_texts: int = 200) -> dict:
    """Write `docs` records into `files` jsonl files under out/corpus, an evaluation set under out/evals;
    return (and write to out/truth.json) what was planted."""
    rng = np.random.default_rng(seed)
    langs = {c: Language(c) for c in SHARES}
    codes, shares = list(SHARES), np.array(list(SHARES.values()))
    en = langs["en"]
    sites = site_lines(rng, 50, en.words)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    (out / "evals").mkdir(parents=True, exist_ok=True)
    passages = [" ".join(en.sentence(rng) for _ in range(2)) for _ in range(eval_texts)]
    (out / "evals" / "synthetic_eval.jsonl").write_text("".join(json.dumps({"passage": p}) + "\n" for p in passages))
    truth = Counter()
    recent: list[str] = []  # a window of earlier texts to copy from
    handles = [open(out / "corpus" / f"part_{i:03d}.jsonl", "w", encoding="utf-8") for i in range(files)]
    try:
        for i in range(docs):
            r = rng.random()
            if r < 0.03 and recent:
                text, kind = recent[int(rng.integers(len(recent)))], "exact_copy"
            elif r < 0.07 and recent:
                base = recent[int(rng.integers(len(recent)))]
                text, kind = edit(base, float(rng.uniform(0.6, 0.98)), rng, en.words, exact=False)[0], "near_copy"
            else:
                lang = langs[codes[rng.choice(len(codes), p=shares)]]
                text, kind = lang.document(rng, doc_words(rng)), lang.code
                if rng.random() < 0.3:
                    nav, footer = sites[int(rng.integers(len(sites)))]
                    text, kind = f"{nav}\n{text}\n{footer}", kind + "+site"
                if rng.random() < 0.05:
                    text += "\n" + pii_sentence(rng)
                    truth["pii_sentence"] += 1
                if rng.random() < 0.0005:
                    text += "\n" + passages[int(rng.integers(len(passages)))]
                    truth["eval_quote"] += 1
            truth[kind.split("+")[0] if "copy" in kind else "original"] += 1
            if len(recent) < 2000:
                recent.append(text)
            else:
                recent[int(rng.integers(len(recent)))] = text
            line = json.dumps({"id": f"doc{i}", "text": text}, ensure_ascii=False)
            if rng.random() < 0.001:
                line, truth["malformed"] = line[: len(line) // 2], truth["malformed"] + 1
            handles[i % files].write(line + "\n")
    finally:
        for h in handles:
            h.close()
    info = {"docs": docs, "seed": seed, "planted": dict(truth)}
    (out / "truth.json").write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--files", type=int, default=8)
    a = ap.parse_args()
    print(json.dumps(write_corpus(Path(a.out), a.docs, a.seed, a.files)))
