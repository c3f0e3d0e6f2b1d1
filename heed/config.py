"""Typed configuration: frozen dataclasses whose defaults run on a 2-core CPU.

Every field can be overridden, in increasing order of precedence, by a TOML file (a table named
after the section, e.g. ``[serve]``), by an environment variable ``HEED_<SECTION>_<FIELD>``
(e.g. ``HEED_SERVE_HTTP_PORT=9000``), and by a command-line flag ``--field-name``. An unknown TOML
key is an error; a ``HEED_*`` variable that names no setting is ignored with a warning.
Each field's ``metadata["help"]`` is its one-line help string; the CLI is generated from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

log = logging.getLogger(__name__)

# The sections ``load`` is called with (``HEED_<SECTION>_<FIELD>``; keep this list up to date), and
# the ``HEED_*`` variables read directly rather than as a setting. Neither is reported as a misspelling.
SECTIONS = ("serve", "trainer", "sft", "rm", "ppo", "kto", "simulate")
OTHER_VARIABLES = frozenset(
    {
        "HEED_API_KEYS",  # serving/auth.py
        "HEED_ADMIN_KEYS",  # serving/app.py
        "HEED_ADMIN_KEY",  # heed rollout / heed registry (heed/operations.py)
        "HEED_URL",  # heed/operations.py
        "HEED_EVENT_LOG",  # heed.eventlog.log_location: serve and trainer alike
        "HEED_REGISTRY",  # heed.datadir.registry_location: serve, trainer and registry alike
        "HEED_CACHE_DIR",  # default_cache_dir
        "HEED_RUN_EXPERIMENT",
        "HEED_TEST_CHROMIUM",  # the web page tests
        "HEED_TEST_APP_MINIATURE",  # the opt-in app-shaped experiment in miniature
    }
)
_warned: set[str] = set()


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a default and a help string (the CLI flag's help)."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def default_cache_dir() -> Path:
    """Where prepared models and other build products live (``$HEED_CACHE_DIR`` or XDG)."""
    if env := os.environ.get("HEED_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "heed"


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(the scalar type, whether None is allowed) for ``X`` or ``X | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(value: Any, tp: Any, name: str) -> Any:
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value == ""):
        if optional:
            return None
        raise ValueError(f"{name}: a value is required")
    origin = typing.get_origin(base)
    if origin is tuple:
        (item,) = typing.get_args(base)[:1]
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(_convert(v.strip() if isinstance(v, str) else v, item, name) for v in items if v != "")
    if origin is typing.Literal:  # one of named choices: given as a string anywhere
        choices = typing.get_args(base)
        if value not in choices:
            raise ValueError(f"{name}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if base is bool:
        return value if isinstance(value, bool) else _parse_bool(str(value))
    if base is Path:
        return Path(value).expanduser()
    try:
        return base(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read {value!r} as {base.__name__}") from exc


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of the config dataclass ``cls`` (default: not given)."""
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse %-formats help
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(base) is typing.Literal:
            choices = typing.get_args(base)
            parser.add_argument(flag, dest=f.name, default=None, choices=choices, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def load(
    cls: type[C],
    section: str,
    args: argparse.Namespace | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> C:
    """Build ``cls`` from defaults, then the TOML file, the environment (``env``, else os.environ)
    and the parsed flags."""
    hints = _field_types(cls)
    values: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if config_file is not None:
        with open(config_file, "rb") as fh:
            table = tomllib.load(fh).get(section, {})
        unknown = set(table) - names
        if unknown:
            raise ValueError(f"{config_file}: unknown keys in [{section}]: {', '.join(sorted(unknown))}")
        values.update(table)
    prefix, environ = f"HEED_{section.upper()}_", os.environ if env is None else env
    _warn_unknown_variables(environ, section, names)
    for name in names:
        given_env = environ.get(prefix + name.upper())
        if given_env is not None:
            values[name] = given_env
    if args is not None:
        for name in names:
            given = getattr(args, name, None)
            if given is not None:
                values[name] = given
    converted = {name: _convert(value, hints[name], name) for name, value in values.items()}
    return cls(**converted)


def _warn_unknown_variables(environ: Mapping[str, str], section: str, names: set[str]) -> None:
    """Warn once per variable about a ``HEED_*`` variable that looks meant for ``section`` but
    names none of its fields (a misspelled TOML key is an error; a variable cannot be, since the
    environment is shared with other sections and other programs)."""
    prefix = f"HEED_{section.upper()}_"
    settings = sorted(name.upper() for name in names)
    others = [f"HEED_{s.upper()}_" for s in SECTIONS if s != section]
    for variable in environ:
        if not variable.startswith("HEED_") or variable in OTHER_VARIABLES or variable in _warned:
            continue
        # Another section's variables are its own, a longer section's that starts like this one too.
        owner = max((p for p in [prefix, *others] if variable.startswith(p)), key=len, default=None)
        if owner is not None and owner != prefix:
            continue
        if owner == prefix:
            rest = variable.removeprefix(prefix)
            if rest.lower() in names:
                continue
            # compared without the prefix they all share, which would make anything look close
            close = [prefix + match for match in difflib.get_close_matches(rest, settings, n=1)]
        else:  # a prefix that is no section (HEED_SERV_HTTP_PORT): report only a near miss
            close = difflib.get_close_matches(variable, [prefix + s for s in settings], n=1, cutoff=0.85)
            if not close:
                continue
        _warned.add(variable)
        hint = f"; did you mean {close[0]}?" if close else ""
        log.warning("ignoring %s: [%s] has no such setting%s", variable, section, hint)
