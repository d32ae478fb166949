"""The ``dbpool query`` and ``dbpool status`` commands, as functions.

``dbpool.cli`` wires them into argparse; each takes its output stream,
writes errors to ``sys.stderr`` and returns the exit status (0 or 1).
"""

from __future__ import annotations

import json
import logging
import sys
import unicodedata
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, TextIO

import psycopg
import zmq
from psycopg.types.json import Json, Jsonb

from dbpool.driver import Result
from dbpool.errors import ConnectionError, DBPoolError, ProtocolError

from .sync import Client

__all__ = ["admin_command", "format_result", "format_status", "query_command",
           "status_command"]

logger = logging.getLogger("dbpool.client.commands")

_JSON_OIDS = frozenset({114, 3802})  # json, jsonb
_NUMERIC = (int, float, Decimal)


def query_command(endpoint: str, sql: str, params: list[str] | None, timeout: float,
                  out: TextIO, server_key: str | None = None,
                  client_key: str | None = None, pool: str | None = None) -> int:
    """Run ``sql`` on the server at ``endpoint`` and print its result as a table.

    ``params`` are passed as text for the ``%s`` placeholders.  Prints the
    column headers, the rows and the command tag, as psql's aligned format
    does, and returns 0; on an error prints it to stderr and returns 1.
    """
    try:
        with Client(endpoint, timeout, server_key=server_key, client_key=client_key,
                    pool=pool) as client:
            result = client.query(sql, params)
    except (DBPoolError, psycopg.Error, ValueError, zmq.ZMQError) as exc:
        _print_error("dbpool query", exc)
        return 1
    out.write(format_result(result))
    out.flush()
    return 0


def admin_command(endpoint: str, command: str, pool: str | None, name: str | None,
                  seconds: float | None, timeout: float, out: TextIO,
                  server_key: str | None = None, client_key: str | None = None) -> int:
    """Run an admin operation and print its answer as JSON; return 0, or 1 on an error."""
    try:
        with Client(endpoint, timeout, server_key=server_key, client_key=client_key) as client:
            answer = client.admin(command, pool=pool, name=name, seconds=seconds)
    except (DBPoolError, psycopg.Error, ValueError, zmq.ZMQError) as exc:
        _print_error("dbpool admin", exc)
        return 1
    out.write(json.dumps(answer, indent=2, sort_keys=True, default=str) + "\n")
    out.flush()
    return 0


def status_command(endpoint: str, timeout: float, as_json: bool, out: TextIO,
                   server_key: str | None = None, client_key: str | None = None) -> int:
    """Print the status map of the server at ``endpoint``; return 0, or 1 on an error.

    ``as_json`` prints it as JSON (values JSON has no form for as strings);
    otherwise as indented ``key: value`` lines.
    """
    try:
        with Client(endpoint, timeout, server_key=server_key, client_key=client_key) as client:
            status = client.status()
    except (DBPoolError, psycopg.Error, ValueError, zmq.ZMQError) as exc:
        _print_error("dbpool status", exc)
        return 1
    if as_json:
        out.write(json.dumps(status, indent=2, default=str) + "\n")
    else:
        out.write(format_status(status))
    out.flush()
    return 0


def _print_error(command: str, exc: BaseException) -> None:
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        lines = [f"ERROR:  {diag.message_primary or exc}"]
        if diag.message_detail:
            lines.append(f"DETAIL:  {diag.message_detail}")
        if diag.message_hint:
            lines.append(f"HINT:  {diag.message_hint}")
        text = "\n".join(lines)
    elif isinstance(exc, ConnectionError):
        text = f"{command}: connection error ({exc.reason}): {exc}"
    elif isinstance(exc, ProtocolError):
        text = f"{command}: protocol error ({exc.code}): {exc}"
    else:
        text = f"{command}: {exc}"
    print(text, file=sys.stderr, flush=True)


# -- tables ---------------------------------------------------------------------------


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int, right: bool) -> str:
    fill = " " * (width - _width(text))
    return fill + text if right else text + fill


def _array_text(value: Sequence[Any]) -> str:
    items = []
    for item in value:
        if item is None:
            items.append("NULL")
        elif isinstance(item, list):
            items.append(_array_text(item))
        else:
            text = _cell(item, 0)
            if not text or any(ch in text for ch in ' ,{}"\\') or text.upper() == "NULL":
                text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
            items.append(text)
    return "{" + ",".join(items) + "}"


def _cell(value: Any, type_oid: int) -> str:
    """A value as psql shows it."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, bytes | bytearray | memoryview):
        return "\\x" + bytes(value).hex()
    if isinstance(value, Json | Jsonb):
        return json.dumps(value.obj)
    if type_oid in _JSON_OIDS:
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, list):
        return _array_text(value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def format_result(result: Result) -> str:
    """``result`` as psql's aligned table, followed by its command tag.

    Headers are centred, numbers right-aligned, NULL empty; a statement
    without columns prints its tag alone.
    """
    columns = result.columns
    tag = result.command or f"({len(result.rows)} row{'s' * (len(result.rows) != 1)})"
    if not columns:
        return tag + "\n"
    names = [column.name for column in columns]
    cells = [[_cell(value, column.type_oid).split("\n") for value, column in zip(row, columns,
                                                                                  strict=False)]
             for row in result.rows]
    right = [
        any(isinstance(row[i], _NUMERIC) and not isinstance(row[i], bool)
            for row in result.rows if i < len(row))
        for i in range(len(columns))
    ]
    widths = [_width(name) for name in names]
    for row in cells:
        for i, lines in enumerate(row):
            widths[i] = max(widths[i], *(_width(line) for line in lines))
    out = []
    header = []
    for name, width in zip(names, widths, strict=True):
        spare = width - _width(name)
        header.append(" " * (spare // 2) + name + " " * (spare - spare // 2))
    out.append(" " + " | ".join(header).rstrip())
    out.append("+".join("-" * (width + 2) for width in widths))
    for row in cells:
        height = max((len(lines) for lines in row), default=1)
        for k in range(height):
            parts = []
            for i, lines in enumerate(row):
                line = lines[k] if k < len(lines) else ""
                parts.append(_pad(line, widths[i], right[i]))
            out.append((" " + " | ".join(parts)).rstrip())
    out.append(tag)
    return "\n".join(out) + "\n"


def format_status(status: Mapping[str, Any], indent: int = 0) -> str:
    """A status map as indented ``key: value`` lines, nested maps indented further."""
    lines: list[str] = []
    pad = "  " * indent
    for key, value in status.items():
        if isinstance(value, Mapping):
            if value:
                lines.append(f"{pad}{key}:")
                lines.append(format_status(value, indent + 1).rstrip("\n"))
            else:
                lines.append(f"{pad}{key}: {{}}")
        elif isinstance(value, list | tuple):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(item) for item in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines) + "\n"


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, Mapping):
        return json.dumps(value, default=str)
    return str(value)
