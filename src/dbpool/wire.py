"""The msgpack value codec of dbpool's ZeroMQ front end (``docs/protocol.md``, "Values").

Both ``dbpool serve`` and the client library encode every message body with `packb` (or a
`make_packer` packer) and decode it with `unpackb`.  The contract:

- msgpack's own types carry themselves: nil, bool, int from -2**63 to 2**64-1, float, str,
  bin (``bytes``, ``bytearray``, ``memoryview``; decoded as ``bytes``), array (``list``,
  ``tuple``; decoded as ``list``) and map (``dict``, any key type).
- Everything else the spec names is an ext type, codes `EXT_BIGINT` (1) to `EXT_JSONB` (9):
  a bigger int, ``Decimal``, ``date``, ``time``, ``datetime`` (an aware one keeps its UTC
  offset; a ``ZoneInfo`` zone with a key also travels, as ``[Area/City]`` after the ISO
  text), ``timedelta``, ``UUID`` and psycopg's ``Json`` / ``Jsonb`` wrappers.
- Any other value is a `TypeError` naming its type, never a string.
- Anything `unpackb` cannot read, msgpack or ext data, is a `WireError`.

Values of msgpack's own types never reach the ``default`` hook, so a message made only of them
costs exactly one ``msgpack.packb`` / ``msgpack.unpackb`` call.
"""

from __future__ import annotations

import decimal
import json
import re
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import msgpack
from psycopg.types.json import Json, Jsonb

__all__ = [
    "EXT_BIGINT",
    "EXT_DATE",
    "EXT_DATETIME",
    "EXT_DECIMAL",
    "EXT_JSON",
    "EXT_JSONB",
    "EXT_TIME",
    "EXT_TIMEDELTA",
    "EXT_UUID",
    "WireError",
    "make_packer",
    "packb",
    "unpackb",
]

EXT_BIGINT = 1
"""An int beyond msgpack's 64 bits, as decimal ASCII text."""
EXT_DECIMAL = 2
"""A ``decimal.Decimal``, as ``str(value)`` (``NaN``, ``Infinity``, ``sNaN`` included)."""
EXT_DATE = 3
"""A ``datetime.date``, as ISO 8601 text."""
EXT_TIME = 4
"""A ``datetime.time``, as ISO 8601 text with its UTC offset if it has one."""
EXT_DATETIME = 5
"""A ``datetime.datetime``, as ISO 8601 text; a ``ZoneInfo`` key follows as ``[Area/City]``."""
EXT_TIMEDELTA = 6
"""A ``datetime.timedelta``, as the msgpack array ``[days, seconds, microseconds]``."""
EXT_UUID = 7
"""A ``uuid.UUID``, as its 16 bytes."""
EXT_JSON = 8
"""A ``psycopg.types.json.Json``, as JSON text."""
EXT_JSONB = 9
"""A ``psycopg.types.json.Jsonb``, as JSON text."""


class WireError(ValueError):
    """Bytes that are not a dbpool wire value: malformed msgpack, or an unknown or bad ext."""


# --- encoding ----------------------------------------------------------------------------


def _type_name(cls: type) -> str:
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    return f"{module}.{cls.__qualname__}"


def _unsupported(value: object) -> TypeError:
    return TypeError(
        f"dbpool's wire format cannot carry a value of type {_type_name(type(value))}: "
        "it carries msgpack's own types (None, bool, int, float, str, bytes, list, tuple, "
        "dict) and int, Decimal, date, time, datetime, timedelta, UUID, Json and Jsonb "
        "(see docs/protocol.md, Values)"
    )


def _encode_bigint(value: int) -> msgpack.ExtType:
    # msgpack hands an int to ``default`` only when it overflows 64 bits.
    try:
        text = int.__repr__(value)
    except ValueError as exc:  # longer than sys.get_int_max_str_digits()
        raise ValueError(
            f"dbpool's wire format cannot carry this int: its decimal text is too long ({exc})"
        ) from exc
    return msgpack.ExtType(EXT_BIGINT, text.encode("ascii"))


