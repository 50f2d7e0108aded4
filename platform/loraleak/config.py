"""Typed configs validated at the edge.

Every stage's settings are a frozen dataclass. `from_dict` / `load_yaml` turn user input into one,
raising `ConfigError` with one line naming the offending key for an unknown key, a wrong type, a
missing required key or a path that does not exist. Inside the library, configs are trusted.

The generic checks live here, once, for every stage: `read_yaml` refuses an empty file, a top level
that is not a mapping and a key given twice (PyYAML keeps the last one silently); `from_dict` refuses
NaN anywhere, an infinite float where the field does not say it means something (`InfFloat`), an
integer beyond int32 (torch and numpy take steps, counts and sizes as 32-bit; seeds may be 64-bit)
and counts that would size memory before anything checks them (`RESOURCE_BOUNDS`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from .errors import ConfigError

T = TypeVar("T")

INT32_MAX = 2**31 - 1
# Seeds (fields named *seed) are 64-bit, as numpy's SeedSequence and torch.manual_seed take them.
SEED_RANGE = (-(2**63), 2**64 - 1)
# Counts that size memory or work before any other check sees them (a list per identity, per image...):
# far above any real study, far below what ends in a MemoryError.
RESOURCE_BOUNDS = {"num_identities": 1_000_000, "max_identities": 1_000_000, "images_per_identity": 100_000,
                   "max_images": 100_000, "n_images": 10_000, "num_samples": 10_000, "n_boot": 1_000_000}
ALLOW_INF = "inf allowed"
# A float whose infinity means something (DP ε = .inf: clip only, no noise); every other float is finite.
InfFloat = Annotated[float, ALLOW_INF]


class ExistingPath(type(Path())):  # type: ignore[misc]
    """A path that must exist when the config is loaded (checked by `from_dict`)."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _refuse_nan(value: Any, where: str, seen: set[int] | None = None) -> None:
    """NaN anywhere in free-form settings (mappings and lists typed Any) is a ConfigError."""
    seen = set() if seen is None else seen
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{where}: NaN is not a setting")
    if isinstance(value, (dict, list, tuple)) and id(value) not in seen:  # YAML aliases share objects
        seen.add(id(value))
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            _refuse_nan(v, f"{where}.{k}" if isinstance(value, dict) else f"{where}[{k}]", seen)


def _check_int(value: int, where: str) -> int:
    name = where.rsplit(".", 1)[-1].split("[", 1)[0]
    low, high = SEED_RANGE if name.endswith("seed") else (-INT32_MAX - 1, INT32_MAX)
    high = min(high, RESOURCE_BOUNDS.get(name, high))
    if not low <= value <= high:
        limit = f"at most {high:,}" if value > high else f"at least {low:,}"
        raise ConfigError(f"{where}: {value:,} is out of range ({limit})")
    return value


# YAML 1.1 (PyYAML) reads these unquoted words as booleans.
_YAML_BOOL_WORDS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _unyaml_bool(value: Any, choices: tuple[Any, ...]) -> Any:
    """A bool where a Literal has no bool but one string choice YAML would have read as it: that string.

    `mixed_precision: no` (and `--set attack.mixed_precision=no`) reaches here as False; "no" is what was meant.
    """
    if not isinstance(value, bool) or any(c is value for c in choices):
        return value
    spelled = [c for c in choices if isinstance(c, str) and c.lower() in _YAML_BOOL_WORDS[value]]
    return spelled[0] if len(spelled) == 1 else value


def _coerce(value: Any, tp: Any, where: str, inf_ok: bool = False) -> Any:
    """`value` checked (and where YAML needs it, converted) as a `tp`, or a ConfigError naming `where`.

    The generic types first (each helper recurses into what the type holds), then the leaves."""
    origin = get_origin(tp)
    if tp is Any:
        _refuse_nan(value, where)
        return value
    if origin is Annotated:
        base, *marks = get_args(tp)
        return _coerce(value, base, where, inf_ok=ALLOW_INF in marks)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, where)
    if origin is Literal:
        return _coerce_literal(value, get_args(tp), where)
    if origin in (list, tuple):
        return _coerce_sequence(value, origin, get_args(tp), where)
    if origin is dict:
        return _coerce_mapping(value, get_args(tp), where)
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        return from_dict(tp, value, where)
    if isinstance(tp, type) and issubclass(tp, Path):
        return _coerce_path(value, tp, where)
    if tp is float:
        return _coerce_float(value, where, inf_ok)
    if tp is int:
        return _coerce_int(value, where)
    if tp is bool or tp is str:
        if not isinstance(value, tp):
            what = "true/false" if tp is bool else "a string"
            raise ConfigError(f"{where}: expected {what}, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__}")
    return value


