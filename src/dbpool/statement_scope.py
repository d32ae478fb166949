"""How far a SQL statement's effects reach: its scope, read from its tokens.

``dbpool serve`` runs the statements of many clients on shared connections,
one request after another on the same PostgreSQL session.  A statement whose
effects end with its own transaction is safe to run there; one that changes
the *session* (``SET``, ``LISTEN``, a temporary table, an advisory lock...)
or leaves a transaction open (``BEGIN``) would reach the next client's
statements.  :func:`scope_of` sorts a statement into one of four scopes by a
lexical scan (comments, string literals, dollar quotes and quoted
identifiers are skipped, so ``SELECT 'BEGIN'`` is plain):

``"statement"``
    Its effects end with its transaction: anything not listed below.
``"transaction"``
    Transaction control: ``BEGIN``, ``START TRANSACTION``, ``COMMIT``,
    ``END``, ``ROLLBACK``, ``ABORT``, ``SAVEPOINT``, ``RELEASE``,
    ``PREPARE TRANSACTION``.  (``COMMIT PREPARED`` and ``ROLLBACK PREPARED``
    finish a two-phase transaction without touching the session's own:
    ``"statement"``.)
``"session"``
    Session state that outlives the transaction: ``SET`` and ``RESET``
    (but not ``SET LOCAL``, ``SET TRANSACTION`` or ``SET CONSTRAINTS``),
    ``SET ROLE``, ``SET SESSION AUTHORIZATION``, SQL-level ``PREPARE`` and
    ``DEALLOCATE``, ``DECLARE`` (a cursor ``WITH HOLD`` outlives its
    transaction), ``LISTEN``, ``UNLISTEN``, ``LOAD``, ``DISCARD``, ``DO``
    (its body is code that may do any of these), temporary objects
    (``CREATE TEMP ...``, ``SELECT ... INTO TEMP``, anything naming the
    ``pg_temp`` schema, and ``SET LOCAL search_path`` with ``pg_temp`` in it,
    which makes the next ``CREATE TABLE`` of a batch a temporary one),
    an ``UPDATE`` of ``pg_settings`` (which is ``SET``), and calls of the
    built-in functions that change session state (:data:`SESSION_FUNCTIONS`:
    ``set_config``, session-level advisory locks, ``setseed``, dblink
    connections).
``"copy"``
    ``COPY``, which needs the copy sub-protocol (``copy_to``/``copy_from``).

A statement with a backslash is read twice, with standard_conforming_strings
on and off (a server may default to off, and ``SET LOCAL`` may turn it off
earlier in a batch), and the stricter reading counts.  A ``U&"..."``
identifier outside the first word counts as ``"session"``:
its escapes could spell ``set_config`` or ``pg_temp``.  What a lexical scan
cannot see is code that runs on the server: a function
or procedure of the application's own that changes session state itself.
``docs/protocol.md`` says how the service treats each scope and states this
limit.

A scan costs a few microseconds; results are cached by SQL text, since the
same statements come back again and again.
"""

from __future__ import annotations

import re
from typing import Literal

from .errors import StatementNotAllowed

__all__ = ["SESSION_FUNCTIONS", "Scope", "copy_refused", "explain", "is_copy", "scope_of"]

Scope = Literal["statement", "transaction", "session", "copy"]

#: Built-in functions whose call changes the session beyond its transaction.
SESSION_FUNCTIONS = frozenset({
    "set_config", "setseed",
    "pg_advisory_lock", "pg_advisory_lock_shared",
    "pg_try_advisory_lock", "pg_try_advisory_lock_shared",
    "pg_advisory_unlock", "pg_advisory_unlock_shared", "pg_advisory_unlock_all",
    "dblink_connect", "dblink_connect_u", "dblink_disconnect",
})

_TRANSACTION_WORDS = frozenset({
    "begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release",
})
_SESSION_WORDS = frozenset({
    "reset", "deallocate", "declare", "listen", "unlisten", "load", "discard", "do",
})
#: ``SET <word>`` forms whose effect ends with the transaction.
_SET_LOCAL_WORDS = frozenset({"local", "transaction", "constraints"})
#: Words after which ``TEMP``/``TEMPORARY`` makes a temporary object.
_BEFORE_TEMP = frozenset({"create", "global", "local", "replace", "unlogged"})
_TEMP = frozenset({"temp", "temporary"})

