"""Megatron-LM flag names declared on the config fields, and the argparse flags made from them.

A field that has a Megatron-LM flag says so where it is defined:

    tensor_model_parallel_size: int = flag(1, "--tensor-model-parallel-size")
    \"\"\"TP size: ...\"\"\"

`add_flags(parser, PretrainConfig)` walks the config tree and adds one argument per declared
flag: its type from the field's annotation, its help from the field's docstring (first sentence)
plus the dotted field path. Booleans get `--x` and `--no-x` (a YAML `true` can be switched off
from the command line). `flag_values(namespace)` returns what was given as dotted field ->
value, ready for `ConfigBase.apply_overrides(..., parse=False)`. Because flags live on the
fields, the CLI, its help and the YAML keys cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
from typing import Any, Callable, Literal, Optional, Union, get_args, get_origin

from megatron_navil.config.base import ConfigBase, field_docs

_NO_CONST = object()
_KEY = "megatron_flag"  # dataclasses.field metadata key


@dataclasses.dataclass(frozen=True)
class Flag:
    """A Megatron-LM command-line flag of one config field."""

    name: str
    """The flag, e.g. `--tensor-model-parallel-size`."""
    const: Any = _NO_CONST
    """Store this value when the flag is given (a flag without argument, e.g. `--bf16`)."""
    expand: Optional[Callable[[list[str]], dict[str, Any]]] = None
    """Words given -> {field of the same section: value}, for a flag that sets several fields
    (`--data-path 0.7 A 0.3 B`: Megatron-LM's weighted blend sets paths and weights)."""
    metavar: Optional[str] = None
    """How --help names the flag's argument (default: from the field's type)."""


def flag(default: Any = dataclasses.MISSING, name: str = "", **kw) -> Any:
    """A dataclass field (default `default`) settable by the Megatron-LM flag `name`.

    Keyword arguments: `const`, `expand`, `metavar` (see Flag), `default_factory`."""
    factory = kw.pop("default_factory", dataclasses.MISSING)
    spec = Flag(name, **kw)
    return dataclasses.field(default=default, default_factory=factory, metadata={_KEY: spec})


@dataclasses.dataclass(frozen=True)
class FlagField:
    """One declared flag, found in the config tree."""

    path: str
    """Dotted field path from the root config (`parallel.sequence_parallel`)."""
    type: Any
    """The field's annotation."""
    flag: Flag
    doc: str
    """The field's docstring."""


def flag_fields(cls: type[ConfigBase], prefix: str = "") -> list[FlagField]:
    """Every field with a declared flag under `cls`, in definition order."""
    out = []
    for name, tp in cls.config_fields().items():
        path = f"{prefix}{name}"
        sub = _config_class(tp)
        if sub is not None:
            out += flag_fields(sub, f"{path}.")
            continue
        owner = _owner(cls, name)
        spec = {f.name: f for f in dataclasses.fields(owner)}[name].metadata.get(_KEY)
        if spec is not None:
            out.append(FlagField(path, tp, spec, field_docs(owner).get(name, "")))
    return out


def _owner(cls: type[ConfigBase], name: str) -> type:
    """The dataclass that defines field `name` of `cls` (ModelSection takes the model's fields
    from NaViLModelConfig: its FIELDS_FROM)."""
    if name in {f.name for f in dataclasses.fields(cls)}:
        return cls
    return cls.FIELDS_FROM


def _config_class(tp: Any) -> Optional[type[ConfigBase]]:
    return tp if inspect.isclass(tp) and issubclass(tp, ConfigBase) else None


def _optional_inner(tp: Any) -> Any:
    """X for Optional[X], else tp."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_flags(parser: argparse.ArgumentParser, cls: type[ConfigBase]) -> list[FlagField]:
    """Add an argument per declared flag, grouped by top-level section; returns the flags."""
    fields = flag_fields(cls)
    groups: dict[str, Any] = {}
    for ff in fields:
        section = ff.path.split(".")[0] if "." in ff.path else "job"
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} flags")
        _add_one(groups[section], ff)
    return fields


def first_sentence(doc: str) -> str:
    """The docstring's first sentence (up to `. ` outside `e.g.`/`i.e.`), on one line."""
    text = " ".join(doc.split("\n\n")[0].split())
    m = re.search(r"(?<!e\.g)(?<!i\.e)\.\s", text)
    return text[: m.start() + 1] if m else text


def _add_one(group, ff: FlagField) -> None:
    spec, tp = ff.flag, _optional_inner(ff.type)
    what = first_sentence(ff.doc)
    if spec.const is not _NO_CONST:
        what += f" This flag sets {spec.const}."
    kw: dict[str, Any] = dict(dest=ff.path, default=None)
    kw["help"] = f"{what} [{ff.path}]".replace("%", "%%")
    if spec.const is not _NO_CONST:
        kw.update(action="store_const", const=spec.const)
    elif spec.expand is not None:
        kw.update(nargs="+", metavar=spec.metavar or "WORD")
    elif tp is bool:
        kw.update(action=argparse.BooleanOptionalAction)
    elif get_origin(tp) is tuple:
        elem = get_args(tp)[0] if get_args(tp) else str
        kw.update(nargs="+", type=elem, metavar=spec.metavar or elem.__name__.upper())
    elif get_origin(tp) is Literal:
        choices = list(get_args(tp))
        kw.update(type=type(choices[0]), choices=choices)
    elif tp in (int, float, str):
        kw.update(type=tp, metavar=spec.metavar or tp.__name__.upper())
    else:
        raise TypeError(f"{ff.path}: no command-line form for a field of type {ff.type}")
    group.add_argument(spec.name, **kw)


def flag_values(namespace: argparse.Namespace, fields: list[FlagField]) -> dict[str, Any]:
    """The flags given on the command line as {dotted field: value} (tuples for list flags)."""
    out: dict[str, Any] = {}
    for ff in fields:
        value = getattr(namespace, ff.path)
        if value is None:
            continue
        if ff.flag.expand is not None:
            section = ff.path.rpartition(".")[0]
            for name, v in ff.flag.expand(value).items():
                out[f"{section}.{name}" if section else name] = v
        else:
            out[ff.path] = tuple(value) if isinstance(value, list) else value
    return out


def field_type(cls: type[ConfigBase], dotted: str) -> Any:
    """The annotation of the field at `dotted` under `cls` (KeyError if there is none)."""
    *sections, last = dotted.split(".")
    for name in sections:
        cls = _config_class(cls.config_fields()[name])
        if cls is None:
            raise KeyError(dotted)
    return cls.config_fields()[last]


__all__ = [
    "Flag",
    "FlagField",
    "flag",
    "flag_fields",
    "add_flags",
    "flag_values",
    "field_type",
]