def _encode_decimal(value: Decimal) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_DECIMAL, Decimal.__str__(value).encode("ascii"))


def _encode_date(value: date) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_DATE, date.isoformat(value).encode("ascii"))


def _encode_time(value: time) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_TIME, time.isoformat(value).encode("ascii"))


def _encode_datetime(value: datetime) -> msgpack.ExtType:
    text = datetime.isoformat(value)
    tz = value.tzinfo
    if isinstance(tz, ZoneInfo) and tz.key is not None:
        # A ZoneInfo built from a file without a key keeps only its offset.
        text = f"{text}[{tz.key}]"
    return msgpack.ExtType(EXT_DATETIME, text.encode("ascii"))


def _encode_timedelta(value: timedelta) -> msgpack.ExtType:
    data = msgpack.packb([value.days, value.seconds, value.microseconds])
    return msgpack.ExtType(EXT_TIMEDELTA, data)


def _encode_uuid(value: UUID) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_UUID, value.bytes)


def _json_text(value: Json | Jsonb) -> bytes:
    # As psycopg's JSON dumpers do: the wrapper's own dumps function, else json.dumps.
    dumps = value.dumps or json.dumps
    text = dumps(value.obj)
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def _encode_json(value: Json) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_JSON, _json_text(value))


def _encode_jsonb(value: Jsonb) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_JSONB, _json_text(value))


_Encoder = Callable[[Any], Any]

# Exact types first (one dict lookup); subclasses through _SUBCLASS_ENCODERS, in an order
# where datetime comes before its base class date.
_ENCODERS: dict[type, _Encoder] = {
    int: _encode_bigint,
    Decimal: _encode_decimal,
    date: _encode_date,
    time: _encode_time,
    datetime: _encode_datetime,
    timedelta: _encode_timedelta,
    UUID: _encode_uuid,
    Json: _encode_json,
    Jsonb: _encode_jsonb,
}
_SUBCLASS_ENCODERS: tuple[tuple[type, _Encoder], ...] = (
    (datetime, _encode_datetime),
    (date, _encode_date),
    (time, _encode_time),
    (timedelta, _encode_timedelta),
    (Decimal, _encode_decimal),
    (UUID, _encode_uuid),
    (Json, _encode_json),
    (Jsonb, _encode_jsonb),
    (int, _encode_bigint),
)


def _default(value: Any) -> Any:
    """msgpack's ``default`` hook: called only for values msgpack cannot pack itself."""
    encode = _ENCODERS.get(type(value))
    if encode is None:
        for cls, candidate in _SUBCLASS_ENCODERS:
            if isinstance(value, cls):
                encode = candidate
                break
        else:
            raise _unsupported(value)
    return encode(value)


def packb(obj: Any) -> bytes:
    """Encode *obj* as one dbpool wire value.

    Raises `TypeError` naming the type of a value the wire format cannot carry.
    """
    data: bytes = msgpack.packb(obj, default=_default, use_bin_type=True)
    return data


def make_packer() -> msgpack.Packer:
    """A ``msgpack.Packer`` that encodes exactly as `packb` does.

    For one thread's hot loop: a packer is not thread-safe.  After an exception inside
    ``pack`` call its ``reset()`` before packing again.
    """
    return msgpack.Packer(default=_default, use_bin_type=True)


# --- decoding ----------------------------------------------------------------------------

_INT_TEXT = re.compile(r"-?[0-9]+")

# Exact at any precision and exponent, and raising on bad text whatever the caller's
# thread-local decimal context says.
_DECIMAL_CONTEXT = decimal.Context(
    prec=decimal.MAX_PREC,
    Emax=decimal.MAX_EMAX,
    Emin=decimal.MIN_EMIN,
    traps=[decimal.InvalidOperation],
)


def _decode_bigint(data: bytes) -> int:
    text = data.decode("ascii")
    if not _INT_TEXT.fullmatch(text):
        raise WireError(f"ext type {EXT_BIGINT} (int) is not decimal text: {text[:40]!r}")
    return int(text)


