"""`kiln verify`: every byte of prepared corpora hashed against their manifests."""

from __future__ import annotations

from pipeline.commands.common import add_common_options

NAME = "verify"
HELP = ("Hash every byte of prepared corpora against their manifests (training checks only sizes, headers and "
        "fingerprints at start-up).")
EXAMPLE = "kiln verify data/prepped data/code --threads 8"


def add_arguments(p) -> None:
    add_common_options(p, config=False)
    p.add_argument("data", nargs="+", metavar="DATA", help="`kiln prep` output directories")
    p.add_argument("--threads", type=int, default=4, help="shards hashed at once")


def run(args) -> dict:
    """Every shard's sha256 against its manifest, several shards at a time."""
    import time

    from pipeline.console import log
    from pipeline.data.corpus import PreparedCorpus

    t0, total, shards = time.perf_counter(), 0, 0
    for path in args.data:
        corpus = PreparedCorpus(path, verify=False)
        total += corpus.verify_full(threads=args.threads)
        shards += len(corpus.manifest["shards"])
        log.info("%s: %d shards match the manifest", path, len(corpus.manifest["shards"]))
    seconds = time.perf_counter() - t0
    return {"corpora": len(args.data), "shards": shards, "bytes": total, "seconds": round(seconds, 2),
            "gb_per_s": round(total / 1e9 / max(seconds, 1e-9), 3), "ok": True}
