"""Typed recipe configs: dataclasses loaded from YAML, overridden by dotted `key=value` arguments.

Precedence is defaults < YAML < command line. Every problem (unknown key, wrong type, value out of
range, unknown choice, a cross-field conflict) is collected and reported in one `ConfigError` that
names the key, where the value came from and, for unknown keys, the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from finetune.core.errors import ConfigError, UserError

T = TypeVar("T")
COMMAND_LINE = "command line"


def option(default: Any, help: str, **bounds: float) -> Any:
    """A config field with a one-line doc and optional numeric bounds (ge, gt, le, lt)."""
    unknown = set(bounds) - {"ge", "gt", "le", "lt"}
    if unknown:
        raise TypeError(f"unknown bounds {sorted(unknown)}")
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


# --------------------------------------------------------------------------------------------
# Types: describing and coercing values
# --------------------------------------------------------------------------------------------


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def describe_type(tp: Any) -> str:
    """Human-readable type, e.g. `int | None`, `one of: linear, cosine`."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(describe_type(a) for a in get_args(tp))
    if origin is Literal:
        return "{" + ", ".join(str(a) for a in get_args(tp)) + "}"
    if origin is list:
        (item,) = get_args(tp)
        return f"list[{describe_type(item)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any) -> Any:
    """Convert `value` (from YAML or the command line) to type `tp`; ValueError says why not."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        members = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in members:
                return None
        for member in members:
            if member is type(None):
                continue
            try:
                return coerce(value, member)
            except ValueError:
                continue
        raise ValueError(f"expected {describe_type(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value is False and "no" in choices:
            return "no"  # a YAML file's unquoted `no` (YAML 1.1 reads it as false)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ValueError(f"expected one of {', '.join(map(str, choices))}; got {value!r}")
    if origin is list:
        (item_type,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return [coerce(v, item_type) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"expected a string, got {value!r}")
    raise TypeError(f"unsupported config type {tp!r}")


def _check_bounds(value: Any, bounds: dict[str, float]) -> None:
    if value is None or isinstance(value, str) or not bounds:
        return
    tests = {
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for name, bound in bounds.items():
        ok, symbol = tests[name]
        if not ok(value, bound):
            raise ValueError(f"must be {symbol} {bound:g}, got {value!r}")


# --------------------------------------------------------------------------------------------
# Schema: the dotted keys of a config dataclass
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One leaf of the config tree."""

    dotted: str
    type: Any
    default: Any
    help: str
    bounds: dict[str, float]


def schema_keys(schema: type) -> dict[str, Key]:
    """All leaf keys of a (nested) config dataclass, by dotted name, in declaration order."""
    keys: dict[str, Key] = {}
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        tp = hints[f.name]
        if is_dataclass(tp):
            for sub in schema_keys(tp).values():
                keys[f"{f.name}.{sub.dotted}"] = dataclasses.replace(sub, dotted=f"{f.name}.{sub.dotted}")
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            raise TypeError(f"config field {schema.__name__}.{f.name} needs a default")
        keys[f.name] = Key(f.name, tp, default, f.metadata.get("help", ""), f.metadata.get("bounds", {}))
    return keys


