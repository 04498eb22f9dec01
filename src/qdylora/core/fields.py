"""One door for settings values: every field of a settings dataclass is checked against its type
and its bounds, whatever the source (command-line flags, a --config file, a run's config.json, an
adapter file's metadata), with one line naming the field and the source.

Bounds are declared beside the type, `lr: Annotated[float, Range(0, open_low=True)]`, which the
command-line parser (tyro) reads as a plain float. Numbers that YAML reads as text ("1e-4":
PyYAML wants a dot in a float) are taken as the float they spell.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from ..errors import QDyLoRAError


@dataclass(frozen=True)
class Range:
    """Bounds of a number field: low <= value <= high (strict with `open_low` / `open_high`)."""

    low: Optional[float] = None
    high: Optional[float] = None
    open_low: bool = False
    open_high: bool = False

    def check(self, value: float) -> Optional[str]:
        """What is wrong with `value`, or None."""
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return f"{'above' if self.open_low else 'at least'} {_number(self.low)}"
        if self.high is not None and (value >= self.high if self.open_high else value > self.high):
            return f"{'below' if self.open_high else 'at most'} {_number(self.high)}"
        return None


POSITIVE = Range(0, open_low=True)
NOT_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
FRACTION = Range(0, 1, open_high=True)
SEED = Range(0, 2**63 - 1)  # what torch.Generator.manual_seed takes


def checked(cls: type, values: dict, where: str) -> dict:
    """`values` for the dataclass `cls`, each checked (and a numeric text made a float); unknown
    keys are errors. `where` names the source ("config.yaml", "RUN/config.json")."""
    if not isinstance(values, dict):
        raise QDyLoRAError(f"{where}: expected a mapping of settings, got {shown(values)}")
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(map(str, values)) - known)
    if unknown:
        raise QDyLoRAError(f"{where}: unknown settings {', '.join(unknown)}")
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name: check_value(hints[name], value, f"{where}: {name}") for name, value in values.items()}


def check_fields(obj: Any, flags: bool = False) -> None:
    """Check every field of the dataclass instance `obj` (made from flags or in Python) and store
    the checked values back. With `flags` the errors name the command-line flag (--batch-size)."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            continue  # a nested group checks itself
        name = "--" + f.name.replace("_", "-") if flags else f.name
        new = check_value(hints[f.name], value, name)
        if new is not value:
            object.__setattr__(obj, f.name, new)


def check_value(tp: Any, value: Any, what: str) -> Any:
    """`value` as the type `tp` wants it (`what` names it in the error)."""
    bounds = [m for m in getattr(tp, "__metadata__", ()) if isinstance(m, Range)]
    if typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    out = _typed(tp, value, what)
    if isinstance(out, (int, float)) and not isinstance(out, bool):
        for b in bounds:
            problem = b.check(out)
            if problem:
                raise QDyLoRAError(f"{what} must be {problem}, got {shown(value)}")
    return out


def _typed(tp: Any, value: Any, what: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(option, value, what)
            except QDyLoRAError:
                pass
        raise QDyLoRAError(f"{what} must be {_describe(tp)}, got {shown(value)}")
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        raise QDyLoRAError(f"{what} must be one of {', '.join(map(str, args))}, got {shown(value)}")
    if origin is list:
        if isinstance(value, (list, tuple)):
            return [_typed(args[0], v, what) for v in value]
        raise QDyLoRAError(f"{what} must be {_describe(tp)}, got {shown(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _float(value)
        if number is not None:
            if not math.isfinite(number):
                raise QDyLoRAError(f"{what} must be a finite number, got {shown(value)}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value  # a type this door does not know (a dataclass group): left to its own checks
    raise QDyLoRAError(f"{what} must be {_describe(tp)}, got {shown(value)}")


def _float(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _describe(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a text",
            type(None): "none"}.get(tp, getattr(tp, "__name__", str(tp)))


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def shown(value: Any) -> str:
    """A value as an error line shows it: its repr, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Checked:
    """Base of a command's dataclass: its flags are checked (`check_fields`) when it is made."""

    def __post_init__(self) -> None:
        check_fields(self, flags=True)
