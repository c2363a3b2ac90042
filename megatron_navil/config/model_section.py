"""The run config's model section: a flavor, and the model fields set on top of it.

    model:
      flavor: navil-2b          # every field not set below keeps this flavor's value
      llm: {num_layers: 8}      # NaViLModelConfig's names and nesting, each value type-checked
      max_dynamic_patch: 4096

The section keeps only what was set (`explicit`: dotted path -> typed value), never a copy of
the flavor's values: changing the flavor (YAML, `--model`, `model.flavor=...`) changes every
default and keeps what was set, and the job can tell which fields the user chose (the model's
vocabulary follows the tokenizer unless llm.vocab_size / llm.first_special_token_id were set).
`resolve()` builds the NaViLModelConfig. `model.llm.num_layers=8` on the command line,
`--num-layers 8` and `apply_overrides({"model.llm.num_layers": 8})` all land here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from megatron_navil.config.base import ConfigBase, ConfigError, _coerce, _join, moved_error
from megatron_navil.config.flags import flag
from megatron_navil.config.flavors import FLAVORS, get_flavor
from megatron_navil.config.model import NaViLModelConfig


@dataclass
class ModelSection(ConfigBase):
    """Which model to build: a named flavor, and model fields set on top of it."""

    FIELDS_FROM: ClassVar[type] = NaViLModelConfig
    MOVED: ClassVar[dict[str, str]] = {
        "overrides": "write the fields under model: as NaViLModelConfig nests them, e.g. "
        "model: {llm: {num_layers: 8}} (model.llm.num_layers=8 on the command line)"
    }

    flavor: str = flag("debug-internlm2", "--model", metavar="FLAVOR")
    """A named flavor (megatron_navil.config.FLAVORS); fields not set here keep its values."""
    explicit: dict[str, Any] = field(default_factory=dict)
    """Model fields set on top of the flavor: dotted path (`llm.num_layers`) -> value. YAML and
    to_dict() write them nested, with NaViLModelConfig's names (`llm: {num_layers: 8}`)."""

    @classmethod
    def config_fields(cls) -> dict[str, Any]:
        return {"flavor": str, **NaViLModelConfig.config_fields()}

    def resolve(self) -> NaViLModelConfig:
        """The flavor with the fields set here, not yet validated (with a tokenizer, the
        vocabulary fields are only complete once the job follows it)."""
        cfg = get_flavor(self.flavor)
        return cfg.apply_overrides(self.explicit, parse=False) if self.explicit else cfg

    def is_set(self, dotted: str) -> bool:
        """Whether the model field `dotted` (e.g. `llm.vocab_size`) was set explicitly."""
        return dotted in self.explicit

    def validate(self) -> None:
        if self.flavor not in FLAVORS:
            raise ConfigError(
                f"unknown model flavor {self.flavor!r}; choose one of {', '.join(FLAVORS)}"
            )

    # ------------------------------------------------------------------ dict round trip
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"flavor": self.flavor}
        for dotted, value in self.explicit.items():
            node = out
            *sections, name = dotted.split(".")
            for s in sections:
                node = node.setdefault(s, {})
            node[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, path: str = "") -> "ModelSection":
        if not isinstance(data, dict):
            raise ConfigError(f"{path or 'model'}: expected a mapping, got {type(data).__name__}")
        section = cls()
        for key, value in data.items():
            section = section.set_path([key], value, path)
        return section

    # ------------------------------------------------------------------ setting fields
    def set_path(self, parts: list[str], value: Any, where: str = "") -> "ModelSection":
        if parts == ["flavor"]:
            return dataclasses.replace(self, flavor=_coerce(str, value, _join(where, "flavor")))
        if parts[0] in self.MOVED:
            raise moved_error(_join(where, parts[0]), self.MOVED[parts[0]])
        tp = _model_field_type(parts, where)
        here = _join(where, ".".join(parts))
        if isinstance(tp, type) and issubclass(tp, ConfigBase):
            # A whole sub-section (YAML nesting or model.llm={...}): set each field given.
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            if not isinstance(value, dict):
                raise ConfigError(f"{here}: expected a mapping, got {value!r}")
            section = self
            for name, v in value.items():
                section = section.set_path(parts + [name], v, where)
            return section
        explicit = {**self.explicit, ".".join(parts): _coerce(tp, value, here)}
        return dataclasses.replace(self, explicit=explicit)


def _model_field_type(parts: list[str], where: str) -> Any:
    """The annotation of NaViLModelConfig's field at `parts`; a ConfigError naming the valid
    fields of the level where the path goes wrong."""
    cls: Any = NaViLModelConfig
    for i, name in enumerate(parts):
        fields = cls.config_fields()
        if name not in fields:
            valid = sorted(fields) + (["flavor"] if i == 0 else [])
            level = _join(where, ".".join(parts[:i])) if i else where
            raise ConfigError(
                f"{_join(where, '.'.join(parts[: i + 1]))}: no such model field; valid under "
                f"{level or 'model'}: {', '.join(valid)}"
            )
        tp = fields[name]
        if i == len(parts) - 1:
            return tp
        if not (isinstance(tp, type) and issubclass(tp, ConfigBase)):
            raise ConfigError(
                f"{_join(where, '.'.join(parts))}: {_join(where, '.'.join(parts[: i + 1]))} "
                "is not a config section"
            )
        cls = tp
    raise AssertionError("empty field path")
