"""Reading YAML configs, one way for every config of the toolkit (preprocessing and runs).

- :func:`read_yaml`: a YAML file as plain data (``1e-3`` without a dot reads as a float, as
  people write learning rates); a missing file or a syntax error names the file.
- :func:`parse_override` / :func:`apply_overrides`: ``a.b=value`` command-line overrides,
  values parsed as YAML, dotted keys reaching into blocks.
- :func:`resolve_path`: relative paths in a file resolve against the file's folder, those given
  on the command line against the current directory.
- :func:`format_validation_error`: a pydantic error as one :class:`ConfigError` that names each
  key path, what is allowed (with a close-match hint for unknown keys) and what was given.
- :func:`dump_yaml`: a config written back as YAML, atomically.

This module is the bottom layer of the package: it imports only ``fileio``.
"""

from __future__ import annotations

import difflib
import os
import re
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ephys_gpt.fileio import to_jsonable, write_text_atomic


class ConfigError(ValueError):
    """A configuration is invalid (the message names the file and the key path)."""


class ConfigTypeError(ConfigError, TypeError):
    """A configuration value has the wrong type."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A file or folder named in a configuration does not exist."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml_value(text: str) -> Any:
    """Parse one command-line value the way YAML would (``3`` → int, ``1e-3`` → float...)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def read_yaml(path: str | os.PathLike, what: str = "config") -> Any:
    """Read a YAML file; a missing file or a syntax error names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigFileNotFoundError(f"{what} file {path} does not exist")
    try:
        with open(path) as fh:
            return yaml.load(fh, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err


def read_yaml_mapping(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """:func:`read_yaml` of a file that must hold a mapping (an empty file is ``{}``)."""
    data = read_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigTypeError(f"{path}: expected a mapping of keys to values at the top level, "
                              f"found {type(data).__name__}")
    return data


def dump_yaml(config: dict, path: str | os.PathLike) -> Path:
    """Write ``config`` as YAML to ``path`` atomically (temporary name, then rename)."""
    text = yaml.safe_dump(to_jsonable(config), sort_keys=False, default_flow_style=None)
    return write_text_atomic(path, text)


# -- overrides and paths ----------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"trainer.max_epochs=3"`` → ``(["trainer", "max_epochs"], 3)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.path=value "
                          "(e.g. trainer.max_epochs=3)")
    key, value = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty key name in {key!r}")
    try:
        return parts, parse_yaml_value(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {err}") from err


def get_path(cfg: dict, keys: Sequence[str]) -> Any:
    """``cfg[keys[0]][keys[1]]...`` or None when a key is absent."""
    for k in keys:
        if not isinstance(cfg, dict) or k not in cfg:
            return None
        cfg = cfg[k]
    return cfg


def set_path(cfg: dict, keys: Sequence[str], value: Any, override: str) -> None:
    """Set ``cfg[keys[0]]...[keys[-1]] = value``, creating blocks; an existing non-mapping on
    the way is an error naming ``override``."""
    node = cfg
    for i, k in enumerate(keys[:-1]):
        if node.get(k) is None:
            node[k] = {}
        if not isinstance(node[k], dict):
            raise ConfigError(f"override {override!r}: {'.'.join(keys[:i + 1])!r} is "
                              f"{describe(node[k])}, not a mapping")
        node = node[k]
    node[keys[-1]] = value


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> list[tuple[list[str], Any]]:
    """Apply ``a.b=value`` overrides to ``cfg`` in place; returns what was set."""
    done = []
    for text in overrides:
        keys, value = parse_override(text)
        set_path(cfg, keys, value, text)
        done.append((keys, value))
    return done


def resolve_path(path: str, base: Path) -> str:
    """``path`` (``~`` expanded) made absolute against ``base``; symlinks kept as named."""
    p = Path(os.path.expanduser(str(path)))
    return os.path.normpath(p if p.is_absolute() else base / p)


# -- validation errors ------------------------------------------------------------------------

def describe(value: Any) -> str:
    """``repr`` of ``value`` (shortened) with its type, for messages."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def unknown_key_message(where: str, key: str, allowed: Iterable[str]) -> str:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown key {where!r}.{hint} Allowed keys: {', '.join(allowed)}"


def field_keys(model: type[BaseModel]) -> list[str]:
    """The keys a pydantic block accepts (aliases where set)."""
    return sorted((f.alias or n) for n, f in model.model_fields.items())


def submodel(model: type[BaseModel], loc: Sequence) -> type[BaseModel] | None:
    """The pydantic block found by following ``loc`` (key names) from ``model``."""
    for key in loc:
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == key), None)
        if field is None:
            return None
        ann = field.annotation
        cands = list(typing.get_args(ann)) or [ann]
        model = next((c for c in cands if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def format_validation_error(err: ValidationError, prefix: str = "",
                            model: type[BaseModel] | None = None) -> ConfigError:
    """Turn a pydantic error into one :class:`ConfigError` naming each key path."""
    lines, kinds = [], []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        path = ".".join([prefix] + loc if prefix else loc) if loc else (prefix or "<top level>")
        typ = e["type"]
        if typ == "extra_forbidden":
            sub = submodel(model, e["loc"][:-1]) if model is not None else None
            allowed = field_keys(sub) if sub is not None else []
            lines.append(unknown_key_message(path, str(e["loc"][-1]), allowed) if allowed
                         else f"unknown key {path!r}")
            kinds.append(ConfigError)
        elif typ == "missing":
            lines.append(f"required key {path!r} is missing")
            kinds.append(ConfigError)
        elif typ.endswith(("_type", "_parsing")) or typ == "is_instance_of":
            lines.append(f"key {path!r}: {e['msg'].lower()}, got {describe(e.get('input'))}")
            kinds.append(ConfigTypeError)
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"key {path!r}: {msg}, got {describe(e.get('input'))}")
            kinds.append(ConfigError)
    kind = kinds[0] if kinds else ConfigError
    return kind("; ".join(lines))
