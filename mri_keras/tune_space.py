"""The configurable hyper-parameter search space of ``mri_keras.tune``.

A search space is a JSON object whose keys name the tunable settings of the training config
and whose values say how each is searched::

    {
      "learning_rate":    {"type": "float", "min": 1e-6, "max": 1e-3, "sampling": "log"},
      "width":            {"type": "choice", "values": [16, 32, 64]},
      "blocks_per_stage": {"type": "choice", "values": [1, 2, [1, 2, 2, 1]]},
      "stem_kernel":      {"type": "choice", "values": [3, 5, 7]},
      "channels_3d":      {"type": "int", "min": 32, "max": 128, "step": 32},
      "dropout":          {"type": "float", "min": 0.0, "max": 0.5, "step": 0.1},
      "crop":             {"type": "choice", "values": [null, 0.875, [64, 64]]},
      "flip":             {"type": "boolean"}
    }

Entry types: ``float`` (``min``, ``max``, optional ``step``, ``sampling`` linear|log|
reverse_log), ``int`` (``min``, ``max``, optional ``step`` (1), ``sampling`` linear|log),
``choice`` (``values``), ``boolean``, ``fixed`` (``value``). Each may carry a ``default``.
A setting left out of the file is not searched: every trial uses the value the training flags
give it. Keys starting with ``_`` (e.g. ``"_comment"``) are ignored.

Values: ``blocks_per_stage`` is an int (the same count in all four stages) or a list of four
ints; ``crop`` is ``null`` (no crop), a fraction in (0, 1] of each in-plane side, a square size
in pixels (int > 1) or ``[height, width]``; ``stem_kernel`` must be odd.

This module is free of TensorFlow so a search space can be checked without starting it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from mri_keras import config as config_lib
from mri_keras import constants

ENTRY_TYPES = ("float", "int", "choice", "boolean", "fixed")
_KEYS_BY_TYPE = {
    "float": {"type", "min", "max", "step", "sampling", "default"},
    "int": {"type", "min", "max", "step", "sampling", "default"},
    "choice": {"type", "values", "default"},
    "boolean": {"type", "default"},
    "fixed": {"type", "value"},
}
_REQUIRED_BY_TYPE = {
    "float": ("min", "max"),
    "int": ("min", "max"),
    "choice": ("values",),
    "boolean": (),
    "fixed": ("value",),
}
_SAMPLINGS = {"float": ("linear", "log", "reverse_log"), "int": ("linear", "log")}


class SearchSpaceError(ValueError):
    """A search-space file or entry is malformed; the message names the file and entry."""


_is_int = config_lib.is_int


def _is_number(v) -> bool:
    return config_lib.is_real(v) and math.isfinite(v)


# Each setting: where it lives in TrainConfig, the entry types it accepts, what a good value
# is (as the search-space file writes it), how a file value becomes the field's value, and, for
# TrainConfig fields (whose class needs TensorFlow) or rules of the search itself, a check.
# Model and input values are checked by ModelConfig / InputConfig, the classes that own them.
def _check_learning_rate(v):
    return _is_number(v) and 0 < v < 1


def _check_warmup(v):
    return _is_number(v) and v >= 0


def _to_blocks(v):
    return (v,) * 4 if _is_int(v) else v  # One count for all four stages, or a list of four.


@dataclasses.dataclass(frozen=True)
class _Setting:
    section: str | None  # None: a TrainConfig field; else "model" or "input".
    field: str
    types: tuple[str, ...]
    describe: str  # What a good value is, e.g. "an int >= 1".
    convert: Callable[[Any], Any] = lambda v: v  # File value -> field value.
    check: Callable[[Any], bool] | None = None  # Besides the config class's own checks.

    def to_config(self, value):
        """The field's value for a value of the search-space file.

        Raises:
          ValueError: the value is not one this setting takes (``describe``).
        """
        if self.check is not None and not self.check(value):
            raise ValueError(self.describe)
        value = self.convert(value)
        if self.section is not None:  # The config class checks and normalises it.
            cls = {"model": config_lib.ModelConfig, "input": config_lib.InputConfig}[self.section]
            try:
                value = getattr(cls(**{self.field: value}), self.field)
            except config_lib.ConfigError:
                raise ValueError(self.describe) from None
        return value

    def problem(self, value) -> str | None:
        """None for a good value, else what a good value is."""
        try:
            self.to_config(value)
        except ValueError:
            return self.describe
        return None


_NUMERIC = ("float", "choice", "fixed")
_INTEGER = ("int", "choice", "fixed")
_NAMED = ("choice", "fixed")
_POSITIVE = "an int >= 1"
SETTINGS = {
    "learning_rate": _Setting(
        None, "learning_rate", _NUMERIC, "a number in (0, 1)", float, _check_learning_rate
    ),
    "width": _Setting("model", "width", _INTEGER, _POSITIVE),
    "blocks_per_stage": _Setting(
        "model", "blocks_per_stage", _INTEGER, "an int >= 1 or a list of 4 ints >= 1", _to_blocks
    ),
    "stem_kernel": _Setting(
        "model",
        "stem_kernel",
        _INTEGER,
        "an odd int >= 1 (e.g. 3, 5, 7)",
        check=lambda v: not _is_int(v) or v % 2 == 1,
    ),
    "channels_3d": _Setting("model", "channels_3d", _INTEGER, _POSITIVE),
    "dropout": _Setting("model", "dropout", _NUMERIC, "a number in [0, 1)"),
    "crop": _Setting(
        "input",
        "crop",
        _NUMERIC,
        "null, a fraction in (0, 1], a size in pixels (int > 1) or [height, width]",
        check=lambda v: not _is_int(v) or v > 1,  # 1 (one pixel) is surely a typo for 1.0.
    ),
    "flip": _Setting("input", "flip", ("boolean", "choice", "fixed"), "true or false"),
    "lr_schedule": _Setting(
        None,
        "lr_schedule",
        _NAMED,
        f"one of {list(constants.LR_SCHEDULES)}",
        check=lambda v: v in constants.LR_SCHEDULES,
    ),
    "warmup_epochs": _Setting(
        None, "warmup_epochs", _NUMERIC, "a number >= 0 (epochs)", float, _check_warmup
    ),
    "init": _Setting("model", "init", _NAMED, f"one of {list(constants.INITS)}"),
    "norm": _Setting("model", "norm", _NAMED, f"one of {list(constants.NORMS)}"),
}

# The search of the issue: the paper's settings and the ranges around them it never searched.
DEFAULT_SEARCH_SPACE = {
    "learning_rate": {"type": "float", "min": 1e-6, "max": 1e-3, "sampling": "log"},
    "width": {"type": "choice", "values": [16, 32, 64]},
    "blocks_per_stage": {"type": "choice", "values": [1, 2]},
    "stem_kernel": {"type": "choice", "values": [3, 5, 7]},
    "channels_3d": {"type": "choice", "values": [32, 64, 128]},
    "dropout": {"type": "float", "min": 0.0, "max": 0.5, "step": 0.1},
    "crop": {"type": "choice", "values": [None, 0.875, 0.75]},
    "flip": {"type": "boolean", "default": True},
    "lr_schedule": {"type": "choice", "values": ["constant", "cosine"]},
    "warmup_epochs": {"type": "choice", "values": [0.0, 1.0]},
    "init": {"type": "choice", "values": ["glorot", "he_zero_residual"]},
    "norm": {"type": "choice", "values": ["none", "group"]},
}


def _encode(value) -> str:
    """A string form of a structured choice value (keras-tuner choices hold one scalar type)."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(str(int(v)) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def _decode(text: str):
    if text == "none":
        return None
    if "," in text:
        return [int(v) for v in text.split(",")]
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return text  # A named option (e.g. "cosine", "he_zero_residual").


