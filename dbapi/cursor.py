"""A PEP 249 cursor: statements on its connection, results buffered for fetching."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psycopg

from dbpool.driver import Params, Result

if TYPE_CHECKING:
    from .connection import Connection

__all__ = ["Cursor"]

#: A row of a result: a tuple of values.
Row = tuple[Any, ...]
#: ``description``'s entry per column: name, type code (the column type's OID, which
#: compares equal to STRING, NUMBER...), and five fields PostgreSQL does not fill.
Description = tuple[str, int, None, None, None, None, None]


class Cursor:
    """What :meth:`Connection.cursor` returns (PEP 249)."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        #: Rows :meth:`fetchmany` takes by default.
        self.arraysize = 1
        self.description: list[Description] | None = None
        #: Rows the last statement returned or affected; -1 when not known.
        self.rowcount = -1
        self._rows: list[Row] = []
        self._position = 0
        self._closed = False

    # -- running ---------------------------------------------------------------

    def execute(self, operation: str, parameters: Params = None) -> Cursor:
        """Run one statement (psycopg's ``%s`` / ``%(name)s`` placeholders)."""
        self._check_open()
        self._set(self.connection._run(operation, _params(parameters)))
        return self

    def executemany(self, operation: str, seq_of_parameters: Sequence[Params]) -> Cursor:
        """Run one statement once per set of parameters (through ``dbpool serve``, in
        one round trip); ``rowcount`` is their total."""
        self._check_open()
        results = self.connection._run_many(operation,
                                            [_params(params) for params in seq_of_parameters])
        self._rows, self._position, self.description = [], 0, None
        self.rowcount = sum(max(result.rowcount, 0) for result in results) if results else -1
        return self

    def callproc(self, procname: str, parameters: Sequence[Any] = ()) -> Sequence[Any]:
        """Call a function, ``SELECT * FROM procname(...)``; its result can be fetched.
        Returns the parameters unchanged (PostgreSQL functions have no OUT arguments
        that change them)."""
        self._check_open()
        quoted = ".".join('"' + part.replace('"', '""') + '"' for part in procname.split("."))
        placeholders = ", ".join(["%s"] * len(parameters))
        self.execute(f"SELECT * FROM {quoted}({placeholders})", list(parameters))
        return parameters

    def nextset(self) -> bool | None:
        """Always None: a statement gives one result set here."""
        self._check_open()
        return None

    def setinputsizes(self, sizes: Any) -> None:
        """Accepted and ignored: psycopg adapts parameters by their values."""

    def setoutputsize(self, size: int, column: int | None = None) -> None:
        """Accepted and ignored: results are fetched whole."""

    # -- fetching --------------------------------------------------------------

    def fetchone(self) -> Row | None:
        rows = self._result_rows()
        if self._position >= len(rows):
            return None
        row = rows[self._position]
        self._position += 1
        return row

    def fetchmany(self, size: int | None = None) -> list[Row]:
        rows = self._result_rows()
        count = self.arraysize if size is None else size
        taken = rows[self._position:self._position + count]
        self._position += len(taken)
        return taken

    def fetchall(self) -> list[Row]:
        rows = self._result_rows()
        taken = rows[self._position:]
        self._position = len(rows)
        return taken

    def __iter__(self) -> Iterator[Row]:
        while (row := self.fetchone()) is not None:
            yield row

    # -- life ------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        self._rows = []

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- helpers ---------------------------------------------------------------

    def _set(self, result: Result) -> None:
        if result.columns:
            self.description = [(column.name, column.type_oid, None, None, None, None, None)
                                for column in result.columns]
            self._rows = [tuple(row) for row in result.rows]
        else:
            self.description = None
            self._rows = []
        self._position = 0
        self.rowcount = result.rowcount if result.rowcount is not None else -1

    def _result_rows(self) -> list[Row]:
        self._check_open()
        if self.description is None:
            raise psycopg.ProgrammingError("the last statement gave no result to fetch")
        return self._rows

    def _check_open(self) -> None:
        if self._closed:
            raise psycopg.InterfaceError("the cursor is closed")
        self.connection._live()


def _params(parameters: Any) -> Params:
    if parameters is None or isinstance(parameters, Mapping):
        return parameters
    return list(parameters)
