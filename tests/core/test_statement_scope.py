"""The statement classifier of ``dbpool serve``'s isolation: :mod:`dbpool.statement_scope`.

Pure unit tests, no database: every documented form of each scope
(``statement``, ``transaction``, ``session``, ``copy``) and what
:func:`~dbpool.statement_scope.explain` says gave it; the lexing that decides
what is code and what is not (nested comments, ``E''`` strings with escaped
quotes, dollar quotes with tags, quoted and ``U&`` identifiers, psycopg
placeholders); the look-alikes that must stay plain (``INSERT INTO temp``,
``pg_advisory_xact_lock``, a keyword inside a literal or a comment); and two
properties checked over generated combinations: comments and whitespace
around or between a statement's tokens never change its scope, and a
session, transaction or COPY keyword hidden in a string literal or a comment
never makes a plain statement anything but plain.

The end-to-end effects (what the service refuses, replaces and keeps) are in
``tests/server/test_remote_isolation.py``.
"""

from __future__ import annotations

import itertools

import pytest

from dbpool import statement_scope
from dbpool.errors import StatementNotAllowed
from dbpool.statement_scope import (
    SESSION_FUNCTIONS,
    copy_refused,
    explain,
    is_copy,
    scope_of,
)

# -- the documented forms ------------------------------------------------------------------

PLAIN = [
    "SELECT 1",
    "select 1",
    "SELECT %s::int + 1",
    "INSERT INTO t (x) VALUES (%s)",
    "UPDATE t SET x = 1 WHERE id = 2",
    "DELETE FROM t WHERE x = 1",
    "VALUES (1), (2)",
    "WITH a AS (SELECT 1 AS x) SELECT x FROM a",
    "TABLE t",
    "SHOW search_path",
    "NOTIFY ch, 'payload'",
    "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "CREATE TABLE t (x int)",
    "CREATE UNLOGGED TABLE t (x int)",
    "CREATE TABLE temp (x int)",
    "CREATE TABLE t (temp int)",
    "DROP TABLE t",
    "ALTER TABLE t SET (fillfactor = 70)",
    "ALTER ROLE r SET search_path = a",
    "EXPLAIN SELECT 1",
    "CALL my_procedure(1)",
    # SET forms whose effect ends with the transaction
    "SET LOCAL search_path = a",
    "SET LOCAL statement_timeout = 1",
    "Set Local x.y = 1",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET TRANSACTION READ ONLY",
    "SET CONSTRAINTS ALL DEFERRED",
    # two-phase commit of another transaction: not this session's own
    "COMMIT PREPARED 'gid'",
    "ROLLBACK PREPARED 'gid'",
    # transaction-level advisory locks end with their transaction
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_try_advisory_xact_lock(1)",
    "SELECT pg_advisory_xact_lock_shared(1)",
    # the names of session functions, not called
    "SELECT set_config FROM t",
    "SELECT t.pg_advisory_lock FROM t",
    "SELECT setseed",
    # words that start like a keyword
    "SELECT * FROM beginnings",
    "SELECT commitment FROM t",
    "SELECT * FROM settings",
    "SELECT set_configuration(1)",
    "SELECT my_set_config(1)",
    "SELECT pg_advisory_lockx(1)",
    "SELECT temperature FROM t",
    "SELECT * FROM copyright",
    "SELECT x AS do_it FROM t",
    # nothing at all
    "",
    "   ",
    "-- only a comment",
    "/* only a comment */",
]

