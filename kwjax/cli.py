"""What the scripts share: checking `--config.KEY=VALUE` overrides before absl parses them, and
writing down the command line a result came from.

ml_collections reports a mistyped key (`--config.dpo.bta=0.2`) as an AttributeError traceback from
inside its flag parser. The scripts call `check_overrides(argv)` first, so the user gets one line
naming the unknown field and the closest valid names, and nothing runs.
"""

from __future__ import annotations

import difflib
import runpy
import shlex
import sys
from pathlib import Path


def field_names(config, prefix: str = "") -> list[str]:
    """Every dotted field name of a ConfigDict, sections included (e.g. `dpo`, `dpo.beta`)."""
    out = []
    for key in config.keys():
        name = f"{prefix}{key}"
        out.append(name)
        value = config[key]
        if hasattr(value, "keys") and hasattr(value, "to_dict"):
            out += field_names(value, name + ".")
    return out


def _config_path(argv: list[str], flag: str, default: str | None) -> str | None:
    path = default
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            path = arg.split("=", 1)[1]
        elif arg == f"--{flag}" and i + 1 < len(argv):
            path = argv[i + 1]
    return path


def unknown_override(argv: list[str], config, flag: str = "config") -> str | None:
    """The error line for the first override naming a field `config` lacks, or None if all exist."""
    names = field_names(config)
    for arg in argv:
        if not arg.startswith(f"--{flag}."):
            continue
        key = arg[len(flag) + 3:].split("=", 1)[0]
        if key in names:
            continue
        parts = key.split(".")
        known = next((".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if ".".join(parts[:i]) in names),
                     None)
        siblings = [n for n in names if n.count(".") == key.count(".") and
                    (known is None or n.startswith(known + "."))]
        close = difflib.get_close_matches(key, siblings, n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(close)}" if close else (f"; fields of {known}: {', '.join(siblings[:12])}"
                                                                if known else "")
        return f"error: --{flag}.{key}: the config has no field {key!r}{hint}"
    return None


def check_overrides(argv: list[str], flag: str = "config", default: str | None = None) -> None:
    """Exits with status 2 and one line on stderr when an override names an unknown config field."""
    path = _config_path(argv, flag, default)
    if not path or not any(a.startswith(f"--{flag}.") for a in argv):
        return
    file = path.split(":", 1)[0]  # ml_collections allows FILE:ARG
    if not Path(file).is_file():
        return  # ml_collections reports a missing file itself
    config = runpy.run_path(file)["get_config"]()
    message = unknown_override(argv, config, flag)
    if message:
        print(message, file=sys.stderr)
        sys.exit(2)


def shell_word(arg: str) -> str:
    """`arg` as a shell would need it typed: bare, else in double quotes where that is safe (a tuple
    override such as ('sft','dpo') reads as typed), else shlex's single quotes."""
    if shlex.quote(arg) == arg:
        return arg
    return f'"{arg}"' if not any(c in arg for c in '"$`\\!') else shlex.quote(arg)


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a run, pasteable into a shell: `python SCRIPT ARGS...`."""
    return " ".join(["python", script, *map(shell_word, argv)])