@dataclasses.dataclass(frozen=True)
class Param:
    """One validated search-space entry.

    Attributes:
      name: str. The setting searched (a key of ``SETTINGS``).
      kind: str. One of ``ENTRY_TYPES``.
      spec: dict. The entry as given (JSON-compatible), kept for the sweep record.
      encoded: bool. Choice/fixed values are stored in keras-tuner as strings (lists, null or
        mixed types) and decoded by ``decode``.
    """

    name: str
    kind: str
    spec: Mapping[str, Any]
    encoded: bool = False

    def declare(self, hp):
        """Registers this entry on a ``keras_tuner.HyperParameters`` and returns its value."""
        s = self.spec
        if self.kind == "float":
            kwargs = {"step": s["step"]} if s.get("step") is not None else {}
            if "default" in s:
                kwargs["default"] = s["default"]
            return hp.Float(
                self.name,
                float(s["min"]),
                float(s["max"]),
                sampling=s.get("sampling", "linear"),
                **kwargs,
            )
        if self.kind == "int":
            kwargs = {"default": s["default"]} if "default" in s else {}
            return hp.Int(
                self.name,
                int(s["min"]),
                int(s["max"]),
                step=int(s.get("step", 1)),
                sampling=s.get("sampling", "linear"),
                **kwargs,
            )
        if self.kind == "boolean":
            return hp.Boolean(self.name, default=bool(s.get("default", False)))
        if self.kind == "fixed":
            value = s["value"]
            return hp.Fixed(self.name, _encode(value) if self.encoded else value)
        values = list(s["values"])
        if self.name == "flip":
            if len(set(values)) == 2:
                return hp.Boolean(self.name, default=s.get("default", values[0]))
            return hp.Fixed(self.name, values[0])
        if self.encoded:
            values = [_encode(v) for v in values]
        kwargs = {}
        if "default" in s:
            kwargs["default"] = _encode(s["default"]) if self.encoded else s["default"]
        return hp.Choice(self.name, values, **kwargs)

    def decode(self, raw):
        """The config value for a value keras-tuner produced for this entry."""
        value = _decode(raw) if self.encoded and isinstance(raw, str) else raw
        return SETTINGS[self.name].to_config(value)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """A validated search space: the entries in file order and where it came from."""

    params: tuple[Param, ...]
    source: str = "<default>"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def declare(self, hp) -> dict:
        """Registers every entry on ``hp``; returns {name: config value}."""
        return {p.name: p.decode(p.declare(hp)) for p in self.params}

    def decode_values(self, hp_values: Mapping[str, Any]) -> dict:
        """{name: config value} from a finished trial's ``hyperparameters.values``."""
        return {p.name: p.decode(hp_values[p.name]) for p in self.params if p.name in hp_values}

    def to_json(self) -> dict:
        return {p.name: dict(p.spec) for p in self.params}


