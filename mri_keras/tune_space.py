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
import numbers
from collections.abc import Callable, Mapping
from typing import Any

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


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


# Each setting: (where it lives in TrainConfig, the entry types it accepts, a checker that
# returns None for a good value or a description of what a good value is, and a function that
# turns a (decoded) value into what the config field holds).
def _check_learning_rate(v):
    return None if _is_number(v) and 0 < v < 1 else "a number in (0, 1)"


def _check_positive_int(v):
    return None if _is_int(v) and v >= 1 else "an int >= 1"


def _check_blocks(v):
    if _is_int(v) and v >= 1:
        return None
    if isinstance(v, (list, tuple)) and len(v) == 4 and all(_is_int(b) and b >= 1 for b in v):
        return None
    return "an int >= 1 or a list of 4 ints >= 1"


def _check_stem_kernel(v):
    return None if _is_int(v) and v >= 1 and v % 2 == 1 else "an odd int >= 1 (e.g. 3, 5, 7)"


def _check_dropout(v):
    return None if _is_number(v) and 0 <= v < 1 else "a number in [0, 1)"


def _check_crop(v):
    if v is None:
        return None
    if _is_int(v) and v > 1:
        return None
    if _is_number(v) and 0 < v <= 1:
        return None
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_int(s) and s >= 1 for s in v):
        return None
    return "null, a fraction in (0, 1], a size in pixels (int > 1) or [height, width]"


def _check_flip(v):
    return None if isinstance(v, bool) else "true or false"


def _one_of(values):
    def check(v):
        return None if v in values else f"one of {list(values)}"

    return check


def _check_warmup(v):
    return None if _is_number(v) and v >= 0 else "a number >= 0 (epochs)"


def _to_blocks(v):
    return (int(v),) * 4 if _is_int(v) else tuple(int(b) for b in v)


def _to_crop(v):
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[1]))
    if _is_int(v) and v > 1:
        return (int(v), int(v))
    return float(v)


@dataclasses.dataclass(frozen=True)
class _Setting:
    section: str | None  # None: a TrainConfig field; else "model" or "input".
    field: str
    types: tuple[str, ...]
    check: Callable[[Any], str | None]
    convert: Callable[[Any], Any]


_NUMERIC = ("float", "choice", "fixed")
_INTEGER = ("int", "choice", "fixed")
SETTINGS = {
    "learning_rate": _Setting(None, "learning_rate", _NUMERIC, _check_learning_rate, float),
    "width": _Setting("model", "width", _INTEGER, _check_positive_int, int),
    "blocks_per_stage": _Setting("model", "blocks_per_stage", _INTEGER, _check_blocks, _to_blocks),
    "stem_kernel": _Setting("model", "stem_kernel", _INTEGER, _check_stem_kernel, int),
    "channels_3d": _Setting("model", "channels_3d", _INTEGER, _check_positive_int, int),
    "dropout": _Setting("model", "dropout", _NUMERIC, _check_dropout, float),
    "crop": _Setting("input", "crop", _NUMERIC, _check_crop, _to_crop),
    "flip": _Setting("input", "flip", ("boolean", "choice", "fixed"), _check_flip, bool),
    "lr_schedule": _Setting(
        None, "lr_schedule", ("choice", "fixed"), _one_of(constants.LR_SCHEDULES), str
    ),
    "warmup_epochs": _Setting(None, "warmup_epochs", _NUMERIC, _check_warmup, float),
    "init": _Setting("model", "init", ("choice", "fixed"), _one_of(constants.INITS), str),
    "norm": _Setting("model", "norm", ("choice", "fixed"), _one_of(constants.NORMS), str),
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
        return SETTINGS[self.name].convert(value)


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
        problem = setting.check(value)
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
