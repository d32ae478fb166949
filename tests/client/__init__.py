"""Tests of the remote client (client/)."""
