"""dbpool.wire: the msgpack value codec of docs/protocol.md, "Values"."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import msgpack  # type: ignore[import-untyped]
import pytest
from psycopg.types.json import Json, Jsonb

from dbpool import wire
from dbpool.wire import WireError, make_packer, packb, unpackb

PARIS = ZoneInfo("Europe/Paris")
PLUS_0530 = timezone(timedelta(hours=5, minutes=30))
MINUS_0345 = timezone(-timedelta(hours=3, minutes=45))


def roundtrip(value: Any) -> Any:
    return unpackb(packb(value))


def ext_code(value: Any) -> int | None:
    """The ext code *value* is sent as, or None when it is a msgpack type of its own."""
    raw = msgpack.unpackb(packb(value), strict_map_key=False)
    return raw.code if isinstance(raw, msgpack.ExtType) else None


def ext(code: int, data: bytes) -> bytes:
    """An ext value as bytes, built by hand so that any code (-128 to 127) can be sent."""
    header = b"\xc9" + len(data).to_bytes(4, "big")  # ext 32
    return header + code.to_bytes(1, "big", signed=True) + data


# --- constants ---------------------------------------------------------------------------


def test_ext_codes_are_the_spec_table() -> None:
    codes = (
        wire.EXT_BIGINT,
        wire.EXT_DECIMAL,
        wire.EXT_DATE,
        wire.EXT_TIME,
        wire.EXT_DATETIME,
        wire.EXT_TIMEDELTA,
        wire.EXT_UUID,
        wire.EXT_JSON,
        wire.EXT_JSONB,
    )
    assert codes == tuple(range(1, 10))
    assert issubclass(WireError, ValueError)


# --- msgpack's own types -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        0,
        -1,
        1.5,
        -0.0,
        math.inf,
        -math.inf,
        "",
        "héllo wörld ✓ 日本語 🐘",
        b"",
        b"\x00\xff",
        [],
        {},
        {"a": 1, "b": [1, 2]},
        {1: "int key", None: "nil key", b"k": "bin key"},
    ],
)
def test_native_values_roundtrip_unchanged(value: Any) -> None:
    decoded = roundtrip(value)
    assert decoded == value
    assert type(decoded) is type(value)
    assert ext_code(value) is None


def test_bool_stays_bool_not_int() -> None:
    assert roundtrip([True, False, 1, 0]) == [True, False, 1, 0]
    assert [type(v) for v in roundtrip([True, 1])] == [bool, int]


def test_float_nan_roundtrips() -> None:
    decoded = roundtrip(math.nan)
    assert type(decoded) is float
    assert math.isnan(decoded)


@pytest.mark.parametrize("value", [2**64 - 1, 2**63, 2**63 - 1, -(2**63), -1, 0])
def test_ints_within_64_bits_are_native(value: int) -> None:
    raw = msgpack.unpackb(packb(value))
    assert type(raw) is int
    assert raw == value
    assert roundtrip(value) == value


@pytest.mark.parametrize(
    "value",
    [bytearray(b"ab\x00c"), memoryview(b"ab\x00c"), bytearray(), memoryview(b"")],
)
def test_byte_buffers_arrive_as_bytes(value: bytearray | memoryview) -> None:
    decoded = roundtrip(value)
    assert type(decoded) is bytes
    assert decoded == bytes(value)
    assert ext_code(value) is None


def test_tuples_arrive_as_lists() -> None:
    decoded = roundtrip((1, ("a", None), []))
    assert decoded == [1, ["a", None], []]
    assert type(decoded) is list
    assert type(decoded[1]) is list


def test_arrays_with_nulls() -> None:
    value = [[1, None, 3], [None, None], [], [[None, "x"], None]]
    assert roundtrip(value) == value


# --- ext types ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 10**40, -(10**40), 2**200 + 1])
def test_big_ints(value: int) -> None:
    assert ext_code(value) == wire.EXT_BIGINT
    decoded = roundtrip(value)
    assert type(decoded) is int
    assert decoded == value


@pytest.mark.parametrize(
    "value",
    [
        Decimal("1.50"),
        Decimal("0"),
        Decimal("-0"),
        Decimal("0.000"),
        Decimal("1E+3"),
        Decimal("-123456789012345678901234567890.123456789012345678901234567890"),
        Decimal("1E-999999"),
        Decimal("Infinity"),
        Decimal("-Infinity"),
    ],
)
def test_decimals_keep_value_and_exponent(value: Decimal) -> None:
    assert ext_code(value) == wire.EXT_DECIMAL
    decoded = roundtrip(value)
    assert type(decoded) is Decimal
    assert str(decoded) == str(value)
    assert decoded.as_tuple() == value.as_tuple()


@pytest.mark.parametrize("text", ["NaN", "-NaN", "sNaN", "NaN123"])
def test_decimal_nans(text: str) -> None:
    decoded = roundtrip(Decimal(text))
    assert type(decoded) is Decimal
    assert decoded.is_nan()
    assert decoded.is_snan() == Decimal(text).is_snan()
    assert str(decoded) == text


def test_decimal_decoding_ignores_the_callers_context() -> None:
    import decimal

    with decimal.localcontext() as ctx:
        ctx.prec = 3
        ctx.traps[decimal.InvalidOperation] = False
        assert roundtrip(Decimal("1.23456789")) == Decimal("1.23456789")
        with pytest.raises(WireError):
            unpackb(ext(wire.EXT_DECIMAL, b"garbage"))


@pytest.mark.parametrize("value", [date.min, date.max, date(2024, 2, 29), date(1, 12, 31)])
def test_dates(value: date) -> None:
    assert ext_code(value) == wire.EXT_DATE
    decoded = roundtrip(value)
    assert type(decoded) is date
    assert decoded == value


@pytest.mark.parametrize(
    "value",
    [
        time(0, 0),
        time(23, 59, 59, 999999),
        time(12, 34, 56, 789),
        time(12, 0, tzinfo=UTC),
        time(12, 0, 1, 5, tzinfo=PLUS_0530),
        time(1, 2, 3, tzinfo=MINUS_0345),
    ],
)
def test_times(value: time) -> None:
    assert ext_code(value) == wire.EXT_TIME
    decoded = roundtrip(value)
    assert type(decoded) is time
    assert decoded == value
    assert decoded.microsecond == value.microsecond
    assert decoded.utcoffset() == value.utcoffset()
    assert (decoded.tzinfo is None) == (value.tzinfo is None)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 5, 17, 13, 45, 12, 123456),
        datetime.min,
        datetime.max,
        datetime(2024, 5, 17, 13, 45, tzinfo=UTC),
        datetime(2024, 5, 17, 13, 45, 0, 1, tzinfo=PLUS_0530),
        datetime(1970, 1, 1, tzinfo=MINUS_0345),
        datetime(2024, 5, 17, 13, 45, tzinfo=timezone(timedelta(seconds=3723, microseconds=5))),
    ],
)
def test_datetimes_naive_and_fixed_offset(value: datetime) -> None:
    assert ext_code(value) == wire.EXT_DATETIME
    decoded = roundtrip(value)
    assert type(decoded) is datetime
    assert decoded == value
    assert decoded.replace(tzinfo=None) == value.replace(tzinfo=None)  # same wall time
    assert decoded.utcoffset() == value.utcoffset()
    assert (decoded.tzinfo is None) == (value.tzinfo is None)


def test_datetime_utc_decodes_to_timezone_utc() -> None:
    decoded = roundtrip(datetime(2024, 1, 1, tzinfo=UTC))
    assert decoded.tzinfo is UTC


@pytest.mark.parametrize(
    "value",
    [
        datetime(2024, 1, 15, 9, 30, tzinfo=PARIS),  # winter, +01:00
        datetime(2024, 7, 15, 9, 30, 0, 250, tzinfo=PARIS),  # summer, +02:00
        datetime(2024, 10, 27, 2, 30, tzinfo=PARIS),  # ambiguous, first (fold 0)
        datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=PARIS),  # ambiguous, second
        datetime(2024, 3, 31, 2, 30, tzinfo=PARIS),  # in the spring gap
        datetime(2024, 3, 31, 2, 30, fold=1, tzinfo=PARIS),
        datetime(2024, 6, 1, 12, tzinfo=ZoneInfo("UTC")),
        datetime(2024, 6, 1, 12, tzinfo=ZoneInfo("America/St_Johns")),
    ],
)
def test_datetimes_with_zoneinfo_keep_their_zone(value: datetime) -> None:
    assert isinstance(value.tzinfo, ZoneInfo)
    decoded = roundtrip(value)
    assert type(decoded) is datetime
    assert isinstance(decoded.tzinfo, ZoneInfo)
    assert decoded.tzinfo.key == value.tzinfo.key
    assert decoded.utcoffset() == value.utcoffset()
    assert decoded.replace(tzinfo=None) == value.replace(tzinfo=None)
    assert decoded.fold == value.fold
    assert decoded == value
    assert decoded.timestamp() == value.timestamp()


def test_zoneinfo_key_is_sent_after_the_iso_text() -> None:
    raw = msgpack.unpackb(packb(datetime(2024, 1, 15, 9, 30, tzinfo=PARIS)))
    assert raw == msgpack.ExtType(wire.EXT_DATETIME, b"2024-01-15T09:30:00+01:00[Europe/Paris]")


def test_keyless_zoneinfo_keeps_its_offset() -> None:
    with open("/usr/share/zoneinfo/Europe/Paris", "rb") as f:
        zone = ZoneInfo.from_file(f)
    assert zone.key is None
    value = datetime(2024, 7, 1, 12, tzinfo=zone)
    decoded = roundtrip(value)
    assert not isinstance(decoded.tzinfo, ZoneInfo)
    assert decoded.utcoffset() == timedelta(hours=2)
    assert decoded == value


def test_zone_whose_rules_disagree_keeps_the_instant() -> None:
    # Paris is +02:00 in July: a sender claiming +05:00 has other rules for the zone.
    decoded = unpackb(ext(wire.EXT_DATETIME, b"2024-07-01T12:00:00+05:00[Europe/Paris]"))
    assert decoded == datetime(2024, 7, 1, 7, tzinfo=UTC)
    assert isinstance(decoded.tzinfo, ZoneInfo)
    assert decoded.tzinfo.key == "Europe/Paris"


@pytest.mark.parametrize(
    "value",
    [
        timedelta(0),
        timedelta(days=-1),
        timedelta(microseconds=-1),
        timedelta(days=3, seconds=7, microseconds=123456),
        -timedelta(days=3, seconds=7, microseconds=123456),
        timedelta.max,
        timedelta.min,
    ],
)
def test_timedeltas(value: timedelta) -> None:
    assert ext_code(value) == wire.EXT_TIMEDELTA
    decoded = roundtrip(value)
    assert type(decoded) is timedelta
    assert decoded == value


def test_timedelta_data_is_a_msgpack_array() -> None:
    raw = msgpack.unpackb(packb(-timedelta(microseconds=1)))
    assert raw.code == wire.EXT_TIMEDELTA
    assert msgpack.unpackb(raw.data) == [-1, 86399, 999999]


@pytest.mark.parametrize(
    "value",
    [uuid.UUID("12345678-1234-5678-1234-567812345678"), uuid.UUID(int=0), uuid.uuid4()],
)
def test_uuids(value: uuid.UUID) -> None:
    raw = msgpack.unpackb(packb(value))
    assert raw == msgpack.ExtType(wire.EXT_UUID, value.bytes)
    decoded = roundtrip(value)
    assert type(decoded) is uuid.UUID
    assert decoded == value


NESTED_JSON: dict[str, Any] = {
    "a": [1, 2.5, None, True, {"b": "ü ✓"}],
    "c": {"d": {"e": []}},
    "n": None,
}


@pytest.mark.parametrize(("wrapper", "code"), [(Json, wire.EXT_JSON), (Jsonb, wire.EXT_JSONB)])
@pytest.mark.parametrize("obj", [NESTED_JSON, [1, [2, [3]]], "text", 42, None, {}])
def test_json_wrappers(wrapper: type[Json] | type[Jsonb], code: int, obj: Any) -> None:
    assert ext_code(wrapper(obj)) == code
    decoded = roundtrip(wrapper(obj))
    assert type(decoded) is wrapper
    assert decoded.obj == obj


def test_json_uses_the_wrappers_dumps() -> None:
    value = Jsonb({"a": 1}, dumps=lambda obj: '{"a": 2}')
    assert roundtrip(value).obj == {"a": 2}


def test_json_that_cannot_be_dumped_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        packb(Json({"a": {1, 2}}))


def test_subclasses_travel_as_their_base_type() -> None:
    class MyDateTime(datetime):
        def isoformat(self, *args: Any, **kwargs: Any) -> str:
            return "not ISO"

    class MyDate(date):
        pass

    value = MyDateTime(2024, 1, 2, 3, 4, 5)
    assert ext_code(value) == wire.EXT_DATETIME
    assert roundtrip(value) == datetime(2024, 1, 2, 3, 4, 5)
    assert ext_code(MyDate(2024, 1, 2)) == wire.EXT_DATE
    assert roundtrip(MyDate(2024, 1, 2)) == date(2024, 1, 2)


def test_a_row_of_mixed_values() -> None:
    row = [
        1,
        None,
        "text",
        Decimal("12.30"),
        [date(2024, 1, 1), None, date(2024, 1, 2)],
        datetime(2024, 1, 1, 12, tzinfo=PARIS),
        uuid.UUID(int=5),
        10**30,
        {"k": [Decimal("1"), None]},
        (timedelta(seconds=5), b"\x00"),
        Jsonb({"x": [1, None]}),
    ]
    result = {"columns": [["a", 23], ["b", 25]], "rows": [row, row], "rowcount": 2}
    decoded = roundtrip(result)
    expected_row = [*row[:9], [timedelta(seconds=5), b"\x00"]]
    for got in decoded["rows"]:
        assert got[:10] == expected_row
        assert type(got[3]) is Decimal
        assert str(got[3]) == "12.30"
        assert got[5].tzinfo.key == "Europe/Paris"
        assert type(got[10]) is Jsonb
        assert got[10].obj == {"x": [1, None]}
    assert decoded["columns"] == [["a", 23], ["b", 25]]


def test_ext_values_as_map_keys() -> None:
    value = {Decimal("1.5"): "d", date(2024, 1, 1): "date", 2**70: "big"}
    assert roundtrip(value) == value


# --- unsupported values ------------------------------------------------------------------


class Custom:
    pass


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (object(), "object"),
        ({1, 2}, "set"),
        (frozenset(), "frozenset"),
        (1 + 2j, "complex"),
        (Custom(), f"{__name__}.Custom"),
        ([1, {"k": Custom()}], f"{__name__}.Custom"),
        ({Custom(): 1}, f"{__name__}.Custom"),
    ],
)
def test_unsupported_types_raise_type_error(value: Any, name: str) -> None:
    message = f"dbpool's wire format cannot carry a value of type {name}: "
    with pytest.raises(TypeError) as info:
        packb(value)
    assert str(info.value).startswith(message)
    with pytest.raises(TypeError) as info:
        make_packer().pack(value)
    assert str(info.value).startswith(message)


def test_unsupported_values_are_never_stringified() -> None:
    class Stringy:
        def __str__(self) -> str:
            return "a string"

    with pytest.raises(TypeError, match="Stringy"):
        packb(["ok", Stringy()])


def test_int_too_long_for_decimal_text() -> None:
    import sys

    limit = sys.get_int_max_str_digits()
    if limit == 0:
        pytest.skip("no int digit limit in this interpreter")
    with pytest.raises(ValueError, match="too long"):
        packb(10 ** (limit + 1))


# --- packers -----------------------------------------------------------------------------


def test_make_packer_encodes_as_packb() -> None:
    packer = make_packer()
    values: list[Any] = [
        {"id": 1, "ok": [Decimal("1.5"), datetime(2024, 1, 1, tzinfo=PARIS), b"x"]},
        [2**64, bytearray(b"y"), (1, 2)],
        "plain",
    ]
    for value in values:
        assert packer.pack(value) == packb(value)
    assert unpackb(packer.pack(values[0])) == roundtrip(values[0])


def test_native_data_never_calls_the_default_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[object] = []

    def failing_default(value: object) -> object:
        calls.append(value)
        raise AssertionError(f"default hook called for {value!r}")

    monkeypatch.setattr(wire, "_default", failing_default)
    native = {
        "id": 2**64 - 1,
        "rows": [[1, -(2**63), 1.5, "x", b"y", bytearray(b"z"), memoryview(b"w"), None, True]],
        "nested": ({"t": (1, [2, (3,)])}, {}, []),
        7: {None: False},
    }
    packb(native)
    make_packer().pack(native)
    assert calls == []
    # The hook is really the one in use: a non-native value reaches it.
    with pytest.raises(AssertionError, match="default hook called"):
        packb([Decimal(1)])
    with pytest.raises(AssertionError, match="default hook called"):
        packb(2**64)
    assert len(calls) == 2


# --- malformed input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xc1", id="never-used byte"),
        pytest.param(b"", id="empty"),
        pytest.param(packb({"a": [1, 2, 3]})[:-1], id="truncated"),
        pytest.param(b"\x92\x01", id="truncated array"),
        pytest.param(packb({"a": 1}) + b"\x00", id="trailing byte"),
        pytest.param(packb(1) + packb(2), id="two values"),
        pytest.param(b"\xdd\xff\xff\xff\xff", id="huge array header"),
        pytest.param(b"\x91" * 5000 + b"\x00", id="nested too deep"),
        pytest.param(b"\xa2\xff\xfe", id="invalid utf-8 str"),
        pytest.param(b"\x81\x91\x01\x02", id="unhashable map key"),
        pytest.param(b"\xd5\xff\x00\x00", id="bad msgpack timestamp"),
    ],
)
def test_malformed_msgpack_raises_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        unpackb(data)


def test_wire_error_chains_the_msgpack_error() -> None:
    with pytest.raises(WireError) as info:
        unpackb(packb(1) + b"\x00")
    assert isinstance(info.value.__cause__, msgpack.ExtraData)


@pytest.mark.parametrize("code", [0, 10, 42, 127, -2, -128])
def test_unknown_ext_codes_raise_wire_error(code: int) -> None:
    with pytest.raises(WireError, match=f"unknown msgpack ext type {code}"):
        unpackb(ext(code, b"data"))
    with pytest.raises(WireError, match=f"unknown msgpack ext type {code}"):
        unpackb(b"\x81\xa4rows\x91\x92\x01" + ext(code, b""))


@pytest.mark.parametrize(
    ("code", "data"),
    [
        (wire.EXT_BIGINT, b""),
        (wire.EXT_BIGINT, b"12x"),
        (wire.EXT_BIGINT, b" 12"),
        (wire.EXT_BIGINT, b"1_000"),
        (wire.EXT_BIGINT, "١٢".encode()),
        (wire.EXT_BIGINT, b"9" * 10_000),  # over the int digit limit
        (wire.EXT_DECIMAL, b"garbage"),
        (wire.EXT_DECIMAL, b""),
        (wire.EXT_DECIMAL, b"1.5\xff"),
        (wire.EXT_DATE, b"garbage"),
        (wire.EXT_DATE, b"2024-02-30"),
        (wire.EXT_DATE, b"2024-01-01T00:00"),
        (wire.EXT_TIME, b"25:00"),
        (wire.EXT_TIME, b"12:00[Europe/Paris]"),
        (wire.EXT_DATETIME, b"yesterday"),
        (wire.EXT_DATETIME, b"2024-01-01T00:00:00+01:00]"),
        (wire.EXT_DATETIME, b"2024-01-01T00:00:00[Europe/Paris]"),  # zone, no offset
        (wire.EXT_DATETIME, b"2024-01-01T00:00:00+01:00[Nowhere/Special]"),
        (wire.EXT_DATETIME, b"2024-01-01T00:00:00+01:00[../../etc/passwd]"),
        (wire.EXT_DATETIME, b"2024-01-01T00:00:00+01:00[]"),
        (wire.EXT_TIMEDELTA, b""),
        (wire.EXT_TIMEDELTA, b"\x93\x01\x02"),
        (wire.EXT_TIMEDELTA, msgpack.packb([1, 2])),
        (wire.EXT_TIMEDELTA, msgpack.packb([1, 2, 3, 4])),
        (wire.EXT_TIMEDELTA, msgpack.packb([1, 2, 3.5])),
        (wire.EXT_TIMEDELTA, msgpack.packb([True, 2, 3])),
        (wire.EXT_TIMEDELTA, msgpack.packb({"days": 1})),
        (wire.EXT_TIMEDELTA, msgpack.packb([10**9, 0, 0])),  # beyond timedelta.max
        (wire.EXT_TIMEDELTA, msgpack.packb([1, 2, 3]) + b"\x00"),
        (wire.EXT_UUID, b"\x00" * 15),
        (wire.EXT_UUID, b"\x00" * 17),
        (wire.EXT_UUID, b""),
        (wire.EXT_JSON, b"{not json"),
        (wire.EXT_JSON, b""),
        (wire.EXT_JSONB, b'"\xff"'),
        (wire.EXT_JSONB, b"[" * 100_000),
    ],
)
def test_bad_ext_data_raises_wire_error(code: int, data: bytes) -> None:
    with pytest.raises(WireError, match=f"ext type {code}"):
        unpackb(ext(code, data))


def test_ext_helper_builds_what_msgpack_reads() -> None:
    assert msgpack.unpackb(ext(5, b"ab")) == msgpack.ExtType(5, b"ab")
    assert unpackb(ext(wire.EXT_UUID, bytes(16))) == uuid.UUID(int=0)


def test_ext_3_garbage_and_ext_7_of_15_bytes() -> None:
    with pytest.raises(WireError, match=r"bad data for ext type 3 \(date\)"):
        unpackb(ext(3, b"not a date at all"))
    with pytest.raises(WireError, match=r"bad data for ext type 7 \(UUID\)"):
        unpackb(ext(7, bytes(range(15))))


def test_bad_ext_data_chains_its_cause() -> None:
    with pytest.raises(WireError) as info:
        unpackb(ext(wire.EXT_UUID, b"\x00" * 15))
    assert isinstance(info.value.__cause__, ValueError)
    assert not isinstance(info.value.__cause__, WireError)


def test_unpackb_accepts_buffers() -> None:
    data = packb({"a": Decimal("2.5")})
    assert unpackb(memoryview(data)) == {"a": Decimal("2.5")}
    assert unpackb(bytearray(data)) == {"a": Decimal("2.5")}