def apply_values(config, values: Mapping[str, Any]):
    """Returns ``config`` (a TrainConfig) with the searched settings replaced.

    Args:
      config: train_lib.TrainConfig. The base config (from the training flags).
      values: {setting name: config value} as returned by ``SearchSpace.declare``.

    Returns:
      A new TrainConfig; its nested ModelConfig/InputConfig are rebuilt through their own
      constructors, so their validation runs.
    """
    top, sections = {}, {"model": {}, "input": {}}
    for name, value in values.items():
        setting = SETTINGS[name]
        if setting.section is None:
            top[setting.field] = value
        else:
            sections[setting.section][setting.field] = value
    for section, fields in sections.items():
        if fields:
            top[section] = dataclasses.replace(getattr(config, section), **fields)
    return dataclasses.replace(config, **top)


def _fail(source, name, message, entry=None):
    received = "" if entry is None else f" Received: {json.dumps(entry, default=str)}"
    raise SearchSpaceError(f"{source}: search-space entry {name!r}: {message}.{received}")


def _validate_entry(source: str, name: str, entry) -> Param:
    if name not in SETTINGS:
        raise SearchSpaceError(
            f"{source}: unknown search-space entry {name!r}; tunable settings are "
            f"{sorted(SETTINGS)}."
        )
    setting = SETTINGS[name]
    if not isinstance(entry, Mapping):
        _fail(source, name, 'must be an object such as {"type": "choice", "values": [...]}', entry)
    kind = entry.get("type")
    if kind not in ENTRY_TYPES:
        _fail(source, name, f"'type' must be one of {ENTRY_TYPES}", entry)
    if kind not in setting.types:
        _fail(source, name, f"type {kind!r} is not allowed here; use one of {setting.types}", entry)
    unknown = sorted(set(entry) - _KEYS_BY_TYPE[kind])
    if unknown:
        _fail(
            source,
            name,
            f"unknown keys {unknown} for type {kind!r}; allowed: {sorted(_KEYS_BY_TYPE[kind])}",
            entry,
        )
    missing = [k for k in _REQUIRED_BY_TYPE[kind] if k not in entry]
    if missing:
        _fail(source, name, f"type {kind!r} needs {missing}", entry)

    def check_value(value, what):
        problem = setting.problem(value)
        if problem is not None:
            _fail(source, name, f"{what} {json.dumps(value)} is not {problem}", entry)

    encoded = False
    if kind in ("float", "int"):
        lo, hi = entry["min"], entry["max"]
        number = _is_int if kind == "int" else _is_number
        for key in ("min", "max") + (("step",) if entry.get("step") is not None else ()):
            if not number(entry[key]):
                _fail(
                    source,
                    name,
                    f"{key!r} must be {'an int' if kind == 'int' else 'a number'}",
                    entry,
                )
        check_value(lo, "min")
        check_value(hi, "max")
        if not lo < hi:
            _fail(source, name, f"'min' ({lo}) must be smaller than 'max' ({hi})", entry)
        sampling = entry.get("sampling", "linear")
        if sampling not in _SAMPLINGS[kind]:
            _fail(source, name, f"'sampling' must be one of {_SAMPLINGS[kind]}", entry)
        if sampling != "linear" and lo <= 0:
            _fail(source, name, f"{sampling} sampling needs 'min' > 0", entry)
        step = entry.get("step")
        if step is not None:
            if step <= 0:
                _fail(source, name, "'step' must be > 0", entry)
            if sampling != "linear":
                _fail(source, name, "'step' only works with linear sampling", entry)
        if name == "stem_kernel" and (step or 1) % 2 == 1:
            _fail(
                source,
                name,
                "an int range of kernel sizes needs an even 'step' (e.g. 2) so every value is odd",
                entry,
            )
        if name == "crop" and kind == "float" and not 0 < lo < hi <= 1:
            _fail(source, name, "a float crop range is a fraction range inside (0, 1]", entry)
    elif kind == "choice":
        values = entry["values"]
        if not isinstance(values, list) or not values:
            _fail(source, name, "'values' must be a non-empty list", entry)
        for v in values:
            check_value(v, "value")
        if len({_encode(v) for v in values}) != len(values):
            _fail(source, name, "'values' must not repeat a value", entry)
        if "default" in entry and _encode(entry["default"]) not in {_encode(v) for v in values}:
            _fail(source, name, "'default' must be one of 'values'", entry)
        # keras-tuner choices hold one scalar type; anything else travels as strings.
        simple = len({type(v) for v in values}) == 1 and type(values[0]) in (int, float, str)
        encoded = name != "flip" and not simple
    elif kind == "fixed":
        check_value(entry["value"], "value")
        encoded = entry["value"] is None or isinstance(entry["value"], (list, tuple))
    if "default" in entry and kind != "choice":
        check_value(entry["default"], "default")
    spec = {k: (list(v) if isinstance(v, tuple) else v) for k, v in entry.items()}
    return Param(name=name, kind=kind, spec=spec, encoded=encoded)


