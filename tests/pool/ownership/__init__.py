"""Tests of the Ownership pool and its pytest sandbox (pool/ownership/)."""
