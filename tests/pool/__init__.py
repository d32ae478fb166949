"""Tests of the in-process pool (pool/): queue, loans, metrics, recycling, query API."""
