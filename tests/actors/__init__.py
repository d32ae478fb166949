"""Tests of the connection actors (actors/): lifecycle, backoff."""