# One token per match.  Literals are matched whole (and dropped); a block
# comment's opening is matched alone, because comments nest (see _skip_comment).
_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<line>--[^\n]*)
    | (?P<block>/\*)
    | (?P<estring>[eE]'(?:[^'\\]|\\.|'')*'?)
    | (?P<string>'(?:[^']|'')*'?)
    | (?P<quoted>(?:[uU]&)?"(?:[^"]|"")*"?)
    | (?P<dollar>\$(?:[A-Za-z_\u0080-\uffff][A-Za-z0-9_\u0080-\uffff]*)?\$)
    | (?P<word>[A-Za-z_\u0080-\uffff][A-Za-z0-9_$\u0080-\uffff]*)
    | (?P<number>[0-9][A-Za-z0-9_.]*)
    | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)

#: Every word that can make a statement anything but "statement".  A statement
#: in which none appears, anywhere, needs no scan: the common case.
_NOTABLE = re.compile(
    r"begin|start|commit|end|rollback|abort|savepoint|release|prepare|set|reset"
    r"|deallocate|declare|listen|load|discard|do|copy|temp|pg_advisory|pg_try_advisory"
    r"|dblink_|u&",
    re.IGNORECASE,
)

#: A plain string literal read as PostgreSQL does with standard_conforming_strings
#: off (a backslash escapes the next character), for the second reading of _scan.
_BACKSLASH_STRING = re.compile(r"'(?:[^'\\]|\\.|'')*'?", re.DOTALL)

_CACHE_SIZE = 4096
#: Statements longer than this (characters) are not cached: the cache stays
#: under about 16 MB whatever clients send.
_CACHED_LENGTH = 4096
_cache: dict[str, Scope] = {}


def scope_of(sql: str) -> Scope:
    """The scope of one statement's effects (see the module docstring)."""
    scope = _cache.get(sql)
    if scope is None:
        scope = _scan(sql)[0] if _NOTABLE.search(sql) else "statement"
        if len(sql) <= _CACHED_LENGTH:  # a long one is scanned again rather than kept
            if len(_cache) >= _CACHE_SIZE:  # many one-off statements: start afresh
                _cache.clear()
            _cache[sql] = scope
    return scope


def is_copy(sql: str) -> bool:
    """Whether the statement is a COPY: :func:`scope_of` is ``"copy"``.

    Cheaper than ``scope_of`` for a statement never seen before, since it
    looks at the first word only: the in-process driver asks it of every
    statement it runs.
    """
    head = sql[:4]
    if head.isalpha():  # the usual case: the statement's keyword comes first
        return head.lower() == "copy" and scope_of(sql) == "copy"
    return scope_of(sql) == "copy"  # space, a comment or a parenthesis first


def copy_refused() -> StatementNotAllowed:
    """The error for a COPY sent through anything but the copy calls."""
    return StatementNotAllowed(
        "COPY needs the copy protocol: use copy_to() or copy_from() (remotely, the "
        "copy_out and copy_in operations); nothing was copied", scope="copy")


def explain(sql: str) -> tuple[Scope, str]:
    """The scope of a statement and what gave it that scope, for messages:
    ``("session", "SET")``, ``("session", "set_config()")``,
    ``("statement", "")``..."""
    return _scan(sql)


def _tokens(sql: str, standard: bool = True, literals: list[str] | None = None) -> list[str]:
    """The statement's words (lowercased; a quoted identifier keeps its quotes and
    case) and punctuation, without whitespace, comments or literals.

    ``standard``: plain strings as with standard_conforming_strings on (a
    backslash is an ordinary character), else as with it off.  ``literals``,
    if given, gets the text of each string literal.
    """
    tokens: list[str] = []
    position, end = 0, len(sql)
    match = _TOKEN.match
    while position < end:
        found = match(sql, position)
        assert found is not None  # "other" matches any one character
        kind = found.lastgroup
        if kind == "string" and not standard:
            found = _BACKSLASH_STRING.match(sql, position)
            assert found is not None
        position = found.end()
        if kind == "word":
            tokens.append(found.group().lower())
        elif kind == "quoted":
            text = found.group()
            if text[0] in "uU":  # U&"...": escapes could spell any name; see _scan
                tokens.append(_UNICODE_IDENTIFIER)
            else:
                tokens.append(text)
        elif kind == "other":
            tokens.append(found.group())
        elif kind == "block":
            position = _skip_comment(sql, position)
        elif kind == "dollar":
            closing = sql.find(found.group(), position)
            if literals is not None:
                literals.append(sql[position:closing])
            position = end if closing < 0 else closing + len(found.group())
        elif literals is not None and kind in ("string", "estring"):
            literals.append(found.group())
    return tokens


