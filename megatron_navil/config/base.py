"""Typed dataclass configs: dict/YAML round trip, dotted overrides, field docstrings.

Every config class is a dataclass whose fields each carry a docstring (a string literal right
under the field, the torchtitan/litgpt convention). `field_docs` reads them from the source so
CLI help and YAML comments come from one place; a test checks that no field lacks one.
Validation lives next to the fields in each class's `validate()`. Megatron-LM flag names are
declared on the fields too (config/flags.py). A field that was removed stays in its class's
`MOVED` table, so setting it is refused in one line that names its new home.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, ClassVar, Literal, Optional, Union, get_args, get_origin

from megatron_navil.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot work; the message names the field and what to do.

    `same_on_every_rank=True` (see UserError) says the error follows from what all ranks share
    (the command line, the world size), so a CLI reports it once, from rank 0."""


@dataclasses.dataclass
class ConfigBase:
    """Base for all config dataclasses."""

    MOVED: ClassVar[dict[str, str]] = {}
    """Removed field -> what to set instead (e.g. "set training.seq_length (--seq-length)")."""
    FIELDS_FROM: ClassVar[Optional[type]] = None
    """A section whose settable fields are another class's (ModelSection: NaViLModelConfig)."""

    def validate(self) -> None:
        """Check cross-field constraints; subclasses extend. Raises ConfigError."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value.validate()

    @classmethod
    def config_fields(cls) -> dict[str, Any]:
        """Field name -> annotation: the keys YAML, flags and dotted overrides may set here."""
        return _field_types(cls)

    # ------------------------------------------------------------------ dict round trip
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: str = "") -> "ConfigBase":
        if not isinstance(data, dict):
            raise ConfigError(
                f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}"
            )
        hints = cls.config_fields()
        for key in data:
            if key in cls.MOVED:
                raise moved_error(_join(path, key), cls.MOVED[key])
        unknown = sorted(set(data) - set(hints))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(_join(path, k) for k in unknown)}; "
                f"valid keys under {path or cls.__name__}: {', '.join(sorted(hints))}"
            )
        kwargs = {k: _coerce(hints[k], v, _join(path, k)) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "ConfigBase":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ dotted overrides
    def apply_overrides(self, overrides: dict[str, Any], *, parse: bool = True) -> "ConfigBase":
        """Return a copy with dotted keys set, e.g. {"llm.num_layers": 4}, in order. With `parse`,
        string values (from the command line) are read as YAML scalars first; every value is
        type-checked against its field."""
        cfg = self
        for dotted, value in overrides.items():
            if parse and isinstance(value, str):
                value = parse_scalar(value)
            cfg = cfg.set_path(dotted.split("."), value)
        return cfg

    def set_path(self, parts: list[str], value: Any, where: str = "") -> "ConfigBase":
        """A copy with the field at `parts` (a dotted path split) set to `value`; `where` is this
        section's own path, for messages. Sections that store fields differently override it."""
        name, fields = parts[0], self.config_fields()
        here = _join(where, name)
        if name not in fields:
            if name in self.MOVED:
                raise moved_error(here, self.MOVED[name])
            raise ConfigError(f"{here}: no such field; valid here: {', '.join(sorted(fields))}")
        if len(parts) == 1:
            return dataclasses.replace(self, **{name: _coerce(fields[name], value, here)})
        child = getattr(self, name)
        if not isinstance(child, ConfigBase):
            raise ConfigError(f"{_join(where, '.'.join(parts))}: {here} is not a config section")
        return dataclasses.replace(self, **{name: child.set_path(parts[1:], value, here)})


def moved_error(path: str, instead: str) -> ConfigError:
    """The one line a removed field gets, e.g. `data.seq_length moved: set training.seq_length
    (--seq-length)`."""
    return ConfigError(f"{path} moved: {instead}")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# YAML 1.1's float rule with two YAML 1.2 relaxations: the exponent's sign is optional and a
# mantissa without a dot is allowed when an exponent follows (`4e-3`, `1.0e5`), so learning rates
# written the usual way are numbers, not strings. A dot or an exponent is still required, so
# integers stay integers.
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def yaml_loader():
    """A SafeLoader where only true/false are booleans (YAML 1.2): `off`, `no`, `on` stay strings,
    so `logging.progress_bar=off` means what it says; and `4e-3` is a float (see _FLOAT)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    dropped = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag not in dropped]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool",
        re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
        list("tTfF"),
    )
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader


def load_yaml(text: str):
    import yaml

    return yaml.load(text, Loader=yaml_loader())


def parse_scalar(value: str):
    """A command-line value as YAML (numbers, lists, true/false), '' stays ''."""
    return load_yaml(value) if value != "" else ""


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Check/convert `value` against the annotation `tp` (the subset of typing we use)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(get_args(tp))}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = get_args(tp)
        elem = args[0] if args else Any
        return tuple(_coerce(elem, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if inspect.isclass(tp) and issubclass(tp, ConfigBase):
        if isinstance(value, tp):
            return value
        return tp.from_dict(value, path=path)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body (inherited ones too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is ConfigBase:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(nxt.value.value)
    return docs
