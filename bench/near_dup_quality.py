"""Near-duplicate recall per Jaccard bucket and precision: Kiln next to datatrove 0.10.1's default MinHash,
on the same generated corpus, in the same run. Prints JSON lines {"bench", "value", "unit", "reference", ...}.

Corpus (bench/_synth_corpus.py, English web-like text): random documents, documents that share a
template (word-5-gram Jaccard 0.2-0.45 among them: hard negatives), and planted pairs whose second
member is the first with words substituted, deleted and inserted until the exact word-5-gram Jaccard
(the truth) reaches a target in 0.50..0.95. Input order is shuffled; a pair counts as found when one
member is removed (Kiln: as the near/exact duplicate *of the other*).
- kiln (filters off): `kiln prep --set filters=[]`, the same work as datatrove's MinHash;
- kiln (filters on): the default filters, which edit lines before dedup (recall among pairs whose
  members both survive them);
- datatrove: MinhashDedupSignature/Buckets/Cluster/Filter with `MinhashConfig()` defaults (word
  5-grams, 14 buckets x 8 hashes, no verification) in its own venv (never a Kiln dependency):
  python3 -m venv /tmp/dtvenv && /tmp/dtvenv/bin/pip install datatrove==0.10.1 regex "xxhash<4" tokenizers orjson spacy
Precision: removed documents that are a planted pair member (any Jaccard >= 0.5) / all removed; and
`precision_at_0.8`: those whose pair has Jaccard >= 0.8 / all removed (what a 0.8 threshold promises).

Run: PYTHONPATH=. python bench/near_dup_quality.py --datatrove-python /tmp/dtvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _synth_corpus import Language, doc_words, edit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = [0.0, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0]  # 1.0 closes the last bucket
DATATROVE = textwrap.dedent("""
    import sys
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    inp, work, tasks = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = MinhashConfig()
    run = lambda pipeline, n: LocalPipelineExecutor(pipeline=pipeline, tasks=n, workers=min(n, tasks),
                                                    logging_dir=f"{work}/logs/{len(pipeline)}{n}{id(pipeline)}").run()
    run([JsonlReader(inp), MinhashDedupSignature(output_folder=f"{work}/sigs", config=cfg)], tasks)
    run([MinhashDedupBuckets(input_folder=f"{work}/sigs", output_folder=f"{work}/buckets", config=cfg)], cfg.num_buckets)
    run([MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=cfg)], 1)
    run([JsonlReader(inp), MinhashDedupFilter(input_folder=f"{work}/remove",
                                              exclusion_writer=JsonlWriter(f"{work}/removed", compression=None))], tasks)