def parse_search_space(obj, source: str = "<search space>") -> SearchSpace:
    """Validates a decoded JSON search space.

    Args:
      obj: dict. The search space (see the module docstring).
      source: str. Where it came from, named in errors. Defaults to "<search space>".

    Returns:
      A SearchSpace.

    Raises:
      SearchSpaceError: naming ``source`` and the bad entry.
    """
    if not isinstance(obj, Mapping):
        raise SearchSpaceError(
            f"{source}: a search space must be a JSON object keyed by setting name "
            f"({sorted(SETTINGS)}). Received: {type(obj).__name__}"
        )
    params = tuple(
        _validate_entry(source, name, entry)
        for name, entry in obj.items()
        if not str(name).startswith("_")
    )
    if not params:
        raise SearchSpaceError(f"{source}: the search space has no entries.")
    return SearchSpace(params=params, source=source)


def load_search_space(path: str | None) -> SearchSpace:
    """Reads and validates a search-space JSON file (``None``: ``DEFAULT_SEARCH_SPACE``).

    Raises:
      SearchSpaceError: the file is missing, is not JSON, or has a bad entry.
    """
    if not path:
        return parse_search_space(DEFAULT_SEARCH_SPACE, source="<default search space>")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise SearchSpaceError(f"{path}: cannot read the search space: {e}") from e
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise SearchSpaceError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})."
        ) from e
    return parse_search_space(obj, source=path)