TRANSACTION = [
    ("BEGIN", "BEGIN"),
    ("begin", "BEGIN"),
    ("BeGiN", "BEGIN"),
    ("BEGIN WORK", "BEGIN"),
    ("BEGIN TRANSACTION", "BEGIN"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", "BEGIN"),
    ("START TRANSACTION", "START"),
    ("START TRANSACTION READ ONLY", "START"),
    ("COMMIT", "COMMIT"),
    ("COMMIT WORK", "COMMIT"),
    ("COMMIT AND CHAIN", "COMMIT"),
    ("END", "END"),
    ("END TRANSACTION", "END"),
    ("ROLLBACK", "ROLLBACK"),
    ("ROLLBACK AND CHAIN", "ROLLBACK"),
    ("ROLLBACK TO SAVEPOINT s", "ROLLBACK"),
    ("ROLLBACK TO s", "ROLLBACK"),
    ("ABORT", "ABORT"),
    ("SAVEPOINT s", "SAVEPOINT"),
    ("RELEASE s", "RELEASE"),
    ("RELEASE SAVEPOINT s", "RELEASE"),
    ("PREPARE TRANSACTION 'gid'", "PREPARE TRANSACTION"),
    ("prepare transaction 'gid'", "PREPARE TRANSACTION"),
]

SESSION = [
    # SET and RESET
    ("SET search_path = a", "SET"),
    ("SET search_path TO a, b", "SET"),
    ("set statement_timeout = 1", "SET"),
    ("SET SESSION statement_timeout = 1", "SET"),
    ("SET TIME ZONE 'UTC'", "SET"),
    ("SET ROLE r", "SET"),
    ("SET SESSION AUTHORIZATION u", "SET"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SET"),
    ("SET x.y = 1", "SET"),
    ("RESET search_path", "RESET"),
    ("RESET ALL", "RESET"),
    ("RESET ROLE", "RESET"),
    # SQL-level prepared statements and cursors
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("PREPARE p (int) AS SELECT $1", "PREPARE"),
    ("DEALLOCATE p", "DEALLOCATE"),
    ("DEALLOCATE PREPARE p", "DEALLOCATE"),
    ("DEALLOCATE ALL", "DEALLOCATE"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DECLARE"),
    ("DECLARE c NO SCROLL CURSOR FOR SELECT 1", "DECLARE"),
    # notifications, libraries, discards, anonymous code
    ("LISTEN ch", "LISTEN"),
    ("UNLISTEN ch", "UNLISTEN"),
    ("UNLISTEN *", "UNLISTEN"),
    ("LOAD 'auto_explain'", "LOAD"),
    ("DISCARD ALL", "DISCARD"),
    ("DISCARD PLANS", "DISCARD"),
    ("DISCARD TEMP", "DISCARD"),
    ("DO $$BEGIN PERFORM 1; END$$", "DO"),
    ("do language plpgsql $body$ begin end $body$", "DO"),
    # temporary objects
    ("CREATE TEMP TABLE t (x int)", "a temporary object"),
    ("CREATE TEMPORARY TABLE t (x int)", "a temporary object"),
    ("create temp table t as select 1", "a temporary object"),
    ("CREATE GLOBAL TEMPORARY TABLE t (x int)", "a temporary object"),
    ("CREATE LOCAL TEMP TABLE t (x int)", "a temporary object"),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", "a temporary object"),
    ("CREATE TEMPORARY VIEW v AS SELECT 1", "a temporary object"),
    ("CREATE TEMP SEQUENCE s", "a temporary object"),
    ("CREATE UNLOGGED TEMP TABLE t (x int)", "a temporary object"),
    ("SELECT 1 AS x INTO TEMP t", "a temporary object"),
    ("SELECT 1 AS x INTO TEMPORARY t", "a temporary object"),
    ("SELECT * INTO TEMP TABLE t FROM s", "a temporary object"),
    ("WITH a AS (SELECT 1) SELECT * INTO TEMP t FROM a", "a temporary object"),
    ("WITH a AS (INSERT INTO s VALUES (1) RETURNING *) SELECT * INTO TEMP t FROM a",
     "a temporary object"),
    ("EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", "a temporary object"),
    # the pg_temp schema, however it is spelled
    ("SELECT * FROM pg_temp.t", "the pg_temp schema"),
    ("CREATE TABLE pg_temp.t (x int)", "the pg_temp schema"),
    ("SELECT pg_temp.f()", "the pg_temp schema"),
    ('SELECT * FROM "pg_temp".t', "the pg_temp schema"),
    ("SELECT * FROM PG_TEMP.t", "the pg_temp schema"),
    ("SELECT * FROM pg_temp_3.t", "the pg_temp schema"),
    ("SELECT * INTO pg_temp.t FROM s", "the pg_temp schema"),
    # session functions, called (schema-qualified, quoted, spaced, commented)
    ("SELECT set_config('search_path', 'a', false)", "set_config()"),
    ("SELECT set_config('search_path', 'a', true)", "set_config()"),
    ("SELECT pg_catalog.set_config('x.y', '1', false)", "set_config()"),
    ('SELECT "pg_catalog"."set_config"(\'x.y\', \'1\', false)', "set_config()"),
    ('SELECT "pg_catalog".set_config(\'x.y\', \'1\', false)', "set_config()"),
    ("SELECT pg_catalog . set_config ( 'x.y', '1', false )", "set_config()"),
    ("SELECT SET_CONFIG('x.y', '1', false)", "set_config()"),
    ("SELECT set_config /* why not */ ('x.y', '1', false)", "set_config()"),
    ("SELECT set_config(%s, %s, false)", "set_config()"),
    ("SELECT set_config(%(name)s, %(value)s, false)", "set_config()"),
    ("SELECT * FROM set_config('x.y', '1', false)", "set_config()"),
    ("WITH a AS (SELECT set_config('x.y', '1', false)) SELECT 1", "set_config()"),
    ("UPDATE t SET v = set_config('x.y', v, false)", "set_config()"),
    ("SELECT setseed(0.5)", "setseed()"),
    ("SELECT pg_advisory_lock(1)", "pg_advisory_lock()"),
    ("SELECT pg_advisory_unlock_all()", "pg_advisory_unlock_all()"),
    ("SELECT dblink_connect('conn', 'dbname=x')", "dblink_connect()"),
    # U& identifiers: their escapes could spell anything
    ('SELECT U&"\\0073et_config"(\'x.y\', \'1\', false)', 'a U&"..." identifier'),
    ('SELECT * FROM U&"\\0070g_temp".t', 'a U&"..." identifier'),
    ('SELECT 1 AS u&"x"', 'a U&"..." identifier'),
]

COPY = [
    "COPY t TO STDOUT",
    "COPY t FROM STDIN",
    "copy t from stdin",
    "Copy t TO STDOUT (FORMAT binary)",
    "COPY (SELECT %s::int) TO STDOUT",
    "COPY t (x, y) FROM STDIN WITH (FORMAT csv, HEADER true)",
    "COPY t TO '/tmp/file'",
    "(COPY t TO STDOUT)",
    "((COPY t TO STDOUT))",
    "/* leading */ COPY t TO STDOUT",
    "-- leading\nCOPY t FROM STDIN",
    "  \n\tCOPY t FROM STDIN",
]


@pytest.mark.parametrize(("sql", "scope"), [
    # PostgreSQL skips empty statements before the real one: so must the scan.
    (";SET statement_timeout = '1ms'", "session"),
    (";; set statement_timeout = '1ms'", "session"),
    ("; /* c */ ; LISTEN x", "session"),
    (";END", "transaction"),
    (";BEGIN", "transaction"),
    ("; COPY t TO STDOUT", "copy"),
    ("; SELECT 1", "statement"),
])
def test_empty_statements_before_a_statement_do_not_hide_it(sql: str, scope: str) -> None:
    assert scope_of(sql) == scope


@pytest.mark.parametrize("sql", PLAIN)
def test_plain_statements_are_statement_scope(sql: str) -> None:
    assert scope_of(sql) == "statement"
    assert explain(sql) == ("statement", "")
    assert not is_copy(sql)


@pytest.mark.parametrize(("sql", "what"), TRANSACTION)
def test_transaction_control_is_transaction_scope(sql: str, what: str) -> None:
    assert scope_of(sql) == "transaction"
    assert explain(sql) == ("transaction", what)
    assert not is_copy(sql)


@pytest.mark.parametrize(("sql", "what"), SESSION)
def test_session_state_is_session_scope(sql: str, what: str) -> None:
    assert scope_of(sql) == "session"
    assert explain(sql) == ("session", what)
    assert not is_copy(sql)


@pytest.mark.parametrize("sql", COPY)
def test_copy_is_copy_scope(sql: str) -> None:
    assert scope_of(sql) == "copy"
    assert explain(sql) == ("copy", "COPY")
    assert is_copy(sql)


@pytest.mark.parametrize("name", sorted(SESSION_FUNCTIONS))
def test_every_session_function_counts_when_called_and_only_then(name: str) -> None:
    assert explain(f"SELECT {name}(1)") == ("session", f"{name}()")
    assert scope_of(f"SELECT x FROM {name.upper()} (1)") == "session"
    assert scope_of(f'SELECT "{name}"(1)') == "session"
    assert scope_of(f"SELECT {name} FROM t") == "statement"  # a column of that name
    assert scope_of(f"SELECT '{name}(1)'") == "statement"
    assert scope_of(f"SELECT 1 -- {name}(1)") == "statement"


def test_session_functions_are_the_documented_ones() -> None:
    assert {"set_config", "setseed", "pg_advisory_lock", "pg_advisory_lock_shared",
            "pg_try_advisory_lock", "pg_try_advisory_lock_shared", "pg_advisory_unlock",
            "pg_advisory_unlock_shared", "pg_advisory_unlock_all", "dblink_connect",
            "dblink_connect_u", "dblink_disconnect"} <= SESSION_FUNCTIONS


def test_copy_refused_is_a_statement_not_allowed_that_says_what_to_use() -> None:
    error = copy_refused()
    assert isinstance(error, StatementNotAllowed)
    assert error.scope == "copy"
    message = str(error)
    assert "copy_to()" in message and "copy_from()" in message
    assert "nothing was copied" in message


def test_the_result_is_cached_and_the_cache_stays_bounded() -> None:
    for i in range(statement_scope._CACHE_SIZE + 100):
        assert scope_of(f"SELECT {i} /* begin */") == "statement"
        assert len(statement_scope._cache) <= statement_scope._CACHE_SIZE
    assert scope_of("SET x.y = 1") == "session"
    assert statement_scope._cache["SET x.y = 1"] == "session"
    assert scope_of("SET x.y = 1") == "session"


# -- lexing ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "scope"), [
    # nested block comments: the comment ends at the matching */, not the first one
    ("/* outer /* inner */ still a comment: BEGIN */ SELECT 1", "statement"),
    ("SELECT 1 /* a /* b */ set_config('x.y', '1', false) */", "statement"),
    ("/* a /* b /* c */ */ */ BEGIN", "transaction"),
    ("/* a /* b */ */ SET x.y = 1", "session"),
    ("/* one */ /* two */ COPY t TO STDOUT", "copy"),
    ("SELECT 1 /* unterminated set_config('x.y', '1', false)", "statement"),
    ("SELECT 1 /* -- */ , set_config('x.y', '1', false)", "session"),
    ("SELECT 1 -- /* \n, set_config('x.y', '1', false)", "session"),
    # E'' strings: a backslash escapes the next character, quotes included
    ("SELECT E'it\\'s set_config(\\'x\\', \\'1\\', false)'", "statement"),
    ("SELECT e'\\\\' , set_config('x.y', '1', false)", "session"),
    ("SELECT E'\\\\\\' , set_config(1) '", "statement"),
    ("SELECT E'a''b set_config(1)'", "statement"),
    ("SELECT E'' , set_config('x.y', '1', false)", "session"),
    # standard strings: a backslash is an ordinary character, '' a quote
    ("SELECT 'a\\' , set_config('x.y', '1', false)", "session"),
    ("SELECT 'it''s BEGIN; SET x.y = 1; set_config(1)'", "statement"),
    ("SELECT '' , pg_advisory_lock(1)", "session"),
    ("SELECT 'unterminated pg_advisory_lock(1)", "statement"),
    # dollar quotes, with and without tags; other tags inside do not close them
    ("SELECT $$ set_config('x.y', '1', false) $$", "statement"),
    ("SELECT $tag$ $$ set_config(1) $$ $tag$", "statement"),
    ("SELECT $a$ x $b$ set_config(1) $b$ $a$", "statement"),
    ("SELECT $_t1$ pg_temp.t $_t1$", "statement"),
    ("SELECT $a$x$a$, set_config('x.y', '1', false)", "session"),
    ("SELECT $$$$, pg_advisory_lock(1)", "session"),
    ("SELECT $q$ unterminated set_config(1)", "statement"),
    ("DO $$ SELECT 1 $$", "session"),
    # $ inside identifiers and positional parameters are not dollar quotes
    ("SELECT a$b$ , set_config('x.y', '1', false)", "session"),
    ("SELECT $1, set_config($2, $3, false)", "session"),
    ("SELECT $1::text, $2", "statement"),
    # quoted identifiers: a name, case kept, "" an embedded quote
    ('SELECT "begin" FROM t', "statement"),
    ('SELECT 1 AS "set_config("', "statement"),
    ('SELECT 1 AS "a"" set_config(1) ""b"', "statement"),
    ('SELECT "SET_CONFIG"(1)', "statement"),  # another (case-sensitive) name
    ('SELECT "set_config"(1)', "session"),
    ('SELECT "pg_temp".t', "session"),
    ('SELECT * FROM "pg_temp_7"."t"', "session"),
    ('SELECT "unterminated set_config(1)', "statement"),
    # U&"..." is an identifier whose escapes could spell anything; U&'...' is a string
    ('SELECT U&"d\\0061t\\+000061"', "session"),
    ('SELECT u&"x"', "session"),
    ("SELECT U&'\\0041 set_config(1)'", "statement"),
    # psycopg placeholders
    ("SELECT %s, %(set)s, %(begin)s", "statement"),
    ("INSERT INTO t VALUES (%(temp)s, %(pg_advisory_lock)s)", "statement"),
    ("SELECT %s INTO TEMP t", "session"),
    ("SELECT pg_advisory_lock(%s)", "session"),
    # INSERT INTO temp (a table named temp) against SELECT ... INTO TEMP
    ("INSERT INTO temp VALUES (1)", "statement"),
    ("INSERT INTO temp (x) SELECT 1", "statement"),
    ("insert into TEMP select * from s", "statement"),
    ("WITH a AS (SELECT 1) INSERT INTO temp SELECT * FROM a", "statement"),
    ("MERGE INTO temp USING s ON true WHEN MATCHED THEN DO NOTHING", "statement"),
    ("UPDATE temp SET x = 1", "statement"),
    ("DELETE FROM temp", "statement"),
    ("SELECT temp FROM t", "statement"),
    ("SELECT t.temp, temporary FROM t", "statement"),
    ("SELECT 1 INTO TEMP t", "session"),
    ("SELECT 1 INTO temporary TABLE t", "session"),
    ("SELECT * FROM s WHERE x IN (SELECT 1) INTO TEMP t", "session"),
    # a keyword in a string or a comment does not count
    ("SELECT 'BEGIN'", "statement"),
    ("SELECT 'COMMIT', 'SET x = 1', 'COPY t TO STDOUT'", "statement"),
    ("SELECT 'CREATE TEMP TABLE t' AS q", "statement"),
    ("SELECT 'pg_temp.t'", "statement"),
    ("SELECT 1 -- BEGIN", "statement"),
    ("SELECT 1 -- SET x = 1\n", "statement"),
    ("/* COPY t TO STDOUT */ SELECT 1", "statement"),
    ("-- LISTEN ch\nSELECT 1", "statement"),
    ("SELECT $$COMMIT$$", "statement"),
    # leading parentheses do not hide the first word
    ("(SELECT 1)", "statement"),
    ("((SELECT 1)) UNION (SELECT 2)", "statement"),
    ("(BEGIN)", "transaction"),
    ("( ( SET x.y = 1 ) )", "session"),
    ("(/* c */(COPY t TO STDOUT))", "copy"),
    ("(((", "statement"),
    # the first word comes after whitespace and comments of every kind
    ("\n\t\r\n BEGIN", "transaction"),
    ("-- a comment\nBEGIN", "transaction"),
    ("/* c */BEGIN", "transaction"),
    ("/**/SET x.y = 1", "session"),
    ("--\nDEALLOCATE ALL", "session"),
])
def test_lexing(sql: str, scope: str) -> None:
    assert scope_of(sql) == scope
    assert explain(sql)[0] == scope


@pytest.mark.parametrize(("sql", "expected"), [
    ("COPY t TO STDOUT", True),
    ("copy t from stdin", True),
    ("CoPy t FROM STDIN", True),
    (" COPY t FROM STDIN", True),
    ("(COPY t TO STDOUT)", True),
    ("/* x */ copy t to stdout", True),
    ("-- x\nCOPY t TO STDOUT", True),
    ("copyright", False),
    ("COPYx t", False),
    ("SELECT 'COPY t TO STDOUT'", False),
    ("/* COPY */ SELECT 1", False),
    ("SELECT 1 -- COPY t TO STDOUT", False),
    ('"copy" t', False),
    ("WITH a AS (SELECT 1) SELECT * FROM a", False),
    ("", False),
])
def test_is_copy_agrees_with_scope_of(sql: str, expected: bool) -> None:
    assert is_copy(sql) is expected
    assert (scope_of(sql) == "copy") is expected


# -- what the scan cannot be fooled by: gaps found, and closed -------------------------------


@pytest.mark.parametrize("sql", [
    "SELECT 1 AS insert INTO TEMP t",
    "SELECT 1 AS merge INTO TEMPORARY t",
])
def test_select_into_temp_after_a_column_named_insert_is_session(sql: str) -> None:
    assert scope_of(sql) == "session"


def test_update_of_pg_settings_is_session() -> None:
    assert scope_of(
        "UPDATE pg_settings SET setting = 'nowhere' WHERE name = 'search_path'") == "session"


# -- properties over generated combinations ------------------------------------------------

#: Statements of every scope, with tokens separated by single spaces (replaced by
#: other separators below; a space replaced inside a literal changes only the
#: literal), and no comments of their own.
CORPUS: list[str] = [
    "SELECT 1",
    "SELECT %s :: int + %(x)s",
    "INSERT INTO temp VALUES ( 1 )",
    "INSERT INTO t ( x ) VALUES ( 'BEGIN' )",
    "SELECT $$SET x = 1$$ , E'\\'LISTEN\\'' AS x",
    "SELECT \"set_config\" FROM t",
    "UPDATE t SET x = 1",
    "SET LOCAL search_path = a",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "COMMIT PREPARED 'gid'",
    "SELECT pg_advisory_xact_lock ( 1 )",
    "( SELECT 1 )",
    "BEGIN",
    "START TRANSACTION READ ONLY",
    "COMMIT",
    "END",
    "ROLLBACK TO SAVEPOINT s",
    "ABORT",
    "SAVEPOINT s",
    "RELEASE SAVEPOINT s",
    "PREPARE TRANSACTION 'gid'",
    "( BEGIN )",
    "SET search_path = nowhere",
    "SET statement_timeout = 1",
    "SET ROLE r",
    "SET SESSION AUTHORIZATION u",
    "RESET ALL",
    "PREPARE p AS SELECT 1",
    "DEALLOCATE ALL",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "LISTEN ch",
    "UNLISTEN *",
    "LOAD 'x'",
    "DISCARD ALL",
    "DO $$BEGIN END$$",
    "CREATE TEMP TABLE t ( x int )",
    "CREATE OR REPLACE TEMPORARY VIEW v AS SELECT 1",
    "SELECT 1 INTO TEMP t",
    "SELECT * FROM pg_temp . t",
    "SELECT pg_catalog . set_config ( 'a.b' , '1' , false )",
    "SELECT pg_advisory_lock ( 1 )",
    "SELECT U&\"\\0061\"",
    "COPY t TO STDOUT",
    "COPY ( SELECT 1 ) TO STDOUT",
    "( COPY t FROM STDIN )",
]

#: Comments and whitespace that may stand before and after a statement.
AROUND = [
    "", " ", "\n", "\t", "\r\n", "  \n\t ",
    "/* c */", "/**/", "/* BEGIN */", "/* SET x = 1; COPY t TO STDOUT */",
    "/* outer /* set_config(1) */ still outer */", "/* pg_temp.t INTO TEMP t */",
    "-- c\n", "--\n", "-- ROLLBACK; SET x = 1\n", "-- /* not a block\n",
    "/* a */ -- b\n /* c */",
]
#: Comments and whitespace that may stand between two tokens (no newline: the
#: corpus's literals may hold spaces, and a newline would end a line comment).
BETWEEN = [" ", "  ", "\t", "/**/", " /* c */ ", "/* LISTEN /* ch */ */", "\t/* U&\"x\" */\t"]


def test_comments_and_whitespace_never_change_the_scope() -> None:
    mismatches = []
    checked = 0
    for sql in CORPUS:
        want = explain(sql)
        for before, after in itertools.product(AROUND, repeat=2):
            wrapped = before + sql + after
            checked += 1
            if explain(wrapped) != want:
                mismatches.append((wrapped, explain(wrapped), want))
        for separator in BETWEEN:
            spaced = sql.replace(" ", separator)
            for before, after in itertools.product(AROUND[:8], ["", " ", "/* end */"]):
                wrapped = before + spaced + after
                checked += 1
                if explain(wrapped) != want:
                    mismatches.append((wrapped, explain(wrapped), want))
    assert checked > 10_000
    assert not mismatches, mismatches[:20]


#: Whole statements that are not plain...
HIDDEN_STATEMENTS = [
    "BEGIN", "begin isolation level serializable", "COMMIT", "ROLLBACK", "END", "ABORT",
    "START TRANSACTION", "SAVEPOINT s", "RELEASE s", "PREPARE TRANSACTION 'x'",
    "SET search_path = nowhere", "SET statement_timeout = 1", "RESET ALL",
    "SET SESSION AUTHORIZATION u", "PREPARE p AS SELECT 1", "DEALLOCATE ALL",
    "DECLARE c CURSOR WITH HOLD FOR SELECT 1", "LISTEN ch", "UNLISTEN *", "LOAD 'x'",
    "DISCARD ALL", "DO $$ BEGIN END $$", "CREATE TEMP TABLE t (x int)",
    "SELECT 1 INTO TEMPORARY t", "SELECT * FROM pg_temp.t", "COPY t TO STDOUT",
    "(COPY t FROM STDIN)",
]
#: ... expressions that make a SELECT not plain ...
HIDDEN_EXPRESSIONS = [
    "pg_temp_3.t", "set_config('search_path', 'x', false)",
    "pg_catalog.set_config('a', 'b', false)", "setseed(0.1)", "pg_advisory_lock(1)",
    "pg_try_advisory_lock_shared(1)", "dblink_connect('x')", 'U&"\\0073et_config"(1)',
]
#: ... and texts that try to end the literal or comment holding them.
HIDDEN_TRAPS = [
    "'; SET x = 1; --", "*/ BEGIN /*", "$$ BEGIN $$", "\\' BEGIN", "-- BEGIN",
    '" ; SET x = 1', "/* nested /* BEGIN */ */", "$q$ COPY t TO STDOUT $q$",
    "', set_config('a', 'b', false), '", "' || pg_advisory_lock(1) || '",
    "\\', set_config('a', 'b', false), E'", "$$, set_config('a', 'b', false), $$",
    "*/ , pg_advisory_lock(1) /*", "\n, set_config('a', 'b', false) --",
    '", pg_temp.t, "',
]
#: Text that would make a statement non-plain if it were code.
HIDDEN = HIDDEN_STATEMENTS + HIDDEN_EXPRESSIONS + HIDDEN_TRAPS


def _literals(text: str) -> list[str]:
    """``text`` as string literals of every kind that can hold it.

    A plain ``'...'`` literal holds a backslash only in the next test: with
    standard_conforming_strings off it would end elsewhere, and the scan
    takes the stricter reading on purpose.
    """
    forms = ["'" + text.replace("'", "''") + "'"] if "\\" not in text else []
    forms += ["E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'",
             "e'" + text.replace("\\", "\\\\").replace("'", "''") + "'"]
    for tag in ("", "q", "_tag1"):
        if f"${tag}$" not in text:
            forms.append(f"${tag}${text}${tag}$")
    return forms


def _comments(text: str) -> list[str]:
    """``text`` as comments of every kind that can hold it."""
    forms = []
    if "/*" not in text and "*/" not in text:
        forms.append(f"/*{text}*/")
        forms.append(f"/* outer /* {text} */ */")
        forms.append(f"/* {text} /* inner */ {text} */")
    if "\n" not in text:
        forms.append(f"--{text}\n")
    return forms


#: Plain statements with a slot for a literal.
LITERAL_SLOTS = [
    "SELECT {}",
    "SELECT {} AS x",
    "SELECT x FROM t WHERE v = {}",
    "INSERT INTO t (v) VALUES ({})",
    "INSERT INTO temp (v) VALUES ({})",
    "UPDATE t SET v = {} WHERE id = %s",
    "WITH a AS (SELECT {} AS v) SELECT v FROM a",
    "(SELECT {})",
    "SELECT length({}) + %(n)s",
    "VALUES ({}, %s)",
]
#: Plain statements with a slot for a comment.
COMMENT_SLOTS = [
    "{}SELECT 1",
    "SELECT {} 1",
    "SELECT 1 {}",
    "SELECT 1{}",
    "({}SELECT 1)",
    "INSERT INTO t{} (v) VALUES (1)",
    "UPDATE t SET v = 1 {}WHERE id = 2",
    "SELECT x FROM t {}",
]


def test_a_keyword_in_a_literal_or_a_comment_never_makes_a_plain_statement_non_plain() -> None:
    offenders = []
    checked = 0
    for text in HIDDEN:
        for literal in _literals(text):
            for slot in LITERAL_SLOTS:
                sql = slot.format(literal)
                checked += 1
                if scope_of(sql) != "statement":
                    offenders.append((sql, explain(sql)))
        for comment in _comments(text):
            for slot in COMMENT_SLOTS:
                sql = slot.format(comment)
                if slot.endswith("{}") and comment.startswith("--"):
                    sql = sql.rstrip("\n")  # a line comment may end the text
                checked += 1
                if scope_of(sql) != "statement":
                    offenders.append((sql, explain(sql)))
    assert checked > 2_000
    assert not offenders, offenders[:20]


@pytest.mark.parametrize("sql", [
    # With standard_conforming_strings off (a server default, or SET LOCAL earlier in
    # the batch), the backslash escapes the quote and the call is code.
    "SELECT 'a\\'' , set_config('search_path', 'nowhere', false) --'",
    "SELECT '\\', pg_advisory_lock(1), '",
])
def test_a_plain_literal_with_a_backslash_is_read_both_ways_and_the_stricter_counts(
        sql: str) -> None:
    assert scope_of(sql) == "session"


def test_a_backslash_that_changes_nothing_leaves_a_statement_plain() -> None:
    assert scope_of("SELECT 'C:\\path', E'\\n' FROM t WHERE x = %s") == "statement"


def test_the_hidden_texts_are_not_plain_as_code() -> None:
    """Outside a literal or a comment, the texts of the property above do count: the
    property tests the literals and comments, not texts the scan ignores anyway."""
    for text in HIDDEN_STATEMENTS:
        assert scope_of(text) != "statement", text
    for text in HIDDEN_EXPRESSIONS:
        assert scope_of(f"SELECT {text}") == "session", text
