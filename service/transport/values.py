"""The one rule for the values a caller sends: JSON into what protobuf fields and numpy dtypes hold.

Every number, string and boolean that arrives as JSON (REST bodies) or as a request parameter
(either port) reaches protobuf or numpy through these functions, which answer
:class:`InvalidInputError` naming the field (``inputs[0].data``, ``parameters.timeout``) for
anything the target cannot hold exactly. Left to themselves, protobuf raises ``ValueError`` for
an integer beyond int64 and numpy ``OverflowError`` for one beyond a float, both of which reach
the error mapping as bugs (INTERNAL, a traceback in the log).

- :func:`loads` parses JSON as Python does, except that an integer literal of more than
  :data:`MAX_INT_DIGITS` digits is kept as an :class:`Oversized` marker (Python's own limit,
  4,300 digits, raises ``ValueError`` from deep inside the parser), and nesting deeper than the
  interpreter's recursion limit is refused. ``NaN``, ``Infinity``, ``-Infinity`` and literals
  beyond the float range (``1e999``) parse to non-finite floats, which every converter here
  refuses with the value's path: JSON has no such numbers, and a tensor of them is not an image.
- :func:`tensor` turns a tensor's ``data`` (flat or nested lists) into a numpy array of one of the
  protocol's datatypes, each value checked against the datatype's range.
- :func:`fill_parameter` / :func:`parameters` turn a JSON value into a protocol parameter
  (``InferParameter`` or ``ModelRepositoryParameter``): booleans, integers that fit int64 (or
  uint64, where the message has it), finite numbers, strings.
- :func:`timeout_seconds` reads the protocol's ``timeout`` parameter (microseconds), on both
  ports: positive and finite, or refused.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np
from google.protobuf.message import Message

from service.errors import InvalidInputError, quote

MAX_INT_DIGITS = 400
"""Longest integer literal taken as a number: any float64 written out in full fits (309 digits);
longer ones are refused by the converter that meets them, with their path."""

MAX_RANK = 8
"""Deepest nesting of a tensor's ``data``: the protocol's tensors have at most this rank."""

TIMEOUT = "timeout"
MAX_TIMEOUT_S = 365 * 24 * 3600.0
"""A ``timeout`` beyond a year is taken as a year: any longer deadline never matters to a request."""

DTYPES: Mapping[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
INT64 = (-(2**63), 2**63 - 1)
UINT64 = (0, 2**64 - 1)


class Oversized:
    """An integer literal too long to be taken as a number (its digit count, for the message)."""

    __slots__ = ("digits",)

    def __init__(self, text: str) -> None:
        self.digits = len(text.lstrip("-"))

    def __repr__(self) -> str:
        return f"an integer of {self.digits} digits"


def _parse_int(text: str) -> int | Oversized:
    return Oversized(text) if len(text) > MAX_INT_DIGITS else int(text)


def loads(body: bytes | str, what: str) -> Any:
    """JSON of a request body (``what`` names it in errors); InvalidInputError for anything else.

    A string escaping half of a UTF-16 surrogate pair (``"\\ud800"``) is refused here: JSON lets it
    through, but it is no Unicode text, and protobuf's string fields (ids, names, parameters) and
    UTF-8 itself refuse it later, where it would be a bug rather than the caller's mistake."""
    try:
        value = json.loads(body, parse_int=_parse_int)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidInputError(f"{what} is not valid JSON: {error}") from None
    except RecursionError:
        raise InvalidInputError(f"{what} nests JSON too deeply; a request needs a few levels") from None
    if _SURROGATE_ESCAPE.search(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")):
        _refuse_surrogates(value, what)
    return value


# A \\uD800-\\uDFFF escape: what can put a lone surrogate into a decoded string (UTF-8 input cannot).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _refuse_surrogates(value: Any, what: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidInputError(
                    f"{what} holds a string with an unpaired UTF-16 surrogate escape (\\ud800-\\udfff); "
                    "send Unicode text"
                ) from None
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())