def _main_keyword(tokens: list[str], start: int) -> int:
    """Where the statement's own keyword is: after a WITH's common table expressions."""
    if start >= len(tokens) or tokens[start] != "with":
        return start
    depth = 0
    for index in range(start + 1, len(tokens)):
        token = tokens[index]
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
            following = tokens[index + 1] if index + 1 < len(tokens) else ""
            if depth == 0 and following not in (",", "as", "materialized", "not"):
                return index + 1
    return start


#: Stands for a ``U&"..."`` identifier, whose escapes could spell any name.
_UNICODE_IDENTIFIER = "U&"


def _skip_comment(sql: str, position: int) -> int:
    """The end of a block comment opened just before ``position`` (they nest)."""
    depth = 1
    while depth:
        opening = sql.find("/*", position)
        closing = sql.find("*/", position)
        if closing < 0:
            return len(sql)  # unterminated: PostgreSQL will say so
        if 0 <= opening < closing:
            depth += 1
            position = opening + 2
        else:
            depth -= 1
            position = closing + 2
    return position


def _identifier(token: str) -> str:
    """A token as the name it refers to: a quoted identifier without its quotes."""
    if token.startswith('"'):
        return token[1:-1].replace('""', '"') if token.endswith('"') else token[1:]
    return token


def _scan(sql: str) -> tuple[Scope, str]:
    literals: list[str] = []
    tokens = _tokens(sql, literals=literals)
    scope, what = _scan_tokens(tokens)
    if scope == "statement" and tokens[:2] == ["set", "local"] and "search_path" in tokens \
            and any("pg_temp" in literal.lower() for literal in literals):
        # SET LOCAL search_path = 'pg_temp': the next CREATE TABLE of the batch
        # would make a temporary table, though pg_temp is only in a literal here.
        return "session", "pg_temp in the search_path"
    if "\\" in sql:
        # A backslash makes a plain string end elsewhere when standard_conforming_strings
        # is off (a server's default, or SET LOCAL earlier in a batch): read it that
        # way too, and keep the stricter answer.
        other, other_what = _scan_tokens(_tokens(sql, standard=False))
        if other != scope:
            if "copy" in (scope, other):
                return "copy", "COPY"
            return "session", what or other_what
    return scope, what


def _scan_tokens(tokens: list[str]) -> tuple[Scope, str]:
    start = 0  # a statement may open with parentheses, "(SELECT 1)", or with empty
    # statements, ";; SET x = 1", which PostgreSQL skips
    while start < len(tokens) and tokens[start] in ("(", ";"):
        start += 1
    first = tokens[start] if start < len(tokens) else ""
    second = tokens[start + 1] if start + 1 < len(tokens) else ""
    what = first.upper()
    if first == "copy":
        return "copy", what
    if first in _TRANSACTION_WORDS:
        if first in ("commit", "rollback") and second == "prepared":
            return "statement", ""
        return "transaction", what
    if first == "prepare":
        return ("transaction", "PREPARE TRANSACTION") if second == "transaction" \
            else ("session", what)
    if first == "set":
        if second in _SET_LOCAL_WORDS:
            return "statement", ""
        return "session", what
    if first in _SESSION_WORDS:
        return "session", what
    if "pg_settings" in tokens and "update" in tokens:  # the same as SET, say the docs
        return "session", "an UPDATE of pg_settings"
    main = _main_keyword(tokens, start)
    for index, token in enumerate(tokens):
        if token == _UNICODE_IDENTIFIER:
            return "session", 'a U&"..." identifier'  # could spell set_config or pg_temp
        name = _identifier(token)
        if name in SESSION_FUNCTIONS and index + 1 < len(tokens) and tokens[index + 1] == "(":
            return "session", f"{name}()"
        if name.startswith("pg_temp"):
            return "session", "the pg_temp schema"
        if token in _TEMP and index:
            before = tokens[index - 1]
            # "INTO TEMP" makes a table, except in "INSERT INTO temp" or "MERGE INTO
            # temp" (the statement's own keyword, not a column labelled insert),
            # which names one.
            if before in _BEFORE_TEMP or (before == "into" and not (
                    index == main + 2 and tokens[main] in ("insert", "merge"))):
                return "session", "a temporary object"
    return "statement", ""
