"""`kiln prep` driver: the only module that knows Ray.

Stages (each unit of work is a Ray task; finished units are reused on a rerun):
  plan        hash inputs, cut partitions; index the evaluation n-grams of --decontaminate (driver)
  clean       read -> normalize -> length -> langid -> Gopher/C4/FineWeb -> decontaminate -> PII;
              exact hash, MinHash band keys + shingle sketch of the text as read, line keys (task per partition)
  dedup       exact groups, LSH candidates verified by Jaccard, bucket-wise (task per bucket);
              who is kept decided in the driver, in input order
  boilerplate line keys counted over the documents dedup kept, bucket-wise (task per bucket)
  tokenizer   sentencepiece on a deterministic sample (driver), or --tokenizer
  tokenize    strip boilerplate lines, encode into train/val Megatron shards (task per partition)
  manifest    reports, counts, shard digests, run digest (driver)

Results do not depend on the worker count: partitions depend only on the input,
dedup keeps the lowest uid (input order) of each cluster, the val split is a hash
of the document id. Work lives in DIR/work/ and is written atomically, so a rerun
of the same command after `kill -9` reuses what finished. A task whose worker
process dies (killed, OOM, node lost) is rerun by Ray up to `task_retries` times;
after that the run stops with one line naming the stage and the unit of work.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data_prep import buckets, outdir, partitions, readers, report, stages
from data_prep.config import PrepConfig
from data_prep.errors import ConfigError, KilnError, first_line
from data_prep.eval_texts import read_sources
from data_prep.steps import EvalIndex, build_steps
from data_prep.tokenizer import check_tokenizer, train_tokenizer

log = __import__("logging").getLogger("kiln.prep")


@contextmanager
def ray_session(cfg: PrepConfig):
    """Reuse a running Ray, join `ray_address`/RAY_ADDRESS, or start a private local one on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        yield ray
        return
    address = cfg.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        loopback_only()
        ray.init(address="local", num_cpus=cfg.workers, include_dashboard=False, _node_ip_address="127.0.0.1",
                 configure_logging=False, log_to_driver=True)
    try:
        yield ray
    finally:
        ray.shutdown()


def loopback_only() -> None:
    """Make the private Ray's GCS, raylet, agents and metrics port listen on 127.0.0.1 only.

    Ray turns a 127.0.0.1 node address into the host's reachable IP (so other nodes could join) and
    then binds its services there and on all interfaces, unless clustering is switched off, which it
    reads from RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (named for the platforms where that is the default).
    Its processes inherit the variable; this process reads the constant it was imported with.
    """
    import ray._private.ray_constants as constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    constants.ENABLE_RAY_CLUSTER = False


@contextmanager
def _no_progress(description: str, total: float | None = None, unit: str = "it"):
    yield lambda n=1, **fields: None


def _run_tasks(ray, fn, arg_lists: list[tuple], cfg: PrepConfig, stage: str, labels: list[str], count=None,
               unit: str = "docs", progress=None) -> list:
    """Run `fn(*args)` as Ray tasks, at most `cfg.workers` at once; results in submission order.

    Ray reruns a task whose worker died (`max_retries` covers system failures only, not exceptions
    raised by `fn`). `labels[i]` names task i's unit of work in errors; `count(result)` gives the
    units (documents, tokens) a finished task handled, for the rate shown.
    """
    progress = progress or _no_progress
    workers = cfg.workers
    remote = ray.remote(num_cpus=1, max_retries=cfg.task_retries)(fn)
    results: list = [None] * len(arg_lists)
    pending: dict = {}
    units, start = 0, time.time()
    todo = list(enumerate(arg_lists))
    with progress(stage, total=len(arg_lists), unit="tasks") as advance:
        while todo or pending:
            while todo and len(pending) < workers:
                i, args = todo.pop(0)
                pending[remote.remote(*args)] = i
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except ray.exceptions.RayError as err:
                    _cancel(ray, pending)
                    raise _task_error(ray, err, f"{stage}: {labels[i]}", cfg.task_retries) from None
                if count is not None:
                    units += count(results[i])
                    advance(1, description=f"{stage} ({units / max(time.time() - start, 1e-9):,.0f} {unit}/s)")
                else:
                    advance(1)
    return results