""")


def emit(bench: str, value, unit: str, reference=None, **extra) -> None:
    ratio = round(value / reference, 3) if isinstance(reference, float | int) and reference else None
    print(json.dumps({"bench": bench, "value": value, "unit": unit, "reference": reference, "ratio": ratio, **extra}),
          flush=True)


def build(out: Path, pairs_per_step: int, negatives: int, templated: int, seed: int) -> dict:
    """Write out/corpus/part_{0,1}.jsonl; return {"pairs": [(first id, second id, jaccard)], "docs": n}."""
    rng = np.random.default_rng(seed)
    en = Language("en")
    docs = [en.document(rng, doc_words(rng)) for _ in range(negatives)]
    template = en.document(rng, 150)
    docs += [f"{template}\n{en.document(rng, int(rng.integers(150, 450)))}" for _ in range(templated)]
    planted = []
    for target in np.repeat(np.arange(0.50, 0.951, 0.05), pairs_per_step):
        base = en.document(rng, doc_words(rng))
        twin, jac = edit(base, float(target) + 0.049 * rng.random(), rng, en.words)
        planted.append((len(docs), len(docs) + 1, jac))
        docs += [base, twin]
    order = rng.permutation(len(docs))  # position in the input of each document
    ids = {int(i): f"d{int(pos):06d}" for pos, i in enumerate(np.argsort(order))}
    pairs = []
    for a, b, jac in planted:
        first, second = sorted((ids[a], ids[b]))
        pairs.append((first, second, jac))
    (out / "corpus").mkdir(parents=True)
    files = [open(out / "corpus" / f"part_{k}.jsonl", "w") for k in range(2)]
    for pos, i in enumerate(np.argsort(order)):
        files[pos * 2 // len(docs)].write(json.dumps({"id": ids[int(i)], "text": docs[int(i)]}) + "\n")
    for f in files:
        f.close()
    return {"pairs": pairs, "docs": len(docs)}


def run_kiln(corpus: Path, out: Path, workers: int, *sets: str) -> tuple[dict[str, dict], float]:
    cmd = [sys.executable, "-m", "pipeline.cli", "prep", str(corpus), "--out", str(out), "--workers", str(workers),
           "--vocab-size", "1000", "--set", "tracking.enabled=false", "--set", "boilerplate.enabled=false", "--json"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    t = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    removed = {}
    for line in (out / "report" / "removed.jsonl").read_text().splitlines():
        r = json.loads(line)
        removed[r["id"]] = r
    return removed, time.time() - t


def run_datatrove(python: str, corpus: Path, work: Path, workers: int) -> tuple[dict[str, dict], float]:
    t = time.time()
    res = subprocess.run([python, "-c", DATATROVE, str(corpus), str(work), str(workers)], capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    removed = {}
    for f in sorted((work / "removed").glob("*.jsonl")):
        for line in f.read_text().splitlines():
            removed[json.loads(line)["id"]] = {"reason": "near_dup"}
    return removed, time.time() - t


def score(name: str, removed: dict[str, dict], pairs: list, survivors=None, reference: dict | None = None) -> dict:
    """Recall per Jaccard bucket and precision; `survivors(id)`: pairs count only when both survive filters."""
    dups = {r_id: r for r_id, r in removed.items() if r["reason"] in ("near_dup", "exact_dup")}
    member = {}
    for a, b, jac in pairs:
        member[a], member[b] = (b, jac), (a, jac)
    found, total = defaultdict(int), defaultdict(int)
    for a, b, jac in pairs:
        if survivors and not (survivors(a) and survivors(b)):
            continue
        k = max(i for i, lo in enumerate(BUCKETS[:-1]) if jac >= lo)
        total[k] += 1
        if "detail" in next(iter(dups.values()), {}):  # kiln names the kept twin: it must be the partner
            hit = dups.get(b, {}).get("detail") == a or dups.get(a, {}).get("detail") == b
        else:
            hit = a in dups or b in dups
        found[k] += hit
    recall = {f"{BUCKETS[k]:.2f}-{BUCKETS[k + 1]:.2f}": round(found[k] / total[k], 4) for k in sorted(total)}
    at08 = sum(found[k] for k in total if BUCKETS[k] >= 0.8) / max(1, sum(total[k] for k in total if BUCKETS[k] >= 0.8))
    good = sum(1 for d in dups if d in member)
    strict = sum(1 for d in dups if d in member and member[d][1] >= 0.8)
    result = {"recall": recall, "recall_at_0.8": round(at08, 4), "removed": len(dups),
              "precision": round(good / max(1, len(dups)), 4), "precision_at_0.8": round(strict / max(1, len(dups)), 4),
              "pairs": sum(total.values())}
    ref = reference or {}
    emit(f"near_dup_recall_at_jaccard_0.8_{name}", result["recall_at_0.8"], "recall", ref.get("recall_at_0.8"),
         recall_per_bucket=recall, reference_recall_per_bucket=ref.get("recall"), pairs=result["pairs"])
    emit(f"near_dup_precision_{name}", result["precision"], "precision", ref.get("precision"),
         precision_at_0_8=result["precision_at_0.8"], reference_precision_at_0_8=ref.get("precision_at_0.8"),
         removed=len(dups), reference_removed=ref.get("removed"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=150, help="planted pairs per 0.05 Jaccard step (0.50..0.95)")
    ap.add_argument("--negatives", type=int, default=6000)
    ap.add_argument("--templated", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--datatrove-python", default="/tmp/dtvenv/bin/python")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-neardup-"))
    truth = build(tmp, args.pairs, args.negatives, args.templated, args.seed)
    corpus = tmp / "corpus"
    dt = None
    if Path(args.datatrove_python).is_file():
        removed, secs = run_datatrove(args.datatrove_python, corpus, tmp / "dt", args.workers)
        dt = score("datatrove_default", removed, truth["pairs"])
        emit("near_dup_docs_per_s_datatrove_default", round(truth["docs"] / secs, 1), "docs/s", None, docs=truth["docs"])
    else:
        print(f"# no datatrove at {args.datatrove_python}: no reference", file=sys.stderr)
    removed, secs = run_kiln(corpus, tmp / "kiln_nofilters", args.workers, "filters=[]")
    score("kiln_filters_off", removed, truth["pairs"], reference=dt)
    emit("near_dup_docs_per_s_kiln_whole_prep", round(truth["docs"] / secs, 1), "docs/s", None, docs=truth["docs"],
         note="the whole kiln prep (Ray start, dedup, tokenizer, shards), filters off")
    removed, _ = run_kiln(corpus, tmp / "kiln_filters", args.workers)
    filtered = {i for i, r in removed.items() if r["reason"] not in ("near_dup", "exact_dup")}
    score("kiln_filters_on", removed, truth["pairs"], survivors=lambda i: i not in filtered, reference=dt)
    subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    main()
