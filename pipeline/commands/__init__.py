"""The `kiln` subcommands, one module each. A command module has

    NAME                  the subcommand: `kiln NAME`
    HELP                  one line, for `kiln --help` and its own --help (DESCRIPTION, if set, replaces it there)
    EXAMPLE               a whole command line, shown under `example:`
    add_arguments(parser) its flags, starting with add_common_options (--config/--set only if it reads one)
    run(args) -> dict     the work; the dict is the --json summary. ConfigError exits 2, KilnError 1.

Heavy imports happen inside run, so `kiln --help` stays fast and a broken optional stage cannot break
the others. pipeline/cli.py is the table of these modules; common.py holds what several of them share
(config loading, the --out lock, the tracker, a stage's MLflow run).
"""