def _decode_decimal(data: bytes) -> Decimal:
    return _DECIMAL_CONTEXT.create_decimal(data.decode("ascii"))


def _decode_date(data: bytes) -> date:
    return date.fromisoformat(data.decode("ascii"))


def _decode_time(data: bytes) -> time:
    return time.fromisoformat(data.decode("ascii"))


def _decode_datetime(data: bytes) -> datetime:
    text = data.decode("ascii")
    if not text.endswith("]"):
        return datetime.fromisoformat(text)
    start = text.find("[")
    if start < 0:
        raise WireError(f"ext type {EXT_DATETIME} (datetime) has an unopened zone: {text!r}")
    value = datetime.fromisoformat(text[:start])
    offset = value.utcoffset()
    if offset is None:
        raise WireError(f"ext type {EXT_DATETIME} (datetime) has a zone but no offset: {text!r}")
    try:
        zone = ZoneInfo(text[start + 1 : -1])
    except (KeyError, ValueError, OSError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise WireError(f"ext type {EXT_DATETIME} (datetime) has an unknown zone: {exc}") from exc
    # The same wall time in the zone, with the fold that gives the offset that was sent.
    for fold in (0, 1):
        candidate = value.replace(tzinfo=zone, fold=fold)
        if candidate.utcoffset() == offset:
            return candidate
    # This zone's rules here disagree with the sender's: keep the instant.
    return value.astimezone(zone)


def _decode_timedelta(data: bytes) -> timedelta:
    parts = msgpack.unpackb(data)
    if not (type(parts) is list and len(parts) == 3 and all(type(part) is int for part in parts)):
        raise WireError(
            f"ext type {EXT_TIMEDELTA} (timedelta) is not [days, seconds, microseconds]: "
            f"{parts!r:.80}"
        )
    days, seconds, microseconds = parts
    return timedelta(days=days, seconds=seconds, microseconds=microseconds)


def _decode_uuid(data: bytes) -> UUID:
    return UUID(bytes=data)


def _decode_json(data: bytes) -> Json:
    return Json(json.loads(data.decode("utf-8")))


def _decode_jsonb(data: bytes) -> Jsonb:
    return Jsonb(json.loads(data.decode("utf-8")))


_DECODERS: dict[int, tuple[str, Callable[[bytes], Any]]] = {
    EXT_BIGINT: ("int", _decode_bigint),
    EXT_DECIMAL: ("Decimal", _decode_decimal),
    EXT_DATE: ("date", _decode_date),
    EXT_TIME: ("time", _decode_time),
    EXT_DATETIME: ("datetime", _decode_datetime),
    EXT_TIMEDELTA: ("timedelta", _decode_timedelta),
    EXT_UUID: ("UUID", _decode_uuid),
    EXT_JSON: ("Json", _decode_json),
    EXT_JSONB: ("Jsonb", _decode_jsonb),
}


def _ext_hook(code: int, data: bytes) -> Any:
    entry = _DECODERS.get(code)
    if entry is None:
        raise WireError(f"unknown msgpack ext type {code} ({len(data)} bytes)")
    name, decode = entry
    try:
        return decode(data)
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"bad data for ext type {code} ({name}): {exc}") from exc


def unpackb(data: bytes | bytearray | memoryview) -> Any:
    """Decode one dbpool wire value that is all of *data*.

    Raises `WireError` for anything else: bytes that are not msgpack, truncated or followed
    by extra bytes, nested too deep, or an ext type that is unknown or whose data is bad.
    One exception: msgpack itself reads its timestamp ext (-1), without the ext hook, and
    returns a ``msgpack.Timestamp``; rejecting it would mean walking every decoded message.
    """
    try:
        return msgpack.unpackb(
            data, raw=False, use_list=True, strict_map_key=False, ext_hook=_ext_hook
        )
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"malformed msgpack: {type(exc).__name__}: {exc}") from exc
