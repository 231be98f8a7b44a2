"""Plain values across the sandbox boundary, and the framing of the messages that carry them.

A checked run's verdict is decided in a trusted process from what the sample's functions return,
so whatever the sample sends must arrive there as plain data: None, bools, ints, floats, complex,
strings, bytes, lists, tuples, dicts, sets and frozensets of those, and nothing else. An object
with a forged `__eq__` cannot cross: the sending side has no way to express it, and the receiving
side (`loads`) only ever builds values of those exact built-in types from a tagged JSON text.

JSON carries None, bools, ints below 2**63, finite floats, strings (lone surrogates escaped) and
lists as themselves; everything else is a one-key object: {"tuple": [...]}, {"set": [...]},
{"frozenset": [...]}, {"dict": [[key, value], ...]}, {"bytes": hex}, {"int": hex} (big ints: hex is
not bound by `int_max_str_digits`), {"float": "nan"|"inf"|"-inf"}, {"complex": [re, im]}, and, in
call arguments only, {"ref": name} for an object that lives in the sample's process.

Stdlib only: this file is also run inside the sandbox (prepended to the worker), where the
package is not importable.
"""

from __future__ import annotations

import json
import math
import os
import struct

MAX_DEPTH = 200            # nesting of containers, both ways
_HEADER = struct.Struct(">Q")
_SMALL = 1 << 63


class CodecError(ValueError):
    """A value that is not plain data, or a message that is not well formed."""


def encode(value: object, ref=None, depth: int = 0) -> object:
    """The JSON-able form of a plain value. Subclasses of the plain types go as their base value
    (a namedtuple as a tuple, a Counter as a dict); `ref(value)` may name other objects (call
    arguments that stay in the sample); anything else is a CodecError naming its type."""
    if depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH} levels")
    if value is None or value is True or value is False:
        return value
    if isinstance(value, int):  # bool is handled above and cannot be subclassed
        number = int.__int__(value)
        return number if -_SMALL <= number < _SMALL else {"int": hex(number)}
    if isinstance(value, float):
        number = float.__float__(value)
        if math.isfinite(number):
            return number
        return {"float": "nan" if math.isnan(number) else ("inf" if number > 0 else "-inf")}
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        number = complex.__complex__(value) if hasattr(complex, "__complex__") else complex(value)
        return {"complex": [encode(number.real), encode(number.imag)]}
    d = depth + 1
    if isinstance(value, list):
        items = list(list.__iter__(value))
        if _all_json_scalars(items):  # the common case, millions of numbers: no per-item call
            return items
        return [encode(x, ref, d) for x in items]
    if isinstance(value, tuple):
        return {"tuple": [encode(x, ref, d) for x in tuple.__iter__(value)]}
    if isinstance(value, dict):
        return {"dict": [[encode(k, ref, d), encode(v, ref, d)] for k, v in dict.items(value)]}
    if isinstance(value, frozenset):
        return {"frozenset": [encode(x, ref, d) for x in frozenset.__iter__(value)]}
    if isinstance(value, set):
        return {"set": [encode(x, ref, d) for x in set.__iter__(value)]}
    if ref is not None:
        named = ref(value)
        if named is not None:
            return {"ref": named}
    raise CodecError(f"a {type(value).__name__} is not a plain value")


def _all_json_scalars(items: list) -> bool:
    """Whether every item is an exact str, bool, None, small int or finite float (sent as is)."""
    for x in items:
        kind = type(x)
        if kind is str or x is None or kind is bool:
            continue
        if kind is int:
            if not -_SMALL <= x < _SMALL:
                return False
        elif kind is float:
            if x - x != 0.0:  # inf or nan
                return False
        else:
            return False
    return True


def decode(obj: object, resolve=None, depth: int = 0) -> object:
    """Plain values from `encode`'s form; only exact built-in types come out. `resolve(name)`
    turns {"ref": name} into an object (the sample side); without it a ref is an error."""
    if depth > MAX_DEPTH:
        raise CodecError(f"value nested deeper than {MAX_DEPTH} levels")
    kind = type(obj)
    if obj is None or kind is bool or kind is str or kind is int or kind is float:
        return obj
    d = depth + 1
    if kind is list:
        for x in obj:
            if type(x) is list or type(x) is dict:
                return [decode(x, resolve, d) for x in obj]
        return obj  # only scalars, which the JSON parser already made of exact built-in types
    if kind is not dict or len(obj) != 1:
        raise CodecError(f"not an encoded value: {kind.__name__}")
    (tag, payload), = obj.items()
    try:
        if tag in ("tuple", "set", "frozenset") and type(payload) is list:
            items = [decode(x, resolve, d) for x in payload]
            return tuple(items) if tag == "tuple" else set(items) if tag == "set" else frozenset(items)
        if tag == "dict" and type(payload) is list:
            out = {}
            for pair in payload:
                if type(pair) is not list or len(pair) != 2:
                    raise CodecError("a dict item is not a [key, value] pair")
                out[decode(pair[0], resolve, d)] = decode(pair[1], resolve, d)
            return out
        if tag == "bytes" and type(payload) is str:
            return bytes.fromhex(payload)
        if tag == "int" and type(payload) is str:  # linear in its length (hex is not digit-capped)
            return int(payload, 16)
        if tag == "float" and payload in ("nan", "inf", "-inf"):
            return float(payload)
        if tag == "complex" and type(payload) is list and len(payload) == 2:
            re, im = (decode(x, None, d) for x in payload)
            if type(re) in (int, float) and type(im) in (int, float):
                return complex(re, im)
        if tag == "ref" and type(payload) is str and resolve is not None:
            return resolve(payload)
    except TypeError as exc:  # an unhashable set element or dict key
        raise CodecError(f"{tag}: {exc}") from None
    except ValueError as exc:
        raise CodecError(f"{tag}: {exc}") from None
    raise CodecError(f"not an encoded value: tag {tag!r}")


def _no_constants(name: str) -> object:
    raise CodecError(f"JSON constant {name} is not allowed (non-finite floats are tagged)")


def loads_message(data: bytes) -> dict:
    """A message's JSON envelope (strict: ASCII, no NaN/Infinity, bounded nesting)."""
    try:
        obj = json.loads(data.decode("ascii"), parse_constant=_no_constants)
    except RecursionError:
        raise CodecError("message nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise CodecError(f"message is not valid JSON: {str(exc)[:200]}") from None
    if type(obj) is not dict:
        raise CodecError(f"message is a {type(obj).__name__}, not an object")
    return obj


def dumps_message(message: dict) -> bytes:
    """Encode an envelope whose values were already `encode`d."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def send(fd: int, payload: bytes) -> None:
    """One length-prefixed message on a pipe."""
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:
        written = os.write(fd, data)
        data = data[written:]


def recv(fd: int, limit: int) -> bytes | None:
    """One length-prefixed message; None at end of file; CodecError past `limit` bytes."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size > limit:
        raise CodecError(f"message of {size} bytes is over the {limit}-byte limit")
    body = _read_exactly(fd, size)
    if body is None:
        raise CodecError("message cut short (the other side went away)")
    return body


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            if got == 0:
                return None
            raise CodecError("message cut short (the other side went away)")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)
