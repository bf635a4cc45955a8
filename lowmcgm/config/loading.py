"""Building a ``Config``: defaults -> preset TOML -> user TOML -> ``--set`` -> flags -> validation,
and writing it back (the effective config.toml, the dict kept in checkpoints and artifacts)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
import typing
from pathlib import Path
from typing import Any

from lowmcgm.config.schema import Config, all_keys, section_types
from lowmcgm.config.validation import validate
from lowmcgm.errors import UserError
from lowmcgm.limits import read_text_file


def _unknown_key(key: str, where: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    # The valid keys of the section meant (the closest match's, else the one named), else the sections.
    section = (close[0] if close else key).partition(".")[0]
    names = [k.partition(".")[2] for k in all_keys() if k.startswith(section + ".")]
    valid = (f" Valid [{section}] keys: {', '.join(names)}." if names else
             f" Valid sections: {', '.join(section_types())}.")
    return UserError(f"Unknown config key '{key}' in {where}.{hint}{valid} 'lowmcgm config-keys' explains each.")


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Convert a TOML value or a CLI string to the field's type, or raise UserError."""
    origin = typing.get_origin(typ)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(typ)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v] if value else []
        if not isinstance(value, (list, tuple)):
            raise UserError(f"Config key '{key}' takes a list, got {value!r}.")
        return tuple(_coerce(v, item_type, key) for v in value)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except ValueError:
        pass
    raise UserError(f"Config key '{key}' takes a {getattr(typ, '__name__', typ)}, got {value!r}.")


def apply_overrides(cfg: Config, overrides: dict[str, Any], where: str) -> Config:
    """Return a copy of ``cfg`` with dotted ``overrides`` applied (values typed by the field)."""
    sections = section_types()
    changed: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if section not in sections:
            raise _unknown_key(key, where)
        types = typing.get_type_hints(sections[section])
        if name not in types:
            raise _unknown_key(key, where)
        changed.setdefault(section, {})[name] = _coerce(value, types[name], key)
    for section, values in changed.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **values)})
    return cfg


def flatten_toml(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Turn ``{"train": {"lora_lr": 1e-4}}`` into ``{"train.lora_lr": 1e-4}``."""
    flat = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise _unknown_key(section, where)
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def load_toml(path: Path) -> dict[str, Any]:
    try:
        return flatten_toml(tomllib.loads(read_text_file(path, "Config file")), str(path))
    except FileNotFoundError as exc:
        raise UserError(f"Config file not found: {path}.") from exc
    except IsADirectoryError as exc:
        raise UserError(f"Config file {path} is a folder; pass a TOML file (e.g. a run's config.toml).") from exc
    except OSError as exc:
        raise UserError(f"Config file {path} cannot be read ({exc.strerror}).") from exc
    except UnicodeDecodeError as exc:  # a binary file: tomllib decodes it as UTF-8 first
        raise UserError(f"Config file {path} is not a TOML text file (it is not UTF-8 text).") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"Config file {path} is not valid TOML: {exc}.") from exc


def parse_set(items: list[str]) -> dict[str, str]:
    """Parse ``--set key=value`` items."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set takes KEY=VALUE, got '{item}' (e.g. --set train.lora_lr=1e-4).")
        out[key.strip()] = value.strip()
    return out


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``config_to_dict`` output (unknown keys are refused)."""
    return validate(apply_overrides(Config(), flatten_toml(data, "stored config"), "stored config"))


def to_toml(cfg: Config) -> str:
    """The effective configuration as TOML text (written next to every output)."""
    lines = []
    for section, values in config_to_dict(cfg).items():
        lines.append(f"[{section}]")
        for name, value in values.items():
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def resolve_config(preset: str | None, config_file: str | None, overrides: dict[str, Any],
                   flags: dict[str, Any] | None = None) -> Config:
    """Defaults -> preset -> user TOML -> ``--set`` overrides -> flags -> validate.

    Args:
        overrides: ``--set`` items, dotted key -> value.
        flags: values the command's own flags gave (``--steps 20`` as ``{"sample.steps": 20}``):
            a flag typed out beats every file and ``--set``, and problems name the flag.
    """
    from lowmcgm.presets import preset_path

    cfg = Config()
    if preset:
        path = preset_path(preset)
        cfg = apply_overrides(cfg, load_toml(path), f"preset {path.name}")
    if config_file:
        cfg = apply_overrides(cfg, load_toml(Path(config_file)), config_file)
    cfg = apply_overrides(cfg, overrides, "the command line")
    cfg = apply_overrides(cfg, flags or {}, "the command line")
    return validate(cfg, by_flag=(flags or {}).keys())
