"""What the ``postgresql+dbpool://`` dialect supports, for SQLAlchemy's compliance suite.

SQLAlchemy's third-party dialect suite (``sqlalchemy.testing.suite``) asks a
dialect's ``Requirements`` class which features to test.
:class:`~sqlalchemy.testing.requirements.SuiteRequirements` closes most of
them by default; this class opens every one PostgreSQL and the service
support, and closes the rest with the reason, so that no test is skipped
without one.  The suite runs against the dialect in CI
(``tests/sqlalchemy_suite``); the README has its counts.

Importing this module needs SQLAlchemy's testing package; nothing else in
dbpool imports it.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements

__all__ = ["Requirements"]

# SQLAlchemy's testing helpers carry no annotations.
_open: Any = exclusions.open
_closed: Any = exclusions.closed
_skip_if: Any = exclusions.skip_if


def _no(reason: str) -> Any:
    return _closed(reason)


# The reasons, each said once.
_SESSION = ("dbpool serve: session state does not outlive a transaction (the service "
            "runs each statement outside a lease on any connection, and replaces a "
            "connection whose session a lease changed)")
_TEMP = ("dbpool serve: temporary tables are session state; the suite creates one in one "
         "transaction and uses it in the next, on what the service gives as another "
         "connection")
_NO_RANGE = "dbpool's wire format carries no range value (docs/protocol.md, Values)"
_PG = "PostgreSQL does not have it"


class Requirements(SuiteRequirements):
    """The suite's requirements for ``postgresql+dbpool://`` (see the module docstring)."""

    # -- what the service cannot give --------------------------------------------------

    @property
    def temporary_tables(self) -> Any:
        return _no(_TEMP)

    @property
    def temp_table_reflection(self) -> Any:
        return _no(_TEMP)

    @property
    def temp_table_names(self) -> Any:
        return _no(_TEMP)

    @property
    def has_temp_table(self) -> Any:
        return _no(_TEMP)

    @property
    def temporary_views(self) -> Any:
        return _no(_TEMP)

    @property
    def temp_table_comment_reflection(self) -> Any:
        return _no(_TEMP)

    @property
    def create_temp_table_as(self) -> Any:
        return _no(_TEMP)

    @property
    def default_schema_name_switch(self) -> Any:
        return _no(_SESSION + "; the suite switches search_path with a session-wide SET")

    @property
    def server_side_cursors(self) -> Any:
        return _no("dbpool serve streams results with its own stream op; the DB-API "
                   "cursor fetches a result whole, so the dialect has no named cursors")

    @property
    def two_phase_transactions(self) -> Any:
        return _no("dbpool.dbapi has no tpc_* methods: a prepared transaction outlives "
                   "the lease that would prepare it")

    @property
    def async_dialect(self) -> Any:
        return _no("the dialect is synchronous (dbpool.client.AsyncClient has no "
                   "SQLAlchemy asyncio dialect yet)")

    @property
    def range_types(self) -> Any:
        return _no(_NO_RANGE)

    @property
    def json_deserializer_binary(self) -> Any:
        return _no("JSON arrives decoded by psycopg on the server, never as bytes")

    # -- what PostgreSQL has, which SuiteRequirements closes by default ----------------

    create_table_as = property(lambda self: _open())
    table_ddl_if_exists = property(lambda self: _open())
    index_ddl_if_exists = property(lambda self: _open())
    uuid_data_type = property(lambda self: _open())
    unique_constraints_reflect_as_index = property(lambda self: _open())
    table_value_constructor = property(lambda self: _open())
    boolean_col_expressions = property(lambda self: _open())
    nullsordering = property(lambda self: _open())
    intersect = property(lambda self: _open())
    except_ = property(lambda self: _open())
    window_functions = property(lambda self: _open())
    window_range = property(lambda self: _open())
    window_range_numeric = property(lambda self: _open())
    window_range_non_numeric = property(lambda self: _open())
    ctes = property(lambda self: _open())
    ctes_with_update_delete = property(lambda self: _open())
    ctes_with_values = property(lambda self: _open())
    ctes_on_dml = property(lambda self: _open())
    tuple_in = property(lambda self: _open())
    views = property(lambda self: _open())
    cross_schema_fk_reflection = property(lambda self: _open())
    foreign_key_constraint_name_reflection = property(lambda self: _open())
    implicit_default_schema = property(lambda self: _open())
    reflects_pk_names = property(lambda self: _open())
    reflect_tables_no_columns = property(lambda self: _open())
    comment_reflection = property(lambda self: _open())
    comment_reflection_full_unicode = property(lambda self: _open())
    constraint_comment_reflection = property(lambda self: _open())
    column_collation_reflection = property(lambda self: _open())
    schema_create_delete = property(lambda self: _open())
    foreign_key_constraint_option_reflection_ondelete = property(lambda self: _open())
    fk_constraint_option_reflection_ondelete_restrict = property(lambda self: _open())
    fk_constraint_option_reflection_ondelete_noaction = property(lambda self: _open())
    foreign_key_constraint_option_reflection_onupdate = property(lambda self: _open())
    fk_constraint_option_reflection_onupdate_restrict = property(lambda self: _open())
    create_or_replace_view = property(lambda self: _open())
    index_reflects_included_columns = property(lambda self: _open())
    indexes_check_column_order = property(lambda self: _open())
    indexes_with_expressions = property(lambda self: _open())
    reflect_indexes_with_expressions = property(lambda self: _open())
    inline_check_constraint_reflection = property(lambda self: _open())
    check_constraint_reflection = property(lambda self: _open())
    unicode_ddl = property(lambda self: _open())
    datetime_interval = property(lambda self: _open())
    datetime_literals = property(lambda self: _open())
    datetime_timezone = property(lambda self: _open())
    time_timezone = property(lambda self: _open())
    timestamp_microseconds = property(lambda self: _open())
    datetime_historic = property(lambda self: _open())
    datetime_timezone_historic = property(lambda self: _open())
    date_historic = property(lambda self: _open())
    autocommit = property(lambda self: _open())
    skip_autocommit_rollback = property(lambda self: _open())
    float_or_double_precision_behaves_generically = property(lambda self: _open())
    isolation_level = property(lambda self: _open())
    array_type = property(lambda self: _open())
    json_type = property(lambda self: _open())
    precision_numerics_enotation_small = property(lambda self: _open())
    precision_numerics_many_significant_digits = property(lambda self: _open())
    precision_numerics_retains_significant_digits = property(lambda self: _open())
    server_defaults = property(lambda self: _open())
    expression_server_defaults = property(lambda self: _open())
    aggregate_order_by = property(lambda self: _open())
    infinity_floats = property(lambda self: _open())
    savepoints = property(lambda self: _open())
    update_from = property(lambda self: _open())
    delete_from = property(lambda self: _open())
    mod_operator_as_percent_sign = property(lambda self: _open())
    percent_schema_names = property(lambda self: _open())
    order_by_label_with_expression = property(lambda self: _open())
    computed_columns_stored = property(lambda self: _open())
    computed_columns_default_persisted = property(lambda self: _open())
    computed_columns_reflect_persisted = property(lambda self: _open())
    supports_distinct_on = property(lambda self: _open())
    identity_columns = property(lambda self: _open())
    identity_columns_standard = property(lambda self: _open())
    regexp_match = property(lambda self: _open())
    regexp_replace = property(lambda self: _open())
    fetch_first = property(lambda self: _open())
    fetch_ties = property(lambda self: _open())
    fetch_no_order_by = property(lambda self: _open())
    fetch_offset_with_options = property(lambda self: _open())
    fetch_expression = property(lambda self: _open())
    materialized_views = property(lambda self: _open())
    reflect_table_options = property(lambda self: _open())
    supports_bitwise_or = property(lambda self: _open())
    supports_bitwise_and = property(lambda self: _open())
    supports_bitwise_not = property(lambda self: _open())
    supports_bitwise_xor = property(lambda self: _open())
    supports_bitwise_shift = property(lambda self: _open())

    # -- what PostgreSQL does not have ---------------------------------------------------

    @property
    def nvarchar_types(self) -> Any:
        return _no(_PG + ": NVARCHAR (text is Unicode already)")

    @property
    def foreign_keys_reflect_as_index(self) -> Any:
        return _no(_PG + ": a foreign key gets no index of its own")

    @property
    def unique_index_reflect_as_unique_constraints(self) -> Any:
        return _no(_PG + ": a unique index is not a unique constraint in its catalog")

    @property
    def non_updating_cascade(self) -> Any:
        return _no("PostgreSQL does ON UPDATE CASCADE; the test is for databases that do not")

    @property
    def deferrable_fks(self) -> Any:
        return _no("the suite's deferrable foreign key test is written for Oracle's "
                   "semantics, as SQLAlchemy's own requirements say")

    @property
    def computed_columns_virtual(self) -> Any:
        return _no(_PG + " before version 18: VIRTUAL generated columns")

    @property
    def fetch_percent(self) -> Any:
        return _no(_PG + ": FETCH FIRST n PERCENT")

    @property
    def materialized_views_reflect_pk(self) -> Any:
        return _no(_PG + ": primary keys on materialized views")

    @property
    def legacy_unconditional_json_extract(self) -> Any:
        return _no(_PG + ": a JSON_EXTRACT function that returns JSON text in all cases "
                   "(a legacy feature of SQLite and MySQL)")

    @property
    def repeated_column_foreign_keys(self) -> Any:
        return _no(_PG + ": a foreign key naming one local column twice")

    @property
    def repeated_remote_col_foreign_keys(self) -> Any:
        return _no(_PG + ": a foreign key naming one referenced column twice (no unique "
                   "constraint can cover it)")

    @property
    def computed_columns(self) -> Any:
        return _skip_if(
            lambda config: config.db.dialect.server_version_info < (18,),
            "PostgreSQL before 18 has STORED generated columns only, and SQLAlchemy "
            "warns (an error under its test plugin) when the suite's Computed() leaves "
            "persisted unset")

    @property
    def emulated_lastrowid(self) -> Any:
        return _no(_PG + ": cursor.lastrowid; the dialect uses RETURNING")

    @property
    def emulated_lastrowid_even_with_sequences(self) -> Any:
        return _no(_PG + ": cursor.lastrowid; the dialect uses RETURNING")

    @property
    def dbapi_lastrowid(self) -> Any:
        return _no(_PG + ": cursor.lastrowid; the dialect uses RETURNING")

    def get_order_by_collation(self, config: Any) -> str:
        return "POSIX"

    def get_isolation_levels(self, config: Any) -> dict[str, Any]:
        # In the dialect's order: the suite matches the error message that lists them.
        return {"default": "READ COMMITTED",
                "supported": list(config.db.dialect.get_isolation_level_values(None))}