def _coerce_union(value: Any, tp: Any, where: str) -> Any:
    """The first member type that takes `value`; None only where the union has it."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    # One member's own error says more than "is not A | B"; with several, no one of them is the right one.
    raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} is not {_type_name(tp)}")


def _coerce_literal(value: Any, choices: tuple[Any, ...], where: str) -> Any:
    value = _unyaml_bool(value, choices)
    if value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(repr(a) for a in choices)}")
    return value


def _coerce_sequence(value: Any, origin: type, args: tuple[Any, ...], where: str) -> list | tuple:
    """A list, or a tuple (of fixed length and item types, or `tuple[X, ...]`); a string is no list."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    item = args[0] if args else Any
    items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return tuple(items) if origin is tuple else items


def _coerce_mapping(value: Any, args: tuple[Any, ...], where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    kt, vt = args or (Any, Any)
    return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}


def _coerce_path(value: Any, tp: type, where: str) -> Path:
    """A path (`~` expanded) the OS can stat; an `ExistingPath` must also exist."""
    if not isinstance(value, (str, Path)):
        raise ConfigError(f"{where}: expected a path, got {type(value).__name__} {value!r}")
    if "\0" in str(value) or len(str(value)) > 4096 or any(len(part.encode()) > 255 for part in Path(value).parts):
        # What the OS refuses to stat (OSError / ValueError) is not a path, whatever the field.
        raise ConfigError(f"{where}: not a usable path (too long, or a NUL character): {str(value)[:60]!r}...")
    path = Path(value).expanduser()
    if tp is ExistingPath and not path.exists():
        raise ConfigError(f"{where}: path does not exist: {path}")
    return path


def _coerce_float(value: Any, where: str, inf_ok: bool) -> float:
    """A finite float (infinite only where the field allows it) from a number or a numeric string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # YAML reads "1e-4" (no dot) as a string; accept numeric strings for floats.
        number = None
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {type(value).__name__} {value!r}")
        value = number
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise ConfigError(f"{where}: {value} is too large for a number") from None
    if math.isnan(number) or (math.isinf(number) and not inf_ok):
        raise ConfigError(f"{where}: {value!r} is not a finite number")
    return number


def _coerce_int(value: Any, where: str) -> int:
    """An int (not a bool, not a float however whole) within its field's range (`_check_int`)."""
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (write it without a decimal point or exponent)" if isinstance(value, float) and \
            math.isfinite(value) and value.is_integer() else ""
        raise ConfigError(f"{where}: expected an integer, got {type(value).__name__} {value!r}{hint}")
    return _check_int(value, where)


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass `cls` from a mapping, validating keys and types recursively."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {unknown[0]!r} for {cls.__name__} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {name!r} for {cls.__name__}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ range checks
        raise ConfigError(f"{where}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config (paths as strings, tuples as lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(config)


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (SafeLoader keeps the last one)."""


def _construct_mapping(loader: StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    first: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` then overriding a key is meant
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            line = first.setdefault(key, key_node.start_mark.line + 1)
        except TypeError:  # an unhashable key: SafeLoader's own error says so
            continue
        if line != key_node.start_mark.line + 1:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r} (first given at line {line})",
                                                    key_node.start_mark)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document (strict: no duplicate keys), or one ConfigError line naming `where`."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's settings: a non-empty YAML mapping (`{}` for every default)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path} is empty: it sets nothing (write `{{}}` to run with every default)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings (key: value lines) at the top level, "
                          f"got a {type(data).__name__}")
    return data


def load_yaml(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Load a YAML file into config class `cls`, with optional top-level overrides."""
    data = read_yaml(path)
    if overrides:
        data = {**data, **overrides}
    return from_dict(cls, data, where=str(path))
