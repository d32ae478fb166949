"""Tests that span layers: the db_connection ports, COPY, availability, packaging, bench."""
