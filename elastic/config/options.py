"""Options are config dataclass fields: `option(...)` puts the help text, choices and CLI spelling beside
the default, and `add_cli_options` turns a section's fields into argparse flags. So an option is written
once, and the CLI, `LLM(**kwargs)` and the config tree cannot drift apart.

This module stays import-light (no torch): `elastic --help` must be instant.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any, Callable

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10, "m": 10**6, "mb": 10**6, "mi": 2**20,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30, "t": 10**12, "tb": 10**12, "ti": 2**40,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '1e9' style byte counts."""
    m = _SIZE.match(text)
    if not m or m.group(2) is None and not m.group(1):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GiB, 512MiB, 1000000000)")
    unit = (m.group(2) or "").lower()
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"unknown unit in {text!r}")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_tokens(text: str) -> int:
    """Token counts like 4096, 32k, 1M."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 4096, 32k)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]


def option(default: Any, help: str, *, choices: tuple[Any, ...] | None = None,
           parse: Callable[[str], Any] | None = None, flags: tuple[str, ...] = (),
           negative_flag: str | None = None, metavar: str | None = None) -> Any:
    """A config field that is also a user option (CLI flag and `LLM` keyword).

    flags: the CLI spellings (default: `--field-name`); parse: turns the CLI text into the value (default:
    from the field's type); negative_flag: for a boolean defaulting to True, the flag that turns it off.
    """
    meta = {"help": help, "choices": choices, "parse": parse, "flags": flags, "negative_flag": negative_flag,
            "metavar": metavar}
    return dataclasses.field(default=default, metadata={"option": meta})


def option_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a config section that are user options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if "option" in f.metadata]


def option_names(*sections: type) -> set[str]:
    return {f.name for cls in sections for f in option_fields(cls)}


_SCALARS: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str}


def _scalar_type(f: dataclasses.Field) -> Callable[[str], Any]:
    # Annotations are strings here (`from __future__ import annotations`): "int | None" -> int.
    base = str(f.type).replace(" ", "").split("|")[0]
    return _SCALARS.get(base, str)


def add_cli_options(parser: argparse.ArgumentParser | Any, cls: type, title: str | None = None) -> None:
    """Add one flag per option field of `cls` (into an argument group titled `title`)."""
    group = parser.add_argument_group(title) if title else parser
    for f in option_fields(cls):
        meta = f.metadata["option"]
        flags = meta["flags"] or ("--" + f.name.replace("_", "-"),)
        if f.default is False:
            group.add_argument(*flags, dest=f.name, action="store_true", help=meta["help"])
        elif f.default is True:
            flag = meta["negative_flag"] or "--no-" + f.name.replace("_", "-")
            group.add_argument(flag, dest=f.name, action="store_false", help=meta["help"])
        elif str(f.type).replace(" ", "") == "bool|None":  # unset: decided from the rest of the config
            group.add_argument(*flags, dest=f.name, action="store_const", const=True, default=None, help=meta["help"])
            negative = meta["negative_flag"] or "--no-" + f.name.replace("_", "-")
            group.add_argument(negative, dest=f.name, action="store_const", const=False, help=f"turn {flags[0]} off")
        else:
            group.add_argument(*flags, dest=f.name, default=f.default, type=meta["parse"] or _scalar_type(f),
                               choices=meta["choices"], metavar=meta["metavar"], help=meta["help"])


def cli_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of `cls`'s options in parsed CLI arguments."""
    return {f.name: getattr(args, f.name) for f in option_fields(cls)}


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def choices_of(cls: type, name: str) -> tuple[Any, ...]:
    """The allowed values declared on an option (so validation and the CLI share one list)."""
    return next(f for f in dataclasses.fields(cls) if f.name == name).metadata["option"]["choices"]