def _groups(schema: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(schema)
    out = set()
    for f in fields(schema):
        if is_dataclass(hints[f.name]):
            out.add(prefix + f.name)
            out |= _groups(hints[f.name], prefix + f.name + ".")
    return out


def closest_key(key: str, valid: list[str]) -> str | None:
    """The valid key a misspelt one most likely meant, if any is close."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        return match[0]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in valid if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return same_leaf[0]
    by_leaf = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in valid], n=1, cutoff=0.75)
    if by_leaf:
        return next(k for k in valid if k.rsplit(".", 1)[-1] == by_leaf[0])
    return None


def flatten(mapping: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items = []
    for name, value in mapping.items():
        dotted = f"{prefix}{name}"
        if isinstance(value, dict):
            items += flatten(value, dotted + ".")  # an empty group sets nothing
        else:
            items.append((dotted, value))
    return items


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping with yaml.safe_load; a missing or malformed file is a UserError."""
    if not path.is_file():
        raise UserError(f"config file not found: {path}. Pass an existing YAML file with --config.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of config groups, got {type(data).__name__}")
    return data


DRY_RUN = "--dry-run"


@dataclass
class ParsedArgs:
    config_path: Path | None
    overrides: list[tuple[str, str]]
    want_help: bool


def parse_argv(argv: list[str]) -> ParsedArgs:
    """Split `--config PATH`, `--help` and `key=value` arguments."""
    config_path, overrides, want_help, problems = None, [], False, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            want_help = True
        elif arg == DRY_RUN:
            pass  # the recipe's business: see `finetune.plan.dry_run`
        elif arg == "--config":
            if i + 1 >= len(argv):
                problems.append("--config needs a path: --config recipes/configs/classify/default.yaml")
            else:
                config_path = Path(argv[i + 1])
                i += 1
        elif arg.startswith("--config="):
            config_path = Path(arg.split("=", 1)[1])
        elif "=" in arg:
            key, value = arg.lstrip("-").split("=", 1)
            overrides.append((key, value))
        else:
            problems.append(f"argument {arg!r} ({COMMAND_LINE}): expected key=value, e.g. train.lr=3e-5")
        i += 1
    if problems:
        raise ConfigError(problems)
    return ParsedArgs(config_path, overrides, want_help)


def build_config(schema: type[T], sources: list[tuple[str, dict[str, Any]]]) -> T:
    """Build `schema` from defaults updated by each (source name, flat or nested mapping) in order."""
    keys = schema_keys(schema)
    groups = _groups(schema)
    valid = list(keys)
    values: dict[str, Any] = {k: key.default for k, key in keys.items()}
    problems: list[str] = []
    for source, mapping in sources:
        for dotted, raw in flatten(mapping):
            if dotted in groups:
                problems.append(f"{dotted} ({source}): is a group of keys, not a value; set e.g. {dotted}.<key>")
                continue
            if dotted not in keys:
                hint = closest_key(dotted, valid)
                suggestion = f"; did you mean `{hint}`?" if hint else ""
                problems.append(f"{dotted} ({source}): unknown key{suggestion}")
                continue
            key = keys[dotted]
            if source == COMMAND_LINE and isinstance(raw, str):
                raw = _parse_cli_value(raw, key.type)
            try:
                value = coerce(raw, key.type)
                _check_bounds(value, key.bounds)
            except ValueError as err:
                problems.append(f"{dotted} ({source}): {err}")
                continue
            values[dotted] = value
    if problems:
        raise ConfigError(problems)
    cfg = _instantiate(schema, values)
    cross = cfg.check() if hasattr(cfg, "check") else []
    if cross:
        raise ConfigError(cross)
    return cfg


def _is_string_choice(tp: Any) -> bool:
    return tp is str or (get_origin(tp) is Literal and all(isinstance(c, str) for c in get_args(tp)))


def _parse_cli_value(raw: str, tp: Any) -> Any:
    """Command-line values are strings; read them as YAML scalars or lists except for plain strings."""
    members = [m for m in get_args(tp) if m is not type(None)] if _is_optional(tp) else [tp]
    if len(members) == 1 and _is_string_choice(members[0]):
        return raw  # YAML would read on/off/yes/no as booleans (null is read by coerce)
    try:
        return yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError:
        return raw


def _instantiate(schema: type[T], values: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for f in fields(schema):
        tp = hints[f.name]
        if is_dataclass(tp):
            kwargs[f.name] = _instantiate(tp, values, prefix + f.name + ".")
        else:
            kwargs[f.name] = values[prefix + f.name]
    return schema(**kwargs)


def load_config(schema: type[T], argv: list[str], default_path: Path | None = None, prog: str = "") -> T:
    """Parse argv (`--config PATH`, `key=value`..., `--help`) into a validated `schema` instance.

    Without --config, `default_path` is the YAML layer. --help prints every key and exits 0.
    """
    args = parse_argv(argv)
    if args.want_help:
        print(format_help(schema, prog=prog, default_path=default_path))
        raise SystemExit(0)
    sources: list[tuple[str, dict]] = []
    path = args.config_path or default_path
    if path is not None:
        sources.append((str(path), read_yaml(Path(path))))
    sources.append((COMMAND_LINE, {k: v for k, v in args.overrides}))
    return build_config(schema, sources)


def format_help(schema: type, prog: str = "", default_path: Path | None = None) -> str:
    """Every key with its type, default and doc, grouped."""
    lines = [f"usage: accelerate launch {prog or 'RECIPE'} [--config PATH] [--dry-run] [key=value ...]", ""]
    if default_path:
        lines.append(f"Without --config the recipe reads {default_path}.")
    lines.append("Precedence: defaults < YAML file < command-line key=value.")
    lines.append(
        f"{DRY_RUN}: check everything and print the data, batches, optimizer steps, parameters and an estimate of "
        "peak memory per process, without loading weights, training or writing anything."
    )
    hints = typing.get_type_hints(schema)
    for f in fields(schema):
        group = hints[f.name]
        if not is_dataclass(group):
            continue
        doc = (group.__doc__ or "").strip().splitlines()[0] if group.__doc__ else ""
        lines += ["", f"{f.name}: {doc}"]
        for key in schema_keys(group).values():
            default = "null" if key.default is None else key.default
            lines.append(f"  {f.name}.{key.dotted}  ({describe_type(key.type)}, default: {default})")
            lines.append(f"      {key.help}")
    return "\n".join(lines)


def config_to_dict(cfg: Any) -> dict:
    """The config as plain nested dicts, ready for yaml.safe_dump."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path, header: str = "") -> None:
    """Write the resolved config as YAML; `header` becomes leading comment lines."""
    text = "".join(f"# {line}\n" for line in header.splitlines())
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