def describe(value: Any) -> str:
    """A caller's value as a message shows it, in JSON's spelling: short, never Python's repr of an object."""
    if isinstance(value, Oversized):
        return repr(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        digits = len(str(abs(value))) if abs(value) < 10**MAX_INT_DIGITS else MAX_INT_DIGITS
        return str(value) if digits <= 40 else f"an integer of {digits} digits"
    if isinstance(value, float):
        return (
            "NaN"
            if math.isnan(value)
            else ("Infinity" if value > 0 else "-Infinity")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, str):
        return quote(value)
    return f"a JSON {'list' if isinstance(value, list) else 'object'}"


# -- tensors -------------------------------------------------------------------------------------


def tensor(data: Any, datatype: str, where: str) -> np.ndarray:
    """``data`` (a flat or nested list, row-major) as a little-endian array of ``datatype``.

    Each value must be of the datatype's kind (booleans for BOOL, integers for INT*/UINT*,
    numbers for FP*) and fit it: in range for integers, finite and within the float range of
    FP16/FP32/FP64. The shape is checked by whoever knows it (the element count follows from
    the array's size).
    """
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInputError(
            f"{where}.datatype {quote(datatype)} is not a numeric datatype of the protocol "
            f"({', '.join(DTYPES)}); BYTES data is a list of strings"
        )
    values = _flatten(data, f"{where}.data")
    if dtype.kind == "b":
        for index, value in enumerate(values):
            if not isinstance(value, bool):
                raise _element(where, index, value, "is not a boolean (true or false)")
        return np.array(values, dtype=dtype)
    for index, value in enumerate(values):
        kind = type(value)
        if kind is Oversized:
            raise _element(where, index, value, f"is beyond {datatype}'s range")
        if kind is not int and kind is not float:
            raise _element(where, index, value, "is not a number")
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        for index, value in enumerate(values):
            if type(value) is float:
                raise _element(where, index, value, f"is not an integer, as {datatype} needs")
            if not info.min <= value <= info.max:
                raise _element(where, index, value, f"is out of {datatype}'s range ({info.min} to {info.max})")
        return np.array(values, dtype=dtype)
    try:
        wide = np.array(values, dtype=np.float64)
    except OverflowError:  # an integer literal beyond the float range
        index = next(i for i, v in enumerate(values) if type(v) is int and abs(v) > sys.float_info.max)
        raise _element(where, index, values[index], f"is beyond {datatype}'s range") from None
    limit = float(np.finfo(dtype).max)
    bad = ~np.isfinite(wide) | (np.abs(wide) > limit)
    if bad.any():
        index = int(np.argmax(bad))
        value = values[index]
        if isinstance(value, float) and not math.isfinite(value):
            raise _element(where, index, value, "is not a finite number (JSON has no NaN or Infinity; 1e999 overflows)")
        raise _element(where, index, value, f"is beyond {datatype}'s range (±{limit:.4g})")
    return wide.astype(dtype)


def _flatten(data: Any, where: str) -> list[Any]:
    """The leaves of nested lists in row-major order; at most :data:`MAX_RANK` levels."""
    if not isinstance(data, list):
        raise InvalidInputError(f"{where} must be a list (flat or nested, row-major), got {describe(data)}")
    values: list[Any] = []
    stack: list[tuple[list[Any], int]] = [(data, 1)]
    while stack:
        items, depth = stack.pop()
        if depth > MAX_RANK:
            raise InvalidInputError(f"{where} nests lists {depth} deep; a tensor has at most {MAX_RANK} dimensions")
        if items and isinstance(items[0], list):
            for item in reversed(items):
                if not isinstance(item, list):
                    raise InvalidInputError(f"{where} mixes lists and values at one level; nest it evenly")
                stack.append((item, depth + 1))
        else:
            for item in items:
                if isinstance(item, list):
                    raise InvalidInputError(f"{where} mixes lists and values at one level; nest it evenly")
            values.extend(items)
    return values


def _element(where: str, index: int, value: Any, problem: str) -> InvalidInputError:
    return InvalidInputError(f"{where}.data, element {index} (row-major): {describe(value)} {problem}")


# -- parameters ----------------------------------------------------------------------------------


def fill_parameter(target: Message, value: Any, where: str) -> None:
    """Set ``target`` (an ``InferParameter`` or ``ModelRepositoryParameter``) to the JSON ``value``."""
    fields = target.DESCRIPTOR.fields_by_name
    if isinstance(value, bool):
        target.bool_param = value  # type: ignore[attr-defined]
    elif isinstance(value, Oversized):
        raise InvalidInputError(f"{where} is {describe(value)}, out of range: send an integer that fits 64 bits")
    elif isinstance(value, int):
        if INT64[0] <= value <= INT64[1]:
            target.int64_param = value  # type: ignore[attr-defined]
        elif "uint64_param" in fields and UINT64[0] <= value <= UINT64[1]:
            target.uint64_param = value  # type: ignore[attr-defined]
        else:
            high = UINT64[1] if "uint64_param" in fields else INT64[1]
            raise InvalidInputError(
                f"{where} is {describe(value)}, out of range: integers run from {INT64[0]} to {high}"
            )
    elif isinstance(value, float) and "double_param" in fields:
        if not math.isfinite(value):
            raise InvalidInputError(f"{where} is {describe(value)}; send a finite number")
        target.double_param = value  # type: ignore[attr-defined]
    elif isinstance(value, str):
        target.string_param = value  # type: ignore[attr-defined]
    else:
        kinds = (
            "a boolean, an integer, a number or a string"
            if "double_param" in fields
            else ("a boolean, an integer or a string")
        )
        raise InvalidInputError(f"{where} must be {kinds}, got {describe(value)}")


def parameters(value: Any, target: Any, where: str) -> dict[str, Any]:
    """Fill ``target`` (a protobuf map of parameters) from the JSON object ``value``; the object itself."""
    if not isinstance(value, dict):
        raise InvalidInputError(f"{where} must be a JSON object, got {describe(value)}")
    for key, item in value.items():
        fill_parameter(target[key], item, f"{where}.{key}")
    return value


def parameter_value(parameter: Any) -> Any:
    """The Python value an ``InferParameter`` holds (None when unset)."""
    kind = parameter.WhichOneof("parameter_choice")
    return getattr(parameter, kind) if kind else None


def timeout_seconds(given: Mapping[str, Any], where: str) -> float | None:
    """The ``timeout`` parameter (microseconds, Triton's) among ``given`` (InferParameters), in seconds.

    None when absent. An integer or a finite number above zero; NaN, infinities, zero, negative
    numbers and strings are refused rather than taken as "no deadline".
    """
    if TIMEOUT not in given:
        return None
    value = parameter_value(given[TIMEOUT])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInputError(f"{where}.{TIMEOUT} must be a number of microseconds, got {describe(value)}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidInputError(
            f"{where}.{TIMEOUT} must be a positive, finite number of microseconds, got {describe(value)}"
        )
    return min(float(value) / 1e6, MAX_TIMEOUT_S)