def _task_error(ray, err, what: str, retries: int) -> Exception:
    """One line for a failed task: its own KilnError/ConfigError as is, else what failed and why."""
    if isinstance(err, ray.exceptions.RayTaskError):
        cause = err.cause if isinstance(err.cause, Exception) else err
        if isinstance(cause, KilnError | ConfigError):
            return cause
        return KilnError(f"{what}: {type(cause).__name__}: {first_line(cause)}")
    if isinstance(err, ray.exceptions.WorkerCrashedError):
        return KilnError(f"{what}: its Ray worker process died (killed or out of memory) on every attempt "
                         f"({retries + 1}, task_retries={retries}); rerun the same command to resume")
    return KilnError(f"{what}: {type(err).__name__}: {first_line(err)}")


def _cancel(ray, pending: dict, wait_s: float = 30.0) -> None:
    """Stop the other tasks of a failed stage, so none still writes into DIR when a rerun starts.

    `force`: a plain cancel only interrupts Python bytecode, not a task blocked in C (encode, I/O).
    """
    for ref in pending:
        ray.cancel(ref, force=True)
    if pending:
        ray.wait(list(pending), num_returns=len(pending), timeout=wait_s)


def prep(inputs: list[str], out: str | Path, cfg: PrepConfig, progress=None, table=None, overwrite: bool = False) -> dict:
    """Run the whole preparation; return the summary (also written as DIR/manifest.json).

    A finished `out` of other inputs or config is refused unless `overwrite`; then the new run is built beside
    it and replaces it only when finished, so a failed run leaves the old output as it was.

    `progress(description, total, unit)` is a context manager yielding `advance(n, **fields)` and
    `table(title, rows, columns)` prints the summary (the CLI passes pipeline.console's); without
    them the run is quiet apart from log lines.
    """
    t0 = time.time()
    final = out = Path(out)
    try:
        build_steps(cfg)  # validate filter_params before any work
    except ValueError as err:
        raise ConfigError(str(err)) from None
    given_tokenizer = check_tokenizer(cfg.tokenizer)[1] if cfg.tokenizer else None
    files = [f for f in readers.resolve_inputs(inputs, exclude=out) if outdir.staging_dir(out).resolve() not in f.parents]
    evals = read_sources(cfg.decontaminate.paths, cfg.decontaminate.max_bytes)
    in_info, parts = partitions.plan(files, cfg.shard_docs, cfg.partition_bytes)
    if len(parts) >= 2**31:
        raise KilnError("too many partitions; raise shard_docs")
    fingerprint = outdir.fingerprint(cfg, in_info, given_tokenizer, evals)
    out = outdir.destination(out, fingerprint, overwrite)
    work = outdir.prepare(out, fingerprint)
    decontam = _eval_index(cfg, work, evals)
    timings = {"plan": time.time() - t0}
    log.info("prep: %d input file(s), %d partition(s), %d worker(s) -> %s", len(files), len(parts), cfg.workers, out)
    with outdir.swept(out), ray_session(cfg) as ray:
        t = time.time()
        clean = _run_tasks(ray, stages.clean_partition, [(p, cfg, str(work)) for p in parts], cfg, "clean+filter",
                           [_part_label(p) for p in parts], count=lambda s: s["records"], progress=progress)
        timings["clean"] = time.time() - t
        n = sum(s["records"] for s in clean)
        log.info("clean+filter: %d records in %.1f s (%.0f docs/s)", n, timings["clean"], n / max(timings["clean"], 1e-9))
        if sum(s["read"] for s in clean) == 0:
            q = Counter()
            for s in clean:
                q.update(s["quarantined"])
            if q.get("missing_text_field"):
                report.write_reports(out, clean, {"removed": []}, [])
                raise KilnError(f"no record has the text field {cfg.text_field!r} (use --text-field; "
                                f"see {out / 'report' / 'quarantine.jsonl'})")
        t = time.time()
        drops = _dedup(ray, cfg, work, clean, progress)
        timings["dedup"] = time.time() - t
        t = time.time()
        boiler = _boilerplate(ray, cfg, work, clean, progress)
        timings["boilerplate"] = time.time() - t
        if not cfg.tokenizer and sum(s["kept"] for s in clean) == len(drops["removed"]):
            report.write_reports(out, clean, drops, [])
            raise KilnError(f"no document survived reading, filtering and dedup ({sum(s['records'] for s in clean)} "
                            f"records), nothing to train a tokenizer on; see {out / 'report'}")
        t = time.time()
        tok_path, vocab, tok_sha = _tokenizer(cfg, work, out, clean, drops)
        timings["tokenizer"] = time.time() - t
        t = time.time()
        tok = _run_tasks(ray, stages.tokenize_partition,
                         [(s["index"], drops["by_part"].get(s["index"], np.zeros(0, np.int64)), str(tok_path), cfg, str(work), str(out))
                          for s in clean], cfg, "tokenize",
                         [f"shards/{{train,val}}_{s['index']:05d} from {_part_label(parts[s['index']])}" for s in clean],
                         count=lambda r: sum(sh["tokens"] for sh in r["shards"].values()), unit="tokens",
                         progress=progress)
        timings["tokenize"] = time.time() - t
        n = sum(sh["tokens"] for r in tok for sh in r["shards"].values())
        log.info("tokenize: %d tokens in %.1f s (%.0f tokens/s)", n, timings["tokenize"], n / max(timings["tokenize"], 1e-9))
    summary = report.finish(out, cfg, in_info, parts, clean, drops, tok, vocab, tok_sha,
                            {"decontamination": decontam, "boilerplate_keys": boiler})
    if out != final:
        outdir.swap_in(out, final)
        summary["out"] = str(final)
    timings["total"] = time.time() - t0
    summary["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    report.print_summary(summary, table)
    for line in summary["warnings"]:
        log.warning("prep: %s", line)
    return summary


def _eval_index(cfg: PrepConfig, work: Path, evals: list[dict]) -> dict | None:
    """Index the evaluation n-grams once (work/decontam/, memory-mapped by the clean tasks); their stats."""
    if not evals:
        return None
    d = cfg.decontaminate
    stats_path = work / "decontam" / "stats.json"
    if not stats_path.is_file():
        index, stats = EvalIndex.build(evals, d.ngram, d.min_words, d.max_ngrams)
        tmp = work / f"decontam.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        index.save(tmp)
        stages.write_json(tmp / "stats.json", {"ngram": d.ngram, "min_words": d.min_words, "sources": stats})
        shutil.rmtree(work / "decontam", ignore_errors=True)
        os.replace(tmp, work / "decontam")
        log.info("decontaminate: %d evaluation n-grams from %d file(s)", len(index.hashes), len(evals))
    return json.loads(stats_path.read_text())


def _dedup(ray, cfg: PrepConfig, work: Path, clean: list[dict], progress=None) -> dict:
    """Exact and near duplicates: {"removed": [[uid, reason, kept uid, jaccard]], "by_part": positions to drop}.

    An exact duplicate names the first identical document; a near duplicate the earlier, kept document
    it was verified against (with their Jaccard). Also writes work/dropped.npy (sorted uids) for the
    boilerplate counts.
    """
    path = work / "dedup.json"
    if path.is_file():
        saved = json.loads(path.read_text())
    elif not cfg.dedup:
        saved = {"removed": [], "pairs_checked": 0, "pairs_similar": 0}
    else:
        parts = [s["index"] for s in clean]
        res = _run_tasks(ray, buckets.dedup_bucket, [(b, parts, str(work), cfg) for b in range(cfg.dedup_buckets)],
                         cfg, "dedup", [f"bucket {b} of {cfg.dedup_buckets}" for b in range(cfg.dedup_buckets)],
                         progress=progress)
        removed, similar = buckets.removals(res)
        saved = {"removed": sorted([u, r, k, jac] for u, (r, k, jac) in removed.items()),
                 "pairs_checked": sum(r["checked"] for r in res), "pairs_similar": similar}
        stages.write_json(path, saved)
    dropped = np.array(sorted(u for u, *_ in saved["removed"]), np.int64)
    np.save(work / "dropped.npy", dropped)
    by_part: dict[int, list[int]] = {}
    for u in dropped.tolist():
        by_part.setdefault(u >> buckets.PART_BITS, []).append(u & buckets.POS_MASK)
    return {**saved, "by_part": {p: np.array(v, np.int64) for p, v in by_part.items()}}


def _boilerplate(ray, cfg: PrepConfig, work: Path, clean: list[dict], progress=None) -> int:
    """Line keys found in more than boilerplate.max_docs kept documents -> work/boilerplate.npy; how many."""
    path = work / "boilerplate.npy"
    if not cfg.boilerplate.enabled:
        return 0
    if not path.is_file():
        parts, n = [s["index"] for s in clean], cfg.dedup_buckets
        res = _run_tasks(ray, buckets.boilerplate_bucket, [(b, parts, str(work), cfg.boilerplate.max_docs) for b in range(n)],
                         cfg, "boilerplate", [f"bucket {b} of {n}" for b in range(n)], progress=progress)
        keys = np.sort(np.concatenate([np.zeros(0, np.uint64), *res]))
        tmp = work / f"boilerplate.tmp{os.getpid()}.npy"
        np.save(tmp, keys)
        os.replace(tmp, path)
    return len(np.load(path, mmap_mode="r"))


def _part_label(p: dict) -> str:
    """`a.jsonl line 9+ (partition 1)`: where a partition's records come from."""
    start = "row" if p["kind"] in ("parquet", "arrow") else "line"
    return f"{p['rel']} {start} {p['first_line']}+ (partition {p['index']})"


def _sample_texts(cfg: PrepConfig, work: Path, clean: list[dict], drops: dict):
    """Documents for tokenizer training: those whose id hash falls under a cut (deterministic), in order,
    boilerplate stripped as the tokenize stage will."""
    kept = sum(s["kept"] for s in clean) - len(drops["removed"])
    cut = int(min(1.0, cfg.tokenizer_sample_docs / max(1, kept)) * (2**64 - 1))
    boilerplate = stages.boilerplate_step(cfg, work)

    def skip(part: int):
        sample = np.concatenate([np.load(k)["sample"] for k in buckets.key_files(work, part)])
        drop = set(drops["by_part"].get(part, np.zeros(0, np.int64)).tolist())
        return lambda pos: pos in drop or int(sample[pos]) > cut

    chars = 0
    for s in clean:
        for _, doc in stages.surviving(work, s["index"], skip(s["index"]), boilerplate):
            if doc.removed is not None:
                continue
            chars += len(doc.text)
            yield doc.text
            if chars >= cfg.tokenizer_sample_chars:
                return


def _tokenizer(cfg: PrepConfig, work: Path, out: Path, clean, drops) -> tuple[Path, int, str]:
    final = out / "tokenizer.model"
    if cfg.tokenizer:
        shutil.copyfile(cfg.tokenizer, final)
    elif not (work / "tokenizer.model").is_file():
        log.info("training a %s tokenizer, vocab %d", cfg.tokenizer_type, cfg.vocab_size)
        train_tokenizer(_sample_texts(cfg, work, clean, drops), work / "tokenizer.model", vocab_size=cfg.vocab_size,
                        model_type=cfg.tokenizer_type, threads=cfg.tokenizer_threads, seed=cfg.seed,
                        character_coverage=cfg.character_coverage, chat_markers=cfg.chat_tokens)
    if not cfg.tokenizer:
        shutil.copyfile(work / "tokenizer.model", final)
    vocab, sha = check_tokenizer(final)
    return final, vocab, sha
