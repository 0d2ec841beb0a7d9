"""`kiln` — the command line: the table of subcommands (pipeline/commands/, one module each) and main().

Every subcommand takes `--config FILE`, repeated `--set key=value` and `--json`
(one JSON summary object as the last stdout line). Exit codes: 0 ok, 2 usage or
config error, 1 runtime failure; errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from pipeline.commands import (
    demo,
    distill,
    eval,
    export,
    fetch,
    generate,
    launch,
    lineage,
    plan,
    plot,
    prep,
    prune,
    quantize,
    register,
    sft,
    track,
    train,
    verify,
)
from pipeline.config import ConfigError, KilnError, clip, first_line
from pipeline.credentials import redact

# `kiln --help` lists them in this order; each module owns its arguments and its run (pipeline/commands/)
COMMANDS = [prep, train, verify, export, quantize, distill, prune, sft, eval, generate, register, fetch, lineage, plot,
            track, plan, launch, demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Raw text -> cleaned shards -> trained GPT -> quantized/distilled -> registered in MLflow.",
        epilog="Run `kiln COMMAND --help` for each command's options and an example.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.NAME, help=command.HELP, description=getattr(command, "DESCRIPTION", command.HELP),
                           epilog=f"example:\n  {command.EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=command.run)
        command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:  # `kiln ...` or `python -m pipeline.cli`: this process ends now. Its objects are frozen so
        gc.freeze()  # that interpreter teardown skips a full collection over torch's and DeepSpeed's (~1.5 s CPU)
    return code


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # usage errors exit 2 here
    from pipeline.console import log, setup_logging

    setup_logging(args.verbose)
    prog = f"kiln {args.command}" + (f" {args.launcher}" if args.command == "launch" else "")
    try:
        result = args.func(args)
    except ConfigError as err:
        _error(prog, str(err))
        return 2
    except KilnError as err:
        _error(prog, str(err))
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an unexpected failure: still one line, traceback with -v
        if args.verbose:
            log.exception("unexpected failure")
        _error(prog, f"{type(err).__name__}: {first_line(err)}")
        return 1
    if args.json and os.environ.get("RANK", "0") == "0":  # one summary per job, not one per rank
        print(redact(json.dumps(result if isinstance(result, dict) else {"result": result}, default=str)))
    return 0


MAX_ERROR_LINES = 20  # a config error prints one line per problem; a flood of them is cut


def _error(prog: str, text: str) -> None:
    """Error lines on stderr: credentials redacted, each line clipped, at most MAX_ERROR_LINES."""
    lines = redact(text).splitlines() or [""]
    shown = [f"{prog}: error: {clip(line)}" for line in lines[:MAX_ERROR_LINES]]
    if len(lines) > MAX_ERROR_LINES:
        shown.append(f"{prog}: error: … and {len(lines) - MAX_ERROR_LINES} more")
    print("\n".join(shown), file=sys.stderr)
    _tell_torchrun("\n".join(shown))


def _tell_torchrun(message: str) -> None:
    """Under torchrun (`torchrun ... kiln train`), also write the error lines where torchrun looks for a worker's
    error (TORCHELASTIC_ERROR_FILE): its closing "Root Cause" block then shows them in place of "To enable
    traceback see ...", at the end of its own traceback. (`kiln launch` refuses such configs before any worker.)"""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    extra = {"py_callstack": message, "timestamp": str(int(time.time()))}
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": message, "extraInfo": extra}}, f)
    except OSError:
        pass  # the error is on stderr already


if __name__ == "__main__":
    sys.exit(main())
