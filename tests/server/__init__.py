"""Tests of the service (server/): dbpool serve, driven through the client."""
