"""Tests of the core (src/dbpool): the wire codec, statement scopes, the psycopg driver."""
