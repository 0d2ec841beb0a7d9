"""What an lm-eval task directory given to `kiln eval --tasks` may do.

A task directory is often someone else's (a shared folder, a repository). lm-eval gives its YAML a
lot of power: `!function module.fn` imports and runs Python from the directory, a task named like a
built-in one replaces it (lm-eval only logs that), and `doc_to_text` and friends are Jinja templates.
So, in Kiln:

- `--include-path DIR`: tasks as data. Every `*.yaml` below DIR is read (confined: no links, regular
  files, at most 1 MiB and 100,000 values) and must use no YAML tag (`!function`, `class: !function`),
  and an `include:` must stay inside DIR.
- `--trusted-include-path DIR`: a directory you control; its `!function` hooks run as you.
- Either way a task, group or tag name may be defined once: a name that Kiln's tasks, lm-eval's
  catalogue or another directory also defines is refused, so asking for a built-in task always runs
  the built-in one.
- Jinja templates render in Jinja's sandbox (no attribute walks to Python internals).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.confine import escapes, read_confined
from pipeline.config import MAX_YAML_BYTES, ConfigError, KilnError, safe_yaml


def check_untrusted(root: Path) -> None:
    """ConfigError when a YAML file below `root` (an --include-path) could run code or leave `root`."""
    for path in sorted(root.glob("**/*.yaml")):  # the files lm-eval's index reads
        rel = str(path.relative_to(root))
        where = f"--include-path {root}: {rel}"
        try:
            text = read_confined(root, rel, f"--include-path {root}:", MAX_YAML_BYTES)
            cfg = safe_yaml(text, where)
        except KilnError as err:
            raise ConfigError(str(err)) from None
        except ConfigError as err:
            if "constructor for the tag" in str(err):
                raise ConfigError(f"{where}: uses a YAML tag (such as !function, which runs Python from the "
                                  "directory); only a --trusted-include-path may") from None
            raise
        included = cfg.get("include") if isinstance(cfg, dict) else None
        if included is not None:
            name = str(Path(rel).parent / included) if isinstance(included, str) else None
            if name is None or (why := escapes(root, name, regular_file=False)):
                raise ConfigError(f"{where}: include: {'is not a file name' if name is None else why}; "
                                  "an --include-path's YAML may include only files inside it")


def check_collisions(named: dict[str, set[str]]) -> None:
    """`named`: {source: names it defines}; ConfigError when two sources define the same name."""
    owner: dict[str, str] = {}
    for source, names in named.items():
        for name in sorted(names):
            if name in owner:
                raise ConfigError(f"{source}: defines task '{name}', which {owner[name]} defines too; a task "
                                  "directory may not redefine a name (rename it)")
            owner[name] = source


def sandbox_templates() -> None:
    """lm-eval renders every template through `lm_eval.utils.env`: make it Jinja's sandboxed environment."""
    from jinja2 import BaseLoader, StrictUndefined
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval import utils

    if not isinstance(utils.env, ImmutableSandboxedEnvironment):
        env = ImmutableSandboxedEnvironment(loader=BaseLoader, undefined=StrictUndefined, keep_trailing_newline=True)
        env.filters.update(utils.env.filters)
        utils.env = env
