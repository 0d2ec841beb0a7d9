"""What a finished `kiln prep` leaves: report/removed.jsonl, report/quarantine.jsonl, manifest.json
(written last, atomically) and the summary table."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

from data_prep import stages
from data_prep.buckets import PART_BITS, POS_MASK
from data_prep.steps import STEPS

FORMAT = 1
log = __import__("logging").getLogger("kiln.prep")


def finish(out: Path, cfg, in_info, parts, clean, drops, tok, vocab, tok_sha, extra: dict) -> dict:
    """Reports and manifest; returns the summary. `extra`: decontamination stats, boilerplate key count."""
    removed, quarantined, edits, cut_chars, cut_lines = Counter(), Counter(), Counter(), Counter(), Counter()
    for s in [*clean, *tok]:
        edits.update(s["edits"])
    for s in clean:
        removed.update(s["removed"])
        quarantined.update(s["quarantined"])
        cut_chars.update(s.get("removed_chars", {}))
        cut_lines.update(s.get("removed_lines", {}))
    reason = {u: r for u, r, *_ in drops["removed"]}
    removed.update(reason.values())
    for r in tok:  # what dedup removed, counted where the tokenize stage skipped it
        for pos, chars, lines in r.get("duplicates", []):
            rule = reason[(r["part"] << PART_BITS) | pos]
            cut_chars[rule] += chars
            cut_lines[rule] += lines
    removed.update(d["reason"] for r in tok for d in r["removed"])
    write_reports(out, clean, drops, tok)
    shards = [r["shards"][split] for split in ("train", "val") for r in tok if split in r["shards"]]
    keys = ("path", "sha256", "documents", "tokens", "split", "fingerprint", "bin_bytes", "idx_bytes")
    shards = [{k: sh[k] for k in keys if k in sh} for sh in shards]
    langs = Counter()
    for r in tok:
        for sh in r["shards"].values():
            langs.update(sh["langs"])
    records = Counter()
    for p, s in zip(parts, clean, strict=True):
        records[p["path"]] += s["records"]
    tokens = {split: sum(s["tokens"] for s in shards if s["split"] == split) for split in ("train", "val")}
    counts = {
        "records_in": sum(s["records"] for s in clean),
        "documents_read": sum(s["read"] for s in clean),
        "documents_in": sum(s["documents_in"] for s in clean),
        "documents_kept": sum(s["documents"] for s in shards),
        "removed": dict(sorted(removed.items())),
        "characters": {"in": sum(s.get("chars_in", 0) for s in clean),
                       "kept": sum(sh.get("chars", 0) for r in tok for sh in r["shards"].values())},
        "removed_chars": dict(sorted(cut_chars.items())),
        "removed_lines": dict(sorted(cut_lines.items())),
        "quarantined": dict(sorted(quarantined.items())),
        "languages": dict(sorted(langs.items())),
        "edits": dict(sorted(edits.items())),
        "near_dup_pairs": {"checked": drops["pairs_checked"], "similar": drops["pairs_similar"]},
        "boilerplate_keys": extra["boilerplate_keys"],
    }
    manifest = {
        "version": FORMAT,
        "inputs": [{"path": os.path.relpath(i["path"], out.resolve()), "sha256": i["sha256"], "records": records[i["path"]]}
                   for i in in_info],
        "config": cfg.model_dump(mode="json", exclude={"ray_address"}),
        "counts": counts,
        "tokens": tokens,
        "tokenizer": {"path": "tokenizer.model", "sha256": tok_sha, "vocab_size": vocab},
        "shards": shards,
        "digest": hashlib.sha256("".join(s["sha256"] for s in shards).encode()).hexdigest(),
    }
    if extra["decontamination"]:
        manifest["decontamination"] = dict(extra["decontamination"], sources=[
            dict(s, documents_removed=removed.get(f"decontaminate:{s['source']}", 0))
            for s in extra["decontamination"]["sources"]])
    stages.write_json(out / "manifest.json", manifest)
    return {"out": str(out), "digest": manifest["digest"], "counts": counts, "tokens": tokens,
            "shards": len(shards), "vocab_size": vocab, "warnings": warnings(counts, cfg.warn_removed_share)}


def off_switch(rule: str) -> str:
    """The config key that stops `rule` (a counts.removed key) from removing text."""
    step, _, name = rule.partition(":")
    if name in getattr(STEPS.get(step), "default_off", ()):
        return f"filter_enable without {rule}"
    if name in getattr(STEPS.get(step), "rules", ()):
        return f"filter_disable: [{rule}]"
    return {"lang": "langs (or langid out of filters)", "too_long": "long_doc_policy: split, or max_doc_chars",
            "exact_dup": "dedup: false", "near_dup": "near_dedup: false", "decontaminate": "decontaminate.paths",
            }.get(step if step == "decontaminate" else rule, f"filters (drop {step})" if step in STEPS else "")


def warnings(counts: dict, share: float) -> list[str]:
    """One line per rule that removed more than `share` of the characters read (documents and lines alike)."""
    total = counts["characters"]["in"]
    out = []
    for rule, chars in sorted(counts["removed_chars"].items(), key=lambda kv: -kv[1]):
        if total and chars > share * total:
            key = off_switch(rule)
            out.append(f"{rule} removed {chars / total:.0%} of the characters read ({chars:,} of {total:,}; "
                       f"warn_removed_share is {share:g})" + (f"; to keep them set {key}" if key else ""))
    return out


def write_reports(out: Path, clean: list[dict], drops: dict, tok: list[dict]) -> None:
    """report/removed.jsonl (filters per partition, duplicates by uid, boilerplate per partition) and
    report/quarantine.jsonl."""
    work = out / "work" / "clean"
    ids: dict[int, list[str]] = {}

    def id_of(uid: int) -> str:
        p = uid >> PART_BITS
        if p not in ids:
            with open(work / f"{p:05d}" / "ids.jsonl", encoding="utf-8") as f:
                ids[p] = [json.loads(line) for line in f]
        return ids[p][uid & POS_MASK]

    for name in ("removed", "quarantine"):
        tmp = out / "report" / f"{name}.jsonl.tmp"
        with open(tmp, "wb") as dst:
            for s in clean:
                with open(work / f"{s['index']:05d}" / f"{name}.jsonl", "rb") as src:
                    shutil.copyfileobj(src, dst)
            if name == "removed":
                for u, reason, k, *jac in drops["removed"]:
                    rec = {"id": id_of(u), "reason": reason, "detail": id_of(k)}
                    if jac and jac[0] is not None:
                        rec["jaccard"] = jac[0]
                    dst.write((json.dumps(rec, ensure_ascii=False) + "\n").encode())
                for r in tok:
                    dst.writelines((json.dumps(d, ensure_ascii=False) + "\n").encode() for d in r["removed"])
        os.replace(tmp, out / "report" / f"{name}.jsonl")


def print_summary(summary: dict, table=None) -> None:
    c = summary["counts"]
    rows = [{"what": "records read", "value": c["records_in"]},
            {"what": "quarantined", "value": sum(c["quarantined"].values())},
            {"what": "documents after length policy", "value": c["documents_in"]}]
    chars, lines = c.get("removed_chars", {}), c.get("removed_lines", {})
    rows += [{"what": f"removed: {k}", "value": f"{c['removed'].get(k, 0):,} docs, {lines.get(k, 0):,} lines, "
                                                  f"{chars.get(k, 0):,} chars"}
             for k in sorted(set(c["removed"]) | set(chars))]
    rows += [{"what": f"edited: {k}", "value": v} for k, v in c["edits"].items()]
    rows += [{"what": "documents kept", "value": c["documents_kept"]},
             {"what": "characters read / kept", "value": "{in:,} / {kept:,}".format(**c["characters"])},
             {"what": "languages", "value": ", ".join(f"{k} {v}" for k, v in c["languages"].items())},
             {"what": "tokens train / val", "value": f"{summary['tokens']['train']:,} / {summary['tokens']['val']:,}"},
             {"what": "shards", "value": summary["shards"]},
             {"what": "time (s)", "value": ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items())},
             {"what": "digest", "value": summary["digest"][:16]}]
    if table is None:
        for row in rows:
            log.info("%s: %s", row["what"], row["value"])
    else:
        table(f"kiln prep -> {summary['out']}", rows, ["what", "value"])
